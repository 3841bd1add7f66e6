#!/usr/bin/env python3
"""Summary of one tools/bench/gpu.sh run: every number, candle / best PyTorch, and the issue's targets.

    python3 tools/cuda/report.py OUT_DIR        (reads the step files in OUT_DIR, writes summary.json and summary.md)

Inputs: candle.json (model_bench), torch-eager.json and torch-sdpa.json (bench_torch.py), engine.txt
(decoder_bench's markdown), parity.json (parity.py), tests.txt (the test binary's output), steps.json, gpu.txt.
A missing input (its step failed or was skipped) leaves its rows empty.
Targets (issue 16; ratios within this run): decode at batch 32 >= 1.5x PyTorch's best; engine decode tokens/s at 64
streams >= 20x one stream; vision and prefill >= 0.9x PyTorch's best; f16 / bf16 logits within parity.py's gates.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

MEASUREMENT = re.compile(r"^(vision_images|prefill_tokens|decode_tokens)_per_s(?:_b(\d+))?$")
ORDER = {"vision_images": 0, "prefill_tokens": 1, "decode_tokens": 2}


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def engine_rows(path: Path) -> list[dict]:
    """The 'Through the engine' table of decoder_bench."""
    try:
        text = path.read_text()
    except OSError:
        return []
    section = text.split("Through the engine", 1)
    if len(section) < 2:
        return []
    table = []
    for line in section[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0].isdigit():
            table.append({
                "streams": int(cells[0]), "tokens": int(cells[1]), "wall_s": float(cells[2]),
                "aggregate_tokens_per_s": float(cells[3]), "decode_tokens_per_s": float(cells[4]),
                "ratio_to_one_stream": float(cells[5].rstrip("x")), "ttft_mean_ms": float(cells[6]),
                "ttft_max_ms": float(cells[7]),
            })
    return table


def measurement_keys(runs: list) -> list[str]:
    found = {k for run in runs if run for k in run if MEASUREMENT.match(k)}
    # vision_images_per_s repeats the first vision batch when per-batch keys exist.
    if any(k.startswith("vision_images_per_s_b") for k in found):
        found.discard("vision_images_per_s")

    def order(key):
        match = MEASUREMENT.match(key)
        return ORDER[match[1]], int(match[2] or 0)

    return sorted(found, key=order)


def fmt(value, digits=1):
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def main() -> None:
    out = Path(sys.argv[1])
    candle = load(out / "candle.json")
    torch_runs = {attn: load(out / f"torch-{attn}.json") for attn in ("eager", "sdpa")}
    parity = load(out / "parity.json")
    steps = load(out / "steps.json") or []
    engine = engine_rows(out / "engine.txt")
    tests_text = (out / "tests.txt").read_text() if (out / "tests.txt").exists() else ""
    test_line = next((line for line in tests_text.splitlines() if line.startswith("test result:")), None)
    gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else None

    measurements = []
    for key in measurement_keys([candle, *torch_runs.values()]):
        row = {"measurement": key, "candle": (candle or {}).get(key)}
        for attn, run in torch_runs.items():
            row[f"torch_{attn}"] = (run or {}).get(key)
        best = [(row[f"torch_{attn}"], attn) for attn in torch_runs if row[f"torch_{attn}"] is not None]
        if best:
            row["torch_best"], row["torch_best_attn"] = max(best)
            if row["candle"] is not None:
                row["candle_over_best"] = row["candle"] / row["torch_best"]
        measurements.append(row)

    def ratio(key):
        return next((m.get("candle_over_best") for m in measurements if m["measurement"] == key), None)

    targets = []

    def target(name, value, bound):
        targets.append({"target": name, "value": value, "bound": bound,
                        "met": None if value is None else value >= bound})

    target("decode batch 32: candle / best PyTorch", ratio("decode_tokens_per_s_b32"), 1.5)
    by_streams = {r["streams"]: r for r in engine}
    target("engine decode tokens/s: 64 streams / 1 stream",
           by_streams[64]["ratio_to_one_stream"] if 64 in by_streams else None, 20.0)
    for m in measurements:
        if m["measurement"].startswith(("vision", "prefill")):
            target(f"{m['measurement']}: candle / best PyTorch", m.get("candle_over_best"), 0.9)
    for dtype, p in ((parity or {}).get("dtypes") or {}).items():
        targets.append({"target": f"parity {dtype}: relative logits error (at most)", "value": p["relative_error"],
                        "bound": p["gate_relative"], "met": p["passed"]})

    summary = {"gpu": gpu, "device": (candle or {}).get("device"), "dtype": (candle or {}).get("dtype"),
               "steps": steps, "model_vs_pytorch": measurements, "engine": engine, "parity": parity,
               "tests": test_line, "targets": targets}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    md = [f"# GPU run: {gpu or 'no GPU information'}", "", "| step | exit | s |", "|---|---:|---:|"]
    md += [f"| {s['step']} | {s['exit']} | {s['seconds']} |" for s in steps]
    md += ["", f"candle vs PyTorch ({summary['dtype']}; PyTorch's best of eager and sdpa):", "",
           "| measurement | candle | PyTorch eager | PyTorch sdpa | best | candle / best |",
           "|---|---:|---:|---:|---|---:|"]
    md += [f"| {m['measurement']} | {fmt(m['candle'])} | {fmt(m['torch_eager'])} | {fmt(m['torch_sdpa'])} | "
           f"{m.get('torch_best_attn', '–')} | {fmt(m.get('candle_over_best'), 2)} |" for m in measurements]
    md += ["", "Engine (decoder_bench, greedy streams submitted at once):", "",
           "| streams | aggregate tok/s | decode tok/s | ratio to 1 stream | TTFT mean ms |",
           "|---:|---:|---:|---:|---:|"]
    md += [f"| {r['streams']} | {r['aggregate_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | "
           f"{r['ratio_to_one_stream']:.2f}x | {r['ttft_mean_ms']:.1f} |" for r in engine]
    md += ["", f"Kernel tests: {test_line or 'no result'}", "", "| target | value | bound | met |",
           "|---|---:|---:|---|"]
    md += [f"| {t['target']} | {fmt(t['value'], 3)} | {t['bound']} | "
           f"{'–' if t['met'] is None else 'yes' if t['met'] else 'no'} |" for t in targets]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

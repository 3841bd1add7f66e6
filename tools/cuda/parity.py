#!/usr/bin/env python3
"""Half-precision parity and batch invariance of the candle model on one device, for tools/bench/gpu.sh.

    python3 tools/cuda/parity.py --model DIR --forward BIN --device cuda --work DIR --json OUT

One batch of three prompts (left padding; two with an image, one text only) goes through:
  * HF transformers, float32, eager attention, on --device: the reference;
  * the candle forward harness (shared/model/examples/forward.rs) in f32, f16 and bf16 on --device (bf16 only on
    cuda: candle has no bf16 matrix product on the CPU).
For each candle dtype: the largest absolute logits error over the real (unpadded) positions against the reference,
the same divided by the reference's largest |logit| (the gate), and the share of positions whose argmax agrees.
Gates: f32 1e-4, f16 1e-2, bf16 5e-2 relative (MODEL_SPEC gives no half-precision tolerance; these are the bound
parity.rs uses for f16 on the tiny model, and 5x it for bf16's three fewer mantissa bits).

Batch invariance: the first prompt alone against the same prompt inside the batch, per candle dtype (max absolute
difference of its logits; 0 means bitwise the same). The attention kernel itself is bitwise batch invariant (the
kernel tests assert it); cuBLAS may pick another algorithm for another number of rows, so the model-level figure is
reported, not gated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GATES = {"f32": 1e-4, "f16": 1e-2, "bf16": 5e-2}


def prompts(cfg, device):
    """input_ids, attention_mask, image_embeds_position_mask (i64 [3, T]) and pixel_values (f32 [2, 3, S, S])."""
    q = cfg.latent_query_num
    size = cfg.vision_config.image_size
    vocab = cfg.text_config.vocab_size
    tag0 = vocab - 11 - 1024
    boi, eoi = tag0 + 1, tag0 + 2
    gen = torch.Generator().manual_seed(7)

    def text(n):
        return torch.randint(4 + q, tag0, (n,), generator=gen).tolist()

    image = [0, boi, *range(4, 4 + q), eoi]
    rows = [image + text(40), text(25), image + text(10)]
    width = max(len(r) for r in rows)
    ids = torch.full((3, width), 1, dtype=torch.long)
    mask = torch.zeros((3, width), dtype=torch.long)
    iem = torch.zeros((3, width), dtype=torch.long)
    for b, row in enumerate(rows):
        pad = width - len(row)
        ids[b, pad:] = torch.tensor(row)
        mask[b, pad:] = 1
        if row[:2] == [0, boi]:
            iem[b, pad + 2: pad + 2 + q] = 1
    pixels = torch.randn((2, 3, size, size), generator=gen)
    return ids, mask, iem, pixels


def run_candle(forward: Path, model: Path, inputs: Path, out: Path, dtype: str, device: str) -> torch.Tensor:
    cmd = [str(forward), "--model", str(model), "--inputs", str(inputs), "--out", str(out), "--dtype", dtype,
           "--device", device]
    subprocess.run(cmd, check=True)
    return load_file(str(out))["logits"].float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--forward", type=Path, required=True, help="the forward harness binary")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder for the harness's files")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    from transformers import Kosmos2ForConditionalGeneration

    device = torch.device(args.device)
    model = Kosmos2ForConditionalGeneration.from_pretrained(args.model, attn_implementation="eager",
                                                            dtype=torch.float32).to(device).eval()
    ids, mask, iem, pixels = prompts(model.config, device)
    with torch.inference_mode():
        reference = model(input_ids=ids.to(device), attention_mask=mask.to(device), pixel_values=pixels.to(device),
                          image_embeds_position_mask=iem.to(device)).logits.float().cpu()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    batch_in = args.work / "batch.safetensors"
    save_file({"input_ids": ids, "attention_mask": mask, "image_embeds_position_mask": iem,
               "pixel_values": pixels.contiguous()}, str(batch_in))
    # The first prompt alone, without padding.
    real = mask[0].bool()
    alone_in = args.work / "alone.safetensors"
    save_file({"input_ids": ids[:1, real].contiguous(), "attention_mask": mask[:1, real].contiguous(),
               "image_embeds_position_mask": iem[:1, real].contiguous(), "pixel_values": pixels[:1].contiguous()},
              str(alone_in))

    valid = mask.bool()
    scale = reference[valid].abs().max().item()
    result = {"device": args.device, "reference": "transformers f32 eager", "reference_max_abs_logit": scale,
              "positions": int(valid.sum()), "dtypes": {}}
    dtypes = ["f32", "f16"] + (["bf16"] if device.type == "cuda" else [])
    ok = True
    for dtype in dtypes:
        logits = run_candle(args.forward, args.model, batch_in, args.work / f"batch-{dtype}.safetensors", dtype,
                            args.device)
        alone = run_candle(args.forward, args.model, alone_in, args.work / f"alone-{dtype}.safetensors", dtype,
                           args.device)
        error = (logits[valid] - reference[valid]).abs().max().item()
        agree = (logits[valid].argmax(-1) == reference[valid].argmax(-1)).float().mean().item()
        batch_diff = (alone[0] - logits[0, real]).abs().max().item()
        passed = error / scale <= GATES[dtype]
        ok &= passed
        result["dtypes"][dtype] = {
            "max_abs_error": error,
            "relative_error": error / scale,
            "gate_relative": GATES[dtype],
            "passed": passed,
            "argmax_agreement": agree,
            "alone_vs_batched_max_abs": batch_diff,
        }
        print(f"{dtype}: max |logits - reference| {error:.3e} (relative {error / scale:.3e}, gate "
              f"{GATES[dtype]:.0e}: {'ok' if passed else 'FAIL'}), argmax agreement {agree:.4f}, "
              f"alone vs batched {batch_diff:.3e}", flush=True)
    result["passed"] = ok
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Candle vs PyTorch on the same random mid-size Kosmos-2, same thread count, in one run; prints the ratios.
#
#   tools/bench/model.sh [THREADS]        (default 2)
#
# Writes the model to .ref-cache/bench-model once (tools/reference/run.sh bench-model), then runs the PyTorch
# baseline (tools/reference/bench_torch.py) and the candle bench (shared/model/examples/model_bench.rs), which share one
# protocol, and prints candle / PyTorch for each measurement. Results land in .ref-cache/bench-*.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
threads="${1:-2}"
model=.ref-cache/bench-model
[ -f "$model/model.safetensors" ] || tools/reference/run.sh bench-model "$model"
cargo build --release -p kosmos-model --example model_bench
OMP_NUM_THREADS="$threads" tools/reference/run.sh bench-torch --model "$model" --threads "$threads" \
  --json .ref-cache/bench-torch.json >/dev/null
RAYON_NUM_THREADS="$threads" target/release/examples/model_bench --model "$model" --json .ref-cache/bench-candle.json >/dev/null
tools/reference/run.sh python - <<'PY'
import json
t = json.load(open(".ref-cache/bench-torch.json"))
c = json.load(open(".ref-cache/bench-candle.json"))
print(f"threads: torch {t['threads']}, candle {c['threads']}; torch {t['torch']}")
print(f"{'measurement':<26}{'pytorch':>12}{'candle':>12}{'candle/pytorch':>16}")
for key in ("vision_images_per_s", "prefill_tokens_per_s", "decode_tokens_per_s_b1", "decode_tokens_per_s_b8"):
    print(f"{key:<26}{t[key]:>12.2f}{c[key]:>12.2f}{c[key] / t[key]:>16.2f}")
PY

#!/usr/bin/env bash
# Candle vs PyTorch on the same random Kosmos-2, same thread count, in one run; prints the ratios.
#
#   tools/bench/model.sh [THREADS] [SIZES]     (defaults: 2 threads, size base)
#
# SIZES is a comma-separated list of make_bench_model.py presets: base (12 x 768 text and vision, in
# .ref-cache/bench-model) and small (25 M text parameters: 8 x 512 text, ViT-S/16 vision, in
# .ref-cache/bench-model-small); `tools/bench/model.sh 2 base,small` runs both sizes.
# Writes each model once (tools/reference/run.sh bench-model), then per size runs the PyTorch baseline
# (tools/reference/bench_torch.py: the faster of eager and sdpa attention per measurement) and the candle bench
# (shared/model/examples/model_bench.rs), which share one protocol, and prints candle / PyTorch for each measurement.
# Results land in .ref-cache/bench-{torch,candle}[-SIZE].json.
set -euo pipefail
cd "$(dirname "$0")/../.."
threads="${1:-2}"
sizes="${2:-base}"
# CANDLE_BENCH=PATH runs a model_bench binary built otherwise (another profile) instead of building the release one.
if [ -n "${CANDLE_BENCH:-}" ]; then
  candle_bench="$CANDLE_BENCH"
else
  cargo build --release -p kosmos-model --example model_bench
  candle_bench="${CARGO_TARGET_DIR:-target}/release/examples/model_bench"
fi
IFS=',' read -r -a size_list <<<"$sizes"
for size in "${size_list[@]}"; do
  case "$size" in
  base) model=.ref-cache/bench-model suffix="" ;;
  small) model=.ref-cache/bench-model-small suffix="-small" ;;
  *) echo "model.sh: unknown size '$size' (base or small)" >&2; exit 2 ;;
  esac
  [ -f "$model/model.safetensors" ] || tools/reference/run.sh bench-model "$model" --preset "$size"
  torch_json=".ref-cache/bench-torch$suffix.json"
  candle_json=".ref-cache/bench-candle$suffix.json"
  OMP_NUM_THREADS="$threads" tools/reference/run.sh bench-torch --model "$model" --threads "$threads" \
    --json "$torch_json" >/dev/null
  RAYON_NUM_THREADS="$threads" "$candle_bench" --model "$model" --json "$candle_json" \
    >/dev/null
  SIZE="$size" TORCH_JSON="$torch_json" CANDLE_JSON="$candle_json" tools/reference/run.sh python - <<'PY'
import json
import os
t = json.load(open(os.environ["TORCH_JSON"]))
c = json.load(open(os.environ["CANDLE_JSON"]))
print(f"size {os.environ['SIZE']} ({t['model']}); threads: torch {t['threads']}, candle {c['threads']}; "
      f"torch {t['torch']}, transformers {t['transformers']}")
print(f"{'measurement':<26}{'pytorch':>12}{'attention':>11}{'candle':>12}{'candle/pytorch':>16}")
names = {"vision_images_per_s": "vision", "prefill_tokens_per_s": "prefill",
         "decode_tokens_per_s_b1": "decode_b1", "decode_tokens_per_s_b8": "decode_b8"}
for key, name in names.items():
    impl = t.get("attn_implementation", {}).get(name, "eager")
    print(f"{key:<26}{t[key]:>12.2f}{impl:>11}{c[key]:>12.2f}{c[key] / t[key]:>16.2f}")
if t.get("skipped"):
    print(f"skipped attention implementations: {t['skipped']}")
PY
done

#!/usr/bin/env bash
# Candle vs PyTorch on Kosmos-2.5's page encoder, same random model, same thread count, in one run; prints the ratios.
#
#   tools/bench/pages.sh [THREADS] [PATCHES]     (defaults: 2 threads, 1024,4096 patches)
#
# Writes the random benchmark model once into .ref-cache/bench-pages (tools/reference/bench_pages.py --write-model:
# vision 8 x 512, patch 16, 2048 latent queries), then runs the PyTorch baseline (bench_pages.py: the faster of eager
# and sdpa per size) and the candle bench (shared/model/examples/page_bench.rs), which share one protocol.
# Results land in .ref-cache/bench-pages-{torch,candle}.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
threads="${1:-2}"
patches="${2:-1024,4096}"
model=.ref-cache/bench-pages
if [ -n "${CANDLE_BENCH:-}" ]; then
  candle_bench="$CANDLE_BENCH"
else
  cargo build --release -p kosmos-model --example page_bench
  candle_bench="${CARGO_TARGET_DIR:-target}/release/examples/page_bench"
fi
mkdir -p .ref-cache
OMP_NUM_THREADS="$threads" tools/reference/run.sh python tools/reference/bench_pages.py --model "$model" \
  --threads "$threads" --patches "$patches" --json .ref-cache/bench-pages-torch.json --write-model >/dev/null
RAYON_NUM_THREADS="$threads" "$candle_bench" --model "$model" --patches "$patches" \
  --json .ref-cache/bench-pages-candle.json >/dev/null
tools/reference/run.sh python - <<'PY'
import json
t = json.load(open(".ref-cache/bench-pages-torch.json"))
c = json.load(open(".ref-cache/bench-pages-candle.json"))
print(f"threads: torch {t['threads']}, candle {c['threads']}; torch {t['torch']}, transformers {t['transformers']}")
print(f"{'patches':<10}{'pytorch pages/s':>17}{'attention':>11}{'candle pages/s':>16}{'candle/pytorch':>16}")
for key in sorted(k for k in t if k.startswith("pages_per_s_p")):
    p = key.removeprefix("pages_per_s_p")
    print(f"{p:<10}{t[key]:>17.3f}{t['attn_implementation'][p]:>11}{c[key]:>16.3f}{c[key] / t[key]:>16.2f}")
PY

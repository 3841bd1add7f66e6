#!/usr/bin/env bash
# The public API's stream scaling in one invocation: output tokens/s at several concurrency levels through
# `kosmos serve`, and each level's ratio to one stream (the decoder engine issue's target: >= 8x at 16 and 64).
#
#   tools/bench/api.sh [MODEL_DIR] [ROUNDS] [LEVELS]
#
# Defaults: .ref-cache/bench-model-small (tools/reference/run.sh bench-model writes it), 6 rounds, levels 1,16,64.
# Starts `kosmos serve` on MODEL_DIR (gRPC on 127.0.0.1:$PORT, default 50091; HTTP off), warms it up, then runs
# ROUNDS rounds. Each round measures every level once, in an order rotated from round to round (a level is measured
# first, in the middle and last equally often), because this kind of machine drifts by 10-30% over minutes and a
# fixed order would hand the drift to one level. Prints each run, then per level the median and its ratio to the
# first level's median. The load is docs/benchmarks.md's: closed loop, one 224x224 image per prompt from a reused
# pool of 4, 8 prompt words, 48-64 new tokens, seeded sampling at temperature 0.8; 8 requests at one stream, 4 per
# client above it.
#
# Environment: BIN (a kosmos binary; default: cargo build --release, then target/release/kosmos), PORT, JSON_DIR
# (default: a temporary folder; each run's `kosmos bench --json` report is kept there), SERVE_ARGS (more flags for
# `kosmos serve`, split on spaces, e.g. `--decoder-set scheduler.kv_cache_dtype=f16`).
set -euo pipefail
cd "$(dirname "$0")/../.."
model="${1:-.ref-cache/bench-model-small}"
rounds="${2:-6}"
IFS=',' read -r -a levels <<<"${3:-1,16,64}"
port="${PORT:-50091}"
[ -d "$model" ] || { echo "api.sh: no model directory '$model' (tools/reference/run.sh bench-model writes the bench models)" >&2; exit 2; }
case "$rounds" in '' | *[!0-9]* | 0) echo "api.sh: ROUNDS must be a positive integer, got '$rounds'" >&2; exit 2 ;; esac
for level in "${levels[@]}"; do
  case "$level" in '' | *[!0-9]* | 0) echo "api.sh: each level must be a positive integer, got '$level'" >&2; exit 2 ;; esac
done
if [ -n "${BIN:-}" ]; then
  kosmos="$BIN"
else
  cargo build --release -p kosmos --bin kosmos
  kosmos="${CARGO_TARGET_DIR:-target}/release/kosmos"
fi
json_dir="${JSON_DIR:-$(mktemp -d)}"
mkdir -p "$json_dir"
for level in "${levels[@]}"; do rm -f "$json_dir/c$level.txt"; done
addr="http://127.0.0.1:$port"

read -r -a serve_args <<<"${SERVE_ARGS:-}"
"$kosmos" serve --model "$model" --listen "127.0.0.1:$port" --http-listen off --metrics-listen 127.0.0.1:0 \
  "${serve_args[@]}" >"$json_dir/serve.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT

bench() { # CONCURRENCY REQUESTS JSON [extra flags]: one closed-loop run
  local concurrency="$1" requests="$2" json="$3"
  shift 3
  "$kosmos" bench --addr "$addr" --concurrency "$concurrency" --requests "$requests" --image-size 224x224 \
    --json "$json" "$@" >"$json_dir/bench.log" 2>&1
}
ready=""
for _ in $(seq 1 180); do
  kill -0 "$server" 2>/dev/null || { echo "api.sh: kosmos serve exited; its log:" >&2; cat "$json_dir/serve.log" >&2; exit 1; }
  if bench 1 1 "$json_dir/probe.json" --output-tokens 2 --prompt-words 2; then ready=1; break; fi
  sleep 1
done
[ -n "$ready" ] || { echo "api.sh: kosmos serve did not answer within 180 s; its log is $json_dir/serve.log" >&2; exit 1; }

load() { # CONCURRENCY REQUESTS JSON: one run of the measured load; a failure prints the bench's output and stops
  bench "$@" --seed 7 --temperature 0.8 --output-tokens 48..64 --prompt-words 8 --image-reuse 1 --image-pool 4 ||
    { cat "$json_dir/bench.log" >&2; exit 1; }
}
load 4 8 "$json_dir/warm-up.json"

throughput() { # JSON: the run's output tokens/s
  grep -o '"output_token_throughput": *[0-9.eE+-]*' "$1" | head -1 | sed 's/.*: *//'
}
count=${#levels[@]}
echo "model $model${SERVE_ARGS:+ ($SERVE_ARGS)}, $rounds rounds, levels ${levels[*]}; reports in $json_dir"
for ((round = 0; round < rounds; round++)); do
  for ((i = 0; i < count; i++)); do
    # Rounds 0..count-1 rotate the order forwards, the next count rounds backwards (with three levels, six rounds
    # run every order once).
    if ((round / count % 2 == 0)); then index=$(((round + i) % count)); else index=$(((round + count - i) % count)); fi
    level="${levels[$index]}"
    requests=$((level == 1 ? 8 : 4 * level))
    json="$json_dir/round$round-c$level.json"
    load "$level" "$requests" "$json"
    rate="$(throughput "$json")"
    printf 'round %d, concurrency %d: %.1f output tokens/s\n' $((round + 1)) "$level" "$rate"
    echo "$rate" >>"$json_dir/c$level.txt"
  done
done

median() { sort -g "$1" | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
base="$(median "$json_dir/c${levels[0]}.txt")"
echo
echo "| concurrent streams | output tok/s, median of $rounds | ratio to ${levels[0]} | runs, in round order |"
echo "|---:|---:|---:|---|"
for level in "${levels[@]}"; do
  med="$(median "$json_dir/c$level.txt")"
  runs="$(awk '{ printf "%s%.1f", (NR > 1 ? " " : ""), $1 }' "$json_dir/c$level.txt")"
  awk -v l="$level" -v m="$med" -v b="$base" -v r="$runs" 'BEGIN { printf "| %s | %.1f | %.2f× | %s |\n", l, m, m / b, r }'
done

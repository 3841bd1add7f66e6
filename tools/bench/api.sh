#!/usr/bin/env bash
# The public API's stream scaling in one invocation: output tokens/s at several concurrency levels through
# `kosmos serve`, and each level's ratio to one stream (the decoder engine issue's target: >= 8x at 16 and 64).
# With BASELINE set, a second build is served beside the first and every run is paired with the same run on it.
#
#   tools/bench/api.sh [MODEL_DIR] [ROUNDS] [LEVELS]
#
# Defaults: .ref-cache/bench-model-small (tools/reference/run.sh bench-model writes it), 6 rounds, levels 1,16,64.
# Starts `kosmos serve` on MODEL_DIR (gRPC on 127.0.0.1:$PORT, default 50091; HTTP off), warms it up (a few requests,
# then two per client at the highest level, so the KV pool's pages are touched before any measured run), then runs
# ROUNDS rounds. Each round measures every level once, in an order rotated from round to round (a level is measured
# first, in the middle and last equally often), because this kind of machine drifts by 10-30% over minutes and a
# fixed order would hand the drift to one level. Prints each run, then per level the median and its ratio to the
# first level's median. The load is docs/benchmarks.md's: closed loop, one 224x224 image per prompt from a reused
# pool of 4, 8 prompt words, 48-64 new tokens, seeded sampling at temperature 0.8; 8 requests at one stream, 4 per
# client above it.
#
# Environment: BIN (a kosmos binary; default: cargo build --release, then target/release/kosmos), PORT, JSON_DIR
# (default: a temporary folder; each run's `kosmos bench --json` report is kept there), SERVE_ARGS (more flags for
# `kosmos serve`, split on spaces, e.g. `--decoder-set scheduler.kv_cache_dtype=f16`), BASELINE (another kosmos
# binary, e.g. one built from an earlier commit: served on PORT + 1 with the same flags and measured right before or
# after each run of BIN, the two taking turns going first from round to round; the table then gives both medians,
# BIN's change and the pairs BIN won).
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
if [ -n "${BASELINE:-}" ] && [ ! -x "$BASELINE" ]; then
  echo "api.sh: BASELINE '$BASELINE' is not an executable" >&2
  exit 2
fi
json_dir="${JSON_DIR:-$(mktemp -d)}"
mkdir -p "$json_dir"
rm -f "$json_dir"/c*.txt "$json_dir"/baseline-c*.txt

# The builds under test, by name: "candidate" is BIN on PORT, "baseline" BASELINE on PORT + 1.
names=(candidate)
declare -A binary=([candidate]="$kosmos") address=([candidate]="http://127.0.0.1:$port") prefix=([candidate]="")
if [ -n "${BASELINE:-}" ]; then
  names+=(baseline)
  binary[baseline]="$BASELINE" address[baseline]="http://127.0.0.1:$((port + 1))" prefix[baseline]="baseline-"
fi
read -r -a serve_args <<<"${SERVE_ARGS:-}"
servers=()
trap 'for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; done' EXIT
for name in "${names[@]}"; do
  "${binary[$name]}" serve --model "$model" --listen "${address[$name]#http://}" --http-listen off \
    --metrics-listen 127.0.0.1:0 "${serve_args[@]}" >"$json_dir/${prefix[$name]}serve.log" 2>&1 &
  servers+=($!)
done

bench() { # ADDRESS CONCURRENCY REQUESTS JSON [extra flags]: one closed-loop run
  local address="$1" concurrency="$2" requests="$3" json="$4"
  shift 4
  "$kosmos" bench --addr "$address" --concurrency "$concurrency" --requests "$requests" --image-size 224x224 \
    --json "$json" "$@" >"$json_dir/bench.log" 2>&1
}
load() { # NAME CONCURRENCY REQUESTS JSON: one run of the measured load; a failure prints the bench's output and stops
  local name="$1"
  shift
  bench "${address[$name]}" "$@" --seed 7 --temperature 0.8 --output-tokens 48..64 --prompt-words 8 \
    --image-reuse 1 --image-pool 4 || { cat "$json_dir/bench.log" >&2; exit 1; }
}
highest="$(printf '%s\n' "${levels[@]}" | sort -n | tail -1)"
for index in "${!names[@]}"; do
  name="${names[$index]}" ready=""
  for _ in $(seq 1 180); do
    log="$json_dir/${prefix[$name]}serve.log"
    kill -0 "${servers[$index]}" 2>/dev/null || { echo "api.sh: kosmos serve ($name) exited; its log:" >&2; cat "$log" >&2; exit 1; }
    if bench "${address[$name]}" 1 1 "$json_dir/probe.json" --output-tokens 2 --prompt-words 2; then ready=1; break; fi
    sleep 1
  done
  [ -n "$ready" ] || { echo "api.sh: kosmos serve ($name) did not answer within 180 s; its log is $log" >&2; exit 1; }
  # Warm-up: a few requests, then two requests per client at the highest level, which first touches the KV pool's
  # pages a steady state uses (allocated lazily, the kernel zeroes each page on its first write; measured rounds that
  # paid it ran 15-30% slower at 16 and 64 streams).
  load "$name" 4 8 "$json_dir/${prefix[$name]}warm-up.json"
  load "$name" "$highest" $((2 * highest)) "$json_dir/${prefix[$name]}warm-up-$highest.json"
done

throughput() { # JSON: the run's output tokens/s
  grep -o '"output_token_throughput": *[0-9.eE+-]*' "$1" | head -1 | sed 's/.*: *//'
}
count=${#levels[@]}
echo "model $model${SERVE_ARGS:+ ($SERVE_ARGS)}, $rounds rounds, levels ${levels[*]}${BASELINE:+, baseline $BASELINE};" \
  "reports in $json_dir"
for ((round = 0; round < rounds; round++)); do
  # With a baseline, the two builds take turns going first.
  order=("${names[@]}")
  if ((round % 2 == 1 && ${#names[@]} == 2)); then order=(baseline candidate); fi
  for ((i = 0; i < count; i++)); do
    # Rounds 0..count-1 rotate the order forwards, the next count rounds backwards (with three levels, six rounds
    # run every order once).
    if ((round / count % 2 == 0)); then index=$(((round + i) % count)); else index=$(((round + count - i) % count)); fi
    level="${levels[$index]}"
    requests=$((level == 1 ? 8 : 4 * level))
    for name in "${order[@]}"; do
      json="$json_dir/${prefix[$name]}round$round-c$level.json"
      load "$name" "$level" "$requests" "$json"
      rate="$(throughput "$json")"
      printf 'round %d, concurrency %d%s: %.1f output tokens/s\n' $((round + 1)) "$level" \
        "${BASELINE:+, $name}" "$rate"
      echo "$rate" >>"$json_dir/${prefix[$name]}c$level.txt"
    done
  done
done

median() { sort -g "$1" | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
runs() { awk '{ printf "%s%.1f", (NR > 1 ? " " : ""), $1 }' "$1"; }
first="$(median "$json_dir/c${levels[0]}.txt")"
echo
if [ -z "${BASELINE:-}" ]; then
  echo "| concurrent streams | output tok/s, median of $rounds | ratio to ${levels[0]} | runs, in round order |"
  echo "|---:|---:|---:|---|"
  for level in "${levels[@]}"; do
    awk -v l="$level" -v m="$(median "$json_dir/c$level.txt")" -v b="$first" -v r="$(runs "$json_dir/c$level.txt")" \
      'BEGIN { printf "| %s | %.1f | %.2f× | %s |\n", l, m, m / b, r }'
  done
else
  base_first="$(median "$json_dir/baseline-c${levels[0]}.txt")"
  echo "| concurrent streams | baseline, median of $rounds | BIN, median | change | pairs BIN won |" \
    "ratio to ${levels[0]}, baseline → BIN |"
  echo "|---:|---:|---:|---:|---:|---|"
  for level in "${levels[@]}"; do
    won="$(paste "$json_dir/c$level.txt" "$json_dir/baseline-c$level.txt" | awk '$1 > $2 { n++ } END { print n + 0 }')"
    awk -v l="$level" -v m="$(median "$json_dir/c$level.txt")" -v b="$(median "$json_dir/baseline-c$level.txt")" \
      -v f="$first" -v bf="$base_first" -v w="$won" -v n="$rounds" \
      'BEGIN { printf "| %s | %.1f | %.1f | %+.1f%% | %d of %d | %.2f× → %.2f× |\n",
               l, b, m, 100 * (m / b - 1), w, n, b / bf, m / f }'
  done
  echo
  for level in "${levels[@]}"; do
    echo "runs at $level, in round order: baseline $(runs "$json_dir/baseline-c$level.txt");" \
      "BIN $(runs "$json_dir/c$level.txt")"
  done
fi

#!/usr/bin/env bash
# The GPU run, in one invocation: candle vs PyTorch on a random Kosmos-2 with the real microsoft/kosmos-2-patch14-224
# shapes, the engine's stream scaling, and the CUDA tests. Made for a GPU machine with no Rust toolchain and no
# network (CUDA 13 driver and libraries, Python with PyTorch and transformers), run from a copy of the working tree
# with the bundle of tools/cuda/build.sh --bundle beside it; finishes well inside ten minutes on one H100/H200.
#
#   tools/bench/gpu.sh OUT_DIR [--bin DIR] [--model DIR] [--device cuda|cpu] [--tiny]
#
#   --bin DIR      the binaries: the bundle (default target/cuda/sm90/bundle: *.xz, unpacked to a scratch folder)
#                  or a folder holding kosmos_model_tests, forward, model_bench, decoder_bench (plain or .xz; a
#                  cargo target profile folder works: examples/ is searched too)
#   --model DIR    an existing model directory instead of generating the random real-shape one
#   --device cpu   the dry run: everything on the CPU (f32 and f16 only: candle has no bf16 matrix product there)
#   --tiny         small batches and stream counts (with --device cpu; the model defaults to tests/fixtures/tiny)
#
# Steps, each under its own time limit; a failed step is recorded and the rest still run:
#   1. env         nvidia-smi, torch / transformers versions, the binaries' libraries (ldd: nothing missing)
#   2. model       tools/reference/make_bench_model.py --shape kosmos2 --device cuda (f32 safetensors, 6.6 GB)
#   3. tests       the model crate's tests with the CUDA kernel tests (paged ops: CUDA vs CPU in f32/f16/bf16,
#                  bitwise batch invariance, fixed launch count)
#   4. candle      model_bench: vision images/s at batch 1/8/32, prefill tokens/s (128-token prompt), decode tokens/s
#                  at batch 1/8/32/128 (32 greedy steps), bf16 weights
#   5. torch       tools/reference/bench_torch.py, the same protocol, bf16, attention eager and sdpa
#   6. engine      decoder_bench: the decoder's engine (continuous batching over the paged cache) with 1/16/64/256
#                  concurrent greedy streams, bf16
#   7. parity      tools/cuda/parity.py: candle f32/f16/bf16 logits against transformers f32, and one prompt alone vs
#                  batched
#   8. report      summary.json / summary.md: every number, candle / best PyTorch ratios, the issue's targets
# Everything lands in OUT_DIR: log.txt (the whole run), steps.json (status and seconds of each step), one JSON (or
# text) per step, summary.json and summary.md. Environment: PYTHON (default python3: the one with torch).
set -uo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
[[ $# -ge 1 && "$1" != -* ]] || usage
out="$1"
shift
bin_dir=""
model=""
device=cuda
tiny=0
while [[ $# -gt 0 ]]; do
    case "$1" in
    --bin) bin_dir="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --tiny) tiny=1; shift ;;
    *) usage ;;
    esac
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"
python="${PYTHON:-python3}"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/kosmos-gpu.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
log="$out/log.txt"
: >"$log"
steps="$out/steps.jsonl"
: >"$steps"
started_all=$SECONDS

if [[ $tiny == 1 ]]; then
    vision_batches=1,2
    decode_batches=1,2
    streams=1,2
    new_tokens=8
    [[ -n "$model" ]] || model="$root/tests/fixtures/tiny"
else
    vision_batches=1,8,32
    decode_batches=1,8,32,128
    streams=1,16,64,256
    new_tokens=64
fi
if [[ $device == cpu ]]; then
    dtype=f32
else
    dtype=bf16
fi

say() { echo "$*" | tee -a "$log"; }
export scratch out python bin_dir device dtype streams new_tokens

# step NAME LIMIT_S COMMAND...: runs COMMAND with its output in the log, records status and seconds.
step() {
    local name="$1" limit="$2" rc started
    shift 2
    say "== $name (limit ${limit}s, at $((SECONDS - started_all))s)"
    started=$SECONDS
    if declare -F "$1" >/dev/null; then
        # A shell function: timeout runs programs, so the function goes to a child bash (with the variables below
        # exported).
        timeout --kill-after=10 "$limit" bash -c "$(declare -f "$1"); $(printf '%q ' "$@")" >>"$log" 2>&1
    else
        timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    fi
    rc=$?
    say "== $name: exit $rc in $((SECONDS - started))s"
    printf '{"step": "%s", "exit": %d, "seconds": %d}\n' "$name" "$rc" "$((SECONDS - started))" >>"$steps"
    return $rc
}

# ------------------------------------------------------------------------------------------------- binaries
[[ -n "$bin_dir" ]] || bin_dir="$root/target/cuda/sm90/bundle"
mkdir -p "$scratch/bin"
for name in kosmos_model_tests forward model_bench decoder_bench; do
    found=""
    for candidate in "$bin_dir/$name" "$bin_dir/examples/$name" "$bin_dir/$name.xz" "$bin_dir/examples/$name.xz"; do
        if [[ -f "$candidate" ]]; then
            found="$candidate"
            break
        fi
    done
    if [[ -z "$found" && $name == kosmos_model_tests ]]; then
        # A cargo profile folder: the test binary is deps/kosmos_model-<hash> (the newest).
        found="$(ls -t "$bin_dir"/deps/kosmos_model-* 2>/dev/null | grep -v '\.d$' | head -1)"
    fi
    if [[ -z "$found" ]]; then
        say "gpu.sh: no $name in $bin_dir (build it with tools/cuda/build.sh --bundle)"
        continue
    fi
    if [[ "$found" == *.xz ]]; then
        xz -dc "$found" >"$scratch/bin/$name" 2>/dev/null || "$python" -c \
            'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
            "$found" "$scratch/bin/$name"
    else
        cp "$found" "$scratch/bin/$name"
    fi
    chmod +x "$scratch/bin/$name"
done

# The CUDA libraries the binaries were linked against (sonames in the bundle's needed.txt): from the CUDA toolkit
# or from the wheels PyTorch brought. libcuda.so.1 is the driver's, already on the loader path.
if [[ $device != cpu ]]; then
    lib_dirs=()
    site="$("$python" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)"
    for soname in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
        for dir in ${CUDA_HOME:+$CUDA_HOME/lib64} /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64 \
            /usr/local/cuda/targets/x86_64-linux/lib $(for s in $site; do echo "$s"/nvidia/cu13/lib "$s"/nvidia/*/lib; done); do
            if [[ -e "$dir/$soname" ]]; then
                [[ " ${lib_dirs[*]} " == *" $dir "* ]] || lib_dirs+=("$dir")
                break
            fi
        done
    done
    export LD_LIBRARY_PATH="$(IFS=:; echo "${lib_dirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "gpu.sh: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
fi

env_info() {
    if command -v nvidia-smi >/dev/null; then
        { nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || true; } | tee "$out/gpu.txt"
    else
        echo "no GPU (no nvidia-smi): device $device" | tee "$out/gpu.txt"
    fi
    "$python" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
    for b in "$scratch"/bin/*; do
        echo "$(basename "$b"):"
        ldd "$b" | grep -E 'cuda|cublas|curand|nvrtc|not found' || true
        if ldd "$b" | grep -q 'not found'; then
            echo "gpu.sh: $(basename "$b") misses a library"
            return 1
        fi
    done
    cat "$bin_dir/commit.txt" "$bin_dir/compute_cap.txt" 2>/dev/null || true
}
step env 60 env_info

# ---------------------------------------------------------------------------------------------------- model
if [[ -z "$model" ]]; then
    model="$scratch/kosmos2-random"
    step model 240 "$python" tools/reference/make_bench_model.py "$model" --shape kosmos2 --device "$device"
fi

export model

# ---------------------------------------------------------------------------------------------------- tests
# The whole model crate's unit tests: the paged ops' CUDA tests (CUDA vs the CPU op in f32, f16 and bf16; a
# sequence's output bitwise the same alone and batched) and the CPU-side tests around them.
tests() {
    "$scratch/bin/kosmos_model_tests" --test-threads 1 paged 2>&1 | tee "$out/tests.txt"
    return "${PIPESTATUS[0]}"
}
if [[ $device != cpu ]]; then
    step tests 180 tests
fi

# ---------------------------------------------------------------------------------------------- benchmarks
step candle 180 "$scratch/bin/model_bench" --model "$model" --device "$device" --dtype "$dtype" \
    --vision-batches "$vision_batches" --decode-batches "$decode_batches" --json "$out/candle.json"
for attn in eager sdpa; do
    step "torch-$attn" 180 "$python" tools/reference/bench_torch.py --model "$model" --threads "$(nproc)" \
        --device "$device" --dtype "$dtype" --attn "$attn" --vision-batches "$vision_batches" \
        --decode-batches "$decode_batches" --json "$out/torch-$attn.json"
done
engine() {
    "$scratch/bin/decoder_bench" --model-dir "$model" --device "$device" --dtype "$dtype" --streams "$streams" \
        --prompt-tokens 32 --new-tokens "$new_tokens" --repeats 3 2>&1 | tee "$out/engine.txt"
    return "${PIPESTATUS[0]}"
}
step engine 180 engine

# ------------------------------------------------------------------------------------------------ parity
step parity 180 "$python" tools/cuda/parity.py --model "$model" --forward "$scratch/bin/forward" --device "$device" \
    --work "$scratch/parity" --json "$out/parity.json"

# ------------------------------------------------------------------------------------------------ report
"$python" - "$steps" >"$out/steps.json" <<'PY'
import json, sys
print(json.dumps([json.loads(line) for line in open(sys.argv[1])], indent=2))
PY
rm -f "$steps"
step report 30 "$python" tools/cuda/report.py "$out"
say "gpu.sh: done in $((SECONDS - started_all))s; results in $out"

#!/usr/bin/env bash
# Builds the CUDA `kosmos` on a machine with no GPU and no CUDA toolkit.
#
#   tools/cuda/build.sh [--bundle] [CAP...]      CAP: compute capability, 90 (H100/H200) or 80 (A100/A10/L4 class);
#                                                default: 90 then 80
#
# 1. Installs pinned CUDA 13.0 (Update 2) parts from PyPI into the ignored .tools/cuda-13.0/ (once; a stamp holds the
#    pin list): nvcc, the C runtime headers, NVVM, CCCL, cudart, cuBLAS, cuRAND and NVRTC, the versions
#    cuda-toolkit==13.0.2 pins. The wheels are unpacked, not pip-installed, and deleted after unpacking.
# 2. Adds the unversioned .so names the linker looks for (libcublas.so -> libcublas.so.13, ...) and a link-time stub
#    libcuda.so (soname libcuda.so.1) with every cu* entry point cudarc declares: no wheel ships the driver library.
#    The stub lives in lib/stubs, only on the link path; at run time the real driver (libcuda.so.1) is found.
# 3. Builds `cargo build --release -p kosmos --features cuda` with CUDA_COMPUTE_CAP=CAP into target/cuda/sm<CAP>
#    (its own target folder: the CPU build in target/ is never invalidated).
#
# One build per CAP: candle's kernels (candle-kernels via cudaforge) and ours (shared/model/build.rs) are PTX
# for one virtual architecture, taken from CUDA_COMPUTE_CAP (cudaforge reads one value; 90 becomes compute_90a).
# The driver JIT-compiles PTX for the GPU it runs on, so an 80 build also runs on 86/89/90 GPUs (A10, L4, H100);
# a 90 build (compute_90a) runs on Hopper only. candle's statically compiled MoE/GGUF kernels are SASS for CAP only,
# and kosmos never calls them.
#
# --bundle also builds what tools/bench/gpu.sh runs on the GPU machine (the forward harness, the model and decoder
# benches, the model crate's tests) and writes them, stripped and xz-compressed, with the runtime libraries' sonames,
# to target/cuda/sm<CAP>/bundle/ (carry that folder to the GPU machine; it holds no CUDA library).
#
# Prints the path of the built `kosmos` binary as its last line (of the last CAP when several are given).
# Environment: CARGO_BUILD_JOBS as usual; KOSMOS_CUDA_TOOLS overrides the toolkit folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"

bundle=0
caps=()
for arg in "$@"; do
    case "$arg" in
    --bundle) bundle=1 ;;
    [0-9][0-9] | [0-9][0-9][0-9]) caps+=("$arg") ;;
    *)
        sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
    esac
done
[[ ${#caps[@]} -gt 0 ]] || caps=(90 80)

# CUDA 13.0 Update 2: the versions `cuda-toolkit==13.0.2` pins (its wheel's Requires-Dist). nvidia-cuda-nvcc 13.0.88
# is the nvcc of that release; the GPU machine's driver (580) runs CUDA 13.0 code.
wheels=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-runtime==13.0.96
    nvidia-cublas==13.1.0.3
    nvidia-curand==10.4.0.35
    nvidia-cuda-nvrtc==13.0.88
)
tools="${KOSMOS_CUDA_TOOLS:-$root/.tools/cuda-13.0}"
cuda="$tools/nvidia/cu13"
stamp="$tools/.wheels"

install_toolkit() {
    local want
    want="$(printf '%s\n' "${wheels[@]}")"
    if [[ -x "$cuda/bin/nvcc" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    echo "build.sh: installing CUDA 13.0 from PyPI into $tools" >&2
    rm -rf "$tools"
    mkdir -p "$tools/wheels"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$tools/wheels" "${wheels[@]}"
    local wheel
    for wheel in "$tools"/wheels/*.whl; do
        python3 -m zipfile -e "$wheel" "$tools"
    done
    rm -rf "$tools/wheels" "$tools"/*.dist-info
    # zipfile drops the executable bits.
    chmod +x "$cuda"/bin/* "$cuda"/nvvm/bin/*

    # The linker wants unversioned names; the wheels ship only the sonames.
    local lib
    for lib in cublas cublasLt cudart curand nvrtc; do
        local versioned
        versioned="$(cd "$cuda/lib" && ls "lib$lib.so."* | grep -E "^lib$lib\.so\.[0-9]+$" | head -1)"
        ln -sf "$versioned" "$cuda/lib/lib$lib.so"
    done

    # libcuda.so: a stub with cudarc's driver entry points (cudarc links the driver with -lcuda).
    local cudarc_version cudarc_src
    cudarc_version="$(awk '/^name = "cudarc"$/ { getline; gsub(/"/, "", $3); print $3 }' Cargo.lock)"
    cargo fetch --locked >/dev/null
    cudarc_src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc_version" | head -1)"
    mkdir -p "$cuda/lib/stubs"
    grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$cudarc_src/src/driver/sys/mod.rs" | sed 's/^pub unsafe fn //' | sort -u |
        sed 's/.*/void &(void) {}/' >"$tools/cuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" "$tools/cuda_stub.c"
    echo "$want" >"$stamp"
    echo "build.sh: nvcc $("$cuda/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), stub libcuda.so with $(wc -l <"$tools/cuda_stub.c") entry points" >&2
}

install_toolkit

export PATH="$cuda/bin:$PATH"
# cudarc's build script takes the link path from CUDA_ROOT (lib/, lib/stubs/); cudaforge finds nvcc on PATH.
export CUDA_ROOT="$cuda"
export NVCC="$cuda/bin/nvcc"
# The same libraries for every link (binaries, examples, test binaries), whichever crate's build script ran.
export LIBRARY_PATH="$cuda/lib:$cuda/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"

built=()
for cap in "${caps[@]}"; do
    target="$root/target/cuda/sm$cap"
    export CUDA_COMPUTE_CAP="$cap" CARGO_TARGET_DIR="$target"
    started=$SECONDS
    cargo build --release --locked -p kosmos --features cuda
    echo "build.sh: sm$cap kosmos built in $((SECONDS - started)) s" >&2
    if [[ $bundle == 1 ]]; then
        out="$target/bundle"
        rm -rf "$out"
        mkdir -p "$out"
        cargo build --release --locked -p kosmos-model --features cuda --example forward --example model_bench
        cargo build --release --locked -p kosmos-decoder --features cuda --example decoder_bench
        # The model crate's unit tests, with the CUDA kernel tests (parity with the CPU op, batch invariance).
        tests_json="$(cargo test --release --locked -p kosmos-model --features cuda --lib --no-run --message-format=json)"
        model_tests="$(printf '%s\n' "$tests_json" | python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["kind"] == ["lib"]:
        print(msg["executable"])')"
        cp "$target/release/kosmos" "$target/release/examples/forward" "$target/release/examples/model_bench" \
            "$target/release/examples/decoder_bench" "$out/"
        cp "$model_tests" "$out/kosmos_model_tests"
        for bin in "$out"/*; do
            strip "$bin"
            xz -T0 -6 "$bin"
        done
        # What the GPU machine must provide (gpu.sh checks them before running anything).
        readelf -d "$target/release/kosmos" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' >"$out/needed.txt"
        git -C "$root" rev-parse HEAD >"$out/commit.txt"
        echo "$cap" >"$out/compute_cap.txt"
        echo "build.sh: bundle $out ($(du -sh "$out" | cut -f1))" >&2
    fi
    built+=("$target/release/kosmos")
done
for path in "${built[@]}"; do
    echo "$path"
done

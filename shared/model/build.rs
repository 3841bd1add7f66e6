//! With the `cuda` feature: compiles `kernels/paged_attention.cu` to PTX with nvcc into `OUT_DIR`
//! (`src/paged/cuda.rs` embeds it). Without the feature it does nothing, so CPU builds need no CUDA toolkit.
//!
//! nvcc is `$NVCC`, else `$CUDA_ROOT/bin/nvcc`, `$CUDA_HOME/bin/nvcc`, else `nvcc` on `PATH` (the order candle's
//! kernel build, cudaforge, looks). The PTX targets the virtual architecture `compute_<CUDA_COMPUTE_CAP>` (default
//! 80), the variable candle's kernels are built with, without the `a` suffix: the kernels use nothing
//! architecture-specific, and plain PTX stays loadable on every later GPU (the driver JIT-compiles it).

use std::env;
use std::path::PathBuf;
use std::process::Command;

const KERNEL: &str = "kernels/paged_attention.cu";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo::rerun-if-changed={KERNEL}");
    for var in ["NVCC", "CUDA_ROOT", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo::rerun-if-env-changed={var}");
    }

    let out =
        PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("paged_attention.ptx");
    let arch = format!("compute_{}", compute_cap());
    let nvcc = nvcc();
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
        .arg(format!("-arch={arch}"))
        .arg("-o")
        .arg(&out)
        .arg(KERNEL)
        .status()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run {}: {err} (set NVCC or put nvcc on PATH)",
                nvcc.display()
            )
        });
    assert!(
        status.success(),
        "{} failed on {KERNEL} for {arch}: {status}",
        nvcc.display()
    );
}

/// The numeric compute capability of `CUDA_COMPUTE_CAP` ("90", "90a", "sm_90a", "9.0"), 80 when unset.
fn compute_cap() -> u32 {
    let Ok(raw) = env::var("CUDA_COMPUTE_CAP") else {
        return 80;
    };
    let digits: String = raw
        .trim()
        .trim_start_matches("sm_")
        .chars()
        .filter(|c| c.is_ascii_digit())
        .collect();
    match digits.parse::<u32>() {
        Ok(cap) if cap < 20 => cap * 10,
        Ok(cap) => cap,
        Err(_) => panic!("CUDA_COMPUTE_CAP={raw:?} is not a compute capability such as 80 or 90"),
    }
}

fn nvcc() -> PathBuf {
    if let Some(nvcc) = env::var_os("NVCC") {
        return nvcc.into();
    }
    for root in ["CUDA_ROOT", "CUDA_HOME"] {
        if let Some(root) = env::var_os(root) {
            let nvcc = PathBuf::from(root).join("bin").join("nvcc");
            if nvcc.is_file() {
                return nvcc;
            }
        }
    }
    "nvcc".into()
}

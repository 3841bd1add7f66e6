//! Candle timings of Kosmos-2.5's page encoder with exactly the protocol of `tools/reference/bench_pages.py` (read
//! its header): one page of P patches (a 32 x 32 or 64 x 64 grid filling the budget) through the page tower, the L2
//! normalisation and the connector; median of 3 timed runs after 1 untimed; pages/s.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p kosmos-model --example page_bench -- --model DIR --json OUT.json
//! ```
//! `tools/bench/pages.sh` runs it and the PyTorch baseline in the same invocation and prints the ratios.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use kosmos_model::{
    DType, Device, Family, ModelFiles, Tensor, VisionHalf, parse_device, parse_dtype,
};

const REPS: usize = 3;
const PATCH: usize = 16;

#[derive(Debug, Parser)]
struct Args {
    /// A Kosmos-2.5 model directory in Hugging Face layout.
    #[arg(long)]
    model: PathBuf,
    /// Where to write the JSON result.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Patches per page, comma separated (1024: a 32 x 32 grid, 4096: 64 x 64).
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    patches: Vec<usize>,
    /// Weight dtype (f32 matches the PyTorch baseline).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// A page of `rows` x `cols` patches: ids 1.., pixel values from a fixed pseudo-random sequence.
fn page(rows: usize, cols: usize, device: &Device) -> anyhow::Result<Tensor> {
    let width = 2 + PATCH * PATCH * 3;
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut values = Vec::with_capacity(rows * cols * width);
    for r in 0..rows {
        for c in 0..cols {
            values.push((r + 1) as f32);
            values.push((c + 1) as f32);
            for _ in 2..width {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                values.push(((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0);
            }
        }
    }
    Ok(Tensor::from_vec(values, (1, rows * cols, width), device)?)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = parse_device(&args.device)?;
    let dtype: DType = parse_dtype(&args.dtype)?;
    let files = ModelFiles::open(&args.model).with_context(|| args.model.display().to_string())?;
    anyhow::ensure!(
        files.config.family() == Family::Kosmos25,
        "{} is not a Kosmos-2.5 model",
        args.model.display()
    );
    let vision = VisionHalf::load(&files, dtype, &device)?;
    let mut result = serde_json::json!({
        "threads": candle_core::utils::get_num_threads(),
        "model": args.model.display().to_string(),
        "median_s": {},
        "runs_s": {},
    });
    for &patches in &args.patches {
        let side = (patches as f64).sqrt() as usize;
        anyhow::ensure!(
            side * side == patches,
            "--patches takes square grids (1024, 4096), got {patches}"
        );
        let input = page(side, side, &device)?;
        let run = || -> anyhow::Result<f64> {
            let started = Instant::now();
            let embeds = vision.encode_pages(&input)?;
            // Wait for the device (a no-op on the CPU).
            embeds.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
            Ok(started.elapsed().as_secs_f64())
        };
        run()?;
        let mut runs = (0..REPS)
            .map(|_| run())
            .collect::<anyhow::Result<Vec<f64>>>()?;
        let recorded = runs.clone();
        runs.sort_by(f64::total_cmp);
        let median = runs[REPS / 2];
        println!("{patches} patches: {median:.3} s");
        result[format!("pages_per_s_p{patches}")] = serde_json::json!(1.0 / median);
        result["median_s"][patches.to_string()] = serde_json::json!(median);
        result["runs_s"][patches.to_string()] = serde_json::json!(recorded);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)? + "\n")?;
    }
    Ok(())
}

//! Micro-benchmark of one weight product, as the model runs it, at the row counts decoding and prefill see:
//! candle's `Linear` (weight `(out, in)`, multiplied by its transposed view), [`kosmos_model::Projection`] with its
//! weight stored `(in, out)` and multiplied by one accumulating `gemm` call (`Projection::unpacked`, the layout of
//! other devices and of f16), and `Projection` as the model loads it on the CPU in f32 (weight packed into column
//! panels, `panels.rs`'s kernel). Also the LM head without bias: `hidden · E^T` on a view vs a transposed copy.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p kosmos-model --example projection_bench
//! ```
//! Prints the median microseconds per call of each variant and the ratios to candle's `Linear`; every variant runs
//! interleaved with the others, so machine load hits them alike.

use std::time::Instant;

use candle_core::{Device, Module, Tensor};
use clap::Parser;
use kosmos_model::Projection;

#[derive(Debug, Parser)]
struct Args {
    /// Row counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,64,128")]
    rows: Vec<usize>,
    /// Shapes `in x out` to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "768x768,768x3072,3072x768,768x2304"
    )]
    shapes: Vec<String>,
    /// Vocabulary of the LM-head case (0 skips it).
    #[arg(long, default_value_t = 2035)]
    vocab: usize,
    /// Timed rounds per case (each round calls every variant once).
    #[arg(long, default_value_t = 31)]
    rounds: usize,
}

/// Median microseconds of each closure, called in turn `rounds` times after one untimed round.
fn interleaved(
    rounds: usize,
    variants: &mut [&mut dyn FnMut() -> anyhow::Result<Tensor>],
) -> anyhow::Result<Vec<f64>> {
    let mut samples = vec![Vec::with_capacity(rounds); variants.len()];
    for round in 0..=rounds {
        for (variant, times) in variants.iter_mut().zip(samples.iter_mut()) {
            let started = Instant::now();
            drop(variant()?);
            if round > 0 {
                times.push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    Ok(samples
        .into_iter()
        .map(|mut times| {
            times.sort_by(f64::total_cmp);
            times[times.len() / 2]
        })
        .collect())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = Device::Cpu;
    println!("threads {}", candle_core::utils::get_num_threads());
    println!(
        "{:<11}{:>6}{:>12}{:>11}{:>13}{:>10}{:>12}{:>13}",
        "in x out",
        "rows",
        "Linear us",
        "gemm us",
        "panels us",
        "gemm/Lin",
        "panels/Lin",
        "panels/gemm"
    );
    for shape in &args.shapes {
        let (in_dim, out_dim) = shape
            .split_once('x')
            .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
            .ok_or_else(|| anyhow::anyhow!("shape {shape} is not IN x OUT"))?;
        let weight = (Tensor::randn(0f32, 1f32, (out_dim, in_dim), &device)? * 0.02)?;
        let bias = Tensor::randn(0f32, 0.02f32, out_dim, &device)?;
        let linear = candle_nn::Linear::new(weight.clone(), Some(bias.clone()));
        let projection = Projection::from_out_in(&weight, bias.clone())?;
        let unpacked = projection.unpacked()?;
        for &rows in &args.rows {
            let xs = Tensor::randn(0f32, 1f32, (rows, in_dim), &device)?;
            let times = interleaved(
                args.rounds,
                &mut [
                    &mut || Ok(linear.forward(&xs)?),
                    &mut || Ok(unpacked.forward(&xs)?),
                    &mut || Ok(projection.forward(&xs)?),
                ],
            )?;
            println!(
                "{:<11}{:>6}{:>12.1}{:>11.1}{:>13.1}{:>10.2}{:>12.2}{:>13.2}",
                shape,
                rows,
                times[0],
                times[1],
                times[2],
                times[1] / times[0],
                times[2] / times[0],
                times[2] / times[1]
            );
        }
    }
    if args.vocab > 0 {
        let hidden = 768;
        let embeddings = (Tensor::randn(0f32, 1f32, (args.vocab, hidden), &device)? * 0.02)?;
        let transposed = embeddings.t()?.contiguous()?;
        println!("\nLM head {hidden} x {}: hidden . E^T", args.vocab);
        println!(
            "{:>6}{:>12}{:>14}{:>12}",
            "rows", "view us", "(in,out) us", "copy/view"
        );
        for &rows in &args.rows {
            let xs = Tensor::randn(0f32, 1f32, (rows, hidden), &device)?;
            let times = interleaved(
                args.rounds,
                &mut [&mut || Ok(xs.matmul(&embeddings.t()?)?), &mut || {
                    Ok(xs.matmul(&transposed)?)
                }],
            )?;
            println!(
                "{:>6}{:>12.1}{:>14.1}{:>12.2}",
                rows,
                times[0],
                times[1],
                times[1] / times[0]
            );
        }
    }
    Ok(())
}

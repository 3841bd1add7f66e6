//! The sampler's cost per logits row: greedy, temperature, top-p and top-k over a vocabulary the size of the bench
//! models' (2,035) and of Kosmos-2's (65,037), and the rows of one engine step sampled one after another against in
//! parallel on the thread pool (what the engine does). Every ratio is measured in the same run.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p kosmos-decoder --example sampling_bench
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use kosmos_decoder::sampling::{Sampler, SamplingParams};
use rayon::prelude::*;

/// Benchmark settings.
#[derive(Debug, Parser)]
struct Args {
    /// Vocabulary sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "2035,65037")]
    vocab: Vec<usize>,
    /// Rows of the step compared serial against parallel, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    rows: Vec<usize>,
    /// Draws per measurement (the median of 5 rounds is reported).
    #[arg(long, default_value_t = 200)]
    draws: usize,
}

/// Deterministic logits shaped like a language model's: a few large values over a wide negative tail.
fn logits(seed: u64, vocab: usize) -> Vec<f32> {
    let mut state = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    (0..vocab)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let uniform = (state >> 40) as f32 / (1u64 << 24) as f32;
            // Exponential tail: most logits far below the top few.
            12.0 * uniform.powi(6) - 4.0
        })
        .collect()
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

/// Median time of one `sample` call over `draws` calls, in microseconds.
fn per_row_us(params: &SamplingParams, row: &[f32], draws: usize) -> anyhow::Result<f64> {
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let mut sampler = Sampler::new(params.clone());
        let started = Instant::now();
        for _ in 0..draws {
            std::hint::black_box(sampler.sample(row, &[])?);
        }
        rounds.push(started.elapsed());
    }
    Ok(median(rounds).as_secs_f64() * 1e6 / draws as f64)
}

/// Median time of sampling every row of a step, one after another or in parallel, in milliseconds.
fn step_ms(
    params: &SamplingParams,
    rows: &[Vec<f32>],
    parallel: bool,
    steps: usize,
) -> anyhow::Result<f64> {
    let mut samplers: Vec<Sampler> = (0..rows.len())
        .map(|index| {
            Sampler::new(SamplingParams {
                seed: index as u64,
                ..params.clone()
            })
        })
        .collect();
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        for _ in 0..steps {
            if parallel {
                samplers
                    .par_iter_mut()
                    .zip(rows)
                    .try_for_each(|(sampler, row)| sampler.sample(row, &[]).map(drop))?;
            } else {
                for (sampler, row) in samplers.iter_mut().zip(rows) {
                    sampler.sample(row, &[])?;
                }
            }
        }
        rounds.push(started.elapsed());
    }
    Ok(median(rounds).as_secs_f64() * 1e3 / steps as f64)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = [
        ("greedy", SamplingParams::default()),
        (
            "temperature 0.8",
            SamplingParams {
                temperature: 0.8,
                ..SamplingParams::default()
            },
        ),
        (
            "temperature 0.8, top-p 0.9",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.9,
                ..SamplingParams::default()
            },
        ),
        (
            "temperature 0.8, top-k 50",
            SamplingParams {
                temperature: 0.8,
                top_k: 50,
                ..SamplingParams::default()
            },
        ),
    ];
    println!(
        "rayon threads {}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into())
    );
    println!(
        "\nOne row, µs per token (median of 5 rounds of {} draws):",
        args.draws
    );
    print!("| setting |");
    for vocab in &args.vocab {
        print!(" vocab {vocab} |");
    }
    println!();
    println!("|---|{}", "---:|".repeat(args.vocab.len()));
    for (name, params) in &settings {
        print!("| {name} |");
        for &vocab in &args.vocab {
            print!(
                " {:.1} |",
                per_row_us(params, &logits(1, vocab), args.draws)?
            );
        }
        println!();
    }

    println!("\nOne step's rows, temperature 0.8, ms per step (median of 5 rounds):");
    println!("| vocab | rows | one after another | parallel | speed-up |");
    println!("|---:|---:|---:|---:|---:|");
    let params = &settings[1].1;
    for &vocab in &args.vocab {
        for &count in &args.rows {
            let rows: Vec<Vec<f32>> = (0..count)
                .map(|index| logits(index as u64, vocab))
                .collect();
            let steps = (args.draws / count).max(3);
            let serial = step_ms(params, &rows, false, steps)?;
            let parallel = step_ms(params, &rows, true, steps)?;
            println!(
                "| {vocab} | {count} | {serial:.2} | {parallel:.2} | {:.2}x |",
                serial / parallel
            );
        }
    }
    Ok(())
}

//! Decoder throughput through the engine, in process: aggregate decode tokens/s with 1, 4, 16 and 32 concurrent
//! greedy streams and the ratio to one stream, time to first token under that load, and `Score` of 8 candidates
//! in one request against 8 separate requests. Every ratio is measured in the same run.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run -p kosmos-decoder --example decoder_bench -- --model-dir .ref-cache/bench-model
//! ```
//! On a GPU (`--features cuda`): `--device cuda --dtype bf16` (the GPU run, `tools/bench/gpu.sh`). `--kv-dtype f16`
//! stores the KV cache in f16 for f32 weights (CPU) and times the raw step both ways.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use kosmos_decoder::config::{DecoderConfig, parse_kv_cache_dtype};
use kosmos_decoder::engine::{
    EngineHandle, FinishReason, GenerateJob, Prompt, ScoreJob, ScoreOutput, StoppingRule,
};
use kosmos_decoder::sampling::SamplingParams;
use kosmos_decoder::server::{engine_settings, load_model};
use kosmos_model::{DType, KvCacheConfig, SeqChunk, TextModel};

/// Benchmark settings.
#[derive(Debug, Parser)]
struct Args {
    /// Model directory (default: the tiny fixture model).
    #[arg(
        long,
        env = "KOSMOS_BENCH_MODEL",
        default_value = "tests/fixtures/tiny"
    )]
    model_dir: PathBuf,
    /// Concurrent streams to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32")]
    streams: Vec<usize>,
    /// Prompt tokens per stream.
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// New tokens per stream.
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Context tokens of the scoring comparison.
    #[arg(long, default_value_t = 128)]
    context_tokens: usize,
    /// Candidates of the scoring comparison.
    #[arg(long, default_value_t = 8)]
    candidates: usize,
    /// Tokens per candidate.
    #[arg(long, default_value_t = 8)]
    candidate_tokens: usize,
    /// Repetitions of each scoring variant (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Device of the model: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weight dtype: f32, f16 or bf16 (bf16 needs cuda).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// KV cache dtype (`scheduler.kv_cache_dtype`): auto (the weights'), f32, f16 or bf16. Other than auto, the
    /// raw decode step is also timed with the weights' dtype, interleaved, for the ratio.
    #[arg(long, default_value = "auto")]
    kv_dtype: String,
}

/// Deterministic ids in `[7, 2000)`: clear of the special tokens and the image placeholders.
fn ids(seed: u64, len: usize) -> Vec<u32> {
    let mut state = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            7 + ((state >> 33) % 1993) as u32
        })
        .collect()
}

fn prompt(ids: Vec<u32>) -> Prompt {
    Prompt {
        image_mask: vec![false; ids.len()],
        ids,
        ..Prompt::default()
    }
}

/// One stream's measurements.
struct StreamResult {
    tokens: usize,
    time_to_first_token: Duration,
    finished_at: Instant,
    first_token_at: Instant,
}

async fn run_stream(engine: EngineHandle, job: GenerateJob) -> anyhow::Result<StreamResult> {
    let started = job.arrived;
    let mut events = engine.generate(job)?;
    let mut tokens = 0;
    let mut first_token_at = None;
    while let Some(event) = events.recv().await {
        let update = event?;
        if !update.tokens.is_empty() && first_token_at.is_none() {
            first_token_at = Some(Instant::now());
        }
        tokens += update.tokens.len();
        if update.finish.is_some() {
            break;
        }
    }
    let first_token_at = first_token_at.context("no token")?;
    Ok(StreamResult {
        tokens,
        time_to_first_token: first_token_at - started,
        finished_at: Instant::now(),
        first_token_at,
    })
}

/// Aggregate tokens/s over the whole run and over the decode phase, and TTFT (mean, max) for `streams` streams.
struct LoadResult {
    streams: usize,
    tokens: usize,
    wall: Duration,
    decode_tokens_per_second: f64,
    ttft_mean: Duration,
    ttft_max: Duration,
}

async fn measure_streams(
    engine: &EngineHandle,
    streams: usize,
    prompt_tokens: usize,
    new_tokens: usize,
) -> anyhow::Result<LoadResult> {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(streams);
    for stream in 0..streams {
        let job = GenerateJob {
            tenant: String::new(),
            resume: Default::default(),
            prompt: prompt(ids(stream as u64 * 7919 + streams as u64, prompt_tokens)),
            sampling: SamplingParams::default(),
            stopping: StoppingRule {
                max_new_tokens: new_tokens,
                limit_reason: FinishReason::Length,
                stop_token_ids: Vec::new(),
                eos_token_id: None,
            },
            deadline: None,
            arrived: started,
        };
        tasks.push(tokio::spawn(run_stream(engine.clone(), job)));
    }
    let mut results = Vec::with_capacity(streams);
    for task in tasks {
        results.push(task.await??);
    }
    let wall = started.elapsed();
    let tokens: usize = results.iter().map(|result| result.tokens).sum();
    // The decode phase: from the last first token (every stream admitted and prefilled) to the last finish, and
    // the tokens produced in it by every stream (first tokens excluded).
    let decode_start = results
        .iter()
        .map(|r| r.first_token_at)
        .max()
        .context("no stream")?;
    let decode_end = results
        .iter()
        .map(|r| r.finished_at)
        .max()
        .context("no stream")?;
    let decode_tokens: usize = results.iter().map(|r| r.tokens.saturating_sub(1)).sum();
    let decode_seconds = (decode_end - decode_start).as_secs_f64();
    let ttfts: Vec<Duration> = results.iter().map(|r| r.time_to_first_token).collect();
    Ok(LoadResult {
        streams,
        tokens,
        wall,
        // Streams finish together (same lengths), so the window holds nearly all decode steps.
        decode_tokens_per_second: if decode_seconds > 0.0 {
            decode_tokens as f64 / decode_seconds
        } else {
            tokens as f64 / wall.as_secs_f64()
        },
        ttft_mean: ttfts.iter().sum::<Duration>() / streams as u32,
        ttft_max: ttfts.iter().copied().max().unwrap_or_default(),
    })
}

async fn score(
    engine: &EngineHandle,
    context: &[u32],
    candidates: Vec<Vec<u32>>,
) -> anyhow::Result<ScoreOutput> {
    let job = ScoreJob {
        tenant: String::new(),
        context: prompt(context.to_vec()),
        candidates,
        deadline: None,
        arrived: Instant::now(),
    };
    Ok(engine.score(job)?.await??)
}

/// The model's packed decode step alone (no engine, no sampling): `rows` sequences with a `prompt_tokens` cache
/// each, one new token per sequence per step, each step run on a worker of the thread pool as the engine runs it
/// (called from outside the pool, every parallel kernel of a step would also pay a hand-off to the pool and back).
/// Returns the median ms per step of 24.
fn raw_decode_step_ms(
    model: &TextModel,
    rows: usize,
    prompt_tokens: usize,
    kv_dtype: Option<DType>,
) -> anyhow::Result<f64> {
    let steps = 24;
    let mut kv = model.kv_cache(
        KvCacheConfig {
            dtype: kv_dtype,
            ..KvCacheConfig::for_sequences((0..rows).map(|_| prompt_tokens + steps), 16)
        },
        "",
    )?;
    let mut tables: Vec<_> = (0..rows).map(|_| kv.new_table("", Vec::new())).collect();
    let prompts: Vec<Vec<u32>> = (0..rows)
        .map(|row| ids(row as u64, prompt_tokens))
        .collect();
    let mut chunks: Vec<SeqChunk<'_>> = tables
        .iter_mut()
        .zip(&prompts)
        .map(|(table, prompt)| SeqChunk {
            input_ids: prompt,
            images: None,
            table,
        })
        .collect();
    model.forward(&mut kv, &mut chunks)?;
    drop(chunks);
    let next: Vec<Vec<u32>> = (0..rows).map(|row| ids(1000 + row as u64, 1)).collect();
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let mut chunks: Vec<SeqChunk<'_>> = tables
            .iter_mut()
            .zip(&next)
            .map(|(table, input)| SeqChunk {
                input_ids: input,
                images: None,
                table,
            })
            .collect();
        let cache = &mut kv;
        let started = Instant::now();
        std::hint::black_box(rayon::scope(|_| model.forward(cache, &mut chunks))?);
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median_f64(times))
}

fn median_f64(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let max_streams = args
        .streams
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .max(args.candidates);
    let mut config = DecoderConfig::for_model(&args.model_dir)?;
    config.scheduler.max_running_sequences = max_streams.try_into()?;
    config.device = args.device.clone();
    config.dtype = kosmos_model::parse_dtype(&args.dtype)?;
    let kv_dtype = parse_kv_cache_dtype(&args.kv_dtype)?;
    config.scheduler.kv_cache_dtype = kv_dtype;
    let loading = Instant::now();
    let (text, info) = load_model(&config)?;
    let settings = engine_settings(&config.scheduler, info.context_length)?;
    let text_config = text.config().text_config().clone();
    println!(
        "model {}: {} layers x {} wide, ffn {}, vocab {}, context {}, {} image tokens; loaded in {:.1}s",
        args.model_dir.display(),
        text_config.layers,
        text_config.embed_dim,
        text_config.ffn_dim,
        text_config.vocab_size,
        info.context_length,
        info.num_image_tokens,
        loading.elapsed().as_secs_f64()
    );
    println!(
        "rayon threads {}, prompt {} tokens, {} new tokens per stream (greedy)",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into()),
        args.prompt_tokens,
        args.new_tokens
    );
    println!("\nThe model's packed decode step alone (no engine), for reference:");
    match kv_dtype {
        None => {
            println!("| rows | ms/step | tok/s |");
            println!("|---:|---:|---:|");
            for &rows in &args.streams {
                let step_ms = raw_decode_step_ms(text.model(), rows, args.prompt_tokens, None)?;
                println!(
                    "| {rows} | {step_ms:.1} | {:.1} |",
                    rows as f64 * 1e3 / step_ms
                );
            }
        }
        Some(kv) => {
            let weights = text.model().dtype();
            println!(
                "| rows | ms/step, {weights:?} KV | ms/step, {kv:?} KV | speed-up (median of 5 interleaved) |"
            );
            println!("|---:|---:|---:|---:|");
            for &rows in &args.streams {
                let (mut own, mut narrow) = (Vec::new(), Vec::new());
                for _ in 0..5 {
                    own.push(raw_decode_step_ms(
                        text.model(),
                        rows,
                        args.prompt_tokens,
                        None,
                    )?);
                    narrow.push(raw_decode_step_ms(
                        text.model(),
                        rows,
                        args.prompt_tokens,
                        Some(kv),
                    )?);
                }
                let (own, narrow) = (median_f64(own), median_f64(narrow));
                println!("| {rows} | {own:.2} | {narrow:.2} | {:.2}x |", own / narrow);
            }
        }
    }
    let engine = EngineHandle::start(text, info, settings)?;
    // Warm-up: first-touch of the weights and allocator growth.
    measure_streams(&engine, 2, args.prompt_tokens, 4).await?;

    println!("\nThrough the engine (N greedy streams submitted at once, in process):");
    println!(
        "| streams | tokens | wall s | aggregate tok/s | decode tok/s | ratio to 1 stream | TTFT mean ms | TTFT max ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut baseline = None;
    for &streams in &args.streams {
        let result = measure_streams(&engine, streams, args.prompt_tokens, args.new_tokens).await?;
        let aggregate = result.tokens as f64 / result.wall.as_secs_f64();
        let base = *baseline.get_or_insert(result.decode_tokens_per_second);
        println!(
            "| {} | {} | {:.2} | {:.1} | {:.1} | {:.2}x | {:.1} | {:.1} |",
            result.streams,
            result.tokens,
            result.wall.as_secs_f64(),
            aggregate,
            result.decode_tokens_per_second,
            result.decode_tokens_per_second / base,
            result.ttft_mean.as_secs_f64() * 1e3,
            result.ttft_max.as_secs_f64() * 1e3,
        );
    }

    let context = ids(4242, args.context_tokens);
    let candidates: Vec<Vec<u32>> = (0..args.candidates)
        .map(|index| ids(10_000 + index as u64, args.candidate_tokens))
        .collect();
    let mut together = Vec::new();
    let mut sequential = Vec::new();
    let mut concurrent = Vec::new();
    for _ in 0..args.repeats {
        let started = Instant::now();
        let one = score(&engine, &context, candidates.clone()).await?;
        together.push(started.elapsed());
        let started = Instant::now();
        let mut separate = Vec::new();
        for candidate in &candidates {
            separate.push(score(&engine, &context, vec![candidate.clone()]).await?);
        }
        sequential.push(started.elapsed());
        let started = Instant::now();
        let tasks: Vec<_> = candidates
            .iter()
            .map(|candidate| {
                let engine = engine.clone();
                let context = context.clone();
                let candidate = candidate.clone();
                tokio::spawn(async move { score(&engine, &context, vec![candidate]).await })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        concurrent.push(started.elapsed());
        let worst = one
            .scores
            .iter()
            .zip(&separate)
            .flat_map(|(a, b)| {
                a.token_logprobs
                    .iter()
                    .zip(&b.scores[0].token_logprobs)
                    .map(|(x, y)| (x - y).abs())
            })
            .fold(0f32, f32::max);
        anyhow::ensure!(worst < 1e-3, "scores differ by {worst}");
    }
    let together = median(together);
    let sequential = median(sequential);
    let concurrent = median(concurrent);
    println!(
        "\nScore, context {} tokens, {} candidates x {} tokens (median of {}):",
        args.context_tokens, args.candidates, args.candidate_tokens, args.repeats
    );
    println!("| variant | ms | speed-up of one request |");
    println!("|---|---:|---:|");
    println!(
        "| one Score, {} candidates | {:.1} | 1.00x |",
        args.candidates,
        together.as_secs_f64() * 1e3
    );
    println!(
        "| {} Score requests, one after another | {:.1} | {:.2}x |",
        args.candidates,
        sequential.as_secs_f64() * 1e3,
        sequential.as_secs_f64() / together.as_secs_f64()
    );
    println!(
        "| {} Score requests, concurrent | {:.1} | {:.2}x |",
        args.candidates,
        concurrent.as_secs_f64() * 1e3,
        concurrent.as_secs_f64() / together.as_secs_f64()
    );
    Ok(())
}

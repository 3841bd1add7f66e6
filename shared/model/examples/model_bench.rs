//! Candle timings of a KOSMOS model with exactly the protocol of `tools/reference/bench_torch.py` (read its header):
//! vision images/s on a batch of 8, prefill tokens/s of a 128-token prompt with one image, and decode tokens/s at
//! batch 1 and 8 (32 greedy steps after the prefill). Median of 5 timed runs after 1 untimed. `--vision-batches` and
//! `--decode-batches` (like bench_torch.py's) change the batch sizes; the GPU run (`tools/bench/gpu.sh`) uses them.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p kosmos-model --example model_bench -- --model DIR --json OUT.json
//! ```
//! `tools/bench/model.sh` runs it and the PyTorch baseline in the same invocation and prints the ratios.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use kosmos_model::{
    BlockTable, DType, Device, ImageInjection, KosmosModel, KvCacheConfig, PagedKvCache, SeqChunk,
    Tensor, argmax,
};

const PROMPT_LEN: usize = 128;
const DECODE_STEPS: usize = 32;
const REPS: usize = 5;

#[derive(Debug, Parser)]
struct Args {
    /// Model directory in Hugging Face layout.
    #[arg(long)]
    model: PathBuf,
    /// Where to write the JSON result.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Weight dtype (f32 matches the PyTorch baseline).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Vision batch sizes, comma separated; the first one is `vision_images_per_s`.
    #[arg(long, value_delimiter = ',', default_value = "8")]
    vision_batches: Vec<usize>,
    /// Decode batch sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    decode_batches: Vec<usize>,
}

fn median_seconds(mut run: impl FnMut() -> anyhow::Result<f64>) -> anyhow::Result<(f64, Vec<f64>)> {
    run()?;
    let mut times = (0..REPS)
        .map(|_| run())
        .collect::<anyhow::Result<Vec<f64>>>()?;
    let runs = times.clone();
    times.sort_by(f64::total_cmp);
    Ok((times[REPS / 2], runs))
}

fn timed(mut work: impl FnMut() -> anyhow::Result<()>) -> impl FnMut() -> anyhow::Result<f64> {
    move || {
        let started = Instant::now();
        work()?;
        Ok(started.elapsed().as_secs_f64())
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = kosmos_model::parse_device(&args.device)?;
    let dtype = kosmos_model::parse_dtype(&args.dtype)?;
    let model = KosmosModel::load(&args.model, dtype, &device)
        .with_context(|| format!("{}", args.model.display()))?;
    let config = model.vision.config().kosmos2()?.clone();
    let queries = config.latent_query_num;
    let size = config.vision_config.image_size;
    let vocab = config.text_config.vocab_size;
    let first_tag = vocab as u32 - 11 - 1024;
    let (begin_image, end_image) = (first_tag + 1, first_tag + 2);

    let first_vision_batch = *args
        .vision_batches
        .first()
        .context("--vision-batches needs at least one size")?;
    let largest_vision_batch = args.vision_batches.iter().copied().max().unwrap_or(1);
    let pixels = Tensor::randn(
        0f32,
        1f32,
        (largest_vision_batch, 3, size, size),
        &Device::Cpu,
    )?
    .to_device(&device)?;
    let mut ids = vec![0u32, begin_image];
    ids.extend((0..queries as u32).map(|i| 4 + i));
    ids.push(end_image);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    while ids.len() < PROMPT_LEN {
        // xorshift: uniform text ids in [4 + Q, first tag), like the baseline's randint.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ids.push(4 + queries as u32 + (state % (first_tag as u64 - 4 - queries as u64)) as u32);
    }
    let image_mask: Vec<bool> = (0..PROMPT_LEN)
        .map(|p| (2..2 + queries).contains(&p))
        .collect();

    let sync = |t: &Tensor| -> anyhow::Result<()> {
        // Reading one value back waits for asynchronous devices.
        t.flatten_all()?
            .narrow(0, 0, 1)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        Ok(())
    };
    // (batch, median seconds, every timed run)
    let mut vision = Vec::new();
    for &batch in &args.vision_batches {
        let batch_pixels = pixels.narrow(0, 0, batch)?;
        let (seconds, runs) = median_seconds(timed(|| {
            let embeds = model.vision.encode(&batch_pixels)?;
            sync(&embeds)
        }))?;
        vision.push((batch, seconds, runs));
    }
    let image = model
        .vision
        .encode(&pixels.narrow(0, 0, 1)?)?
        .flatten_to(1)?;
    let text = model.text.model();

    // One prefill of `batch` copies of the prompt (no prefix sharing: each computes its own); returns the cache,
    // the tables and the next token of each.
    type Prefilled = (PagedKvCache, Vec<BlockTable>, Vec<u32>);
    let prefill = |batch: usize| -> anyhow::Result<Prefilled> {
        let mut kv = text.kv_cache(
            KvCacheConfig::for_sequences((0..batch).map(|_| PROMPT_LEN + DECODE_STEPS), 16),
            "",
        )?;
        let mut tables: Vec<BlockTable> =
            (0..batch).map(|_| kv.new_table("", Vec::new())).collect();
        let mut chunks: Vec<SeqChunk<'_>> = tables
            .iter_mut()
            .map(|table| SeqChunk {
                input_ids: &ids,
                images: Some(ImageInjection {
                    mask: &image_mask,
                    embeds: &image,
                }),
                table,
            })
            .collect();
        let hidden = text.forward(&mut kv, &mut chunks)?;
        let last: Vec<u32> = (1..=batch).map(|b| (b * PROMPT_LEN - 1) as u32).collect();
        let rows = Tensor::from_vec(last, batch, hidden.device())?;
        let logits = text
            .logits(&hidden.index_select(&rows, 0)?)?
            .to_vec2::<f32>()?;
        let next = logits.iter().map(|row| argmax(row).unwrap_or(0)).collect();
        drop(chunks);
        Ok((kv, tables, next))
    };
    let (prefill_s, prefill_runs) = median_seconds(timed(|| prefill(1).map(|_| ())))?;

    let decode = |batch: usize| -> anyhow::Result<(f64, Vec<f64>)> {
        median_seconds(|| {
            let (mut kv, mut tables, mut next) = prefill(batch)?;
            let started = Instant::now();
            for _ in 0..DECODE_STEPS {
                let step_ids = next.clone();
                let mut chunks: Vec<SeqChunk<'_>> = tables
                    .iter_mut()
                    .zip(&step_ids)
                    .map(|(table, id)| SeqChunk {
                        input_ids: std::slice::from_ref(id),
                        images: None,
                        table,
                    })
                    .collect();
                let hidden = text.forward(&mut kv, &mut chunks)?;
                let logits = text.logits(&hidden)?.to_vec2::<f32>()?;
                next = logits.iter().map(|row| argmax(row).unwrap_or(0)).collect();
            }
            Ok(started.elapsed().as_secs_f64())
        })
    };
    let mut decodes = Vec::new();
    for &batch in &args.decode_batches {
        let (seconds, runs) = decode(batch)?;
        decodes.push((batch, seconds, runs));
    }

    // The keys of bench_torch.py: vision_images_per_s is the first vision batch, the rest carry their batch.
    let mut result = serde_json::json!({
        "vision_images_per_s": first_vision_batch as f64 / vision[0].1,
        "prefill_tokens_per_s": PROMPT_LEN as f64 / prefill_s,
        "threads": candle_core::utils::get_num_threads(),
        "device": args.device,
        "dtype": args.dtype,
        "model": args.model,
        "median_s": {"vision": vision[0].1, "prefill": prefill_s},
        "runs_s": {"vision": vision[0].2, "prefill": prefill_runs},
    });
    for (index, (batch, seconds, runs)) in vision.iter().enumerate() {
        result[format!("vision_images_per_s_b{batch}")] = (*batch as f64 / seconds).into();
        if index > 0 {
            result["median_s"][format!("vision_b{batch}")] = (*seconds).into();
            result["runs_s"][format!("vision_b{batch}")] = runs.clone().into();
        }
    }
    for (batch, seconds, runs) in &decodes {
        result[format!("decode_tokens_per_s_b{batch}")] =
            ((batch * DECODE_STEPS) as f64 / seconds).into();
        result["median_s"][format!("decode_b{batch}")] = (*seconds).into();
        result["runs_s"][format!("decode_b{batch}")] = runs.clone().into();
    }
    let text = serde_json::to_string_pretty(&result)?;
    println!("{text}");
    if let Some(path) = args.json {
        std::fs::write(&path, text + "\n").with_context(|| format!("{}", path.display()))?;
    }
    Ok(())
}

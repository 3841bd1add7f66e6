//! Encoder benchmark: engine throughput with dynamic batching against one image at a time, and preprocessing
//! throughput per core. Ratios are measured in the same run.
//!
//! ```text
//! cargo run --release -p kosmos-encoder --example encoder_bench -- --model .ref-cache/bench-model
//! ```
//!
//! * baseline: `VisionEngine::encode` on one image at a time, on the calling thread;
//! * engine at max batch B (1, 4, 16): `--images` single-image requests submitted at once through the real
//!   engine thread (`EngineHandle::submit`, queue delay 2 ms), so each run goes through admission, batching,
//!   stacking and splitting exactly as the service does;
//! * preprocessing: `Preprocessor::process_one` (header check, decode, CLIP preprocessing) of a 640x480 JPEG on
//!   one thread, then on every core.

use std::io::Cursor;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use kosmos_encoder::config::{Batching, Limits};
use kosmos_encoder::engine::{self, BatchEncoder, ModelInput, VisionEngine};
use kosmos_encoder::images::{Preprocessor, check_image};
use kosmos_model::{ModelFiles, VisionHalf, parse_device, parse_dtype};
use kosmos_processor::{AcceptedFormat, ImageLimits, ImageProcessorConfig};

/// Encoder benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Model directory (HF layout).
    #[arg(long)]
    model: PathBuf,
    /// Device: cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weights dtype: f32, f16, bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Images per measurement (a multiple of 16 keeps every batch full).
    #[arg(long, default_value_t = 32)]
    images: usize,
    /// Measurements per configuration; the best is reported.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Images preprocessed per measurement.
    #[arg(long, default_value_t = 200)]
    preprocess_images: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let files = ModelFiles::open(&args.model)?;
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    // This benchmark measures the CLIP tower (KOSMOS-1 / Kosmos-2).
    let model = files.config.kosmos2()?.clone();
    let size = model.vision_config.image_size;
    let processor = ImageProcessorConfig::from_file(args.model.join("preprocessor_config.json"))?;
    let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    println!(
        "model {} (vision {} layers x {}, image {size}, patch {}, {} tokens x {}), device {}, dtype {}, {cores} cores",
        args.model.display(),
        model.vision_config.num_hidden_layers,
        model.vision_config.hidden_size,
        model.vision_config.patch_size,
        model.latent_query_num,
        model.text_config.embed_dim,
        args.device,
        args.dtype,
    );

    let jpeg = test_jpeg(640, 480)?;
    let limits = Limits {
        image: ImageLimits {
            max_image_bytes: 20 << 20,
            max_image_width: 8192,
            max_image_height: 8192,
            max_image_pixels: 32 << 20,
            formats: vec![AcceptedFormat::Jpeg],
        },
        max_images_per_request: NonZeroUsize::MIN,
    };
    let preprocessor = Preprocessor::new(limits.clone(), processor, size, NonZeroUsize::MIN);
    let checked = check_image(0, jpeg.clone(), "image/jpeg", &limits)?;
    let pixels = preprocessor.process_one(&checked)?;

    // Baseline: one image at a time, no engine thread.
    let mut direct = VisionEngine::new(
        VisionHalf::load(&files, dtype, &device)?,
        device.clone(),
        dtype,
        size,
    );
    direct.encode(&[&pixels])?;
    let baseline = best_of(args.rounds, || {
        let started = Instant::now();
        for _ in 0..args.images {
            direct.encode(&[&pixels])?;
        }
        Ok(args.images as f64 / started.elapsed().as_secs_f64())
    })?;
    println!(
        "\nengine throughput ({} images per measurement, best of {}):",
        args.images, args.rounds
    );
    println!("  one image at a time (direct)   {baseline:8.2} images/s   1.00x");
    drop(direct);

    for max_batch in [1, 4, 16] {
        let throughput = engine_throughput(&files, &args, max_batch, &pixels)?;
        println!(
            "  engine, max batch {max_batch:>2}           {throughput:8.2} images/s   {:.2}x",
            throughput / baseline
        );
    }

    // Preprocessing: one thread, then every core.
    let single = best_of(args.rounds, || {
        let started = Instant::now();
        for _ in 0..args.preprocess_images {
            preprocessor.process_one(&checked)?;
        }
        Ok(args.preprocess_images as f64 / started.elapsed().as_secs_f64())
    })?;
    let all_cores = best_of(args.rounds, || {
        let started = Instant::now();
        let per_thread = args.preprocess_images.div_ceil(cores);
        std::thread::scope(|scope| -> Result<()> {
            let workers: Vec<_> = (0..cores)
                .map(|_| {
                    scope.spawn(|| -> Result<()> {
                        for _ in 0..per_thread {
                            preprocessor.process_one(&checked)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for worker in workers {
                worker
                    .join()
                    .map_err(|_| anyhow::anyhow!("a preprocessing thread panicked"))??;
            }
            Ok(())
        })?;
        Ok((per_thread * cores) as f64 / started.elapsed().as_secs_f64())
    })?;
    println!(
        "\npreprocessing (640x480 JPEG of {} bytes -> 3x{size}x{size}: header check, decode, resize, crop, normalize):",
        jpeg.len()
    );
    println!("  1 thread                       {single:8.1} images/s per core");
    println!(
        "  {cores} threads                      {all_cores:8.1} images/s ({:.1} per core)",
        all_cores / cores as f64
    );
    Ok(())
}

/// Images/s of `args.images` single-image requests submitted at once to an engine thread with `max_batch`.
fn engine_throughput(
    files: &ModelFiles,
    args: &Args,
    max_batch: usize,
    pixels: &ModelInput,
) -> Result<f64> {
    let settings = Batching {
        max_batch_images: NonZeroUsize::new(max_batch).context("max batch")?,
        max_queue_delay: Duration::from_millis(2),
        max_queued_images: NonZeroUsize::new(args.images.max(1)).context("images")?,
    };
    let (files, device_name, dtype_name) = (files.clone(), args.device.clone(), args.dtype.clone());
    let size = files.config.kosmos2()?.vision_config.image_size;
    let (handle, thread, startup) = engine::start(settings, None, move || {
        let load = || -> Result<VisionEngine, kosmos_model::ModelError> {
            let device = parse_device(&device_name)?;
            let dtype = parse_dtype(&dtype_name)?;
            Ok(VisionEngine::new(
                VisionHalf::load(&files, dtype, &device)?,
                device,
                dtype,
                size,
            ))
        };
        load()
            .map(|engine| (engine, ()))
            .map_err(|err| kosmos_encoder::StartError::Engine(err.to_string()))
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let throughput = runtime.block_on(async {
        startup.await??;
        // Warm-up at the measured batch size.
        run_requests(&handle, pixels, max_batch).await?;
        let mut best: f64 = 0.0;
        for _ in 0..args.rounds {
            let started = Instant::now();
            run_requests(&handle, pixels, args.images).await?;
            best = best.max(args.images as f64 / started.elapsed().as_secs_f64());
        }
        Ok::<_, anyhow::Error>(best)
    })?;
    let stats = handle.stats();
    drop(handle);
    runtime.block_on(thread.stop());
    if stats.batches_executed == 0 {
        bail!("the engine ran no batch");
    }
    Ok(throughput)
}

/// Submits `count` single-image requests at once and waits for all of them.
async fn run_requests(
    handle: &engine::EngineHandle,
    pixels: &ModelInput,
    count: usize,
) -> Result<()> {
    let mut receivers = Vec::with_capacity(count);
    for _ in 0..count {
        receivers.extend(handle.submit(vec![pixels.clone()], None)?);
    }
    for receiver in receivers {
        receiver.await??;
    }
    Ok(())
}

fn best_of(rounds: usize, mut measure: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut best: f64 = 0.0;
    for _ in 0..rounds.max(1) {
        best = best.max(measure()?);
    }
    Ok(best)
}

/// A 640x480 JPEG with smooth gradients and edges, like a photo as far as the decoder's work goes.
fn test_jpeg(width: u32, height: u32) -> Result<Vec<u8>> {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        let ring = ((x as i64 - 320).pow(2) + (y as i64 - 240).pow(2)) / 900;
        image::Rgb([
            (x * 255 / width) as u8,
            (y * 255 / height) as u8,
            if ring % 2 == 0 { 200 } else { 40 },
        ])
    });
    let mut bytes = Cursor::new(Vec::new());
    image.write_to(&mut bytes, image::ImageFormat::Jpeg)?;
    Ok(bytes.into_inner())
}

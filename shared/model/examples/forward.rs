//! Runs one forward pass of a KOSMOS checkpoint on inputs from a safetensors file and writes the outputs, so the
//! crate can be compared with any reference on any model directory.
//!
//! ```text
//! cargo run --release -p kosmos-model --example forward -- \
//!     --model DIR --inputs IN.safetensors --out OUT.safetensors [--dtype f32|f16|bf16] [--device cpu|cuda:N]
//! ```
//! IN holds `input_ids`, `attention_mask` (0 on left padding) and `image_embeds_position_mask` (all i64
//! `[B,T]`), and `pixel_values` (f32 `[N,3,H,W]`, images in row-major order of their positions) when the mask has
//! ones. OUT receives `logits` (f32 `[B,T,V]`, zero on padding) and, when images were given, `image_embeds`
//! (f32 `[N,Q,D]`).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use kosmos_model::{DType, KosmosModel, Tensor, parse_device, parse_dtype};

#[derive(Debug, Parser)]
#[command(
    about = "One KOSMOS forward pass: inputs from a safetensors file, logits and image embeddings out"
)]
struct Args {
    /// Model directory in Hugging Face layout (config.json, model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Input tensors (input_ids, attention_mask, image_embeds_position_mask, optional pixel_values).
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write logits (and image_embeds).
    #[arg(long)]
    out: PathBuf,
    /// Weight dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let inputs = candle_core::safetensors::load(&args.inputs, &device)
        .with_context(|| format!("reading {}", args.inputs.display()))?;
    let get = |name: &str| -> anyhow::Result<&Tensor> {
        inputs
            .get(name)
            .with_context(|| format!("{} has no tensor `{name}`", args.inputs.display()))
    };
    let input_ids = get("input_ids")?;
    let attention_mask = get("attention_mask")?;
    let image_mask = get("image_embeds_position_mask")?;
    let marked: i64 = image_mask.to_dtype(DType::I64)?.sum_all()?.to_scalar()?;
    let pixel_values = match (inputs.get("pixel_values"), marked) {
        (Some(pixels), _) => Some(pixels),
        (None, 0) => None,
        (None, _) => bail!(
            "image_embeds_position_mask marks {marked} positions but there is no `pixel_values`"
        ),
    };
    let started = std::time::Instant::now();
    let model = KosmosModel::load(&args.model, dtype, &device)
        .with_context(|| format!("loading {}", args.model.display()))?;
    eprintln!(
        "loaded {} in {:.2?}",
        args.model.display(),
        started.elapsed()
    );
    let started = std::time::Instant::now();
    let (logits, image_embeds) =
        model.forward_padded(input_ids, attention_mask, image_mask, pixel_values)?;
    eprintln!(
        "forward {:?} in {:.2?}",
        input_ids.dims(),
        started.elapsed()
    );
    let mut outputs: HashMap<String, Tensor> = HashMap::new();
    outputs.insert("logits".into(), logits.to_dtype(DType::F32)?);
    if let Some(embeds) = image_embeds {
        outputs.insert("image_embeds".into(), embeds.to_dtype(DType::F32)?);
    }
    candle_core::safetensors::save(&outputs, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

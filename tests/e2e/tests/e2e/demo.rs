//! The shipped demo model (`models/demo`) against the PyTorch model that trained it, on its held-out set
//! (`models/demo/heldout`, written by `tools/train/run.sh eval --dump`):
//! * given the very pixel values PyTorch was given (`pixels.safetensors`), the Rust model's greedy ids equal
//!   PyTorch's (`torch_ids`) for every generation item;
//! * through the whole system (the gateway's own image preprocessing of the PNGs, the encoder and the decoder over
//!   gRPC), the answers equal PyTorch's too.

use std::path::{Path, PathBuf};

use kosmos_e2e::{Cluster, ClusterOptions, DirectModel, DirectSegment, image, text};
use kosmos_model::{Device, Tensor};
use kosmos_proto::v1 as pb;

fn demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo")
}

/// A generation item of the held-out set.
#[derive(Debug)]
struct Item {
    id: String,
    image: PathBuf,
    prompt: String,
    grounding: bool,
    torch_ids: Vec<u32>,
    pixel_row: Option<usize>,
}

fn generation_items() -> anyhow::Result<Vec<Item>> {
    let dir = demo_dir().join("heldout");
    let text = std::fs::read_to_string(dir.join("set.jsonl"))?;
    let mut items = Vec::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)?;
        if value["task"] == "classify" {
            continue;
        }
        let prompt = value["prompt"].as_str().unwrap_or_default();
        let (grounding, prompt) = match prompt.strip_prefix("<grounding>") {
            Some(rest) => (true, rest.trim_start()),
            None => (false, prompt),
        };
        items.push(Item {
            id: value["id"].as_str().unwrap_or_default().to_string(),
            image: dir.join(value["image"].as_str().unwrap_or_default()),
            prompt: prompt.to_string(),
            grounding,
            torch_ids: serde_json::from_value(value["torch_ids"].clone())?,
            pixel_row: value["pixel_row"].as_u64().map(|row| row as usize),
        });
    }
    Ok(items)
}

/// What the model's generation_config.json asks of greedy decoding.
fn no_repeat_ngram_size() -> anyhow::Result<usize> {
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        demo_dir().join("generation_config.json"),
    )?)?;
    Ok(config["no_repeat_ngram_size"].as_u64().unwrap_or(0) as usize)
}

/// The reference's own generation budget (tools/train/eval_torch.py).
const MAX_NEW_TOKENS: usize = 64;

#[test]
fn with_the_reference_pixels_greedy_ids_equal_pytorch() -> anyhow::Result<()> {
    let model = DirectModel::load(&demo_dir())?;
    let pixels = std::fs::read(demo_dir().join("heldout/pixels.safetensors"))?;
    let pixels = safetensors::SafeTensors::deserialize(&pixels)?;
    let view = pixels.tensor("pixel_values")?;
    let shape = view.shape().to_vec();
    anyhow::ensure!(
        shape.len() == 4 && shape[1] == 3,
        "pixel_values is {shape:?}"
    );
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let row_len = 3 * shape[2] * shape[3];
    let ngram = no_repeat_ngram_size()?;
    let mut compared = 0;
    let mut differing = Vec::new();
    for item in generation_items()? {
        let Some(row) = item.pixel_row else { continue };
        let row_values = values[row * row_len..(row + 1) * row_len].to_vec();
        let pixel_values = Tensor::from_vec(row_values, (1, 3, shape[2], shape[3]), &Device::Cpu)?;
        let segments = [
            DirectSegment::Image(Vec::new()),
            DirectSegment::Text(item.prompt.clone()),
        ];
        let (_, ids) = model.greedy_with_pixels(
            &segments,
            Some(pixel_values),
            item.grounding,
            MAX_NEW_TOKENS,
            ngram,
        )?;
        compared += 1;
        if ids != item.torch_ids {
            differing.push(format!(
                "{}: ours {:?}\n   torch {:?}",
                item.id, ids, item.torch_ids
            ));
        }
    }
    assert!(
        compared >= 20,
        "only {compared} items carry reference pixels"
    );
    assert!(
        differing.is_empty(),
        "{} of {compared} greedy outputs differ from PyTorch's:\n{}",
        differing.len(),
        differing.join("\n")
    );
    eprintln!("{compared} of {compared} greedy outputs equal PyTorch's");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_system_the_answers_equal_pytorch() -> anyhow::Result<()> {
    let ngram = no_repeat_ngram_size()? as u32;
    let cluster = Cluster::start(ClusterOptions {
        model_dir: demo_dir(),
        ..ClusterOptions::default()
    })
    .await?;
    let mut client = cluster.client().await?;
    let items = generation_items()?;
    let mut differing = Vec::new();
    // Every fourth item keeps the test short; the full set is `kosmos eval`'s job.
    let chosen: Vec<&Item> = items.iter().step_by(4).collect();
    for item in &chosen {
        let response = client
            .generate(pb::GenerateRequest {
                prompt: vec![image(std::fs::read(&item.image)?), text(&item.prompt)],
                params: Some(pb::GenerationParams {
                    max_new_tokens: MAX_NEW_TOKENS as u32,
                    no_repeat_ngram_size: ngram,
                    ..Default::default()
                }),
                grounding: item.grounding,
            })
            .await?
            .into_inner();
        let ids: Vec<u32> = response.tokens.iter().map(|token| token.id).collect();
        if ids != item.torch_ids {
            differing.push(format!(
                "{}: ours {ids:?}, torch {:?}",
                item.id, item.torch_ids
            ));
        }
    }
    eprintln!(
        "{} of {} answers through the gateway equal PyTorch's",
        chosen.len() - differing.len(),
        chosen.len()
    );
    assert!(
        differing.is_empty(),
        "answers differing from PyTorch's (PNG preprocessing is bit-exact, so none should):\n{}",
        differing.join("\n")
    );
    cluster.shutdown().await;
    Ok(())
}

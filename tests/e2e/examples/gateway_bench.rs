//! Gateway benchmark: time to first token (TTFT) through the gateway against a direct decoder call with
//! precomputed embeddings (the gateway's overhead), and TTFT for a repeated image (embedding cache hit) against a
//! new one (miss). Everything runs in this process on loopback, measured in the same run, reported as p50/p99
//! and ratios.
//!
//! ```text
//! cargo run --release -p kosmos-e2e --example gateway_bench -- [ITERATIONS] [MODEL_DIR]
//! ```

use std::time::{Duration, Instant};

use anyhow::Context as _;
use kosmos_e2e::{Cluster, ClusterOptions, fixture_image, image, text, tiny_model_dir};
use kosmos_proto::decoder::v1 as dec;
use kosmos_proto::encoder::v1 as enc;
use kosmos_proto::v1 as pb;

/// The same picture with a `tEXt` chunk carrying `nonce` before `IEND`: new bytes (a cache miss), same pixels.
fn unique_png(png: &[u8], nonce: u64) -> anyhow::Result<Vec<u8>> {
    kosmos_testkit::png::with_nonce(png, nonce).context("not a PNG")
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

struct Series {
    name: &'static str,
    samples: Vec<Duration>,
}

impl Series {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            samples: Vec::new(),
        }
    }

    fn p(&self, q: f64) -> Duration {
        let mut sorted = self.samples.clone();
        sorted.sort();
        percentile(&sorted, q)
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

async fn gateway_ttft(
    client: &mut kosmos_proto::v1::kosmos_client::KosmosClient<tonic::transport::Channel>,
    picture: Vec<u8>,
) -> anyhow::Result<Duration> {
    let request = pb::GenerateRequest {
        prompt: vec![image(picture), text("An image of")],
        params: Some(pb::GenerationParams {
            max_new_tokens: 1,
            ..Default::default()
        }),
        grounding: false,
    };
    let started = Instant::now();
    let mut stream = client.generate_stream(request).await?.into_inner();
    while let Some(message) = stream.message().await? {
        if !message.tokens.is_empty() {
            let ttft = started.elapsed();
            while stream.message().await?.is_some() {}
            return Ok(ttft);
        }
    }
    anyhow::bail!("no token")
}

async fn decoder_ttft(
    decoder: &mut kosmos_proto::decoder::v1::decoder_client::DecoderClient<
        tonic::transport::Channel,
    >,
    prompt: &[dec::Segment],
) -> anyhow::Result<Duration> {
    let request = dec::GenerateRequest {
        resume: None,
        tenant: String::new(),
        prompt: prompt.to_vec(),
        sampling: Some(dec::SamplingParams::default()),
        stopping: Some(dec::StoppingParams {
            max_new_tokens: 1,
            ..Default::default()
        }),
    };
    let started = Instant::now();
    let mut stream = decoder.generate(request).await?.into_inner();
    while let Some(message) = stream.message().await? {
        if !message.tokens.is_empty() {
            let ttft = started.elapsed();
            while stream.message().await?.is_some() {}
            return Ok(ttft);
        }
    }
    anyhow::bail!("no token")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let iterations: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(300);
    let model_dir = args.next().map(Into::into).unwrap_or_else(tiny_model_dir);
    let cluster = Cluster::start(ClusterOptions {
        model_dir: model_dir.clone(),
        ..ClusterOptions::default()
    })
    .await?;
    let mut client = cluster.client().await?;
    let mut decoder = cluster.decoder().await?;
    let mut encoder = cluster.encoder(0).await?;
    let picture = fixture_image("e_blocks_64x64.png");

    // The direct call's inputs, precomputed: the gateway's prompt ids and the encoder's embedding.
    let warm = client
        .generate(pb::GenerateRequest {
            prompt: vec![image(picture.clone()), text("An image of")],
            params: Some(pb::GenerationParams {
                max_new_tokens: 1,
                ..Default::default()
            }),
            grounding: false,
        })
        .await?
        .into_inner();
    let embedding = encoder
        .encode(enc::EncodeRequest {
            images: vec![enc::Image {
                data: picture.clone(),
                mime_type: String::new(),
            }],
            dtype: 0,
        })
        .await?
        .into_inner();
    let info = decoder.info(dec::InfoRequest {}).await?.into_inner();
    let first = info.image_placeholder_first_id;
    let count = info.num_image_tokens as usize;
    let ids = &warm.prompt_token_ids;
    let start = ids
        .windows(count)
        .position(|window| {
            window
                .iter()
                .enumerate()
                .all(|(i, &id)| id == first + i as u32)
        })
        .context("no image placeholders in the prompt")?;
    let prompt = vec![
        dec::Segment {
            kind: Some(dec::segment::Kind::Tokens(dec::TokenIds {
                ids: ids[..start].to_vec(),
            })),
        },
        dec::Segment {
            kind: Some(dec::segment::Kind::Image(dec::ImageEmbedding {
                embedding: embedding.embeddings.first().cloned(),
                model_fingerprint: embedding.model_fingerprint.clone(),
            })),
        },
        dec::Segment {
            kind: Some(dec::segment::Kind::Tokens(dec::TokenIds {
                ids: ids[start + count..].to_vec(),
            })),
        },
    ];

    let mut direct = Series::new("decoder, direct (precomputed embedding)");
    let mut hit = Series::new("gateway, cache hit");
    let mut miss = Series::new("gateway, cache miss (new image)");
    for _ in 0..20 {
        decoder_ttft(&mut decoder, &prompt).await?;
        gateway_ttft(&mut client, picture.clone()).await?;
    }
    // Interleaved, so drift (other load on the machine) spreads evenly over the three series.
    for iteration in 0..iterations {
        direct
            .samples
            .push(decoder_ttft(&mut decoder, &prompt).await?);
        hit.samples
            .push(gateway_ttft(&mut client, picture.clone()).await?);
        let fresh = unique_png(&picture, iteration as u64)?;
        miss.samples.push(gateway_ttft(&mut client, fresh).await?);
    }
    let stats = cluster.gateway().stats();
    anyhow::ensure!(
        stats.cache.misses as usize >= iterations,
        "every fresh image must miss the cache: {stats:?}"
    );

    println!(
        "model: {} · {iterations} sequential requests per series · 1 new token",
        model_dir.display()
    );
    println!("| series | p50 ms | p99 ms |");
    println!("|---|---:|---:|");
    for series in [&direct, &hit, &miss] {
        println!(
            "| {} | {:.3} | {:.3} |",
            series.name,
            ms(series.p(0.5)),
            ms(series.p(0.99))
        );
    }
    let ratio = |a: &Series, b: &Series, q: f64| a.p(q).as_secs_f64() / b.p(q).as_secs_f64();
    println!();
    println!(
        "gateway overhead (cache hit / direct): p50 ×{:.2} (+{:.3} ms), p99 ×{:.2}",
        ratio(&hit, &direct, 0.5),
        ms(hit.p(0.5).saturating_sub(direct.p(0.5))),
        ratio(&hit, &direct, 0.99)
    );
    println!(
        "cache (miss / hit): p50 ×{:.2} (+{:.3} ms), p99 ×{:.2}",
        ratio(&miss, &hit, 0.5),
        ms(miss.p(0.5).saturating_sub(hit.p(0.5))),
        ratio(&miss, &hit, 0.99)
    );
    cluster.shutdown().await;
    Ok(())
}

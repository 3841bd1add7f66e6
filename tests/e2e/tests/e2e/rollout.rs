//! Rolling restarts and rollouts under steady load. Every replica of both pools stopped in turn (SIGTERM: it
//! drains) and started again: no call fails, and every seeded generation still gives the tokens of a fault-free
//! run. A new model build started beside the old one, then the old one stopped: no call fails, and every answer is
//! one build's (embeddings of one build never reach the other's decoders).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kosmos_e2e::process::{Kind, Process, ProcessCluster, free_port};
use kosmos_e2e::{image, text, tiny_model_dir};
use kosmos_proto::v1 as pb;
use kosmos_proto::v1::kosmos_client::KosmosClient;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::distinct_png;
use crate::faults::{MixedLoad, all, fault_free, replica_binary, wait_healthy};
use crate::greedy_request;

/// Distinct seeded requests the load cycles through.
const REQUESTS: usize = 6;

/// Concurrent callers.
const WORKERS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_every_replica_under_steady_load_fails_no_call() -> anyhow::Result<()>
{
    let model = tiny_model_dir();
    let mut cluster = ProcessCluster::start(replica_binary(), &model, 2, 2, &[], &[]).await?;
    let client = cluster.gateway.client().await?;
    let mut control = client.clone();
    let clean = fault_free(&client, REQUESTS).await?;
    let load = MixedLoad::start(&client, clean, WORKERS);

    let replicas = [
        ("decoder", 0),
        ("decoder", 1),
        ("encoder", 0),
        ("encoder", 1),
    ];
    for (pool, index) in replicas {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let process = match pool {
            "decoder" => &mut cluster.decoders[index],
            _ => &mut cluster.encoders[index],
        };
        process.terminate()?;
        let status = process.wait_exit(Duration::from_secs(60)).await?;
        assert!(
            status.success(),
            "{pool} {index} drained and exited cleanly: {status}"
        );
        process.restart()?;
        process.wait_serving("", Duration::from_secs(120)).await?;
        wait_healthy(&mut control, pool, 2).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (calls, failures) = load.stop().await?;
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed: {failures:#?}",
        failures.len()
    );
    assert!(calls >= 4 * WORKERS, "the load was steady: {calls} calls");
    eprintln!("{calls} calls through a rolling restart of 4 replicas, none failed");
    Ok(())
}

/// A second build of the tiny model in a temporary directory (removed on drop): the same files with the connector's
/// and the text model's weights changed, so that its fingerprint and its answers differ.
struct SecondBuild(PathBuf);

impl SecondBuild {
    fn create() -> anyhow::Result<Self> {
        let source = tiny_model_dir();
        let dir =
            std::env::temp_dir().join(format!("kosmos-e2e-second-build-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&source)? {
            let path = entry?.path();
            if path
                .file_name()
                .is_some_and(|name| name != "model.safetensors")
            {
                std::fs::copy(&path, dir.join(path.file_name().expect("a file name")))?;
            }
        }
        let bytes = std::fs::read(source.join("model.safetensors"))?;
        let weights = SafeTensors::deserialize(&bytes)?;
        let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, view) in weights.tensors() {
            let mut data = view.data().to_vec();
            // The connector makes the fingerprint differ; the text weights, the answers.
            if name.starts_with("image_to_text_projection.") || name.starts_with("text_model.") {
                anyhow::ensure!(view.dtype() == Dtype::F32, "{name} is not f32");
                for (position, value) in data.chunks_exact_mut(4).enumerate() {
                    let wobble = 1.0 + 0.5 * (position as f32 * 0.7).sin();
                    let changed = f32::from_le_bytes(value.try_into()?) * wobble + 0.01;
                    value.copy_from_slice(&changed.to_le_bytes());
                }
            }
            tensors.push((name, view.dtype(), view.shape().to_vec(), data));
        }
        let views = tensors
            .iter()
            .map(|(name, dtype, shape, data)| {
                Ok((name.clone(), TensorView::new(*dtype, shape.clone(), data)?))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))?;
        Ok(Self(dir))
    }
}

impl Drop for SecondBuild {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The model build the gateway sends new requests to.
async fn fingerprint(client: &mut KosmosClient<Channel>) -> anyhow::Result<String> {
    Ok(client
        .get_model_info(pb::GetModelInfoRequest::default())
        .await?
        .into_inner()
        .model_fingerprint)
}

/// The captions of `PICTURES` distinct images.
async fn captions(client: &KosmosClient<Channel>) -> anyhow::Result<Vec<String>> {
    let answers = all((0..PICTURES)
        .map(|index| {
            let mut client = client.clone();
            async move {
                Ok(client
                    .generate(picture_request(index))
                    .await?
                    .into_inner()
                    .text)
            }
        })
        .collect())
    .await;
    Ok(answers.into_iter().collect::<Result<_, _>>()?)
}

const PICTURES: usize = 4;

fn picture_request(index: usize) -> pb::GenerateRequest {
    greedy_request(
        vec![
            image(distinct_png(70_000 + index as u32)),
            text("An image of"),
        ],
        8,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_model_build_rolls_out_beside_the_old_one_without_a_failed_call() -> anyhow::Result<()>
{
    let old_model = tiny_model_dir();
    let new_model = SecondBuild::create()?;
    let binary = replica_binary();
    let mut old_encoder = Process::spawn(binary, Kind::Encoder, free_port()?, &old_model, &[])?;
    let mut old_decoder = Process::spawn(binary, Kind::Decoder, free_port()?, &old_model, &[])?;
    // The new build's replicas get their ports now: the gateway lists every replica from the start, as a
    // Service's DNS name would find them once they run.
    let (new_encoder_port, new_decoder_port) = (free_port()?, free_port()?);
    let list = |old: &Process, new_port: u16| {
        format!("[\"{}\",\"http://127.0.0.1:{new_port}\"]", old.endpoint())
    };
    let gateway_overrides = [
        format!("encoder.endpoints={}", list(&old_encoder, new_encoder_port)),
        format!("decoder.endpoints={}", list(&old_decoder, new_decoder_port)),
        "encoder.probe_interval_seconds=0.2".to_string(),
        "decoder.probe_interval_seconds=0.2".to_string(),
    ];
    let mut gateway = Process::spawn(
        binary,
        Kind::Gateway,
        free_port()?,
        &old_model,
        &gateway_overrides,
    )?;
    let timeout = Duration::from_secs(180);
    old_encoder.wait_serving("", timeout).await?;
    old_decoder.wait_serving("", timeout).await?;
    gateway.wait_serving("readiness", timeout).await?;
    let client = gateway.client().await?;
    let mut control = client.clone();
    let old_fingerprint = fingerprint(&mut control).await?;
    let old_answers = captions(&client).await?;

    // Steady load through the whole rollout; every answer is recorded.
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(
        Vec::<(usize, Result<String, tonic::Status>)>::new(),
    ));
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..WORKERS {
        let (client, stop, answers) = (client.clone(), stop.clone(), answers.clone());
        workers.spawn(async move {
            let mut calls = 0;
            while !stop.load(Ordering::SeqCst) {
                let index = (worker + calls) % PICTURES;
                let answer = client
                    .clone()
                    .generate(picture_request(index))
                    .await
                    .map(|answer| answer.into_inner().text);
                answers.lock().await.push((index, answer));
                calls += 1;
            }
        });
    }

    let mut new_encoder =
        Process::spawn(binary, Kind::Encoder, new_encoder_port, &new_model.0, &[])?;
    let mut new_decoder =
        Process::spawn(binary, Kind::Decoder, new_decoder_port, &new_model.0, &[])?;
    new_encoder.wait_serving("", timeout).await?;
    new_decoder.wait_serving("", timeout).await?;
    let mut switched = false;
    for _ in 0..600 {
        if fingerprint(&mut control).await? != old_fingerprint {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(switched, "the gateway moved new requests to the new build");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The old build drains and stops.
    old_encoder.terminate()?;
    old_decoder.terminate()?;
    assert!(
        old_encoder
            .wait_exit(Duration::from_secs(60))
            .await?
            .success()
    );
    assert!(
        old_decoder
            .wait_exit(Duration::from_secs(60))
            .await?
            .success()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    while let Some(done) = workers.join_next().await {
        done?;
    }

    let new_answers = captions(&client).await?;
    assert_ne!(
        old_answers, new_answers,
        "the two builds answer differently"
    );
    let answers = answers.lock().await;
    let mut by_build = [0usize; 2];
    for (index, answer) in answers.iter() {
        let text = answer
            .as_ref()
            .unwrap_or_else(|status| panic!("a call failed during the rollout: {status:?}"));
        if *text == old_answers[*index] {
            by_build[0] += 1;
        } else if *text == new_answers[*index] {
            by_build[1] += 1;
        } else {
            panic!("picture {index}: {text:?} is neither build's answer");
        }
    }
    eprintln!(
        "{} calls during the rollout: {} by the old build, {} by the new",
        answers.len(),
        by_build[0],
        by_build[1]
    );
    assert!(
        by_build[0] > 0 && by_build[1] > 0,
        "the load ran across the switch: {by_build:?}"
    );
    let last = answers.iter().rev().take(WORKERS).collect::<Vec<_>>();
    for (index, answer) in last {
        assert_eq!(
            answer.as_ref().ok(),
            Some(&new_answers[*index]),
            "the last calls are the new build's"
        );
    }
    drop(new_encoder);
    drop(new_decoder);
    Ok(())
}

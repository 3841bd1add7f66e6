//! Rolling restarts: every replica of both pools stopped in turn (SIGTERM: it drains) and started again, under
//! steady load of streams, unary generations, scores and new images: no call fails, and every seeded generation
//! still gives the tokens of a fault-free run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kosmos_e2e::process::ProcessCluster;
use kosmos_e2e::{image, text, tiny_model_dir};
use tokio::sync::Mutex;

use crate::distinct_png;
use crate::faults::{Delivered, all, replica_binary, sampled, score, stream, unary, wait_healthy};
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
    let clean: Vec<Delivered> = all((0..REQUESTS)
        .map(|index| unary(client.clone(), sampled(index)))
        .collect())
    .await
    .into_iter()
    .collect::<Result<_, _>>()?;
    let clean = Arc::new(clean);

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..WORKERS {
        let (client, clean, stop, failures) = (
            client.clone(),
            clean.clone(),
            stop.clone(),
            failures.clone(),
        );
        workers.spawn(async move {
            let mut calls = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let index = (worker + calls) % REQUESTS;
                let outcome = match calls % 4 {
                    0 => stream(client.clone(), sampled(index), Default::default())
                        .await
                        .map(|delivered| {
                            (delivered.ids != clean[index].ids).then_some("other tokens")
                        }),
                    1 => unary(client.clone(), sampled(index))
                        .await
                        .map(|delivered| {
                            (delivered.ids != clean[index].ids).then_some("other tokens")
                        }),
                    2 => client.clone().score(score(index)).await.map(|_| None),
                    _ => {
                        // A new image each time: the encoders work (the embedding cache cannot answer).
                        let picture = distinct_png((worker * 100_000 + calls) as u32);
                        let request = greedy_request(vec![image(picture), text("An image of")], 4);
                        client.clone().generate(request).await.map(|_| None)
                    }
                };
                match outcome {
                    Ok(None) => {}
                    Ok(Some(problem)) => failures
                        .lock()
                        .await
                        .push(format!("worker {worker} call {calls}: {problem}")),
                    Err(status) => failures
                        .lock()
                        .await
                        .push(format!("worker {worker} call {calls}: {status:?}")),
                }
                calls += 1;
            }
            calls
        });
    }

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
    stop.store(true, Ordering::SeqCst);
    let mut calls = 0;
    while let Some(done) = workers.join_next().await {
        calls += done?;
    }
    let failures = failures.lock().await;
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed: {failures:#?}",
        failures.len()
    );
    assert!(calls >= 4 * WORKERS, "the load was steady: {calls} calls");
    eprintln!("{calls} calls through a rolling restart of 4 replicas, none failed");
    Ok(())
}

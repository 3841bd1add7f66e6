//! A soak: mixed load (streams, unary generations, scores, new images) for `KOSMOS_SOAK_SECONDS` (default 60)
//! while replicas are killed (SIGKILL) or stopped (SIGTERM) at random and started again, one at a time. Every call
//! is accounted for and ends OK (one replica of each pool always serves), seeded generations keep their tokens, the
//! gateway's memory stays flat, and at the end no decoder holds a sequence or a KV block and no gateway slot is
//! taken.

use std::time::{Duration, Instant};

use kosmos_e2e::process::ProcessCluster;
use kosmos_e2e::tiny_model_dir;
use kosmos_proto::decoder::v1 as dec;
use kosmos_proto::v1 as pb;

use crate::faults::{MixedLoad, fault_free, replica_binary, wait_healthy};

const REQUESTS: usize = 6;
const WORKERS: usize = 4;

/// A deterministic pseudo-random schedule (xorshift), so that a failing soak can be replayed.
struct Schedule(u64);

impl Schedule {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_soak_with_random_kills_and_restarts_accounts_for_every_call() -> anyhow::Result<()> {
    let seconds: u64 = std::env::var("KOSMOS_SOAK_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(60);
    let model = tiny_model_dir();
    // A small embedding cache, full within seconds: the gateway's memory then has no reason to grow.
    let gateway_overrides = ["cache.capacity_bytes=4194304".to_string()];
    let mut cluster =
        ProcessCluster::start(replica_binary(), &model, 2, 2, &[], &gateway_overrides).await?;
    let client = cluster.gateway.client().await?;
    let mut control = client.clone();
    let clean = fault_free(&client, REQUESTS).await?;
    let load = MixedLoad::start(&client, clean, WORKERS);

    let started = Instant::now();
    let mut schedule = Schedule(0x5eed_50a4);
    let mut memory = Vec::new();
    let mut faults = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        memory.push(cluster.gateway.resident_bytes()?);
        let decoder = schedule.next(2) == 0;
        let index = schedule.next(2) as usize;
        let (pool, process) = if decoder {
            ("decoder", &mut cluster.decoders[index])
        } else {
            ("encoder", &mut cluster.encoders[index])
        };
        if schedule.next(2) == 0 {
            process.kill();
        } else {
            process.terminate()?;
            let status = process.wait_exit(Duration::from_secs(60)).await?;
            assert!(
                status.success(),
                "{pool} {index} exited cleanly on SIGTERM: {status}"
            );
        }
        faults += 1;
        tokio::time::sleep(Duration::from_millis(200 + schedule.next(800))).await;
        process.restart()?;
        process.wait_serving("", Duration::from_secs(120)).await?;
        wait_healthy(&mut control, pool, 2).await?;
        tokio::time::sleep(Duration::from_millis(200 + schedule.next(800))).await;
    }
    let (calls, failures) = load.stop().await?;
    memory.push(cluster.gateway.resident_bytes()?);

    eprintln!(
        "soak: {seconds} s, {faults} faults, {} calls, gateway memory {:?} MiB",
        calls,
        memory.iter().map(|bytes| bytes >> 20).collect::<Vec<_>>()
    );
    assert!(
        failures.is_empty(),
        "{} of {} calls failed: {:#?}",
        failures.len(),
        calls,
        failures
    );
    assert!(calls >= WORKERS * 4, "the load ran: {} calls", calls);
    // Flat: the second half's peak within 64 MiB of the first half's (the cache and pools warm up in the first).
    let half = memory.len() / 2;
    let first = memory[..half.max(1)].iter().max().copied().unwrap_or(0);
    let second = memory[half..].iter().max().copied().unwrap_or(0);
    assert!(
        second <= first + (64 << 20),
        "the gateway's memory grew from {} MiB to {} MiB",
        first >> 20,
        second >> 20
    );

    // Nothing held at the end: no gateway slot or pool call, no decoder sequence or KV block.
    let mut settled = false;
    for _ in 0..100 {
        let stats = control
            .get_model_info(pb::GetModelInfoRequest::default())
            .await?
            .into_inner()
            .stats
            .unwrap_or_default();
        let pools = [
            stats.encoder.unwrap_or_default(),
            stats.decoder.unwrap_or_default(),
        ];
        if stats.requests_in_flight == 0
            && pools
                .iter()
                .all(|pool| pool.in_flight == 0 && pool.pending == 0)
        {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        settled,
        "the gateway still holds calls after the load stopped"
    );
    for decoder in &cluster.decoders {
        let mut client = dec::decoder_client::DecoderClient::connect(decoder.endpoint()).await?;
        let info = client.info(dec::InfoRequest {}).await?.into_inner();
        assert_eq!(
            (
                info.running_sequences,
                info.waiting_requests,
                info.kv_blocks_used
            ),
            (0, 0, 0),
            "decoder {} holds nothing: {info:?}",
            decoder.endpoint()
        );
    }
    Ok(())
}

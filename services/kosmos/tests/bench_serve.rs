//! `kosmos bench` against a real `kosmos serve` with the shipped demo model, both as separate processes, with small
//! counts: every request is accounted for (OK or counted by code), the summary's percentiles are those of the
//! per-request records, and the report reads back into the typed schema.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kosmos_proto::v1 as pb;
use kosmos_proto::v1::kosmos_client::KosmosClient;

#[allow(dead_code)]
#[path = "../src/bench/schema.rs"]
mod schema;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kosmos-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir.join(name)
}

/// Starts `kosmos serve` on a free port and waits (at most 3 minutes) until the gateway sees both pools healthy.
async fn serve() -> (Server, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let any_port = "metrics.listen=\"127.0.0.1:0\"";
    let server = Server(
        Command::new(env!("CARGO_BIN_EXE_kosmos"))
            .current_dir(repo())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--http-listen", "127.0.0.1:0"])
            .args(["--gateway-set", any_port, "--encoder-set", any_port])
            .args(["--decoder-set", any_port])
            .args(["--gateway-set", "encoder.probe_interval_seconds=0.2"])
            .args(["--gateway-set", "decoder.probe_interval_seconds=0.2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("kosmos serve starts"),
    );
    let address = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "kosmos serve was not ready within 3 minutes"
        );
        if let Ok(mut client) = KosmosClient::connect(address.clone()).await
            && let Ok(info) = client
                .get_model_info(pb::GetModelInfoRequest::default())
                .await
        {
            let stats = info.into_inner().stats.unwrap_or_default();
            let healthy =
                |pool: Option<pb::PoolStats>| pool.is_some_and(|p| p.healthy_replicas > 0);
            if healthy(stats.encoder) && healthy(stats.decoder) {
                return (server, address);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn bench(address: &str, json: &Path, extra: &[&str]) -> (schema::Report, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kosmos"));
    command
        .current_dir(repo())
        .args(["bench", "--addr", address, "--json"])
        .arg(json)
        .args(extra);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("kosmos bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "kosmos bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(json).expect("the JSON report");
    (
        serde_json::from_str(&text).expect("the report parses into the typed schema"),
        stdout,
    )
}

/// numpy.percentile (linear interpolation), written again here so the check does not reuse the code it checks.
fn numpy_percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let position = q / 100.0 * (sorted.len() - 1) as f64;
    let low = sorted[position.floor() as usize];
    let high = sorted[position.ceil() as usize];
    low + (high - low) * position.fract()
}

fn assert_stats_match(name: &str, stats: &schema::Stats, values: &[f64]) {
    assert_eq!(stats.count, values.len() as u64, "{name} count");
    if values.is_empty() {
        assert!(
            stats.p50.is_none() && stats.max.is_none(),
            "{name} of nothing"
        );
        return;
    }
    let close =
        |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() <= 1e-9 * b.abs().max(1.0));
    for (q, value) in [(50.0, stats.p50), (90.0, stats.p90), (99.0, stats.p99)] {
        assert!(
            close(value, numpy_percentile(values, q)),
            "{name} p{q}: {value:?}"
        );
    }
    let max = values.iter().copied().fold(f64::MIN, f64::max);
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    assert!(
        close(stats.max, max) && close(stats.mean, mean),
        "{name} max/mean"
    );
}

/// The summary is what the records say.
fn assert_consistent(run: &schema::Run) {
    let summary = &run.summary;
    assert_eq!(summary.requests, run.requests.len() as u64);
    let errors: u64 = summary.errors_by_code.values().sum();
    assert_eq!(
        summary.successful + errors,
        summary.requests,
        "every request accounted for"
    );
    let ok: Vec<&schema::RequestRecord> =
        run.requests.iter().filter(|r| r.status == "OK").collect();
    assert_eq!(ok.len() as u64, summary.successful);
    for record in &ok {
        if let Some(ttft) = record.ttft_ms {
            assert!(ttft > 0.0 && ttft <= record.e2e_ms, "{record:?}");
            let gaps: f64 = record.itl_ms.iter().sum();
            assert!(gaps <= record.e2e_ms - ttft + 1e-6, "{record:?}");
        }
    }
    let ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft_ms).collect();
    let tpot: Vec<f64> = ok.iter().filter_map(|r| r.tpot_ms).collect();
    let itl: Vec<f64> = ok.iter().flat_map(|r| r.itl_ms.iter().copied()).collect();
    let e2e: Vec<f64> = ok.iter().map(|r| r.e2e_ms).collect();
    assert_stats_match("ttft", &summary.ttft_ms, &ttft);
    assert_stats_match("tpot", &summary.tpot_ms, &tpot);
    assert_stats_match("itl", &summary.itl_ms, &itl);
    assert_stats_match("e2e", &summary.e2e_ms, &e2e);
    let tokens: u64 = ok.iter().map(|r| u64::from(r.output_tokens)).sum();
    assert_eq!(summary.total_output_tokens, tokens);
    assert_eq!(
        summary.goodput_requests,
        run.requests.iter().filter(|r| r.good).count() as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_accounts_for_every_request_against_kosmos_serve() {
    let (_server, address) = serve().await;

    // Closed loop, images from the held-out set, half of the requests from a pool of two.
    let (report, stdout) = bench(
        &address,
        &scratch("closed.json"),
        &[
            "--concurrency",
            "3",
            "--requests",
            "9",
            "--image-reuse",
            "0.5",
            "--image-pool",
            "2",
            "--output-tokens",
            "4..12",
            "--prompt-words",
            "2..6",
            "--slo-ttft",
            "60000",
        ],
    )
    .await;
    let run = &report.runs[0];
    assert_eq!(run.summary.successful, 9, "{stdout}");
    assert_consistent(run);
    assert!(
        run.requests
            .iter()
            .all(|r| r.images == 1 && r.image_bytes > 0)
    );
    assert!(
        run.requests.iter().any(|r| r.reused_images)
            && run.requests.iter().any(|r| !r.reused_images)
    );
    assert!(
        run.requests
            .iter()
            .all(|r| r.output_tokens >= 1 && r.output_tokens <= r.max_new_tokens)
    );
    assert!(
        run.requests
            .iter()
            .all(|r| r.prompt_tokens.is_some_and(|t| t > 0))
    );
    assert!(report.config.images.starts_with("folder:"));
    for row in [
        "| time to first token |",
        "| time per output token |",
        "| inter-token latency |",
        "| end-to-end |",
    ] {
        assert!(stdout.contains(row), "no `{row}` in:\n{stdout}");
    }

    // Open loop, a two-rate sweep with generated images, and its chart.
    let chart = scratch("sweep.svg");
    let (report, stdout) = bench(
        &address,
        &scratch("sweep.json"),
        &[
            "--rate",
            "2,6",
            "--requests",
            "4",
            "--image-size",
            "96x64",
            "--images-per-request",
            "2",
            "--output-tokens",
            "6",
            "--chart",
            chart.to_str().expect("utf-8 path"),
        ],
    )
    .await;
    assert_eq!(report.runs.len(), 2);
    for run in &report.runs {
        assert_eq!(run.summary.successful, 4, "{stdout}");
        assert_consistent(run);
    }
    assert!(
        std::fs::read_to_string(&chart)
            .expect("the chart")
            .starts_with("<svg")
    );

    // Score.
    let (report, _) = bench(
        &address,
        &scratch("score.json"),
        &["--mode", "score", "--requests", "3", "--concurrency", "2"],
    )
    .await;
    assert_eq!(report.runs[0].summary.successful, 3);
    assert_consistent(&report.runs[0]);

    // Requests the gateway refuses are counted by their code, not lost: max_new_tokens above its limit.
    let (report, stdout) = bench(
        &address,
        &scratch("refused.json"),
        &[
            "--requests",
            "3",
            "--concurrency",
            "2",
            "--output-tokens",
            "100000",
        ],
    )
    .await;
    let run = &report.runs[0];
    assert_consistent(run);
    assert_eq!(run.summary.successful, 0);
    assert_eq!(
        run.summary.errors_by_code,
        [("INVALID_ARGUMENT".to_string(), 3)].into_iter().collect(),
        "{stdout}"
    );
    assert!(run.requests.iter().all(|r| {
        r.error
            .as_deref()
            .is_some_and(|e| e.contains("max_new_tokens"))
    }));
}

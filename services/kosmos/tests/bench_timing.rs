//! `kosmos bench` against a fake gateway with known timings: a tonic server implementing the public Kosmos service
//! that streams its first token 100 ms after a request arrives and one more every 20 ms, answers Score after 50 ms,
//! and refuses every fourth stream with RESOURCE_EXHAUSTED. The measured time to first token, time per output token
//! and inter-token latency must be the known ones (never below; the medians within 25 ms above, the slack a loaded
//! 2-core machine needs), and every request must be in the report, OK or counted by its code.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kosmos_proto::v1 as pb;
use kosmos_proto::v1::kosmos_server::{Kosmos, KosmosServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

#[allow(dead_code)]
#[path = "../src/bench/schema.rs"]
mod schema;

const FIRST_TOKEN: Duration = Duration::from_millis(100);
const TOKEN_GAP: Duration = Duration::from_millis(20);
const TOKENS: u32 = 6;
const SCORE_TIME: Duration = Duration::from_millis(50);
/// How far above the known time a median may be.
const SLACK_MS: f64 = 25.0;

#[derive(Default)]
struct FakeGateway {
    streams: AtomicU64,
}

fn token_message(index: u32) -> pb::GenerateStreamResponse {
    let last = index + 1 == TOKENS;
    pb::GenerateStreamResponse {
        text: "x".into(),
        tokens: vec![pb::Token {
            id: index,
            text: "x".into(),
            ..Default::default()
        }],
        finish_reason: if last {
            pb::FinishReason::Length as i32
        } else {
            pb::FinishReason::Unspecified as i32
        },
        usage: last.then_some(pb::Usage {
            prompt_tokens: 5,
            image_tokens: 0,
            completion_tokens: TOKENS,
        }),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Kosmos for FakeGateway {
    type GenerateStreamStream = Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>,
    >;

    async fn generate(
        &self,
        _request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        Err(Status::unimplemented("the fake streams only"))
    }

    async fn generate_stream(
        &self,
        _request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        if self.streams.fetch_add(1, Ordering::SeqCst) % 4 == 3 {
            return Err(Status::resource_exhausted(
                "the fake refuses every fourth stream",
            ));
        }
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            tokio::time::sleep(FIRST_TOKEN).await;
            for index in 0..TOKENS {
                if index > 0 {
                    tokio::time::sleep(TOKEN_GAP).await;
                }
                if sender.send(Ok(token_message(index))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn score(
        &self,
        request: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        tokio::time::sleep(SCORE_TIME).await;
        let scores = request
            .into_inner()
            .candidates
            .into_iter()
            .map(|candidate| pb::CandidateScore {
                candidate,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(pb::ScoreResponse {
            scores,
            prompt_token_ids: vec![1, 2, 3],
            ..Default::default()
        }))
    }

    async fn get_model_info(
        &self,
        _request: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::GetModelInfoResponse>, Status> {
        Ok(Response::new(pb::GetModelInfoResponse {
            model_fingerprint: "fake".into(),
            context_length: 256,
            num_image_tokens: 64,
            ..Default::default()
        }))
    }
}

/// Serves a fresh fake on a free loopback port until the test's runtime ends.
async fn start_fake() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(KosmosServer::new(FakeGateway::default()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{address}")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kosmos-bench-timing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir.join(name)
}

/// Runs `kosmos bench` (off the test's runtime, which serves the fake) and reads its JSON report.
async fn bench(
    address: &str,
    json: &Path,
    extra: &[&str],
) -> (schema::Report, serde_json::Value, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kosmos"));
    command
        .args([
            "bench",
            "--addr",
            address,
            "--images-per-request",
            "0",
            "--prompt-words",
            "3",
        ])
        .arg("--json")
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
    let report: schema::Report =
        serde_json::from_str(&text).expect("the report parses into the typed schema");
    let value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    (report, value, stdout)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_timings_are_measured_right_and_refusals_are_counted_by_code() {
    let address = start_fake().await;
    let (report, _, stdout) = bench(
        &address,
        &scratch("stream.json"),
        &[
            "--concurrency",
            "2",
            "--requests",
            "12",
            "--output-tokens",
            "6",
        ],
    )
    .await;
    assert_eq!(report.runs.len(), 1);
    let run = &report.runs[0];
    assert_eq!(run.requests.len(), 12, "every request has a record");
    let indices: Vec<u64> = run.requests.iter().map(|r| r.index).collect();
    assert_eq!(indices, (0..12).collect::<Vec<_>>());
    assert_eq!(run.summary.requests, 12);
    assert_eq!(run.summary.successful, 9);
    assert_eq!(
        run.summary.errors_by_code,
        [("RESOURCE_EXHAUSTED".to_string(), 3)]
            .into_iter()
            .collect()
    );
    assert!(stdout.contains("errors: RESOURCE_EXHAUSTED 3"), "{stdout}");

    let ok: Vec<&schema::RequestRecord> =
        run.requests.iter().filter(|r| r.status == "OK").collect();
    for record in &ok {
        assert_eq!(record.output_tokens, TOKENS);
        assert_eq!(record.finish_reason.as_deref(), Some("LENGTH"));
        assert_eq!(record.itl_ms.len(), TOKENS as usize - 1);
        let ttft = record.ttft_ms.expect("a TTFT");
        assert!(
            ttft >= ms(FIRST_TOKEN),
            "TTFT {ttft} ms below the fake's {FIRST_TOKEN:?}"
        );
        let streamed = ms(FIRST_TOKEN + TOKEN_GAP * (TOKENS - 1));
        assert!(
            record.e2e_ms >= streamed,
            "e2e {} below {streamed}",
            record.e2e_ms
        );
    }
    for record in run.requests.iter().filter(|r| r.status != "OK") {
        assert_eq!(record.status, "RESOURCE_EXHAUSTED");
        assert!(
            record
                .error
                .as_deref()
                .is_some_and(|e| e.contains("fourth"))
        );
        assert!(record.ttft_ms.is_none() && !record.good);
    }
    let mut ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft_ms).collect();
    let mut tpot: Vec<f64> = ok.iter().filter_map(|r| r.tpot_ms).collect();
    let mut itl: Vec<f64> = ok.iter().flat_map(|r| r.itl_ms.clone()).collect();
    let known = [
        ("TTFT", median(&mut ttft), ms(FIRST_TOKEN)),
        ("TPOT", median(&mut tpot), ms(TOKEN_GAP)),
        ("ITL", median(&mut itl), ms(TOKEN_GAP)),
    ];
    for (name, measured, truth) in known {
        // A late first message shortens the gaps after it, so the per-token medians get 2 ms below.
        let floor = if name == "TTFT" { truth } else { truth - 2.0 };
        assert!(
            measured >= floor && measured <= truth + SLACK_MS,
            "{name}: median {measured:.1} ms, the fake's {truth:.1} ms"
        );
    }
    assert_eq!(run.summary.ttft_ms.count, 9);
    assert_eq!(run.summary.itl_ms.count, 9 * (u64::from(TOKENS) - 1));
    // 9 OK requests of 6 tokens over the run's wall time.
    let tokens_per_second = 54.0 / run.summary.duration_seconds;
    assert!((run.summary.output_token_throughput - tokens_per_second).abs() < 1e-6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_latency_is_measured_and_slo_goodput_counts_it() {
    let address = start_fake().await;
    let (report, _, _) = bench(
        &address,
        &scratch("score.json"),
        &[
            "--mode",
            "score",
            "--concurrency",
            "2",
            "--requests",
            "6",
            "--slo-ttft",
            "10",
        ],
    )
    .await;
    let run = &report.runs[0];
    assert_eq!((run.summary.requests, run.summary.successful), (6, 6));
    let mut e2e: Vec<f64> = run.requests.iter().map(|r| r.e2e_ms).collect();
    assert!(
        e2e.iter().all(|latency| *latency >= ms(SCORE_TIME)),
        "{e2e:?}"
    );
    let middle = median(&mut e2e);
    assert!(middle <= ms(SCORE_TIME) + SLACK_MS, "median {middle:.1} ms");
    assert!(
        run.requests
            .iter()
            .all(|r| r.ttft_ms.is_none() && r.output_tokens == 0)
    );
    assert_eq!(report.config.mode, "score");
    // A 10 ms objective no 50 ms answer meets.
    assert_eq!(run.summary.goodput_requests, 0);
    assert_eq!(run.summary.goodput, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_sweep_reports_each_rate_and_draws_the_chart() {
    let address = start_fake().await;
    let chart = scratch("sweep.svg");
    let _ = std::fs::remove_file(&chart);
    let (report, value, stdout) = bench(
        &address,
        &scratch("sweep.json"),
        &[
            "--rate",
            "20,inf",
            "--requests",
            "8",
            "--seed",
            "5",
            "--chart",
            chart.to_str().expect("utf-8 path"),
        ],
    )
    .await;
    assert_eq!(report.runs.len(), 2);
    assert_eq!(
        report.runs[0].load,
        schema::Load::Poisson { rate: Some(20.0) }
    );
    assert_eq!(report.runs[1].load, schema::Load::Poisson { rate: None });
    // The fake's refusal counter runs across both runs: 16 streams, 4 refused.
    let total: u64 = report.runs.iter().map(|run| run.summary.requests).sum();
    let refused: u64 = report
        .runs
        .iter()
        .map(|run| {
            run.summary
                .errors_by_code
                .get("RESOURCE_EXHAUSTED")
                .copied()
                .unwrap_or(0)
        })
        .sum();
    assert_eq!((total, refused), (16, 4));
    // Open loop: at 20 req/s the sends spread over the seeded arrivals (7 gaps of 50 ms on average), at `inf`
    // they all go at once.
    let last_sent = |run: &schema::Run| run.requests.iter().map(|r| r.sent_ms).fold(0.0, f64::max);
    assert!(
        last_sent(&report.runs[0]) >= 100.0,
        "{:?}",
        report.runs[0].requests
    );
    assert!(last_sent(&report.runs[1]) < last_sent(&report.runs[0]));
    assert!(
        stdout.contains("### sweep")
            && stdout.contains("| rate 20 req/s |")
            && stdout.contains("| rate inf |")
    );
    let svg = std::fs::read_to_string(&chart).expect("the chart");
    assert!(svg.starts_with("<svg") && svg.contains("TTFT p50") && svg.contains("end-to-end p99"));
    assert_eq!(value["runs"][0]["load"]["kind"], "poisson");
    assert!(value["runs"][1]["load"]["rate"].is_null());
}

fn keys(value: &serde_json::Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_schema_keeps_its_field_names() {
    let address = start_fake().await;
    let (report, value, _) = bench(
        &address,
        &scratch("schema.json"),
        &[
            "--concurrency",
            "1",
            "--requests",
            "2",
            "--slo-ttft",
            "1000",
            "--slo-tpot",
            "100",
        ],
    )
    .await;
    assert_eq!(report.schema_version, schema::SCHEMA_VERSION);
    assert_eq!(value["schema_version"], 1);
    assert_eq!(report.tool, "kosmos bench");
    assert_eq!(
        keys(&value),
        [
            "config",
            "kosmos_version",
            "runs",
            "schema_version",
            "started_at_unix_seconds",
            "target",
            "tool"
        ]
    );
    assert_eq!(
        keys(&value["config"]),
        [
            "duration_seconds",
            "image_pool",
            "image_reuse",
            "images",
            "images_per_request",
            "mode",
            "output_tokens",
            "prompt_words",
            "requests",
            "score_candidates",
            "seed",
            "slo_tpot_ms",
            "slo_ttft_ms",
            "temperature",
            "timeout_seconds"
        ]
    );
    assert_eq!(keys(&value["config"]["output_tokens"]), ["max", "min"]);
    let run = &value["runs"][0];
    assert_eq!(keys(run), ["load", "requests", "summary"]);
    assert_eq!(keys(&run["load"]), ["concurrency", "kind"]);
    assert_eq!(
        keys(&run["summary"]),
        [
            "duration_seconds",
            "e2e_ms",
            "ended_early",
            "errors_by_code",
            "goodput",
            "goodput_requests",
            "itl_ms",
            "output_token_throughput",
            "request_throughput",
            "requests",
            "successful",
            "total_output_tokens",
            "total_prompt_tokens",
            "tpot_ms",
            "ttft_ms"
        ]
    );
    assert_eq!(
        keys(&run["summary"]["ttft_ms"]),
        ["count", "max", "mean", "p50", "p90", "p99"]
    );
    assert_eq!(
        keys(&run["requests"][0]),
        [
            "e2e_ms",
            "error",
            "finish_reason",
            "good",
            "image_bytes",
            "images",
            "index",
            "itl_ms",
            "max_new_tokens",
            "output_tokens",
            "prompt_tokens",
            "prompt_words",
            "reused_images",
            "send_lag_ms",
            "sent_ms",
            "status",
            "tpot_ms",
            "ttft_ms"
        ]
    );
    // Both requests meet a 1 s TTFT and a 100 ms TPOT objective.
    assert_eq!(report.runs[0].summary.goodput_requests, 2);
    assert_eq!(report.config.slo_ttft_ms, Some(1000.0));
    let round_trip: schema::Report =
        serde_json::from_str(&serde_json::to_string(&report).expect("serialise")).expect("parse");
    assert_eq!(round_trip, report);
}

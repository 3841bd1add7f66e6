//! `kosmos eval` against `kosmos serve` with each shipped demo model (`models/demo`, the Kosmos-2 one, and
//! `models/demo-doc`, the Kosmos-2.5 one), both as separate processes: once the gateway's `readiness` is SERVING,
//! one run of the held-out set through the public API prints the accuracy table, whose counts equal PyTorch's on
//! the same items (the models' READMEs) and where the generated ids of every generation item equal PyTorch's.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// PyTorch's counts on the shipped held-out set (`tools/train/eval_torch.py` on the same 280 items, as
/// `models/demo/README.md` reports them): (table row, correct, total).
const PYTORCH_COUNTS: [(&str, u32, u32); 4] = [
    ("caption", 58, 60),
    ("classification (Score)", 40, 40),
    ("grounding (all objects of an image)", 58, 60),
    ("vqa", 117, 120),
];

/// PyTorch's counts on the document model's held-out set (`tools/train/eval_doc_torch.py`, as
/// `models/demo-doc/README.md` reports them): (table row, count, total); for the error rates, (edits, characters).
const PYTORCH_DOC_COUNTS: [(&str, u32, u32); 4] = [
    ("ocr line boxes IoU@0.5 (lines)", 324, 352),
    ("ocr character error rate (edits, chars)", 89, 3118),
    ("md structure (pages)", 54, 64),
    ("md character error rate (edits, chars)", 199, 4090),
];

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the server at `addr` reports `readiness` SERVING.
async fn wait_ready(addr: &str, limit: Duration) {
    let started = Instant::now();
    loop {
        if let Ok(endpoint) = tonic::transport::Endpoint::from_shared(addr.to_string())
            && let Ok(channel) = endpoint.connect().await
            && let Ok(response) = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: "readiness".into(),
                })
                .await
            && response.into_inner().status == ServingStatus::Serving as i32
        {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "kosmos serve did not become ready in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Serves `model` (the default one when `None`) with `kosmos serve`, runs `kosmos eval --set SET` against it and
/// returns its table (stdout) after checking that it succeeded, evaluated every item of the set, and that every
/// generation item's ids equal PyTorch's.
async fn eval_table(model: Option<&str>, set: &str) -> String {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_kosmos"));
    serve
        .current_dir(&repo)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--http-listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0"]);
    if let Some(model) = model {
        serve.args(["--model", model]);
    }
    let _server = Server(
        serve
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("kosmos serve starts"),
    );
    let addr = format!("http://127.0.0.1:{port}");
    wait_ready(&addr, Duration::from_secs(120)).await;
    let output = Command::new(env!("CARGO_BIN_EXE_kosmos"))
        .current_dir(&repo)
        .args(["eval", "--addr", &addr, "--set", set])
        .output()
        .expect("kosmos eval runs");
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "kosmos eval failed: {}\n{table}",
        String::from_utf8_lossy(&output.stderr)
    );
    let agreement = table
        .lines()
        .find(|line| line.starts_with("| same ids as PyTorch"))
        .unwrap_or_else(|| panic!("no agreement row in:\n{table}"));
    assert!(agreement.ends_with("| 100.0% |"), "{agreement}");
    let items = std::fs::read_to_string(repo.join(set).join("set.jsonl"))
        .expect("the held-out set")
        .lines()
        .filter(|line| !line.trim().is_empty())
        .count();
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(&format!("{items}/{items} items")),
        "every item was evaluated"
    );
    table
}

/// Asserts that `table` has each row with PyTorch's counts.
fn assert_rows(table: &str, rows: &[(&str, u32, u32)]) {
    for (row, correct, total) in rows {
        let prefix = format!("| {row} | ");
        let line = table
            .lines()
            .find(|line| line.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no `{row}` row in:\n{table}"));
        assert!(
            line.starts_with(&format!("| {row} | {correct} | {total} |")),
            "PyTorch gets {correct}/{total} on `{row}`, we got: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_matches_pytorchs_counts_on_the_demo_models_held_out_set() {
    let table = eval_table(None, "models/demo/heldout").await;
    assert_rows(&table, &PYTORCH_COUNTS);
    assert!(
        table.contains("| grounding IoU@0.5 (objects) |"),
        "no objects row in:\n{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_matches_pytorchs_counts_on_the_document_models_held_out_set() {
    let table = eval_table(Some("models/demo-doc"), "models/demo-doc/heldout").await;
    assert_rows(&table, &PYTORCH_DOC_COUNTS);
}

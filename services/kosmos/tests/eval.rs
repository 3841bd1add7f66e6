//! `kosmos eval` against `kosmos serve` with the shipped demo model, both as separate processes: the command runs
//! the held-out set through the public API and prints the accuracy table, where the generated ids of every
//! generation item equal PyTorch's (the PNGs' preprocessing is bit-exact in Rust).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn eval_prints_the_table_for_the_demo_models_held_out_set() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let any_port = "metrics.listen=\"127.0.0.1:0\"";
    let _server = Server(
        Command::new(env!("CARGO_BIN_EXE_kosmos"))
            .current_dir(&repo)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--gateway-set", any_port, "--encoder-set", any_port])
            .args(["--decoder-set", any_port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("kosmos serve starts"),
    );
    let addr = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let output = loop {
        let output = Command::new(env!("CARGO_BIN_EXE_kosmos"))
            .current_dir(&repo)
            .args(["eval", "--addr", &addr])
            .output()
            .expect("kosmos eval runs");
        if output.status.success() || started.elapsed() > Duration::from_secs(120) {
            break output;
        }
        // The server is still loading: eval could not connect.
        std::thread::sleep(Duration::from_millis(300));
    };
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "kosmos eval failed: {}\n{table}",
        String::from_utf8_lossy(&output.stderr)
    );
    for row in [
        "| caption |",
        "| vqa |",
        "| classification (Score) |",
        "| grounding IoU@0.5 (objects) |",
    ] {
        assert!(table.contains(row), "no `{row}` row in:\n{table}");
    }
    let agreement = table
        .lines()
        .find(|line| line.starts_with("| same ids as PyTorch"))
        .unwrap_or_else(|| panic!("no agreement row in:\n{table}"));
    assert!(agreement.ends_with("| 100.0% |"), "{agreement}");
    let items = std::fs::read_to_string(repo.join("models/demo/heldout/set.jsonl"))
        .expect("the held-out set")
        .lines()
        .filter(|line| !line.trim().is_empty())
        .count();
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(&format!("{items}/{items} items")),
        "the progress bar reaches the end"
    );
}

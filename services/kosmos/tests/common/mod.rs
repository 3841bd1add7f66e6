//! `kosmos serve` as a child process for the tests that talk to it through the public API.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kosmos_proto::v1 as pb;
use kosmos_proto::v1::kosmos_client::KosmosClient;

/// A running `kosmos serve`, killed when dropped.
pub struct Server(Child);

impl Server {
    /// The process id (for `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The repository root (`kosmos serve` runs there to find `models/demo`).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Starts `kosmos serve` on a free port and waits (at most 3 minutes) until the gateway sees both pools healthy.
pub async fn serve() -> (Server, String) {
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

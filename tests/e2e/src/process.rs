//! Services as separate processes (`kosmos-e2e-replica`), for the tests where a replica dies: SIGKILL is a node
//! lost or an OOM kill, SIGTERM a rolling update or a scale-in. Each process logs to its own file, which a failed
//! test prints; every process is killed when its handle drops, so a failing test leaves nothing running.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kosmos_proto::v1::kosmos_client::KosmosClient;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::MAX_MESSAGE_BYTES;

/// Which service a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The vision encoder.
    Encoder,
    /// The decoder.
    Decoder,
    /// The gateway.
    Gateway,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Encoder => "encoder",
            Kind::Decoder => "decoder",
            Kind::Gateway => "gateway",
        }
    }
}

/// A free loopback port for a process, below Linux's ephemeral range (32768–60999). A process keeps its port
/// across restarts, and while it is down nothing else may take that port: the OS hands out ports for `127.0.0.1:0`
/// (what every in-process test binds) only from the ephemeral range, and within this test binary each port is
/// handed out once.
pub fn free_port() -> anyhow::Result<u16> {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Start where another test binary running at the same time is unlikely to be.
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 500) as u16 * 20,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..2_000 {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        anyhow::ensure!(port < 32_768, "no free port left below the ephemeral range");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port found below the ephemeral range")
}

/// One service process on a fixed loopback port; restartable on the same port; killed when dropped.
#[derive(Debug)]
pub struct Process {
    binary: PathBuf,
    kind: Kind,
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

static SPAWNED: AtomicUsize = AtomicUsize::new(0);

impl Process {
    /// Starts `kind` serving `model_dir` on `port` (`GET /metrics` on a free port), with `--set` `overrides`. Returns at
    /// once; [`Process::wait_serving`] waits for it. `binary` is `kosmos-e2e-replica`, which a test names as
    /// `env!("CARGO_BIN_EXE_kosmos-e2e-replica")` (cargo defines it for integration tests only).
    pub fn spawn(
        binary: &Path,
        kind: Kind,
        port: u16,
        model_dir: &Path,
        overrides: &[String],
    ) -> anyhow::Result<Self> {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let metrics_addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let mut args = vec![
            kind.name().to_string(),
            "--listen".into(),
            addr.to_string(),
            "--metrics-listen".into(),
            metrics_addr.to_string(),
            "--model-dir".into(),
            model_dir.display().to_string(),
        ];
        for set in overrides {
            args.push("--set".into());
            args.push(set.clone());
        }
        let log = std::env::temp_dir().join(format!(
            "kosmos-e2e-{}-{}-{}-{port}.log",
            std::process::id(),
            SPAWNED.fetch_add(1, Ordering::Relaxed),
            kind.name()
        ));
        let mut process = Self {
            binary: binary.to_path_buf(),
            kind,
            addr,
            metrics_addr,
            args,
            log,
            child: None,
        };
        process.start()?;
        Ok(process)
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = Command::new(&self.binary)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting kosmos-e2e-replica")?;
        self.child = Some(child);
        Ok(())
    }

    /// The gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where it serves `GET /metrics`.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// `http://127.0.0.1:PORT`, as a pool's endpoint list names it.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory of the process now (`VmRSS` in `/proc/<pid>/status`), in bytes.
    pub fn resident_bytes(&self) -> anyhow::Result<u64> {
        let pid = self.pid().context("the process is not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| {
                value
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .context("no VmRSS line")?;
        Ok(kib * 1024)
    }

    /// Whether the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Waits (at most `timeout`) until grpc.health.v1 says `service` is SERVING (`""`: the process; encoders and
    /// decoders also need their model loaded, which their `Info` shows, so this waits for `Info` too).
    pub async fn wait_serving(&mut self, service: &str, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            anyhow::ensure!(
                self.is_running(),
                "the {} on {} exited while starting:\n{}",
                self.kind.name(),
                self.addr,
                self.log_tail()
            );
            if self.answers(service).await {
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < timeout,
                "the {} on {} did not serve `{service}` within {timeout:?}:\n{}",
                self.kind.name(),
                self.addr,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn answers(&self, service: &str) -> bool {
        let Ok(channel) = Channel::from_shared(self.endpoint())
            .expect("a valid URI")
            .connect_timeout(Duration::from_millis(500))
            .connect()
            .await
        else {
            return false;
        };
        let serving = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .is_ok_and(|answer| answer.into_inner().status == ServingStatus::Serving as i32);
        if !serving {
            return false;
        }
        match self.kind {
            Kind::Encoder => {
                kosmos_proto::encoder::v1::vision_encoder_client::VisionEncoderClient::new(channel)
                    .info(kosmos_proto::encoder::v1::InfoRequest {})
                    .await
                    .is_ok()
            }
            Kind::Decoder => kosmos_proto::decoder::v1::decoder_client::DecoderClient::new(channel)
                .info(kosmos_proto::decoder::v1::InfoRequest {})
                .await
                .is_ok(),
            Kind::Gateway => true,
        }
    }

    /// SIGKILL: the process dies at once, its connections reset; returns when it has exited.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM: the service drains and exits on its own (see [`Process::wait_exit`]).
    pub fn terminate(&self) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("the process is not running")?;
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .context("running kill -TERM")?;
        anyhow::ensure!(status.success(), "kill -TERM {} failed", child.id());
        Ok(())
    }

    /// Waits (at most `timeout`, polling) until the process exits; its exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let started = Instant::now();
        loop {
            let child = self.child.as_mut().context("the process is not running")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            anyhow::ensure!(
                started.elapsed() < timeout,
                "the {} on {} did not exit within {timeout:?}:\n{}",
                self.kind.name(),
                self.addr,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the process again, same port and flags (after [`Process::kill`] or an exit).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.is_running(), "the process still runs");
        self.start()
    }

    /// The last lines of the process's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A client of the public API (a gateway process).
    pub async fn client(&self) -> anyhow::Result<KosmosClient<Channel>> {
        let channel = Channel::from_shared(self.endpoint())?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        Ok(KosmosClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// A gateway, encoders and decoders, each its own process, on fixed ports (so a replica restarts where the
/// gateway's static pool lists expect it).
#[derive(Debug)]
pub struct ProcessCluster {
    /// The gateway.
    pub gateway: Process,
    /// The encoders.
    pub encoders: Vec<Process>,
    /// The decoders.
    pub decoders: Vec<Process>,
}

impl ProcessCluster {
    /// Starts (with `binary`, see [`Process::spawn`]) `encoders` encoders and `decoders` decoders serving `model_dir` (each with `replica_overrides`), then
    /// a gateway over them (probing every 0.2 s, plus `gateway_overrides`), and waits until every replica serves
    /// and the gateway is ready.
    pub async fn start(
        binary: &Path,
        model_dir: &Path,
        encoders: usize,
        decoders: usize,
        replica_overrides: &[String],
        gateway_overrides: &[String],
    ) -> anyhow::Result<Self> {
        let spawn = |kind| Process::spawn(binary, kind, free_port()?, model_dir, replica_overrides);
        let mut encoder_processes = Vec::new();
        for _ in 0..encoders {
            encoder_processes.push(spawn(Kind::Encoder)?);
        }
        let mut decoder_processes = Vec::new();
        for _ in 0..decoders {
            decoder_processes.push(spawn(Kind::Decoder)?);
        }
        let list = |processes: &[Process]| {
            let quoted: Vec<String> = processes
                .iter()
                .map(|process| format!("\"{}\"", process.endpoint()))
                .collect();
            format!("[{}]", quoted.join(","))
        };
        let mut overrides = vec![
            format!("encoder.endpoints={}", list(&encoder_processes)),
            format!("decoder.endpoints={}", list(&decoder_processes)),
            "encoder.probe_interval_seconds=0.2".to_string(),
            "decoder.probe_interval_seconds=0.2".to_string(),
        ];
        overrides.extend_from_slice(gateway_overrides);
        let gateway = Process::spawn(binary, Kind::Gateway, free_port()?, model_dir, &overrides)?;
        let mut cluster = Self {
            gateway,
            encoders: encoder_processes,
            decoders: decoder_processes,
        };
        let timeout = Duration::from_secs(180);
        for process in cluster
            .encoders
            .iter_mut()
            .chain(cluster.decoders.iter_mut())
        {
            process.wait_serving("", timeout).await?;
        }
        cluster.gateway.wait_serving("readiness", timeout).await?;
        Ok(cluster)
    }
}

//! The signal chain, live: a real Prometheus (Debian's package, installed into .tools/prometheus by
//! tools/prometheus/install.sh) scrapes a three-process cluster (`kosmos encoder`, `kosmos decoder`,
//! `kosmos gateway`, demo model) and loads k8s/monitoring/rules.yaml, while `kosmos bench` drives an image-heavy burst
//! and then a text-heavy one. Then every PromQL query of the KEDA ScaledObjects (k8s/components/keda), of the HPAs
//! through the prometheus-adapter rules (k8s/components/hpa) and of the Grafana dashboard (k8s/monitoring) — read
//! from those files, not copied — runs through Prometheus's HTTP API and must return a value; the encoder pool's
//! triggers must rise on the image-heavy burst while the decoder's stay low, and the other way round on the
//! text-heavy one; every recording and alerting rule must be loaded and healthy.
//!
//! Needs the `prometheus` binary: `$PROMETHEUS`, `.tools/prometheus/usr/bin/prometheus` or `prometheus` on PATH
//! (`.ci/run` installs it). Without one the test fails, naming the installer, unless `KOSMOS_SKIP_LIVE_SIGNALS=1`
//! says to skip it. Loopback only; every process is killed when the test ends, however it ends; every wait is
//! bounded.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

#[path = "live_signals/queries.rs"]
mod queries;

use queries::{
    Query, dashboard_queries, hpa_queries, keda_queries, reads_a_series_not_exported_by_design,
    reads_external_series, yaml_documents, yaml_str,
};

/// Namespace label Prometheus attaches to every target, as the ServiceMonitors' namespace does in the cluster.
const NAMESPACE: &str = "kosmos";
/// How often Prometheus scrapes and evaluates the rules.
const SCRAPE_SECONDS: u64 = 1;

// ------------------------------------------------------------------------------------------------ processes

/// Child processes killed when the test ends, however it ends.
struct Processes(Vec<(&'static str, Child)>);

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Processes {
    /// Fails naming a process that has exited (it would never become ready).
    fn assert_running(&mut self) {
        for (name, child) in &mut self.0 {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{name} exited early: {status}");
            }
        }
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

fn quoted(text: &str) -> String {
    format!("\"{text}\"")
}

fn spawn_kosmos(service: &'static str, settings: &[String], log: &Path) -> (&'static str, Child) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kosmos"));
    command
        .arg(service)
        .current_dir(repo())
        .env("RUST_LOG", "warn")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).expect("log file")));
    for setting in settings {
        command.arg("--set").arg(setting);
    }
    let child = command
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start `kosmos {service}`: {err}"));
    (service, child)
}

/// The Prometheus binary, or None when the environment says to skip.
fn prometheus_binary() -> Option<PathBuf> {
    if std::env::var("KOSMOS_SKIP_LIVE_SIGNALS").is_ok_and(|value| value == "1") {
        eprintln!("live_signals: skipped because KOSMOS_SKIP_LIVE_SIGNALS=1");
        return None;
    }
    if let Some(path) = std::env::var_os("PROMETHEUS") {
        return Some(PathBuf::from(path));
    }
    let local = repo().join(".tools/prometheus/usr/bin/prometheus");
    if local.is_file() {
        return Some(local);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("prometheus"))
            .find(|path| path.is_file())
    });
    Some(on_path.unwrap_or_else(|| {
        panic!(
            "no prometheus binary ($PROMETHEUS, .tools/prometheus/usr/bin/prometheus or PATH): install it with \
             tools/prometheus/install.sh (as .ci/run does), or set KOSMOS_SKIP_LIVE_SIGNALS=1 to skip this test"
        )
    }))
}

// ------------------------------------------------------------------------------------------------ HTTP

/// GET over HTTP/1.0 on loopback: (status, body). Bounded by socket timeouts.
fn http_get(address: SocketAddr, path_and_query: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path_and_query} HTTP/1.0\r\nHost: {address}\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Polls `check` every 250 ms until it returns Some, for at most `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A Prometheus HTTP API client.
struct Prometheus {
    address: SocketAddr,
}

impl Prometheus {
    /// `data` of a successful API call; panics naming the query otherwise.
    fn api(&self, path: &str, what: &str) -> Value {
        let (status, body) =
            http_get(self.address, path).unwrap_or_else(|err| panic!("{what}: {err}"));
        let json: Value = serde_json::from_str(&body)
            .unwrap_or_else(|err| panic!("{what}: HTTP {status}, not JSON ({err}): {body}"));
        assert_eq!(json["status"], "success", "{what}: HTTP {status}: {body}");
        json["data"].clone()
    }

    /// An instant query at `at` (unix seconds): the result's series as (labels, value).
    fn query_at(&self, expr: &str, at: f64) -> Vec<(BTreeMap<String, String>, f64)> {
        let data = self.api(
            &format!("/api/v1/query?query={}&time={at:.3}", percent_encode(expr)),
            &format!("query `{expr}`"),
        );
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .expect("a vector")
                .iter()
                .map(|series| (labels(&series["metric"]), sample(&series["value"])))
                .collect(),
            Some("scalar") => vec![(BTreeMap::new(), sample(&data["result"]))],
            other => panic!("query `{expr}`: unexpected result type {other:?}"),
        }
    }

    /// A range query: every (series) value between `start` and `end` at `step` seconds, flattened.
    fn range_values(&self, expr: &str, start: f64, end: f64) -> Vec<f64> {
        let data = self.api(
            &format!(
                "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={SCRAPE_SECONDS}",
                percent_encode(expr)
            ),
            &format!("range query `{expr}`"),
        );
        data["result"]
            .as_array()
            .expect("a matrix")
            .iter()
            .flat_map(|series| {
                series["values"]
                    .as_array()
                    .expect("values")
                    .iter()
                    .map(sample)
            })
            .collect()
    }

    /// Values of `label` over the series of `metric` (Grafana's `label_values(metric, label)`).
    fn label_values(&self, metric: &str, label: &str) -> BTreeSet<String> {
        let data = self.api(
            &format!("/api/v1/series?match[]={}", percent_encode(metric)),
            &format!("series {metric}"),
        );
        data.as_array()
            .expect("series")
            .iter()
            .filter_map(|series| series[label].as_str().map(String::from))
            .collect()
    }
}

fn labels(metric: &Value) -> BTreeMap<String, String> {
    metric
        .as_object()
        .map(|object| {
            object
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn sample(pair: &Value) -> f64 {
    pair[1]
        .as_str()
        .and_then(|text| text.parse().ok())
        .unwrap_or(f64::NAN)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// Sends one prompt whose PNG keeps its header but loses its pixels: the gateway (which reads headers only) passes
/// it, the encoder cannot decode it and counts it in `kosmos_encoder_images_rejected_total{reason="decode"}`.
fn send_an_undecodable_image(gateway: SocketAddr) -> tonic::Code {
    use kosmos_proto::v1 as pb;
    let png =
        std::fs::read(repo().join("models/demo/heldout/images/000.png")).expect("a held-out image");
    let truncated = png[..png.len().min(120)].to_vec();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let mut client =
            kosmos_proto::v1::kosmos_client::KosmosClient::connect(format!("http://{gateway}"))
                .await
                .expect("the gateway");
        let request = pb::GenerateRequest {
            prompt: vec![
                pb::Segment {
                    kind: Some(pb::segment::Kind::Image(pb::Image {
                        data: truncated,
                        mime_type: String::new(),
                    })),
                },
                pb::Segment {
                    kind: Some(pb::segment::Kind::Text("An image of".into())),
                },
            ],
            params: None,
            grounding: false,
        };
        match tokio::time::timeout(Duration::from_secs(30), client.generate(request)).await {
            Ok(Ok(_)) => tonic::Code::Ok,
            Ok(Err(status)) => status.code(),
            Err(_) => tonic::Code::DeadlineExceeded,
        }
    })
}

// ------------------------------------------------------------------------------------------------ the test

/// Runs `kosmos bench` against the gateway, (unix start, unix end).
fn bench(gateway: SocketAddr, name: &str, args: &[&str]) -> (f64, f64) {
    let json = std::env::temp_dir().join(format!(
        "kosmos-live-signals-{}-{name}.json",
        std::process::id()
    ));
    let started = now();
    let output = Command::new(env!("CARGO_BIN_EXE_kosmos"))
        .current_dir(repo())
        .args(["bench", "--addr", &format!("http://{gateway}"), "--json"])
        .arg(&json)
        .args(args)
        .output()
        .expect("kosmos bench runs");
    let ended = now();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "kosmos bench ({name}) failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!(
        "live_signals: {name} burst, {:.1} s:\n{stdout}",
        ended - started
    );
    (started, ended)
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

#[test]
fn autoscaling_and_dashboard_queries_follow_an_image_burst_then_a_text_burst() {
    let Some(prometheus_bin) = prometheus_binary() else {
        return;
    };
    let test_started = Instant::now();
    let scratch = std::env::temp_dir().join(format!("kosmos-live-signals-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("scratch folder");
    let model = repo().join("models/demo").display().to_string();
    let (encoder, decoder, gateway) = (free_port(), free_port(), free_port());
    let metrics = [
        ("gateway", free_port()),
        ("encoder", free_port()),
        ("decoder", free_port()),
    ];
    let metrics_of = |service: &str| {
        metrics
            .iter()
            .find(|(s, _)| *s == service)
            .expect("service")
            .1
    };
    let metrics_listen = |service: &str| {
        format!(
            "metrics.listen={}",
            quoted(&metrics_of(service).to_string())
        )
    };

    let mut processes = Processes(vec![
        spawn_kosmos(
            "encoder",
            &[
                format!("model_dir={}", quoted(&model)),
                format!("server.listen={}", quoted(&encoder.to_string())),
                metrics_listen("encoder"),
            ],
            &scratch.join("encoder.log"),
        ),
        spawn_kosmos(
            "decoder",
            &[
                format!("model_dir={}", quoted(&model)),
                format!("server.listen={}", quoted(&decoder.to_string())),
                metrics_listen("decoder"),
            ],
            &scratch.join("decoder.log"),
        ),
        spawn_kosmos(
            "gateway",
            &[
                format!("model_dir={}", quoted(&model)),
                format!("server.listen={}", quoted(&gateway.to_string())),
                format!(
                    "encoder.endpoints=[{}]",
                    quoted(&format!("http://{encoder}"))
                ),
                format!(
                    "decoder.endpoints=[{}]",
                    quoted(&format!("http://{decoder}"))
                ),
                "encoder.probe_interval_seconds=0.2".into(),
                "decoder.probe_interval_seconds=0.2".into(),
                metrics_listen("gateway"),
            ],
            &scratch.join("gateway.log"),
        ),
    ]);

    // Prometheus: the three services as the ServiceMonitors name them (job kosmos-<service>, namespace label),
    // and the project's recording and alerting rules.
    let prometheus_addr = free_port();
    let rules = repo().join("k8s/monitoring/rules.yaml");
    let rules = rules.canonicalize().expect("rules.yaml");
    let mut config = format!(
        "global:\n  scrape_interval: {SCRAPE_SECONDS}s\n  scrape_timeout: {SCRAPE_SECONDS}s\n  evaluation_interval: \
         {SCRAPE_SECONDS}s\nrule_files:\n  - {}\nscrape_configs:\n",
        quoted(&rules.display().to_string())
    );
    for (service, address) in &metrics {
        config.push_str(&format!(
            "  - job_name: kosmos-{service}\n    static_configs:\n      - targets: [\"{address}\"]\n        labels: \
             {{namespace: {NAMESPACE}}}\n"
        ));
    }
    std::fs::write(scratch.join("prometheus.yml"), &config).expect("prometheus.yml");
    let prometheus_log = scratch.join("prometheus.log");
    processes.0.push((
        "prometheus",
        Command::new(&prometheus_bin)
            .arg(format!(
                "--config.file={}",
                scratch.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                scratch.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prometheus_addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(&prometheus_log).expect("log"),
            ))
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", prometheus_bin.display())),
    ));
    let prometheus = Prometheus {
        address: prometheus_addr,
    };

    // Everything up: Prometheus ready, the gateway seeing both pools, every target scraped.
    wait_for("Prometheus to be ready", Duration::from_secs(60), || {
        processes.assert_running();
        matches!(http_get(prometheus_addr, "/-/ready"), Ok((200, _))).then_some(())
    });
    wait_for(
        "the three services to be up and both pools ready",
        Duration::from_secs(180),
        || {
            processes.assert_running();
            let ready = prometheus.query_at(
                "min by (pool) (kosmos_gateway_pool_ready_replicas{job=\"kosmos-gateway\"})",
                now(),
            );
            let up = prometheus.query_at("up == 1", now());
            (up.len() == 3 && ready.len() == 2 && ready.iter().all(|(_, v)| *v >= 1.0))
                .then_some(())
        },
    );
    eprintln!(
        "live_signals: cluster and Prometheus up after {:.1} s",
        test_started.elapsed().as_secs_f64()
    );

    // Image-heavy: many large fresh images per request, one output token. Text-heavy: no image, long outputs.
    let images = bench(
        gateway,
        "image-heavy",
        &[
            "--concurrency",
            "8",
            "--duration",
            "12",
            "--images-per-request",
            "4",
            "--image-size",
            "640x480",
            "--output-tokens",
            "1",
            "--prompt-words",
            "3",
        ],
    );
    std::thread::sleep(Duration::from_secs(3 * SCRAPE_SECONDS));
    let text = bench(
        gateway,
        "text-heavy",
        &[
            "--concurrency",
            "12",
            "--duration",
            "12",
            "--images-per-request",
            "0",
            "--output-tokens",
            "48..64",
            "--prompt-words",
            "8..16",
            "--temperature",
            "1",
        ],
    );
    // A few requests the gateway refuses, so the dashboard's error panels have a non-OK status to show.
    bench(
        gateway,
        "refused",
        &["--requests", "2", "--output-tokens", "100000"],
    );
    // And an image only the encoder can refuse, for the dashboard's rejected-images panels.
    assert_eq!(
        send_an_undecodable_image(gateway),
        tonic::Code::InvalidArgument
    );
    std::thread::sleep(Duration::from_secs(3 * SCRAPE_SECONDS));

    // The KEDA triggers over each burst (its first scrape interval skipped: the load is still ramping up).
    let keda = keda_queries();
    let trigger = |scaled_object: &str, name: &str| {
        keda.get(&(scaled_object.to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("no trigger {name} on ScaledObject {scaled_object}"))
            .clone()
    };
    let encoder_calls = trigger("kosmos-encoder", "encoder-calls");
    let encoder_images = trigger("kosmos-encoder", "encoder-images");
    let decoder_calls = trigger("kosmos-decoder", "decoder-calls");
    let over = |expr: &str, (start, end): (f64, f64)| {
        let values = prometheus.range_values(expr, start + 2.0, end);
        assert!(!values.is_empty(), "no values of `{expr}` over the burst");
        values
    };
    let (enc_img, enc_images_img, dec_img) = (
        over(&encoder_calls, images),
        over(&encoder_images, images),
        over(&decoder_calls, images),
    );
    let (enc_txt, dec_txt) = (over(&encoder_calls, text), over(&decoder_calls, text));
    eprintln!(
        "live_signals: image-heavy burst: encoder-calls mean {:.1} max {:.0}, encoder-images mean {:.1} max {:.0}, \
         decoder-calls mean {:.1} max {:.0}",
        mean(&enc_img),
        max(&enc_img),
        mean(&enc_images_img),
        max(&enc_images_img),
        mean(&dec_img),
        max(&dec_img)
    );
    eprintln!(
        "live_signals: text-heavy burst: encoder-calls mean {:.1} max {:.0}, decoder-calls mean {:.1} max {:.0}",
        mean(&enc_txt),
        max(&enc_txt),
        mean(&dec_txt),
        max(&dec_txt)
    );
    // The encoder's signal rises on images and the decoder's stays well below it; the other way round on text.
    assert!(
        mean(&enc_img) >= 4.0,
        "encoder-calls did not rise on the image-heavy burst: {enc_img:?}"
    );
    assert!(
        mean(&enc_images_img) >= 4.0,
        "encoder-images did not rise: {enc_images_img:?}"
    );
    assert!(
        mean(&dec_img) * 2.0 <= mean(&enc_img),
        "decoder-calls ({dec_img:?}) not low against encoder-calls ({enc_img:?}) on the image-heavy burst"
    );
    assert!(
        mean(&dec_txt) >= 4.0,
        "decoder-calls did not rise on the text-heavy burst: {dec_txt:?}"
    );
    assert_eq!(
        max(&enc_txt),
        0.0,
        "encoder-calls moved on a burst without images: {enc_txt:?}"
    );

    // Every query returns a value now (the rate windows span the bursts).
    let at = now();
    let mut queries: Vec<Query> = keda
        .iter()
        .map(|((scaled_object, name), expr)| Query {
            source: format!("keda {scaled_object} trigger {name}"),
            expr: expr.clone(),
        })
        .collect();
    queries.extend(hpa_queries());
    queries.extend(dashboard_queries(&prometheus));
    let mut empty = Vec::new();
    let mut external = Vec::new();
    for query in &queries {
        let result = prometheus.query_at(&query.expr, at);
        if reads_external_series(&query.expr) {
            external.push(query.source.clone());
            continue;
        }
        if reads_a_series_not_exported_by_design(&query.expr) {
            assert!(
                result.is_empty(),
                "{}: pending images of the decoder pool exist now",
                query.source
            );
            continue;
        }
        // A series without recent traffic may read NaN (a quantile of no rate), as in Grafana; at least one must
        // be a number.
        if !result.iter().any(|(_, value)| value.is_finite()) {
            empty.push(format!("{}: `{}` → {result:?}", query.source, query.expr));
        }
    }
    eprintln!(
        "live_signals: {} queries ran; {} read only other exporters' series (no value expected here): {external:?}",
        queries.len(),
        external.len()
    );
    assert!(
        empty.is_empty(),
        "queries without a value:\n{}",
        empty.join("\n")
    );

    // The rules: every group of rules.yaml loaded, every rule evaluated without error, every recording rule
    // with a value.
    let rules_doc = &yaml_documents(&rules)[0];
    let groups: Vec<(String, usize)> = rules_doc["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .map(|group| {
            (
                yaml_str(group, &["name"]).expect("group name").to_string(),
                group["rules"].as_sequence().expect("rules").len(),
            )
        })
        .collect();
    let loaded = wait_for(
        "every rule to be evaluated",
        Duration::from_secs(30),
        || {
            let data = prometheus.api("/api/v1/rules", "rules");
            let groups = data["groups"].as_array().expect("groups").clone();
            let evaluated = groups.iter().all(|group| {
                group["rules"].as_array().is_some_and(|rules| {
                    rules.iter().all(|rule| {
                        rule["health"] != "unknown"
                            && !rule["lastEvaluation"]
                                .as_str()
                                .unwrap_or("0001")
                                .starts_with("0001")
                    })
                })
            });
            evaluated.then_some(groups)
        },
    );
    let mut loaded_groups: Vec<(String, usize)> = loaded
        .iter()
        .map(|group| {
            (
                group["name"].as_str().expect("name").to_string(),
                group["rules"].as_array().expect("rules").len(),
            )
        })
        .collect();
    loaded_groups.sort();
    let mut groups = groups;
    groups.sort();
    assert_eq!(
        loaded_groups, groups,
        "Prometheus loaded other rule groups than rules.yaml has"
    );
    let mut recorded = 0;
    for group in &loaded {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["name"].as_str().expect("rule name");
            assert_eq!(rule["health"], "ok", "rule {name}: {}", rule["lastError"]);
            match rule["type"].as_str() {
                Some("recording") => {
                    recorded += 1;
                    let result = prometheus.query_at(name, now());
                    assert!(!result.is_empty(), "recording rule {name} has no series");
                }
                // Every alert waits minutes (`for`) before firing: its state says nothing in a one-minute test.
                Some("alerting") => {}
                other => panic!("rule {name}: unknown type {other:?}"),
            }
        }
    }
    assert!(recorded >= 10, "only {recorded} recording rules");
    eprintln!(
        "live_signals: {} rule groups healthy; done in {:.1} s",
        loaded.len(),
        test_started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&scratch);
}

//! One trace across the three services: the gateway, an encoder and a decoder run as separate `kosmos` processes
//! that export spans over OTLP/gRPC to a receiver in this test (a tonic server implementing the OTLP trace
//! service). One `Generate` with two images, sent with a known `traceparent`, must come back as a single trace
//! whose spans come from all three services, every parent link resolving to a span of the trace (or to the
//! caller's), and whose encoder batch and decoder step spans link to the requests they carried.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kosmos_proto::v1 as pb;
use kosmos_proto::v1::kosmos_client::KosmosClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio::net::TcpListener;

/// The caller's trace and span (what a client with its own tracing would send).
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";

/// A span as received, with the service that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    /// The resource's string attributes.
    resource: HashMap<String, String>,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    links: Vec<(String, String)>,
}

#[derive(Debug, Default, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource: HashMap<String, String> = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(value) => Some((kv.key.clone(), value.clone())),
                    _ => None,
                })
                .collect();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    received.push(Received {
                        service: service.clone(),
                        resource: resource.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        links: span
                            .links
                            .iter()
                            .map(|link| (hex(&link.trace_id), hex(&link.span_id)))
                            .collect(),
                    });
                }
            }
        }
        self.spans.lock().expect("receiver lock").extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

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

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Starts `kosmos <service>` exporting spans to `otlp`; its JSON logs go to `log` (else to the test's stderr).
fn spawn(
    service: &'static str,
    otlp: SocketAddr,
    settings: &[String],
    log: Option<&Path>,
) -> (&'static str, Child) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kosmos"));
    let stderr = match log {
        Some(path) => Stdio::from(std::fs::File::create(path).expect("log file")),
        None => Stdio::inherit(),
    };
    command
        .arg(service)
        .arg("--log-json")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", "info,kosmos_gateway=debug")
        .env("POD_NAME", format!("kosmos-{service}-0"))
        .env_remove("OTEL_SERVICE_NAME")
        .stdout(Stdio::null())
        .stderr(stderr);
    for setting in settings {
        command.arg("--set").arg(setting);
    }
    (
        service,
        command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start `kosmos {service}`: {err}")),
    )
}

fn image_segment(name: &str) -> pb::Segment {
    let data = std::fs::read(repo().join("tests/fixtures/images").join(name))
        .unwrap_or_else(|err| panic!("cannot read fixture image {name}: {err}"));
    pb::Segment {
        kind: Some(pb::segment::Kind::Image(pb::Image {
            data,
            mime_type: String::new(),
        })),
    }
}

fn text_segment(text: &str) -> pb::Segment {
    pb::Segment {
        kind: Some(pb::segment::Kind::Text(text.into())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_generate_with_two_images_is_one_trace_across_all_three_services() {
    let receiver = Receiver::default();
    let otlp_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let otlp = otlp_listener.local_addr().expect("address");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
                otlp_listener,
            )),
    );

    let model = repo().join("tests/fixtures/tiny");
    let model = model.display().to_string();
    let (encoder, decoder, gateway) = (free_port(), free_port(), free_port());
    let gateway_log = std::env::temp_dir().join(format!(
        "kosmos-trace-test-gateway-{}.log",
        std::process::id()
    ));
    let metrics = "metrics.listen=\"127.0.0.1:0\"".to_string();
    let quoted = |s: &str| format!("\"{s}\"");
    let processes = Processes(vec![
        spawn(
            "encoder",
            otlp,
            &[
                format!("model_dir={}", quoted(&model)),
                format!("server.listen={}", quoted(&encoder.to_string())),
                metrics.clone(),
            ],
            None,
        ),
        spawn(
            "decoder",
            otlp,
            &[
                format!("model_dir={}", quoted(&model)),
                format!("server.listen={}", quoted(&decoder.to_string())),
                metrics.clone(),
            ],
            None,
        ),
        spawn(
            "gateway",
            otlp,
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
                metrics,
            ],
            Some(&gateway_log),
        ),
    ]);

    // The gateway answers GetModelInfo once both pools are up.
    let started = Instant::now();
    let mut client = loop {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{gateway}"))
            .expect("endpoint")
            .connect()
            .await
        {
            let mut client = KosmosClient::new(channel);
            if client
                .get_model_info(pb::GetModelInfoRequest::default())
                .await
                .is_ok()
            {
                break client;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the services did not come up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let mut request = tonic::Request::new(pb::GenerateRequest {
        prompt: vec![
            image_segment("a_gradient_48x32.png"),
            text_segment("and"),
            image_segment("b_shapes_32x64.jpg"),
            text_segment("Compare them:"),
        ],
        params: Some(pb::GenerationParams {
            max_new_tokens: 4,
            ..Default::default()
        }),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01")
            .parse()
            .expect("header"),
    );
    let response = client
        .generate(request)
        .await
        .expect("generate")
        .into_inner();
    assert_eq!(response.usage.expect("usage").completion_tokens, 4);

    // Spans arrive in batches (every 100 ms); wait until every service's part of the trace is in, including the
    // decoder's, which ends last.
    let wanted = ["kosmos-gateway", "kosmos-encoder", "kosmos-decoder"];
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans = receiver.spans.lock().expect("lock").clone();
        let services: HashSet<&str> = spans
            .iter()
            .filter(|s| s.trace_id == TRACE_ID && s.name.starts_with("kosmos."))
            .map(|s| s.service.as_str())
            .collect();
        let linked = |service: &str| {
            spans
                .iter()
                .any(|s| s.service == service && s.links.iter().any(|(trace, _)| trace == TRACE_ID))
        };
        let decoder_done = spans.iter().any(|s| {
            s.trace_id == TRACE_ID && s.service == "kosmos-decoder" && s.name == "decoder.decode"
        });
        if wanted.iter().all(|w| services.contains(w))
            && decoder_done
            && linked("kosmos-encoder")
            && linked("kosmos-decoder")
        {
            break spans;
        }
        if Instant::now() > deadline {
            panic!(
                "the trace is incomplete after 30 s; spans received: {:#?}",
                spans
                    .iter()
                    .map(|s| (&s.service, &s.name, &s.trace_id, &s.links))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(processes);
    server.abort();

    // The gateway's JSON log lines written while serving the request carry the request's trace id.
    let log = std::fs::read_to_string(&gateway_log).expect("gateway log");
    let _ = std::fs::remove_file(&gateway_log);
    let finished: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "generation finished")
        .collect();
    assert_eq!(finished.len(), 1, "gateway log:\n{log}");
    assert_eq!(finished[0]["trace_id"], TRACE_ID, "{}", finished[0]);

    let trace: Vec<&Received> = spans.iter().filter(|s| s.trace_id == TRACE_ID).collect();
    let by_id: HashMap<&str, &Received> = trace.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    let names = |service: &str| -> Vec<&str> {
        trace
            .iter()
            .filter(|s| s.service == service)
            .map(|s| s.name.as_str())
            .collect()
    };

    // Each service names itself, its version and its pod.
    for service in wanted {
        let span = trace
            .iter()
            .find(|s| s.service == service)
            .expect("a span of each service");
        assert_eq!(
            span.resource.get("service.version").map(String::as_str),
            Some(env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(
            span.resource.get("k8s.pod.name"),
            Some(&format!("{}-0", service)),
            "{service}"
        );
    }

    // The gateway's server span continues the caller's span.
    let root = trace
        .iter()
        .find(|s| s.service == "kosmos-gateway" && s.name == "kosmos.v1.Kosmos/Generate")
        .unwrap_or_else(|| {
            panic!(
                "no gateway server span; gateway spans: {:?}",
                names("kosmos-gateway")
            )
        });
    assert_eq!(root.parent_span_id, CALLER_SPAN_ID);

    // Every other span of the trace hangs off a span of the trace, whichever service sent it.
    for span in &trace {
        if span.span_id == root.span_id {
            continue;
        }
        let parent = by_id.get(span.parent_span_id.as_str()).unwrap_or_else(|| {
            panic!(
                "{} span `{}` has parent {} which is not in the trace",
                span.service, span.name, span.parent_span_id
            )
        });
        // Cross-service edges go from a gateway span to a server span of the callee.
        if parent.service != span.service {
            assert_eq!(
                parent.service, "kosmos-gateway",
                "{span:?} under {parent:?}"
            );
            assert!(
                span.name.starts_with("kosmos."),
                "{span:?} under {parent:?}"
            );
        }
    }

    // Two images: two Encode calls on the encoder (one per distinct image), one Generate on the decoder.
    let encodes = trace
        .iter()
        .filter(|s| {
            s.service == "kosmos-encoder" && s.name == "kosmos.encoder.v1.VisionEncoder/Encode"
        })
        .count();
    assert_eq!(encodes, 2, "encoder spans: {:?}", names("kosmos-encoder"));
    let generates = trace
        .iter()
        .filter(|s| s.service == "kosmos-decoder" && s.name == "kosmos.decoder.v1.Decoder/Generate")
        .count();
    assert_eq!(generates, 1, "decoder spans: {:?}", names("kosmos-decoder"));
    for stage in ["decoder.queue", "decoder.prefill", "decoder.decode"] {
        assert!(
            names("kosmos-decoder").contains(&stage),
            "no `{stage}` span; decoder spans: {:?}",
            names("kosmos-decoder")
        );
    }
    for stage in ["gateway.tokenize", "gateway.images", "gateway.encode"] {
        assert!(
            names("kosmos-gateway").contains(&stage),
            "no `{stage}` span; gateway spans: {:?}",
            names("kosmos-gateway")
        );
    }

    // The batch spans the requests rode in link back to spans of this trace.
    for service in ["kosmos-encoder", "kosmos-decoder"] {
        let links: Vec<&str> = spans
            .iter()
            .filter(|s| s.service == service)
            .flat_map(|s| &s.links)
            .filter(|(trace_id, _)| trace_id == TRACE_ID)
            .map(|(_, span_id)| span_id.as_str())
            .collect();
        assert!(!links.is_empty(), "no {service} span links to the trace");
        for span_id in links {
            let linked = by_id
                .get(span_id)
                .unwrap_or_else(|| panic!("{service} links to {span_id}, not a span of the trace"));
            assert_eq!(
                linked.service, service,
                "a batch links to its own service's request spans"
            );
        }
    }
}

/// `kosmos serve` with its default flags (only the public port is a free one) and its default log level: with
/// `OTEL_EXPORTER_OTLP_ENDPOINT` set, one Generate with an image comes back as spans of all three services
/// (exported as service `kosmos`), the log filter (`warn`) notwithstanding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kosmos_serve_exports_the_spans_of_all_three_services_at_its_default_log_level() {
    use std::io::BufRead as _;

    const SERVE_TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
    let receiver = Receiver::default();
    let otlp_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let otlp = otlp_listener.local_addr().expect("address");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
                otlp_listener,
            )),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_kosmos"))
        .current_dir(repo())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env_remove("RUST_LOG")
        .env_remove("OTEL_SERVICE_NAME")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kosmos serve starts");
    let stderr = child.stderr.take().expect("stderr");
    let _processes = Processes(vec![("serve", child)]);
    // The address is printed once everything is ready: "serving kosmos.v1.Kosmos on 127.0.0.1:PORT (…)".
    let (sender, address) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.strip_prefix("serving kosmos.v1.Kosmos on ") {
                let _ = sender.send(
                    rest.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
        }
    });
    let gateway =
        tokio::task::spawn_blocking(move || address.recv_timeout(Duration::from_secs(120)))
            .await
            .expect("reader")
            .expect("kosmos serve became ready");
    let mut client = KosmosClient::connect(format!("http://{gateway}"))
        .await
        .expect("connects");
    let image = std::fs::read(repo().join("models/demo/heldout/images/001.png")).expect("image");
    let mut request = tonic::Request::new(pb::GenerateRequest {
        prompt: vec![
            pb::Segment {
                kind: Some(pb::segment::Kind::Image(pb::Image {
                    data: image,
                    mime_type: String::new(),
                })),
            },
            text_segment("An image of"),
        ],
        params: Some(pb::GenerationParams {
            max_new_tokens: 4,
            ..Default::default()
        }),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{SERVE_TRACE_ID}-{CALLER_SPAN_ID}-01")
            .parse()
            .expect("header"),
    );
    client.generate(request).await.expect("generate");

    let wanted = [
        "kosmos.v1.Kosmos/Generate",
        "kosmos.encoder.v1.VisionEncoder/Encode",
        "kosmos.decoder.v1.Decoder/Generate",
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans = receiver.spans.lock().expect("lock").clone();
        let names: HashSet<&str> = spans
            .iter()
            .filter(|span| span.trace_id == SERVE_TRACE_ID)
            .map(|span| span.name.as_str())
            .collect();
        if wanted.iter().all(|name| names.contains(name)) {
            assert!(
                spans
                    .iter()
                    .filter(|span| span.trace_id == SERVE_TRACE_ID)
                    .all(|span| span.service == "kosmos"),
                "every span comes from the one process, service `kosmos`"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kosmos serve exported {names:?} of the trace after 30 s, wanted {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.abort();
}

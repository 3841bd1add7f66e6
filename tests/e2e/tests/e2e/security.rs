//! Safe to expose (issue 13): TLS and mTLS on every hop with rotated certificates, API keys with quotas, caches
//! partitioned by key, streams of callers that stop reading ended.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kosmos_e2e::pki::Pki;
use kosmos_e2e::{Cluster, ClusterOptions, fixture_image, image, text, tls_channel};
use kosmos_proto::v1 as pb;
use kosmos_proto::v1::kosmos_client::KosmosClient;
use sha2::Digest as _;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::{IMAGE, greedy_request};

fn short_request() -> pb::GenerateRequest {
    greedy_request(vec![text("An image of")], 2)
}

fn image_request() -> pb::GenerateRequest {
    greedy_request(vec![image(fixture_image(IMAGE)), text("An image of")], 2)
}

/// A TLS connection to `addr` trusting `pki`'s CA, with its client certificate, offering `alpn`.
async fn tls_connect(
    addr: std::net::SocketAddr,
    pki: &Pki,
    alpn: &[&[u8]],
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(pki.path("ca.pem"))? {
        roots.add(cert?)?;
    }
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(pki.path("client.pem"))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(pki.path("client.key"))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)?;
    let mut config = config;
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into()?, tcp)
        .await?)
}

/// The certificate a fresh TLS handshake with `addr` presents (trusting `pki`'s CA, with its client certificate).
async fn served_certificate(addr: std::net::SocketAddr, pki: &Pki) -> anyhow::Result<Vec<u8>> {
    let tls = tls_connect(addr, pki, &[b"h2"]).await?;
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or_else(|| anyhow::anyhow!("no certificate presented"))?;
    Ok(presented.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_every_hop_refuses_plaintext_and_anonymous_clients_and_follows_rotation()
-> anyhow::Result<()> {
    let pki = Arc::new(Pki::generate("hops")?);
    let mut gateway_overrides = pki.server_overrides();
    gateway_overrides.push("http.listen=\"127.0.0.1:0\"".into());
    let cluster = Cluster::start(ClusterOptions {
        internal_tls: Some(Arc::clone(&pki)),
        gateway_overrides,
        ..ClusterOptions::default()
    })
    .await?;
    let addr = cluster.gateway_addr;

    // The HTTP API is served over TLS too (ALPN http/1.1 for the usual clients), with the same client CA.
    let http_addr = cluster.gateway_http_addr.expect("the HTTP API");
    let tls = tls_connect(http_addr, &pki, &[b"http/1.1"]).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let request = http::Request::get(format!("https://localhost:{}/health", http_addr.port()))
        .header(http::header::HOST, "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    assert_eq!(sender.send_request(request).await?.status(), 200);
    let plaintext_http = kosmos_e2e::http::call(http_addr, "/health", None).await;
    assert!(
        plaintext_http.is_err(),
        "plaintext HTTP was served: {plaintext_http:?}"
    );

    // With a client certificate, an image request crosses all three hops over mTLS.
    let mut client = KosmosClient::new(tls_channel(addr, &pki, Some("client")).await?);
    let answer = client.generate(image_request()).await?.into_inner();
    assert!(!answer.tokens.is_empty(), "{answer:?}");

    // Plaintext to the gateway and to a pool is refused.
    let plaintext = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5));
    if let Ok(channel) = plaintext.connect().await {
        let refused = KosmosClient::new(channel).generate(short_request()).await;
        assert!(refused.is_err(), "plaintext was served: {refused:?}");
    }
    let decoder =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.decoder_addr))?;
    if let Ok(channel) = decoder.connect().await {
        let refused = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await;
        assert!(refused.is_err(), "a pool served plaintext: {refused:?}");
    }
    // TLS without a client certificate is refused (mTLS).
    let anonymous = match tls_channel(addr, &pki, None).await {
        Ok(channel) => KosmosClient::new(channel)
            .generate(short_request())
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(anonymous, "a client without a certificate was served");

    // A rotated certificate serves new handshakes without a restart.
    let before = served_certificate(addr, &pki).await?;
    let rotated = pki.issue("server", "kosmos test server (rotated)")?;
    assert_ne!(before, rotated);
    let deadline = Instant::now() + Duration::from_secs(20);
    while served_certificate(addr, &pki).await? != rotated {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the rotated certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The pools rotated too (same files), and new connections through every hop still work.
    let mut client = KosmosClient::new(tls_channel(addr, &pki, Some("client")).await?);
    client.generate(image_request()).await?;
    cluster.shutdown().await;
    Ok(())
}

fn key_entry(id: &str, secret: &str, extra: &str) -> String {
    format!(
        "[[keys]]\nid = \"{id}\"\nsha256 = \"{}\"\n{extra}\n",
        kosmos_gateway::auth::hex(&sha2::Sha256::digest(secret.as_bytes()))
    )
}

fn with_key<T>(message: T, secret: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {secret}").parse().expect("ascii"),
    );
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_authenticate_quotas_refuse_with_retry_info_and_tenants_never_share_cache()
-> anyhow::Result<()> {
    let dir = tempdir("keys")?;
    let keys_file = dir.join("api-keys.toml");
    std::fs::write(
        &keys_file,
        format!(
            "{}{}",
            key_entry("team-a", "secret-a", "requests_per_minute = 20"),
            key_entry("team-b", "secret-b", "")
        ),
    )?;
    let cluster = Cluster::start(ClusterOptions {
        gateway_overrides: vec![format!(
            "auth.api_keys_file={}",
            kosmos_runtime::config::json_string(&keys_file.display().to_string())
        )],
        ..ClusterOptions::default()
    })
    .await?;
    let mut client = cluster.client().await?;

    // No key, a wrong key, a malformed header: UNAUTHENTICATED. Health needs no key.
    let none = client.generate(short_request()).await.expect_err("no key");
    assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
    let wrong = client
        .generate(with_key(short_request(), "secret-c"))
        .await
        .expect_err("wrong key");
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .expect_err("info needs a key too");
    assert_eq!(info.code(), Code::Unauthenticated);
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.gateway_addr))?
            .connect()
            .await?;
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "readiness".into(),
        })
        .await?;
    assert_eq!(health.into_inner().status, 1, "SERVING without a key");

    // Two tenants sending the same image each miss first: neither learns what the other sent.
    let misses = || cluster.gateway().stats().cache.misses;
    let start = misses();
    client
        .generate(with_key(image_request(), "secret-a"))
        .await?;
    assert_eq!(misses(), start + 1);
    client
        .generate(with_key(image_request(), "secret-a"))
        .await?;
    assert_eq!(
        misses(),
        start + 1,
        "team-a's second request hits its own entry"
    );
    client
        .generate(with_key(image_request(), "secret-b"))
        .await?;
    assert_eq!(misses(), start + 2, "team-b misses on team-a's image");

    // team-a may send 20 requests a minute: it has used 2; 18 more pass, the next is refused with retry info.
    for _ in 0..18 {
        client
            .generate(with_key(short_request(), "secret-a"))
            .await?;
    }
    let refused = client
        .generate(with_key(short_request(), "secret-a"))
        .await
        .expect_err("over quota");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("requests_per_minute"),
        "{}",
        refused.message()
    );
    let retry = refused
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("a RetryInfo detail");
    // One request refills in 3 s at 20 per minute.
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(3),
        "{retry:?}"
    );
    // team-b is not limited by team-a's quota.
    client
        .generate(with_key(short_request(), "secret-b"))
        .await?;
    tokio::time::sleep(retry + Duration::from_millis(50)).await;
    client
        .generate(with_key(short_request(), "secret-a"))
        .await?;

    // Refusals are counted by key and reason (never by secret).
    let scrape = kosmos_testkit::metrics::parse(
        &kosmos_testkit::metrics::scrape(cluster.gateway_metrics_addr).await?,
    )?;
    let refusals = |key: &str, reason: &str| {
        kosmos_testkit::metrics::value(
            &scrape,
            "kosmos_gateway_api_key_refusals_total",
            &[("api_key", key), ("reason", reason)],
        )
    };
    assert_eq!(refusals("team-a", "requests_per_minute"), 1.0);
    assert_eq!(refusals("", "unauthenticated"), 3.0);

    // A key added to the file is accepted without a restart.
    let (secret, entry) = kosmos_gateway::auth::new_key("team-c").map_err(anyhow::Error::msg)?;
    std::fs::write(
        &keys_file,
        format!("{}{entry}", std::fs::read_to_string(&keys_file)?),
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(status) = client
        .get_model_info(with_key(pb::GetModelInfoRequest {}, &secret))
        .await
    {
        assert_eq!(status.code(), Code::Unauthenticated);
        anyhow::ensure!(Instant::now() < deadline, "the new key was never accepted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

fn tempdir(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("kosmos-e2e-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_stops_reading_loses_its_stream_and_the_decoder_its_sequence()
-> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        gateway_overrides: vec![
            "stream_buffer_messages=1".into(),
            "limits.stream_idle_timeout_seconds=0.5".into(),
        ],
        ..ClusterOptions::default()
    })
    .await?;
    // A tiny HTTP/2 window: the gateway can send only a message or two before it must wait for this client.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.gateway_addr))?
            .initial_stream_window_size(Some(64))
            .initial_connection_window_size(Some(64))
            .connect()
            .await?;
    let mut client = KosmosClient::new(channel);
    let mut stream = client
        .generate_stream(greedy_request(vec![text("An image of")], 400))
        .await?
        .into_inner();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut decoder = cluster.decoder().await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = decoder
            .info(kosmos_proto::decoder::v1::InfoRequest {})
            .await?
            .into_inner();
        let stats = cluster.gateway().stats();
        if info.kv_blocks_used == 0 && stats.requests_in_flight == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the stream still holds work: decoder {info:?}, gateway {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Reading again, the caller finds the reason instead of a finished generation.
    let mut ended = None;
    while ended.is_none() {
        match stream.message().await {
            Ok(Some(message)) => assert!(message.finish_reason == 0, "finished: {message:?}"),
            Ok(None) => anyhow::bail!("the stream ended without saying why"),
            Err(status) => ended = Some(status),
        }
    }
    let status = ended.expect("an error");
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert!(
        status.message().contains("stream_idle_timeout_seconds"),
        "{}",
        status.message()
    );
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_takes_the_same_keys_401_without_and_429_with_retry_after_over_quota()
-> anyhow::Result<()> {
    use kosmos_e2e::http::{Protocol, send};
    let dir = tempdir("http-keys")?;
    let keys_file = dir.join("api-keys.toml");
    std::fs::write(
        &keys_file,
        key_entry("team-h", "secret-h", "requests_per_minute = 2"),
    )?;
    let keys = format!(
        "auth.api_keys_file={}",
        kosmos_runtime::config::json_string(&keys_file.display().to_string())
    );
    let (cluster, addr) = crate::http_api::http_cluster(&[keys.as_str()]).await?;
    let body = serde_json::json!({"prompt": "An image of", "max_tokens": 2});
    let post = |headers: &'static [(&'static str, &'static str)]| {
        let body = body.to_string().into_bytes();
        send(
            addr,
            Protocol::Http1,
            http::Method::POST,
            "/v1/completions",
            headers,
            Some(body),
        )
    };
    let missing = post(&[]).await?;
    assert_eq!(
        missing.status.as_u16(),
        401,
        "{:?}",
        String::from_utf8_lossy(&missing.body)
    );
    assert_eq!(missing.json()?["error"]["type"], "authentication_error");
    let wrong = post(&[("authorization", "Bearer nope")]).await?;
    assert_eq!(wrong.status.as_u16(), 401);
    let models = send(
        addr,
        Protocol::Http1,
        http::Method::GET,
        "/v1/models",
        &[],
        None,
    )
    .await?;
    assert_eq!(models.status.as_u16(), 401, "model listing needs a key too");
    let health = send(
        addr,
        Protocol::Http1,
        http::Method::GET,
        "/health",
        &[],
        None,
    )
    .await?;
    assert_eq!(health.status.as_u16(), 200, "health needs no key");

    let key = &[("authorization", "Bearer secret-h")];
    post(key).await?.ok_json()?;
    post(key).await?.ok_json()?;
    let over = post(key).await?;
    assert_eq!(
        over.status.as_u16(),
        429,
        "{:?}",
        String::from_utf8_lossy(&over.body)
    );
    let message = over.json()?["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("requests_per_minute"), "{message}");
    let retry_after: u64 = over
        .headers
        .get(http::header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .expect("a Retry-After header");
    // One request refills in 30 s at 2 per minute.
    assert!((25..=31).contains(&retry_after), "{retry_after}");
    cluster.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

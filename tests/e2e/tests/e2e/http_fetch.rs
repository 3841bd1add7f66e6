//! Image URLs: fetched only when `http.fetch_urls` is on, every hop checked against `http.fetch_allow_hosts`
//! (a redirect to another host is refused), redirects bounded, the body capped at `limits.max_image_bytes`
//! (413), the number of URLs per request capped; a fetched image answers what the same bytes inline answer.

use std::net::SocketAddr;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use kosmos_e2e::fixture_image;
use kosmos_e2e::http::call;
use serde_json::json;

use crate::IMAGE;
use crate::http_api::{chat_body, data_uri, http_cluster, model_id};

fn redirect(to: String) -> axum::response::Response {
    let mut response = StatusCode::FOUND.into_response();
    if let Ok(value) = HeaderValue::from_str(&to) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// An image server on a free loopback port.
async fn image_server() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let png = fixture_image(IMAGE);
    let port = addr.port();
    let app = axum::Router::new()
        .route(
            "/img.png",
            get(move || {
                let png = png.clone();
                async move { ([(header::CONTENT_TYPE, "image/png")], png) }
            }),
        )
        .route("/hop", get(|| async { redirect("/img.png".into()) }))
        .route("/loop", get(|| async { redirect("/loop".into()) }))
        .route(
            "/away",
            get(move || async move { redirect(format!("http://localhost:{port}/img.png")) }),
        )
        .route("/big", get(|| async { vec![0u8; 50_000] }))
        // No Content-Length: the cap applies while the body streams.
        .route(
            "/chunked",
            get(|| async {
                let chunks =
                    vec![
                        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(vec![0u8; 15_000]));
                        3
                    ];
                axum::body::Body::from_stream(tokio_stream::iter(chunks))
            }),
        )
        .route("/missing", get(|| async { StatusCode::NOT_FOUND }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_urls_are_fetched_within_the_allowed_hosts_and_limits() -> anyhow::Result<()> {
    let server = image_server().await?;
    let (cluster, addr) = http_cluster(&[
        "http.fetch_urls=true",
        "http.fetch_allow_private=true",
        "http.fetch_allow_hosts=[\"127.0.0.1\"]",
        "http.fetch_max_redirects=2",
        "http.fetch_max_urls=1",
        "limits.max_image_bytes=20000",
    ])
    .await?;
    let model = model_id(addr).await?;
    let chat = |url: String| {
        let body = chat_body(&model, &url, "An image of", 6);
        async move { call(addr, "/v1/chat/completions", Some(&body)).await }
    };
    let inline = chat(data_uri(&fixture_image(IMAGE))).await?.ok_json()?;
    let content = &inline["choices"][0]["message"]["content"];
    for path in ["/img.png", "/hop"] {
        let fetched = chat(format!("http://{server}{path}")).await?.ok_json()?;
        assert_eq!(
            &fetched["choices"][0]["message"]["content"], content,
            "{path}"
        );
    }

    let refused = [
        (
            "/away",
            400,
            "`localhost` is not in `http.fetch_allow_hosts`",
        ),
        ("/loop", 400, "more than 2 redirects"),
        ("/big", 413, "limits.max_image_bytes"),
        ("/chunked", 413, "over 20000 bytes"),
        ("/missing", 400, "404"),
    ];
    for (path, status, names) in refused {
        let answer = chat(format!("http://{server}{path}")).await?;
        assert_eq!(
            answer.status.as_u16(),
            status,
            "{path}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        let message = answer.json()?["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            message.contains(names),
            "{path}: `{message}` should name {names}"
        );
        assert!(
            message.contains("`messages[0].content[0].image_url.url`"),
            "{message}"
        );
    }
    let two_urls = json!({"model": model, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": format!("http://{server}/img.png")}},
        {"type": "image_url", "image_url": {"url": format!("http://{server}/img.png")}},
        {"type": "text", "text": "x"}]}]});
    let answer = call(addr, "/v1/chat/completions", Some(&two_urls)).await?;
    assert_eq!(answer.status, 400);
    assert!(String::from_utf8_lossy(&answer.body).contains("http.fetch_max_urls"));
    cluster.shutdown().await;
    Ok(())
}

/// An image server over TLS on a free loopback port, with the certificate `pki` issued for localhost / 127.0.0.1:
/// one hand-written HTTP/1.1 answer per connection (the image; for `GET /down`, a redirect to a plain `http://`
/// URL), so the test needs no HTTP server features.
async fn tls_image_server(pki: &kosmos_e2e::pki::Pki) -> anyhow::Result<SocketAddr> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let certs =
        CertificateDer::pem_file_iter(pki.path("server.pem"))?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(pki.path("server.key"))?;
    let config = rustls::ServerConfig::builder_with_provider(kosmos_runtime::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let png = fixture_image(IMAGE);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let png = png.clone();
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(socket).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => request.extend_from_slice(&buffer[..read]),
                    }
                }
                if request.starts_with(b"GET /down ") {
                    let head = "HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:9/img.png\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.shutdown().await;
                    return;
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    png.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&png).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_image_urls_are_fetched_when_the_certificate_is_trusted() -> anyhow::Result<()> {
    let pki = kosmos_e2e::pki::Pki::generate("fetch-https")?;
    let stranger = kosmos_e2e::pki::Pki::generate("fetch-https-stranger")?;
    let server = tls_image_server(&pki).await?;
    let untrusted = tls_image_server(&stranger).await?;
    let ca_file = format!("http.fetch_ca_file=\"{}\"", pki.path("ca.pem").display());
    let (cluster, addr) = http_cluster(&[
        "http.fetch_urls=true",
        "http.fetch_allow_private=true",
        "http.fetch_allow_hosts=[\"127.0.0.1\", \"localhost\"]",
        ca_file.as_str(),
    ])
    .await?;
    let model = model_id(addr).await?;
    let chat = |url: String| {
        let body = chat_body(&model, &url, "An image of", 6);
        async move { call(addr, "/v1/chat/completions", Some(&body)).await }
    };
    let inline = chat(data_uri(&fixture_image(IMAGE))).await?.ok_json()?;
    let content = &inline["choices"][0]["message"]["content"];
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("https://{host}:{}/img.png", server.port());
        let fetched = chat(url).await?.ok_json()?;
        assert_eq!(
            &fetched["choices"][0]["message"]["content"], content,
            "{host}"
        );
    }
    // A certificate from another CA is refused by name.
    let answer = chat(format!("https://127.0.0.1:{}/img.png", untrusted.port())).await?;
    assert_eq!(answer.status.as_u16(), 400);
    let message = answer.json()?["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("`messages[0].content[0].image_url.url`"),
        "{message}"
    );
    assert!(message.contains("TLS handshake"), "{message}");
    // A redirect from https:// down to http:// is not followed.
    let answer = chat(format!("https://127.0.0.1:{}/down", server.port())).await?;
    assert_eq!(answer.status.as_u16(), 400);
    let message = answer.json()?["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("from https:// to http://"), "{message}");
    cluster.shutdown().await;
    Ok(())
}

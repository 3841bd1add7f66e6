//! A small HTTP client for the gateway's OpenAI-compatible API: one request per connection (HTTP/1.1, or HTTP/2
//! with prior knowledge), the whole body read, server-sent events split into their `data:` payloads.

use std::net::SocketAddr;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A whole HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    /// The status.
    pub status: http::StatusCode,
    /// The headers.
    pub headers: http::HeaderMap,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpAnswer {
    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "not JSON ({}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as JSON, or an error with the body when the status is not 200.
    pub fn ok_json(&self) -> anyhow::Result<serde_json::Value> {
        anyhow::ensure!(
            self.status == http::StatusCode::OK,
            "{}: {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        self.json()
    }

    /// The `data:` payload of every server-sent event, in order; an error if a non-empty line of the stream is
    /// neither `data: …` nor a comment.
    pub fn sse_data(&self) -> anyhow::Result<Vec<String>> {
        let text = std::str::from_utf8(&self.body)?;
        let mut events = Vec::new();
        for block in text.split("\n\n") {
            for line in block.lines() {
                if let Some(data) = line.strip_prefix("data: ") {
                    events.push(data.to_string());
                } else if !line.is_empty() && !line.starts_with(':') {
                    anyhow::bail!("not an SSE data line: {line:?}");
                }
            }
        }
        Ok(events)
    }
}

/// Which protocol to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 over cleartext, prior knowledge.
    Http2,
}

/// Sends one request: `POST` with `json` as the body when given, `GET` otherwise.
pub async fn call(
    addr: SocketAddr,
    path: &str,
    json: Option<&serde_json::Value>,
) -> anyhow::Result<HttpAnswer> {
    let body = json.map(|json| json.to_string().into_bytes());
    send(addr, Protocol::Http1, method_for(&body), path, &[], body).await
}

fn method_for(body: &Option<Vec<u8>>) -> http::Method {
    if body.is_some() {
        http::Method::POST
    } else {
        http::Method::GET
    }
}

/// Sends one request with every detail chosen.
pub async fn send(
    addr: SocketAddr,
    protocol: Protocol,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> anyhow::Result<HttpAnswer> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header(http::header::CONTENT_TYPE, "application/json");
    if protocol == Protocol::Http1 {
        request = request.header(http::header::HOST, addr.to_string());
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let response = match protocol {
        Protocol::Http1 => {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            sender.send_request(request).await?
        }
        Protocol::Http2 => {
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await?;
            tokio::spawn(connection);
            sender.send_request(request).await?
        }
    };
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await?.to_bytes().to_vec();
    Ok(HttpAnswer {
        status,
        headers,
        body,
    })
}

//! `kosmos ask|caption|score`: small clients of the public API (`kosmos.v1.Kosmos`).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use kosmos_proto::v1 as pb;
use kosmos_proto::v1::kosmos_client::KosmosClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A client of the public API that sends the API key, if any, with every call.
pub(crate) type Client = KosmosClient<InterceptedService<Channel, ApiKey>>;

/// Adds `authorization: Bearer <key>` to every call when a key is set.
#[derive(Debug, Clone)]
pub(crate) struct ApiKey(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for ApiKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Largest message the clients send or accept.
const MAX_MESSAGE_BYTES: usize = 96 << 20;

/// Where the gateway is.
#[derive(Debug, Args)]
pub struct Connection {
    /// Gateway address.
    #[arg(
        long,
        value_name = "URL",
        default_value = "http://127.0.0.1:50051",
        env = "KOSMOS_ADDR"
    )]
    addr: String,
    /// API key of a gateway that requires one (sent as `authorization: Bearer <key>`).
    #[arg(
        long,
        value_name = "KEY",
        env = "KOSMOS_API_KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// PEM CA that signed the gateway's certificate, for an `https://` address.
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// PEM client certificate (with --client-key) for a gateway that requires mTLS.
    #[arg(long, value_name = "FILE", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    client_key: Option<PathBuf>,
}

impl Connection {
    /// The gateway's URI (`http://` added to a bare `host:port`).
    pub(crate) fn uri(&self) -> String {
        if self.addr.contains("://") {
            self.addr.clone()
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// A client of the gateway's public API.
    pub(crate) async fn client(&self) -> anyhow::Result<Client> {
        let uri = self.uri();
        let mut endpoint = tonic::transport::Endpoint::from_shared(uri.clone())?;
        if uri.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            if let Some(ca) = &self.ca_cert {
                let pem =
                    std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
                let read = |path: &PathBuf| {
                    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
                };
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    read(cert)?,
                    read(key)?,
                ));
            }
            endpoint = endpoint.tls_config(tls)?;
        }
        let key = match &self.api_key {
            Some(key) => Some(
                format!("Bearer {key}")
                    .parse()
                    .context("--api-key must be printable ASCII")?,
            ),
            None => None,
        };
        let channel = endpoint.connect().await.with_context(|| {
            format!("cannot reach the gateway at {uri} (is `kosmos serve` running?)")
        })?;
        Ok(KosmosClient::with_interceptor(channel, ApiKey(key))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}

/// Generation flags shared by `ask` and `caption`.
#[derive(Debug, Args)]
pub struct Generation {
    /// Most tokens to generate (0: the server's default).
    #[arg(long, default_value_t = 0)]
    max_new_tokens: u32,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Never repeat an n-gram of this size (0: off, as the demo model's generation_config.json; the released
    /// Kosmos-2 checkpoints use 3).
    #[arg(long, default_value_t = 0)]
    no_repeat_ngram_size: u32,
    /// Ground the phrases of the answer in the image and print the boxes.
    #[arg(long)]
    grounding: bool,
}

impl Generation {
    fn params(&self) -> pb::GenerationParams {
        pb::GenerationParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            ..Default::default()
        }
    }
}

/// Flags of `kosmos ask`.
#[derive(Debug, Args)]
pub struct AskArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(flatten)]
    generation: Generation,
    /// An image the question is about (JPEG, PNG or WebP); repeatable, images come before the question.
    #[arg(long, value_name = "FILE")]
    image: Vec<PathBuf>,
    /// The question or the text to continue.
    question: String,
}

/// Flags of `kosmos caption`.
#[derive(Debug, Args)]
pub struct CaptionArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(flatten)]
    generation: Generation,
    /// The text the caption continues.
    #[arg(long, default_value = "An image of")]
    prompt: String,
    /// The images to caption.
    #[arg(required = true, value_name = "FILE")]
    images: Vec<PathBuf>,
}

/// Flags of `kosmos score`.
#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    connection: Connection,
    /// An image the prompt is about; repeatable.
    #[arg(long, value_name = "FILE")]
    image: Vec<PathBuf>,
    /// The candidate continuations, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    candidates: Vec<String>,
    /// The prompt the candidates continue.
    prompt: String,
}

fn image_segment(path: &Path) -> anyhow::Result<pb::Segment> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(image_bytes_segment(data))
}

/// An image segment (format detected from the bytes).
pub(crate) fn image_bytes_segment(data: Vec<u8>) -> pb::Segment {
    pb::Segment {
        kind: Some(pb::segment::Kind::Image(pb::Image {
            data,
            mime_type: String::new(),
        })),
    }
}

/// A text segment.
pub(crate) fn text_segment(text: &str) -> pb::Segment {
    pb::Segment {
        kind: Some(pb::segment::Kind::Text(text.to_string())),
    }
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

fn print_entities(entities: &[pb::Entity], clean_text: &str) {
    if !clean_text.is_empty() {
        println!("grounded: {clean_text}");
    }
    for entity in entities {
        let boxes: Vec<String> = entity
            .boxes
            .iter()
            .map(|b| format!("[{:.3}, {:.3}, {:.3}, {:.3}]", b.x1, b.y1, b.x2, b.y2))
            .collect();
        println!("  {:?} → {}", entity.phrase, boxes.join(" "));
    }
}

/// Kosmos-2.5 `<ocr>` lines, with their boxes in the image's pixels.
fn print_lines(lines: &[pb::TextLine]) {
    if !lines.is_empty() {
        println!("lines:");
    }
    for line in lines {
        match &line.box_px {
            Some(b) => println!(
                "  [{:.0}, {:.0}, {:.0}, {:.0}] {:?}",
                b.x1, b.y1, b.x2, b.y2, line.text
            ),
            None => println!("  (no box) {:?}", line.text),
        }
    }
}

/// A prompt of the images at `paths`, then `text`.
fn images_then_text(paths: &[PathBuf], text: &str) -> anyhow::Result<Vec<pb::Segment>> {
    let mut prompt = paths
        .iter()
        .map(|path| image_segment(path))
        .collect::<anyhow::Result<Vec<_>>>()?;
    prompt.push(text_segment(text));
    Ok(prompt)
}

/// Streams the answer to a question.
pub async fn ask(args: AskArgs) -> anyhow::Result<()> {
    let mut client = args.connection.client().await?;
    let prompt = images_then_text(&args.image, &args.question)?;
    let request = pb::GenerateRequest {
        prompt,
        params: Some(args.generation.params()),
        grounding: args.generation.grounding,
    };
    let mut stream = client
        .generate_stream(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut stdout = std::io::stdout();
    let mut lines = Vec::new();
    while let Some(message) = stream.message().await.map_err(status_error)? {
        write!(stdout, "{}", message.text)?;
        stdout.flush()?;
        lines.extend(message.lines);
        if message.finish_reason != pb::FinishReason::Unspecified as i32 {
            writeln!(stdout)?;
            print_entities(&message.entities, &message.clean_text);
            print_lines(&lines);
            if let (Some(usage), Some(timings)) = (message.usage, message.timings) {
                eprintln!(
                    "({} prompt + {} generated tokens, first token after {:.0} ms, {:.0} ms in all, finish: {:?})",
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    timings.time_to_first_token_seconds * 1000.0,
                    timings.total_seconds * 1000.0,
                    pb::FinishReason::try_from(message.finish_reason).unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

/// Captions each image.
pub async fn caption(args: CaptionArgs) -> anyhow::Result<()> {
    let mut client = args.connection.client().await?;
    for path in &args.images {
        let request = pb::GenerateRequest {
            prompt: vec![image_segment(path)?, text_segment(&args.prompt)],
            params: Some(args.generation.params()),
            grounding: args.generation.grounding,
        };
        let response = client
            .generate(request)
            .await
            .map_err(status_error)?
            .into_inner();
        println!(
            "{}: {} {}",
            path.display(),
            args.prompt,
            response.text.trim()
        );
        print_entities(&response.entities, &response.clean_text);
        print_lines(&response.lines);
    }
    Ok(())
}

/// Scores the candidates and prints them best first.
pub async fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let mut client = args.connection.client().await?;
    let prompt = images_then_text(&args.image, &args.prompt)?;
    let candidates: Vec<String> = args
        .candidates
        .iter()
        .map(|c| c.trim().to_string())
        .collect();
    let response = client
        .score(pb::ScoreRequest { prompt, candidates })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut scores = response.scores;
    scores.sort_by(|a, b| b.mean_logprob.total_cmp(&a.mean_logprob));
    println!("{:>10} {:>10} {:>7}  candidate", "mean", "sum", "tokens");
    for score in scores {
        println!(
            "{:>10.4} {:>10.4} {:>7}  {}",
            score.mean_logprob,
            score.sum_logprob,
            score.token_ids.len(),
            score.candidate
        );
    }
    Ok(())
}

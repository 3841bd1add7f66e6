//! Sends a run's requests (open loop at Poisson arrivals, or closed loop with N clients) and times each one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use kosmos_proto::v1 as pb;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinSet;

use super::schema::{Load, RequestRecord};
use super::stats::Slo;
use super::workload::{PreparedRequest, Workload};

/// Which RPC each request calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `GenerateStream`: TTFT, TPOT and ITL are measured from the stream.
    GenerateStream,
    /// `Score`: one response, end-to-end latency only.
    Score,
}

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bound {
    /// After this many requests.
    Requests(u64),
    /// No request starts after this long; those in flight complete.
    Duration(Duration),
}

/// What a run needs besides the workload.
#[derive(Debug, Clone)]
pub struct RunParams {
    /// The load.
    pub load: Load,
    /// When it ends.
    pub bound: Bound,
    /// The RPC.
    pub mode: Mode,
    /// Sampling temperature.
    pub temperature: f32,
    /// Client-side deadline of a request.
    pub timeout: Duration,
    /// Goodput's objectives.
    pub slo: Slo,
    /// Seed of the arrival times.
    pub seed: u64,
    /// Which run of the invocation this is (fresh images differ per run).
    pub run: u32,
}

/// Every request of a run, sorted by index, and the run's wall time (first send to last completion), seconds.
/// Records' `sent_ms` count from the run's start, once its requests are built.
pub async fn run(
    client: crate::client::Client,
    workload: Arc<Workload>,
    params: &RunParams,
    progress: &ProgressBar,
) -> anyhow::Result<(Vec<RequestRecord>, f64)> {
    let mut records = match params.load {
        Load::Poisson { rate } => open_loop(client, workload, params, rate, progress).await?,
        Load::Concurrency { concurrency } => {
            closed_loop(client, workload, params, concurrency, progress).await?
        }
    };
    let duration = records
        .iter()
        .map(|record| (record.sent_ms + record.e2e_ms) / 1000.0)
        .fold(0.0, f64::max)
        - records
            .iter()
            .map(|record| record.sent_ms / 1000.0)
            .fold(f64::INFINITY, f64::min);
    records.sort_by_key(|record| record.index);
    Ok((records, duration.max(0.0)))
}

/// Arrival offsets of a Poisson process (exponential gaps) of `rate` requests/s, seeded; all zero for no rate.
pub fn arrivals(seed: u64, rate: Option<f64>, bound: Bound) -> anyhow::Result<Vec<Duration>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4152_5249_5641_4C53);
    let mut offsets = Vec::new();
    let mut at = 0.0f64;
    match (rate, bound) {
        (None, Bound::Requests(count)) => offsets.resize(count as usize, Duration::ZERO),
        (None, Bound::Duration(_)) => {
            anyhow::bail!(
                "--rate inf sends every request at once: bound it with --requests, not --duration"
            )
        }
        (Some(rate), bound) => loop {
            let gap = -(1.0 - rng.random::<f64>()).ln() / rate;
            let next = Duration::from_secs_f64(at);
            match bound {
                Bound::Requests(count) if offsets.len() as u64 >= count => break,
                Bound::Duration(limit) if next >= limit => break,
                _ => offsets.push(next),
            }
            at += gap;
        },
    }
    Ok(offsets)
}

async fn open_loop(
    client: crate::client::Client,
    workload: Arc<Workload>,
    params: &RunParams,
    rate: Option<f64>,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<RequestRecord>> {
    let offsets = arrivals(params.seed, rate, params.bound)?;
    progress.set_length(offsets.len() as u64);
    // Requests are built before the clock starts: encoding images must not delay arrivals.
    let prepared = prepare_all(&workload, params.run, offsets.len() as u64).await?;
    let mut tasks = JoinSet::new();
    let start = tokio::time::Instant::now();
    let started = Instant::now();
    for (request, offset) in prepared.into_iter().zip(offsets) {
        tokio::time::sleep_until(start + offset).await;
        let lag = started.elapsed().saturating_sub(offset);
        let client = client.clone();
        let params = params.clone();
        let progress = progress.clone();
        tasks.spawn(async move {
            let record = execute(client, request, &params, started, lag).await;
            progress.inc(1);
            record
        });
    }
    let mut records = Vec::with_capacity(tasks.len());
    while let Some(joined) = tasks.join_next().await {
        records.push(joined?);
    }
    Ok(records)
}

async fn closed_loop(
    client: crate::client::Client,
    workload: Arc<Workload>,
    params: &RunParams,
    concurrency: u32,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<RequestRecord>> {
    anyhow::ensure!(concurrency >= 1, "--concurrency must be at least 1");
    // With a count, requests are built before the clock starts; with a duration, each client builds its next
    // request before sending it (outside the request's own timings).
    let prepared: Arc<Vec<PreparedRequest>> = Arc::new(match params.bound {
        Bound::Requests(count) => {
            progress.set_length(count);
            prepare_all(&workload, params.run, count).await?
        }
        Bound::Duration(_) => Vec::new(),
    });
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut clients = JoinSet::new();
    for _ in 0..concurrency {
        let (client, workload, prepared, next) = (
            client.clone(),
            workload.clone(),
            prepared.clone(),
            next.clone(),
        );
        let params = params.clone();
        let progress = progress.clone();
        clients.spawn(async move {
            let mut records = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let request = match params.bound {
                    Bound::Requests(count) if index >= count => break,
                    Bound::Requests(_) => prepared[index as usize].clone(),
                    Bound::Duration(limit) if started.elapsed() >= limit => break,
                    Bound::Duration(_) => {
                        let workload = workload.clone();
                        let run = params.run;
                        tokio::task::spawn_blocking(move || workload.request(run, index)).await??
                    }
                };
                records
                    .push(execute(client.clone(), request, &params, started, Duration::ZERO).await);
                progress.inc(1);
            }
            anyhow::Ok(records)
        });
    }
    let mut records = Vec::new();
    while let Some(joined) = clients.join_next().await {
        records.extend(joined??);
    }
    Ok(records)
}

async fn prepare_all(
    workload: &Arc<Workload>,
    run: u32,
    count: u64,
) -> anyhow::Result<Vec<PreparedRequest>> {
    let workload = workload.clone();
    tokio::task::spawn_blocking(move || {
        (0..count)
            .map(|index| workload.request(run, index))
            .collect()
    })
    .await?
}

/// What one call produced, before it becomes a record.
#[derive(Debug, Default)]
struct Observed {
    /// Arrival of each message carrying tokens, from the send.
    token_messages: Vec<Duration>,
    output_tokens: u32,
    prompt_tokens: Option<u32>,
    finish_reason: Option<String>,
}

/// Sends one request and times it; never fails: a failed call is a record with its status code.
async fn execute(
    mut client: crate::client::Client,
    request: PreparedRequest,
    params: &RunParams,
    started: Instant,
    send_lag: Duration,
) -> RequestRecord {
    let sent = Instant::now();
    let call = async {
        match params.mode {
            Mode::GenerateStream => {
                generate_stream(&mut client, &request, params.temperature, sent).await
            }
            Mode::Score => score(&mut client, &request).await,
        }
    };
    let outcome = match tokio::time::timeout(params.timeout, call).await {
        Ok(outcome) => outcome,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no complete answer within the client deadline of {:.1} s",
            params.timeout.as_secs_f64()
        ))),
    };
    let e2e_ms = millis(sent.elapsed());
    let mut record = RequestRecord {
        index: request.index,
        sent_ms: millis(sent.duration_since(started)),
        send_lag_ms: millis(send_lag),
        status: "OK".into(),
        error: None,
        images: request.images,
        image_bytes: request.image_bytes,
        reused_images: request.reused_images,
        prompt_words: request.prompt_words,
        max_new_tokens: match params.mode {
            Mode::GenerateStream => request.max_new_tokens,
            Mode::Score => 0,
        },
        prompt_tokens: None,
        output_tokens: 0,
        finish_reason: None,
        ttft_ms: None,
        tpot_ms: None,
        itl_ms: Vec::new(),
        e2e_ms,
        good: false,
    };
    match outcome {
        Ok(observed) => {
            record.prompt_tokens = observed.prompt_tokens;
            record.output_tokens = observed.output_tokens;
            record.finish_reason = observed.finish_reason;
            record.ttft_ms = observed.token_messages.first().copied().map(millis);
            record.itl_ms = observed
                .token_messages
                .windows(2)
                .map(|pair| millis(pair[1] - pair[0]))
                .collect();
            if let Some(ttft) = record.ttft_ms
                && observed.output_tokens >= 2
            {
                record.tpot_ms = Some((e2e_ms - ttft) / f64::from(observed.output_tokens - 1));
            }
            record.good = params.slo.met_by(&record);
        }
        Err(status) => {
            record.status = code_name(status.code()).into();
            record.error = Some(status.message().to_string());
        }
    }
    record
}

async fn generate_stream(
    client: &mut crate::client::Client,
    request: &PreparedRequest,
    temperature: f32,
    sent: Instant,
) -> Result<Observed, tonic::Status> {
    let message = pb::GenerateRequest {
        prompt: request.prompt.clone(),
        params: Some(pb::GenerationParams {
            max_new_tokens: request.max_new_tokens,
            temperature,
            seed: request.index + 1,
            ..Default::default()
        }),
        grounding: false,
    };
    let mut stream = client.generate_stream(message).await?.into_inner();
    let mut observed = Observed::default();
    let mut streamed_tokens = 0u32;
    while let Some(message) = stream.message().await? {
        if !message.tokens.is_empty() {
            observed.token_messages.push(sent.elapsed());
            streamed_tokens += message.tokens.len() as u32;
        }
        if let Some(usage) = message.usage {
            observed.prompt_tokens = Some(usage.prompt_tokens);
            observed.output_tokens = usage.completion_tokens;
        }
        if message.finish_reason != pb::FinishReason::Unspecified as i32 {
            observed.finish_reason = Some(finish_reason_name(message.finish_reason).into());
        }
    }
    if observed.prompt_tokens.is_none() {
        observed.output_tokens = streamed_tokens;
    }
    Ok(observed)
}

async fn score(
    client: &mut crate::client::Client,
    request: &PreparedRequest,
) -> Result<Observed, tonic::Status> {
    let response = client
        .score(pb::ScoreRequest {
            prompt: request.prompt.clone(),
            candidates: request.candidates.clone(),
        })
        .await?
        .into_inner();
    Ok(Observed {
        prompt_tokens: Some(response.prompt_token_ids.len() as u32),
        ..Observed::default()
    })
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn finish_reason_name(value: i32) -> &'static str {
    match pb::FinishReason::try_from(value) {
        Ok(pb::FinishReason::Length) => "LENGTH",
        Ok(pb::FinishReason::Eos) => "EOS",
        Ok(pb::FinishReason::StopSequence) => "STOP_SEQUENCE",
        Ok(pb::FinishReason::ContextLength) => "CONTEXT_LENGTH",
        Ok(pb::FinishReason::Unspecified) | Err(_) => "UNSPECIFIED",
    }
}

/// The gRPC name of a status code (`RESOURCE_EXHAUSTED`), as `rpc_response_status_code` spells it.
pub fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_arrivals_are_seeded_and_average_the_rate() {
        let a = arrivals(3, Some(50.0), Bound::Requests(2000)).expect("a test value");
        assert_eq!(
            a,
            arrivals(3, Some(50.0), Bound::Requests(2000)).expect("a test value")
        );
        assert_ne!(
            a,
            arrivals(4, Some(50.0), Bound::Requests(2000)).expect("a test value")
        );
        assert_eq!(a.len(), 2000);
        assert_eq!(a[0], Duration::ZERO);
        assert!(a.windows(2).all(|pair| pair[0] <= pair[1]));
        // 1999 gaps of mean 20 ms: the mean is within 10% (about 4.5 standard errors).
        let mean_gap = a[1999].as_secs_f64() / 1999.0;
        assert!((mean_gap - 0.02).abs() < 0.002, "mean gap {mean_gap}");
    }

    #[test]
    fn a_duration_bounds_the_arrivals_and_inf_sends_all_at_once() {
        let within =
            arrivals(1, Some(10.0), Bound::Duration(Duration::from_secs(5))).expect("a test value");
        assert!(within.iter().all(|offset| *offset < Duration::from_secs(5)));
        assert!(
            (25..=80).contains(&within.len()),
            "{} arrivals",
            within.len()
        );
        assert_eq!(
            arrivals(1, None, Bound::Requests(3)).expect("a test value"),
            vec![Duration::ZERO; 3]
        );
        assert!(arrivals(1, None, Bound::Duration(Duration::from_secs(1))).is_err());
    }

    #[test]
    fn code_names_match_the_grpc_spelling() {
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
        assert_eq!(
            code_name(tonic::Code::DeadlineExceeded),
            "DEADLINE_EXCEEDED"
        );
    }
}

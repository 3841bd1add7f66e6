//! Requests that end early and the service's own life: cancellation frees slots and KV, a full queue answers
//! RESOURCE_EXHAUSTED, deadlines answer DEADLINE_EXCEEDED, readiness follows the engine and shutdown drains.

use std::time::{Duration, Instant};

use kosmos_decoder::engine::{GenerateJob, Prompt, StoppingRule};
use kosmos_decoder::sampling::SamplingParams;
use kosmos_proto::decoder::v1 as pb;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common::{generate, greedy, pseudo_random_ids, request, start, tokens_segment};

/// A greedy request that would run to the end of the context (512 positions) unless stopped.
fn long_request() -> pb::GenerateRequest {
    request(
        vec![tokens_segment(&pseudo_random_ids(1, 8))],
        greedy(0),
        0,
        true,
    )
}

fn short_request(seed: u64) -> pb::GenerateRequest {
    request(
        vec![tokens_segment(&pseudo_random_ids(seed, 5))],
        greedy(0),
        5,
        true,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_stream_frees_its_slot_and_kv_and_the_queue_drains() {
    let server = start(&[
        "scheduler.max_running_sequences=1",
        "scheduler.stream_buffer_messages=1",
    ])
    .await;
    let mut slow = server.slow_reader_client().await;
    let mut long = slow
        .generate(long_request())
        .await
        .expect("starts")
        .into_inner();
    let first = long
        .message()
        .await
        .expect("first message")
        .expect("not ended");
    assert!(!first.tokens.is_empty());

    let mut client = server.client().await;
    let queued = tokio::spawn(async move { generate(&mut client, short_request(2)).await });
    let busy = server
        .wait_for_info("one running and one waiting", |info| {
            info.running_sequences == 1 && info.waiting_requests == 1
        })
        .await;
    // The long request is paused (its client does not read), so it has written only a few rows, and holds just
    // the blocks those rows fill: memory, not a reservation of its whole length.
    assert!(
        busy.kv_tokens_cached > 0 && busy.kv_tokens_cached < 256,
        "{busy:?}"
    );
    let block = u64::from(busy.kv_block_size);
    assert_eq!(busy.kv_blocks_used, busy.kv_tokens_cached.div_ceil(block));
    assert_eq!(busy.kv_tokens_in_use, busy.kv_blocks_used * block);
    assert_eq!(busy.kv_token_budget, busy.kv_blocks_total * block);
    assert!(
        (busy.kv_usage_ratio - busy.kv_blocks_used as f64 / busy.kv_blocks_total as f64).abs()
            < 1e-9
    );

    drop(long);
    let queued = queued
        .await
        .expect("task")
        .expect("the queued request runs once the slot is free");
    assert_eq!(queued.ids().len(), 5);
    let idle = server
        .wait_for_info("an idle engine", |info| {
            info.running_sequences == 0 && info.waiting_requests == 0 && info.kv_tokens_in_use == 0
        })
        .await;
    assert_eq!(idle.cancelled_total, 1);
    assert_eq!(idle.kv_tokens_cached, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_resource_exhausted_and_recovers() {
    let server = start(&[
        "scheduler.max_running_sequences=1",
        "scheduler.max_waiting_requests=1",
        "scheduler.stream_buffer_messages=1",
    ])
    .await;
    let mut slow = server.slow_reader_client().await;
    let mut long = slow
        .generate(long_request())
        .await
        .expect("starts")
        .into_inner();
    long.message().await.expect("first message");
    let mut client = server.client().await;
    let queued = tokio::spawn(async move { generate(&mut client, short_request(3)).await });
    server
        .wait_for_info("one waiting", |info| info.waiting_requests == 1)
        .await;

    let mut client = server.client().await;
    let refused = client
        .generate(short_request(4))
        .await
        .expect_err("queue is full");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("max_waiting_requests"),
        "{}",
        refused.message()
    );
    let refused = client
        .score(pb::ScoreRequest {
            tenant: String::new(),
            context: vec![tokens_segment(&[7, 8, 9])],
            candidates: vec![pb::Candidate { ids: vec![10] }],
        })
        .await
        .expect_err("queue is full");
    assert_eq!(refused.code(), Code::ResourceExhausted);

    drop(long);
    queued
        .await
        .expect("task")
        .expect("the queued request completes");
    let again = generate(&mut client, short_request(4))
        .await
        .expect("accepted once the queue drained");
    assert_eq!(again.ids().len(), 5);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_deadline_answers_deadline_exceeded() {
    let server = start(&[
        "scheduler.max_running_sequences=1",
        "scheduler.stream_buffer_messages=1",
    ])
    .await;
    let mut slow = server.slow_reader_client().await;
    let mut long = slow
        .generate(long_request())
        .await
        .expect("starts")
        .into_inner();
    long.message().await.expect("first message");

    // Both wait behind the paused request until their deadline passes.
    let mut client = server.client().await;
    let mut timed = tonic::Request::new(short_request(5));
    timed.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let mut stream = client.generate(timed).await.expect("accepted").into_inner();
    let error = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error:?}");
    assert!(started.elapsed() >= Duration::from_millis(250));

    let mut timed = tonic::Request::new(pb::ScoreRequest {
        tenant: String::new(),
        context: vec![tokens_segment(&[7, 8, 9])],
        candidates: vec![pb::Candidate { ids: vec![10, 11] }],
    });
    timed.set_timeout(Duration::from_millis(200));
    let error = client.score(timed).await.expect_err("deadline passes");
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error:?}");

    // The running request's own deadline removes it and frees its KV even though its client never reads.
    drop(long);
    let mut timed = tonic::Request::new(long_request());
    timed.set_timeout(Duration::from_millis(300));
    let mut paused = slow.generate(timed).await.expect("starts").into_inner();
    paused.message().await.expect("first message");
    let idle = server
        .wait_for_info("the expired requests removed", |info| {
            info.running_sequences == 0 && info.waiting_requests == 0 && info.kv_tokens_in_use == 0
        })
        .await;
    assert!(idle.cancelled_total >= 3, "{idle:?}");
    drop(paused);
    server.stop().await;
}

/// A greedy job of 6 prompt tokens (from `seed`) that would generate 400 tokens.
fn long_job(seed: u64) -> GenerateJob {
    GenerateJob {
        tenant: String::new(),
        resume: Default::default(),
        prompt: Prompt {
            ids: pseudo_random_ids(seed, 6),
            image_mask: vec![false; 6],
            ..Prompt::default()
        },
        sampling: SamplingParams::default(),
        stopping: StoppingRule {
            max_new_tokens: 400,
            limit_reason: kosmos_decoder::engine::FinishReason::Length,
            stop_token_ids: Vec::new(),
            eos_token_id: None,
        },
        deadline: None,
        arrived: Instant::now(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_sequence_holds_its_kv_until_its_receiver_is_dropped() {
    let server = start(&["scheduler.stream_buffer_messages=1"]).await;
    let events = server.engine.generate(long_job(8)).expect("queued");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let paused = server.engine.snapshot();
    assert_eq!(paused.running, 1);
    // It holds the blocks of the rows it wrote, not a reservation of 406 positions.
    assert!(paused.kv_blocks_used > 0, "{paused:?}");
    assert_eq!(
        paused.kv_blocks_used,
        paused.kv_tokens_cached.div_ceil(paused.kv_block_size)
    );
    // One message in the channel and one coalesced behind it: a handful of tokens, not 400.
    assert!(paused.generated_tokens_total <= 4, "{paused:?}");
    drop(events);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.engine.snapshot().kv_blocks_used != 0 {
        assert!(
            Instant::now() < deadline,
            "kv never freed: {:?}",
            server.engine.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(server.engine.snapshot().cancelled_total, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_whose_client_stops_reading_is_dropped_after_the_paused_timeout() {
    let server = start(&[
        "scheduler.stream_buffer_messages=1",
        "scheduler.paused_timeout_seconds=0.5",
    ])
    .await;
    // The receiver is kept but never read: the sequence pauses, then is dropped.
    let mut events = server.engine.generate(long_job(9)).expect("queued");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let snapshot = server.engine.snapshot();
        if snapshot.running == 0 && snapshot.kv_blocks_used == 0 && snapshot.cancelled_total == 1 {
            assert!(snapshot.generated_tokens_total <= 4, "{snapshot:?}");
            break;
        }
        assert!(Instant::now() < deadline, "never dropped: {snapshot:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // What the client finds when it reads again: the buffered tokens, then the end without a finish.
    let mut finished = false;
    while let Some(event) = events.recv().await {
        if let Ok(update) = event {
            finished |= update.finish.is_some();
        }
    }
    assert!(!finished, "an abandoned sequence must not report a finish");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_engine_and_shutdown_drains_in_flight_streams() {
    let server = start(&[]).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connects");
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    loop {
        let status = watch.message().await.expect("status").expect("open");
        if status.status == ServingStatus::Serving as i32 {
            break;
        }
    }
    let overall = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("check")
        .into_inner();
    assert_eq!(overall.status, ServingStatus::Serving as i32);

    let mut client = server.client().await;
    let mut stream = client
        .generate(request(
            vec![tokens_segment(&pseudo_random_ids(9, 5))],
            greedy(0),
            60,
            true,
        ))
        .await
        .expect("starts")
        .into_inner();
    let first = stream.message().await.expect("first").expect("open");
    server.shutdown.trigger();
    loop {
        let status = watch.message().await.expect("status").expect("open");
        if status.status == ServingStatus::NotServing as i32 {
            break;
        }
    }
    drop(watch);
    // The in-flight stream still runs to its finish.
    let mut count = first.tokens.len();
    let mut finish = None;
    while let Some(message) = stream.message().await.expect("drains") {
        count += message.tokens.len();
        finish = message.finish;
    }
    assert_eq!(count, 60);
    assert!(finish.is_some());
    tokio::time::timeout(Duration::from_secs(30), server.task)
        .await
        .expect("server ends after the drain")
        .expect("task")
        .expect("ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_decoder_and_health_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = start(&[]).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connects");
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("answer")
        .expect("one message");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    assert!(
        names.iter().any(|name| name == "kosmos.decoder.v1.Decoder"),
        "{names:?}"
    );
    assert!(
        names.iter().any(|name| name == "grpc.health.v1.Health"),
        "{names:?}"
    );
    server.stop().await;
}

/// A job whose image rows do not match the model width (the edge never lets one through; the in-process handle
/// does) makes the model fail inside a step.
fn broken_job() -> GenerateJob {
    GenerateJob {
        tenant: String::new(),
        resume: Default::default(),
        prompt: Prompt {
            ids: vec![0, 4, 5, 6, 9],
            image_mask: vec![false, true, true, true, false],
            image_rows: vec![0.5; 3 * 31],
            image_tokens: 3,
        },
        sampling: SamplingParams::default(),
        stopping: StoppingRule {
            max_new_tokens: 4,
            limit_reason: kosmos_decoder::engine::FinishReason::Length,
            stop_token_ids: Vec::new(),
            eos_token_id: None,
        },
        deadline: None,
        arrived: Instant::now(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_fails_its_requests_and_the_engine_keeps_serving() {
    let server = start(&[]).await;
    let mut events = server.engine.generate(broken_job()).expect("queued");
    let failure = events
        .recv()
        .await
        .expect("an event")
        .expect_err("the step fails");
    assert_eq!(failure.code(), Code::Internal, "{failure:?}");
    assert!(
        failure.to_string().contains("engine step failed"),
        "{failure}"
    );
    let idle = server
        .wait_for_info("the failed request removed", |info| {
            info.running_sequences == 0 && info.kv_tokens_in_use == 0
        })
        .await;
    assert_eq!(idle.waiting_requests, 0);
    let mut client = server.client().await;
    let generated = generate(&mut client, short_request(11))
        .await
        .expect("still serving");
    assert_eq!(generated.ids().len(), 5);
    server.stop().await;
}

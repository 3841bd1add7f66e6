//! The encoder's spans, collected in memory: the call continues the caller's trace, each image's preprocessing and
//! each queued item are children of the call, and one `encoder.batch` span per model call links to every request
//! that rode in it. A binary of its own: the collecting subscriber is process-global.

#[allow(dead_code)]
#[path = "service/common.rs"]
mod common;
use kosmos_testkit::traces;

use std::collections::HashSet;

use anyhow::{Result, ensure};
use kosmos_proto::tensor::v1::DType;

use common::{TestServer, png, request};
use traces::{collect, ids, links, trace_of, traceparent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encode_spans_nest_under_the_call_and_each_batch_links_to_its_requests() -> Result<()> {
    let collected = collect();
    // A long batching delay, so that both calls ride in one batch.
    let server = TestServer::start(&["batching.max_queue_delay_seconds=0.5"]).await?;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut first = tonic::Request::new(request(vec![png(40, 30, 1)?], DType::DtypeUnspecified));
    first
        .metadata_mut()
        .insert("traceparent", traceparent(trace_id).parse()?);
    let second = request(
        vec![png(30, 40, 2)?, png(20, 20, 3)?],
        DType::DtypeUnspecified,
    );
    let (mut a, mut b) = (server.client.clone(), server.client.clone());
    let (first, second) = tokio::join!(a.encode(first), b.encode(second));
    first?;
    second?;
    server.stop().await?;

    let calls = collected.named("kosmos.encoder.v1.VisionEncoder/Encode");
    ensure!(calls.len() == 2, "two call spans: {calls:#?}");
    ensure!(
        calls
            .iter()
            .any(|call| trace_of(call).to_string() == trace_id),
        "the caller's trace is continued"
    );
    let encodes = collected.named("encode");
    ensure!(encodes.len() == 2, "two encode spans");
    for span in &encodes {
        ensure!(
            ids(&calls).contains(&span.parent_span_id),
            "encode under its call"
        );
    }
    for (name, count) in [("encoder.preprocess", 3), ("encoder.queue", 2)] {
        let spans = collected.named(name);
        ensure!(
            spans.len() == count,
            "{count} {name} spans, got {}",
            spans.len()
        );
        for span in &spans {
            let parent = encodes
                .iter()
                .find(|encode| encode.span_context.span_id() == span.parent_span_id);
            ensure!(
                parent.is_some_and(|parent| trace_of(parent) == trace_of(span)),
                "{name} is a child of its encode span"
            );
        }
    }
    let batches = collected.named("encoder.batch");
    ensure!(!batches.is_empty(), "batch spans");
    let linked: HashSet<_> = batches.iter().flat_map(links).collect();
    let expected: HashSet<_> = ids(&encodes).into_iter().collect();
    ensure!(
        linked == expected,
        "batches link to every request: {linked:?} vs {expected:?}"
    );
    ensure!(
        batches.iter().any(|batch| links(batch).len() == 2),
        "the two calls shared a batch"
    );
    Ok(())
}

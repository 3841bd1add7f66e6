//! The decoder's spans, collected in memory: the call continues the caller's trace; `decoder.queue`,
//! `decoder.prefill` and `decoder.decode` are children of the call's span, created on the engine thread; each
//! `decoder.step` links to the requests in it. A binary of its own: the collecting subscriber is process-global.

#[path = "service/common.rs"]
mod common;
use kosmos_testkit::traces;

use std::collections::HashSet;

use kosmos_proto::decoder::v1 as pb;

use common::{greedy, pseudo_random_ids, request, start, tokens_segment};
use traces::{collect, ids, links, trace_of, traceparent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_nest_under_the_call_and_steps_link_to_their_requests() {
    let collected = collect();
    let server = start(&[]).await;
    let mut client = server.client().await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut call = tonic::Request::new(request(
        vec![tokens_segment(&pseudo_random_ids(3, 6))],
        greedy(0),
        3,
        true,
    ));
    call.metadata_mut().insert(
        "traceparent",
        traceparent(trace_id).parse().expect("metadata"),
    );
    let mut stream = client.generate(call).await.expect("starts").into_inner();
    let mut tokens = 0;
    while let Some(message) = stream.message().await.expect("streams") {
        tokens += message.tokens.len();
    }
    assert_eq!(tokens, 3);
    client
        .score(pb::ScoreRequest {
            tenant: String::new(),
            context: vec![tokens_segment(&pseudo_random_ids(4, 5))],
            candidates: vec![pb::Candidate {
                ids: pseudo_random_ids(5, 2),
            }],
        })
        .await
        .expect("scores");
    server.stop().await;

    let limit = std::time::Duration::from_secs(5);
    let generate = collected
        .named_eventually("kosmos.decoder.v1.Decoder/Generate", 1, limit)
        .await;
    let score = collected
        .named_eventually("kosmos.decoder.v1.Decoder/Score", 1, limit)
        .await;
    assert_eq!((generate.len(), score.len()), (1, 1), "one span per call");
    assert_eq!(
        trace_of(&generate[0]).to_string(),
        trace_id,
        "the caller's trace is continued"
    );
    let calls = [generate[0].clone(), score[0].clone()];
    for name in ["decoder.queue", "decoder.prefill", "decoder.decode"] {
        let spans = collected.named(name);
        assert_eq!(spans.len(), 2, "one {name} per request");
        let parents: HashSet<_> = spans.iter().map(|span| span.parent_span_id).collect();
        let expected: HashSet<_> = ids(&calls).into_iter().collect();
        assert_eq!(
            parents, expected,
            "{name} spans are children of the call spans"
        );
        for span in &spans {
            let call = calls
                .iter()
                .find(|call| call.span_context.span_id() == span.parent_span_id)
                .expect("parent");
            assert_eq!(
                trace_of(span),
                trace_of(call),
                "{name} is in its call's trace"
            );
        }
    }
    let steps = collected.named("decoder.step");
    // 3 steps for the generation, 2 for the scoring (context, then the 2-token candidate).
    assert_eq!(steps.len(), 5, "one span per step");
    let linked: HashSet<_> = steps.iter().flat_map(links).collect();
    let expected: HashSet<_> = ids(&calls).into_iter().collect();
    assert_eq!(linked, expected, "steps link to the requests in them");
    assert!(steps.iter().all(|step| links(step).len() == 1));
}

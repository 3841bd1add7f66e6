//! End-to-end tests: encoder, decoder and gateway in-process on free loopback ports with the tiny model, real
//! gRPC between them. One test binary (one file per behaviour) keeps link time down.

mod bad_input;
mod cache;
mod generate;
mod resilience;
mod score;

use kosmos_proto::v1 as pb;

/// The fixture image used when any image will do.
pub const IMAGE: &str = "a_gradient_48x32.png";

/// A greedy request with the reference's n-gram ban.
pub fn greedy_request(prompt: Vec<pb::Segment>, max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt,
        params: Some(pb::GenerationParams {
            max_new_tokens,
            no_repeat_ngram_size: 3,
            ..Default::default()
        }),
        grounding: false,
    }
}

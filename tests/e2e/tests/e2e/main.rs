//! End-to-end tests: encoder, decoder and gateway in-process on free loopback ports with the tiny model, real
//! gRPC between them. One test binary (one file per behaviour) keeps link time down.

mod bad_input;
mod cache;
mod demo;
mod faults;
mod generate;
mod http_api;
mod http_errors;
mod http_fetch;
mod http_grounding;
mod http_template;
mod kosmos25;
mod metrics;
mod resilience;
mod rollout;
mod scale_out;
mod score;
mod security;
mod soak;
mod wake;

use kosmos_proto::v1 as pb;

/// The fixture image used when any image will do.
pub const IMAGE: &str = "a_gradient_48x32.png";

/// A small PNG whose pixels (so whose bytes and cache key) differ with `seed`.
pub fn distinct_png(seed: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(32, 32, |x, y| {
        let v = seed
            .wrapping_mul(2_654_435_761)
            .wrapping_add(x * 7 + y * 13);
        image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
    });
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .expect("encoding a PNG in memory");
    bytes
}

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

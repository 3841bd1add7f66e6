//! Fuzz-style property tests of the decoder's request validation: random segments (token ids in and out of the
//! vocabulary, image embeddings with random fingerprints, dtypes, shapes up to `u64::MAX` and bytes, NaNs
//! included), sampling and stopping parameters, through `generate_job` and `score_job`. No case may panic, hold
//! more than a small multiple of its input or take longer than a second; a request built valid is accepted,
//! and an accepted one is laid out consistently.
//!
//! The CI budget runs with the unit tests; `cargo test -p kosmos-decoder -- --ignored` (or the workspace's)
//! runs the long mode, a million cases.

use std::num::NonZeroUsize;
use std::time::Instant;

use kosmos_proto::decoder::v1 as pb;
use kosmos_proto::tensor::v1::{DType as WireDType, Tensor};
use kosmos_testkit::fuzz::{self, CountingAllocator, Mode, Suite};
use rand::Rng as _;
use rand_chacha::ChaCha8Rng;

use super::{generate_job, score_job};
use crate::config::RequestLimits;
use crate::engine::ModelInfo;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const VOCAB: usize = 100;
const IMAGE_TOKENS: usize = 3;
const HIDDEN: usize = 4;
const FINGERPRINT: &str = "fingerprint-of-the-model";

fn info() -> ModelInfo {
    ModelInfo {
        fingerprint: FINGERPRINT.into(),
        context_length: 64,
        vocab_size: VOCAB,
        num_image_tokens: IMAGE_TOKENS,
        hidden_size: HIDDEN,
        image_placeholder_first_id: 4,
        image_placeholder_repeated: false,
        family: "kosmos-2",
        bos_token_id: 0,
        eos_token_id: 2,
        pad_token_id: 1,
        device: "cpu".into(),
        dtype: kosmos_model::DType::F32,
    }
}

fn limits() -> RequestLimits {
    RequestLimits {
        max_score_candidates: NonZeroUsize::new(4).unwrap_or(NonZeroUsize::MIN),
        max_candidate_tokens: NonZeroUsize::new(8).unwrap_or(NonZeroUsize::MIN),
    }
}

/// Dimensions that break arithmetic next to the right ones.
const DIMENSIONS: [u64; 8] = [0, 1, 3, 4, 12, 1 << 32, u64::MAX / 2, u64::MAX];

/// A tensor, well-formed when `valid`, otherwise with any dtype, shape and byte count.
fn tensor(rng: &mut ChaCha8Rng, valid: bool) -> Tensor {
    if valid {
        let dtype = [
            WireDType::DtypeF32,
            WireDType::DtypeF16,
            WireDType::DtypeBf16,
        ][rng.random_range(0..3)];
        let values: Vec<f32> = (0..IMAGE_TOKENS * HIDDEN)
            .map(|_| rng.random_range(-4.0..4.0))
            .collect();
        return kosmos_runtime::tensor::from_f32(&values, &[IMAGE_TOKENS, HIDDEN], dtype)
            .unwrap_or_default();
    }
    let shape = (0..rng.random_range(0..4))
        .map(|_| DIMENSIONS[rng.random_range(0..DIMENSIONS.len())])
        .collect();
    let byte_count = match rng.random_range(0..3) {
        0 => IMAGE_TOKENS * HIDDEN * 4,
        1 => IMAGE_TOKENS * HIDDEN * 2,
        _ => rng.random_range(0..128),
    };
    Tensor {
        dtype: rng.random_range(-1..6),
        shape,
        // Random bytes: NaNs and infinities among them.
        data: (0..byte_count).map(|_| rng.random()).collect(),
    }
}

/// Random segments; all valid when `valid`.
fn segments(rng: &mut ChaCha8Rng, valid: bool) -> Vec<pb::Segment> {
    let count = rng.random_range(usize::from(valid)..5);
    (0..count)
        .map(|_| {
            let kind = match rng.random_range(0..if valid { 2 } else { 3 }) {
                0 => Some(pb::segment::Kind::Tokens(pb::TokenIds {
                    ids: (0..rng.random_range(1..6))
                        .map(|_| {
                            if valid || rng.random_range(0..8) > 0 {
                                rng.random_range(0..VOCAB as u32)
                            } else {
                                rng.random()
                            }
                        })
                        .collect(),
                })),
                1 => Some(pb::segment::Kind::Image(pb::ImageEmbedding {
                    embedding: if valid || rng.random_range(0..8) > 0 {
                        let well_formed = valid || rng.random();
                        Some(tensor(rng, well_formed))
                    } else {
                        None
                    },
                    model_fingerprint: if valid || rng.random_range(0..8) > 0 {
                        FINGERPRINT.into()
                    } else {
                        "another model".into()
                    },
                })),
                _ => None,
            };
            pb::Segment { kind }
        })
        .collect()
}

fn sampling(rng: &mut ChaCha8Rng, valid: bool) -> Option<pb::SamplingParams> {
    let float = |rng: &mut ChaCha8Rng| {
        [0.0, 0.5, 1.0, 2.0, -1.0, f32::NAN, f32::INFINITY]
            [rng.random_range(0..if valid { 4 } else { 7 })]
    };
    rng.random::<bool>().then(|| pb::SamplingParams {
        temperature: float(rng),
        top_p: float(rng).min(1.0),
        top_k: rng.random_range(0..50),
        repetition_penalty: float(rng),
        no_repeat_ngram_size: rng.random_range(0..4),
        seed: rng.random::<bool>().then(|| rng.random()),
        top_logprobs: rng.random_range(0..if valid { 20 } else { 40 }),
    })
}

fn case(rng: &mut ChaCha8Rng) -> usize {
    let valid = rng.random_range(0..4) == 0;
    let info = info();
    let prompt = segments(rng, valid);
    let input_bytes: usize = prompt
        .iter()
        .map(|segment| match &segment.kind {
            Some(pb::segment::Kind::Image(image)) => image
                .embedding
                .as_ref()
                .map_or(0, |tensor| tensor.data.len()),
            Some(pb::segment::Kind::Tokens(tokens)) => 4 * tokens.ids.len(),
            None => 0,
        })
        .sum();
    let request = pb::GenerateRequest {
        tenant: String::new(),
        resume: None,
        prompt: prompt.clone(),
        sampling: sampling(rng, valid),
        stopping: Some(pb::StoppingParams {
            max_new_tokens: if valid {
                rng.random_range(0..8)
            } else {
                rng.random()
            },
            stop_token_ids: (0..rng.random_range(0..3))
                .map(|_| rng.random_range(0..if valid { VOCAB as u32 } else { 120 }))
                .collect(),
            ignore_eos: rng.random(),
        }),
    };
    match generate_job(&request, &info, None, Instant::now()) {
        Ok(job) => {
            let prompt = &job.prompt;
            assert_eq!(prompt.ids.len(), prompt.image_mask.len());
            assert_eq!(prompt.image_rows.len(), prompt.image_tokens * HIDDEN);
            assert_eq!(
                prompt.image_mask.iter().filter(|&&flag| flag).count(),
                prompt.image_tokens
            );
            assert!(prompt.image_rows.iter().all(|value| value.is_finite()));
            assert!(prompt.ids.iter().all(|&id| (id as usize) < VOCAB));
            assert!(prompt.len() + job.stopping.max_new_tokens <= info.context_length);
        }
        Err(err) => {
            assert!(!valid, "a valid request was refused: {err}");
            assert!(!err.to_string().is_empty());
        }
    }
    let score = pb::ScoreRequest {
        tenant: String::new(),
        context: prompt,
        candidates: (0..rng.random_range(0..6))
            .map(|_| pb::Candidate {
                ids: (0..rng.random_range(0..10))
                    .map(|_| rng.random_range(0..VOCAB as u32 + 8))
                    .collect(),
            })
            .collect(),
    };
    if let Ok(job) = score_job(&score, &info, &limits(), None, Instant::now()) {
        assert!(!job.candidates.is_empty() && job.candidates.len() <= 4);
    }
    // The conversion reads the bytes it was given at most a few times over, never by the declared shape.
    4 * input_bytes + (64 << 10)
}

const VALIDATION: Suite<'static> = Suite {
    name: "decoder segment and tensor validation",
    seed: 0xdec0de,
    ci_cases: 5_000,
    long_cases: 1_000_000,
};

#[test]
fn random_segments_shapes_and_bytes_never_panic_and_valid_requests_pass() {
    fuzz::run(VALIDATION, Mode::Ci, case);
}

#[test]
#[ignore = "long mode: a million requests"]
fn random_segments_shapes_and_bytes_never_panic_and_valid_requests_pass_long() {
    fuzz::run(VALIDATION, Mode::Long, case);
}

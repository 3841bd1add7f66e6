//! Choosing the next token of one sequence from its logits, the way HF `generate` does.
//!
//! The order follows the reference's logits processors then warpers: repetition penalty (CTRL: positive logits
//! are divided by the penalty, negative ones multiplied), the no-repeat-n-gram ban over the whole history (prompt
//! included, image placeholder ids too), then — when sampling — temperature, top-k, top-p, and one draw from the
//! request's own random stream. Greedy (temperature 0) takes the argmax after the penalty and the ban.
//!
//! Each request owns a [`Sampler`] seeded from its seed, and it draws exactly one number per sampled step, so the
//! tokens of a request depend only on its own logits and seed, never on what else shares the batch.
//!
//! Reported log-probabilities are those of the model's distribution at the request's temperature:
//! `log_softmax(logits / temperature)` (temperature 1 when greedy), before the penalty, the n-gram ban and the
//! top-k / top-p truncation. They describe what the model thinks of a token, not how it was picked.

use std::borrow::Cow;

use kosmos_model::banned_ngram_tokens;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Most `top_logprobs` a request may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// How one request picks its tokens (already validated).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 is greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// CTRL repetition penalty; 1 disables it.
    pub repetition_penalty: f32,
    /// Ban repeating n-grams of this size; 0 disables it.
    pub no_repeat_ngram_size: usize,
    /// Seed of the request's random stream.
    pub seed: u64,
    /// Return this many most likely tokens with each token.
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            seed: 0,
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    /// Whether the argmax is taken instead of a draw.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// A chosen token with its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    /// The token id.
    pub id: u32,
    /// Its log-probability (see the module documentation for which distribution).
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens and their log-probabilities, most likely first.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Why no token could be chosen.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// The penalties and bans left no finite logit (every token banned, or the model produced NaN).
    #[error("no token can be chosen: every logit is banned or not a number")]
    NothingToChoose,
    /// The logits row is empty.
    #[error("the logits row is empty")]
    EmptyLogits,
}

/// The per-request token picker: parameters plus a private random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler whose random stream starts from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    /// Advances the random stream past `draws` draws, as if that many tokens had been sampled: a generation
    /// resumed on another replica continues with the numbers the uninterrupted run would have drawn.
    pub fn skip_draws(&mut self, draws: u64) {
        for _ in 0..draws {
            let _: f64 = self.rng.random();
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from raw `logits` (one row over the vocabulary) after `history` (prompt and generated
    /// ids so far).
    pub fn sample(
        &mut self,
        logits: &[f32],
        history: &[u32],
    ) -> Result<SampledToken, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        let scale = if self.params.is_greedy() {
            1.0
        } else {
            self.params.temperature
        };
        let mut terms = Vec::new();
        let reported = LogSoftmax::new(
            logits,
            scale,
            (!self.params.is_greedy()).then_some(&mut terms),
        );
        let banned = banned_ngram_tokens(history, self.params.no_repeat_ngram_size);
        let unchanged = self.params.repetition_penalty == 1.0 && banned.is_empty();
        let processed = if unchanged {
            Cow::Borrowed(logits)
        } else {
            let mut processed = logits.to_vec();
            apply_repetition_penalty(&mut processed, history, self.params.repetition_penalty);
            for &banned in &banned {
                if let Some(value) = processed.get_mut(banned as usize) {
                    *value = f32::NEG_INFINITY;
                }
            }
            Cow::Owned(processed)
        };
        let id = if self.params.is_greedy() {
            kosmos_model::argmax(&processed).ok_or(SamplingError::NothingToChoose)?
        } else {
            // Without a penalty or a ban the draw's weights are the reported distribution's terms, the same numbers.
            self.draw(&processed, unchanged.then_some(terms.as_slice()))?
        };
        Ok(SampledToken {
            id,
            logprob: reported.at(logits, id as usize),
            top_logprobs: reported.top(logits, self.params.top_logprobs),
        })
    }

    /// Temperature, top-k, top-p, then one uniform draw over what is left (exactly one number per call).
    /// `terms`, when given, holds `exp(logit / temperature - max)` of every id of `logits` (see [`LogSoftmax::new`]):
    /// the weights this computes, taken instead of computed again.
    fn draw(&mut self, logits: &[f32], terms: Option<&[f64]>) -> Result<u32, SamplingError> {
        let temperature = self.params.temperature;
        // (id, scaled logit) of every finite candidate, most likely first; ties by id keep the order total.
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, value)| value.is_finite())
            .map(|(id, &value)| (id as u32, value / temperature))
            .collect();
        let draw: f64 = self.rng.random();
        if candidates.is_empty() {
            return Err(SamplingError::NothingToChoose);
        }
        let by_descending_logit =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0));
        let top_k = self.params.top_k;
        if top_k > 0 && top_k < candidates.len() {
            // HF keeps every token whose logit reaches the k-th largest, ties included.
            candidates.select_nth_unstable_by(top_k - 1, by_descending_logit);
            let kth = candidates[top_k - 1].1;
            candidates.retain(|&(_, value)| value >= kth);
            candidates.sort_unstable_by(by_descending_logit);
        } else {
            // Still in id order: the radix sort's precondition.
            sort_by_descending_logit(&mut candidates);
        }
        let max = candidates[0].1;
        let mut weights: Vec<f64> = match terms {
            Some(terms) => candidates
                .iter()
                .map(|&(id, _)| terms[id as usize])
                .collect(),
            None => candidates
                .iter()
                .map(|&(_, value)| f64::from(value - max).exp())
                .collect(),
        };
        let total: f64 = weights.iter().sum();
        let top_p = f64::from(self.params.top_p);
        if top_p < 1.0 {
            // Keep the smallest prefix whose probability reaches top_p (at least one token).
            let mut cumulative = 0.0;
            let mut keep = weights.len();
            for (index, weight) in weights.iter().enumerate() {
                cumulative += weight / total;
                if cumulative >= top_p {
                    keep = index + 1;
                    break;
                }
            }
            weights.truncate(keep);
        }
        let kept_total: f64 = weights.iter().sum();
        let target = draw * kept_total;
        let mut cumulative = 0.0;
        for (&(id, _), weight) in candidates.iter().zip(&weights) {
            cumulative += weight;
            if target < cumulative {
                return Ok(id);
            }
        }
        // Rounding can leave `target` a hair above the last cumulative sum: the last kept token is the answer.
        Ok(candidates[weights.len() - 1].0)
    }
}

/// Candidates below this many are sorted by comparisons, at and above it by [`sort_by_descending_logit`]'s radix
/// passes (the same order either way).
const RADIX_SORT_FROM: usize = 512;

/// Sorts `(id, value)` candidates, given in increasing id order, most likely first: values by `f32::total_cmp`
/// descending, equal values by increasing id (the draw's order). From [`RADIX_SORT_FROM`] candidates it is a stable
/// least-significant-digit radix sort on the values' bits (three passes of 11, 11 and 10 bits), which keeps equal
/// values in their id order: over Kosmos-2's 65,037 tokens it replaces 16 comparisons per token.
fn sort_by_descending_logit(candidates: &mut [(u32, f32)]) {
    if candidates.len() < RADIX_SORT_FROM {
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        return;
    }
    // `total_cmp`'s key: the bits as a signed integer with the magnitude bits of negative values flipped; as
    // unsigned with the sign flipped it orders values ascending, so its complement orders them descending.
    let descending = |value: f32| {
        let bits = value.to_bits();
        !((bits ^ ((((bits as i32) >> 31) as u32) >> 1)) ^ 0x8000_0000)
    };
    let value_of = |key: u32| {
        let flipped = !key ^ 0x8000_0000;
        f32::from_bits(flipped ^ ((((flipped as i32) >> 31) as u32) >> 1))
    };
    let mut keys: Vec<u64> = candidates
        .iter()
        .map(|&(id, value)| (u64::from(descending(value)) << 32) | u64::from(id))
        .collect();
    let mut spare = vec![0u64; keys.len()];
    for (shift, width) in [(32, 11), (43, 11), (54, 10)] {
        let mask = (1usize << width) - 1;
        let digit = |key: u64| (key >> shift) as usize & mask;
        let mut offsets = vec![0usize; mask + 1];
        for &key in &keys {
            offsets[digit(key)] += 1;
        }
        let mut start = 0;
        for offset in &mut offsets {
            let count = *offset;
            *offset = start;
            start += count;
        }
        for &key in &keys {
            let slot = &mut offsets[digit(key)];
            spare[*slot] = key;
            *slot += 1;
        }
        std::mem::swap(&mut keys, &mut spare);
    }
    for (candidate, key) in candidates.iter_mut().zip(keys) {
        *candidate = (key as u32, value_of((key >> 32) as u32));
    }
}

/// The largest finite value (negative infinity when there is none), eight lanes at a time: a maximum does not
/// depend on the order it is taken in.
fn finite_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in chunks.by_ref() {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            if value.is_finite() && value > *lane {
                *lane = value;
            }
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .copied()
        .filter(|value| value.is_finite())
        .fold(f32::NEG_INFINITY, f32::max)
}

/// CTRL repetition penalty over the distinct ids of `history` (HF `RepetitionPenaltyLogitsProcessor`).
fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &id in history {
        let index = id as usize;
        if index >= logits.len() || seen[index] {
            continue;
        }
        seen[index] = true;
        let value = logits[index];
        logits[index] = if value < 0.0 {
            value * penalty
        } else {
            value / penalty
        };
    }
}

/// `log_softmax(logits / scale)` evaluated lazily: the normaliser once, entries on demand.
struct LogSoftmax {
    scale: f32,
    max: f32,
    log_total: f32,
}

impl LogSoftmax {
    /// The normaliser of `logits / scale`; into `terms`, when given, each id's `exp(logit / scale - max)` (0 where
    /// that is not finite), the terms of its sum.
    fn new(logits: &[f32], scale: f32, terms: Option<&mut Vec<f64>>) -> Self {
        let max = finite_max(logits) / scale;
        let term =
            |value: f32| Some(f64::from(value / scale - max).exp()).filter(|term| term.is_finite());
        let total: f64 = match terms {
            Some(terms) => {
                terms.clear();
                terms.extend(logits.iter().map(|&value| term(value).unwrap_or(0.0)));
                terms.iter().sum()
            }
            None => logits.iter().filter_map(|&value| term(value)).sum(),
        };
        Self {
            scale,
            max,
            log_total: total.ln() as f32,
        }
    }

    fn value(&self, logit: f32) -> f32 {
        logit / self.scale - self.max - self.log_total
    }

    fn at(&self, logits: &[f32], index: usize) -> f32 {
        logits
            .get(index)
            .map_or(f32::NEG_INFINITY, |&logit| self.value(logit))
    }

    /// The `count` most likely entries, most likely first (ties by id).
    fn top(&self, logits: &[f32], count: usize) -> Vec<(u32, f32)> {
        if count == 0 {
            return Vec::new();
        }
        let mut order: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(id, &v)| (id as u32, v))
            .collect();
        let by_descending =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0));
        let count = count.min(order.len());
        if count < order.len() {
            order.select_nth_unstable_by(count - 1, by_descending);
            order.truncate(count);
        }
        order.sort_unstable_by(by_descending);
        order
            .into_iter()
            .map(|(id, logit)| (id, self.value(logit)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..SamplingParams::default()
        }
    }

    fn counts(sampler: &mut Sampler, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut counts = vec![0; logits.len()];
        for _ in 0..draws {
            let token = sampler.sample(logits, &[]).expect("samples");
            counts[token.id as usize] += 1;
        }
        counts
    }

    #[test]
    fn a_sampler_that_skips_draws_continues_the_uninterrupted_stream() {
        let params = SamplingParams {
            seed: 42,
            top_k: 4,
            ..params(1.0)
        };
        let logits: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut uninterrupted = Sampler::new(params.clone());
        let whole: Vec<u32> = (0..40)
            .map(|_| uninterrupted.sample(&logits, &[]).expect("samples").id)
            .collect();
        for done in [0, 1, 17, 39] {
            let mut resumed = Sampler::new(params.clone());
            resumed.skip_draws(done as u64);
            let rest: Vec<u32> = (done..40)
                .map(|_| resumed.sample(&logits, &[]).expect("samples").id)
                .collect();
            assert_eq!(rest, whole[done..], "resumed after {done} draws");
        }
        // Reseeding instead of positioning would start over: the skip matters.
        let mut restarted = Sampler::new(params);
        let again: Vec<u32> = (17..40)
            .map(|_| restarted.sample(&logits, &[]).expect("samples").id)
            .collect();
        assert_ne!(again, whole[17..]);
    }

    #[test]
    fn greedy_takes_the_argmax_and_reports_its_log_softmax() {
        let mut sampler = Sampler::new(SamplingParams {
            top_logprobs: 2,
            ..params(0.0)
        });
        let logits = [1.0f32, 3.0, 2.0];
        let token = sampler.sample(&logits, &[]).expect("samples");
        assert_eq!(token.id, 1);
        let total: f32 = logits.iter().map(|v| v.exp()).sum();
        assert!((token.logprob - (3.0 - total.ln())).abs() < 1e-6);
        assert_eq!(token.top_logprobs.len(), 2);
        assert_eq!(token.top_logprobs[0].0, 1);
        assert_eq!(token.top_logprobs[1].0, 2);
        assert!((token.top_logprobs[1].1 - (2.0 - total.ln())).abs() < 1e-6);
    }

    #[test]
    fn the_ngram_ban_covers_the_history_and_greedy_takes_the_next_best() {
        let mut sampler = Sampler::new(SamplingParams {
            no_repeat_ngram_size: 2,
            ..params(0.0)
        });
        // History ends with 7; the 2-gram (7, 1) was seen, so 1 is banned.
        let token = sampler
            .sample(&[0.0, 5.0, 4.0], &[7, 1, 7])
            .expect("samples");
        assert_eq!(token.id, 2);
    }

    #[test]
    fn every_token_banned_is_an_error_not_a_panic() {
        let mut sampler = Sampler::new(SamplingParams {
            no_repeat_ngram_size: 1,
            ..params(0.0)
        });
        let err = sampler
            .sample(&[1.0, 2.0], &[0, 1])
            .expect_err("nothing left");
        assert_eq!(err, SamplingError::NothingToChoose);
        let mut sampler = Sampler::new(params(0.7));
        assert!(sampler.sample(&[f32::NAN, f32::NAN], &[]).is_err());
        assert_eq!(sampler.sample(&[], &[]), Err(SamplingError::EmptyLogits));
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let mut logits = vec![2.0f32, -2.0, 2.0, 1.0];
        apply_repetition_penalty(&mut logits, &[0, 1, 1, 9], 2.0);
        assert_eq!(logits, vec![1.0, -4.0, 2.0, 1.0]);
        // Greedy with the penalty picks the unpenalised token.
        let mut sampler = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        });
        assert_eq!(sampler.sample(&[3.0, 2.0], &[0]).expect("samples").id, 1);
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens_and_another_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed: u64| {
            let mut sampler = Sampler::new(SamplingParams {
                seed,
                ..params(1.0)
            });
            (0..40)
                .map(|_| sampler.sample(&logits, &[]).expect("samples").id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_keeps_only_the_k_most_likely_tokens() {
        let mut sampler = Sampler::new(SamplingParams {
            top_k: 2,
            ..params(1.0)
        });
        let drawn = counts(&mut sampler, &[3.0, 2.9, 0.0, 2.8, -1.0], 500);
        assert!(drawn[0] > 0 && drawn[1] > 0);
        assert_eq!(drawn[2] + drawn[3] + drawn[4], 0, "{drawn:?}");
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_the_mass() {
        // Probabilities 0.5, 0.3, 0.2 (logits are their logs): top_p 0.7 keeps the first two.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut sampler = Sampler::new(SamplingParams {
            top_p: 0.7,
            ..params(1.0)
        });
        let drawn = counts(&mut sampler, &logits, 1000);
        assert_eq!(drawn[2], 0, "{drawn:?}");
        assert!(drawn[0] > drawn[1] && drawn[1] > 200, "{drawn:?}");
        // top_p 0.5 keeps the first only.
        let mut sampler = Sampler::new(SamplingParams {
            top_p: 0.5,
            ..params(1.0)
        });
        assert_eq!(counts_of_first(&mut sampler, &logits), 100);
    }

    fn counts_of_first(sampler: &mut Sampler, logits: &[f32]) -> usize {
        counts(sampler, logits, 100)[0]
    }

    #[test]
    fn low_temperature_concentrates_and_log_probs_use_the_scaled_logits() {
        let logits = [1.0f32, 2.0];
        let mut sampler = Sampler::new(params(0.05));
        let concentrated = counts(&mut sampler, &logits, 200);
        assert_eq!(concentrated[1], 200);
        let token = sampler.sample(&logits, &[]).expect("samples");
        // log_softmax([20, 40])[1] = -ln(1 + e^-20)
        assert!((token.logprob - -(1.0f32 + (-20.0f32).exp()).ln()).abs() < 1e-6);
        // Sampling at temperature 1 follows the softmax: about 73% for the larger logit.
        let mut sampler = Sampler::new(params(1.0));
        let share = counts(&mut sampler, &logits, 4000)[1] as f64 / 4000.0;
        assert!((share - 0.731).abs() < 0.03, "{share}");
    }

    /// Logits with many ties, both zeros, tiny and huge magnitudes.
    fn awkward_logits(seed: u64, vocab: usize) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..vocab)
            .map(|_| match rng.random_range(0..8) {
                0 => 0.0,
                1 => -0.0,
                2 => f32::from(rng.random_range(-4i8..4)),
                3 => rng.random_range(-1e-39f32..1e-39),
                4 => rng.random_range(-1.0f32..1.0) * 3e38,
                _ => rng.random_range(-20.0f32..20.0),
            })
            .collect()
    }

    #[test]
    fn the_radix_sort_orders_like_the_comparison_sort() {
        for (seed, vocab) in [(1, 3), (2, 511), (3, 512), (4, 2035), (5, 65_037)] {
            let candidates: Vec<(u32, f32)> = awkward_logits(seed, vocab)
                .into_iter()
                .enumerate()
                .map(|(id, value)| (id as u32, value))
                .collect();
            let mut expected = candidates.clone();
            expected.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let mut sorted = candidates;
            sort_by_descending_logit(&mut sorted);
            let bits = |list: &[(u32, f32)]| -> Vec<(u32, u32)> {
                list.iter()
                    .map(|&(id, value)| (id, value.to_bits()))
                    .collect()
            };
            assert_eq!(bits(&sorted), bits(&expected), "vocab {vocab}");
        }
    }

    #[test]
    fn the_draw_picks_the_same_tokens_with_the_reported_terms_as_with_its_own_weights() {
        let logits: Vec<f32> = awkward_logits(7, 3000)
            .into_iter()
            .map(|value| value.clamp(-30.0, 30.0))
            .collect();
        for (temperature, top_k, top_p) in
            [(0.7, 0, 1.0), (1.3, 0, 0.9), (1.0, 50, 1.0), (0.9, 40, 0.8)]
        {
            let params = SamplingParams {
                temperature,
                top_k,
                top_p,
                seed: 11,
                ..SamplingParams::default()
            };
            let mut terms = Vec::new();
            LogSoftmax::new(&logits, temperature, Some(&mut terms));
            let mut with_terms = Sampler::new(params.clone());
            let mut computing = Sampler::new(params);
            for _ in 0..300 {
                assert_eq!(
                    with_terms.draw(&logits, Some(&terms)),
                    computing.draw(&logits, None),
                    "temperature {temperature}, top-k {top_k}, top-p {top_p}"
                );
            }
        }
    }
}

//! Generation parameters and Score candidates: every default resolved, every violation an INVALID_ARGUMENT naming
//! the field, the limit and the value.

use kosmos_proto::v1 as pb;

use super::over;
use crate::config::Limits;
use crate::error::RequestError;

/// Generation parameters with every default resolved except `max_new_tokens`, which depends on the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidParams {
    /// The caller's max_new_tokens, `None` for the default.
    pub max_new_tokens: Option<u32>,
    /// 0 is greedy.
    pub temperature: f32,
    /// 1 is off.
    pub top_p: f32,
    /// 0 is off.
    pub top_k: u32,
    /// 1 is off.
    pub repetition_penalty: f32,
    /// 0 is off.
    pub no_repeat_ngram_size: u32,
    /// `None`: a random seed.
    pub seed: Option<u64>,
    /// Stop strings, non-empty.
    pub stop: Vec<String>,
    /// Top log-probabilities per step.
    pub logprobs: u32,
}

/// Checks generation parameters against the limits and the vocabulary.
pub fn validate_params(
    params: Option<pb::GenerationParams>,
    limits: &Limits,
    vocab_size: usize,
) -> Result<ValidParams, RequestError> {
    let params = params.unwrap_or_default();
    if params.max_new_tokens > limits.max_new_tokens {
        return Err(over(
            "params.max_new_tokens",
            params.max_new_tokens,
            "max_new_tokens",
            limits.max_new_tokens,
        ));
    }
    let temperature = params.temperature;
    if !temperature.is_finite() || temperature < 0.0 {
        return Err(RequestError::invalid(format!(
            "`params.temperature` must be a number >= 0, got {temperature}"
        )));
    }
    if temperature > limits.max_temperature {
        return Err(over(
            "params.temperature",
            temperature,
            "max_temperature",
            limits.max_temperature,
        ));
    }
    let top_p = params.top_p;
    if !(0.0..=1.0).contains(&top_p) {
        return Err(RequestError::invalid(format!(
            "`params.top_p` must be in [0, 1], got {top_p}"
        )));
    }
    if params.top_k as usize > vocab_size {
        return Err(RequestError::invalid(format!(
            "`params.top_k` is {}, above the vocabulary size {vocab_size}",
            params.top_k
        )));
    }
    let penalty = params.repetition_penalty;
    if !penalty.is_finite() || penalty < 0.0 {
        return Err(RequestError::invalid(format!(
            "`params.repetition_penalty` must be a number >= 0, got {penalty}"
        )));
    }
    if penalty > limits.max_repetition_penalty {
        return Err(over(
            "params.repetition_penalty",
            penalty,
            "max_repetition_penalty",
            limits.max_repetition_penalty,
        ));
    }
    if params.no_repeat_ngram_size > limits.max_no_repeat_ngram_size {
        return Err(over(
            "params.no_repeat_ngram_size",
            params.no_repeat_ngram_size,
            "max_no_repeat_ngram_size",
            limits.max_no_repeat_ngram_size,
        ));
    }
    if params.stop.len() > limits.max_stop_strings {
        return Err(over(
            "params.stop",
            format!("{} strings", params.stop.len()),
            "max_stop_strings",
            limits.max_stop_strings,
        ));
    }
    for (index, stop) in params.stop.iter().enumerate() {
        if stop.is_empty() {
            return Err(RequestError::invalid(format!(
                "`params.stop[{index}]` must not be empty"
            )));
        }
        if stop.len() > limits.max_stop_string_bytes {
            return Err(over(
                &format!("params.stop[{index}]"),
                format!("{} bytes", stop.len()),
                "max_stop_string_bytes",
                limits.max_stop_string_bytes,
            ));
        }
    }
    if params.logprobs > limits.max_top_logprobs {
        return Err(over(
            "params.logprobs",
            params.logprobs,
            "max_top_logprobs",
            limits.max_top_logprobs,
        ));
    }
    Ok(ValidParams {
        max_new_tokens: (params.max_new_tokens > 0).then_some(params.max_new_tokens),
        temperature,
        top_p: if top_p == 0.0 { 1.0 } else { top_p },
        top_k: params.top_k,
        repetition_penalty: if penalty == 0.0 { 1.0 } else { penalty },
        no_repeat_ngram_size: params.no_repeat_ngram_size,
        seed: (params.seed != 0).then_some(params.seed),
        stop: params.stop,
        logprobs: params.logprobs,
    })
}

/// Checks the candidates of a Score request.
pub fn validate_candidates(candidates: &[String], limits: &Limits) -> Result<(), RequestError> {
    if candidates.is_empty() {
        return Err(RequestError::invalid(
            "`candidates` must contain at least one candidate",
        ));
    }
    if candidates.len() > limits.max_candidates {
        return Err(over(
            "candidates",
            format!("{} candidates", candidates.len()),
            "max_candidates",
            limits.max_candidates,
        ));
    }
    for (index, candidate) in candidates.iter().enumerate() {
        if candidate.trim().is_empty() {
            return Err(RequestError::invalid(format!(
                "`candidates[{index}]` must contain text"
            )));
        }
        if candidate.len() > limits.max_candidate_bytes {
            return Err(over(
                &format!("candidates[{index}]"),
                format!("{} bytes", candidate.len()),
                "max_candidate_bytes",
                limits.max_candidate_bytes,
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tests::limits;

    #[test]
    fn sampling_values_out_of_range_are_refused_and_zeros_mean_defaults() {
        let limits = limits();
        let defaults = validate_params(None, &limits, 100).expect("defaults");
        assert_eq!(
            (defaults.top_p, defaults.repetition_penalty, defaults.seed),
            (1.0, 1.0, None)
        );
        for params in [
            pb::GenerationParams {
                temperature: -1.0,
                ..Default::default()
            },
            pb::GenerationParams {
                temperature: f32::NAN,
                ..Default::default()
            },
            pb::GenerationParams {
                top_p: 1.5,
                ..Default::default()
            },
            pb::GenerationParams {
                top_k: 101,
                ..Default::default()
            },
            pb::GenerationParams {
                max_new_tokens: 5000,
                ..Default::default()
            },
            pb::GenerationParams {
                logprobs: 21,
                ..Default::default()
            },
            pb::GenerationParams {
                stop: vec![String::new()],
                ..Default::default()
            },
        ] {
            let err =
                validate_params(Some(params.clone()), &limits, 100).expect_err("out of range");
            assert!(err.to_string().contains("`params."), "{err} for {params:?}");
        }
    }

    #[test]
    fn candidates_must_exist_and_fit() {
        let limits = limits();
        assert!(validate_candidates(&[], &limits).is_err());
        assert!(validate_candidates(&["  ".into()], &limits).is_err());
        assert!(validate_candidates(&["cat".into(), "dog".into()], &limits).is_ok());
    }
}

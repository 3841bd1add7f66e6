//! Greedy generation with the reference's `no_repeat_ngram_size` ban, and log-probabilities of continuations:
//! the pieces needed to check the model against HF `generate` and to score candidates.

use candle_core::{IndexOp, Tensor};

use crate::error::{ModelError, Result};
use crate::paged::KvCacheConfig;
use crate::text::{ImageInjection, SeqChunk, TextModel};

/// Tokens that would repeat an n-gram of `history` if generated next (HF `NoRepeatNGramLogitsProcessor`): for
/// every earlier occurrence of the last `n - 1` tokens, the token that followed it. Empty when `n == 0` or the
/// history is shorter than `n - 1`.
pub fn banned_ngram_tokens(history: &[u32], n: usize) -> Vec<u32> {
    if n == 0 || history.len() + 1 < n {
        return Vec::new();
    }
    let prefix = &history[history.len() + 1 - n..];
    let mut banned: Vec<u32> = history
        .windows(n)
        .filter(|window| &window[..n - 1] == prefix)
        .map(|window| window[n - 1])
        .collect();
    banned.sort_unstable();
    banned.dedup();
    banned
}

/// Index of the largest value, the first one on ties (as `torch.argmax`). `None` for an empty slice or when every
/// value is NaN or -inf.
pub fn argmax(values: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (index, &value) in values.iter().enumerate() {
        if value.is_nan() || value == f32::NEG_INFINITY {
            continue;
        }
        if best.is_none_or(|(_, best_value)| value > best_value) {
            best = Some((index, value));
        }
    }
    best.map(|(index, _)| index as u32)
}

/// A prompt for [`greedy_generate`].
#[derive(Debug)]
pub struct Prompt {
    /// Token ids fed to the model.
    pub ids: Vec<u32>,
    /// One flag per id: where image embeddings replace token embeddings.
    pub image_mask: Vec<bool>,
    /// `(marked positions, embed_dim)` image rows, when the mask marks any.
    pub image_embeds: Option<Tensor>,
}

/// Settings of [`greedy_generate`].
#[derive(Debug, Clone, Copy)]
pub struct GreedyParams {
    /// Most tokens generated per prompt.
    pub max_new_tokens: usize,
    /// Ban repeating n-grams of this size (0 disables it).
    pub no_repeat_ngram_size: usize,
    /// Stop a sequence after this token.
    pub eos_token_id: Option<u32>,
}

/// Greedy decoding of several prompts together: one packed prefill, then one packed step per token for the
/// sequences still running (finished ones leave the batch). Returns the generated ids of each prompt, the end
/// token included.
pub fn greedy_generate(
    model: &TextModel,
    prompts: &[Prompt],
    params: GreedyParams,
) -> Result<Vec<Vec<u32>>> {
    let mut cache = model.kv_cache(
        KvCacheConfig::for_sequences(
            prompts
                .iter()
                .map(|prompt| prompt.ids.len() + params.max_new_tokens),
            16,
        ),
        "",
    )?;
    let mut tables: Vec<_> = prompts
        .iter()
        .map(|_| cache.new_table("", Vec::new()))
        .collect();
    let mut histories: Vec<Vec<u32>> = prompts.iter().map(|prompt| prompt.ids.clone()).collect();
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut running: Vec<usize> = (0..prompts.len()).collect();
    let mut pending: Vec<Vec<u32>> = prompts.iter().map(|prompt| prompt.ids.clone()).collect();
    let mut first_step = true;
    for _ in 0..params.max_new_tokens {
        if running.is_empty() {
            break;
        }
        let hidden = {
            let mut chunks = Vec::with_capacity(running.len());
            let mut remaining: Vec<Option<&mut _>> = tables.iter_mut().map(Some).collect();
            for &index in &running {
                let table = remaining[index].take().ok_or_else(|| {
                    ModelError::InvalidInput("a sequence is scheduled twice".into())
                })?;
                let prompt = &prompts[index];
                let images = match (&prompt.image_embeds, first_step) {
                    (Some(embeds), true) => Some(ImageInjection {
                        mask: &prompt.image_mask,
                        embeds,
                    }),
                    _ => None,
                };
                chunks.push(SeqChunk {
                    input_ids: &pending[index],
                    images,
                    table,
                });
            }
            model.forward(&mut cache, &mut chunks)?
        };
        // The last hidden state of each running sequence.
        let mut last_rows = Vec::with_capacity(running.len());
        let mut offset = 0;
        for &index in &running {
            offset += pending[index].len();
            last_rows.push((offset - 1) as u32);
        }
        let rows = Tensor::from_vec(last_rows, running.len(), hidden.device())?;
        let logits = model.logits(&hidden.index_select(&rows, 0)?)?;
        let mut still_running = Vec::with_capacity(running.len());
        for (slot, &index) in running.iter().enumerate() {
            let mut row = logits.i(slot)?.to_vec1::<f32>()?;
            for banned in banned_ngram_tokens(&histories[index], params.no_repeat_ngram_size) {
                if let Some(value) = row.get_mut(banned as usize) {
                    *value = f32::NEG_INFINITY;
                }
            }
            let next = argmax(&row).ok_or_else(|| {
                ModelError::InvalidInput("every token is banned or not a number".into())
            })?;
            generated[index].push(next);
            histories[index].push(next);
            pending[index] = vec![next];
            if params.eos_token_id != Some(next) {
                still_running.push(index);
            }
        }
        running = still_running;
        first_step = false;
    }
    Ok(generated)
}

/// `log P(ids[t] | ids[..t])` for `t` in `start..ids.len()` from log-probabilities `(ids.len(), vocab)` of the
/// same sequence (row `t - 1` predicts token `t`).
pub fn continuation_logprobs(log_probs: &Tensor, ids: &[u32], start: usize) -> Result<Vec<f32>> {
    if start == 0 || start > ids.len() {
        return Err(ModelError::InvalidInput(format!(
            "a continuation must start after the first token and within the sequence (start {start}, length {})",
            ids.len()
        )));
    }
    (start..ids.len())
        .map(|t| Ok(log_probs.i((t - 1, ids[t] as usize))?.to_scalar::<f32>()?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ngram_ban_lists_what_followed_each_earlier_occurrence_of_the_prefix() {
        // 3-grams: (5,6,7) (6,7,5) (7,5,6); the last two tokens (5,6) were followed by 7.
        assert_eq!(banned_ngram_tokens(&[5, 6, 7, 5, 6], 3), vec![7]);
        assert_eq!(banned_ngram_tokens(&[5, 6], 3), Vec::<u32>::new());
        assert_eq!(banned_ngram_tokens(&[4, 4, 4], 2), vec![4]);
        assert_eq!(banned_ngram_tokens(&[1, 2, 3], 0), Vec::<u32>::new());
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_skips_banned_values() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), Some(1));
        assert_eq!(argmax(&[f32::NEG_INFINITY, -5.0]), Some(1));
        assert_eq!(argmax(&[f32::NEG_INFINITY]), None);
    }
}

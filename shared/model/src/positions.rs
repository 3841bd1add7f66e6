//! Position encodings of the text decoder.
//!
//! * Sinusoidal absolute positions (`Kosmos2TextSinusoidalPositionalEmbedding`, fairseq/M2M100 style): sin‖cos
//!   halves concatenated, divisor `half - 1`, row `padding_idx` zero, positions offset by `padding_idx + 1`.
//!   Computed in the same f32 operation order as torch so long positions do not drift.
//! * xPos (KOSMOS-1, torchscale `XPOS`): an interleaved-pair (GPT-J style) rotation by `p·θ_i` scaled per pair by
//!   `ζ_i^(±m/scale_base)`, `ζ_i = (2i + 0.4·d)/(1.4·d)`.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// The reference's pad-aware position ids (`create_position_ids_from_input_ids`): every non-pad token counts, the
/// first real token gets `pad + 1`, pad tokens get `pad` (whose row is zero).
///
/// `past_tokens` are the ids already in the cache; the result has one position per id of `input_ids`.
pub fn pad_aware_positions(past_tokens: &[u32], input_ids: &[u32], pad_token_id: u32) -> Vec<u32> {
    let mut real_so_far = past_tokens.iter().filter(|&&id| id != pad_token_id).count() as u32;
    input_ids
        .iter()
        .map(|&id| {
            if id == pad_token_id {
                pad_token_id
            } else {
                real_so_far += 1;
                real_so_far + pad_token_id
            }
        })
        .collect()
}

/// Sinusoidal absolute position embeddings of width `dim` with a zero row at `padding_idx`.
#[derive(Debug, Clone)]
pub struct SinusoidalPositions {
    inv_freq: Vec<f32>,
    dim: usize,
    padding_idx: u32,
}

impl SinusoidalPositions {
    /// The embedding for width `dim` and padding index `padding_idx`.
    pub fn new(dim: usize, padding_idx: u32) -> Self {
        let half = dim / 2;
        // torch: emb = math.log(10000) / (half - 1) (a Python float), then exp(arange(half).float() * -emb) in f32.
        let step = (10000f64.ln() / (half as f64 - 1.0)) as f32;
        let inv_freq = (0..half).map(|i| (i as f32 * -step).exp()).collect();
        Self {
            inv_freq,
            dim,
            padding_idx,
        }
    }

    /// `(positions.len(), dim)` embeddings in `dtype` on `device`.
    pub fn embed(&self, positions: &[u32], dtype: DType, device: &Device) -> Result<Tensor> {
        let half = self.inv_freq.len();
        let mut rows = Vec::with_capacity(positions.len() * self.dim);
        for &position in positions {
            if position == self.padding_idx {
                rows.extend(std::iter::repeat_n(0f32, self.dim));
                continue;
            }
            let position = position as f32;
            rows.extend(self.inv_freq.iter().map(|inv| (position * inv).sin()));
            rows.extend(self.inv_freq.iter().map(|inv| (position * inv).cos()));
            if self.dim > 2 * half {
                rows.push(0.0);
            }
        }
        Ok(Tensor::from_vec(rows, (positions.len(), self.dim), device)?.to_dtype(dtype)?)
    }
}

/// xPos for one head dimension, with keys cached already rotated and scaled.
///
/// torchscale re-applies xPos to the whole (raw) key history at every step because its scale exponent is centred
/// on the current length `n` (`m = p + floor(-n/2)`). The centring cancels in `q·k`, which only depends on
/// `ζ^((p_q - p_k)/scale_base)`, so this implementation centres on a fixed `centre` instead (option (c) of
/// MODEL_SPEC §3.5): keys are multiplied by `ζ^(-(p - centre)/scale_base)` once, when they enter the cache, and
/// queries by `ζ^((p - centre)/scale_base)`. It equals torchscale up to float rounding, keeps the cache append-only
/// (no per-step recomputation over the history), and with `centre` at half the context keeps every factor within
/// `ζ^(±max_len/(2·scale_base))`, the same range torchscale's own centring gives.
#[derive(Debug, Clone)]
pub struct XPos {
    zeta: Vec<f64>,
    inv_freq: Vec<f64>,
    scale_base: f64,
    centre: f64,
}

/// Cos and sin tables `(len, head_dim / 2)` for one side (queries or keys).
#[derive(Debug)]
pub struct XPosTables {
    /// `cos(p·θ_i)·factor`.
    pub cos: Tensor,
    /// `sin(p·θ_i)·factor`.
    pub sin: Tensor,
}

impl XPos {
    /// xPos for heads of width `head_dim`.
    pub fn new(head_dim: usize, scale_base: f64, centre: usize) -> Self {
        let half = head_dim / 2;
        let zeta = (0..half)
            .map(|i| (2.0 * i as f64 + 0.4 * head_dim as f64) / (1.4 * head_dim as f64))
            .collect();
        let inv_freq = (0..half)
            .map(|j| 1.0 / 10000f64.powf(j as f64 / half as f64))
            .collect();
        Self {
            zeta,
            inv_freq,
            scale_base,
            centre: centre as f64,
        }
    }

    /// Tables for absolute positions `start..start + len`; `downscale` (keys) inverts the factor.
    pub fn tables(
        &self,
        start: usize,
        len: usize,
        downscale: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<XPosTables> {
        let half = self.zeta.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for position in start..start + len {
            let exponent = (position as f64 - self.centre) / self.scale_base;
            let exponent = if downscale { -exponent } else { exponent };
            for (zeta, inv_freq) in self.zeta.iter().zip(&self.inv_freq) {
                let factor = zeta.powf(exponent);
                let angle = position as f64 * inv_freq;
                cos.push((angle.cos() * factor) as f32);
                sin.push((angle.sin() * factor) as f32);
            }
        }
        Ok(XPosTables {
            cos: Tensor::from_vec(cos, (len, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (len, half), device)?.to_dtype(dtype)?,
        })
    }

    /// The tables of several chunks, one after the other: `(sum of lens, head_dim / 2)`.
    pub fn concat(parts: &[XPosTables]) -> Result<XPosTables> {
        let cos: Vec<&Tensor> = parts.iter().map(|part| &part.cos).collect();
        let sin: Vec<&Tensor> = parts.iter().map(|part| &part.sin).collect();
        Ok(XPosTables {
            cos: Tensor::cat(&cos, 0)?,
            sin: Tensor::cat(&sin, 0)?,
        })
    }

    /// Rotates and scales packed rows `(tokens, heads, head_dim)` with `tables` `(tokens, head_dim / 2)`, row `t`
    /// by table row `t` (interleaved pairs, torchscale's layout).
    pub fn apply_rows(xs: &Tensor, tables: &XPosTables) -> Result<Tensor> {
        let (tokens, heads, head_dim) = xs.dims3()?;
        let half = head_dim / 2;
        // rope_i over (batch = tokens, heads, 1, head_dim) with per-batch tables (tokens, 1, half).
        let rows = xs.contiguous()?.reshape((tokens, heads, 1, head_dim))?;
        let rotated = candle_nn::rotary_emb::rope_i(
            &rows,
            &tables.cos.reshape((tokens, 1, half))?,
            &tables.sin.reshape((tokens, 1, half))?,
        )?;
        Ok(rotated.reshape((tokens, heads, head_dim))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_aware_positions_skip_pads_and_continue_from_the_cache() {
        assert_eq!(
            pad_aware_positions(&[], &[1, 1, 0, 7, 9], 1),
            vec![1, 1, 2, 3, 4]
        );
        assert_eq!(
            pad_aware_positions(&[1, 0, 7], &[9, 1, 5], 1),
            vec![4, 1, 5]
        );
    }

    #[test]
    fn the_padding_row_is_zero_and_halves_are_concatenated() {
        let positions = SinusoidalPositions::new(6, 1);
        let table = positions
            .embed(&[1, 2], DType::F32, &Device::Cpu)
            .and_then(|t| Ok(t.to_vec2::<f32>()?))
            .expect("embeds");
        assert!(table[0].iter().all(|&v| v == 0.0));
        // sin(2 * inv_0) with inv_0 = 1, then the cos half starts at column 3.
        assert!((table[1][0] - 2f32.sin()).abs() < 1e-7);
        assert!((table[1][3] - 2f32.cos()).abs() < 1e-7);
    }
}

//! Small building blocks shared by the vision tower, the connector and the text decoder.

use candle_core::{D, DType, Module, Tensor};
use candle_nn::Linear;

use crate::config::Activation;
use crate::error::Result;
use crate::weights::Weights;

impl Activation {
    /// Applies the activation elementwise.
    ///
    /// GELU is computed in f32 whatever the input dtype, like torchscale (`act(x.float()).type_as(x)`).
    pub fn forward(self, xs: &Tensor) -> Result<Tensor> {
        let out = match self {
            Activation::Gelu => xs.to_dtype(DType::F32)?.gelu_erf()?.to_dtype(xs.dtype())?,
            Activation::GeluTanh => xs.to_dtype(DType::F32)?.gelu()?.to_dtype(xs.dtype())?,
            Activation::QuickGelu => (xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?)?,
            Activation::Relu => xs.relu()?,
        };
        Ok(out)
    }
}

/// Scaled dot-product attention over heads.
///
/// `query` is `(batch, heads, q_len, head_dim)` and already multiplied by `head_dim^-0.5` (the reference scales the
/// query before the product); `key`/`value` are `(batch, heads, kv_len, head_dim)`; `bias` is an additive mask
/// broadcastable to `(batch, heads, q_len, kv_len)`. The softmax runs in f32 whatever the model dtype, so half
/// precision serving keeps the reference's numerics (torchscale does an fp32 softmax too).
pub fn attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype = query.dtype();
    // (batch, heads, q_len, kv_len)
    let scores = query.matmul(&key.t()?)?.to_dtype(DType::F32)?;
    let scores = match bias {
        Some(bias) => scores.broadcast_add(bias)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    // (batch, heads, q_len, head_dim)
    Ok(probs.matmul(value)?)
}

/// `(batch, len, heads*head_dim)` → `(batch, heads, len, head_dim)`, contiguous.
pub fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (batch, len, width) = xs.dims3()?;
    Ok(xs
        .reshape((batch, len, heads, width / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// `(batch, heads, len, head_dim)` → `(batch, len, heads*head_dim)`, contiguous.
pub fn merge_heads(xs: &Tensor) -> Result<Tensor> {
    let (batch, heads, len, head_dim) = xs.dims4()?;
    Ok(xs
        .transpose(1, 2)?
        .contiguous()?
        .reshape((batch, len, heads * head_dim))?)
}

/// A LayerNorm forward on a contiguous input, so candle takes its fused kernel.
pub fn layer_norm(norm: &candle_nn::LayerNorm, xs: &Tensor) -> Result<Tensor> {
    Ok(norm.forward(&xs.contiguous()?)?)
}

/// L2 normalisation over the last dimension: `x / max(||x||, 1e-12)`, as `torch.nn.functional.normalize`.
///
/// Computed in f32 so half precision cannot overflow the sum of squares.
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs = xs.to_dtype(DType::F32)?;
    let norm = xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    Ok(xs.broadcast_div(&norm)?.to_dtype(dtype)?)
}

/// The four square projections of a multi-head attention (`q_proj`, `k_proj`, `v_proj`, `out_proj`, with biases).
#[derive(Debug)]
pub struct AttentionProjections {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub out_proj: Linear,
    /// Number of heads.
    pub heads: usize,
    /// `head_dim^-0.5`, applied to the projected query (the reference scales the query before the product).
    pub scale: f64,
}

impl AttentionProjections {
    /// Loads `{q,k,v,out}_proj` of width `width` split into `heads` heads.
    pub fn new(weights: &Weights, width: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            q_proj: weights.linear(width, width, "q_proj")?,
            k_proj: weights.linear(width, width, "k_proj")?,
            v_proj: weights.linear(width, width, "v_proj")?,
            out_proj: weights.linear(width, width, "out_proj")?,
            heads,
            scale: ((width / heads) as f64).powf(-0.5),
        })
    }

    /// Unmasked attention of `queries` `(batch, q_len, width)` over `keys_values` `(batch, kv_len, width)`,
    /// projected out: `(batch, q_len, width)`. Self-attention passes the same tensor twice.
    pub fn attend(&self, queries: &Tensor, keys_values: &Tensor) -> Result<Tensor> {
        let query = split_heads(&(self.q_proj.forward(queries)? * self.scale)?, self.heads)?;
        let key = split_heads(&self.k_proj.forward(keys_values)?, self.heads)?;
        let value = split_heads(&self.v_proj.forward(keys_values)?, self.heads)?;
        let context = merge_heads(&attention(&query, &key, &value, None)?)?;
        Ok(self.out_proj.forward(&context)?)
    }
}

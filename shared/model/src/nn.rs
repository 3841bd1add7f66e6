//! Small building blocks shared by the vision tower, the connector and the text decoder.

use candle_core::{D, DType, Module, Tensor};

use crate::config::Activation;
use crate::error::{ModelError, Result};
use crate::kernels;
use crate::panels;
use crate::weights::Weights;

impl Activation {
    /// The fused CPU kernel computing this activation, if there is one (ReLU has none).
    fn kernel(self) -> Option<kernels::ActivationKind> {
        match self {
            Activation::Gelu => Some(kernels::ActivationKind::GeluErf),
            Activation::QuickGelu => Some(kernels::ActivationKind::QuickGelu),
            Activation::GeluTanh => Some(kernels::ActivationKind::GeluTanh),
            Activation::Relu => None,
        }
    }

    /// Applies the activation elementwise.
    ///
    /// GELU is computed in f32 whatever the input dtype, like torchscale (`act(x.float()).type_as(x)`). On the CPU,
    /// GELU and quick GELU run as one fused pass (`kernels.rs`).
    pub fn forward(self, xs: &Tensor) -> Result<Tensor> {
        if kernels::cpu_kernel_applies(xs)
            && let Some(kind) = self.kernel()
        {
            return kernels::activation(xs, kind);
        }
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

/// A LayerNorm forward: the fused CPU kernel (`kernels.rs`) for f32/f16, else candle's fused kernel on a
/// contiguous input.
pub fn layer_norm(norm: &candle_nn::LayerNorm, xs: &Tensor) -> Result<Tensor> {
    if kernels::cpu_kernel_applies(xs)
        && norm.remove_mean()
        && let Some(bias) = norm.bias()
    {
        return kernels::layer_norm(xs, norm.weight(), bias, norm.eps());
    }
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

/// A linear layer `x · W + b` whose weight is stored, once at load time, in the layout its matrix product streams.
///
/// candle's `Linear` keeps the checkpoint's `(out, in)` and multiplies by a transposed view, which `gemm` repacks
/// on every multi-row call. On the CPU in f32 the weight is packed into column panels and multiplied by
/// `panels.rs`'s kernel (each weight read once per call whatever the row count; a row's output bit-identical alone
/// or in any batch); elsewhere it is stored transposed, `(in, out)`, and on the CPU (f16) the bias is written into the
/// destination before one accumulating `gemm` (see the README's model-crate section and `docs/benchmarks.md` for
/// the measurements).
#[derive(Debug, Clone)]
pub struct Projection {
    weight: Weight,
    /// `(out)`.
    bias: Tensor,
}

/// A [`Projection`]'s weight in one of its two layouts.
#[derive(Debug, Clone)]
enum Weight {
    /// `(in, out)`, contiguous.
    InOut(Tensor),
    /// CPU, f32: `(panels, in, PANEL)` from [`panels::pack`], for `out` outputs.
    Panels { packed: Tensor, out_dim: usize },
}

impl Projection {
    /// A projection from a weight in the checkpoint's `(out, in)` layout and a bias `(out)`.
    pub fn from_out_in(weight: &Tensor, bias: Tensor) -> Result<Self> {
        Self::from_in_out(weight.t()?.contiguous()?, bias)
    }

    /// A projection from a weight `(in, out)` and a bias `(out)`, packed into panels on the CPU in f32.
    fn from_in_out(weight_t: Tensor, bias: Tensor) -> Result<Self> {
        let (_, out_dim) = weight_t.dims2()?;
        if bias.dims1()? != out_dim {
            return Err(ModelError::InvalidInput(format!(
                "projection bias has shape {:?}, expected [{out_dim}]",
                bias.dims()
            )));
        }
        let weight = if weight_t.device().is_cpu() && weight_t.dtype() == DType::F32 {
            Weight::Panels {
                packed: panels::pack(&weight_t)?,
                out_dim,
            }
        } else {
            Weight::InOut(weight_t.contiguous()?)
        };
        Ok(Self { weight, bias })
    }

    /// The same projection with its weight stored `(in, out)` and multiplied by `gemm` (the layout of other devices
    /// and dtypes): for benchmarks and tests that compare the two.
    pub fn unpacked(&self) -> Result<Self> {
        Ok(Self {
            weight: Weight::InOut(self.weight_t()?),
            bias: self.bias.clone(),
        })
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        match &self.weight {
            Weight::InOut(weight_t) => weight_t.dims()[0],
            Weight::Panels { packed, .. } => packed.dims()[1],
        }
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        match &self.weight {
            Weight::InOut(weight_t) => weight_t.dims()[1],
            Weight::Panels { out_dim, .. } => *out_dim,
        }
    }

    /// The weight, `(in, out)` contiguous (a copy when it is stored in panels).
    pub fn weight_t(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::InOut(weight_t) => Ok(weight_t.clone()),
            Weight::Panels { packed, out_dim } => panels::unpack(packed, *out_dim),
        }
    }

    /// Rows `ids` of the weight in the checkpoint's `(out, in)` layout, `(ids, in)`: a tied LM head's token
    /// embeddings. An id at or past the output width is an error.
    pub fn gather_weight_rows(&self, ids: &[u32]) -> Result<Tensor> {
        match &self.weight {
            Weight::Panels { packed, out_dim } => panels::gather_columns(packed, *out_dim, ids),
            Weight::InOut(weight_t) => {
                let ids = Tensor::from_slice(ids, ids.len(), weight_t.device())?;
                Ok(weight_t.index_select(&ids, 1)?.t()?.contiguous()?)
            }
        }
    }

    /// The bias, `(out)`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// The same projection with its output multiplied by `factor` (weight and bias scaled).
    pub fn scaled(&self, factor: f64) -> Result<Self> {
        let weight = match &self.weight {
            Weight::InOut(weight_t) => Weight::InOut((weight_t * factor)?),
            Weight::Panels { packed, out_dim } => Weight::Panels {
                // The padding stays zero.
                packed: (packed * factor)?,
                out_dim: *out_dim,
            },
        };
        Ok(Self {
            weight,
            bias: (&self.bias * factor)?,
        })
    }

    /// One projection whose output is the outputs of `parts` side by side (all of the same input width).
    pub fn concat(parts: &[&Projection]) -> Result<Self> {
        let weights = parts
            .iter()
            .map(|part| part.weight_t())
            .collect::<Result<Vec<_>>>()?;
        let biases: Vec<&Tensor> = parts.iter().map(|part| &part.bias).collect();
        Self::from_in_out(Tensor::cat(&weights, 1)?, Tensor::cat(&biases, 0)?)
    }

    /// `(rows, in)` → `(rows, out)`, or `(batch, rows, in)` → `(batch, rows, out)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.by_rows(xs, |rows| self.forward_rows(rows))
    }

    /// `activation(xs · W + b)`, shaped as [`Projection::forward`]. With packed panels (CPU, f32) the activation
    /// runs inside the product, on each output block while it is in cache (the same values as applying it after);
    /// otherwise it follows the product.
    pub fn forward_activated(&self, xs: &Tensor, activation: Activation) -> Result<Tensor> {
        match (&self.weight, activation.kernel()) {
            (Weight::Panels { packed, out_dim }, Some(kind))
                if xs.device().is_cpu() && xs.dtype() == DType::F32 =>
            {
                self.by_rows(xs, |rows| {
                    panels::linear(rows, packed, &self.bias, *out_dim, Some(kind))
                })
            }
            _ => activation.forward(&self.forward(xs)?),
        }
    }

    /// `product` of the rows of `xs`, `(rows, in)` or `(batch, rows, in)` flattened, shaped back.
    fn by_rows(&self, xs: &Tensor, product: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        match *xs.dims() {
            [_, _] => product(xs),
            [batch, rows, in_dim] => {
                let flat = xs.contiguous()?.reshape((batch * rows, in_dim))?;
                Ok(product(&flat)?.reshape((batch, rows, self.out_dim()))?)
            }
            _ => Err(ModelError::InvalidInput(format!(
                "a projection takes (rows, in) or (batch, rows, in), got {:?}",
                xs.dims()
            ))),
        }
    }

    /// `(rows, in)` → `(rows, out)`.
    fn forward_rows(&self, xs: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Panels { packed, out_dim }
                if xs.device().is_cpu() && xs.dtype() == DType::F32 =>
            {
                panels::linear(xs, packed, &self.bias, *out_dim, None)
            }
            Weight::Panels { .. } => Ok(xs.matmul(&self.weight_t()?)?.broadcast_add(&self.bias)?),
            Weight::InOut(weight_t) if kernels::cpu_kernel_applies(xs) => {
                kernels::linear(xs, weight_t, &self.bias)
            }
            Weight::InOut(weight_t) => Ok(xs.matmul(weight_t)?.broadcast_add(&self.bias)?),
        }
    }
}

/// The projections of a multi-head attention: `q_proj`, `k_proj`, `v_proj` fused into one product of width
/// `3 × width` (the query part pre-multiplied by `head_dim^-0.5`, which the reference applies to the projected
/// query), and `out_proj`.
#[derive(Debug)]
pub struct AttentionProjections {
    /// `[q · head_dim^-0.5 | k | v]`, `width → 3 × width`.
    pub qkv: Projection,
    /// Output projection.
    pub out_proj: Projection,
    /// Number of heads.
    pub heads: usize,
}

impl AttentionProjections {
    /// Loads `{q,k,v,out}_proj` of width `width` split into `heads` heads and fuses the first three.
    ///
    /// Folding the query scale into the weights is exact when `head_dim` is a power of four (64: scale 1/8) and
    /// within a rounding of the reference's order otherwise.
    pub fn new(weights: &Weights, width: usize, heads: usize) -> Result<Self> {
        Self::from_parts(
            &weights.projection(width, width, "q_proj")?,
            &weights.projection(width, width, "k_proj")?,
            &weights.projection(width, width, "v_proj")?,
            weights.projection(width, width, "out_proj")?,
            heads,
        )
    }

    /// Fuses separate query, key and value projections (the query not yet scaled).
    pub fn from_parts(
        query: &Projection,
        key: &Projection,
        value: &Projection,
        out_proj: Projection,
        heads: usize,
    ) -> Result<Self> {
        let width = out_proj.in_dim();
        if heads == 0 || !width.is_multiple_of(heads) {
            return Err(ModelError::InvalidInput(format!(
                "attention width {width} does not split into {heads} heads"
            )));
        }
        let scale = ((width / heads) as f64).powf(-0.5);
        Ok(Self {
            qkv: Projection::concat(&[&query.scaled(scale)?, key, value])?,
            out_proj,
            heads,
        })
    }

    /// The width of the attention (of each of q, k and v).
    pub fn width(&self) -> usize {
        self.out_proj.in_dim()
    }

    /// `(rows, width)` → the scaled query, the key and the value, each `(rows, width)` (views into one product).
    pub fn qkv(&self, xs: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let width = self.width();
        let fused = self.qkv.forward(xs)?;
        Ok((
            fused.narrow(1, 0, width)?,
            fused.narrow(1, width, width)?,
            fused.narrow(1, 2 * width, width)?,
        ))
    }

    /// Unmasked attention within each batch element of `xs` `(batch, len, width)`: the rows from `query_offset` on
    /// attend over all `len` rows, projected out: `(batch, len - query_offset, width)`. Self-attention passes
    /// offset 0; the connector's latent queries are the last rows of their own keys and values.
    pub fn attend(&self, xs: &Tensor, query_offset: usize) -> Result<Tensor> {
        self.attend_with_key_bias(xs, query_offset, None)
    }

    /// [`AttentionProjections::attend`] with `key_bias` `(batch, len)` (f32) added to the scores of each batch
    /// element's keys before the softmax: a key mask, `f32::MIN` on the keys to ignore.
    pub fn attend_with_key_bias(
        &self,
        xs: &Tensor,
        query_offset: usize,
        key_bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (batch, len, width) = xs.dims3()?;
        if query_offset >= len {
            return Err(ModelError::InvalidInput(format!(
                "query offset {query_offset} leaves no query among {len} rows"
            )));
        }
        let queries = len - query_offset;
        // (batch * len, 3 * inner): the attention's own width may differ from the rows' (Kosmos-2.5's tower).
        let fused = self
            .qkv
            .forward(&xs.contiguous()?.reshape((batch * len, width))?)?;
        let width = self.width();
        // (batch * queries, inner)
        let context = if kernels::cpu_kernel_applies(&fused) {
            let bias = match key_bias {
                Some(bias) => Some(bias.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                None => None,
            };
            kernels::attention_with_key_bias(&fused, batch, query_offset, self.heads, bias)?
        } else {
            let fused = fused.reshape((batch, len, 3 * width))?;
            let query = split_heads(
                &fused
                    .narrow(1, query_offset, queries)?
                    .narrow(2, 0, width)?,
                self.heads,
            )?;
            let key = split_heads(&fused.narrow(2, width, width)?, self.heads)?;
            let value = split_heads(&fused.narrow(2, 2 * width, width)?, self.heads)?;
            let bias = match key_bias {
                Some(bias) => Some(bias.to_dtype(DType::F32)?.reshape((batch, 1, 1, len))?),
                None => None,
            };
            merge_heads(&attention(&query, &key, &value, bias.as_ref())?)?
                .reshape((batch * queries, width))?
        };
        let context = self.out_proj.forward(&context)?;
        let out_width = context.dim(1)?;
        Ok(context.reshape((batch, queries, out_width))?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Module, Tensor};

    use super::*;

    fn random(shape: &[usize], seed: u64) -> Result<Tensor> {
        // A small deterministic generator: the test must not depend on candle's RNG.
        let count: usize = shape.iter().product();
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let values: Vec<f32> = (0..count)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect();
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        assert_eq!(a.dims(), b.dims());
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    #[test]
    fn projection_equals_candle_linear_on_random_weights() -> Result<()> {
        let (in_dim, out_dim) = (96, 80);
        let weight = random(&[out_dim, in_dim], 1)?;
        let bias = random(&[out_dim], 2)?;
        let linear = candle_nn::Linear::new(weight.clone(), Some(bias.clone()));
        let projection = Projection::from_out_in(&weight, bias)?;
        assert_eq!(
            (projection.in_dim(), projection.out_dim()),
            (in_dim, out_dim)
        );
        for rows in [1, 2, 3, 8, 17, 64] {
            let xs = random(&[rows, in_dim], 3 + rows as u64)?;
            let error = max_abs_diff(&projection.forward(&xs)?, &linear.forward(&xs)?)?;
            assert!(error < 1e-5, "{rows} rows: error {error}");
        }
        let batched = random(&[3, 5, in_dim], 4)?;
        let error = max_abs_diff(&projection.forward(&batched)?, &linear.forward(&batched)?)?;
        assert!(error < 1e-5, "batched: error {error}");
        // A strided input (a column slice of a wider matrix) gives the same rows as its contiguous copy.
        let wide = random(&[7, in_dim + 16], 5)?;
        let strided = wide.narrow(1, 8, in_dim)?;
        let error = max_abs_diff(
            &projection.forward(&strided)?,
            &linear.forward(&strided.contiguous()?)?,
        )?;
        assert!(error < 1e-5, "strided: error {error}");
        Ok(())
    }

    /// `forward_activated` equals the activation applied after `forward`, to the bit where the activation runs inside
    /// the packed product, for rows and batches, every activation (ReLU through the fallback) and the unpacked layout.
    #[test]
    fn an_activated_projection_equals_the_activation_after_the_projection() -> Result<()> {
        let (in_dim, out_dim) = (40, 130);
        let packed =
            Projection::from_out_in(&random(&[out_dim, in_dim], 6)?, random(&[out_dim], 7)?)?;
        let unpacked = packed.unpacked()?;
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|v| v.to_bits())
                .collect())
        };
        for xs in [random(&[9, in_dim], 8)?, random(&[2, 7, in_dim], 9)?] {
            for activation in [
                Activation::Gelu,
                Activation::QuickGelu,
                Activation::GeluTanh,
                Activation::Relu,
            ] {
                for projection in [&packed, &unpacked] {
                    let want = activation.forward(&projection.forward(&xs)?)?;
                    let got = projection.forward_activated(&xs, activation)?;
                    assert_eq!(got.dims(), want.dims());
                    assert_eq!(bits(&got)?, bits(&want)?, "{activation:?}, {:?}", xs.dims());
                }
            }
        }
        Ok(())
    }

    fn projection(width: usize, seed: u64) -> Result<Projection> {
        Projection::from_out_in(&random(&[width, width], seed)?, random(&[width], seed + 1)?)
    }

    #[test]
    fn fused_qkv_equals_the_three_separate_products() -> Result<()> {
        let (width, heads) = (48, 4);
        let (query, key, value) = (
            projection(width, 10)?,
            projection(width, 20)?,
            projection(width, 30)?,
        );
        let attention =
            AttentionProjections::from_parts(&query, &key, &value, projection(width, 40)?, heads)?;
        let scale = ((width / heads) as f64).powf(-0.5);
        let xs = random(&[11, width], 50)?;
        let (q, k, v) = attention.qkv(&xs)?;
        let expected_q = (query.forward(&xs)? * scale)?;
        assert!(max_abs_diff(&q, &expected_q)? < 1e-5);
        assert!(max_abs_diff(&k, &key.forward(&xs)?)? < 1e-5);
        assert!(max_abs_diff(&v, &value.forward(&xs)?)? < 1e-5);
        Ok(())
    }

    /// The reference path of `attend`: separate products, heads split and merged by candle ops.
    fn attend_with_candle_ops(
        attention_projections: &AttentionProjections,
        parts: [&Projection; 3],
        xs: &Tensor,
        query_offset: usize,
    ) -> Result<Tensor> {
        let (_, len, _) = xs.dims3()?;
        let heads = attention_projections.heads;
        let width = attention_projections.width();
        let scale = ((width / heads) as f64).powf(-0.5);
        let queries = xs.narrow(1, query_offset, len - query_offset)?;
        let query = split_heads(&(parts[0].forward(&queries)? * scale)?, heads)?;
        let key = split_heads(&parts[1].forward(xs)?, heads)?;
        let value = split_heads(&parts[2].forward(xs)?, heads)?;
        let context = merge_heads(&attention(&query, &key, &value, None)?)?;
        attention_projections.out_proj.forward(&context)
    }

    #[test]
    fn fused_attention_kernel_equals_candle_ops_for_self_and_tail_queries() -> Result<()> {
        let (width, heads) = (64, 4);
        let (query, key, value) = (
            projection(width, 60)?,
            projection(width, 70)?,
            projection(width, 80)?,
        );
        let attention_projections =
            AttentionProjections::from_parts(&query, &key, &value, projection(width, 90)?, heads)?;
        let xs = random(&[3, 13, width], 100)?;
        for query_offset in [0, 9, 12] {
            let fused = attention_projections.attend(&xs, query_offset)?;
            let expected = attend_with_candle_ops(
                &attention_projections,
                [&query, &key, &value],
                &xs,
                query_offset,
            )?;
            let error = max_abs_diff(&fused, &expected)?;
            assert!(error < 1e-5, "query offset {query_offset}: error {error}");
        }
        assert!(attention_projections.attend(&xs, 13).is_err());
        Ok(())
    }
}

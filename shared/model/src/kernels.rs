//! CPU kernels that candle's generic ops do in several passes, written as candle custom ops over contiguous
//! rows and parallel with rayon (on the pool candle's `gemm` uses, so `RAYON_NUM_THREADS` bounds both).
//!
//! * [`linear`]: `xs · W + b` with the weight stored `(in, out)`, the bias written into the destination before
//!   the product (one `gemm` call that accumulates, no separate broadcast add);
//! * [`attention`]: unmasked multi-head attention straight out of a fused `[q | k | v]` projection, one task per
//!   (image, head), so no head is ever split out or merged back by a copy;
//! * [`activation`]: exact-erf GELU and quick GELU in one pass (candle computes quick GELU in three passes, its
//!   sigmoid on one thread, and its erf with a slow scalar routine); f16 goes through f32 per element, as the
//!   reference's `act(x.float()).type_as(x)`.
//!
//! * [`layer_norm`]: LayerNorm with two-pass statistics in f32, parallel over rows.
//!
//! The elementwise loops are compiled twice, plain and for AVX2 + FMA, and pick the latter at run time when the CPU
//! has it (the workspace builds for baseline x86-64).
//! Each kernel runs on the CPU for f32 and f16; callers fall back to candle's ops on other devices (see `nn.rs`).

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use gemm::{Parallelism, gemm};
use half::f16;
use rayon::prelude::*;

use crate::error::Result;

/// The `gemm` parallelism for one product that uses the whole pool.
fn pool_parallelism() -> Parallelism {
    let threads = candle_core::utils::get_num_threads();
    if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// Storage of one dtype as a slice starting at the layout's offset, or an error naming the op.
fn contiguous_slice<'a, T: WithDType>(
    storage: &'a [T],
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// `xs (rows, in) · weight_t (in, out) + bias (out)`.
#[derive(Debug)]
struct LinearOp;

impl LinearOp {
    fn run<T: WithDType + 'static>(
        xs: &[T],
        xs_layout: &Layout,
        weight_t: &[T],
        weight_layout: &Layout,
        bias: &[T],
        bias_layout: &Layout,
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let (rows, in_dim) = xs_layout.shape().dims2()?;
        let (weight_in, out_dim) = weight_layout.shape().dims2()?;
        if weight_in != in_dim || bias_layout.shape().dims1()? != out_dim {
            candle_core::bail!(
                "linear: input ({rows}, {in_dim}), weight ({weight_in}, {out_dim}), bias {:?}",
                bias_layout.shape().dims()
            );
        }
        let weight_t = contiguous_slice(weight_t, weight_layout, "linear weight")?;
        let bias = contiguous_slice(bias, bias_layout, "linear bias")?;
        // The input may be strided (a row slice of a wider tensor): gemm takes any row and column stride.
        let [row_stride, col_stride] = xs_layout.stride() else {
            candle_core::bail!("linear: input must be 2-D");
        };
        let xs = &xs[xs_layout.start_offset()..];
        let mut dst: Vec<T> = Vec::with_capacity(rows * out_dim);
        // SAFETY: every element is written by the bias fill below before it is read.
        #[allow(clippy::uninit_vec)]
        unsafe {
            dst.set_len(rows * out_dim)
        };
        if out_dim > 0 {
            dst.par_chunks_mut(out_dim)
                .for_each(|row| row.copy_from_slice(bias));
        }
        if rows > 0 && out_dim > 0 && in_dim > 0 {
            // SAFETY: the pointers and strides describe the slices checked above: `xs` holds `rows` rows of
            // `in_dim` elements at the layout's strides, `weight_t` is `(in_dim, out_dim)` row-major and `dst`
            // is `(rows, out_dim)` row-major.
            unsafe {
                gemm(
                    rows,
                    out_dim,
                    in_dim,
                    dst.as_mut_ptr(),
                    1,
                    out_dim as isize,
                    true,
                    xs.as_ptr(),
                    *col_stride as isize,
                    *row_stride as isize,
                    weight_t.as_ptr(),
                    1,
                    out_dim as isize,
                    T::one(),
                    T::one(),
                    false,
                    false,
                    false,
                    pool_parallelism(),
                )
            };
        }
        Ok((dst, Shape::from((rows, out_dim))))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "kosmos-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match (xs, weight, bias) {
            (CpuStorage::F32(xs), CpuStorage::F32(weight), CpuStorage::F32(bias)) => {
                let (dst, shape) =
                    Self::run(xs, xs_layout, weight, weight_layout, bias, bias_layout)?;
                Ok((CpuStorage::F32(dst), shape))
            }
            (CpuStorage::F16(xs), CpuStorage::F16(weight), CpuStorage::F16(bias)) => {
                let (dst, shape) =
                    Self::run(xs, xs_layout, weight, weight_layout, bias, bias_layout)?;
                Ok((CpuStorage::F16(dst), shape))
            }
            _ => candle_core::bail!("kosmos-linear: unsupported dtype {:?}", xs.dtype()),
        }
    }
}

/// Whether the CPU kernels handle tensors like `xs`.
pub fn cpu_kernel_applies(xs: &Tensor) -> bool {
    xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::F16)
}

/// `xs (rows, in) · weight_t (in, out) + bias (out)` → `(rows, out)` in one accumulating product (CPU, f32/f16).
pub fn linear(xs: &Tensor, weight_t: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(xs.apply_op3_no_bwd(weight_t, bias, &LinearOp)?)
}

/// Unmasked multi-head attention over a fused `[q | k | v]` projection.
///
/// The input is `(batch * block, 3 * width)`: for each batch element a block of rows, each row its query (already
/// scaled), key and value. Every row of the block is a key/value; the queries are the rows
/// `[query_offset, block)` of the block. The output is `(batch * (block - query_offset), width)`, heads merged.
#[derive(Debug)]
struct AttentionOp {
    batch: usize,
    block: usize,
    query_offset: usize,
    heads: usize,
    /// Added to every query's score of each key before the softmax, `(batch, block)` row-major: a key mask
    /// (`f32::MIN` on masked keys, as the reference's `_expand_mask`), or none.
    key_bias: Option<Vec<f32>>,
}

/// A raw pointer that rayon tasks may share; each task writes a disjoint set of elements through it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SharedMut<T>(pub(crate) *mut T);
// SAFETY: the tasks write disjoint elements (see `AttentionOp::run` and `panels::Operands`).
unsafe impl<T> Send for SharedMut<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper rather than its field).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

impl AttentionOp {
    fn run<T: WithDType + 'static>(
        &self,
        qkv: &[T],
        layout: &Layout,
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let qkv = contiguous_slice(qkv, layout, "attention input")?;
        let (rows, fused_width) = layout.shape().dims2()?;
        let Self {
            batch,
            block,
            query_offset,
            heads,
            ref key_bias,
        } = *self;
        if key_bias
            .as_ref()
            .is_some_and(|bias| bias.len() != batch * block)
        {
            candle_core::bail!("attention: the key bias does not hold {batch} x {block} values");
        }
        let width = fused_width / 3;
        if fused_width % 3 != 0
            || width % heads != 0
            || rows != batch * block
            || query_offset >= block
        {
            candle_core::bail!(
                "attention: input ({rows}, {fused_width}) does not fit batch {batch}, block {block}, query offset \
                 {query_offset}, heads {heads}"
            );
        }
        let head_dim = width / heads;
        let queries = block - query_offset;
        let mut dst: Vec<T> = vec![T::zero(); batch * queries * width];
        let out = SharedMut(dst.as_mut_ptr());
        let fused = fused_width as isize;
        (0..batch * heads).into_par_iter().for_each(|task| {
            let (image, head) = (task / heads, task % heads);
            let base = image * block * fused_width;
            let query = &qkv[base + query_offset * fused_width + head * head_dim..];
            let key = &qkv[base + width + head * head_dim..];
            let value = &qkv[base + 2 * width + head * head_dim..];
            // (queries, block) scores, then probabilities in place.
            let mut scores = vec![T::zero(); queries * block];
            // SAFETY: query rows `[0, queries)` and key rows `[0, block)` of this image lie inside `qkv` at
            // row stride `fused_width`; `scores` is `(queries, block)` row-major.
            unsafe {
                gemm(
                    queries,
                    block,
                    head_dim,
                    scores.as_mut_ptr(),
                    1,
                    block as isize,
                    false,
                    query.as_ptr(),
                    1,
                    fused,
                    key.as_ptr(),
                    fused,
                    1,
                    T::zero(),
                    T::one(),
                    false,
                    false,
                    false,
                    Parallelism::None,
                )
            };
            let mut row_f32 = vec![0f32; block];
            let bias = key_bias
                .as_ref()
                .map(|bias| &bias[image * block..(image + 1) * block]);
            for row in scores.chunks_mut(block) {
                softmax_row(row, &mut row_f32, bias);
            }
            // SAFETY: value rows `[0, block)` of this image lie inside `qkv`; the destination rows of this image
            // and the columns of this head are written by this task only.
            unsafe {
                let out = out.get().add(image * queries * width + head * head_dim);
                gemm(
                    queries,
                    head_dim,
                    block,
                    out,
                    1,
                    width as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    block as isize,
                    value.as_ptr(),
                    1,
                    fused,
                    T::zero(),
                    T::one(),
                    false,
                    false,
                    false,
                    Parallelism::None,
                )
            };
        });
        Ok((dst, Shape::from((batch * queries, width))))
    }
}

/// Softmax of one row in f32 whatever the storage type (the reference's fp32 softmax), in place, after adding
/// `bias` (one value per key) when given.
fn softmax_row<T: WithDType>(row: &mut [T], scratch: &mut [f32], bias: Option<&[f32]>) {
    let mut max = f32::NEG_INFINITY;
    for (key, (value, slot)) in row.iter().zip(scratch.iter_mut()).enumerate() {
        *slot = value.to_f64() as f32 + bias.map_or(0.0, |bias| bias[key]);
        max = max.max(*slot);
    }
    let mut sum = 0f32;
    for slot in scratch.iter_mut() {
        *slot = (*slot - max).exp();
        sum += *slot;
    }
    for (value, slot) in row.iter_mut().zip(scratch.iter()) {
        *value = T::from_f64((*slot / sum) as f64);
    }
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "kosmos-attention"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match storage {
            CpuStorage::F32(qkv) => {
                let (dst, shape) = self.run(qkv, layout)?;
                Ok((CpuStorage::F32(dst), shape))
            }
            CpuStorage::F16(qkv) => {
                let (dst, shape) = self.run(qkv, layout)?;
                Ok((CpuStorage::F16(dst), shape))
            }
            _ => candle_core::bail!("kosmos-attention: unsupported dtype {:?}", storage.dtype()),
        }
    }
}

/// Unmasked attention of a fused `[q | k | v]` projection `(batch * block, 3 * width)` (CPU, f32/f16): in each
/// batch element's block of rows, the rows from `query_offset` on attend over all rows of the block. Returns
/// `(batch * (block - query_offset), width)`, heads merged.
///
/// `key_bias` `(batch * block)`, when given, is added to the scores of each batch element's keys before the
/// softmax (Kosmos-2.5's page tower masks padded patches so).
pub fn attention_with_key_bias(
    qkv: &Tensor,
    batch: usize,
    query_offset: usize,
    heads: usize,
    key_bias: Option<Vec<f32>>,
) -> Result<Tensor> {
    let rows = qkv.dim(0)?;
    let block = rows.checked_div(batch).unwrap_or(0);
    let op = AttentionOp {
        batch,
        block,
        query_offset,
        heads,
        key_bias,
    };
    Ok(qkv.contiguous()?.apply_op1_no_bwd(&op)?)
}

/// Which elementwise activation [`activation`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationKind {
    /// `x · Φ(x)` with the exact (erf) normal CDF.
    GeluErf,
    /// `x · sigmoid(1.702 x)`.
    QuickGelu,
    /// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))` (`gelu_new`, Kosmos-2.5's page tower).
    GeluTanh,
}

/// `exp(x)` in f32 without a libm call, so loops over it vectorise: Cephes' `expf` (range reduction by `ln 2` in
/// two parts, degree-6 polynomial; relative error about 1e-7 over the clamped range).
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n built from the bits of `n + 127 + 2^23` (exact: an integer below 2^24, so its low mantissa bits are
    // `n + 127`), not by `n as i32 + 127`: a float-to-int cast saturates and the add is overflow-checked in dev
    // builds, and either keeps the loop scalar.
    y * f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23)
}

/// `erf(x)` in f32 by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), the formula PyTorch's vectorised
/// CPU `erf` uses.
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let magnitude = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * magnitude);
    let r = 1.061_405_4_f32;
    let r = r * t - 1.453_152;
    let r = r * t + 1.421_413_8;
    let r = r * t - 0.284_496_74;
    let r = r * t + 0.254_829_6;
    let y = 1.0 - r * t * exp_f32(-magnitude * magnitude);
    y.copysign(x)
}

#[inline(always)]
fn activation_chunk(kind: ActivationKind, src: &[f32], dst: &mut [f32]) {
    match kind {
        ActivationKind::GeluErf => {
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = gelu_erf(x);
            }
        }
        ActivationKind::QuickGelu => {
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = quick_gelu(x);
            }
        }
        ActivationKind::GeluTanh => {
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = gelu_tanh(x);
            }
        }
    }
}

/// [`activation_chunk`] over `values` in place: the same function of each element.
#[inline(always)]
fn activation_in_place(kind: ActivationKind, values: &mut [f32]) {
    match kind {
        ActivationKind::GeluErf => values.iter_mut().for_each(|x| *x = gelu_erf(*x)),
        ActivationKind::QuickGelu => values.iter_mut().for_each(|x| *x = quick_gelu(*x)),
        ActivationKind::GeluTanh => values.iter_mut().for_each(|x| *x = gelu_tanh(*x)),
    }
}

#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn quick_gelu(x: f32) -> f32 {
    x / (1.0 + exp_f32(-1.702 * x))
}

/// 0.5 x (1 + tanh(u)) = x - x / (exp(2u) + 1): no cancellation, one exp.
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    x - x / (exp_f32(2.0 * u) + 1.0)
}

// The activations compiled for wider registers. Each element goes through the same operations (Rust never fuses
// a product and a sum on its own, and every operation is exactly rounded), so every path gives the same bits: the
// test `every_activation_path_gives_the_same_bits` holds them to it.

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn activation_chunk_avx512(kind: ActivationKind, src: &[f32], dst: &mut [f32]) {
    activation_chunk(kind, src, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn activation_chunk_avx2(kind: ActivationKind, src: &[f32], dst: &mut [f32]) {
    activation_chunk(kind, src, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn activation_in_place_avx512(kind: ActivationKind, values: &mut [f32]) {
    activation_in_place(kind, values)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn activation_in_place_avx2(kind: ActivationKind, values: &mut [f32]) {
    activation_in_place(kind, values)
}

/// [`activation_chunk`] with the widest instruction set the CPU offers.
fn activation_chunk_dispatch(kind: ActivationKind, src: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { activation_chunk_avx512(kind, src, dst) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { activation_chunk_avx2(kind, src, dst) };
        }
    }
    activation_chunk(kind, src, dst)
}

/// [`activation_in_place`] with the widest instruction set the CPU offers (the panel product's epilogue).
pub(crate) fn activation_in_place_dispatch(kind: ActivationKind, values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { activation_in_place_avx512(kind, values) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { activation_in_place_avx2(kind, values) };
        }
    }
    activation_in_place(kind, values)
}

/// Elements per rayon task of the elementwise kernels and of the layer norm.
const CHUNK: usize = 8192;

#[derive(Debug)]
struct ActivationOp(ActivationKind);

impl CustomOp1 for ActivationOp {
    fn name(&self) -> &'static str {
        "kosmos-activation"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let kind = self.0;
        let shape = layout.shape().clone();
        match storage {
            CpuStorage::F32(values) => {
                let src = contiguous_slice(values, layout, "activation input")?;
                let mut dst = vec![0f32; src.len()];
                src.par_chunks(CHUNK)
                    .zip(dst.par_chunks_mut(CHUNK))
                    .for_each(|(src, dst)| activation_chunk_dispatch(kind, src, dst));
                Ok((CpuStorage::F32(dst), shape))
            }
            CpuStorage::F16(values) => {
                let src = contiguous_slice(values, layout, "activation input")?;
                let mut dst = vec![half::f16::ZERO; src.len()];
                src.par_chunks(CHUNK)
                    .zip(dst.par_chunks_mut(CHUNK))
                    .for_each(|(src, dst)| {
                        let wide: Vec<f32> = src.iter().map(|v| v.to_f32()).collect();
                        let mut out = vec![0f32; wide.len()];
                        activation_chunk_dispatch(kind, &wide, &mut out);
                        for (d, v) in dst.iter_mut().zip(out) {
                            *d = half::f16::from_f32(v);
                        }
                    });
                Ok((CpuStorage::F16(dst), shape))
            }
            _ => candle_core::bail!("kosmos-activation: unsupported dtype {:?}", storage.dtype()),
        }
    }
}

/// The activation `kind` of every element of `xs` (CPU, f32/f16; computed in f32), one parallel pass.
pub fn activation(xs: &Tensor, kind: ActivationKind) -> Result<Tensor> {
    Ok(xs.contiguous()?.apply_op1_no_bwd(&ActivationOp(kind))?)
}

/// LayerNorm of one row in f32: mean, then the biased variance of the centred values (two passes, as torch), then
/// `(x - mean) / sqrt(var + eps) · weight + bias`. The sums run in eight lanes so the loops vectorise.
#[inline(always)]
fn layer_norm_row(src: &[f32], weight: &[f32], bias: &[f32], eps: f32, dst: &mut [f32]) {
    let dim = src.len();
    let mut lanes = [0f32; 8];
    let chunks = src.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, value) in lanes.iter_mut().zip(chunk) {
            *lane += value;
        }
    }
    let mean = (lanes.iter().sum::<f32>() + tail) / dim as f32;
    let mut lanes = [0f32; 8];
    let chunks = src.chunks_exact(8);
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    for chunk in chunks {
        for (lane, value) in lanes.iter_mut().zip(chunk) {
            let centred = value - mean;
            *lane += centred * centred;
        }
    }
    let variance = (lanes.iter().sum::<f32>() + tail) / dim as f32;
    let inverse_std = 1.0 / (variance + eps).sqrt();
    for (((d, &x), &w), &b) in dst.iter_mut().zip(src).zip(weight).zip(bias) {
        *d = (x - mean) * inverse_std * w + b;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn layer_norm_row_avx2(src: &[f32], weight: &[f32], bias: &[f32], eps: f32, dst: &mut [f32]) {
    layer_norm_row(src, weight, bias, eps, dst)
}

/// [`layer_norm_row`] with the widest instruction set the CPU offers.
fn layer_norm_row_dispatch(src: &[f32], weight: &[f32], bias: &[f32], eps: f32, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { layer_norm_row_avx2(src, weight, bias, eps, dst) };
    }
    layer_norm_row(src, weight, bias, eps, dst)
}

#[derive(Debug)]
struct LayerNormOp {
    eps: f32,
}

/// How the layer norm reads and writes the rows of a storage type; its statistics and arithmetic run in f32.
trait NormElement: WithDType {
    /// `values` in f32: borrowed when they are f32.
    fn as_f32(values: &[Self]) -> Cow<'_, [f32]>;
    /// Normalises the `dim`-wide rows of `src` into `dst`.
    fn normalise_rows(
        src: &[Self],
        weight: &[f32],
        bias: &[f32],
        eps: f32,
        dim: usize,
        dst: &mut [Self],
    );
}

impl NormElement for f32 {
    fn as_f32(values: &[f32]) -> Cow<'_, [f32]> {
        Cow::Borrowed(values)
    }

    /// Straight from the input to the output.
    fn normalise_rows(
        src: &[f32],
        weight: &[f32],
        bias: &[f32],
        eps: f32,
        dim: usize,
        dst: &mut [f32],
    ) {
        for (src, dst) in src.chunks_exact(dim).zip(dst.chunks_exact_mut(dim)) {
            layer_norm_row_dispatch(src, weight, bias, eps, dst);
        }
    }
}

impl NormElement for f16 {
    fn as_f32(values: &[f16]) -> Cow<'_, [f32]> {
        Cow::Owned(values.iter().map(|v| v.to_f32()).collect())
    }

    /// Each row widened to f32, normalised, and rounded back.
    fn normalise_rows(
        src: &[f16],
        weight: &[f32],
        bias: &[f32],
        eps: f32,
        dim: usize,
        dst: &mut [f16],
    ) {
        let mut row_in = vec![0f32; dim];
        let mut row_out = vec![0f32; dim];
        for (src, dst) in src.chunks_exact(dim).zip(dst.chunks_exact_mut(dim)) {
            for (wide, value) in row_in.iter_mut().zip(src) {
                *wide = value.to_f32();
            }
            layer_norm_row_dispatch(&row_in, weight, bias, eps, &mut row_out);
            for (value, wide) in dst.iter_mut().zip(&row_out) {
                *value = f16::from_f32(*wide);
            }
        }
    }
}

impl LayerNormOp {
    /// Checks the operands, then normalises the rows of `xs` in parallel tasks of [`CHUNK`] elements' worth of rows
    /// (one task runs inline).
    fn run<T: NormElement>(
        &self,
        xs: &[T],
        xs_layout: &Layout,
        weight: &[T],
        weight_layout: &Layout,
        bias: &[T],
        bias_layout: &Layout,
    ) -> candle_core::Result<Vec<T>> {
        let xs = contiguous_slice(xs, xs_layout, "layer norm input")?;
        let weight = contiguous_slice(weight, weight_layout, "layer norm weight")?;
        let bias = contiguous_slice(bias, bias_layout, "layer norm bias")?;
        let dim = weight.len();
        if dim == 0 || bias.len() != dim || xs_layout.shape().dims().last() != Some(&dim) {
            candle_core::bail!(
                "layer norm: input {:?}, weight [{dim}], bias [{}]",
                xs_layout.shape().dims(),
                bias.len()
            );
        }
        let (weight, bias) = (T::as_f32(weight), T::as_f32(bias));
        let mut dst = vec![T::zero(); xs.len()];
        let rows_per_task = (CHUNK / dim).max(1);
        if xs.len() <= rows_per_task * dim {
            T::normalise_rows(xs, &weight, &bias, self.eps, dim, &mut dst);
        } else {
            xs.par_chunks(rows_per_task * dim)
                .zip(dst.par_chunks_mut(rows_per_task * dim))
                .for_each(|(src, dst)| T::normalise_rows(src, &weight, &bias, self.eps, dim, dst));
        }
        Ok(dst)
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "kosmos-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = xs_layout.shape().clone();
        match (xs, weight, bias) {
            (CpuStorage::F32(xs), CpuStorage::F32(weight), CpuStorage::F32(bias)) => Ok((
                CpuStorage::F32(self.run(
                    xs,
                    xs_layout,
                    weight,
                    weight_layout,
                    bias,
                    bias_layout,
                )?),
                shape,
            )),
            (CpuStorage::F16(xs), CpuStorage::F16(weight), CpuStorage::F16(bias)) => Ok((
                CpuStorage::F16(self.run(
                    xs,
                    xs_layout,
                    weight,
                    weight_layout,
                    bias,
                    bias_layout,
                )?),
                shape,
            )),
            _ => candle_core::bail!("kosmos-layer-norm: unsupported dtype {:?}", xs.dtype()),
        }
    }
}

/// LayerNorm over the last dimension of `xs` (CPU, f32/f16; statistics in f32), parallel over rows.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(xs
        .contiguous()?
        .apply_op3_no_bwd(weight, bias, &LayerNormOp { eps: eps as f32 })?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Module, Tensor};

    use super::*;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    #[test]
    fn fused_activations_equal_candle_ops_to_float_rounding() -> Result<()> {
        let values: Vec<f32> = (0..20_001)
            .map(|i| (i as f32 - 10_000.0) / 1_000.0)
            .collect();
        let xs = Tensor::from_vec(values, 20_001, &Device::Cpu)?;
        let error = max_abs_diff(&activation(&xs, ActivationKind::GeluErf)?, &xs.gelu_erf()?)?;
        assert!(error < 1e-6, "gelu error {error}");
        let expected = (&xs * candle_nn::ops::sigmoid(&(&xs * 1.702)?)?)?;
        let error = max_abs_diff(&activation(&xs, ActivationKind::QuickGelu)?, &expected)?;
        assert!(error < 1e-6, "quick gelu error {error}");
        let error = max_abs_diff(&activation(&xs, ActivationKind::GeluTanh)?, &xs.gelu()?)?;
        assert!(error < 1e-6, "tanh gelu error {error}");
        // Far tails: no overflow, no NaN.
        let tails = Tensor::new(&[-1e4f32, -100.0, 100.0, 1e4], &Device::Cpu)?;
        for kind in [
            ActivationKind::GeluErf,
            ActivationKind::QuickGelu,
            ActivationKind::GeluTanh,
        ] {
            let out = activation(&tails, kind)?.to_vec1::<f32>()?;
            for (value, expected) in out.iter().zip([0.0, 0.0, 100.0, 1e4]) {
                assert!((value - expected).abs() < 1e-6, "{kind:?}: {out:?}");
            }
        }
        Ok(())
    }

    /// The portable loop, the AVX2 and AVX-512 builds and the in-place forms of each activation agree to the bit,
    /// over ordinary values, both zeros, subnormals, huge values, infinities and NaN.
    #[test]
    fn every_activation_path_gives_the_same_bits() {
        let mut values: Vec<f32> = (0..40_000)
            .map(|i| (i as f32 - 20_000.0) * 7.3e-4)
            .collect();
        values.extend([
            0.0,
            -0.0,
            1e-40,
            -1e-40,
            f32::MIN_POSITIVE,
            3e38,
            -3e38,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            88.0,
            -88.0,
            1e4,
            -1e4,
        ]);
        let bits = |values: &[f32]| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for kind in [
            ActivationKind::GeluErf,
            ActivationKind::QuickGelu,
            ActivationKind::GeluTanh,
        ] {
            let mut want = vec![0f32; values.len()];
            activation_chunk(kind, &values, &mut want);
            let want = bits(&want);
            let mut in_place = values.clone();
            activation_in_place(kind, &mut in_place);
            assert_eq!(bits(&in_place), want, "{kind:?}: in place");
            let mut dispatched = vec![0f32; values.len()];
            activation_chunk_dispatch(kind, &values, &mut dispatched);
            assert_eq!(bits(&dispatched), want, "{kind:?}: dispatched");
            let mut dispatched = values.clone();
            activation_in_place_dispatch(kind, &mut dispatched);
            assert_eq!(bits(&dispatched), want, "{kind:?}: dispatched in place");
            #[cfg(target_arch = "x86_64")]
            {
                type Chunk = unsafe fn(ActivationKind, &[f32], &mut [f32]);
                type InPlace = unsafe fn(ActivationKind, &mut [f32]);
                let paths: [(&str, bool, Chunk, InPlace); 2] = [
                    (
                        "AVX2",
                        std::arch::is_x86_feature_detected!("avx2")
                            && std::arch::is_x86_feature_detected!("fma"),
                        activation_chunk_avx2,
                        activation_in_place_avx2,
                    ),
                    (
                        "AVX-512",
                        std::arch::is_x86_feature_detected!("avx512f"),
                        activation_chunk_avx512,
                        activation_in_place_avx512,
                    ),
                ];
                for (name, available, chunk, in_place) in paths {
                    if !available {
                        continue;
                    }
                    let mut got = vec![0f32; values.len()];
                    // SAFETY: the CPU has the path's features (checked above).
                    unsafe { chunk(kind, &values, &mut got) };
                    assert_eq!(bits(&got), want, "{kind:?}: {name}");
                    let mut got = values.clone();
                    // SAFETY: as above.
                    unsafe { in_place(kind, &mut got) };
                    assert_eq!(bits(&got), want, "{kind:?}: {name} in place");
                }
            }
        }
    }

    #[test]
    fn exp_f32_is_within_float_rounding_of_exp() {
        for i in 0..=175_000 {
            let x = -87.0 + i as f32 * 1e-3;
            let expected = (x as f64).exp();
            let error = ((exp_f32(x) as f64 - expected) / expected).abs();
            assert!(error < 3e-7, "exp({x}): relative error {error}");
        }
    }

    #[test]
    fn fused_layer_norm_equals_candle_layer_norm() -> Result<()> {
        let device = Device::Cpu;
        for dim in [37, 64, 768] {
            let xs = (Tensor::randn(0f32, 1f32, (5, 3, dim), &device)? + 0.5)?;
            let weight = Tensor::randn(1f32, 0.1f32, dim, &device)?;
            let bias = Tensor::randn(0f32, 0.1f32, dim, &device)?;
            let expected =
                candle_nn::LayerNorm::new(weight.clone(), bias.clone(), 1e-5).forward(&xs)?;
            let error = max_abs_diff(&layer_norm(&xs, &weight, &bias, 1e-5)?, &expected)?;
            assert!(error < 1e-5, "dim {dim}: error {error}");
        }
        Ok(())
    }
}

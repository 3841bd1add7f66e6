//! The weight product of [`crate::Projection`] on the CPU in f32, with the weight packed once at load time into
//! column panels.
//!
//! Decoding multiplies a few rows (one per running sequence) by every weight of the model, so a step costs what
//! streaming the weights from memory costs, and a batch of 16 rows should cost about what one row does. `gemm`
//! (candle's CPU matrix product) does not get there: it repacks the weight on every call and runs an AVX2 kernel,
//! so 16 rows cost about 3.2× one row (`docs/benchmarks.md`). Here the weight is packed at load time into panels of
//! [`PANEL`] output columns, each `(in, PANEL)` contiguous, and one kernel serves every row count:
//!
//! * a task is one panel and up to [`TASK_ROWS`] rows; within it, groups of up to [`GROUP_ROWS`] rows sweep the
//!   panel once, each group holding its `rows × PANEL` sums in registers (AVX-512: 6 × 4 accumulators), so the first
//!   group streams the panel from memory and the others find it in the core's L2;
//! * every output element is `bias + Σ_k x[k] · w[k]` summed by fused multiply-adds in increasing `k`, whatever the
//!   number of rows, the group a row falls in, or the thread: a row's output is bit-identical alone or in any batch
//!   (the engine's batched-equals-solo rule holds by construction, not by luck of `gemm`'s blocking).
//!
//! Without AVX-512 (older x86, other architectures) the packed weight is multiplied panel by panel with `gemm`
//! (same results within rounding, the batch invariance of `gemm`'s own blocking).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::{ActivationKind, SharedMut, activation_in_place_dispatch};
use crate::memory::zeroed_huge_page_vec;

/// Output columns per panel: four 16-lane AVX-512 registers.
pub(crate) const PANEL: usize = 64;

/// Rows whose sums one sweep of a panel keeps in registers (6 × 4 accumulators of the 32 AVX-512 registers).
const GROUP_ROWS: usize = 6;

/// Rows per task: a task sweeps its panel `TASK_ROWS / GROUP_ROWS` times, from L2 after the first.
const TASK_ROWS: usize = 8 * GROUP_ROWS;

/// `(in, out)` → `(panels, in, PANEL)` contiguous, `panels = ⌈out / PANEL⌉`, the last panel's missing columns zero
/// (CPU, f32). The panels are stored in memory offered to huge pages (`memory.rs`): each decode step streams them.
pub(crate) fn pack(weight_t: &Tensor) -> Result<Tensor> {
    let (in_dim, out_dim) = weight_t.dims2()?;
    let panels = out_dim.div_ceil(PANEL);
    let weight: Vec<f32> = weight_t.flatten_all()?.to_vec1()?;
    let Some(mut packed) = zeroed_huge_page_vec::<f32>(panels * in_dim * PANEL) else {
        return Err(crate::error::ModelError::InvalidInput(format!(
            "a ({in_dim}, {out_dim}) weight does not fit in memory"
        )));
    };
    for panel in 0..panels {
        let (col, cols) = (panel * PANEL, PANEL.min(out_dim - panel * PANEL));
        for k in 0..in_dim {
            let to = (panel * in_dim + k) * PANEL;
            packed[to..to + cols].copy_from_slice(&weight[k * out_dim + col..][..cols]);
        }
    }
    Ok(Tensor::from_vec(
        packed,
        (panels, in_dim, PANEL),
        weight_t.device(),
    )?)
}

/// The inverse of [`pack`]: `(panels, in, PANEL)` → `(in, out)` contiguous.
pub(crate) fn unpack(packed: &Tensor, out_dim: usize) -> Result<Tensor> {
    let (panels, in_dim, _) = packed.dims3()?;
    Ok(packed
        .transpose(0, 1)?
        .reshape((in_dim, panels * PANEL))?
        .narrow(1, 0, out_dim)?
        .contiguous()?)
}

/// Which code multiplies: the best the CPU offers, or the `gemm` fallback (tests compare the two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Best,
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "chosen only by tests; CPUs without AVX-512 reach its code via Best"
        )
    )]
    Gemm,
}

/// `activation(xs (rows, in) · W + bias (out))` → `(rows, out)` with `W` packed by [`pack`] (CPU, f32). The
/// activation, if any, runs on each block of the output as soon as a task has summed it, while the block is in the
/// core's L1 cache: the same function of each element as the activation op (`kernels::activation`), so the same
/// bits, without a second pass over the output.
pub(crate) fn linear(
    xs: &Tensor,
    packed: &Tensor,
    bias: &Tensor,
    out_dim: usize,
    activation: Option<ActivationKind>,
) -> Result<Tensor> {
    linear_with(xs, packed, bias, out_dim, Kernel::Best, activation)
}

/// [`linear`] with the kernel chosen (tests compare the two).
fn linear_with(
    xs: &Tensor,
    packed: &Tensor,
    bias: &Tensor,
    out_dim: usize,
    kernel: Kernel,
    activation: Option<ActivationKind>,
) -> Result<Tensor> {
    Ok(xs.apply_op3_no_bwd(
        packed,
        bias,
        &PanelLinearOp {
            out_dim,
            kernel,
            activation,
        },
    )?)
}

/// Rows `ids` of the weight in the checkpoint's `(out, in)` layout, i.e. columns of `W`, read from its panels:
/// `(ids.len(), in)`. A tied LM head stores the vocabulary once, packed, and the token embeddings are gathered from
/// it (CPU, f32). An id at or past `out_dim` is an error naming it.
pub(crate) fn gather_columns(packed: &Tensor, out_dim: usize, ids: &[u32]) -> Result<Tensor> {
    Ok(packed.apply_op1_no_bwd(&GatherColumns {
        ids: ids.to_vec(),
        out_dim,
    })?)
}

#[derive(Debug)]
struct GatherColumns {
    ids: Vec<u32>,
    out_dim: usize,
}

impl candle_core::CustomOp1 for GatherColumns {
    fn name(&self) -> &'static str {
        "kosmos-gather-columns"
    }

    fn cpu_fwd(
        &self,
        packed: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(packed) = packed else {
            candle_core::bail!("kosmos-gather-columns: f32 only, got {:?}", packed.dtype());
        };
        let (panels, in_dim, panel) = layout.shape().dims3()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("kosmos-gather-columns: the packed weight must be contiguous");
        };
        if panel != PANEL || panels != self.out_dim.div_ceil(PANEL) {
            candle_core::bail!(
                "kosmos-gather-columns: packed weight {:?} for {} outputs",
                layout.shape().dims(),
                self.out_dim
            );
        }
        let packed = &packed[start..end];
        let mut dst = Vec::with_capacity(self.ids.len() * in_dim);
        for &id in &self.ids {
            let id = id as usize;
            if id >= self.out_dim {
                candle_core::bail!(
                    "kosmos-gather-columns: id {id} is not below {}",
                    self.out_dim
                );
            }
            let column = &packed[(id / PANEL) * in_dim * PANEL + id % PANEL..];
            dst.extend((0..in_dim).map(|k| column[k * PANEL]));
        }
        Ok((CpuStorage::F32(dst), Shape::from((self.ids.len(), in_dim))))
    }
}

#[derive(Debug)]
struct PanelLinearOp {
    out_dim: usize,
    kernel: Kernel,
    activation: Option<ActivationKind>,
}

/// What one product reads and writes, checked: `xs` rows at `x_stride` (unit column stride), the packed panels, the
/// bias and the destination `(rows, out)`.
struct Operands<'a> {
    xs: &'a [f32],
    x_stride: usize,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    panels: &'a [f32],
    bias: &'a [f32],
    activation: Option<ActivationKind>,
}

impl PanelLinearOp {
    fn run(
        &self,
        xs: &[f32],
        xs_layout: &Layout,
        packed: &[f32],
        packed_layout: &Layout,
        bias: &[f32],
        bias_layout: &Layout,
    ) -> candle_core::Result<Vec<f32>> {
        let (rows, in_dim) = xs_layout.shape().dims2()?;
        let (panels, packed_in, panel) = packed_layout.shape().dims3()?;
        let out_dim = self.out_dim;
        if packed_in != in_dim
            || panel != PANEL
            || panels != out_dim.div_ceil(PANEL)
            || bias_layout.shape().dims1()? != out_dim
        {
            candle_core::bail!(
                "panel linear: input ({rows}, {in_dim}), packed weight {:?} for {out_dim} outputs, bias {:?}",
                packed_layout.shape().dims(),
                bias_layout.shape().dims()
            );
        }
        let Some((start, end)) = packed_layout.contiguous_offsets() else {
            candle_core::bail!("panel linear: the packed weight must be contiguous");
        };
        let packed = &packed[start..end];
        let Some((start, end)) = bias_layout.contiguous_offsets() else {
            candle_core::bail!("panel linear: the bias must be contiguous");
        };
        let bias = &bias[start..end];
        // Rows may be strided (a row slice of a wider tensor); columns must be adjacent, else copy once.
        let [row_stride, col_stride] = *xs_layout.stride() else {
            candle_core::bail!("panel linear: input must be 2-D");
        };
        let copied: Vec<f32>;
        let (xs, x_stride) = if col_stride == 1 || in_dim <= 1 {
            let start = xs_layout.start_offset();
            let end = if rows == 0 || in_dim == 0 {
                start
            } else {
                start + (rows - 1) * row_stride + in_dim
            };
            (&xs[start..end], row_stride)
        } else {
            let start = xs_layout.start_offset();
            copied = (0..rows)
                .flat_map(|r| (0..in_dim).map(move |k| (r, k)))
                .map(|(r, k)| xs[start + r * row_stride + k * col_stride])
                .collect();
            (&copied[..], in_dim)
        };
        let operands = Operands {
            xs,
            x_stride,
            rows,
            in_dim,
            out_dim,
            panels: packed,
            bias,
            activation: self.activation,
        };
        let mut dst: Vec<f32> = Vec::with_capacity(rows * out_dim);
        // SAFETY: every element is written below before it is read (each task writes its whole block; `gemm`'s
        // path fills the bias first).
        #[allow(clippy::uninit_vec)]
        unsafe {
            dst.set_len(rows * out_dim)
        };
        if rows == 0 || out_dim == 0 {
            return Ok(dst);
        }
        match self.kernel {
            Kernel::Best if has_avx512() => operands.run_tasks(SharedMut(dst.as_mut_ptr())),
            _ => operands.run_gemm(&mut dst),
        }
        Ok(dst)
    }
}

/// Whether the AVX-512 kernel runs on this CPU.
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Operands<'_> {
    /// Every (panel, row block) task in parallel, each with the AVX-512 kernel.
    fn run_tasks(&self, dst: SharedMut<f32>) {
        let panels = self.out_dim.div_ceil(PANEL);
        let row_blocks = self.rows.div_ceil(TASK_ROWS);
        // Consecutive tasks share a panel, so a thread that takes a run of them reads it from L2.
        (0..panels * row_blocks).into_par_iter().for_each(|task| {
            let (panel, block) = (task / row_blocks, task % row_blocks);
            let first_row = block * TASK_ROWS;
            let rows = TASK_ROWS.min(self.rows - first_row);
            let col = panel * PANEL;
            let cols = PANEL.min(self.out_dim - col);
            for group in (0..rows).step_by(GROUP_ROWS) {
                let row = first_row + group;
                let group_rows = GROUP_ROWS.min(rows - group);
                // SAFETY: `has_avx512()` held when `run` chose this path; the pointers address `group_rows` rows of
                // `in_dim` inputs at `x_stride`, the panel's `in_dim × PANEL` weights, its `cols` biases, and the
                // destination block rows `row..row + group_rows`, columns `col..col + cols`, which no other task
                // writes.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    avx512::group(
                        group_rows,
                        self.xs.as_ptr().add(row * self.x_stride),
                        self.x_stride,
                        self.panels.as_ptr().add(panel * self.in_dim * PANEL),
                        self.in_dim,
                        self.bias.as_ptr().add(col),
                        dst.get().add(row * self.out_dim + col),
                        self.out_dim,
                        cols,
                    )
                };
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!(
                    "the AVX-512 kernel is only chosen on x86_64 ({group_rows} rows, {dst:?})"
                );
                if let Some(kind) = self.activation {
                    for row in row..row + group_rows {
                        // SAFETY: the block this task just wrote, which no other task reads or writes.
                        let values = unsafe {
                            std::slice::from_raw_parts_mut(
                                dst.get().add(row * self.out_dim + col),
                                cols,
                            )
                        };
                        activation_in_place_dispatch(kind, values);
                    }
                }
            }
        });
    }

    /// Without AVX-512: [`Operands::gemm_products`], then the activation over each row.
    fn run_gemm(&self, dst: &mut [f32]) {
        self.gemm_products(dst);
        if let Some(kind) = self.activation {
            dst.par_chunks_mut(self.out_dim)
                .for_each(|row| activation_in_place_dispatch(kind, row));
        }
    }

    /// The bias, then one accumulating `gemm` per panel, panels in parallel.
    fn gemm_products(&self, dst: &mut [f32]) {
        dst.par_chunks_mut(self.out_dim)
            .for_each(|row| row.copy_from_slice(self.bias));
        if self.in_dim == 0 {
            return;
        }
        let dst = SharedMut(dst.as_mut_ptr());
        let panels = self.out_dim.div_ceil(PANEL);
        (0..panels).into_par_iter().for_each(|panel| {
            let col = panel * PANEL;
            // SAFETY: the pointers and strides describe the checked slices: `rows` input rows at `x_stride`, the
            // panel `(in_dim, PANEL)` row-major, and the destination columns `col..col + n` of `(rows, out_dim)`,
            // which no other panel writes.
            unsafe {
                gemm::gemm(
                    self.rows,
                    PANEL.min(self.out_dim - col),
                    self.in_dim,
                    dst.get().add(col),
                    1,
                    self.out_dim as isize,
                    true,
                    self.xs.as_ptr(),
                    1,
                    self.x_stride as isize,
                    self.panels.as_ptr().add(panel * self.in_dim * PANEL),
                    1,
                    PANEL as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            };
        });
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::{
        __m512, __mmask16, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_mask_storeu_ps,
        _mm512_maskz_loadu_ps, _mm512_set1_ps,
    };

    use super::PANEL;

    /// Lanes per register.
    const LANES: usize = 16;
    /// Registers per panel row.
    const REGS: usize = PANEL / LANES;

    /// The lanes of register `reg` that hold one of the first `cols` columns.
    fn mask(reg: usize, cols: usize) -> __mmask16 {
        let lanes = cols.saturating_sub(reg * LANES).min(LANES);
        ((1u32 << lanes) - 1) as __mmask16
    }

    /// `rows` (1..=6) rows of the destination block, dispatched to the kernel compiled for that count.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `xs` addresses `rows` rows of `in_dim` values `x_stride` apart, `panel` the panel's
    /// `in_dim × PANEL` weights, `bias` `cols` values, and `dst` `rows` rows of `cols` writable values
    /// `dst_stride` apart.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn group(
        rows: usize,
        xs: *const f32,
        x_stride: usize,
        panel: *const f32,
        in_dim: usize,
        bias: *const f32,
        dst: *mut f32,
        dst_stride: usize,
        cols: usize,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match rows {
                1 => kernel::<1>(xs, x_stride, panel, in_dim, bias, dst, dst_stride, cols),
                2 => kernel::<2>(xs, x_stride, panel, in_dim, bias, dst, dst_stride, cols),
                3 => kernel::<3>(xs, x_stride, panel, in_dim, bias, dst, dst_stride, cols),
                4 => kernel::<4>(xs, x_stride, panel, in_dim, bias, dst, dst_stride, cols),
                5 => kernel::<5>(xs, x_stride, panel, in_dim, bias, dst, dst_stride, cols),
                6 => kernel::<6>(xs, x_stride, panel, in_dim, bias, dst, dst_stride, cols),
                _ => unreachable!("a group has 1..=6 rows, got {rows}"),
            }
        }
    }

    /// `R` rows × one panel: the `R × 4` sums start at the bias and take one fused multiply-add per weight
    /// register per row for `k = 0, 1, …, in_dim - 1`.
    ///
    /// # Safety
    /// As [`group`], with `rows = R`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel<const R: usize>(
        xs: *const f32,
        x_stride: usize,
        panel: *const f32,
        in_dim: usize,
        bias: *const f32,
        dst: *mut f32,
        dst_stride: usize,
        cols: usize,
    ) {
        let masks: [__mmask16; REGS] = std::array::from_fn(|reg| mask(reg, cols));
        // SAFETY: the caller's contract covers every address below; masked lanes are neither read nor written.
        unsafe {
            let start: [__m512; REGS] =
                std::array::from_fn(|reg| _mm512_maskz_loadu_ps(masks[reg], bias.add(reg * LANES)));
            let mut acc: [[__m512; REGS]; R] = [start; R];
            for k in 0..in_dim {
                let row = panel.add(k * PANEL);
                // Full loads: the panel is zero-padded to PANEL columns.
                let w: [__m512; REGS] =
                    std::array::from_fn(|reg| _mm512_loadu_ps(row.add(reg * LANES)));
                for (r, sums) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*xs.add(r * x_stride + k));
                    for (sum, &w) in sums.iter_mut().zip(&w) {
                        *sum = _mm512_fmadd_ps(x, w, *sum);
                    }
                }
            }
            for (r, sums) in acc.iter().enumerate() {
                for (reg, &sum) in sums.iter().enumerate() {
                    _mm512_mask_storeu_ps(dst.add(r * dst_stride + reg * LANES), masks[reg], sum);
                }
            }
        }
    }
}

impl CustomOp3 for PanelLinearOp {
    fn name(&self) -> &'static str {
        "kosmos-panel-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        packed: &CpuStorage,
        packed_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match (xs, packed, bias) {
            (CpuStorage::F32(xs), CpuStorage::F32(packed), CpuStorage::F32(bias)) => {
                let rows = xs_layout.shape().dims2()?.0;
                let dst = self.run(xs, xs_layout, packed, packed_layout, bias, bias_layout)?;
                Ok((CpuStorage::F32(dst), Shape::from((rows, self.out_dim))))
            }
            _ => candle_core::bail!("kosmos-panel-linear: f32 only, got {:?}", xs.dtype()),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp, Tensor};

    use super::*;

    /// `x · W + b` in f64 on the host, `W` given `(in, out)`.
    fn reference(xs: &Tensor, weight_t: &Tensor, bias: &Tensor) -> Result<Vec<Vec<f64>>> {
        let xs: Vec<Vec<f32>> = xs.to_vec2()?;
        let w: Vec<Vec<f32>> = weight_t.to_vec2()?;
        let b: Vec<f32> = bias.to_vec1()?;
        Ok(xs
            .iter()
            .map(|x| {
                (0..b.len())
                    .map(|o| {
                        b[o] as f64
                            + x.iter()
                                .zip(&w)
                                .map(|(&x, w)| x as f64 * w[o] as f64)
                                .sum::<f64>()
                    })
                    .collect()
            })
            .collect())
    }

    fn run(
        xs: &Tensor,
        packed: &Tensor,
        bias: &Tensor,
        out_dim: usize,
        kernel: Kernel,
    ) -> Result<Tensor> {
        linear_with(xs, packed, bias, out_dim, kernel, None)
    }

    /// The activation inside the product gives the bits of the activation op applied to the product's output, for
    /// every kind, both kernels, row counts around the group and task sizes, widths around the panel's.
    #[test]
    fn a_fused_activation_gives_the_bits_of_the_activation_after() -> Result<()> {
        let device = Device::Cpu;
        for (in_dim, out_dim) in [(3, 7), (33, 64), (40, 65), (64, 200)] {
            let weight_t = Tensor::randn(0f32, 1f32, (in_dim, out_dim), &device)?;
            let bias = Tensor::randn(0f32, 1f32, out_dim, &device)?;
            let packed = pack(&weight_t)?;
            for rows in [1, 5, 6, 7, 13, 48, 49] {
                let xs = Tensor::randn(0f32, 1f32, (rows, in_dim), &device)?;
                for kernel in [Kernel::Best, Kernel::Gemm] {
                    let plain = run(&xs, &packed, &bias, out_dim, kernel)?;
                    for kind in [
                        ActivationKind::GeluErf,
                        ActivationKind::QuickGelu,
                        ActivationKind::GeluTanh,
                    ] {
                        let want: Vec<u32> = crate::kernels::activation(&plain, kind)?
                            .flatten_all()?
                            .to_vec1::<f32>()?
                            .iter()
                            .map(|v| v.to_bits())
                            .collect();
                        let got: Vec<u32> =
                            linear_with(&xs, &packed, &bias, out_dim, kernel, Some(kind))?
                                .flatten_all()?
                                .to_vec1::<f32>()?
                                .iter()
                                .map(|v| v.to_bits())
                                .collect();
                        assert_eq!(
                            got, want,
                            "{rows} x {in_dim} x {out_dim}, {kernel:?}, {kind:?}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn pack_then_unpack_is_the_identity_and_pads_with_zeros() -> Result<()> {
        let device = Device::Cpu;
        let weight_t = Tensor::randn(0f32, 1f32, (5, 70), &device)?;
        let packed = pack(&weight_t)?;
        assert_eq!(packed.dims(), &[2, 5, PANEL]);
        // Column 65 of the weight is column 1 of the second panel; the panel's columns 6.. are padding.
        let w: Vec<Vec<f32>> = weight_t.to_vec2()?;
        assert_eq!(packed.i((1, 3, 1))?.to_scalar::<f32>()?, w[3][65]);
        let padding: Vec<f32> = packed.i((1, .., 6..))?.flatten_all()?.to_vec1()?;
        assert!(padding.iter().all(|&v| v == 0.0));
        let back: Vec<Vec<f32>> = unpack(&packed, 70)?.to_vec2()?;
        assert_eq!(back, w);
        Ok(())
    }

    #[test]
    fn gathered_columns_are_the_weight_rows_and_a_bad_id_is_an_error() -> Result<()> {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 1f32, (70, 9), &device)?;
        let packed = pack(&weight.t()?.contiguous()?)?;
        let ids = [69u32, 0, 64, 63, 5, 5];
        let got: Vec<Vec<f32>> = gather_columns(&packed, 70, &ids)?.to_vec2()?;
        let rows: Vec<Vec<f32>> = weight.to_vec2()?;
        for (got, &id) in got.iter().zip(&ids) {
            assert_eq!(got, &rows[id as usize]);
        }
        let Err(error) = gather_columns(&packed, 70, &[70]) else {
            return Err(crate::error::ModelError::InvalidInput(
                "id 70 of 70 was gathered".into(),
            ));
        };
        let error = error.to_string();
        assert!(error.contains("id 70 is not below 70"), "{error}");
        Ok(())
    }

    /// Every row count around the group and task sizes, output widths around the panel width, both kernels.
    #[test]
    fn matches_a_float64_product_for_every_row_count_and_width() -> Result<()> {
        let device = Device::Cpu;
        for (in_dim, out_dim) in [(1, 1), (7, 63), (33, 64), (40, 65), (64, 200)] {
            let weight_t = Tensor::randn(0f32, 1f32, (in_dim, out_dim), &device)?;
            let bias = Tensor::randn(0f32, 1f32, out_dim, &device)?;
            let packed = pack(&weight_t)?;
            for rows in [1, 2, 5, 6, 7, 12, 13, 47, 48, 49, 100] {
                let xs = Tensor::randn(0f32, 1f32, (rows, in_dim), &device)?;
                let want = reference(&xs, &weight_t, &bias)?;
                for kernel in [Kernel::Best, Kernel::Gemm] {
                    let got: Vec<Vec<f32>> =
                        run(&xs, &packed, &bias, out_dim, kernel)?.to_vec2()?;
                    for (got, want) in got.iter().zip(&want) {
                        for (&g, &w) in got.iter().zip(want) {
                            let tolerance = 1e-5 * (1.0 + w.abs()) * (in_dim as f64).sqrt();
                            assert!(
                                (g as f64 - w).abs() <= tolerance,
                                "{rows} rows, {in_dim} x {out_dim}, {kernel:?}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// A row's output does not depend on the rows beside it: bit-identical alone, in any batch, at any position.
    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_any_batch() -> Result<()> {
        let device = Device::Cpu;
        let (in_dim, out_dim) = (300, 130);
        let weight_t = Tensor::randn(0f32, 1f32, (in_dim, out_dim), &device)?;
        let bias = Tensor::randn(0f32, 1f32, out_dim, &device)?;
        let packed = pack(&weight_t)?;
        let batch = Tensor::randn(0f32, 1f32, (61, in_dim), &device)?;
        let together: Vec<Vec<f32>> =
            run(&batch, &packed, &bias, out_dim, Kernel::Best)?.to_vec2()?;
        for row in [0, 5, 6, 47, 48, 60] {
            let alone: Vec<Vec<f32>> = run(
                &batch.narrow(0, row, 1)?,
                &packed,
                &bias,
                out_dim,
                Kernel::Best,
            )?
            .to_vec2()?;
            assert_eq!(alone[0], together[row], "row {row}");
            let pair: Vec<Vec<f32>> = run(
                &batch.narrow(0, row.min(59), 2)?,
                &packed,
                &bias,
                out_dim,
                Kernel::Best,
            )?
            .to_vec2()?;
            assert_eq!(pair[0], together[row.min(59)], "row {row} in a pair");
        }
        Ok(())
    }

    /// Strided inputs: a row slice of a wider tensor (row stride) and a transposed view (column stride).
    #[test]
    fn reads_strided_inputs() -> Result<()> {
        let device = Device::Cpu;
        let (in_dim, out_dim) = (20, 70);
        let weight_t = Tensor::randn(0f32, 1f32, (in_dim, out_dim), &device)?;
        let bias = Tensor::randn(0f32, 1f32, out_dim, &device)?;
        let packed = pack(&weight_t)?;
        let wide = Tensor::randn(0f32, 1f32, (9, 3 * in_dim), &device)?;
        let column_view = wide.narrow(1, in_dim, in_dim)?;
        let transposed_view = Tensor::randn(0f32, 1f32, (in_dim, 9), &device)?.t()?;
        for xs in [column_view, transposed_view] {
            let want: Vec<Vec<f32>> =
                run(&xs.contiguous()?, &packed, &bias, out_dim, Kernel::Best)?.to_vec2()?;
            let got: Vec<Vec<f32>> = run(&xs, &packed, &bias, out_dim, Kernel::Best)?.to_vec2()?;
            assert_eq!(got, want);
        }
        Ok(())
    }
}

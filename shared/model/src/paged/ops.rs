//! The two candle ops of the paged KV cache: [`WriteKv`] stores a step's keys and values in their slots of a layer's
//! pool (in place), and [`PagedAttention`] runs the attention of every query row of the step, each sequence reading
//! its own keys and values through its block table. One call of each per layer serves the whole step: decode rows
//! and prefill chunks of any number of sequences.
//!
//! Layouts (all contiguous):
//! * pool of one layer: `(num_blocks, 2, heads, block_size, head_dim)`; index 0 of dim 1 holds keys, 1 values;
//! * new keys and values: `(tokens, 2, heads, head_dim)`; slots: `(tokens,)` u32, `block * block_size + offset`;
//! * queries: `(tokens, heads, head_dim)`, already scaled by `head_dim^-0.5` (and rotated by xPos when on);
//! * meta: u32, for sequence `s` the four values `[q_start, q_len, context_len, table_offset]` at `4s..4s+4`, then
//!   block tables: the blocks of `s` are `meta[table_offset..table_offset + ceil(context_len / block_size)]`.
//!
//! Query row `q_start + i` attends the keys at positions `0..=context_len - q_len + i` (causal). Scores, softmax and
//! the weighted sum run in f32 whatever the storage dtype, with an online softmax over one block at a time; each
//! (sequence, head) is computed by the same code whatever else the step holds, and each query row independently of
//! the other rows of its chunk, so a sequence gets the same values batched or alone, in a prefill or a decode step.
//!
//! On the CPU the pool may be narrower than the queries (f16 or bf16 keys and values for f32 weights:
//! `KvCacheConfig::dtype`): [`WriteKv`] rounds the new rows to the pool's type, and the attention widens one block of
//! keys and of values to f32 before using it; its output has the queries' type. With the same type on both sides
//! an f32 pool is read in place, as before. The device kernels take one type for both.
//!
//! On the CPU the sequences run in parallel, a task walking one sequence's blocks for a group of its heads (all of
//! them when there are enough sequences to keep the pool busy), and a chunk's query rows go through the blocks a tile
//! of 16 rows at a time, so a prefill reads (and widens) each block once per tile rather than once per row. Each
//! (row, head) still runs its own arithmetic in its own order, so neither the grouping nor the tiling changes a value.

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp3, DType, InplaceOp3, Layout, Result, Shape, bail};
use half::slice::HalfFloatSliceExt as _;
use half::{bf16, f16};
use rayon::prelude::*;

/// Writes `(tokens, 2, heads, head_dim)` keys and values into a layer's pool at `(tokens,)` u32 slots.
#[derive(Debug, Clone, Copy)]
pub struct WriteKv;

/// Attention of a step's query rows over the paged keys and values (see the module doc for the layouts).
#[derive(Debug, Clone, Copy)]
pub struct PagedAttention {
    /// Sequences described by `meta`.
    pub num_seqs: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// The largest `context_len` in `meta` (a launch bound for device kernels).
    pub max_context: usize,
    /// The largest `q_len` in `meta` (likewise).
    pub max_q_len: usize,
}

/// A storage element the ops read and write through f32.
trait Element: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(value: f32) -> Self;
    /// `src` as f32: borrowed as is when it is f32, else widened into `scratch` (of at least `src.len()`).
    fn widen<'a>(src: &'a [Self], scratch: &'a mut [f32]) -> &'a [f32];
    /// Stores `src` into `dst` (of the same length), rounding to nearest even when narrower.
    fn narrow(src: &[f32], dst: &mut [Self]);
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        value
    }
    #[inline(always)]
    fn widen<'a>(src: &'a [Self], _scratch: &'a mut [f32]) -> &'a [f32] {
        src
    }
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

impl Element for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        f16::from_f32(value)
    }
    #[inline(always)]
    fn widen<'a>(src: &'a [Self], scratch: &'a mut [f32]) -> &'a [f32] {
        let scratch = &mut scratch[..src.len()];
        widen_f16(src, scratch);
        scratch
    }
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        bf16::from_f32(value)
    }
    #[inline(always)]
    fn widen<'a>(src: &'a [Self], scratch: &'a mut [f32]) -> &'a [f32] {
        let scratch = &mut scratch[..src.len()];
        // A bf16 is the top half of an f32: a shift, which the compiler vectorises (NaNs stay NaNs).
        for (wide, value) in scratch.iter_mut().zip(src) {
            *wide = f32::from_bits(u32::from(value.to_bits()) << 16);
        }
        scratch
    }
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
}

/// `src` widened into `dst` (same length): eight at a time with F16C where the CPU has it (`half`'s slice
/// conversion calls a function per eight values; this loop inlines the instruction), exactly as `f16::to_f32`.
#[inline(always)]
fn widen_f16(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU supports the features the function is compiled for.
        unsafe { widen_f16_f16c(src, dst) };
        return;
    }
    dst.iter_mut()
        .zip(src)
        .for_each(|(wide, value)| *wide = value.to_f32());
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
fn widen_f16_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};
    let mut src_chunks = src.chunks_exact(8);
    let mut dst_chunks = dst.chunks_exact_mut(8);
    for (from, to) in src_chunks.by_ref().zip(dst_chunks.by_ref()) {
        // SAFETY: both chunks hold exactly eight elements: 16 bytes read, 32 bytes written, unaligned accesses.
        unsafe {
            let half = _mm_loadu_si128(from.as_ptr().cast::<__m128i>());
            _mm256_storeu_ps(to.as_mut_ptr(), _mm256_cvtph_ps(half));
        }
    }
    for (wide, value) in dst_chunks
        .into_remainder()
        .iter_mut()
        .zip(src_chunks.remainder())
    {
        *wide = value.to_f32();
    }
}

/// The contiguous elements of a storage seen through `layout`.
fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("paged kv: {what} must be contiguous"),
    }
}

/// `(num_blocks, heads, block_size, head_dim)` of a pool layout.
fn pool_dims(layout: &Layout) -> Result<(usize, usize, usize, usize)> {
    match *layout.dims() {
        [blocks, 2, heads, block_size, head_dim] => Ok((blocks, heads, block_size, head_dim)),
        ref dims => bail!(
            "paged kv: the pool must be (num_blocks, 2, heads, block_size, head_dim), got {dims:?}"
        ),
    }
}

impl InplaceOp3 for WriteKv {
    fn name(&self) -> &'static str {
        "paged-kv-write"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        new_kv: &CpuStorage,
        new_l: &Layout,
        slots: &CpuStorage,
        slots_l: &Layout,
    ) -> Result<()> {
        let (blocks, heads, block_size, head_dim) = pool_dims(dst_l)?;
        let tokens = match *new_l.dims() {
            [tokens, 2, h, d] if h == heads && d == head_dim => tokens,
            ref dims => bail!(
                "paged kv: new keys and values must be (tokens, 2, {heads}, {head_dim}), got {dims:?}"
            ),
        };
        let CpuStorage::U32(slots) = slots else {
            bail!("paged kv: slots must be u32");
        };
        let slots = contiguous(slots, slots_l, "slots")?;
        if slots.len() != tokens {
            bail!("paged kv: {} slots for {tokens} tokens", slots.len());
        }
        if let Some(&bad) = slots
            .iter()
            .find(|&&slot| slot as usize >= blocks * block_size)
        {
            bail!("paged kv: slot {bad} is outside the pool ({blocks} blocks of {block_size})");
        }
        let Some((dst_start, _)) = dst_l.contiguous_offsets() else {
            bail!("paged kv: the pool must be contiguous");
        };
        let geometry = Geometry {
            heads,
            block_size,
            head_dim,
        };
        let dst_dtype = dst.dtype();
        match new_kv {
            CpuStorage::F32(src) => write_from(
                dst,
                dst_start,
                contiguous(src, new_l, "new kv")?,
                slots,
                geometry,
            ),
            CpuStorage::F16(src) => write_from(
                dst,
                dst_start,
                contiguous(src, new_l, "new kv")?,
                slots,
                geometry,
            ),
            CpuStorage::BF16(src) => write_from(
                dst,
                dst_start,
                contiguous(src, new_l, "new kv")?,
                slots,
                geometry,
            ),
            src => bail!(
                "paged kv: pool dtype {dst_dtype:?} and new kv dtype {:?}: both must be f32, f16 or bf16",
                src.dtype()
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        new_kv: &candle_core::CudaStorage,
        new_l: &Layout,
        slots: &candle_core::CudaStorage,
        slots_l: &Layout,
    ) -> Result<()> {
        super::cuda::write_kv_cuda(dst, dst_l, (new_kv, new_l), (slots, slots_l))
    }
}

#[derive(Debug, Clone, Copy)]
struct Geometry {
    heads: usize,
    block_size: usize,
    head_dim: usize,
}

impl Geometry {
    /// Offset of `(block, kv, head, offset)` in a pool.
    #[inline(always)]
    fn pool_offset(&self, block: usize, kv: usize, head: usize, offset: usize) -> usize {
        (((block * 2 + kv) * self.heads + head) * self.block_size + offset) * self.head_dim
    }
}

/// [`write`] into a pool of whichever float type `dst` holds.
fn write_from<S: Element>(
    dst: &mut CpuStorage,
    dst_start: usize,
    src: &[S],
    slots: &[u32],
    g: Geometry,
) -> Result<()> {
    match dst {
        CpuStorage::F32(dst) => write(&mut dst[dst_start..], src, slots, g),
        CpuStorage::F16(dst) => write(&mut dst[dst_start..], src, slots, g),
        CpuStorage::BF16(dst) => write(&mut dst[dst_start..], src, slots, g),
        dst => bail!(
            "paged kv: the pool must be f32, f16 or bf16, not {:?}",
            dst.dtype()
        ),
    }
    Ok(())
}

/// Copies each token's head rows to its slot, converting to the pool's type (a plain copy when the types match:
/// f32 is borrowed and copied; f16 and bf16 round-trip through f32 exactly).
fn write<S: Element, D: Element>(dst: &mut [D], src: &[S], slots: &[u32], g: Geometry) {
    let row = g.heads * g.head_dim;
    let mut scratch = vec![0f32; g.head_dim];
    for (token, &slot) in slots.iter().enumerate() {
        let (block, offset) = (slot as usize / g.block_size, slot as usize % g.block_size);
        for kv in 0..2 {
            for head in 0..g.heads {
                let from = token * 2 * row + kv * row + head * g.head_dim;
                let to = g.pool_offset(block, kv, head, offset);
                let wide = S::widen(&src[from..from + g.head_dim], &mut scratch);
                D::narrow(wide, &mut dst[to..to + g.head_dim]);
            }
        }
    }
}

/// One sequence of the step, read from `meta`.
#[derive(Debug, Clone, Copy)]
struct SeqMeta {
    q_start: usize,
    q_len: usize,
    context_len: usize,
    table_offset: usize,
}

/// Reads and checks `meta` against the query rows and the pool, so the kernels index without bounds failures.
fn read_meta(
    meta: &[u32],
    num_seqs: usize,
    tokens: usize,
    blocks: usize,
    block_size: usize,
) -> Result<Vec<SeqMeta>> {
    if meta.len() < 4 * num_seqs {
        bail!(
            "paged attention: meta holds {} values for {num_seqs} sequences",
            meta.len()
        );
    }
    let mut seqs = Vec::with_capacity(num_seqs);
    for s in 0..num_seqs {
        let [q_start, q_len, context_len, table_offset] =
            [0, 1, 2, 3].map(|i| meta[4 * s + i] as usize);
        let table_len = context_len.div_ceil(block_size);
        if q_len == 0 || q_len > context_len || q_start + q_len > tokens {
            bail!(
                "paged attention: sequence {s} has rows {q_start}..{} and context {context_len} for {tokens} \
                 query rows",
                q_start + q_len
            );
        }
        let Some(table) = meta.get(table_offset..table_offset + table_len) else {
            bail!("paged attention: the block table of sequence {s} is outside meta");
        };
        if let Some(&bad) = table.iter().find(|&&block| block as usize >= blocks) {
            bail!("paged attention: sequence {s} names block {bad} of {blocks}");
        }
        seqs.push(SeqMeta {
            q_start,
            q_len,
            context_len,
            table_offset,
        });
    }
    Ok(seqs)
}

impl CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        kv: &CpuStorage,
        kv_l: &Layout,
        meta: &CpuStorage,
        meta_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (blocks, heads, block_size, head_dim) = pool_dims(kv_l)?;
        if block_size != self.block_size {
            bail!(
                "paged attention: the pool has blocks of {block_size}, the op was built for {}",
                self.block_size
            );
        }
        let tokens = match *q_l.dims() {
            [tokens, h, d] if h == heads && d == head_dim => tokens,
            ref dims => bail!(
                "paged attention: queries must be (tokens, {heads}, {head_dim}), got {dims:?}"
            ),
        };
        let CpuStorage::U32(meta) = meta else {
            bail!("paged attention: meta must be u32");
        };
        let meta = contiguous(meta, meta_l, "meta")?;
        let seqs = read_meta(meta, self.num_seqs, tokens, blocks, block_size)?;
        let geometry = Geometry {
            heads,
            block_size,
            head_dim,
        };
        let shape = Shape::from((tokens, heads, head_dim));
        let storage = match q {
            CpuStorage::F32(q) => CpuStorage::F32(attend_kv(
                contiguous(q, q_l, "queries")?,
                kv,
                kv_l,
                meta,
                &seqs,
                geometry,
            )?),
            CpuStorage::F16(q) => CpuStorage::F16(attend_kv(
                contiguous(q, q_l, "queries")?,
                kv,
                kv_l,
                meta,
                &seqs,
                geometry,
            )?),
            CpuStorage::BF16(q) => CpuStorage::BF16(attend_kv(
                contiguous(q, q_l, "queries")?,
                kv,
                kv_l,
                meta,
                &seqs,
                geometry,
            )?),
            q => bail!(
                "paged attention: queries must be f32, f16 or bf16, not {:?}",
                q.dtype()
            ),
        };
        Ok((storage, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_l: &Layout,
        kv: &candle_core::CudaStorage,
        kv_l: &Layout,
        meta: &candle_core::CudaStorage,
        meta_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::paged_attention_cuda(self, (q, q_l), (kv, kv_l), (meta, meta_l))
    }
}

/// The dtypes the ops take.
pub(crate) fn supported(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// [`attend`] over a pool of whichever float type `kv` holds; the output has the queries' type.
fn attend_kv<Q: Element>(
    q: &[Q],
    kv: &CpuStorage,
    kv_l: &Layout,
    meta: &[u32],
    seqs: &[SeqMeta],
    g: Geometry,
) -> Result<Vec<Q>> {
    Ok(match kv {
        CpuStorage::F32(kv) => attend(q, contiguous(kv, kv_l, "pool")?, meta, seqs, g),
        CpuStorage::F16(kv) => attend(q, contiguous(kv, kv_l, "pool")?, meta, seqs, g),
        CpuStorage::BF16(kv) => attend(q, contiguous(kv, kv_l, "pool")?, meta, seqs, g),
        kv => bail!(
            "paged attention: the pool must be f32, f16 or bf16, not {:?}",
            kv.dtype()
        ),
    })
}

/// Runs the sequences in parallel, each as one task over all its heads when there are enough sequences to keep the
/// pool busy, else split into tasks of fewer heads (down to one); scatters the rows into `(tokens, heads, head_dim)`.
/// A task walks its sequence's blocks once for all its heads: a block's keys (then values) of consecutive heads are
/// contiguous in the pool, so a decode step reads each sequence's cache in long runs instead of head-sized pieces.
/// How the heads are grouped changes no value: each (row, head) runs the same arithmetic in any task.
fn attend<Q: Element, K: Element>(
    q: &[Q],
    kv: &[K],
    meta: &[u32],
    seqs: &[SeqMeta],
    g: Geometry,
) -> Vec<Q> {
    let tokens = q.len() / (g.heads * g.head_dim);
    // Four tasks per thread at least, so that a thread held up elsewhere leaves work to steal.
    let wanted_tasks = 4 * rayon::current_num_threads();
    let groups = wanted_tasks
        .div_ceil(seqs.len().max(1))
        .clamp(1, g.heads.max(1));
    let per_group = g.heads.div_ceil(groups.max(1)).max(1);
    let work: Vec<(usize, std::ops::Range<usize>)> = (0..seqs.len())
        .flat_map(|s| {
            (0..g.heads)
                .step_by(per_group)
                .map(move |first| (s, first..(first + per_group).min(g.heads)))
        })
        .collect();
    let results: Vec<Vec<Q>> = work
        .par_iter()
        .map(|(s, heads)| attend_heads_dispatch(q, kv, meta, &seqs[*s], heads.clone(), g))
        .collect();
    let mut out = vec![Q::from_f32(0.0); tokens * g.heads * g.head_dim];
    for ((s, heads), rows) in work.iter().zip(&results) {
        let seq = &seqs[*s];
        // Rows come out (query row, head in the range).
        for (index, row) in rows.chunks_exact(g.head_dim).enumerate() {
            let (i, head) = (index / heads.len(), heads.start + index % heads.len());
            let at = ((seq.q_start + i) * g.heads + head) * g.head_dim;
            out[at..at + g.head_dim].copy_from_slice(row);
        }
    }
    out
}

/// [`attend_heads`] compiled for AVX2 (its dot products and sums eight lanes wide; the build targets baseline x86-64,
/// whose SSE code does four). The same operations in the same order, so the same values as the baseline code.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_heads_avx2<Q: Element, K: Element>(
    q: &[Q],
    kv: &[K],
    meta: &[u32],
    seq: &SeqMeta,
    heads: std::ops::Range<usize>,
    g: Geometry,
) -> Vec<Q> {
    if g.head_dim == 64 {
        // Every Kosmos model's heads are 64 wide: with the width a constant the compiler unrolls a row's dot products
        // and sums into eight AVX registers' worth of straight-line code (the same operations: the same bits).
        let g = Geometry { head_dim: 64, ..g };
        return attend_heads::<Q, K, Avx2Dot>(q, kv, meta, seq, heads, g);
    }
    attend_heads::<Q, K, Avx2Dot>(q, kv, meta, seq, heads, g)
}

/// [`attend_heads`] with the widest instruction set the CPU offers.
fn attend_heads_dispatch<Q: Element, K: Element>(
    q: &[Q],
    kv: &[K],
    meta: &[u32],
    seq: &SeqMeta,
    heads: std::ops::Range<usize>,
    g: Geometry,
) -> Vec<Q> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { attend_heads_avx2(q, kv, meta, seq, heads, g) };
    }
    attend_heads::<Q, K, PortableDot>(q, kv, meta, seq, heads, g)
}

/// How [`attend_heads`] takes a dot product: [`dot`]'s arithmetic, written for an instruction set.
trait RowDot {
    fn dot(a: &[f32], b: &[f32]) -> f32;
}

/// [`dot`] as written (what the compiler makes of it for the baseline target).
struct PortableDot;

impl RowDot for PortableDot {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }
}

/// [`dot`] in AVX registers: the same products, sums and order, so the same bits. Only [`attend_heads_avx2`]
/// instantiates it (the compiler made 128-bit shuffles of the portable loop's eight lanes, a large share of the attention's time).
#[cfg(target_arch = "x86_64")]
struct Avx2Dot;

#[cfg(target_arch = "x86_64")]
impl RowDot for Avx2Dot {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: `Avx2Dot` is used only by `attend_heads_avx2`, which runs only once the CPU has shown AVX2 and FMA.
        unsafe { dot_avx(a, b) }
    }
}

/// [`dot`] with its eight lanes in one AVX register: `lane += a·b` (a product, then a sum: no fused multiply-add,
/// as in `dot`), then `((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7))`, then the tail.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
pub(super) fn dot_avx(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::{
        _mm_add_ps, _mm_add_ss, _mm_cvtss_f32, _mm_hadd_ps, _mm_movehdup_ps, _mm256_add_ps,
        _mm256_castps256_ps128, _mm256_extractf128_ps, _mm256_loadu_ps, _mm256_mul_ps,
        _mm256_setzero_ps,
    };
    let mut a_chunks = a.chunks_exact(8);
    let mut b_chunks = b.chunks_exact(8);
    let mut lanes = _mm256_setzero_ps();
    for (a, b) in a_chunks.by_ref().zip(b_chunks.by_ref()) {
        // SAFETY: both chunks hold exactly eight f32: unaligned 32-byte loads.
        let (a, b) = unsafe { (_mm256_loadu_ps(a.as_ptr()), _mm256_loadu_ps(b.as_ptr())) };
        lanes = _mm256_add_ps(lanes, _mm256_mul_ps(a, b));
    }
    let mut tail = 0f32;
    for (a, b) in a_chunks.remainder().iter().zip(b_chunks.remainder()) {
        tail += a * b;
    }
    // [l0 + l4, l1 + l5, l2 + l6, l3 + l7]
    let pairs = _mm_add_ps(
        _mm256_castps256_ps128(lanes),
        _mm256_extractf128_ps::<1>(lanes),
    );
    // [(l0 + l4) + (l1 + l5), (l2 + l6) + (l3 + l7), ..]
    let halves = _mm_hadd_ps(pairs, pairs);
    _mm_cvtss_f32(_mm_add_ss(halves, _mm_movehdup_ps(halves))) + tail
}

/// Query rows of one chunk computed together, a tile at a time: each block's keys and values are read (and widened,
/// for a half-precision pool) once per tile instead of once per row, and the tile's running state stays in the L1
/// cache (16 rows of queries and sums for one head, 8 KiB at head_dim 64; fewer rows when a task has more heads). A
/// decode step's chunk is one row.
const ROW_TILE: usize = 16;

/// The `(q_len, heads, head_dim)` output rows of the heads `heads` of one sequence. Each (row, head) runs exactly the
/// arithmetic it would run alone (its blocks in order, its online softmax, its sums): tiling and grouping heads only
/// change which one runs when, so a row gets the same value in a prefill chunk of any length or in a decode step.
#[inline(always)]
fn attend_heads<Q: Element, K: Element, D: RowDot>(
    q: &[Q],
    kv: &[K],
    meta: &[u32],
    seq: &SeqMeta,
    heads: std::ops::Range<usize>,
    g: Geometry,
) -> Vec<Q> {
    let (d, bs) = (g.head_dim, g.block_size);
    let table = &meta[seq.table_offset..seq.table_offset + seq.context_len.div_ceil(bs)];
    let past = seq.context_len - seq.q_len;
    let nh = heads.len();
    let mut out = Vec::with_capacity(seq.q_len * nh * d);
    let row_tile = (ROW_TILE / nh.max(1)).max(1);
    let tile = row_tile.min(seq.q_len);
    // Per (row of the tile, head), row-major: its query (f32), its weighted sum, and its softmax's running maximum
    // and total.
    let mut queries = vec![0f32; tile * nh * d];
    let mut sums = vec![0f32; tile * nh * d];
    let mut maxima = vec![f32::NEG_INFINITY; tile * nh];
    let mut totals = vec![0f32; tile * nh];
    let mut scores = vec![0f32; bs];
    // A block's keys and values of one head widened to f32 (unused when the pool is f32: read in place).
    let mut key_scratch = vec![0f32; bs * d];
    let mut value_scratch = vec![0f32; bs * d];
    for first in (0..seq.q_len).step_by(row_tile) {
        let rows = row_tile.min(seq.q_len - first);
        for (index, query) in queries.chunks_exact_mut(d).take(rows * nh).enumerate() {
            let (r, head) = (index / nh, heads.start + index % nh);
            let row = ((seq.q_start + first + r) * g.heads + head) * d;
            for (slot, value) in query.iter_mut().zip(&q[row..row + d]) {
                *slot = value.to_f32();
            }
        }
        sums[..rows * nh * d].fill(0.0);
        maxima[..rows * nh].fill(f32::NEG_INFINITY);
        totals[..rows * nh].fill(0.0);
        // Row `first + r` sees keys 0..=past + first + r; the tile's last row sees the most.
        let seen_by_last = past + first + rows;
        for (b, &block) in table.iter().enumerate().take(seen_by_last.div_ceil(bs)) {
            let block_start = b * bs;
            let in_block_last = (seen_by_last - block_start).min(bs);
            for (h, head) in heads.clone().enumerate() {
                let keys = g.pool_offset(block as usize, 0, head, 0);
                let keys = K::widen(&kv[keys..keys + in_block_last * d], &mut key_scratch);
                let values = g.pool_offset(block as usize, 1, head, 0);
                let values = K::widen(&kv[values..values + in_block_last * d], &mut value_scratch);
                // The rows that see at least the block's first key.
                for r in block_start.saturating_sub(past + first)..rows {
                    let state = r * nh + h;
                    let in_block = (past + first + r + 1 - block_start).min(bs);
                    let query = &queries[state * d..(state + 1) * d];
                    let mut block_max = f32::NEG_INFINITY;
                    for (j, score) in scores.iter_mut().enumerate().take(in_block) {
                        *score = D::dot(query, &keys[j * d..(j + 1) * d]);
                        block_max = block_max.max(*score);
                    }
                    let max = &mut maxima[state];
                    let new_max = max.max(block_max);
                    if new_max == f32::NEG_INFINITY {
                        continue;
                    }
                    let sum = &mut sums[state * d..(state + 1) * d];
                    let total = &mut totals[state];
                    let rescale = (*max - new_max).exp();
                    if rescale != 1.0 {
                        *total *= rescale;
                        sum.iter_mut().for_each(|value| *value *= rescale);
                    }
                    *max = new_max;
                    for (j, &score) in scores.iter().enumerate().take(in_block) {
                        let weight = (score - new_max).exp();
                        *total += weight;
                        axpy(sum, weight, &values[j * d..(j + 1) * d]);
                    }
                }
            }
        }
        for (sum, &total) in sums.chunks_exact(d).zip(&totals).take(rows * nh) {
            let norm = if total > 0.0 { 1.0 / total } else { 0.0 };
            out.extend(sum.iter().map(|&value| Q::from_f32(value * norm)));
        }
    }
    out
}

/// `Σ a[i]·b[i]` with eight independent partial sums (vectorisable, and a fixed summation order).
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut a_chunks = a.chunks_exact(8);
    let mut b_chunks = b.chunks_exact(8);
    for (a, b) in a_chunks.by_ref().zip(b_chunks.by_ref()) {
        for lane in 0..8 {
            lanes[lane] += a[lane] * b[lane];
        }
    }
    let mut tail = 0f32;
    for (a, b) in a_chunks.remainder().iter().zip(b_chunks.remainder()) {
        tail += a * b;
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
        + tail
}

/// `acc += weight · values`.
#[inline(always)]
fn axpy(acc: &mut [f32], weight: f32, values: &[f32]) {
    for (slot, value) in acc.iter_mut().zip(values) {
        *slot += weight * value;
    }
}

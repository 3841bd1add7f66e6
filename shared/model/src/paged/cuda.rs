//! CUDA side of the paged ops: launches of the kernels in `kernels/paged_attention.cu`, which `build.rs` compiles
//! to PTX with nvcc (for the virtual architecture of `CUDA_COMPUTE_CAP`; the driver JIT-compiles it for the GPU it
//! runs on). The module is loaded once per device through candle's custom-module cache, as candle-nn's own CUDA
//! ops do.
//!
//! Launches per call, whatever the batch: [`write_kv_cuda`] one kernel (a thread block per token),
//! [`paged_attention_cuda`] one kernel (a thread block per query row and head, see the `.cu` file for why that makes
//! every sequence's result independent of the rest of the batch).
//!
//! What is checked where: shapes, dtypes and contiguity here, on the host, with the CPU ops' messages; the contents
//! of `slots` and `meta` live on the device and are not read back (a copy per layer would stall the stream). A slot
//! outside the pool is skipped, and a sequence whose metadata the CPU op would reject gets rows of NaN.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, bail};
use half::{bf16, f16};

/// The PTX of `kernels/paged_attention.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
/// Name of the module in candle's per-device cache of custom modules.
const MODULE: &str = "kosmos_paged_attention";
/// Threads per attention block (`kThreads` in the `.cu` file).
const ATTENTION_THREADS: u32 = 128;
/// Warps per attention block (`kWarps`).
const ATTENTION_WARPS: u32 = ATTENTION_THREADS / 32;
/// The largest head dim the attention kernel holds (`kThreads * kMaxDimsPerThread`).
const MAX_HEAD_DIM: usize = 512;
/// Threads per write block.
const WRITE_THREADS: u32 = 256;

/// `(num_blocks, heads, block_size, head_dim)` of a pool.
fn pool_dims(layout: &Layout) -> Result<(usize, usize, usize, usize)> {
    match *layout.dims() {
        [blocks, 2, heads, block_size, head_dim] => Ok((blocks, heads, block_size, head_dim)),
        ref dims => bail!(
            "paged kv: the pool must be (num_blocks, 2, heads, block_size, head_dim), got {dims:?}"
        ),
    }
}

/// The element range of a contiguous tensor in its storage.
fn contiguous_range(layout: &Layout, what: &str) -> Result<std::ops::Range<usize>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(start..end),
        None => bail!("paged kv: {what} must be contiguous"),
    }
}

/// A size passed to a kernel as `uint32_t`.
fn as_u32(value: usize, what: &str) -> Result<u32> {
    u32::try_from(value)
        .map_err(|_| candle_core::Error::Msg(format!("paged kv: {what} {value} exceeds u32")))
}

/// The kernel-name suffix of a storage dtype.
fn dtype_suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        other => bail!("paged kv: {other:?} is not a supported storage dtype (f32, f16, bf16)"),
    }
}

/// Writes `new_kv` `(tokens, 2, heads, head_dim)` into the pool `dst` at the `(tokens,)` u32 `slots`.
pub(crate) fn write_kv_cuda(
    dst: &mut CudaStorage,
    dst_l: &Layout,
    new_kv: (&CudaStorage, &Layout),
    slots: (&CudaStorage, &Layout),
) -> Result<()> {
    let ((new_kv, new_l), (slots, slots_l)) = (new_kv, slots);
    let (blocks, heads, block_size, head_dim) = pool_dims(dst_l)?;
    let tokens = match *new_l.dims() {
        [tokens, 2, h, d] if h == heads && d == head_dim => tokens,
        ref dims => bail!(
            "paged kv: new keys and values must be (tokens, 2, {heads}, {head_dim}), got {dims:?}"
        ),
    };
    if slots.dtype() != DType::U32 {
        bail!("paged kv: slots must be u32");
    }
    if slots_l.shape().elem_count() != tokens {
        bail!(
            "paged kv: {} slots for {tokens} tokens",
            slots_l.shape().elem_count()
        );
    }
    if dst.dtype() != new_kv.dtype() {
        bail!(
            "paged kv: pool dtype {:?} and new kv dtype {:?} must be the same float type",
            dst.dtype(),
            new_kv.dtype()
        );
    }
    let launch = WriteLaunch {
        name: format!("write_kv_{}", dtype_suffix(dst.dtype())?),
        dst: contiguous_range(dst_l, "the pool")?,
        new_kv: contiguous_range(new_l, "new kv")?,
        slots: contiguous_range(slots_l, "slots")?,
        tokens: as_u32(tokens, "tokens")?,
        heads: as_u32(heads, "heads")?,
        head_dim: as_u32(head_dim, "head_dim")?,
        block_size: as_u32(block_size, "block_size")?,
        num_blocks: as_u32(blocks, "num_blocks")?,
    };
    if tokens == 0 || heads == 0 || head_dim == 0 {
        return Ok(());
    }
    match dst.dtype() {
        DType::F32 => launch.run::<f32>(dst, new_kv, slots),
        DType::F16 => launch.run::<f16>(dst, new_kv, slots),
        DType::BF16 => launch.run::<bf16>(dst, new_kv, slots),
        other => bail!("paged kv: {other:?} is not a supported storage dtype (f32, f16, bf16)"),
    }
}

/// One checked `write_kv_*` launch.
struct WriteLaunch {
    name: String,
    dst: std::ops::Range<usize>,
    new_kv: std::ops::Range<usize>,
    slots: std::ops::Range<usize>,
    tokens: u32,
    heads: u32,
    head_dim: u32,
    block_size: u32,
    num_blocks: u32,
}

impl WriteLaunch {
    fn run<T: CudaDType + DeviceRepr>(
        self,
        dst: &mut CudaStorage,
        new_kv: &CudaStorage,
        slots: &CudaStorage,
    ) -> Result<()> {
        let device = dst.device().clone();
        let func = device.get_or_load_custom_func(&self.name, MODULE, PTX)?;
        let new_kv_view = new_kv.as_cuda_slice::<T>()?.slice(self.new_kv);
        let slots_view = slots.as_cuda_slice::<u32>()?.slice(self.slots);
        let mut dst_view = dst.as_cuda_slice_mut::<T>()?.slice_mut(self.dst);
        let config = LaunchConfig {
            grid_dim: (self.tokens, 1, 1),
            block_dim: (WRITE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = func.builder();
        builder.arg(&mut dst_view);
        builder.arg(&new_kv_view);
        builder.arg(&slots_view);
        candle_core::builder_arg!(
            builder,
            self.heads,
            self.head_dim,
            self.block_size,
            self.num_blocks
        );
        // SAFETY: the argument list matches `write_kv_*` in the .cu file; every index the kernel forms stays inside
        // the slices (slots outside the pool are skipped there, the sizes were checked against the layouts here).
        unsafe { builder.launch(config) }.w()?;
        Ok(())
    }
}

/// Runs [`super::PagedAttention`] on the device: `q` `(tokens, heads, head_dim)`, the pool
/// `(num_blocks, 2, heads, block_size, head_dim)` and the u32 `meta`; returns `(tokens, heads, head_dim)` in the
/// dtype of `q`.
///
/// `op.max_context` and `op.max_q_len` are not needed here: the grid has one block per query row and head, and
/// each block loops over its own row's keys.
pub(crate) fn paged_attention_cuda(
    op: &super::PagedAttention,
    q: (&CudaStorage, &Layout),
    kv: (&CudaStorage, &Layout),
    meta: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let ((q, q_l), (kv, kv_l), (meta, meta_l)) = (q, kv, meta);
    let (blocks, heads, block_size, head_dim) = pool_dims(kv_l)?;
    if block_size != op.block_size {
        bail!(
            "paged attention: the pool has blocks of {block_size}, the op was built for {}",
            op.block_size
        );
    }
    let tokens = match *q_l.dims() {
        [tokens, h, d] if h == heads && d == head_dim => tokens,
        ref dims => {
            bail!("paged attention: queries must be (tokens, {heads}, {head_dim}), got {dims:?}")
        }
    };
    if meta.dtype() != DType::U32 {
        bail!("paged attention: meta must be u32");
    }
    let meta_len = meta_l.shape().elem_count();
    if meta_len < 4 * op.num_seqs {
        bail!(
            "paged attention: meta holds {meta_len} values for {} sequences",
            op.num_seqs
        );
    }
    if q.dtype() != kv.dtype() {
        bail!(
            "paged attention: queries {:?} and pool {:?} must be the same float type",
            q.dtype(),
            kv.dtype()
        );
    }
    if head_dim > MAX_HEAD_DIM {
        bail!("paged attention: head_dim {head_dim} exceeds the CUDA kernel's {MAX_HEAD_DIM}");
    }
    if block_size == 0 {
        bail!("paged attention: block_size must be positive");
    }
    let launch = AttentionLaunch {
        name: format!("paged_attention_{}", dtype_suffix(q.dtype())?),
        q: contiguous_range(q_l, "queries")?,
        kv: contiguous_range(kv_l, "the pool")?,
        meta: contiguous_range(meta_l, "meta")?,
        tokens: as_u32(tokens, "tokens")?,
        out_len: tokens * heads * head_dim,
        args: [
            as_u32(meta_len, "meta length")?,
            as_u32(op.num_seqs, "num_seqs")?,
            as_u32(heads, "heads")?,
            as_u32(head_dim, "head_dim")?,
            as_u32(block_size, "block_size")?,
            as_u32(blocks, "num_blocks")?,
        ],
    };
    let shape = Shape::from((tokens, heads, head_dim));
    let storage = match q.dtype() {
        DType::F32 => launch.run::<f32>(q, kv, meta)?,
        DType::F16 => launch.run::<f16>(q, kv, meta)?,
        DType::BF16 => launch.run::<bf16>(q, kv, meta)?,
        other => {
            bail!("paged attention: {other:?} is not a supported storage dtype (f32, f16, bf16)")
        }
    };
    Ok((storage, shape))
}

/// One checked `paged_attention_*` launch.
struct AttentionLaunch {
    name: String,
    q: std::ops::Range<usize>,
    kv: std::ops::Range<usize>,
    meta: std::ops::Range<usize>,
    tokens: u32,
    out_len: usize,
    /// `meta_len, num_seqs, heads, head_dim, block_size, num_blocks`, in the kernel's order.
    args: [u32; 6],
}

impl AttentionLaunch {
    fn run<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        self,
        q: &CudaStorage,
        kv: &CudaStorage,
        meta: &CudaStorage,
    ) -> Result<CudaStorage> {
        let device: CudaDevice = q.device().clone();
        let [meta_len, num_seqs, heads, head_dim, block_size, num_blocks] = self.args;
        if self.out_len == 0 {
            // Nothing to launch; candle makes its empty tensors the same way.
            let empty: CudaSlice<T> = device.alloc_zeros::<T>(0)?;
            return Ok(CudaStorage::wrap_cuda_slice(empty, device));
        }
        let func = device.get_or_load_custom_func(&self.name, MODULE, PTX)?;
        // SAFETY: every element is written by the kernel (each (row, head) block writes its head_dim values).
        let out: CudaSlice<T> = unsafe { device.alloc::<T>(self.out_len)? };
        let q_view = q.as_cuda_slice::<T>()?.slice(self.q);
        let kv_view = kv.as_cuda_slice::<T>()?.slice(self.kv);
        let meta_view = meta.as_cuda_slice::<u32>()?.slice(self.meta);
        // Dynamic shared memory: q as f32 (head_dim), the tile's probabilities (threads), reduction scratch (warps).
        let shared_floats = head_dim + ATTENTION_THREADS + ATTENTION_WARPS;
        let config = LaunchConfig {
            grid_dim: (self.tokens, heads, 1),
            block_dim: (ATTENTION_THREADS, 1, 1),
            shared_mem_bytes: shared_floats * std::mem::size_of::<f32>() as u32,
        };
        let mut builder = func.builder();
        builder.arg(&out);
        builder.arg(&q_view);
        builder.arg(&kv_view);
        builder.arg(&meta_view);
        candle_core::builder_arg!(
            builder, meta_len, num_seqs, heads, head_dim, block_size, num_blocks
        );
        // SAFETY: the argument list matches `paged_attention_*` in the .cu file; the kernel reads meta only below
        // meta_len (4 * num_seqs <= meta_len was checked), the pool only at blocks below num_blocks, and q / out
        // at (row, head) < (tokens, heads).
        unsafe { builder.launch(config) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, device))
    }
}

/// These tests need a CUDA device (the GPU run of `tools/bench/gpu.sh` runs them): the CUDA ops against the CPU ops
/// on random geometries, bitwise batch invariance, and the documented handling of bad metadata.
#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::paged::{PagedAttention, WriteKv};

    /// xorshift64*: deterministic test data without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        /// Uniform in [-1, 1).
        fn values(&mut self, n: usize) -> Vec<f32> {
            (0..n)
                .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
                .collect()
        }
    }

    fn cuda() -> Device {
        Device::new_cuda(0).expect("the CUDA tests need a CUDA device")
    }

    struct Seq {
        context: usize,
        q_len: usize,
        table: Vec<u32>,
        /// `(q_len, heads, head_dim)`, scaled by `head_dim^-0.5` like the model's queries.
        queries: Vec<f32>,
    }

    /// Every sequence's whole history written into one pool through shuffled block tables.
    struct Scenario {
        heads: usize,
        head_dim: usize,
        block_size: usize,
        num_blocks: usize,
        seqs: Vec<Seq>,
        /// `(tokens, 2, heads, head_dim)` for the history of every sequence, in sequence order.
        new_kv: Vec<f32>,
        slots: Vec<u32>,
    }

    impl Scenario {
        fn random(
            rng: &mut Rng,
            heads: usize,
            head_dim: usize,
            block_size: usize,
            num_seqs: usize,
        ) -> Self {
            let shapes: Vec<(usize, usize)> = (0..num_seqs)
                .map(|_| {
                    // Half decode rows, half prefill chunks; histories long enough to span several key tiles.
                    let q_len = if rng.below(2) == 0 {
                        1
                    } else {
                        1 + rng.below(block_size + 40)
                    };
                    (q_len + rng.below(300), q_len)
                })
                .collect();
            let num_blocks = shapes
                .iter()
                .map(|&(context, _)| context.div_ceil(block_size))
                .sum::<usize>()
                + 3;
            let mut free: Vec<u32> = (0..num_blocks as u32).collect();
            let mut seqs = Vec::new();
            let (mut new_kv, mut slots) = (Vec::new(), Vec::new());
            for (context, q_len) in shapes {
                let table: Vec<u32> = (0..context.div_ceil(block_size))
                    .map(|_| free.swap_remove(rng.below(free.len())))
                    .collect();
                slots.extend(
                    (0..context).map(|p| {
                        table[p / block_size] * block_size as u32 + (p % block_size) as u32
                    }),
                );
                new_kv.extend(rng.values(context * 2 * heads * head_dim));
                let scale = (head_dim as f32).powf(-0.5);
                let queries = rng
                    .values(q_len * heads * head_dim)
                    .into_iter()
                    .map(|v| v * 4.0 * scale)
                    .collect();
                seqs.push(Seq {
                    context,
                    q_len,
                    table,
                    queries,
                });
            }
            Self {
                heads,
                head_dim,
                block_size,
                num_blocks,
                seqs,
                new_kv,
                slots,
            }
        }

        /// The pool on `device` in `dtype` with every history written by [`WriteKv`].
        fn pool(&self, device: &Device, dtype: DType) -> Tensor {
            let (h, d, bs) = (self.heads, self.head_dim, self.block_size);
            let pool = Tensor::zeros((self.num_blocks, 2, h, bs, d), dtype, device).expect("pool");
            let tokens = self.slots.len();
            let new_kv = Tensor::from_slice(&self.new_kv, (tokens, 2, h, d), device)
                .and_then(|t| t.to_dtype(dtype))
                .expect("new kv");
            let slots = Tensor::from_slice(&self.slots, tokens, device).expect("slots");
            pool.inplace_op3(&new_kv, &slots, &WriteKv)
                .expect("write kv");
            pool
        }

        /// One paged attention over the sequences `selected`, in that order; each one's rows as f32.
        fn attend(&self, pool: &Tensor, dtype: DType, selected: &[usize]) -> Vec<Vec<f32>> {
            let (h, d) = (self.heads, self.head_dim);
            let mut meta = Vec::new();
            let mut queries = Vec::new();
            let mut row = 0;
            for &index in selected {
                let seq = &self.seqs[index];
                meta.extend([row, seq.q_len, seq.context, 0].map(|v| v as u32));
                queries.extend_from_slice(&seq.queries);
                row += seq.q_len;
            }
            for (position, &index) in selected.iter().enumerate() {
                meta[4 * position + 3] = meta.len() as u32;
                meta.extend_from_slice(&self.seqs[index].table);
            }
            let device = pool.device();
            let q = Tensor::from_vec(queries, (row, h, d), device)
                .and_then(|t| t.to_dtype(dtype))
                .expect("q");
            let meta = Tensor::from_vec(meta.clone(), meta.len(), device).expect("meta");
            let op = PagedAttention {
                num_seqs: selected.len(),
                block_size: self.block_size,
                max_context: selected
                    .iter()
                    .map(|&i| self.seqs[i].context)
                    .max()
                    .unwrap_or(0),
                max_q_len: selected
                    .iter()
                    .map(|&i| self.seqs[i].q_len)
                    .max()
                    .unwrap_or(0),
            };
            let out = q
                .apply_op3_no_bwd(pool, &meta, &op)
                .expect("paged attention");
            let out = out
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .expect("to host");
            let mut rows = Vec::new();
            let mut start = 0;
            for &index in selected {
                let len = self.seqs[index].q_len * h * d;
                rows.push(out[start..start + len].to_vec());
                start += len;
            }
            rows
        }
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn host_values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("to host")
    }

    /// Head dims cover every accumulation layout of the kernel: several key groups per dim (4, 32, 64), one thread
    /// per dim (128, and 13 / 80, which do not divide the block), two dims per thread (256).
    const GEOMETRIES: [(usize, usize, usize); 7] = [
        (1, 4, 1),
        (3, 13, 3),
        (2, 32, 16),
        (4, 64, 16),
        (2, 80, 5),
        (2, 128, 16),
        (1, 256, 2),
    ];

    #[test]
    fn cuda_write_kv_fills_the_pool_exactly_like_the_cpu_op() {
        let cuda = cuda();
        let mut rng = Rng(0x5eed);
        for (heads, head_dim, block_size) in GEOMETRIES {
            let scenario = Scenario::random(&mut rng, heads, head_dim, block_size, 4);
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let on_cpu = host_values(&scenario.pool(&Device::Cpu, dtype));
                let on_cuda = host_values(&scenario.pool(&cuda, dtype));
                assert!(
                    on_cpu == on_cuda,
                    "{dtype:?} pools differ for {heads}x{head_dim}, blocks of {block_size}"
                );
            }
        }
    }

    #[test]
    fn cuda_paged_attention_matches_the_cpu_op() {
        let cuda = cuda();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // f32: accumulation order only; f16 / bf16: both sides round an f32 result once, at most one unit apart.
        for (dtype, tolerance) in [
            (DType::F32, 1e-5f32),
            (DType::F16, 2e-3),
            (DType::BF16, 1.6e-2),
        ] {
            let mut worst = 0f32;
            for (heads, head_dim, block_size) in GEOMETRIES {
                let sequences = 1 + rng.below(6);
                let scenario = Scenario::random(&mut rng, heads, head_dim, block_size, sequences);
                let all: Vec<usize> = (0..scenario.seqs.len()).collect();
                let on_cpu = scenario.attend(&scenario.pool(&Device::Cpu, dtype), dtype, &all);
                let on_cuda = scenario.attend(&scenario.pool(&cuda, dtype), dtype, &all);
                for (cpu_rows, cuda_rows) in on_cpu.iter().zip(&on_cuda) {
                    worst = worst.max(max_abs_diff(cpu_rows, cuda_rows));
                }
            }
            println!("{dtype:?}: max |cuda - cpu| = {worst:e}");
            assert!(
                worst <= tolerance,
                "{dtype:?}: cuda and cpu differ by {worst}"
            );
        }
    }

    #[test]
    fn cuda_paged_attention_gives_a_sequence_the_same_bits_alone_or_in_any_batch() {
        let cuda = cuda();
        let mut rng = Rng(42);
        for dtype in [DType::F32, DType::BF16] {
            for (heads, head_dim, block_size) in [(4, 64, 16), (2, 13, 3)] {
                let scenario = Scenario::random(&mut rng, heads, head_dim, block_size, 6);
                let pool = scenario.pool(&cuda, dtype);
                let all: Vec<usize> = (0..scenario.seqs.len()).collect();
                let reversed: Vec<usize> = all.iter().rev().copied().collect();
                let batched = scenario.attend(&pool, dtype, &all);
                let batched_reversed = scenario.attend(&pool, dtype, &reversed);
                for index in all.iter().copied() {
                    let alone = scenario.attend(&pool, dtype, &[index]);
                    let in_reverse = &batched_reversed[all.len() - 1 - index];
                    assert!(
                        alone[0] == batched[index],
                        "{dtype:?}: sequence {index} alone differs from batched"
                    );
                    assert!(
                        *in_reverse == batched[index],
                        "{dtype:?}: sequence {index} differs by batch order"
                    );
                }
            }
        }
    }

    #[test]
    fn cuda_paged_attention_gives_nan_for_metadata_the_cpu_op_rejects_and_zeros_for_unclaimed_rows()
    {
        let cuda = cuda();
        let (heads, head_dim, block_size) = (2, 8, 4);
        let pool =
            Tensor::ones((3, 2, heads, block_size, head_dim), DType::F32, &cuda).expect("pool");
        let q = Tensor::ones((4, heads, head_dim), DType::F32, &cuda).expect("q");
        let run = |meta: Vec<u32>, num_seqs: usize| {
            let meta = Tensor::from_vec(meta.clone(), meta.len(), &cuda).expect("meta");
            let op = PagedAttention {
                num_seqs,
                block_size,
                max_context: 8,
                max_q_len: 2,
            };
            let out = q.apply_op3_no_bwd(&pool, &meta, &op).expect("launch");
            out.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("to host")
                .chunks(heads * head_dim)
                .map(|row| row.to_vec())
                .collect::<Vec<_>>()
        };
        // Rows 0..2: a table starting with block 7 of a 3-block pool; row 2: a good sequence (ones attending ones
        // gives ones); row 3: no sequence.
        let rows = run(vec![0, 2, 5, 8, 2, 1, 1, 10, 7, 0, 1], 2);
        assert!(
            rows[0].iter().chain(&rows[1]).all(|v| v.is_nan()),
            "a bad block id gives NaN rows"
        );
        assert!(
            rows[2].iter().all(|&v| (v - 1.0).abs() < 1e-6),
            "a good sequence is unaffected"
        );
        assert!(
            rows[3].iter().all(|&v| v == 0.0),
            "a row no sequence claims is zero"
        );
        // context_len < q_len.
        let rows = run(vec![0, 2, 1, 4, 0], 1);
        assert!(
            rows[0].iter().chain(&rows[1]).all(|v| v.is_nan()),
            "context shorter than the chunk gives NaN"
        );
    }
}

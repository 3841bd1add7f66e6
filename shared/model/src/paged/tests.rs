//! The paged ops against the contiguous attention of `nn::attention` on random shapes, and batch invariance.

use candle_core::{DType, Device, IndexOp, Tensor};

use super::ops::{PagedAttention, WriteKv};
use crate::nn::attention;

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

    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
            .collect()
    }
}

/// One sequence of a test step: its whole history of keys and values, and the queries of its last `q_len`
/// positions.
struct TestSeq {
    context: usize,
    q_len: usize,
    /// `(context, heads, head_dim)`
    keys: Vec<f32>,
    values: Vec<f32>,
    /// `(q_len, heads, head_dim)`
    queries: Vec<f32>,
}

struct Case {
    heads: usize,
    head_dim: usize,
    block_size: usize,
    seqs: Vec<TestSeq>,
    /// `(sequence, source, blocks)`: the sequence's table starts with the source's first `blocks` blocks (as the
    /// prefix cache shares them), its history there being the source's.
    shares: Vec<(usize, usize, usize)>,
}

impl Case {
    fn random(rng: &mut Rng, block_size: usize, num_seqs: usize) -> Self {
        let heads = 1 + rng.below(4);
        Self::random_with_heads(rng, block_size, num_seqs, heads)
    }

    fn random_with_heads(rng: &mut Rng, block_size: usize, num_seqs: usize, heads: usize) -> Self {
        let head_dim = [4, 8, 13, 32, 64][rng.below(5)];
        let seqs = (0..num_seqs)
            .map(|_| {
                // Chunk sizes 1..=block+1 after a history of any length.
                let q_len = 1 + rng.below(block_size + 1);
                let context = q_len + rng.below(3 * block_size + 2);
                TestSeq {
                    context,
                    q_len,
                    keys: rng.values(context * heads * head_dim),
                    values: rng.values(context * heads * head_dim),
                    queries: rng.values(q_len * heads * head_dim),
                }
            })
            .collect();
        Self {
            heads,
            head_dim,
            block_size,
            seqs,
            shares: Vec::new(),
        }
    }

    /// Writes every sequence's history into a pool through shuffled block tables, then runs one paged attention
    /// over the sequences `selected` (in that order). Returns each selected sequence's `(q_len, heads, head_dim)`.
    fn paged(&self, rng: &mut Rng, dtype: DType, selected: &[usize]) -> Vec<Tensor> {
        self.paged_mixed(rng, dtype, dtype, selected)
    }

    /// [`Case::paged`] with queries (and the written keys and values) of `q_dtype` over a pool of `pool_dtype`.
    fn paged_mixed(
        &self,
        rng: &mut Rng,
        q_dtype: DType,
        pool_dtype: DType,
        selected: &[usize],
    ) -> Vec<Tensor> {
        let (h, d, bs) = (self.heads, self.head_dim, self.block_size);
        let blocks_per_seq: Vec<usize> = self.seqs.iter().map(|s| s.context.div_ceil(bs)).collect();
        let total: usize = blocks_per_seq.iter().sum::<usize>() + 2;
        let mut free: Vec<u32> = (0..total as u32).collect();
        let mut tables = Vec::new();
        for &count in &blocks_per_seq {
            tables.push(
                (0..count)
                    .map(|_| free.swap_remove(rng.below(free.len())))
                    .collect::<Vec<u32>>(),
            );
        }
        for &(seq, source, blocks) in &self.shares {
            let prefix = tables[source][..blocks].to_vec();
            tables[seq][..blocks].copy_from_slice(&prefix);
        }
        let pool = Tensor::zeros((total, 2, h, bs, d), pool_dtype, &Device::Cpu).expect("pool");
        for (seq, table) in self.seqs.iter().zip(&tables) {
            let keys = Tensor::from_slice(&seq.keys, (seq.context, h, d), &Device::Cpu).expect("k");
            let values =
                Tensor::from_slice(&seq.values, (seq.context, h, d), &Device::Cpu).expect("v");
            let new_kv = Tensor::stack(&[&keys, &values], 1)
                .and_then(|t| t.to_dtype(q_dtype))
                .expect("kv");
            let slots: Vec<u32> = (0..seq.context)
                .map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
                .collect();
            let slots = Tensor::from_vec(slots, seq.context, &Device::Cpu).expect("slots");
            pool.inplace_op3(&new_kv, &slots, &WriteKv).expect("write");
        }
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
            meta.extend_from_slice(&tables[index]);
        }
        let q = Tensor::from_vec(queries, (row, h, d), &Device::Cpu)
            .and_then(|t| t.to_dtype(q_dtype))
            .expect("q");
        let meta = Tensor::from_vec(meta.clone(), meta.len(), &Device::Cpu).expect("meta");
        let op = PagedAttention {
            num_seqs: selected.len(),
            block_size: bs,
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
            .apply_op3_no_bwd(&pool, &meta, &op)
            .expect("paged attention");
        let mut results = Vec::new();
        let mut start = 0;
        for &index in selected {
            let len = self.seqs[index].q_len;
            results.push(out.narrow(0, start, len).expect("rows"));
            start += len;
        }
        results
    }

    /// `nn::attention` over one sequence's contiguous history with a causal mask, `(q_len, heads, head_dim)`.
    fn contiguous(&self, index: usize) -> Tensor {
        let seq = &self.seqs[index];
        let (h, d) = (self.heads, self.head_dim);
        let to_heads = |data: &[f32], len: usize| {
            Tensor::from_slice(data, (1, len, h, d), &Device::Cpu)
                .and_then(|t| t.transpose(1, 2))
                .and_then(|t| t.contiguous())
                .expect("heads")
        };
        let past = seq.context - seq.q_len;
        let bias: Vec<f32> = (0..seq.q_len)
            .flat_map(|i| {
                (0..seq.context).map(move |j| {
                    if j <= past + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let bias = Tensor::from_vec(bias, (seq.q_len, seq.context), &Device::Cpu).expect("bias");
        attention(
            &to_heads(&seq.queries, seq.q_len),
            &to_heads(&seq.keys, seq.context),
            &to_heads(&seq.values, seq.context),
            Some(&bias),
        )
        .and_then(|t| Ok(t.i(0)?.transpose(0, 1)?.contiguous()?))
        .expect("contiguous attention")
    }
}

/// The values of `t` flattened, for the exact comparisons of the batch-invariance tests (their data hold no NaN).
fn bits(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("rows")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).expect("f32") - b.to_dtype(DType::F32).expect("f32"))
        .and_then(|t| t.abs())
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar::<f32>())
        .expect("diff")
}

#[test]
fn paged_attention_equals_contiguous_attention_on_random_shapes() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut worst = 0f32;
    let mut cases = 0;
    for block_size in [1, 2, 3, 5, 16] {
        for _ in 0..6 {
            let num_seqs = 1 + rng.below(7);
            let case = Case::random(&mut rng, block_size, num_seqs);
            let all: Vec<usize> = (0..num_seqs).collect();
            let paged = case.paged(&mut rng, DType::F32, &all);
            for (index, ours) in paged.iter().enumerate() {
                worst = worst.max(max_abs_diff(ours, &case.contiguous(index)));
            }
            cases += 1;
        }
    }
    println!("{cases} random cases, max |paged - contiguous| = {worst:e}");
    assert!(worst < 1e-5, "paged attention differs by {worst}");
}

#[test]
fn half_precision_storage_stays_close_to_f32() {
    let mut rng = Rng(7);
    for dtype in [DType::F16, DType::BF16] {
        let case = Case::random(&mut rng, 4, 5);
        let all: Vec<usize> = (0..5).collect();
        let paged = case.paged(&mut rng, dtype, &all);
        let tolerance = if dtype == DType::F16 { 5e-3 } else { 3e-2 };
        for (index, ours) in paged.iter().enumerate() {
            assert_eq!(ours.dtype(), dtype);
            let diff = max_abs_diff(ours, &case.contiguous(index));
            assert!(diff < tolerance, "{dtype:?} differs by {diff}");
        }
    }
}

#[test]
fn f32_queries_over_a_half_precision_pool_attend_the_rounded_keys_and_values() {
    let mut rng = Rng(11);
    for pool_dtype in [DType::F16, DType::BF16] {
        for block_size in [1, 3, 16] {
            let mut case = Case::random(&mut rng, block_size, 4);
            let all: Vec<usize> = (0..4).collect();
            let paged = case.paged_mixed(&mut rng, DType::F32, pool_dtype, &all);
            // What the pool holds: every key and value rounded to its type (queries stay f32).
            for seq in &mut case.seqs {
                for data in [&mut seq.keys, &mut seq.values] {
                    *data = Tensor::from_slice(data, data.len(), &Device::Cpu)
                        .and_then(|t| t.to_dtype(pool_dtype))
                        .and_then(|t| t.to_dtype(DType::F32))
                        .and_then(|t| t.to_vec1::<f32>())
                        .expect("rounded");
                }
            }
            for (index, ours) in paged.iter().enumerate() {
                assert_eq!(ours.dtype(), DType::F32);
                let diff = max_abs_diff(ours, &case.contiguous(index));
                assert!(
                    diff < 1e-5,
                    "{pool_dtype:?}, blocks of {block_size}: differs by {diff}"
                );
            }
        }
    }
}

#[test]
fn a_sequence_gets_bit_identical_rows_alone_or_batched_in_any_order() {
    let mut rng = Rng(42);
    let case = Case::random(&mut rng, 3, 6);
    let batched = case.paged(&mut rng, DType::F32, &[5, 0, 3, 1, 4, 2]);
    for (position, index) in [5, 0, 3, 1, 4, 2].into_iter().enumerate() {
        let alone = case.paged(&mut rng, DType::F32, &[index]);
        let a = batched[position]
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>());
        let b = alone[0].flatten_all().and_then(|t| t.to_vec1::<f32>());
        assert_eq!(a.expect("a"), b.expect("b"), "sequence {index}");
    }
}

#[test]
fn every_row_of_a_long_chunk_equals_the_same_row_as_a_decode_step() {
    // Chunks longer than the kernel's row tile (16), after histories of any length: row i of the chunk must be the
    // bits of a one-row step at context `past + i + 1` (what a preempted sequence's recomputation relies on).
    let mut rng = Rng(5);
    for pool_dtype in [DType::F32, DType::F16] {
        let long = 33 + rng.below(8);
        for (block_size, q_len) in [1, 3, 16]
            .into_iter()
            .flat_map(|bs| [1, 15, 16, 17, long].map(|q| (bs, q)))
        {
            let heads = 1 + rng.below(3);
            let head_dim = [8, 13, 64][rng.below(3)];
            let width = heads * head_dim;
            let context = q_len + rng.below(3 * block_size + 20);
            let past = context - q_len;
            let chunk = TestSeq {
                context,
                q_len,
                keys: rng.values(context * width),
                values: rng.values(context * width),
                queries: rng.values(q_len * width),
            };
            // Row i alone: the first `past + i + 1` keys and values, and its one query.
            let mut seqs: Vec<TestSeq> = (0..q_len)
                .map(|i| TestSeq {
                    context: past + i + 1,
                    q_len: 1,
                    keys: chunk.keys[..(past + i + 1) * width].to_vec(),
                    values: chunk.values[..(past + i + 1) * width].to_vec(),
                    queries: chunk.queries[i * width..(i + 1) * width].to_vec(),
                })
                .collect();
            seqs.push(chunk);
            let case = Case {
                heads,
                head_dim,
                block_size,
                seqs,
                shares: Vec::new(),
            };
            let all: Vec<usize> = (0..=q_len).collect();
            let out = case.paged_mixed(&mut rng, DType::F32, pool_dtype, &all);
            let chunk_rows = bits(&out[q_len]);
            for (i, alone) in out[..q_len].iter().enumerate() {
                assert_eq!(
                    bits(alone),
                    chunk_rows[i * width..(i + 1) * width],
                    "{pool_dtype:?}, blocks of {block_size}, chunk of {q_len} after {past}: row {i}"
                );
            }
        }
    }
}

#[test]
#[cfg(target_arch = "x86_64")]
fn the_avx_dot_product_has_the_bits_of_the_portable_one() {
    if !std::arch::is_x86_feature_detected!("avx") {
        return;
    }
    let mut rng = Rng(3);
    for len in 0..=70 {
        for _ in 0..20 {
            let mut a = rng.values(len);
            let b = rng.values(len);
            // Signed zeros and magnitudes far apart, where the order of the sums shows.
            if len > 2 {
                a[0] = -0.0;
                a[1] *= 1e7;
            }
            // SAFETY: the CPU has AVX (checked above).
            let fast = unsafe { super::ops::dot_avx(&a, &b) };
            let portable = super::ops::dot(&a, &b);
            assert_eq!(
                fast.to_bits(),
                portable.to_bits(),
                "length {len}: {fast} vs {portable}"
            );
        }
    }
    // An all-negative-zero product keeps its sign through both.
    let zeros = [-0.0f32; 8];
    let ones = [1.0f32; 8];
    // SAFETY: as above.
    let fast = unsafe { super::ops::dot_avx(&zeros, &ones) };
    assert_eq!(fast.to_bits(), super::ops::dot(&zeros, &ones).to_bits());
}

#[test]
fn grouping_heads_into_tasks_changes_no_bit() {
    // One sequence alone runs a task per head; many sequences run each sequence's heads in one task (or a few).
    let mut rng = Rng(17);
    for (heads, num_seqs) in [(8, 20), (8, 3), (5, 7), (12, 40)] {
        let case = Case::random_with_heads(&mut rng, 4, num_seqs, heads);
        let all: Vec<usize> = (0..num_seqs).collect();
        for pool_dtype in [DType::F32, DType::F16] {
            let together = case.paged_mixed(&mut rng, DType::F32, pool_dtype, &all);
            for index in [0, num_seqs / 2, num_seqs - 1] {
                let alone = case.paged_mixed(&mut rng, DType::F32, pool_dtype, &[index]);
                assert_eq!(
                    bits(&together[index]),
                    bits(&alone[0]),
                    "{heads} heads, {num_seqs} sequences, {pool_dtype:?}: sequence {index}"
                );
            }
        }
    }
}

#[test]
fn decode_rows_sharing_blocks_get_the_bits_they_get_alone() {
    // Families of sequences whose tables start with the same blocks, as the prefix cache shares an image or a system
    // prompt: the decode rows among them are attended as groups, each shared block read once per group. Members share
    // the whole prefix or part of it, end inside it or far past it; a prefill chunk and unrelated sequences take part.
    // Every row must have the bits it has alone, and match the contiguous attention.
    let mut rng = Rng(23);
    for (block_size, heads, families, per_family) in [
        (1, 2, 2, 3),
        (3, 5, 3, 4),
        (16, 12, 4, 4),
        (4, 8, 1, 20),
        (16, 8, 2, 9),
    ] {
        let head_dim = [8, 13, 64][rng.below(3)];
        let width = heads * head_dim;
        let mut seqs = Vec::new();
        let mut shares = Vec::new();
        let fresh =
            |rng: &mut Rng, context: usize, q_len: usize, prefix: &[f32], prefix_values: &[f32]| {
                let mut keys = prefix.to_vec();
                keys.extend(rng.values(context * width - prefix.len()));
                let mut values = prefix_values.to_vec();
                values.extend(rng.values(context * width - prefix_values.len()));
                TestSeq {
                    context,
                    q_len,
                    keys,
                    values,
                    queries: rng.values(q_len * width),
                }
            };
        for _ in 0..families {
            let prefix_blocks = 1 + rng.below(4);
            let whole = prefix_blocks * block_size * width;
            let source = seqs.len();
            let context = prefix_blocks * block_size + 1 + rng.below(2 * block_size);
            let first = fresh(&mut rng, context, 1, &[], &[]);
            let (keys, values) = (first.keys[..whole].to_vec(), first.values[..whole].to_vec());
            seqs.push(first);
            for member in 1..per_family {
                let blocks = if member % 3 == 2 {
                    rng.below(prefix_blocks + 1)
                } else {
                    prefix_blocks
                };
                // Ending exactly at the shared blocks' end, or anywhere past it; every fourth member a prefill chunk.
                let context = blocks * block_size + rng.below(3 * block_size + 1);
                let q_len = if member % 4 == 3 {
                    1 + rng.below(block_size + 1)
                } else {
                    1
                };
                let context = context.max(q_len);
                let n = blocks * block_size * width;
                seqs.push(fresh(&mut rng, context, q_len, &keys[..n], &values[..n]));
                shares.push((seqs.len() - 1, source, blocks));
            }
        }
        for _ in 0..3 {
            let context = 1 + rng.below(3 * block_size);
            seqs.push(fresh(&mut rng, context, 1, &[], &[]));
        }
        let num_seqs = seqs.len();
        let case = Case {
            heads,
            head_dim,
            block_size,
            seqs,
            shares,
        };
        // The step's order interleaves the families.
        let mut order: Vec<usize> = (0..num_seqs).collect();
        for i in (1..num_seqs).rev() {
            order.swap(i, rng.below(i + 1));
        }
        for pool_dtype in [DType::F32, DType::F16] {
            let together = case.paged_mixed(&mut rng, DType::F32, pool_dtype, &order);
            for (position, &index) in order.iter().enumerate() {
                let alone = case.paged_mixed(&mut rng, DType::F32, pool_dtype, &[index]);
                assert_eq!(
                    bits(&together[position]),
                    bits(&alone[0]),
                    "blocks of {block_size}, {heads} heads, {pool_dtype:?}: sequence {index}"
                );
                if pool_dtype == DType::F32 {
                    let diff = max_abs_diff(&together[position], &case.contiguous(index));
                    assert!(
                        diff < 1e-5,
                        "sequence {index}: {diff} from the contiguous attention"
                    );
                }
            }
        }
    }
}

#[test]
fn bad_meta_is_an_error_not_a_panic() {
    let pool = Tensor::zeros((2, 2, 1, 4, 8), DType::F32, &Device::Cpu).expect("pool");
    let q = Tensor::zeros((3, 1, 8), DType::F32, &Device::Cpu).expect("q");
    let op = PagedAttention {
        num_seqs: 1,
        block_size: 4,
        max_context: 5,
        max_q_len: 3,
    };
    for meta in [
        vec![0u32, 3, 5, 4, 0, 9], // block 9 of 2
        vec![0u32, 3, 5, 4, 0],    // table cut short
        vec![1u32, 3, 5, 4, 0, 1], // rows 1..4 of 3
        vec![0u32, 3, 2, 4, 0],    // fewer keys than queries
        vec![0u32, 3, 5],          // no header
    ] {
        let meta = Tensor::from_vec(meta.clone(), meta.len(), &Device::Cpu).expect("meta");
        assert!(q.apply_op3_no_bwd(&pool, &meta, &op).is_err());
    }
    let new_kv = Tensor::zeros((1, 2, 1, 8), DType::F32, &Device::Cpu).expect("kv");
    let slots = Tensor::from_vec(vec![8u32], 1, &Device::Cpu).expect("slots");
    assert!(pool.inplace_op3(&new_kv, &slots, &WriteKv).is_err());
}

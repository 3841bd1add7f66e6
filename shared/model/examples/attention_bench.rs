//! Micro-benchmark of the paged attention op alone ([`kosmos_model::paged::PagedAttention`], one layer's call), at
//! the shapes the engine gives it: decode steps (many sequences, one query row each, over contexts of any length)
//! and prefill chunks (one sequence, many rows), over an f32 pool or a half-precision one (f32 queries, as
//! `scheduler.kv_cache_dtype = "f16"` runs it). Each sequence's blocks are scattered through the pool, as a pool
//! in service holds them.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p kosmos-model --example attention_bench
//! RAYON_NUM_THREADS=2 cargo run --release -p kosmos-model --example attention_bench -- \
//!     --cases 16x1x110,1x16x80,1x1024x1024 --pools f32,f16 --heads 8 --head-dim 64
//! ```
//! A case `SxQxC` is S sequences of Q query rows each at a context of C positions (the rows are the last Q of
//! the C). Prints the median microseconds per call over `--rounds` calls after one untimed call, and what it reads.
//! `--share G:B` makes the sequences families of G whose block tables start with the same B blocks, as the prefix
//! cache shares an image or a system prompt (the API bench's load: 16 streams over a pool of 4 images, `--share 4:4`);
//! `--evict-mib 64` reads 64 MiB of other memory before each call, so the pool comes from memory as in a model step
//! (the default times warm calls, whose pool may sit in the last-level cache).

use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use kosmos_model::paged::{PagedAttention, WriteKv};
use kosmos_model::{DType, Device, Tensor};
use rayon::prelude::*;

#[derive(Debug, Parser)]
struct Args {
    /// Cases `SEQUENCESxROWSxCONTEXT`, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1x1x110,16x1x110,16x1x490,64x1x110,1x16x80,1x128x192,1x1024x1024"
    )]
    cases: Vec<String>,
    /// Pool dtypes: f32, f16 or bf16 (queries are f32).
    #[arg(long, value_delimiter = ',', default_value = "f32,f16")]
    pools: Vec<String>,
    /// Attention heads.
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Width of a head.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Timed calls per case.
    #[arg(long, default_value_t = 21)]
    rounds: usize,
    /// `G:B`: families of G sequences hold the same first B blocks (0:0, the default, shares nothing).
    #[arg(long, default_value = "0:0", value_parser = parse_share)]
    share: (usize, usize),
    /// Read this many MiB of other memory before each call, so that the pool is not in the caches (as in a model
    /// step, where a layer's weights pass through the caches between two of its attention calls); 0: warm calls.
    #[arg(long, default_value_t = 0)]
    evict_mib: usize,
}

fn parse_share(text: &str) -> anyhow::Result<(usize, usize)> {
    let (family, blocks) = text
        .split_once(':')
        .with_context(|| format!("--share `{text}`: expected FAMILY:BLOCKS"))?;
    Ok((family.trim().parse()?, blocks.trim().parse()?))
}

/// One case: `seqs` sequences of `rows` query rows at `context` positions.
#[derive(Debug, Clone, Copy)]
struct Case {
    seqs: usize,
    rows: usize,
    context: usize,
}

fn parse_case(text: &str) -> anyhow::Result<Case> {
    let parts: Vec<usize> = text
        .split('x')
        .map(|part| part.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("case `{text}`: expected SEQUENCESxROWSxCONTEXT"))?;
    let [seqs, rows, context] = parts[..] else {
        bail!("case `{text}`: expected three numbers, SEQUENCESxROWSxCONTEXT");
    };
    if seqs == 0 || rows == 0 || rows > context {
        bail!("case `{text}`: needs at least one sequence and 1 <= rows <= context");
    }
    Ok(Case {
        seqs,
        rows,
        context,
    })
}

/// Deterministic values in [-1, 1) (xorshift), so every run of every build attends the same numbers.
fn values(state: &mut u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            (*state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// The op's operands for `case`: queries `(rows, heads, head_dim)` f32, the pool with every sequence's history
/// written through WriteKv into blocks scattered by a fixed permutation, and the meta.
fn operands(
    args: &Args,
    case: Case,
    pool_dtype: DType,
) -> anyhow::Result<(Tensor, Tensor, Tensor, PagedAttention)> {
    let (h, d, bs) = (args.heads, args.head_dim, args.block_size);
    let device = Device::Cpu;
    let per_seq = case.context.div_ceil(bs);
    let total = case.seqs * per_seq;
    // A fixed scattering: block i of the pool goes to position (i * 7919) mod total, a permutation when 7919 (prime)
    // does not divide the total.
    let stride = if total.is_multiple_of(7919) { 1 } else { 7919 };
    let order: Vec<u32> = (0..total).map(|i| ((i * stride) % total) as u32).collect();
    let pool = Tensor::zeros((total, 2, h, bs, d), pool_dtype, &device)?;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    // Each sequence's table; a family's members take its first member's first `shared` blocks (whole blocks the
    // rows see entirely, as the prefix cache shares them) and write only their own positions.
    let (family, shared) = args.share;
    let shared = if family > 1 {
        shared.min((case.context - case.rows) / bs)
    } else {
        0
    };
    let mut tables: Vec<Vec<u32>> = (0..case.seqs)
        .map(|s| order[s * per_seq..(s + 1) * per_seq].to_vec())
        .collect();
    for s in 0..case.seqs {
        if shared > 0 && s % family != 0 {
            let head = tables[s - s % family][..shared].to_vec();
            tables[s][..shared].copy_from_slice(&head);
        }
    }
    let mut meta = Vec::with_capacity(4 * case.seqs + total);
    for (s, table) in tables.iter().enumerate() {
        let own = if shared > 0 && s % family != 0 {
            shared * bs
        } else {
            0
        };
        let kv = Tensor::from_vec(
            values(&mut state, (case.context - own) * 2 * h * d),
            (case.context - own, 2, h, d),
            &device,
        )?;
        let slots: Vec<u32> = (own..case.context)
            .map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
            .collect();
        pool.inplace_op3(
            &kv,
            &Tensor::from_vec(slots, case.context - own, &device)?,
            &WriteKv,
        )?;
        meta.extend([s * case.rows, case.rows, case.context, 0].map(|v| v as u32));
    }
    for (s, table) in tables.iter().enumerate() {
        meta[4 * s + 3] = meta.len() as u32;
        meta.extend_from_slice(table);
    }
    let rows = case.seqs * case.rows;
    let queries = Tensor::from_vec(values(&mut state, rows * h * d), (rows, h, d), &device)?;
    let meta_len = meta.len();
    let op = PagedAttention {
        num_seqs: case.seqs,
        block_size: bs,
        max_context: case.context,
        max_q_len: case.rows,
    };
    Ok((
        queries,
        pool,
        Tensor::from_vec(meta, meta_len, &device)?,
        op,
    ))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cases: Vec<Case> = args
        .cases
        .iter()
        .map(|c| parse_case(c))
        .collect::<Result<_, _>>()?;
    let pools: Vec<DType> = args
        .pools
        .iter()
        .map(|p| kosmos_model::parse_dtype(p.trim()))
        .collect::<Result<_, _>>()?;
    println!(
        "threads {} · heads {} · head_dim {} · blocks of {} · median of {} calls · families of {} sharing {} blocks · \
         {} MiB read before each call",
        rayon::current_num_threads(),
        args.heads,
        args.head_dim,
        args.block_size,
        args.rounds,
        args.share.0,
        args.share.1,
        args.evict_mib
    );
    println!(
        "| sequences x rows x context | pool | us per call | KV MiB attended (a shared block once per sequence) | \
         pairs (row, key) per us |"
    );
    println!("|---|---|---:|---:|---:|");
    let evict: Vec<u32> = (0..args.evict_mib << 18).map(|i| i as u32).collect();
    for &case in &cases {
        for &pool_dtype in &pools {
            let (queries, pool, meta, op) = operands(&args, case, pool_dtype)?;
            let mut times = Vec::with_capacity(args.rounds);
            for round in 0..=args.rounds {
                if !evict.is_empty() {
                    // Every cache line of the buffer, read on the pool's threads (which stay awake for the call, as
                    // between the kernels of a step), so the pool's lines go as they do under a layer's weights.
                    let sum = evict
                        .par_chunks(1 << 16)
                        .map(|part| {
                            part.chunks(16)
                                .fold(0u32, |sum, line| sum.wrapping_add(line[0]))
                        })
                        .reduce(|| 0, u32::wrapping_add);
                    std::hint::black_box(sum);
                }
                let started = Instant::now();
                drop(queries.apply_op3_no_bwd(&pool, &meta, &op)?);
                if round > 0 {
                    times.push(started.elapsed().as_secs_f64() * 1e6);
                }
            }
            times.sort_by(f64::total_cmp);
            let micros = times[times.len() / 2];
            let kv_bytes = case.seqs
                * case.context
                * 2
                * args.heads
                * args.head_dim
                * pool_dtype.size_in_bytes();
            // Causal (row, key) pairs of one head, times the heads.
            let past = case.context - case.rows;
            let pairs =
                case.seqs * args.heads * (case.rows * past + case.rows * (case.rows + 1) / 2);
            println!(
                "| {}x{}x{} | {:?} | {:.1} | {:.2} | {:.0} |",
                case.seqs,
                case.rows,
                case.context,
                pool_dtype,
                micros,
                kv_bytes as f64 / (1 << 20) as f64,
                pairs as f64 / micros
            );
        }
    }
    Ok(())
}

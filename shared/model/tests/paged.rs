//! The paged KV cache through the whole decoder (the tiny reference model): prefix hits, forks with
//! copy-on-write and preemption-style recomputation give the values of an uninterrupted run, and every block
//! comes back.

mod common;

use common::{fixtures, max_abs_diff};
use kosmos_model::{
    BlockTable, DType, Device, KosmosModel, KvCacheConfig, ModelError, PagedKvCache, SeqChunk,
    Tensor, TextModel,
};

fn tiny() -> KosmosModel {
    KosmosModel::load(&fixtures().join("tiny"), DType::F32, &Device::Cpu).expect("tiny model loads")
}

fn ids(seed: u32, len: usize, vocab: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 4 + (seed.wrapping_mul(7919).wrapping_add(i * 104_729) % (vocab as u32 - 4)))
        .collect()
}

/// Logits `(len, vocab)` of one chunk appended to `table`.
fn run(model: &TextModel, kv: &mut PagedKvCache, table: &mut BlockTable, ids: &[u32]) -> Tensor {
    let hidden = model
        .forward(
            kv,
            &mut [SeqChunk {
                input_ids: ids,
                images: None,
                table,
            }],
        )
        .expect("forward");
    model.logits(&hidden).expect("logits")
}

fn cache(model: &TextModel, blocks: usize, prefix_caching: bool) -> PagedKvCache {
    model
        .kv_cache(
            KvCacheConfig {
                block_size: 4,
                num_blocks: blocks,
                prefix_caching,
                dtype: None,
            },
            "fingerprint",
        )
        .expect("kv cache")
}

#[test]
fn a_prefix_hit_gives_the_logits_of_a_miss_and_skips_the_shared_blocks() {
    let model = tiny();
    let text = model.text.model();
    let vocab = text.config().vocab_size;
    let mut kv = cache(text, 32, true);
    let shared = ids(1, 13, vocab);
    let mut first = [shared.clone(), ids(2, 5, vocab)].concat();
    let mut second = [shared.clone(), ids(3, 6, vocab)].concat();

    let mut table = kv.new_table("", Vec::new());
    assert_eq!(
        kv.match_prefix(&mut table, &first),
        0,
        "nothing is cached yet"
    );
    run(text, &mut kv, &mut table, &first);
    kv.release(&mut table);
    assert_eq!(kv.counts().used, 0);
    assert_eq!(kv.counts().cached, first.len() / 4);

    // Cold: a cache without prefix sharing computes the whole second prompt.
    let mut cold_kv = cache(text, 32, false);
    let mut cold = cold_kv.new_table("", Vec::new());
    let expected = run(text, &mut cold_kv, &mut cold, &second);

    let mut warm = kv.new_table("", Vec::new());
    let reused = kv.match_prefix(&mut warm, &second);
    assert_eq!(reused, 12, "the three full blocks of the shared 13 tokens");
    let logits = run(text, &mut kv, &mut warm, &second[reused..]);
    let expected_rest = expected
        .narrow(0, reused, second.len() - reused)
        .expect("rest");
    let diff = max_abs_diff(&logits, &expected_rest);
    assert!(diff < 1e-5, "a prefix hit differs from a miss by {diff}");
    assert_eq!(kv.prefix_stats().hit_blocks, 3);

    // Another tenant never sees those blocks.
    let mut other = kv.new_table("another-tenant", Vec::new());
    assert_eq!(kv.match_prefix(&mut other, &second), 0);

    // Content keys take part: the same ids with an image key at position 2 miss.
    let mut keyed = kv.new_table("", vec![0, 0, 99]);
    assert_eq!(kv.match_prefix(&mut keyed, &second), 0);

    kv.release(&mut warm);
    first.clear();
    second.clear();
    kv.clear_prefix_cache();
    assert_eq!(kv.counts().available, 32);
}

#[test]
fn forks_share_blocks_and_copy_the_partial_one_before_writing() {
    let model = tiny();
    let text = model.text.model();
    let vocab = text.config().vocab_size;
    let context = ids(5, 10, vocab);
    let candidates = [ids(6, 3, vocab), ids(7, 6, vocab)];
    let mut kv = cache(text, 16, false);
    let mut base = kv.new_table("", Vec::new());
    run(text, &mut kv, &mut base, &context);
    let used_by_context = kv.counts().used;
    let mut forks: Vec<BlockTable> = candidates.iter().map(|_| kv.fork(&base)).collect();
    assert_eq!(kv.counts().used, used_by_context, "a fork takes no block");
    for (fork, candidate) in forks.iter_mut().zip(&candidates) {
        let logits = run(text, &mut kv, fork, candidate);
        let mut solo_kv = cache(text, 16, false);
        let mut solo = solo_kv.new_table("", Vec::new());
        let expected = run(
            text,
            &mut solo_kv,
            &mut solo,
            &[context.clone(), candidate.clone()].concat(),
        );
        let expected = expected
            .narrow(0, context.len(), candidate.len())
            .expect("candidate rows");
        let diff = max_abs_diff(&logits, &expected);
        assert!(diff < 1e-5, "a forked candidate differs by {diff}");
    }
    // The context's own partial block was never written by the forks: the base continues as if alone.
    let next = ids(8, 2, vocab);
    let logits = run(text, &mut kv, &mut base, &next);
    let mut solo_kv = cache(text, 16, false);
    let mut solo = solo_kv.new_table("", Vec::new());
    let expected = run(
        text,
        &mut solo_kv,
        &mut solo,
        &[context.clone(), next.clone()].concat(),
    )
    .narrow(0, context.len(), next.len())
    .expect("rows");
    assert!(max_abs_diff(&logits, &expected) < 1e-5);
    for mut fork in forks {
        kv.release(&mut fork);
    }
    kv.release(&mut base);
    assert_eq!(kv.counts().available, 16);
    assert_eq!(kv.counts().used, 0);
}

#[test]
fn recomputing_prompt_and_generated_tokens_gives_the_same_next_logits() {
    // What the engine does for a preempted sequence: release its blocks, then prefill prompt + generated ids.
    let model = tiny();
    let text = model.text.model();
    let vocab = text.config().vocab_size;
    let prompt = ids(9, 7, vocab);
    let generated = ids(10, 6, vocab);
    let mut kv = cache(text, 16, false);
    let mut table = kv.new_table("", Vec::new());
    run(text, &mut kv, &mut table, &prompt);
    let mut last = None;
    for token in &generated {
        last = Some(run(text, &mut kv, &mut table, std::slice::from_ref(token)));
    }
    let uninterrupted = last.expect("steps");
    kv.release(&mut table);
    let resumed = run(text, &mut kv, &mut table, &[prompt, generated].concat());
    let rows = resumed.dim(0).expect("rows");
    let diff = max_abs_diff(
        &resumed.narrow(0, rows - 1, 1).expect("last"),
        &uninterrupted,
    );
    assert!(diff < 1e-5, "recomputation differs by {diff}");
    kv.release(&mut table);
    assert_eq!(kv.counts().available, 16);
}

#[test]
fn running_out_of_blocks_is_an_error_that_takes_nothing() {
    let model = tiny();
    let text = model.text.model();
    let vocab = text.config().vocab_size;
    let mut kv = cache(text, 3, false);
    let mut table = kv.new_table("", Vec::new());
    run(text, &mut kv, &mut table, &ids(11, 9, vocab));
    assert_eq!(kv.counts().available, 0);
    let mut other = kv.new_table("", Vec::new());
    let error = text
        .forward(
            &mut kv,
            &mut [SeqChunk {
                input_ids: &ids(12, 2, vocab),
                images: None,
                table: &mut other,
            }],
        )
        .expect_err("no block left");
    assert!(
        matches!(
            error,
            ModelError::OutOfKvBlocks {
                needed: 1,
                available: 0
            }
        ),
        "{error}"
    );
    assert!(other.is_empty());
    assert_eq!(
        kv.blocks_needed(&table, 3),
        0,
        "the last block still has room for 3"
    );
    assert_eq!(kv.blocks_needed(&table, 4), 1);
    kv.release(&mut table);
    assert_eq!(kv.counts().available, 3);
    assert_eq!(kv.bytes_per_token(), {
        let cfg = text.config();
        2 * cfg.layers * cfg.embed_dim * 4
    });
}

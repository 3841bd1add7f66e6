//! The paged KV cache: per decoder layer one preallocated pool of fixed-size blocks for keys and values, block
//! tables per sequence, and a prefix index that lets sequences share the blocks of a common prefix.
//!
//! * **Memory is blocks.** A pool holds `num_blocks × block_size` token positions per layer; a sequence takes
//!   blocks from the free list as it grows ([`PagedKvCache::reserve`]) and gives them back when it ends
//!   ([`PagedKvCache::release`]). Bytes per cached token are exactly `2 × layers × hidden × dtype size`: no slack
//!   beyond the unfilled part of each sequence's last block.
//! * **Prefix sharing.** A full block is registered under a hash chain of everything before it
//!   ([`BlockHash`]). A new sequence attaches the registered blocks of its longest matching prefix
//!   ([`PagedKvCache::match_prefix`]) and computes only the rest. Blocks nobody references stay cached until the
//!   free list runs dry, then are evicted least recently used first.
//! * **Forks.** [`PagedKvCache::fork`] makes a second table over the same blocks (scoring candidates after one
//!   context); writing into a shared, partly filled last block copies it first (copy-on-write).
//!
//! The attention over the pool is [`ops::PagedAttention`], one call per layer for the whole step.

mod blocks;
#[cfg(feature = "cuda")]
mod cuda;
pub(crate) mod ops;
#[cfg(test)]
mod tests;

use candle_core::{DType, Device, Tensor};

pub use blocks::{BlockCounts, BlockHash, BlockId, BlockTable, content_key};
pub use ops::{PagedAttention, WriteKv};

use crate::error::{ModelError, Result};
use crate::memory::zeroed_huge_page_vec;
use blocks::BlockPool;

/// One layer's pool of zeros, `shape` of `dtype` on `device`. On the CPU it comes from the allocator's zeroed
/// memory, which a pool sized for the worst case does not occupy until its blocks are written, offered to huge pages
/// (`memory.rs`): the attention of every step reads the running sequences' blocks from it.
fn zeroed_pool(
    shape: (usize, usize, usize, usize, usize),
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let too_large = || {
        ModelError::InvalidInput(format!(
            "a KV pool of {shape:?} {dtype:?} values does not fit in memory"
        ))
    };
    let len = [shape.1, shape.2, shape.3, shape.4]
        .into_iter()
        .try_fold(shape.0, usize::checked_mul)
        .ok_or_else(too_large)?;
    Ok(match dtype {
        _ if !device.is_cpu() => Tensor::zeros(shape, dtype, device)?,
        DType::F32 => Tensor::from_vec(
            zeroed_huge_page_vec::<f32>(len).ok_or_else(too_large)?,
            shape,
            device,
        )?,
        DType::F16 => Tensor::from_vec(
            zeroed_huge_page_vec::<half::f16>(len).ok_or_else(too_large)?,
            shape,
            device,
        )?,
        DType::BF16 => Tensor::from_vec(
            zeroed_huge_page_vec::<half::bf16>(len).ok_or_else(too_large)?,
            shape,
            device,
        )?,
        other => Tensor::zeros(shape, other, device)?,
    })
}

/// The size of a paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Token positions per block.
    pub block_size: usize,
    /// Blocks in the pool (of every layer).
    pub num_blocks: usize,
    /// Whether full blocks are registered for prefix sharing.
    pub prefix_caching: bool,
    /// The storage type of keys and values; `None`: the model's. A narrower type than the model's (f16 or bf16
    /// for an f32 model) halves the cache's bytes and the attention's reads; keys and values are rounded when
    /// written and widened to f32 when read. Only the CPU ops convert: on a GPU it must be the model's.
    pub dtype: Option<DType>,
}

impl KvCacheConfig {
    /// A cache just large enough for sequences of the given total lengths (each in its own blocks), without prefix
    /// caching: what a one-off forward needs.
    pub fn for_sequences(lengths: impl IntoIterator<Item = usize>, block_size: usize) -> Self {
        Self {
            block_size,
            num_blocks: lengths
                .into_iter()
                .map(|len| len.div_ceil(block_size))
                .sum::<usize>()
                .max(1),
            prefix_caching: false,
            dtype: None,
        }
    }
}

/// Prefix-index lookups since the cache was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefixStats {
    /// Full prompt blocks looked up.
    pub queried_blocks: u64,
    /// Of those, blocks found and reused.
    pub hit_blocks: u64,
}

/// Shapes of the pools.
#[derive(Debug, Clone, Copy)]
struct PoolShape {
    layers: usize,
    heads: usize,
    head_dim: usize,
}

/// The KV memory of one model: one pool per decoder layer plus the block bookkeeping.
#[derive(Debug)]
pub struct PagedKvCache {
    /// `(num_blocks, 2, heads, block_size, head_dim)` per layer.
    pools: Vec<Tensor>,
    config: KvCacheConfig,
    shape: PoolShape,
    blocks: BlockPool,
    root: BlockHash,
    fingerprint: String,
    prefix: PrefixStats,
}

impl PagedKvCache {
    /// Allocates the pools (zeros; on the CPU the pages are committed only as blocks are written) of
    /// `config.dtype`, or of the model's `dtype` when that is `None`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        layers: usize,
        heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
        config: KvCacheConfig,
        fingerprint: &str,
    ) -> Result<Self> {
        if config.block_size == 0 || config.num_blocks == 0 {
            return Err(ModelError::InvalidInput(format!(
                "a KV cache needs at least one block of at least one token (block_size {}, num_blocks {})",
                config.block_size, config.num_blocks
            )));
        }
        if config.num_blocks > BlockId::MAX as usize
            || config.num_blocks.saturating_mul(config.block_size) > u32::MAX as usize
        {
            return Err(ModelError::InvalidInput(format!(
                "a KV cache of {} blocks of {} tokens has more slots than a u32 can number",
                config.num_blocks, config.block_size
            )));
        }
        let dtype = match config.dtype {
            Some(storage) if storage != dtype && !device.is_cpu() => {
                return Err(ModelError::InvalidInput(format!(
                    "a KV cache of {storage:?} for a model of {dtype:?} runs only on the CPU: on a GPU the cache \
                     stores the model's dtype"
                )));
            }
            Some(storage) => storage,
            None => dtype,
        };
        if !ops::supported(dtype) {
            return Err(ModelError::InvalidInput(format!(
                "the paged KV cache stores f32, f16 or bf16, not {dtype:?}"
            )));
        }
        let shape = (config.num_blocks, 2, heads, config.block_size, head_dim);
        let pools = (0..layers)
            .map(|_| zeroed_pool(shape, dtype, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            pools,
            config,
            shape: PoolShape {
                layers,
                heads,
                head_dim,
            },
            blocks: BlockPool::new(config.num_blocks),
            root: BlockHash::root(fingerprint, ""),
            fingerprint: fingerprint.to_owned(),
            prefix: PrefixStats::default(),
        })
    }

    /// The size it was made with.
    pub fn config(&self) -> KvCacheConfig {
        self.config
    }

    /// Token positions per block.
    pub fn block_size(&self) -> usize {
        self.config.block_size
    }

    /// The storage type of the keys and values.
    pub fn dtype(&self) -> DType {
        self.pools.first().map_or(DType::F32, Tensor::dtype)
    }

    /// Bytes one cached token takes across all layers: `2 × layers × heads × head_dim × dtype size`.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.shape.layers
            * self.shape.heads
            * self.shape.head_dim
            * self.dtype().size_in_bytes()
    }

    /// Block counts now.
    pub fn counts(&self) -> BlockCounts {
        self.blocks.counts()
    }

    /// Prefix lookups so far.
    pub fn prefix_stats(&self) -> PrefixStats {
        self.prefix
    }

    /// The pool of decoder layer `layer`.
    pub(crate) fn pool(&self, layer: usize) -> Result<&Tensor> {
        self.pools
            .get(layer)
            .ok_or_else(|| ModelError::InvalidInput(format!("the KV cache has no layer {layer}")))
    }

    /// An empty table for a sequence of `tenant` (`""` without tenants) whose prompt positions carry the content
    /// keys `keys` (0 for text tokens; [`content_key`] of the embedding row at image positions).
    pub fn new_table(&self, tenant: &str, keys: Vec<u64>) -> BlockTable {
        let root = if tenant.is_empty() {
            self.root
        } else {
            BlockHash::root(&self.fingerprint, tenant)
        };
        BlockTable::new(root, keys)
    }

    /// Blocks [`PagedKvCache::reserve`] would take from the pool for `new_tokens` more tokens.
    pub fn blocks_needed(&self, table: &BlockTable, new_tokens: usize) -> usize {
        let bs = self.config.block_size;
        let grow = (table.len() + new_tokens)
            .div_ceil(bs)
            .saturating_sub(table.blocks.len());
        grow + usize::from(self.needs_copy(table, new_tokens))
    }

    /// Whether appending would write into a partly filled last block that another table shares.
    fn needs_copy(&self, table: &BlockTable, new_tokens: usize) -> bool {
        let bs = self.config.block_size;
        new_tokens > 0
            && !table.len().is_multiple_of(bs)
            && table
                .blocks
                .get(table.len() / bs)
                .is_some_and(|&block| self.blocks.refs(block) > 1)
    }

    /// Makes room in `table` for `new_tokens` more tokens: copies a shared partial last block, then takes new
    /// blocks. Takes nothing when the pool cannot cover the whole need.
    pub fn reserve(&mut self, table: &mut BlockTable, new_tokens: usize) -> Result<()> {
        let needed = self.blocks_needed(table, new_tokens);
        let available = self.blocks.counts().available;
        if needed > available {
            return Err(ModelError::OutOfKvBlocks { needed, available });
        }
        if self.needs_copy(table, new_tokens) {
            let index = table.len() / self.config.block_size;
            let shared = table.blocks[index];
            let copy = self.allocate()?;
            self.copy_block(shared, copy)?;
            self.blocks.release(shared);
            table.blocks[index] = copy;
        }
        let bs = self.config.block_size;
        while table.blocks.len() * bs < table.len() + new_tokens {
            let block = self.allocate()?;
            table.blocks.push(block);
        }
        Ok(())
    }

    fn allocate(&mut self) -> Result<BlockId> {
        self.blocks.allocate().ok_or(ModelError::OutOfKvBlocks {
            needed: 1,
            available: 0,
        })
    }

    /// Copies the keys and values of block `from` into block `to`, in every layer.
    fn copy_block(&self, from: BlockId, to: BlockId) -> Result<()> {
        for pool in &self.pools {
            let source = pool.narrow(0, from as usize, 1)?.copy()?;
            pool.slice_set(&source, 0, to as usize)?;
        }
        Ok(())
    }

    /// Attaches to the empty `table` the registered blocks of the longest prefix of `ids` found in the index, and
    /// returns how many tokens they hold (a multiple of the block size, always less than `ids.len()`: the last
    /// token is always computed, since its logits are needed).
    pub fn match_prefix(&mut self, table: &mut BlockTable, ids: &[u32]) -> usize {
        if !self.config.prefix_caching || !table.is_empty() || ids.is_empty() {
            return 0;
        }
        let bs = self.config.block_size;
        let candidates = (ids.len() - 1) / bs;
        table.ensure_hashes(candidates, ids, bs);
        let mut matched = 0;
        for index in 0..candidates {
            self.prefix.queried_blocks += 1;
            match self.blocks.lookup(&table.hashes[index]) {
                Some(block) => {
                    self.prefix.hit_blocks += 1;
                    table.blocks.push(block);
                    matched += 1;
                }
                None => {
                    // The rest of the prompt's full blocks are misses too (the chain is broken here).
                    self.prefix.queried_blocks += (candidates - index - 1) as u64;
                    break;
                }
            }
        }
        table.tokens.extend_from_slice(&ids[..matched * bs]);
        table.registered = matched;
        matched * bs
    }

    /// Records that the keys and values of `ids` were written after the table's tokens, and registers the blocks
    /// this filled for prefix sharing.
    pub(crate) fn commit(&mut self, table: &mut BlockTable, ids: &[u32]) {
        table.tokens.extend_from_slice(ids);
        if !self.config.prefix_caching {
            return;
        }
        let bs = self.config.block_size;
        let full = table.len() / bs;
        if full > table.registered {
            let tokens = std::mem::take(&mut table.tokens);
            table.ensure_hashes(full, &tokens, bs);
            table.tokens = tokens;
            for index in table.registered..full {
                self.blocks
                    .register(table.blocks[index], table.hashes[index]);
            }
            table.registered = full;
        }
    }

    /// A second table over the same blocks and tokens; the first write into a shared partial block copies it.
    pub fn fork(&mut self, table: &BlockTable) -> BlockTable {
        for &block in &table.blocks {
            self.blocks.retain(block);
        }
        table.clone()
    }

    /// Gives the table's blocks back (cached blocks stay in the index for later hits) and empties it.
    pub fn release(&mut self, table: &mut BlockTable) {
        for block in table.blocks.drain(..) {
            self.blocks.release(block);
        }
        table.tokens.clear();
        table.hashes.clear();
        table.registered = 0;
    }

    /// Forgets every cached block that no table references.
    pub fn clear_prefix_cache(&mut self) {
        self.blocks.clear_cached();
    }

    /// The slot of position `position` of `table` (which must hold a block for it).
    pub(crate) fn slot(&self, table: &BlockTable, position: usize) -> Result<u32> {
        let bs = self.config.block_size;
        let block = table.blocks.get(position / bs).ok_or_else(|| {
            ModelError::InvalidInput(format!("position {position} has no KV block reserved"))
        })?;
        Ok(*block * bs as u32 + (position % bs) as u32)
    }
}

//! Block bookkeeping of the paged KV cache, independent of tensors: the free list, reference counts, the prefix
//! index and the least-recently-used order of cached blocks.
//!
//! A block is in exactly one of three states:
//! * **free**: on the free list, holding nothing worth keeping;
//! * **referenced**: `refs > 0`, owned by one or more block tables (several after a fork or a prefix hit);
//! * **cached**: `refs == 0` but registered in the prefix index under its content hash, kept for a later hit and
//!   evicted least recently used first when the free list is empty.
//!
//! A *full* block may be registered under its hash (see [`BlockHash`]); a registered block is immutable: writes only
//! ever go to the partial last block of a table, and a shared partial block is copied before it is written
//! (copy-on-write, decided by [`super::PagedKvCache::reserve`]).

use std::collections::{BTreeSet, HashMap};

use sha2::{Digest, Sha256};

/// Index of a block in the pool of every layer.
pub type BlockId = u32;

/// Identity of a full block's contents: a hash chain over the previous block's hash, the block's token ids and, for
/// positions filled by image embeddings, a content key of those embeddings. The chain starts at a root that salts
/// the model fingerprint and the tenant, so blocks are never shared across models or tenants.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct BlockHash([u8; 32]);

impl BlockHash {
    /// The root of the chains of one model fingerprint and one tenant (`""` when there are no tenants).
    pub fn root(fingerprint: &str, tenant: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"kosmos-kv-v1\0");
        hasher.update((fingerprint.len() as u64).to_le_bytes());
        hasher.update(fingerprint.as_bytes());
        hasher.update((tenant.len() as u64).to_le_bytes());
        hasher.update(tenant.as_bytes());
        Self(hasher.finalize().into())
    }

    /// The hash of a block that follows `self` and holds `ids`, with per-position content keys `keys` (0 for a text
    /// token).
    pub fn chain(&self, ids: &[u32], keys: &[u64]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(self.0);
        for (&id, &key) in ids.iter().zip(keys) {
            hasher.update(id.to_le_bytes());
            hasher.update(key.to_le_bytes());
        }
        Self(hasher.finalize().into())
    }
}

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    refs: u32,
    /// Set while the block is registered in the prefix index.
    hash: Option<BlockHash>,
    /// The clock value when the block last lost its last reference (its place in the LRU order).
    released_at: u64,
}

/// Counts of the pool's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockCounts {
    /// Blocks in the pool.
    pub total: usize,
    /// Blocks referenced by at least one table.
    pub used: usize,
    /// Blocks registered in the prefix index (referenced or not).
    pub cached: usize,
    /// Blocks an allocation can take now: free plus cached-and-unreferenced.
    pub available: usize,
}

/// The free list, reference counts and prefix index of a pool of `total` blocks.
#[derive(Debug)]
pub(crate) struct BlockPool {
    meta: Vec<BlockMeta>,
    free: Vec<BlockId>,
    index: HashMap<BlockHash, BlockId>,
    /// Unreferenced registered blocks, oldest release first.
    evictable: BTreeSet<(u64, BlockId)>,
    clock: u64,
}

impl BlockPool {
    pub(crate) fn new(total: usize) -> Self {
        Self {
            meta: vec![BlockMeta::default(); total],
            // Popped from the end: block 0 is handed out first.
            free: (0..total as BlockId).rev().collect(),
            index: HashMap::new(),
            evictable: BTreeSet::new(),
            clock: 0,
        }
    }

    pub(crate) fn counts(&self) -> BlockCounts {
        let available = self.free.len() + self.evictable.len();
        BlockCounts {
            total: self.meta.len(),
            used: self.meta.len() - available,
            cached: self.index.len(),
            available,
        }
    }

    /// A block with one reference: a free one, else the least recently released cached one (evicted from the
    /// index). `None` when every block is referenced.
    pub(crate) fn allocate(&mut self) -> Option<BlockId> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let (released_at, id) = *self.evictable.iter().next()?;
                self.evictable.remove(&(released_at, id));
                if let Some(hash) = self.meta[id as usize].hash.take() {
                    self.index.remove(&hash);
                }
                id
            }
        };
        self.meta[id as usize].refs = 1;
        Some(id)
    }

    /// One more reference to a block that already has one, or to a cached block (which leaves the LRU order).
    pub(crate) fn retain(&mut self, id: BlockId) {
        let meta = &mut self.meta[id as usize];
        if meta.refs == 0 {
            self.evictable.remove(&(meta.released_at, id));
        }
        meta.refs += 1;
    }

    /// Drops one reference; the last one makes the block cached (when registered) or free.
    pub(crate) fn release(&mut self, id: BlockId) {
        let meta = &mut self.meta[id as usize];
        debug_assert!(
            meta.refs > 0,
            "block {id} released more often than retained"
        );
        meta.refs = meta.refs.saturating_sub(1);
        if meta.refs == 0 {
            if meta.hash.is_some() {
                self.clock += 1;
                meta.released_at = self.clock;
                self.evictable.insert((self.clock, id));
            } else {
                self.free.push(id);
            }
        }
    }

    pub(crate) fn refs(&self, id: BlockId) -> u32 {
        self.meta[id as usize].refs
    }

    /// The registered block with this content, retained for the caller.
    pub(crate) fn lookup(&mut self, hash: &BlockHash) -> Option<BlockId> {
        let id = *self.index.get(hash)?;
        self.retain(id);
        Some(id)
    }

    /// Registers a full, referenced block under `hash` unless another block already holds that content.
    pub(crate) fn register(&mut self, id: BlockId, hash: BlockHash) {
        if self.index.contains_key(&hash) || self.meta[id as usize].hash.is_some() {
            return;
        }
        self.meta[id as usize].hash = Some(hash);
        self.index.insert(hash, id);
    }

    /// Forgets every registered block that no table references (they become free).
    pub(crate) fn clear_cached(&mut self) {
        for (_, id) in std::mem::take(&mut self.evictable) {
            if let Some(hash) = self.meta[id as usize].hash.take() {
                self.index.remove(&hash);
            }
            self.free.push(id);
        }
    }
}

/// One sequence's view of the pool: its blocks in order, the token ids whose keys and values they hold, and the
/// content keys and chain hashes needed to share full blocks.
///
/// A table is only ever changed through [`super::PagedKvCache`] (reserve, commit, fork, release), which keeps the
/// reference counts right; dropping a table without releasing it leaks its blocks until the cache is dropped.
#[derive(Debug, Clone)]
pub struct BlockTable {
    pub(crate) blocks: Vec<BlockId>,
    pub(crate) tokens: Vec<u32>,
    /// Content keys of the positions that have one (image positions of the prompt); positions past its end are
    /// text tokens (key 0).
    pub(crate) keys: Vec<u64>,
    /// Chain hashes of the first `hashes.len()` full blocks.
    pub(crate) hashes: Vec<BlockHash>,
    /// Leading full blocks already registered in the prefix index (or attached from it).
    pub(crate) registered: usize,
    pub(crate) root: BlockHash,
}

impl BlockTable {
    /// An empty table whose hash chain starts at `root`, with per-position content keys `keys` for the prompt
    /// (0 for text tokens; see [`content_key`]).
    pub fn new(root: BlockHash, keys: Vec<u64>) -> Self {
        Self {
            blocks: Vec::new(),
            tokens: Vec::new(),
            keys,
            hashes: Vec::new(),
            registered: 0,
            root,
        }
    }

    /// An empty table with the same chain root and content keys, holding no block: for starting over in a fresh
    /// cache (the blocks of this one are not released; use it only when the cache they belong to is gone).
    pub fn detached(&self) -> Self {
        Self::new(self.root, self.keys.clone())
    }

    /// Tokens whose keys and values are stored.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The stored token ids, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The blocks, in order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    pub(crate) fn key_at(&self, position: usize) -> u64 {
        self.keys.get(position).copied().unwrap_or(0)
    }

    /// Computes the chain hashes of the first `blocks` full blocks of `ids` (the table's tokens, or the prompt
    /// about to be matched) that are not computed yet.
    pub(crate) fn ensure_hashes(&mut self, blocks: usize, ids: &[u32], block_size: usize) {
        while self.hashes.len() < blocks {
            let block = self.hashes.len();
            let parent = self.hashes.last().copied().unwrap_or(self.root);
            let range = block * block_size..(block + 1) * block_size;
            let keys: Vec<u64> = range.clone().map(|p| self.key_at(p)).collect();
            self.hashes.push(parent.chain(&ids[range], &keys));
        }
    }
}

/// A 64-bit content key for one image position: a hash of its embedding row's bytes (the row is a function of the
/// image and the model, so equal rows mean the same image content at that position).
pub fn content_key(row: &[f32]) -> u64 {
    let mut hasher = Sha256::new();
    for value in row {
        hasher.update(value.to_le_bytes());
    }
    let digest = hasher.finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    // 0 means "text token"; an image row hashing to 0 is nudged so it never matches one.
    u64::from_le_bytes(bytes).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_release_and_counts() {
        let mut pool = BlockPool::new(3);
        let a = pool.allocate().expect("a");
        let b = pool.allocate().expect("b");
        assert_eq!((a, b), (0, 1));
        assert_eq!(pool.counts().used, 2);
        pool.retain(a);
        pool.release(a);
        assert_eq!(pool.refs(a), 1);
        pool.release(a);
        pool.release(b);
        assert_eq!(
            pool.counts(),
            BlockCounts {
                total: 3,
                used: 0,
                cached: 0,
                available: 3
            }
        );
    }

    #[test]
    fn cached_blocks_are_evicted_least_recently_released_first() {
        let mut pool = BlockPool::new(2);
        let root = BlockHash::root("fp", "");
        let (ha, hb) = (root.chain(&[1], &[0]), root.chain(&[2], &[0]));
        let a = pool.allocate().expect("a");
        let b = pool.allocate().expect("b");
        pool.register(a, ha);
        pool.register(b, hb);
        pool.release(b);
        pool.release(a);
        assert_eq!(pool.counts().cached, 2);
        assert_eq!(pool.counts().available, 2);
        // b was released first: it goes first.
        assert_eq!(pool.allocate(), Some(b));
        assert_eq!(pool.lookup(&hb), None);
        assert_eq!(pool.lookup(&ha), Some(a));
        assert_eq!(pool.allocate(), None);
        pool.release(a);
        pool.release(b);
        pool.clear_cached();
        assert_eq!(pool.counts().cached, 0);
        assert_eq!(pool.counts().available, 2);
    }

    #[test]
    fn hashes_depend_on_the_whole_prefix_the_keys_and_the_root() {
        let root = BlockHash::root("fp", "");
        let one = root.chain(&[1, 2], &[0, 0]);
        assert_eq!(one, root.chain(&[1, 2], &[0, 0]));
        assert_ne!(one, root.chain(&[1, 2], &[0, 7]));
        assert_ne!(one, BlockHash::root("fp", "tenant").chain(&[1, 2], &[0, 0]));
        assert_ne!(one, BlockHash::root("other", "").chain(&[1, 2], &[0, 0]));
        assert_ne!(one.chain(&[3, 4], &[0, 0]), root.chain(&[3, 4], &[0, 0]));
    }
}

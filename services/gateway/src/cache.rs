//! The embedding cache: image content hash + model fingerprint → embedding, bounded in bytes, least recently used
//! evicted first, with hit/miss counters.
//!
//! A `std::sync::Mutex` guards the map rather than an actor task: every operation is a hash lookup and a few
//! B-tree operations (microseconds, never awaiting while held), so a lock is cheaper than a channel round trip and
//! cannot deadlock.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kosmos_proto::tensor::v1::Tensor;
use sha2::{Digest, Sha256};

/// A SHA-256 of an image's encoded bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    /// Hashes `bytes` (about a millisecond per MiB: call it off the async threads for large images).
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }
}

/// What an embedding is cached under: the caller's tenant, the image and the model that encoded it. The tenant
/// partitions the cache: one API key's images never hit for another, so neither hits nor timings
/// (`timings.encode_seconds`) tell a caller what others sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// The API key id (empty on an open gateway).
    pub tenant: Arc<str>,
    /// The image's content hash.
    pub hash: ContentHash,
    /// The fingerprint of the model the embedding is valid for.
    pub fingerprint: Arc<str>,
}

/// Counters and occupancy of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Lookups that found the embedding.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
    /// Embeddings held.
    pub entries: u64,
    /// Bytes held.
    pub bytes: u64,
    /// The bound on bytes held.
    pub capacity_bytes: u64,
    /// Embeddings evicted to make room.
    pub evictions: u64,
}

struct Entry {
    embedding: Arc<Tensor>,
    bytes: u64,
    last_used: u64,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<CacheKey, Entry>,
    /// last_used tick → key; the first entry is the least recently used.
    order: BTreeMap<u64, CacheKey>,
    tick: u64,
    bytes: u64,
}

impl Lru {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }
}

/// A byte-bounded LRU map of embeddings, shared by every request.
pub struct EmbeddingCache {
    capacity_bytes: u64,
    lru: Mutex<Lru>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

impl std::fmt::Debug for EmbeddingCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingCache")
            .field("stats", &self.stats())
            .finish()
    }
}

/// Bytes an entry is charged: its data, its shape and a fixed overhead for the map and the key.
fn charge(embedding: &Tensor, key: &CacheKey) -> u64 {
    (embedding.data.len() + embedding.shape.len() * 8 + key.fingerprint.len() + 160) as u64
}

impl EmbeddingCache {
    /// An empty cache holding at most `capacity_bytes` (0: nothing is ever kept).
    pub fn new(capacity_bytes: u64) -> Self {
        Self {
            capacity_bytes,
            lru: Mutex::new(Lru::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        // A panic while holding the lock cannot leave the map inconsistent with `order` in a way that matters
        // more than losing the cache, so a poisoned lock is used as is.
        self.lru
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The embedding under `key`, marked most recently used; counts a hit or a miss.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<Tensor>> {
        let found = {
            let mut lru = self.lock();
            let tick = lru.next_tick();
            let Lru { entries, order, .. } = &mut *lru;
            entries.get_mut(key).map(|entry| {
                order.remove(&entry.last_used);
                entry.last_used = tick;
                order.insert(tick, key.clone());
                entry.embedding.clone()
            })
        };
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Keeps `embedding` under `key`, evicting the least recently used entries until it fits. An embedding larger
    /// than the whole cache is not kept.
    pub fn insert(&self, key: CacheKey, embedding: Arc<Tensor>) {
        let bytes = charge(&embedding, &key);
        if bytes > self.capacity_bytes {
            return;
        }
        let mut evicted = 0;
        {
            let mut lru = self.lock();
            let tick = lru.next_tick();
            if let Some(old) = lru.entries.remove(&key) {
                lru.order.remove(&old.last_used);
                lru.bytes -= old.bytes;
            }
            while lru.bytes + bytes > self.capacity_bytes {
                let Some((_, oldest)) = lru.order.pop_first() else {
                    break;
                };
                if let Some(entry) = lru.entries.remove(&oldest) {
                    lru.bytes -= entry.bytes;
                    evicted += 1;
                }
            }
            lru.order.insert(tick, key.clone());
            lru.entries.insert(
                key,
                Entry {
                    embedding,
                    bytes,
                    last_used: tick,
                },
            );
            lru.bytes += bytes;
            debug_assert_eq!(lru.entries.len(), lru.order.len());
        }
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
    }

    /// Counters and occupancy now.
    pub fn stats(&self) -> CacheStats {
        let (entries, bytes) = {
            let lru = self.lock();
            (lru.entries.len() as u64, lru.bytes)
        };
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries,
            bytes,
            capacity_bytes: self.capacity_bytes,
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> CacheKey {
        CacheKey {
            tenant: Arc::from(""),
            hash: ContentHash::of(&[byte]),
            fingerprint: Arc::from("fp"),
        }
    }

    fn embedding(len: usize) -> Arc<Tensor> {
        Arc::new(Tensor {
            dtype: 1,
            shape: vec![len as u64 / 4],
            data: vec![0; len],
        })
    }

    #[test]
    fn hits_and_misses_are_counted() {
        let cache = EmbeddingCache::new(10_000);
        assert!(cache.get(&key(1)).is_none());
        cache.insert(key(1), embedding(400));
        assert!(cache.get(&key(1)).is_some());
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.entries), (1, 1, 1));
    }

    #[test]
    fn the_least_recently_used_entry_is_evicted_first() {
        let one = charge(&embedding(400), &key(0));
        let cache = EmbeddingCache::new(one * 2);
        cache.insert(key(1), embedding(400));
        cache.insert(key(2), embedding(400));
        assert!(cache.get(&key(1)).is_some(), "1 is now more recent than 2");
        cache.insert(key(3), embedding(400));
        assert!(
            cache.get(&key(2)).is_none(),
            "2 was the least recently used"
        );
        assert!(cache.get(&key(1)).is_some());
        assert!(cache.get(&key(3)).is_some());
        let stats = cache.stats();
        assert_eq!(stats.evictions, 1);
        assert!(stats.bytes <= stats.capacity_bytes);
    }

    #[test]
    fn the_same_image_under_another_fingerprint_is_another_entry() {
        let cache = EmbeddingCache::new(10_000);
        cache.insert(key(1), embedding(40));
        let other = CacheKey {
            fingerprint: Arc::from("other"),
            ..key(1)
        };
        assert!(cache.get(&other).is_none());
    }

    #[test]
    fn the_same_image_of_another_tenant_is_another_entry() {
        let cache = EmbeddingCache::new(10_000);
        cache.insert(key(1), embedding(40));
        let other = CacheKey {
            tenant: Arc::from("team-b"),
            ..key(1)
        };
        assert!(cache.get(&other).is_none());
        assert!(cache.get(&key(1)).is_some());
    }

    #[test]
    fn an_entry_larger_than_the_cache_is_not_kept_and_a_zero_cache_keeps_nothing() {
        let cache = EmbeddingCache::new(100);
        cache.insert(key(1), embedding(400));
        assert_eq!(cache.stats().entries, 0);
        let off = EmbeddingCache::new(0);
        off.insert(key(1), embedding(4));
        assert!(off.get(&key(1)).is_none());
    }
}

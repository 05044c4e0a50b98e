//! The prefix cache: the keys and values of token prefixes that requests share (a
//! department's system prompt, its few-shot turns), computed once and copied into the next
//! sequence that starts with the same tokens.
//!
//! Prefixes are cached in blocks of [`BLOCK_TOKENS`] positions. A block's key is a hash
//! chain over everything before it: the sharing scope, then every earlier block's tokens,
//! then its own. So a key names a whole prefix, never a block that merely looks alike, and
//! a scope (one department, or every caller of the model) never finds another scope's
//! blocks. A cache belongs to one loaded model version (one backend), so versions never
//! share one and unloading a version drops its cache. Entries are bounded in bytes and the
//! least recently used goes first.
//!
//! What a block holds (the keys and values of its positions, in the cache's element type)
//! is the backend's business: this module stores and finds them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

/// Positions per cached block: small enough that most of a shared prompt is cached, large
/// enough that a lookup is one hash per 32 tokens.
pub const BLOCK_TOKENS: usize = 32;

/// Whose requests may share cached prefixes (`engine.prefix_cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefixSharing {
    /// Only requests of the same department: one department's prompts never change
    /// another's timing.
    #[default]
    PerDepartment,
    /// Every request of the model version.
    Shared,
    /// No prefix cache.
    Off,
}

impl PrefixSharing {
    /// The scope a department's requests share prefixes in; `None` when nothing is shared.
    pub fn scope(self, department: &str) -> Option<PrefixScope> {
        match self {
            PrefixSharing::Off => None,
            PrefixSharing::Shared => Some(PrefixScope::of(b"shared", "")),
            PrefixSharing::PerDepartment => Some(PrefixScope::of(b"department", department)),
        }
    }
}

/// Where a sequence's prefixes may be found and shared: the start of every key chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrefixScope(BlockKey);

impl PrefixScope {
    fn of(kind: &[u8], name: &str) -> Self {
        let mut hash = Sha256::new();
        hash.update(b"moat prefix scope\0");
        hash.update(kind);
        hash.update([0]);
        hash.update(name.as_bytes());
        Self(BlockKey::from_digest(hash))
    }
}

/// Names a cached block: the hash of its scope and every token up to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockKey([u8; 16]);

impl BlockKey {
    fn from_digest(hash: Sha256) -> Self {
        let digest = hash.finalize();
        let mut key = [0; 16];
        key.copy_from_slice(&digest[..16]);
        Self(key)
    }

    /// The key of the block of `tokens` that follows the prefix this key names.
    pub fn next(self, tokens: &[u32]) -> Self {
        self.next_of(tokens, &[])
    }

    /// [`BlockKey::next`] of a block whose tokens are `head` then `tail`.
    pub fn next_of(self, head: &[u32], tail: &[u32]) -> Self {
        let mut hash = Sha256::new();
        hash.update(self.0);
        for token in head.iter().chain(tail) {
            hash.update(token.to_le_bytes());
        }
        Self::from_digest(hash)
    }
}

impl From<PrefixScope> for BlockKey {
    fn from(scope: PrefixScope) -> Self {
        scope.0
    }
}

/// A sequence's place in its key chain while its prompt is fed: the key of the prefix
/// cached or computed so far (whole blocks) and the tokens fed since (less than a block).
#[derive(Debug, Clone)]
pub struct PrefixChain {
    pub key: BlockKey,
    /// Positions the key covers (a multiple of [`BLOCK_TOKENS`]).
    pub positions: usize,
    pub pending: Vec<u32>,
}

impl PrefixChain {
    pub fn new(scope: PrefixScope) -> Self {
        Self {
            key: scope.into(),
            positions: 0,
            pending: Vec::with_capacity(BLOCK_TOKENS),
        }
    }
}

/// The cache's counters, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct PrefixStats {
    /// Blocks found and copied instead of computed.
    pub hits: AtomicU64,
    /// Lookups that found no block.
    pub misses: AtomicU64,
    /// Bytes the cached blocks hold now.
    pub bytes: AtomicU64,
}

impl PrefixStats {
    pub fn snapshot(&self) -> PrefixFigures {
        PrefixFigures {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

/// The cache's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixFigures {
    pub hits: u64,
    pub misses: u64,
    pub bytes: u64,
}

impl std::ops::Add for PrefixFigures {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            hits: self.hits + other.hits,
            misses: self.misses + other.misses,
            bytes: self.bytes + other.bytes,
        }
    }
}

/// Blocks of type `B` by key, at most `capacity` bytes, least recently used out first.
#[derive(Debug)]
pub struct PrefixCache<B> {
    entries: HashMap<BlockKey, Entry<B>>,
    capacity: usize,
    bytes: usize,
    /// Advances at every use; an entry's tick says when it was last used.
    clock: u64,
    stats: Arc<PrefixStats>,
}

#[derive(Debug)]
struct Entry<B> {
    block: B,
    bytes: usize,
    used: u64,
}

impl<B> PrefixCache<B> {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity,
            bytes: 0,
            clock: 0,
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> Arc<PrefixStats> {
        Arc::clone(&self.stats)
    }

    /// The block under `key`, counted as a hit, or a miss.
    pub fn get(&mut self, key: &BlockKey) -> Option<&B> {
        self.clock += 1;
        let clock = self.clock;
        match self.entries.get_mut(key) {
            Some(entry) => {
                entry.used = clock;
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                Some(&entry.block)
            }
            None => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    pub fn contains(&self, key: &BlockKey) -> bool {
        self.entries.contains_key(key)
    }

    /// Keeps `block` (of `bytes`) under `key`, dropping the least recently used blocks to
    /// make room; a block larger than the whole cache is not kept.
    pub fn insert(&mut self, key: BlockKey, block: B, bytes: usize) {
        if bytes > self.capacity || self.entries.contains_key(&key) {
            return;
        }
        while self.bytes + bytes > self.capacity {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, entry)| entry.used)
                .map(|(key, _)| *key)
            else {
                break;
            };
            if let Some(entry) = self.entries.remove(&oldest) {
                self.bytes -= entry.bytes;
            }
        }
        self.clock += 1;
        self.entries.insert(
            key,
            Entry {
                block,
                bytes,
                used: self.clock,
            },
        );
        self.bytes += bytes;
        self.stats.bytes.store(self.bytes as u64, Ordering::Relaxed);
    }
}

impl<B> Drop for PrefixCache<B> {
    fn drop(&mut self) {
        // The figures outlive the cache in whoever reports them: nothing is held any more.
        self.stats.bytes.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(scope: PrefixScope, blocks: &[&[u32]]) -> BlockKey {
        blocks
            .iter()
            .fold(BlockKey::from(scope), |key, tokens| key.next(tokens))
    }

    #[test]
    fn a_key_names_the_whole_prefix_in_its_scope() {
        let a = PrefixSharing::PerDepartment.scope("a").expect("a scope");
        let b = PrefixSharing::PerDepartment.scope("b").expect("a scope");
        let shared = PrefixSharing::Shared.scope("a").expect("a scope");
        assert_eq!(shared, PrefixSharing::Shared.scope("b").expect("a scope"));
        assert_eq!(PrefixSharing::Off.scope("a"), None);
        let (one, two): (&[u32], &[u32]) = (&[1, 2], &[3, 4]);
        assert_eq!(chain(a, &[one, two]), chain(a, &[one, two]));
        assert_ne!(chain(a, &[one, two]), chain(b, &[one, two]), "departments");
        assert_ne!(chain(a, &[one, two]), chain(shared, &[one, two]), "scopes");
        assert_ne!(
            chain(a, &[one, two]),
            chain(a, &[two, two]),
            "earlier blocks"
        );
        assert_ne!(
            chain(a, &[&[1, 2, 3]]),
            chain(a, &[&[1, 2], &[3]]),
            "block bounds"
        );
    }

    #[test]
    fn the_least_recently_used_block_goes_first_and_the_bytes_stay_bounded() {
        let scope = PrefixSharing::Shared.scope("").expect("a scope");
        let key = |n: u32| BlockKey::from(scope).next(&[n]);
        let mut cache = PrefixCache::new(300);
        cache.insert(key(1), "one", 100);
        cache.insert(key(2), "two", 100);
        cache.insert(key(3), "three", 100);
        assert!(cache.get(&key(1)).is_some(), "used again: now the newest");
        cache.insert(key(4), "four", 100);
        assert!(
            !cache.contains(&key(2)),
            "the least recently used is dropped"
        );
        assert!(cache.contains(&key(1)) && cache.contains(&key(3)) && cache.contains(&key(4)));
        cache.insert(key(5), "too big", 301);
        assert!(!cache.contains(&key(5)));
        assert!(cache.get(&key(9)).is_none());
        let figures = cache.stats().snapshot();
        assert_eq!(
            figures,
            PrefixFigures {
                hits: 1,
                misses: 1,
                bytes: 300
            }
        );
        let stats = cache.stats();
        drop(cache);
        assert_eq!(stats.snapshot().bytes, 0, "a dropped cache holds nothing");
    }
}

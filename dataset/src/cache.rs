//! A bounded cache of decoded chunks, least recently used out first. Random crops straddle chunk
//! borders and neighbouring samples share chunks, so a chunk decoded once serves many samples.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::store::{ArrayKind, Chunk};

/// A chunk of one array of one level of one scene (indices into the loader's tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey {
    /// Scene index.
    pub scene: u32,
    /// Level index.
    pub level: u16,
    /// Which array.
    pub kind: ArrayKind,
    /// Chunk row.
    pub row: u32,
    /// Chunk column.
    pub col: u32,
}

struct Inner {
    map: HashMap<ChunkKey, (Chunk, u64)>,
    bytes: usize,
    clock: u64,
    hits: u64,
    misses: u64,
}

/// Hits and misses so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups served from the cache.
    pub hits: u64,
    /// Lookups that had to decode.
    pub misses: u64,
    /// Chunks held now.
    pub chunks: usize,
    /// Decoded bytes held now.
    pub bytes: usize,
}

/// The cache; `capacity` bytes of decoded chunks (0 disables it).
pub struct ChunkCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl ChunkCache {
    /// A cache holding at most `capacity` decoded bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                bytes: 0,
                clock: 0,
                hits: 0,
                misses: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update below leaves the map consistent before it can panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The chunk, if held (counts a hit or a miss).
    pub fn get(&self, key: &ChunkKey) -> Option<Chunk> {
        let mut g = self.lock();
        g.clock += 1;
        let now = g.clock;
        match g.map.get_mut(key) {
            Some((c, used)) => {
                *used = now;
                let c = c.clone();
                g.hits += 1;
                Some(c)
            }
            None => {
                g.misses += 1;
                None
            }
        }
    }

    /// Add chunks, then drop the least recently used ones until the cache fits its capacity.
    pub fn insert(&self, chunks: impl IntoIterator<Item = (ChunkKey, Chunk)>) {
        if self.capacity == 0 {
            return;
        }
        let mut g = self.lock();
        for (k, c) in chunks {
            g.clock += 1;
            let now = g.clock;
            let added = c.bytes();
            if let Some((old, _)) = g.map.insert(k, (c, now)) {
                g.bytes -= old.bytes();
            }
            g.bytes += added;
        }
        // One scan per eviction: a few hundred entries, against milliseconds of decoding.
        while g.bytes > self.capacity {
            let Some(oldest) = g.map.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k) else {
                break;
            };
            if let Some((c, _)) = g.map.remove(&oldest) {
                g.bytes -= c.bytes();
            }
        }
    }

    /// Hits, misses and contents.
    pub fn stats(&self) -> CacheStats {
        let g = self.lock();
        CacheStats {
            hits: g.hits,
            misses: g.misses,
            chunks: g.map.len(),
            bytes: g.bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn key(row: u32) -> ChunkKey {
        ChunkKey {
            scene: 0,
            level: 0,
            kind: ArrayKind::Labels,
            row,
            col: 0,
        }
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let chunk = || Chunk(Arc::new(vec![0u8; 100]));
        let cache = ChunkCache::new(250);
        cache.insert([(key(0), chunk()), (key(1), chunk())]);
        assert!(cache.get(&key(0)).is_some()); // 0 is now newer than 1
        cache.insert([(key(2), chunk())]);
        assert!(cache.get(&key(1)).is_none());
        assert!(cache.get(&key(0)).is_some());
        assert!(cache.get(&key(2)).is_some());
        let s = cache.stats();
        assert_eq!((s.chunks, s.bytes, s.hits, s.misses), (2, 200, 3, 1));
        let off = ChunkCache::new(0);
        off.insert([(key(0), chunk())]);
        assert!(off.get(&key(0)).is_none());
    }
}

//! Moka as a writethrough cache: an in-process cache, fenced by Moka's
//! atomic per-key compute.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use writethrough_core::backend::CacheStore;
//! let cache = writethrough_moka::MokaCache::builder().max_capacity_bytes(64 << 20).build();
//! assert_eq!(cache.get("nothing").await.unwrap(), None);
//! # }
//! ```

use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::Expiry;
use moka::ops::compute::Op;
use writethrough_core::Result;
use writethrough_core::backend::{
    CacheCapabilities, CacheItem, CacheStore, DecodedSlot, Fence, KeyRule, async_trait, codec,
};

/// One stored entry with its own TTL, and the slot where the engine may
/// keep it decoded (new with every entry, so never another entry's).
#[derive(Clone)]
struct Stored {
    bytes: Bytes,
    ttl: Option<Duration>,
    slot: DecodedSlot,
}

impl Stored {
    fn new(bytes: Bytes, ttl: Option<Duration>) -> Self {
        Stored {
            bytes,
            ttl,
            slot: DecodedSlot::new(),
        }
    }
}

struct PerEntryTtl;

impl Expiry<String, Stored> for PerEntryTtl {
    fn expire_after_create(&self, _: &String, v: &Stored, _: Instant) -> Option<Duration> {
        v.ttl
    }
    fn expire_after_update(
        &self,
        _: &String,
        v: &Stored,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        v.ttl
    }
}

/// Builds a [`MokaCache`].
#[derive(Debug, Clone)]
pub struct MokaCacheBuilder {
    max_bytes: u64,
    max_value_len: usize,
}

impl MokaCacheBuilder {
    /// Total size of keys and values the cache holds before it evicts (default 256 MiB).
    #[must_use]
    pub fn max_capacity_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// Largest single entry accepted (default 16 MiB).
    #[must_use]
    pub fn max_value_len(mut self, bytes: usize) -> Self {
        self.max_value_len = bytes;
        self
    }

    /// Builds the cache.
    pub fn build(self) -> MokaCache {
        let inner = moka::future::Cache::builder()
            .max_capacity(self.max_bytes)
            .weigher(|k: &String, v: &Stored| {
                u32::try_from(k.len() + v.bytes.len()).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .build();
        MokaCache {
            inner,
            max_value_len: self.max_value_len,
        }
    }
}

/// An in-process cache backend on [`moka::future::Cache`].
///
/// Fencing is exact: `set_if_newer` runs Moka's `and_compute_with`, which
/// serializes every compute on a key, so the version check and the insert
/// are one step. Being in-process it needs no timeouts and shares nothing
/// with other processes (put it in front of Redis for that).
#[derive(Clone)]
pub struct MokaCache {
    inner: moka::future::Cache<String, Stored>,
    max_value_len: usize,
}

impl std::fmt::Debug for MokaCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MokaCache")
            .field("entries", &self.inner.entry_count())
            .field("weighted_bytes", &self.inner.weighted_size())
            .finish()
    }
}

impl Default for MokaCache {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl MokaCache {
    /// A builder with the defaults (256 MiB, 16 MiB per entry).
    pub fn builder() -> MokaCacheBuilder {
        MokaCacheBuilder {
            max_bytes: 256 << 20,
            max_value_len: 16 << 20,
        }
    }

    async fn fenced(&self, item: CacheItem) -> Fence {
        let epoch = item.epoch();
        let CacheItem {
            key,
            entry,
            version,
            ttl,
        } = item;
        let result = self
            .inner
            .entry(key)
            .and_compute_with(|current| {
                let replace = codec::replaces(
                    current.as_ref().map(|e| &e.value().bytes[..]),
                    epoch,
                    version,
                );
                let op = if replace {
                    Op::Put(Stored::new(entry, ttl))
                } else {
                    Op::Nop
                };
                std::future::ready(op)
            })
            .await;
        match result {
            moka::ops::compute::CompResult::Inserted(_)
            | moka::ops::compute::CompResult::ReplacedWith(_) => Fence::Applied,
            _ => Fence::Stale,
        }
    }
}

#[async_trait]
impl CacheStore for MokaCache {
    fn name(&self) -> &'static str {
        "moka"
    }

    fn capabilities(&self) -> CacheCapabilities {
        let mut c = CacheCapabilities::new();
        c.atomic_fencing = true;
        c.in_process = true;
        c.ttl_granularity = Duration::from_millis(1);
        c.max_ttl = Duration::from_secs(1000 * 86_400);
        c.max_key_len = 8 * 1024;
        c.key_rule = KeyRule::Any;
        c.max_value_len = self.max_value_len;
        c
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        Ok(self.inner.get(key).await.map(|s| s.bytes))
    }

    async fn get_slotted(&self, key: &str) -> Result<Option<(Bytes, Option<DecodedSlot>)>> {
        Ok(self.inner.get(key).await.map(|s| (s.bytes, Some(s.slot))))
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Bytes>>> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(self.inner.get(k).await.map(|s| s.bytes));
        }
        Ok(out)
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.inner
            .insert(key.to_owned(), Stored::new(value, ttl))
            .await;
        Ok(())
    }

    async fn set_many(&self, items: Vec<CacheItem>) -> Result<()> {
        for it in items {
            self.inner
                .insert(it.key, Stored::new(it.entry, it.ttl))
                .await;
        }
        Ok(())
    }

    async fn set_if_newer(&self, item: CacheItem) -> Result<Fence> {
        Ok(self.fenced(item).await)
    }

    async fn set_many_if_newer(&self, items: Vec<CacheItem>) -> Result<Vec<Fence>> {
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            out.push(self.fenced(it).await);
        }
        Ok(out)
    }

    async fn replace_if_unchanged(&self, expected: Bytes, item: CacheItem) -> Result<Fence> {
        let CacheItem {
            key, entry, ttl, ..
        } = item;
        let result = self
            .inner
            .entry(key)
            .and_compute_with(|current| {
                let same = current.is_some_and(|e| e.value().bytes == expected);
                std::future::ready(if same {
                    Op::Put(Stored::new(entry, ttl))
                } else {
                    Op::Nop
                })
            })
            .await;
        Ok(match result {
            moka::ops::compute::CompResult::ReplacedWith(_) => Fence::Applied,
            _ => Fence::Stale,
        })
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        Ok(self.inner.remove(key).await.is_some())
    }

    async fn clear(&self, prefix: &str) -> Result<()> {
        let doomed: Vec<String> = self
            .inner
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| (*k).clone())
            .collect();
        for k in doomed {
            self.inner.invalidate(&k).await;
        }
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

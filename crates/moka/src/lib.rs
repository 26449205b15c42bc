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

use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::Expiry;
use moka::ops::compute::Op;
use writethrough_core::Result;
use writethrough_core::backend::{
    CacheCapabilities, CacheItem, CacheStore, DecodedSlot, Fence, KeyRule, ScanCursor, ScanPage,
    async_trait, codec,
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

    /// Walks the whole cache (Moka's `iter`) for each page and keeps the
    /// `count` smallest keys under `prefix` that sort after the cursor (the
    /// last key of the previous page), so pages come in key order and a
    /// key present for the whole scan is listed exactly once; keys
    /// inserted or removed meanwhile may be listed or not, as with `SCAN`.
    /// Each page costs a pass over every entry: a listing of `n` keys
    /// costs `n / count` passes.
    async fn scan_keys(&self, prefix: &str, cursor: ScanCursor, count: usize) -> Result<ScanPage> {
        let count = count.max(1);
        let after = (!cursor.is_start()).then(|| cursor.position());
        // The `count` smallest keys past the cursor, largest on top.
        let mut page: BinaryHeap<String> = BinaryHeap::with_capacity(count + 1);
        for (k, _) in self.inner.iter() {
            if !k.starts_with(prefix) || after.is_some_and(|a| k.as_str() <= a) {
                continue;
            }
            if page.len() == count {
                if page.peek().is_some_and(|top| k.as_str() >= top.as_str()) {
                    continue;
                }
                page.pop();
            }
            page.push((*k).clone());
        }
        let keys = page.into_sorted_vec();
        let next = (keys.len() == count)
            .then(|| keys.last().map(|k| ScanCursor::at(k.clone())))
            .flatten();
        Ok(ScanPage::new(keys, next))
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn all_keys(c: &MokaCache, prefix: &str, count: usize) -> (Vec<String>, usize) {
        let (mut keys, mut pages, mut cursor) = (Vec::new(), 0, ScanCursor::start());
        loop {
            let page = c.scan_keys(prefix, cursor, count).await.unwrap();
            assert!(
                page.keys.len() <= count.max(1),
                "a page holds at most count keys"
            );
            pages += 1;
            keys.extend(page.keys);
            match page.next {
                Some(next) => cursor = next,
                None => return (keys, pages),
            }
        }
    }

    #[tokio::test]
    async fn scan_keys_lists_the_prefix_in_pages_once_each() {
        let c = MokaCache::default();
        for i in 0..25 {
            c.set(&format!("ns:t:{i}"), Bytes::from_static(b"x"), None)
                .await
                .unwrap();
        }
        for k in ["ns:u:1", "ns:t", "other", "ns:"] {
            c.set(k, Bytes::from_static(b"x"), None).await.unwrap();
        }
        let mut want: Vec<String> = (0..25).map(|i| format!("ns:t:{i}")).collect();
        want.sort();
        for count in [1, 7, 25, 26, 1000] {
            let (keys, pages) = all_keys(&c, "ns:t:", count).await;
            assert_eq!(keys, want, "count {count}");
            assert_eq!(pages, 25 / count + 1, "count {count}");
        }
        // 0 reads as 1.
        let (keys, _) = all_keys(&c, "ns:t:", 0).await;
        assert_eq!(keys.len(), 25);
        // The empty prefix lists everything; an unknown one nothing.
        assert_eq!(all_keys(&c, "", 10).await.0.len(), 29);
        assert_eq!(all_keys(&c, "nope:", 10).await, (Vec::new(), 1));
    }

    #[tokio::test]
    async fn a_scan_resumes_past_keys_removed_meanwhile() {
        let c = MokaCache::default();
        for i in 0..10 {
            c.set(&format!("p:{i}"), Bytes::from_static(b"x"), None)
                .await
                .unwrap();
        }
        let first = c.scan_keys("p:", ScanCursor::start(), 4).await.unwrap();
        assert_eq!(first.keys, ["p:0", "p:1", "p:2", "p:3"]);
        // The cursor's key and one not yet listed go away; the rest is still listed.
        c.delete("p:3").await.unwrap();
        c.delete("p:5").await.unwrap();
        let mut rest = Vec::new();
        let mut cursor = first.next.expect("more pages");
        loop {
            let page = c.scan_keys("p:", cursor, 4).await.unwrap();
            rest.extend(page.keys);
            match page.next {
                Some(n) => cursor = n,
                None => break,
            }
        }
        assert_eq!(rest, ["p:4", "p:6", "p:7", "p:8", "p:9"]);
    }
}

//! The cache side: what a cache backend must do for the engine.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};

/// Where an in-process cache keeps one stored entry decoded, for as long
/// as that entry lives: each entry it stores gets a new, empty slot (see
/// [`CacheStore::get_slotted`]), so what a slot holds always belongs to the
/// bytes stored with it. The engine fills it on the first shared read
/// (`Handle::get_arc`) and serves the next ones from it without decoding.
#[derive(Clone, Default)]
pub struct DecodedSlot(Arc<OnceLock<(u64, Arc<dyn Any + Send + Sync>)>>);

impl DecodedSlot {
    /// An empty slot, for a new entry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The decoded value of type `T` and the entry's epoch, if the slot
    /// holds one of that type.
    pub(crate) fn get<T: Any + Send + Sync>(&self) -> Option<(u64, Arc<T>)> {
        let (epoch, v) = self.0.get()?;
        v.clone().downcast::<T>().ok().map(|v| (*epoch, v))
    }

    /// Fills the slot; the first value stays.
    pub(crate) fn fill<T: Any + Send + Sync>(&self, epoch: u64, v: Arc<T>) {
        let _ = self.0.set((epoch, v));
    }
}

impl fmt::Debug for DecodedSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecodedSlot")
            .field("filled", &self.0.get().is_some())
            .finish()
    }
}

/// Which keys a cache backend can hold, beyond its length limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyRule {
    /// Any UTF-8 text.
    Any,
    /// No whitespace and no control characters (Memcached's text and meta protocols).
    NoSpaceOrControl,
}

/// What a cache backend can do; the engine and the conformance suite respect it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheCapabilities {
    /// `set_if_newer` is one atomic step on the server (a script, a CAS
    /// loop, an atomic entry compute). Always true for the built-in adapters.
    pub atomic_fencing: bool,
    /// The cache lives in this process: calls cannot stall on a network, so
    /// the engine does not wrap them in timeouts and nothing is shared with
    /// other processes.
    pub in_process: bool,
    /// The smallest TTL step; shorter TTLs are refused and longer ones are
    /// rounded up to a multiple of it.
    pub ttl_granularity: Duration,
    /// The longest TTL the backend accepts.
    pub max_ttl: Duration,
    /// The longest key, in bytes.
    pub max_key_len: usize,
    /// Which characters a key may contain.
    pub key_rule: KeyRule,
    /// The largest value (a whole cache entry, header included), in bytes.
    pub max_value_len: usize,
}

impl Default for CacheCapabilities {
    fn default() -> Self {
        Self::new()
    }
}

impl CacheCapabilities {
    /// Conservative defaults for an adapter to adjust: no atomic fencing,
    /// over a network, millisecond TTLs up to a year, 250-byte keys without
    /// whitespace, 1 MiB values.
    pub fn new() -> Self {
        CacheCapabilities {
            atomic_fencing: false,
            in_process: false,
            ttl_granularity: Duration::from_millis(1),
            max_ttl: Duration::from_secs(365 * 86_400),
            max_key_len: 250,
            key_rule: KeyRule::NoSpaceOrControl,
            max_value_len: 1 << 20,
        }
    }

    /// Checks a full cache key against the backend's rules.
    pub fn check_key(&self, key: &str) -> Result<()> {
        if key.is_empty() {
            return Err(Error::new(ErrorKind::InvalidKey, "the key is empty"));
        }
        if key.len() > self.max_key_len {
            return Err(Error::new(
                ErrorKind::InvalidKey,
                format!(
                    "the cache key is {} bytes; this cache holds at most {}",
                    key.len(),
                    self.max_key_len
                ),
            ));
        }
        if self.key_rule == KeyRule::NoSpaceOrControl
            && let Some(c) = key.chars().find(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Error::new(
                ErrorKind::InvalidKey,
                format!(
                    "the cache key contains {c:?}; this cache refuses whitespace and control characters"
                ),
            ));
        }
        Ok(())
    }

    /// Checks a TTL and rounds it up to the backend's granularity.
    pub fn check_ttl(&self, ttl: Duration) -> Result<Duration> {
        if ttl.is_zero() {
            return Err(Error::new(
                ErrorKind::InvalidTtl,
                "a TTL of zero would expire at once (use no TTL for entries that never expire)",
            ));
        }
        if ttl < self.ttl_granularity {
            return Err(Error::new(
                ErrorKind::InvalidTtl,
                format!(
                    "a TTL of {ttl:?} is finer than this cache's granularity of {:?}",
                    self.ttl_granularity
                ),
            ));
        }
        if ttl > self.max_ttl {
            return Err(Error::new(
                ErrorKind::InvalidTtl,
                format!(
                    "a TTL of {ttl:?} is longer than this cache's limit of {:?}",
                    self.max_ttl
                ),
            ));
        }
        let g = self.ttl_granularity.as_nanos();
        let n = ttl.as_nanos().div_ceil(g) * g;
        Ok(Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX)))
    }

    /// Checks the size of a cache entry.
    pub fn check_value_len(&self, len: usize) -> Result<()> {
        if len > self.max_value_len {
            return Err(Error::new(
                ErrorKind::ValueTooLarge,
                format!(
                    "the cache entry is {len} bytes; this cache holds at most {}",
                    self.max_value_len
                ),
            ));
        }
        Ok(())
    }
}

/// One entry to write.
#[derive(Debug, Clone)]
pub struct CacheItem {
    /// The full cache key.
    pub key: String,
    /// The encoded entry (see [`crate::codec`]); its header carries `version`.
    pub entry: Bytes,
    /// The version in the entry's header, passed along so adapters need not parse it.
    pub version: u64,
    /// Time to live, already checked against the capabilities; `None` never expires.
    pub ttl: Option<Duration>,
}

impl CacheItem {
    /// The cache epoch in the entry's header (0 when the entry carries none).
    pub fn epoch(&self) -> u64 {
        crate::codec::entry_epoch(&self.entry).unwrap_or(0)
    }
}

/// Where a key scan ([`CacheStore::scan_keys`]) stands. Start with
/// [`ScanCursor::start`], then pass each page's [`ScanPage::next`] back.
/// Callers treat it as opaque; each backend writes its own position in it
/// (Redis its `SCAN` cursor, Moka the last key listed, Memcached the next
/// server), and a cursor is only meaningful to the backend that made it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ScanCursor(String);

impl ScanCursor {
    /// The start of a scan.
    pub fn start() -> Self {
        Self::default()
    }

    /// A position in a backend's own encoding (for adapters).
    pub fn at(position: impl Into<String>) -> Self {
        ScanCursor(position.into())
    }

    /// Whether this is the start of a scan.
    pub fn is_start(&self) -> bool {
        self.0.is_empty()
    }

    /// The position, as the backend wrote it (empty at the start).
    pub fn position(&self) -> &str {
        &self.0
    }
}

/// One page of a key scan (see [`CacheStore::scan_keys`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScanPage {
    /// Full cache keys that start with the prefix asked for.
    pub keys: Vec<String>,
    /// Where the next page starts; `None` once the scan is complete.
    pub next: Option<ScanCursor>,
}

impl ScanPage {
    /// A page of `keys`, followed by `next` (`None`: the last page).
    pub fn new(keys: Vec<String>, next: Option<ScanCursor>) -> Self {
        ScanPage { keys, next }
    }
}

/// What a fenced write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// The entry was stored.
    Applied,
    /// An entry at the same or a newer version was already stored; nothing changed.
    Stale,
}

/// A cache backend.
///
/// # Contract
///
/// The conformance suite (`writethrough_testkit::cache_suite`) checks each point:
///
/// * `get` returns exactly the bytes last stored under the key, or `None`
///   when nothing is stored or the entry expired. Keys are opaque.
/// * `get_many` answers in the order of `keys`, one slot per key.
/// * `set` and `set_many` store unconditionally, with the given TTL.
/// * `set_if_newer` stores `item` only if nothing is stored, what is stored
///   is not a readable entry, or it is older in (epoch, version) order than
///   `(item.epoch(), item.version)` (see [`crate::codec::replaces`]); the read and the write
///   are one atomic step with respect to every other call on the same key,
///   from this process or any other.
/// * `set_many_if_newer` does the same per item, in one round trip where
///   the backend allows, and answers in the order of `items`.
/// * `replace_if_unchanged`, where supported, stores `item` only if the key
///   holds exactly `expected`, atomically.
/// * `delete` removes the key and tells whether something was there.
/// * `clear` removes every key that starts with `prefix`.
/// * `scan_keys`, where supported, lists every key that starts with
///   `prefix` and was present for the whole scan at least once; keys
///   written or removed during the scan may be listed or not.
/// * Every call either finishes or fails with a typed error; none panics
///   on backend failures.
#[async_trait]
pub trait CacheStore: Send + Sync + 'static {
    /// The backend's short name, for errors and metric labels.
    fn name(&self) -> &'static str;
    /// What this backend can do.
    fn capabilities(&self) -> CacheCapabilities;
    /// Reads one entry.
    async fn get(&self, key: &str) -> Result<Option<Bytes>>;
    /// [`CacheStore::get`], with the entry's [`DecodedSlot`] where the cache
    /// keeps entries in this process. A backend that offers slots must give
    /// every entry it stores a new one, never reuse a slot for other bytes.
    /// The default has none: every read decodes.
    async fn get_slotted(&self, key: &str) -> Result<Option<(Bytes, Option<DecodedSlot>)>> {
        Ok(self.get(key).await?.map(|b| (b, None)))
    }
    /// Reads several entries in one round trip.
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Bytes>>>;
    /// Stores unconditionally.
    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()>;
    /// Stores several entries unconditionally, in one round trip where possible.
    async fn set_many(&self, items: Vec<CacheItem>) -> Result<()>;
    /// Stores only if newer than what is stored.
    async fn set_if_newer(&self, item: CacheItem) -> Result<Fence>;
    /// Stores each item only if newer, in one round trip where possible.
    async fn set_many_if_newer(&self, items: Vec<CacheItem>) -> Result<Vec<Fence>>;
    /// Stores `item` only if its key still holds exactly `expected`: a
    /// compare-and-set on bytes. The engine uses it to replace an entry it
    /// could not read (a truncated payload behind a valid header, say),
    /// which the version fence alone would keep, without racing a
    /// concurrent write. Backends that cannot do it atomically keep this
    /// default, and such entries are then read as misses until they expire
    /// or a newer write replaces them.
    async fn replace_if_unchanged(&self, expected: Bytes, item: CacheItem) -> Result<Fence> {
        let _ = (expected, item);
        Err(Error::new(
            ErrorKind::Unsupported,
            "compare-and-set on bytes",
        ))
    }
    /// Removes one key.
    async fn delete(&self, key: &str) -> Result<bool>;
    /// Removes every key starting with `prefix`.
    async fn clear(&self, prefix: &str) -> Result<()>;
    /// Lists the keys that start with `prefix`, a page at a time: start
    /// from [`ScanCursor::start`] and pass back each page's
    /// [`ScanPage::next`] until it is `None`. `count` is a hint of how many
    /// keys a page holds (0 reads as 1); a page may hold more or fewer,
    /// even none before the end. As with Redis `SCAN`, every key present
    /// for the whole scan is listed (at least once); keys written or
    /// removed while it runs may be listed or not. For operators' tools
    /// (the audit looks for entries whose row is gone); the engine's reads
    /// and writes never use it. The default says the backend cannot list
    /// its keys ([`ErrorKind::Unsupported`]).
    async fn scan_keys(&self, prefix: &str, cursor: ScanCursor, count: usize) -> Result<ScanPage> {
        let _ = (prefix, cursor, count);
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("the {} cache cannot list its keys", self.name()),
        ))
    }
    /// Checks that the backend answers.
    async fn ping(&self) -> Result<()>;
    /// Who answers: text that changes whenever the cache may have lost
    /// entries or gone back in time without the engine writing there: a
    /// server restarted (even from a snapshot), a failover to another
    /// server, a server of a ring unreachable or back. The engine compares
    /// it with the identity recorded next to its epoch (see
    /// [`crate::codec::epoch_record`]) and starts a new epoch when they
    /// differ. Every client of the same servers must compute the same text.
    /// `None` (the default): the backend cannot tell; the engine then
    /// notices only a lost epoch record (a flush, a restart empty).
    async fn identity(&self) -> Result<Option<String>> {
        Ok(None)
    }
    /// How long the entry under `key` has left to live: `Ok(None)` when it
    /// never expires or nothing is stored. For operators' tools
    /// (`writethrough inspect`); the engine does not use it. The default
    /// says the backend cannot tell.
    async fn time_to_live(&self, key: &str) -> Result<Option<Duration>> {
        let _ = key;
        Err(Error::new(
            ErrorKind::Unsupported,
            "reading an entry's time to live",
        ))
    }
}

macro_rules! forward_cache_store {
    ($ptr:ty) => {
        #[async_trait]
        impl<C: CacheStore + ?Sized> CacheStore for $ptr {
            fn name(&self) -> &'static str {
                (**self).name()
            }
            fn capabilities(&self) -> CacheCapabilities {
                (**self).capabilities()
            }
            async fn get(&self, key: &str) -> Result<Option<Bytes>> {
                (**self).get(key).await
            }
            async fn get_slotted(&self, key: &str) -> Result<Option<(Bytes, Option<DecodedSlot>)>> {
                (**self).get_slotted(key).await
            }
            async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Bytes>>> {
                (**self).get_many(keys).await
            }
            async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
                (**self).set(key, value, ttl).await
            }
            async fn set_many(&self, items: Vec<CacheItem>) -> Result<()> {
                (**self).set_many(items).await
            }
            async fn set_if_newer(&self, item: CacheItem) -> Result<Fence> {
                (**self).set_if_newer(item).await
            }
            async fn set_many_if_newer(&self, items: Vec<CacheItem>) -> Result<Vec<Fence>> {
                (**self).set_many_if_newer(items).await
            }
            async fn replace_if_unchanged(
                &self,
                expected: Bytes,
                item: CacheItem,
            ) -> Result<Fence> {
                (**self).replace_if_unchanged(expected, item).await
            }
            async fn delete(&self, key: &str) -> Result<bool> {
                (**self).delete(key).await
            }
            async fn clear(&self, prefix: &str) -> Result<()> {
                (**self).clear(prefix).await
            }
            async fn scan_keys(
                &self,
                prefix: &str,
                cursor: ScanCursor,
                count: usize,
            ) -> Result<ScanPage> {
                (**self).scan_keys(prefix, cursor, count).await
            }
            async fn ping(&self) -> Result<()> {
                (**self).ping().await
            }
            async fn identity(&self) -> Result<Option<String>> {
                (**self).identity().await
            }
            async fn time_to_live(&self, key: &str) -> Result<Option<Duration>> {
                (**self).time_to_live(key).await
            }
        }
    };
}

forward_cache_store!(Arc<C>);
forward_cache_store!(Box<C>);

#[cfg(test)]
mod tests {
    use super::*;

    fn memcached_like() -> CacheCapabilities {
        CacheCapabilities {
            atomic_fencing: true,
            in_process: false,
            ttl_granularity: Duration::from_secs(1),
            max_ttl: Duration::from_secs(3600),
            max_key_len: 250,
            key_rule: KeyRule::NoSpaceOrControl,
            max_value_len: 1024,
        }
    }

    #[test]
    fn ttls_are_refused_at_zero_below_granularity_and_above_the_limit() {
        let c = memcached_like();
        for bad in [0, 999, 3_600_001] {
            let e = c.check_ttl(Duration::from_millis(bad)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidTtl, "{bad}");
        }
        assert_eq!(
            c.check_ttl(Duration::from_millis(1500)).unwrap(),
            Duration::from_secs(2)
        );
        assert_eq!(
            c.check_ttl(Duration::from_secs(1)).unwrap(),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn keys_are_refused_when_empty_long_spaced_or_controlled() {
        let c = memcached_like();
        for bad in ["", "a b", "a\nb", "a\u{7f}", &"k".repeat(251)] {
            assert_eq!(
                c.check_key(bad).unwrap_err().kind(),
                ErrorKind::InvalidKey,
                "{bad:?}"
            );
        }
        assert!(c.check_key(&"k".repeat(250)).is_ok());
        assert!(c.check_key("ns:t:ünïcode").is_ok());
    }

    #[test]
    fn values_over_the_item_limit_are_refused() {
        let c = memcached_like();
        assert!(c.check_value_len(1024).is_ok());
        assert_eq!(
            c.check_value_len(1025).unwrap_err().kind(),
            ErrorKind::ValueTooLarge
        );
    }
}

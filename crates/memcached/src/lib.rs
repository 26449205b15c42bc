//! Memcached as a writethrough cache: one server or many, over memcached's
//! meta protocol (memcached 1.6 or newer), with version-fenced writes by
//! compare-and-swap.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> writethrough_core::Result<()> {
//! use writethrough_core::backend::CacheStore;
//! use writethrough_memcached::MemcachedCache;
//!
//! let cache = MemcachedCache::connect("memcached://127.0.0.1:11211,127.0.0.1:11212?timeout=250ms").await?;
//! cache.set("greeting", "hello".into(), None).await?;
//! assert_eq!(cache.get("greeting").await?.as_deref(), Some(&b"hello"[..]));
//! # Ok(()) }
//! ```
//!
//! # How it talks to memcached
//!
//! The client is this crate's own (see the README for the measurements that
//! chose it): each server gets one TCP connection (or a few, with
//! `connections=`), and every task pipelines its requests onto it, as
//! `redis`'s multiplexed connection does; answers come back in order, so
//! nobody waits for someone else's round trip. Multi-key calls send one
//! batch per server, to all servers at once. A connection that fails is
//! dialed again on the next call, so a restarted server is used again
//! without rebuilding the cache. Every operation has a deadline (`timeout=`,
//! default 1 s), enforced by the connection on a coarse tick (a quarter of
//! the timeout, at most 100 ms) rather than by a timer per call.
//!
//! # Several servers
//!
//! Keys are placed by rendezvous hashing of the server names as written in
//! the URL: adding a server moves only the keys it takes over.
//!
//! # Fencing
//!
//! Memcached has no scripts, so `set_if_newer` is a compare-and-swap loop
//! on the version in the entry's header ([`codec::replaces`]): read the
//! entry and its CAS token (`mg <key> v c`); if nothing is there, `add`
//! (which fails if another writer got there first: read again); if what is
//! there is as new or newer, answer [`Fence::Stale`]; otherwise store with
//! the token (`ms ... C<cas>`), which fails if anyone wrote meanwhile: read
//! again. After `cas_retries` lost races the call fails with a temporary
//! error.
//!
//! # Memcached's limits
//!
//! Keys: at most 250 bytes, no whitespace or control characters. Such keys
//! are refused with [`ErrorKind::InvalidKey`] rather than hashed into
//! something else, so a key means the same thing in every tool that looks
//! at the cache. TTLs are whole seconds, rounded up, and sent one second
//! longer: memcached's clock ticks once a second, so an entry sent with `n`
//! seconds could vanish after `n - 1`, and a tombstone must outlive its TTL.
//! Past 30 days memcached wants an absolute Unix time, which this crate
//! computes from the local clock (clocks of clients and servers should
//! agree); TTLs are capped at 365 days. Values: at most the servers'
//! `item_size_max` (read at connect; the smallest if they differ) less 512
//! bytes for the item header.
//!
//! # Clearing a prefix
//!
//! Memcached cannot list keys by prefix. `clear("")` runs `flush_all` on
//! every server, which empties the whole servers, entries of other
//! applications included. `clear(prefix)` asks each server for a
//! `lru_crawler metadump hash` (one pass over every item, on a connection of
//! its own; `metadump all` on servers without it) and deletes the keys that start with `prefix`; entries written
//! while it runs may survive.
//!
//! `scan_keys` lists keys the same way, one server a page. A server that
//! refuses the metadump (memcached older than 1.4.31, or run with
//! `-o no_lru_crawler`) makes it fail with [`ErrorKind::Unsupported`], and
//! the audit then says it could not look for entries without a row.
//! `time_to_live` asks `mg <key> t` for the seconds left.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::join_all;
use writethrough_core::backend::{
    CacheCapabilities, CacheItem, CacheStore, Fence, KeyRule, ScanCursor, ScanPage, async_trait,
    codec,
};
use writethrough_core::{Error, ErrorKind, Result};

mod client;
mod config;
mod conn;
mod error;
mod proto;
#[doc(hidden)]
pub mod raw;
mod ring;

pub use config::MemcachedConfig;

use client::Server;
use conn::Deadline;
use error::{ClientError, map_err};
use proto::{Code, Kind, Resp, SetMode};

/// The item size memcached uses unless started with `-I`.
const DEFAULT_ITEM_SIZE_MAX: usize = 1 << 20;
/// Room left under `item_size_max` for memcached's item header, the key
/// (up to 250 bytes), the CAS value and the value's CRLF.
const ITEM_OVERHEAD: usize = 512;
/// How long `clear` may take per server: a metadump walks every item.
/// How long `identity` waits for each server's `stats`.
const IDENTITY_TIMEOUT: Duration = Duration::from_millis(200);
const CLEAR_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest TTL accepted. Memcached stores expiry as an absolute time in a
/// 32-bit field, so this stays well short of 2038.
const MAX_TTL: Duration = Duration::from_secs(365 * 86_400);

/// A memcached tier as a writethrough cache.
///
/// Cheap to clone: clones share the connections.
#[derive(Clone)]
pub struct MemcachedCache {
    inner: Arc<Inner>,
}

struct Inner {
    servers: Vec<Server>,
    ring: ring::Rendezvous,
    config: MemcachedConfig,
    caps: CacheCapabilities,
}

impl std::fmt::Debug for MemcachedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemcachedCache")
            .field("servers", &self.inner.config.servers)
            .field("max_value_len", &self.inner.caps.max_value_len)
            .finish()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unexpected(resp: &Resp) -> ClientError {
    match resp {
        Resp::Error(line) => ClientError::Server(line.clone()),
        // Named by its status only: a value could be a megabyte long.
        Resp::Meta { code, .. } => ClientError::Protocol(format!("unexpected answer {code:?}")),
        other => ClientError::Protocol(format!("unexpected answer {other:?}")),
    }
}

impl MemcachedCache {
    /// Connects to the servers of a `memcached://` URL (see [`MemcachedConfig`]).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(MemcachedConfig::from_url(url)?).await
    }

    /// Connects with a configuration.
    ///
    /// Asks every server for its `item_size_max`; fails only if no server
    /// answers. A server that is down is dialed again on each call that
    /// needs it.
    pub async fn connect_with(config: MemcachedConfig) -> Result<Self> {
        config.validate()?;
        let servers: Vec<Server> = config
            .servers
            .iter()
            .map(|s| {
                Server::new(
                    s.clone(),
                    config.connections,
                    config.connect_timeout,
                    config.timeout,
                )
            })
            .collect();
        let ring = ring::Rendezvous::new(config.servers.iter().map(String::as_str));
        let timeout = config.timeout;
        let answers = join_all(servers.iter().map(|s| async move {
            let r = s
                .call(
                    b"stats settings\r\n".to_vec(),
                    Kind::Stats,
                    1,
                    Deadline::after(timeout),
                )
                .await;
            (s, r)
        }))
        .await;
        let mut item_size_max: Option<usize> = None;
        let mut first_failure = None;
        for (s, r) in answers {
            match r.and_then(|mut v| match v.pop() {
                Some(Resp::Stats(stats)) => Ok(stats),
                Some(other) => Err(unexpected(&other)),
                None => Err(ClientError::Closed),
            }) {
                Ok(stats) => {
                    let size = stats
                        .iter()
                        .find(|(k, _)| k == "item_size_max")
                        .and_then(|(_, v)| v.parse().ok())
                        .unwrap_or(DEFAULT_ITEM_SIZE_MAX);
                    item_size_max = Some(item_size_max.map_or(size, |m| m.min(size)));
                }
                Err(e) => {
                    tracing::warn!(server = %s.name, error = %e, "memcached server not reachable at connect");
                    first_failure.get_or_insert(map_err(e, "cache.connect", &s.name));
                }
            }
        }
        if item_size_max.is_none()
            && let Some(e) = first_failure
        {
            return Err(e);
        }
        let item_size_max = item_size_max.unwrap_or(DEFAULT_ITEM_SIZE_MAX);
        let mut caps = CacheCapabilities::new();
        caps.atomic_fencing = true;
        caps.in_process = false;
        caps.ttl_granularity = Duration::from_secs(1);
        caps.max_ttl = MAX_TTL;
        caps.max_key_len = 250;
        caps.key_rule = KeyRule::NoSpaceOrControl;
        caps.max_value_len = config
            .max_value_len
            .unwrap_or(item_size_max.saturating_sub(ITEM_OVERHEAD));
        Ok(MemcachedCache {
            inner: Arc::new(Inner {
                servers,
                ring,
                config,
                caps,
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &MemcachedConfig {
        &self.inner.config
    }

    /// The server (`host:port`) that holds `key`.
    pub fn server_for(&self, key: &str) -> &str {
        &self.inner.servers[self.inner.ring.pick(key)].name
    }

    fn check_key(&self, key: &str, op: &'static str) -> Result<()> {
        self.inner
            .caps
            .check_key(key)
            .map_err(|e| e.with_operation(op).with_backend("memcached").with_key(key))
    }

    fn exptime(&self, ttl: Option<Duration>, op: &'static str, key: &str) -> Result<u64> {
        if let Some(t) = ttl {
            self.inner
                .caps
                .check_ttl(t)
                .map_err(|e| e.with_operation(op).with_backend("memcached").with_key(key))?;
        }
        Ok(proto::exptime(ttl, unix_now()))
    }

    fn check_item(&self, key: &str, len: usize, op: &'static str) -> Result<()> {
        self.check_key(key, op)?;
        self.inner
            .caps
            .check_value_len(len)
            .map_err(|e| e.with_operation(op).with_backend("memcached").with_key(key))
    }

    /// Runs `f` with a deadline `limit` from now; maps its failure. The
    /// deadline travels with each request and the connection enforces it,
    /// so no timer is armed per call.
    async fn timed<T, F>(
        &self,
        op: &'static str,
        server: &str,
        limit: Duration,
        f: impl FnOnce(Deadline) -> F,
    ) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, ClientError>>,
    {
        f(Deadline::after(limit))
            .await
            .map_err(|e| map_err(e, op, server))
    }

    /// Groups item indices by server: `(server, indices in input order)`.
    fn by_server<'a>(&self, keys: impl Iterator<Item = &'a str>) -> Vec<(usize, Vec<usize>)> {
        let n = self.inner.servers.len();
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, k) in keys.enumerate() {
            groups[self.inner.ring.pick(k)].push(i);
        }
        groups
            .into_iter()
            .enumerate()
            .filter(|(_, g)| !g.is_empty())
            .collect()
    }

    /// One server's share of a fenced batch: rounds of pipelined reads then
    /// pipelined writes, each round retrying only the items that lost a race.
    async fn fenced_on(
        &self,
        server: &Server,
        items: &[CacheItem],
        exptimes: &[u64],
        idx: &[usize],
        out: &mut [Option<Fence>],
        dl: Deadline,
    ) -> std::result::Result<(), ClientError> {
        let mut remaining: Vec<usize> = idx.to_vec();
        let mut writes: Vec<usize> = Vec::new();
        for _round in 0..=self.inner.config.cas_retries {
            let mut buf = Vec::with_capacity(remaining.len() * 64);
            for &i in &remaining {
                proto::get(&mut buf, &items[i].key, true);
            }
            let reads = server.call(buf, Kind::Meta, remaining.len(), dl).await?;
            let mut buf = Vec::new();
            writes.clear();
            for (&i, resp) in remaining.iter().zip(&reads) {
                let it = &items[i];
                let mode = match resp {
                    Resp::Meta {
                        code: Code::Miss, ..
                    } => SetMode::Add,
                    Resp::Meta {
                        code: Code::Value,
                        cas: Some(cas),
                        value,
                        ..
                    } => {
                        if !codec::replaces(value.as_deref(), it.epoch(), it.version) {
                            out[i] = Some(Fence::Stale);
                            continue;
                        }
                        SetMode::Cas(*cas)
                    }
                    other => return Err(unexpected(other)),
                };
                proto::set(&mut buf, &it.key, &it.entry, exptimes[i], mode);
                writes.push(i);
            }
            if writes.is_empty() {
                return Ok(());
            }
            let answers = server.call(buf, Kind::Meta, writes.len(), dl).await?;
            remaining.clear();
            for (&i, resp) in writes.iter().zip(&answers) {
                match resp {
                    Resp::Meta {
                        code: Code::Done, ..
                    } => out[i] = Some(Fence::Applied),
                    Resp::Meta {
                        code: Code::NotStored | Code::Exists | Code::NotFound,
                        ..
                    } => remaining.push(i),
                    other => return Err(unexpected(other)),
                }
            }
            if remaining.is_empty() {
                return Ok(());
            }
        }
        Err(ClientError::Contention(self.inner.config.cas_retries))
    }

    async fn fenced(&self, items: &[CacheItem], op: &'static str) -> Result<Vec<Fence>> {
        let mut exptimes = Vec::with_capacity(items.len());
        for it in items {
            self.check_item(&it.key, it.entry.len(), op)?;
            exptimes.push(self.exptime(it.ttl, op, &it.key)?);
        }
        let groups = self.by_server(items.iter().map(|it| it.key.as_str()));
        let results = join_all(groups.into_iter().map(|(s, idx)| {
            let server = &self.inner.servers[s];
            let exptimes = &exptimes;
            async move {
                let mut out = vec![None; items.len()];
                let r = self
                    .timed(op, &server.name, self.inner.config.timeout, |dl| {
                        self.fenced_on(server, items, exptimes, &idx, &mut out, dl)
                    })
                    .await;
                r.map(|()| out)
            }
        }))
        .await;
        let mut merged = vec![None; items.len()];
        for r in results {
            for (slot, f) in merged.iter_mut().zip(r?) {
                if f.is_some() {
                    *slot = f;
                }
            }
        }
        merged
            .into_iter()
            .map(|f| {
                f.ok_or_else(|| {
                    Error::new(ErrorKind::Backend, "a fenced write got no answer")
                        .with_operation(op)
                        .with_backend("memcached")
                })
            })
            .collect()
    }

    /// The keys of one server that start with `prefix`, from one
    /// `lru_crawler metadump hash` on a connection of its own: a walk of
    /// the hash table, which sees every item stored throughout, where the
    /// walk of the LRUs (`metadump all`) misses items that memcached moves
    /// between its LRU segments meanwhile (items read during the walk).
    /// A server that refuses `hash` (an older one) gets `all`. A server that
    /// refuses both (older than 1.4.31, or started without the LRU crawler)
    /// answers [`ClientError::Server`]; one busy with another crawl is
    /// waited for.
    async fn dump_keys(
        &self,
        server: &Server,
        prefix: &str,
        dl: Deadline,
    ) -> std::result::Result<Vec<String>, ClientError> {
        let conn = server.dedicated().await?;
        let mut attempts = 0;
        let mut command: &[u8] = b"lru_crawler metadump hash\r\n";
        loop {
            let r = client::call_on(
                &conn,
                command.to_vec(),
                Kind::Dump(prefix.to_owned()),
                1,
                dl,
            )
            .await?;
            match r.into_iter().next() {
                Some(Resp::Keys(keys)) => return Ok(keys),
                // Another crawl is running: wait for it.
                Some(Resp::Error(l)) if l.starts_with("BUSY") && attempts < 100 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // No hash walk on this server: the walk of the LRUs.
                Some(Resp::Error(l))
                    if command.ends_with(b"hash\r\n")
                        && (l.starts_with("CLIENT_ERROR") || l.starts_with("ERROR"))
                        && !l.contains("disabled") =>
                {
                    command = b"lru_crawler metadump all\r\n";
                }
                Some(other) => return Err(unexpected(&other)),
                None => return Err(ClientError::Closed),
            }
        }
    }

    async fn clear_server(
        &self,
        server: &Server,
        prefix: &str,
        dl: Deadline,
    ) -> std::result::Result<(), ClientError> {
        if prefix.is_empty() {
            let r = server
                .call(b"flush_all\r\n".to_vec(), Kind::Line, 1, dl)
                .await?;
            return match r.first() {
                Some(Resp::Line(l)) if l == "OK" => Ok(()),
                Some(other) => Err(unexpected(other)),
                None => Err(ClientError::Closed),
            };
        }
        let keys = self.dump_keys(server, prefix, dl).await?;
        for chunk in keys.chunks(1024) {
            let mut buf = Vec::with_capacity(chunk.len() * 64);
            for k in chunk {
                proto::delete(&mut buf, k);
            }
            for resp in server.call(buf, Kind::Meta, chunk.len(), dl).await? {
                match resp {
                    Resp::Meta {
                        code: Code::Done | Code::NotFound,
                        ..
                    } => {}
                    other => return Err(unexpected(&other)),
                }
            }
        }
        Ok(())
    }
}

fn value_of(resp: Resp) -> std::result::Result<Option<Bytes>, ClientError> {
    match resp {
        Resp::Meta {
            code: Code::Value,
            value,
            ..
        } => Ok(value),
        Resp::Meta {
            code: Code::Miss, ..
        } => Ok(None),
        other => Err(unexpected(&other)),
    }
}

fn stored(resp: &Resp) -> std::result::Result<(), ClientError> {
    match resp {
        Resp::Meta {
            code: Code::Done, ..
        } => Ok(()),
        other => Err(unexpected(other)),
    }
}

#[async_trait]
impl CacheStore for MemcachedCache {
    fn name(&self) -> &'static str {
        "memcached"
    }

    fn capabilities(&self) -> CacheCapabilities {
        self.inner.caps
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        const OP: &str = "cache.get";
        self.check_key(key, OP)?;
        let server = &self.inner.servers[self.inner.ring.pick(key)];
        let mut buf = Vec::with_capacity(key.len() + 8);
        proto::get(&mut buf, key, false);
        self.timed(
            OP,
            &server.name,
            self.inner.config.timeout,
            |dl| async move {
                let mut r = server.call(buf, Kind::Meta, 1, dl).await?;
                value_of(r.pop().ok_or(ClientError::Closed)?)
            },
        )
        .await
        .map_err(|e| e.with_key(key))
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Bytes>>> {
        const OP: &str = "cache.get_many";
        for k in keys {
            self.check_key(k, OP)?;
        }
        let groups = self.by_server(keys.iter().map(String::as_str));
        let results = join_all(groups.into_iter().map(|(s, idx)| {
            let server = &self.inner.servers[s];
            let mut buf = Vec::with_capacity(idx.len() * 64);
            for &i in &idx {
                proto::get(&mut buf, &keys[i], false);
            }
            async move {
                let r = self
                    .timed(OP, &server.name, self.inner.config.timeout, |dl| {
                        server.call(buf, Kind::Meta, idx.len(), dl)
                    })
                    .await;
                (idx, r)
            }
        }))
        .await;
        let mut out = vec![None; keys.len()];
        for (idx, r) in results {
            for (i, resp) in idx.into_iter().zip(r?) {
                out[i] = value_of(resp)
                    .map_err(|e| map_err(e, OP, self.server_for(&keys[i])).with_key(&keys[i]))?;
            }
        }
        Ok(out)
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        const OP: &str = "cache.set";
        self.check_item(key, value.len(), OP)?;
        let exptime = self.exptime(ttl, OP, key)?;
        let server = &self.inner.servers[self.inner.ring.pick(key)];
        let mut buf = Vec::new();
        proto::set(&mut buf, key, &value, exptime, SetMode::Set);
        self.timed(
            OP,
            &server.name,
            self.inner.config.timeout,
            |dl| async move {
                let r = server.call(buf, Kind::Meta, 1, dl).await?;
                stored(r.first().ok_or(ClientError::Closed)?)
            },
        )
        .await
        .map_err(|e| e.with_key(key))
    }

    async fn set_many(&self, items: Vec<CacheItem>) -> Result<()> {
        const OP: &str = "cache.set_many";
        let mut exptimes = Vec::with_capacity(items.len());
        for it in &items {
            self.check_item(&it.key, it.entry.len(), OP)?;
            exptimes.push(self.exptime(it.ttl, OP, &it.key)?);
        }
        let groups = self.by_server(items.iter().map(|it| it.key.as_str()));
        let results = join_all(groups.into_iter().map(|(s, idx)| {
            let server = &self.inner.servers[s];
            let mut buf = Vec::new();
            for &i in &idx {
                let it = &items[i];
                proto::set(&mut buf, &it.key, &it.entry, exptimes[i], SetMode::Set);
            }
            self.timed(
                OP,
                &server.name,
                self.inner.config.timeout,
                move |dl| async move {
                    for r in server.call(buf, Kind::Meta, idx.len(), dl).await? {
                        stored(&r)?;
                    }
                    Ok(())
                },
            )
        }))
        .await;
        results.into_iter().collect()
    }

    async fn set_if_newer(&self, item: CacheItem) -> Result<Fence> {
        let key = item.key.clone();
        let mut r = self
            .fenced(std::slice::from_ref(&item), "cache.set_if_newer")
            .await
            .map_err(|e| e.with_key(&key))?;
        Ok(r.pop().unwrap_or(Fence::Stale))
    }

    async fn set_many_if_newer(&self, items: Vec<CacheItem>) -> Result<Vec<Fence>> {
        self.fenced(&items, "cache.set_many_if_newer").await
    }

    async fn replace_if_unchanged(&self, expected: Bytes, item: CacheItem) -> Result<Fence> {
        const OP: &str = "cache.replace_if_unchanged";
        self.check_item(&item.key, item.entry.len(), OP)?;
        let exptime = self.exptime(item.ttl, OP, &item.key)?;
        let server = &self.inner.servers[self.inner.ring.pick(&item.key)];
        let mut buf = Vec::with_capacity(item.key.len() + 8);
        proto::get(&mut buf, &item.key, true);
        // Read the bytes and their CAS token, then store with the token: the
        // write lands only if nobody wrote in between.
        let item = &item;
        self.timed(
            OP,
            &server.name,
            self.inner.config.timeout,
            |dl| async move {
                let mut r = server.call(buf, Kind::Meta, 1, dl).await?;
                let cas = match r.pop() {
                    Some(Resp::Meta {
                        code: Code::Value,
                        cas: Some(cas),
                        value: Some(v),
                        ..
                    }) if v == expected => cas,
                    Some(Resp::Meta {
                        code: Code::Value | Code::Miss,
                        ..
                    }) => return Ok(Fence::Stale),
                    Some(other) => return Err(unexpected(&other)),
                    None => return Err(ClientError::Closed),
                };
                let mut buf = Vec::new();
                proto::set(&mut buf, &item.key, &item.entry, exptime, SetMode::Cas(cas));
                let r = server.call(buf, Kind::Meta, 1, dl).await?;
                match r.first() {
                    Some(Resp::Meta {
                        code: Code::Done, ..
                    }) => Ok(Fence::Applied),
                    Some(Resp::Meta {
                        code: Code::Exists | Code::NotFound,
                        ..
                    }) => Ok(Fence::Stale),
                    Some(other) => Err(unexpected(other)),
                    None => Err(ClientError::Closed),
                }
            },
        )
        .await
        .map_err(|e| e.with_key(&item.key))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        const OP: &str = "cache.delete";
        self.check_key(key, OP)?;
        let server = &self.inner.servers[self.inner.ring.pick(key)];
        let mut buf = Vec::new();
        proto::delete(&mut buf, key);
        self.timed(
            OP,
            &server.name,
            self.inner.config.timeout,
            |dl| async move {
                let r = server.call(buf, Kind::Meta, 1, dl).await?;
                match r.first() {
                    Some(Resp::Meta {
                        code: Code::Done, ..
                    }) => Ok(true),
                    Some(Resp::Meta {
                        code: Code::NotFound,
                        ..
                    }) => Ok(false),
                    Some(other) => Err(unexpected(other)),
                    None => Err(ClientError::Closed),
                }
            },
        )
        .await
        .map_err(|e| e.with_key(key))
    }

    async fn clear(&self, prefix: &str) -> Result<()> {
        const OP: &str = "cache.clear";
        let results = join_all(self.inner.servers.iter().map(|s| {
            self.timed(
                OP,
                &s.name,
                CLEAR_TIMEOUT.max(self.inner.config.timeout),
                |dl| self.clear_server(s, prefix, dl),
            )
        }))
        .await;
        results.into_iter().collect()
    }

    /// One server's keys under `prefix` a page, servers in the order of
    /// the URL (the cursor is the next server's index), each from one
    /// `lru_crawler metadump hash`: a page holds all of a server's matching
    /// keys whatever `count` says, and takes one walk over its items. A
    /// server that refuses the dump (memcached older than 1.4.31, or
    /// started with `-o no_lru_crawler`) makes the call fail with
    /// [`ErrorKind::Unsupported`]; keys written during the walk may be
    /// listed or not.
    async fn scan_keys(&self, prefix: &str, cursor: ScanCursor, count: usize) -> Result<ScanPage> {
        const OP: &str = "cache.scan_keys";
        let _ = count;
        let at = if cursor.is_start() {
            0
        } else {
            match cursor.position().parse::<usize>() {
                Ok(i) if i < self.inner.servers.len() => i,
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidValue,
                        format!(
                            "{:?} is not a memcached scan cursor of these {} servers",
                            cursor.position(),
                            self.inner.servers.len()
                        ),
                    )
                    .with_operation(OP)
                    .with_backend("memcached"));
                }
            }
        };
        let server = &self.inner.servers[at];
        let limit = CLEAR_TIMEOUT.max(self.inner.config.timeout);
        let keys = match self.dump_keys(server, prefix, Deadline::after(limit)).await {
            Ok(keys) => keys,
            Err(ClientError::Server(line)) => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "memcached at {} cannot list its keys: it answered {line:?} to \
                         lru_crawler metadump (memcached 1.4.31 or newer with the LRU crawler on is needed)",
                        server.name
                    ),
                )
                .with_operation(OP)
                .with_backend("memcached"));
            }
            Err(e) => return Err(map_err(e, OP, &server.name)),
        };
        let next =
            (at + 1 < self.inner.servers.len()).then(|| ScanCursor::at((at + 1).to_string()));
        Ok(ScanPage::new(keys, next))
    }

    /// `mg <key> t`: the seconds left (memcached counts in whole seconds,
    /// and this crate sends TTLs one second longer than asked), `None` for
    /// an item without expiry (`t-1`) or no item.
    async fn time_to_live(&self, key: &str) -> Result<Option<Duration>> {
        const OP: &str = "cache.time_to_live";
        self.check_key(key, OP)?;
        let server = &self.inner.servers[self.inner.ring.pick(key)];
        let mut buf = Vec::with_capacity(key.len() + 8);
        proto::ttl(&mut buf, key);
        self.timed(
            OP,
            &server.name,
            self.inner.config.timeout,
            |dl| async move {
                let mut r = server.call(buf, Kind::Meta, 1, dl).await?;
                match r.pop() {
                    Some(Resp::Meta {
                        code: Code::Done | Code::Value,
                        ttl,
                        ..
                    }) => Ok(ttl
                        .and_then(|t| u64::try_from(t).ok())
                        .map(Duration::from_secs)),
                    Some(Resp::Meta {
                        code: Code::Miss, ..
                    }) => Ok(None),
                    Some(other) => Err(unexpected(&other)),
                    None => Err(ClientError::Closed),
                }
            },
        )
        .await
        .map_err(|e| e.with_key(key))
    }

    async fn ping(&self) -> Result<()> {
        const OP: &str = "cache.ping";
        let results = join_all(self.inner.servers.iter().map(|s| {
            self.timed(
                OP,
                &s.name,
                self.inner.config.timeout,
                move |dl| async move {
                    let r = s.call(b"version\r\n".to_vec(), Kind::Line, 1, dl).await?;
                    match r.first() {
                        Some(Resp::Line(l)) if l.starts_with("VERSION") => Ok(()),
                        Some(other) => Err(unexpected(other)),
                        None => Err(ClientError::Closed),
                    }
                },
            )
        }))
        .await;
        results.into_iter().collect()
    }

    /// Every server's process id and start time (`stats`: `pid`, and
    /// `time - uptime`), in the order of the URL, or `down` for a server
    /// that does not answer within 200 ms: it changes when a server restarts, and when
    /// one leaves or rejoins the ring with whatever it still holds.
    async fn identity(&self) -> Result<Option<String>> {
        const OP: &str = "cache.identity";
        // Within the engine's default cache timeout: a server that does not
        // answer in time is reported down, not the whole call failed.
        let limit = self.inner.config.timeout.min(IDENTITY_TIMEOUT);
        let answers = join_all(self.inner.servers.iter().map(|s| {
            self.timed(OP, &s.name, limit, move |dl| async move {
                let mut r = s.call(b"stats\r\n".to_vec(), Kind::Stats, 1, dl).await?;
                match r.pop() {
                    Some(Resp::Stats(stats)) => Ok(stats),
                    Some(other) => Err(unexpected(&other)),
                    None => Err(ClientError::Closed),
                }
            })
        }))
        .await;
        let mut parts = Vec::with_capacity(answers.len());
        let mut any_up = None;
        for (s, r) in self.inner.servers.iter().zip(answers) {
            match r {
                Ok(stats) => {
                    let field = |name: &str| {
                        stats
                            .iter()
                            .find(|(k, _)| k == name)
                            .and_then(|(_, v)| v.parse::<u64>().ok())
                    };
                    let started = field("time")
                        .zip(field("uptime"))
                        .map(|(t, u)| t.saturating_sub(u));
                    let (Some(pid), Some(started)) = (field("pid"), started) else {
                        return Err(Error::new(
                            ErrorKind::Backend,
                            "stats did not report pid, time and uptime",
                        )
                        .with_operation(OP)
                        .with_backend("memcached"));
                    };
                    any_up = Some(());
                    parts.push(format!("{}=pid:{pid}:started:{started}", s.name));
                }
                Err(_) => parts.push(format!("{}=down", s.name)),
            }
        }
        match any_up {
            Some(()) => Ok(Some(parts.join(","))),
            None => Err(
                Error::new(ErrorKind::Unavailable, "no memcached server answers")
                    .with_operation(OP)
                    .with_backend("memcached"),
            ),
        }
    }
}

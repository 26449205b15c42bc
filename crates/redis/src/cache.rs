//! [`RedisCache`]: the [`CacheStore`] on one Redis server.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo, SingleNodeRoutingInfo, Slot,
};
use redis::{Cmd, Pipeline, RedisResult, ServerError, ServerErrorKind, Value};
use writethrough_core::backend::{
    CacheCapabilities, CacheItem, CacheStore, Fence, KeyRule, async_trait,
};
use writethrough_core::{Error, ErrorKind, Result};

use crate::cluster::Cluster;
use crate::config::{MAX_KEY_LEN, RedisConfig, Target};
use crate::error::{BACKEND, map_err, unexpected};
use crate::script;

/// The longest TTL accepted: 100 years. Redis keeps expiry times as signed
/// 64-bit Unix milliseconds, so this is nowhere near its limit.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Keys per `SCAN` page and per `UNLINK` in [`RedisCache::clear`].
const SCAN_COUNT: usize = 1000;

/// A cache backend on a Redis server (or anything speaking its protocol:
/// Valkey, KeyDB, Dragonfly with Lua scripting).
///
/// All calls share one multiplexed connection, held by a redis-rs
/// [`ConnectionManager`]: requests from many tasks are pipelined on it, and
/// when the server goes away the calls fail with
/// [`ErrorKind::Unavailable`] while the manager reconnects in the
/// background, so the same `RedisCache` works again once the server is
/// back. Cloning is cheap and shares the connection.
///
/// Fenced writes run a Lua script on the server (see the crate docs), which
/// makes `set_if_newer` atomic against every client of the server.
///
/// ```no_run
/// # async fn demo() -> writethrough_core::Result<()> {
/// use writethrough_core::backend::CacheStore;
/// use writethrough_redis::RedisCache;
///
/// let cache = RedisCache::connect("redis://127.0.0.1:6379").await?;
/// cache.set("greeting", "hello".into(), None).await?;
/// assert_eq!(cache.get("greeting").await?.as_deref(), Some(&b"hello"[..]));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisCache {
    conn: Conn,
    max_value_len: usize,
    url: Arc<str>,
}

/// One server's self-reconnecting connection, or redis-rs's cluster
/// connection (a multiplexed connection per node, routing each command by
/// its key's slot and following `MOVED` and `ASK`).
#[derive(Clone)]
enum Conn {
    Node(ConnectionManager),
    Cluster(Arc<Cluster>),
}

impl Conn {
    async fn req(&self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Conn::Node(c) => c.clone().req_packed_command(cmd).await,
            Conn::Cluster(c) => {
                let r = c.conn().req_packed_command(cmd).await;
                c.observe(&r);
                r
            }
        }
    }

    /// Sends `cmd` to the primary at `addr` (`host:port`), on a cluster.
    async fn req_at(&self, cmd: &Cmd, addr: &str) -> RedisResult<Value> {
        let Conn::Cluster(c) = self else {
            return self.req(cmd).await;
        };
        let (host, port) = addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
            .ok_or_else(|| {
                redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "the cluster named a node without a port",
                ))
            })?;
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
        let r = c.conn().route_command(cmd.clone(), route).await;
        c.observe(&r);
        r
    }
}

impl fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCache")
            .field("url", &self.url)
            .field("max_value_len", &self.max_value_len)
            .finish_non_exhaustive()
    }
}

impl RedisCache {
    /// Connects to the server at `url` with the default settings
    /// ([`RedisConfig::from_url`]).
    ///
    /// Fails with [`ErrorKind::Config`] for an unusable URL and with
    /// [`ErrorKind::Unavailable`] or [`ErrorKind::Timeout`] when the server
    /// cannot be reached.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::with_config(RedisConfig::from_url(url)?).await
    }

    /// Connects with `config`, waits for the connection, and loads the
    /// scripts.
    pub async fn with_config(config: RedisConfig) -> Result<Self> {
        const OP: &str = "cache.connect";
        let conn = match config.validate()? {
            Target::Node(client) => Conn::Node(
                ConnectionManager::new_with_config(client, manager_config(&config))
                    .await
                    .map_err(|e| map_err(e, OP))?,
            ),
            Target::Cluster(client) => {
                let conn = crate::cluster::connect(&client, &config)
                    .await
                    .map_err(|e| e.with_operation(OP))?;
                Conn::Cluster(Arc::new(Cluster::new(client, config.clone(), conn)))
            }
        };
        let cache = Self::from_parts(conn, &config);
        if matches!(cache.conn, Conn::Cluster(_)) {
            crate::cluster::check_topology(&cache, &config).await?;
        }
        cache.load_scripts().await?;
        Ok(cache)
    }

    /// Builds the cache without connecting: the first call connects. Use it
    /// when the application must start while Redis is down (the engine
    /// serves from the database meanwhile).
    ///
    /// On a cluster the seed nodes are asked for the topology in the
    /// background; the topology checks of [`with_config`](Self::with_config)
    /// are skipped.
    pub fn with_config_lazy(config: RedisConfig) -> Result<Self> {
        let conn = match config.validate()? {
            Target::Node(client) => Conn::Node(
                ConnectionManager::new_lazy_with_config(client, manager_config(&config))
                    .map_err(|e| map_err(e, "cache.connect"))?,
            ),
            Target::Cluster(client) => {
                let conn = client.get_pending_async_connection_with_config(
                    crate::cluster::client_config(&config),
                );
                Conn::Cluster(Arc::new(Cluster::new(client, config.clone(), conn)))
            }
        };
        Ok(Self::from_parts(conn, &config))
    }

    /// Whether this cache is on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// How many times the cluster connection, stuck failing, was replaced
    /// by a new one made from the seeds (0 on a single server).
    pub fn cluster_reconnects(&self) -> u64 {
        match &self.conn {
            Conn::Cluster(c) => c.rebuilds(),
            Conn::Node(_) => 0,
        }
    }

    fn from_parts(conn: Conn, config: &RedisConfig) -> Self {
        RedisCache {
            conn,
            max_value_len: config.max_value_len,
            url: config.redacted_url().into(),
        }
    }

    /// Loads the adapter's scripts into the server's script cache.
    ///
    /// Never required: a call that finds a script missing loads it and
    /// retries. Calling it after a known restart only saves that retry.
    pub async fn load_scripts(&self) -> Result<()> {
        const OP: &str = "cache.load_scripts";
        // One call per script: on a cluster `SCRIPT LOAD` goes to every node.
        let mut replies = Vec::with_capacity(2);
        for source in [script::FENCED_SET, script::REPLACE_IF_UNCHANGED] {
            replies.push(self.call(&script::load(source), OP).await?);
        }
        for (reply, s) in replies
            .into_iter()
            .zip([&*script::FENCE, &*script::REPLACE])
        {
            check_loaded(OP, s, reply)?;
        }
        Ok(())
    }

    pub(crate) async fn call(&self, cmd: &Cmd, op: &'static str) -> Result<Value> {
        match self.conn.req(cmd).await {
            Ok(Value::ServerError(e)) => Err(map_err(e.into(), op)),
            Ok(v) => Ok(v),
            Err(e) => Err(map_err(e, op)),
        }
    }

    /// [`call`](Self::call) on the cluster primary at `addr` (`host:port`).
    pub(crate) async fn call_at(&self, cmd: &Cmd, addr: &str, op: &'static str) -> Result<Value> {
        match self.conn.req_at(cmd, addr).await {
            Ok(Value::ServerError(e)) => Err(map_err(e.into(), op)),
            Ok(v) => Ok(v),
            Err(e) => Err(map_err(e, op)),
        }
    }

    /// A command sent to every primary of the cluster (one server: to it),
    /// with each primary's reply by its address.
    pub(crate) async fn call_primaries(
        &self,
        cmd: &Cmd,
        op: &'static str,
    ) -> Result<Vec<(String, Value)>> {
        let Conn::Cluster(c) = &self.conn else {
            return Ok(vec![(String::new(), self.call(cmd, op).await?)]);
        };
        let route = RoutingInfo::MultiNode((
            MultipleNodeRoutingInfo::AllMasters,
            Some(ResponsePolicy::Special),
        ));
        let reply = c.conn().route_command(cmd.clone(), route).await;
        c.observe(&reply);
        let reply = reply.map_err(|e| map_err(e, op))?;
        let pairs = match reply {
            Value::Map(pairs) => pairs,
            other => return Err(unexpected(op, &other)),
        };
        let mut out = Vec::with_capacity(pairs.len());
        for (addr, value) in pairs {
            let addr = match addr {
                Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                Value::SimpleString(s) => s,
                other => return Err(unexpected(op, &other)),
            };
            if let Value::ServerError(e) = value {
                return Err(map_err(e.into(), op));
            }
            out.push((addr, value));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn call_many(&self, pipe: &Pipeline, op: &'static str) -> Result<Vec<Value>> {
        let replies = match &self.conn {
            Conn::Node(c) => c
                .clone()
                .req_packed_commands(pipe, 0, pipe.len())
                .await
                .map_err(|e| map_err(e, op))?,
            // A cluster pipeline must stay in one slot: send the commands at
            // once instead, each routed by its own key. The ones for one
            // node share that node's multiplexed connection, so they go out
            // together and come back in about one round trip per node.
            Conn::Cluster(c) => futures::future::join_all(pipe.cmd_iter().map(|cmd| {
                let (c, mut conn) = (c.clone(), c.conn());
                async move {
                    let r = conn.req_packed_command(cmd).await;
                    c.observe(&r);
                    r
                }
            }))
            .await
            .into_iter()
            .map(|r| match r {
                Ok(v) => Ok(v),
                Err(e) => ServerError::try_from(e)
                    .map(Value::ServerError)
                    .map_err(|e| map_err(e, op)),
            })
            .collect::<Result<Vec<_>>>()?,
        };
        if replies.len() != pipe.len() {
            return Err(Error::new(
                ErrorKind::Backend,
                format!("{} replies to {} commands", replies.len(), pipe.len()),
            )
            .with_operation(op)
            .with_backend(BACKEND));
        }
        Ok(replies)
    }

    fn check_value(&self, key: &str, len: usize, op: &'static str) -> Result<()> {
        if len > self.max_value_len {
            return Err(Error::new(
                ErrorKind::ValueTooLarge,
                format!(
                    "the cache entry is {len} bytes; this cache holds at most {}",
                    self.max_value_len
                ),
            )
            .with_operation(op)
            .with_backend(BACKEND)
            .with_key(key));
        }
        Ok(())
    }

    /// Checks every item before anything is sent, so bad input has no side effect.
    fn check_items(&self, items: &[CacheItem], op: &'static str) -> Result<Vec<u64>> {
        items
            .iter()
            .map(|it| {
                self.check_value(&it.key, it.entry.len(), op)?;
                ttl_ms(it.ttl).map_err(|e| e.with_operation(op).with_key(&it.key))
            })
            .collect()
    }

    async fn fenced(&self, items: &[CacheItem], op: &'static str) -> Result<Vec<Fence>> {
        let ttls = self.check_items(items, op)?;
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let per = script::FENCE_KEYS_PER_CALL;
        if !self.is_cluster() || items.len() == 1 {
            let calls: Vec<&[CacheItem]> = items.chunks(per).collect();
            let ttls: Vec<&[u64]> = ttls.chunks(per).collect();
            return self.fenced_calls(&calls, &ttls, op).await;
        }
        // On a cluster the keys of one script call must share a slot:
        // group the batch by slot, one call per slot (and per 128 keys),
        // and put the answers back in the caller's order.
        let groups = by_slot(items.iter().map(|it| it.key.as_str()));
        let mut order = Vec::with_capacity(items.len());
        let mut grouped = Vec::with_capacity(items.len());
        let mut grouped_ttls = Vec::with_capacity(items.len());
        let mut bounds = Vec::with_capacity(groups.len());
        for group in &groups {
            for chunk in group.chunks(per) {
                let start = grouped.len();
                for &i in chunk {
                    order.push(i);
                    grouped.push(items[i].clone());
                    grouped_ttls.push(ttls[i]);
                }
                bounds.push(start..grouped.len());
            }
        }
        let calls: Vec<&[CacheItem]> = bounds.iter().map(|r| &grouped[r.clone()]).collect();
        let call_ttls: Vec<&[u64]> = bounds.iter().map(|r| &grouped_ttls[r.clone()]).collect();
        let fences = self.fenced_calls(&calls, &call_ttls, op).await?;
        let mut out = vec![Fence::Stale; items.len()];
        for (f, i) in fences.into_iter().zip(order) {
            out[i] = f;
        }
        Ok(out)
    }

    /// One fencing script call per slice of items, all sent at once.
    async fn fenced_calls(
        &self,
        calls: &[&[CacheItem]],
        ttls: &[&[u64]],
        op: &'static str,
    ) -> Result<Vec<Fence>> {
        let mut pipe = Pipeline::with_capacity(calls.len());
        for (chunk, ttls) in calls.iter().zip(ttls) {
            pipe.add_command(script::fenced_set(chunk, ttls));
        }
        let replies = self
            .eval_all(&pipe, script::FENCED_SET, &script::FENCE, op)
            .await?;
        let mut out = Vec::with_capacity(calls.iter().map(|c| c.len()).sum());
        for (reply, chunk) in replies.into_iter().zip(calls) {
            match reply {
                Value::Array(fences) if fences.len() == chunk.len() => {
                    for (f, it) in fences.into_iter().zip(chunk.iter()) {
                        out.push(fence_of(op, &it.key, f)?);
                    }
                }
                Value::ServerError(e) => {
                    return Err(map_err(e.into(), op).with_key(&chunk[0].key));
                }
                other => return Err(unexpected(op, &other).with_key(&chunk[0].key)),
            }
        }
        Ok(out)
    }

    /// Sends a pipeline of `EVALSHA` calls of `script` and answers in order.
    ///
    /// When the server has lost its script cache (a restart, `SCRIPT
    /// FLUSH`, a failover to a replica that never saw the script) the calls
    /// answered `NOSCRIPT` did nothing: load the script and send those calls
    /// again, in order, in one round trip; the load runs first on the same
    /// connection. Only a second `NOSCRIPT` in a row reaches the caller.
    async fn eval_all(
        &self,
        pipe: &Pipeline,
        source: &'static str,
        script: &redis::Script,
        op: &'static str,
    ) -> Result<Vec<Value>> {
        let mut replies = self.call_many(pipe, op).await?;
        let forgotten: Vec<usize> = replies
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript)))
            .map(|(i, _)| i)
            .collect();
        if forgotten.is_empty() {
            return Ok(replies);
        }
        let cmds: Vec<&Cmd> = pipe.cmd_iter().collect();
        let mut retry = Pipeline::with_capacity(forgotten.len() + 1);
        if self.is_cluster() {
            // The calls go out at once on a cluster, not in order: load the
            // script on every node first.
            check_loaded(op, script, self.call(&script::load(source), op).await?)?;
        } else {
            retry.add_command(script::load(source));
        }
        for &i in &forgotten {
            retry.add_command(cmds[i].clone());
        }
        let mut again = self.call_many(&retry, op).await?.into_iter();
        if !self.is_cluster() {
            check_loaded(op, script, again.next().unwrap_or_default())?;
        }
        for (&i, reply) in forgotten.iter().zip(again) {
            replies[i] = reply;
        }
        Ok(replies)
    }
}

/// Indices of `keys` grouped by slot, the groups in order of first appearance.
fn by_slot<'a>(keys: impl Iterator<Item = &'a str>) -> Vec<Vec<usize>> {
    let mut index: std::collections::HashMap<Slot, usize> = std::collections::HashMap::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, key) in keys.enumerate() {
        let g = *index.entry(Slot::for_key(key)).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(i);
    }
    groups
}

fn manager_config(config: &RedisConfig) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connection_timeout))
        .set_response_timeout(Some(config.response_timeout))
        .set_number_of_retries(config.reconnect_retries)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1))
}

/// The TTL as Redis milliseconds (`0` for none), rounded up so a sub-millisecond
/// TTL never becomes "no expiry".
fn ttl_ms(ttl: Option<Duration>) -> Result<u64> {
    let Some(ttl) = ttl else { return Ok(0) };
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(Error::new(
            ErrorKind::InvalidTtl,
            format!("a TTL of {ttl:?} is outside 1 ms ..= {MAX_TTL:?}"),
        )
        .with_backend(BACKEND));
    }
    Ok(u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX))
}

fn fence_of(op: &'static str, key: &str, reply: Value) -> Result<Fence> {
    match reply {
        Value::Int(1) => Ok(Fence::Applied),
        Value::Int(0) => Ok(Fence::Stale),
        Value::ServerError(e) => Err(map_err(e.into(), op).with_key(key)),
        other => Err(unexpected(op, &other).with_key(key)),
    }
}

fn check_loaded(op: &'static str, script: &redis::Script, reply: Value) -> Result<()> {
    let sha = script.get_hash();
    match reply {
        Value::BulkString(got) if got.as_slice() == sha.as_bytes() => Ok(()),
        Value::SimpleString(got) if got == sha => Ok(()),
        Value::ServerError(e) => Err(map_err(e.into(), op)),
        other => Err(unexpected(op, &other)),
    }
}

fn set_cmd(key: &str, value: &[u8], ttl_ms: u64) -> Cmd {
    let mut cmd = Cmd::with_capacity(5, 32 + key.len() + value.len());
    cmd.arg("SET").arg(key).arg(value);
    if ttl_ms > 0 {
        cmd.arg("PX").arg(ttl_ms);
    }
    cmd
}

/// Escapes Redis glob characters so `MATCH` takes the prefix literally.
fn glob_escape(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 8);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^' | '-') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('*');
    out
}

fn scan_cmd(cursor: &[u8], pattern: &str) -> Cmd {
    let mut cmd = Cmd::with_capacity(6, 32 + cursor.len() + pattern.len());
    cmd.arg("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(SCAN_COUNT);
    cmd
}

/// Splits a `SCAN` reply into the next cursor and the keys of this page.
fn scan_page(op: &'static str, reply: Value) -> Result<(Vec<u8>, Vec<Vec<u8>>)> {
    if let Value::Array(mut parts) = reply
        && parts.len() == 2
        && let Value::Array(keys) = parts.pop().unwrap_or_default()
        && let Value::BulkString(cursor) = parts.pop().unwrap_or_default()
    {
        let keys = keys
            .into_iter()
            .map(|k| match k {
                Value::BulkString(k) => Ok(k),
                other => Err(unexpected(op, &other)),
            })
            .collect::<Result<_>>()?;
        return Ok((cursor, keys));
    }
    Err(
        Error::new(ErrorKind::Backend, "SCAN answered with an unexpected reply")
            .with_operation(op)
            .with_backend(BACKEND),
    )
}

#[async_trait]
impl CacheStore for RedisCache {
    fn name(&self) -> &'static str {
        if self.is_cluster() {
            "redis-cluster"
        } else {
            BACKEND
        }
    }

    fn capabilities(&self) -> CacheCapabilities {
        let mut c = CacheCapabilities::new();
        c.atomic_fencing = true;
        c.in_process = false;
        c.ttl_granularity = Duration::from_millis(1);
        c.max_ttl = MAX_TTL;
        c.max_key_len = MAX_KEY_LEN;
        c.key_rule = KeyRule::Any;
        c.max_value_len = self.max_value_len;
        c
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        const OP: &str = "cache.get";
        let mut cmd = Cmd::with_capacity(2, 3 + key.len());
        cmd.arg("GET").arg(key);
        match self.conn.req(&cmd).await {
            // The reply's buffer becomes the `Bytes` without a copy.
            Ok(Value::BulkString(v)) => Ok(Some(Bytes::from(v))),
            Ok(Value::Nil) => Ok(None),
            Ok(Value::ServerError(e)) => Err(map_err(e.into(), OP).with_key(key)),
            Ok(other) => Err(unexpected(OP, &other).with_key(key)),
            Err(e) => Err(map_err(e, OP).with_key(key)),
        }
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Bytes>>> {
        const OP: &str = "cache.get_many";
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = Cmd::with_capacity(
            keys.len() + 1,
            4 + keys.iter().map(String::len).sum::<usize>(),
        );
        cmd.arg("MGET");
        for k in keys {
            cmd.arg(k.as_str());
        }
        let reply = self.call(&cmd, OP).await?;
        let Value::Array(values) = reply else {
            return Err(unexpected(OP, &reply));
        };
        if values.len() != keys.len() {
            return Err(unexpected(OP, &Value::Array(values)));
        }
        values
            .into_iter()
            .zip(keys)
            .map(|(v, k)| match v {
                Value::BulkString(v) => Ok(Some(Bytes::from(v))),
                Value::Nil => Ok(None),
                other => Err(unexpected(OP, &other).with_key(k)),
            })
            .collect()
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        const OP: &str = "cache.set";
        self.check_value(key, value.len(), OP)?;
        let ttl = ttl_ms(ttl).map_err(|e| e.with_operation(OP).with_key(key))?;
        match self.call(&set_cmd(key, &value, ttl), OP).await {
            Ok(Value::Okay) => Ok(()),
            Ok(other) => Err(unexpected(OP, &other).with_key(key)),
            Err(e) => Err(e.with_key(key)),
        }
    }

    async fn set_many(&self, items: Vec<CacheItem>) -> Result<()> {
        const OP: &str = "cache.set_many";
        let ttls = self.check_items(&items, OP)?;
        if items.is_empty() {
            return Ok(());
        }
        let mut pipe = Pipeline::with_capacity(items.len());
        for (it, &ttl) in items.iter().zip(&ttls) {
            pipe.add_command(set_cmd(&it.key, &it.entry, ttl));
        }
        let replies = self.call_many(&pipe, OP).await?;
        for (reply, it) in replies.into_iter().zip(&items) {
            match reply {
                Value::Okay => {}
                Value::ServerError(e) => return Err(map_err(e.into(), OP).with_key(&it.key)),
                other => return Err(unexpected(OP, &other).with_key(&it.key)),
            }
        }
        Ok(())
    }

    async fn set_if_newer(&self, item: CacheItem) -> Result<Fence> {
        const OP: &str = "cache.set_if_newer";
        let mut fences = self.fenced(std::slice::from_ref(&item), OP).await?;
        fences
            .pop()
            .ok_or_else(|| Error::new(ErrorKind::Backend, "no reply").with_operation(OP))
    }

    async fn set_many_if_newer(&self, items: Vec<CacheItem>) -> Result<Vec<Fence>> {
        self.fenced(&items, "cache.set_many_if_newer").await
    }

    /// One `EVALSHA` of a script that compares the whole stored value with
    /// `expected` and sets the new entry only if they are equal. A key of
    /// another type, or no key, is not `expected`: [`Fence::Stale`].
    async fn replace_if_unchanged(&self, expected: Bytes, item: CacheItem) -> Result<Fence> {
        const OP: &str = "cache.replace_if_unchanged";
        self.check_value(&item.key, item.entry.len(), OP)?;
        let ttl = ttl_ms(item.ttl).map_err(|e| e.with_operation(OP).with_key(&item.key))?;
        let mut pipe = Pipeline::with_capacity(1);
        pipe.add_command(script::replace_if_unchanged(&expected, &item, ttl));
        let reply = self
            .eval_all(&pipe, script::REPLACE_IF_UNCHANGED, &script::REPLACE, OP)
            .await
            .map_err(|e| e.with_key(&item.key))?;
        fence_of(OP, &item.key, reply.into_iter().next().unwrap_or_default())
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        const OP: &str = "cache.delete";
        let mut cmd = Cmd::with_capacity(2, 3 + key.len());
        cmd.arg("DEL").arg(key);
        match self.call(&cmd, OP).await {
            Ok(Value::Int(n)) => Ok(n > 0),
            Ok(other) => Err(unexpected(OP, &other).with_key(key)),
            Err(e) => Err(e.with_key(key)),
        }
    }

    /// Removes every key starting with `prefix` with `SCAN MATCH` (the
    /// prefix's glob characters escaped) and `UNLINK` of each page, the
    /// `UNLINK` pipelined with the next `SCAN`. It never blocks the server
    /// like `KEYS` would; keys written under the prefix while it runs may
    /// survive, as `SCAN` promises only the keys present throughout.
    async fn clear(&self, prefix: &str) -> Result<()> {
        const OP: &str = "cache.clear";
        let pattern = glob_escape(prefix);
        if self.is_cluster() {
            // `SCAN` walks one node: walk every primary, and let redis-rs
            // split each page's `UNLINK` by slot.
            for addr in crate::cluster::primaries(self, OP).await? {
                let mut cursor = b"0".to_vec();
                loop {
                    let reply = self
                        .call_at(&scan_cmd(&cursor, &pattern), &addr, OP)
                        .await?;
                    let (next, keys) = scan_page(OP, reply)?;
                    if !keys.is_empty() {
                        let mut unlink = Cmd::with_capacity(keys.len() + 1, 0);
                        unlink.arg("UNLINK");
                        for k in &keys {
                            unlink.arg(k.as_slice());
                        }
                        self.call(&unlink, OP).await?;
                    }
                    if next.as_slice() == b"0" {
                        break;
                    }
                    cursor = next;
                }
            }
            return Ok(());
        }
        let first = self.call(&scan_cmd(b"0", &pattern), OP).await?;
        let (mut cursor, mut keys) = scan_page(OP, first)?;
        loop {
            let done = cursor.as_slice() == b"0";
            if keys.is_empty() && done {
                return Ok(());
            }
            let mut pipe = Pipeline::with_capacity(2);
            if !keys.is_empty() {
                let mut unlink = Cmd::with_capacity(keys.len() + 1, 0);
                unlink.arg("UNLINK");
                for k in &keys {
                    unlink.arg(k.as_slice());
                }
                pipe.add_command(unlink);
            }
            if !done {
                pipe.add_command(scan_cmd(&cursor, &pattern));
            }
            let mut replies = self.call_many(&pipe, OP).await?;
            if !keys.is_empty() {
                match replies.first() {
                    Some(Value::Int(_)) => {}
                    Some(Value::ServerError(e)) => return Err(map_err(e.clone().into(), OP)),
                    Some(other) => return Err(unexpected(OP, other)),
                    None => return Err(unexpected(OP, &Value::Nil)),
                }
            }
            if done {
                return Ok(());
            }
            let scan = replies.pop().unwrap_or_default();
            if let Value::ServerError(e) = scan {
                return Err(map_err(e.into(), OP));
            }
            (cursor, keys) = scan_page(OP, scan)?;
        }
    }

    /// One `SCAN <cursor> MATCH <prefix>* COUNT <count>` (the prefix's
    /// glob characters escaped); the cursor is `SCAN`'s own, so the
    /// listing has its guarantees: every key present throughout is listed,
    /// some maybe twice, and a page may be empty before the end. Keys that
    /// are not UTF-8 (no engine wrote them) are left out.
    async fn scan_keys(
        &self,
        prefix: &str,
        cursor: writethrough_core::backend::ScanCursor,
        count: usize,
    ) -> Result<writethrough_core::backend::ScanPage> {
        use writethrough_core::backend::{ScanCursor, ScanPage};
        const OP: &str = "cache.scan_keys";
        // On a cluster the cursor is `host:port/node-cursor`: the primaries
        // are walked one after the other, in address order.
        let (node, at) = if cursor.is_start() {
            (None, "0")
        } else if self.is_cluster() {
            match cursor.position().rsplit_once('/') {
                Some((node, at)) => (Some(node.to_string()), at),
                None => (None, "x"),
            }
        } else {
            (None, cursor.position())
        };
        let node = match (self.is_cluster(), node) {
            (false, _) => None,
            (true, Some(node)) => Some(node),
            (true, None) if cursor.is_start() => crate::cluster::primaries(self, OP)
                .await?
                .into_iter()
                .next(),
            (true, None) => Some(String::new()),
        };
        if !at.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::new(
                ErrorKind::InvalidValue,
                format!("{at:?} is not a Redis SCAN cursor"),
            )
            .with_operation(OP)
            .with_backend(BACKEND));
        }
        let pattern = glob_escape(prefix);
        let mut cmd = Cmd::with_capacity(6, 32 + at.len() + pattern.len());
        cmd.arg("SCAN")
            .arg(at)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(count.max(1));
        let reply = match &node {
            Some(node) => self.call_at(&cmd, node, OP).await?,
            None => self.call(&cmd, OP).await?,
        };
        let (next, keys) = scan_page(OP, reply)?;
        let keys = keys
            .into_iter()
            .filter_map(|k| String::from_utf8(k).ok())
            .collect();
        let next = String::from_utf8_lossy(&next).into_owned();
        let next = match node {
            None => (next != "0").then(|| ScanCursor::at(next)),
            Some(node) if next != "0" => Some(ScanCursor::at(format!("{node}/{next}"))),
            // This primary is done: on to the next one by address.
            Some(node) => crate::cluster::primaries(self, OP)
                .await?
                .into_iter()
                .find(|p| *p > node)
                .map(|p| ScanCursor::at(format!("{p}/0"))),
        };
        Ok(ScanPage::new(keys, next))
    }

    async fn ping(&self) -> Result<()> {
        const OP: &str = "cache.ping";
        let mut cmd = Cmd::with_capacity(1, 4);
        cmd.arg("PING");
        match self.call(&cmd, OP).await? {
            Value::SimpleString(s) if s == "PONG" => Ok(()),
            Value::BulkString(s) if s == b"PONG" => Ok(()),
            other => Err(unexpected(OP, &other)),
        }
    }

    /// `PTTL`: milliseconds left, `None` for a key without expiry or no key.
    async fn time_to_live(&self, key: &str) -> Result<Option<Duration>> {
        const OP: &str = "cache.time_to_live";
        let mut cmd = Cmd::with_capacity(2, 4 + key.len());
        cmd.arg("PTTL").arg(key);
        match self.call(&cmd, OP).await {
            Ok(Value::Int(ms)) => Ok(u64::try_from(ms).ok().map(Duration::from_millis)),
            Ok(other) => Err(unexpected(OP, &other).with_key(key)),
            Err(e) => Err(e.with_key(key)),
        }
    }

    /// The server's `run_id` from `INFO server`: new on every start of a
    /// redis-server process (a restart, a restore from a snapshot), and
    /// different on another server (a replica promoted, a failover).
    ///
    /// On a cluster, every primary's `run_id` by address: a failover, or any
    /// primary's restart, changes it.
    async fn identity(&self) -> Result<Option<String>> {
        const OP: &str = "cache.identity";
        if self.is_cluster() {
            return crate::cluster::identity(self).await;
        }
        let mut cmd = Cmd::with_capacity(2, 16);
        cmd.arg("INFO").arg("server");
        let text = match self.call(&cmd, OP).await? {
            Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            Value::VerbatimString { text, .. } => text,
            Value::SimpleString(s) => s,
            other => return Err(unexpected(OP, &other)),
        };
        match text
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(str::trim)
        {
            Some(id) if !id.is_empty() => Ok(Some(format!("redis run_id={id}"))),
            _ => Err(
                Error::new(ErrorKind::Backend, "INFO server did not report a run_id")
                    .with_operation(OP)
                    .with_backend("redis"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_are_escaped_and_the_prefix_is_open_ended() {
        assert_eq!(glob_escape("app:"), "app:*");
        assert_eq!(glob_escape(""), "*");
        assert_eq!(glob_escape(r"a*b?c[d]e\f"), r"a\*b\?c\[d\]e\\f*");
        assert_eq!(glob_escape("ü-^"), r"ü\-\^*");
    }

    #[test]
    fn ttls_become_whole_milliseconds_rounded_up() {
        assert_eq!(ttl_ms(None).unwrap(), 0);
        assert_eq!(ttl_ms(Some(Duration::from_millis(1500))).unwrap(), 1500);
        assert_eq!(ttl_ms(Some(Duration::from_nanos(1))).unwrap(), 1);
        assert_eq!(ttl_ms(Some(Duration::from_micros(2001))).unwrap(), 3);
        for bad in [Duration::ZERO, MAX_TTL + Duration::from_millis(1)] {
            assert_eq!(ttl_ms(Some(bad)).unwrap_err().kind(), ErrorKind::InvalidTtl);
        }
    }

    #[test]
    fn scan_replies_split_into_cursor_and_keys() {
        let reply = Value::Array(vec![
            Value::BulkString(b"17".to_vec()),
            Value::Array(vec![Value::BulkString(b"a".to_vec())]),
        ]);
        let (cursor, keys) = scan_page("t", reply).unwrap();
        assert_eq!(cursor, b"17");
        assert_eq!(keys, vec![b"a".to_vec()]);
        assert!(scan_page("t", Value::Nil).is_err());
    }
}

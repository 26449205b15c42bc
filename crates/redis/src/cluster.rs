//! What a Redis Cluster needs beyond one server: checking the topology at
//! connect, walking every primary (`clear`, key scans) and the identity of
//! the whole cluster.
//!
//! Routing, `MOVED` / `ASK` redirections, topology refreshes and
//! reconnections are redis-rs's cluster connection's work; this module only
//! asks it to send a command to every primary, or to one by address.

use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Value};
use writethrough_core::{Error, ErrorKind, Result};

use crate::cache::RedisCache;
use crate::config::{RedisConfig, cluster_seeds};
use crate::error::{BACKEND, map_err, unexpected};

/// The per-connection settings redis-rs's cluster client takes.
pub(crate) fn client_config(config: &RedisConfig) -> ClusterConfig {
    ClusterConfig::new()
        .set_connection_timeout(config.connection_timeout)
        .set_response_timeout(config.response_timeout)
}

fn topology_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, message)
        .with_backend(BACKEND)
        .with_operation("cache.connect")
}

/// Connects to the cluster, within the connect timeout (redis-rs asks every
/// seed for the slot map and connects to every primary).
pub(crate) async fn connect(
    client: &ClusterClient,
    config: &RedisConfig,
) -> Result<ClusterConnection> {
    let limit = config.connection_timeout.saturating_mul(3) + config.response_timeout;
    match tokio::time::timeout(
        limit,
        client.get_async_connection_with_config(client_config(config)),
    )
    .await
    {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => {
            let text = e.to_string();
            if text.contains("cluster support disabled") {
                return Err(topology_error(format!(
                    "{} is not a Redis Cluster: the node has cluster support disabled; \
                     use redis:// for a single server",
                    config.redacted_url()
                )));
            }
            Err(map_err(e, "cache.connect"))
        }
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "no cluster topology from {} within {limit:?}",
                config.redacted_url()
            ),
        )
        .with_backend(BACKEND)
        .with_operation("cache.connect")),
    }
}

/// Refuses a cluster that does not serve every slot, and seed nodes that
/// belong to different clusters: both would route some keys nowhere, or to
/// a cluster other than the one the rest of the keys live in.
pub(crate) async fn check_topology(cache: &RedisCache, config: &RedisConfig) -> Result<()> {
    const OP: &str = "cache.connect";
    let mut info = Cmd::new();
    info.arg("CLUSTER").arg("INFO");
    check_coverage(&text_of(OP, cache.call(&info, OP).await?)?, config)?;
    // Every node the cluster knows, by id.
    let mut nodes = Cmd::new();
    nodes.arg("CLUSTER").arg("NODES");
    let known = text_of(OP, cache.call(&nodes, OP).await?)?;
    let known: Vec<&str> = known
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let seeds = cluster_seeds(&config.url, false).unwrap_or_default();
    let hosts: Vec<String> = seeds
        .iter()
        .map(|s| {
            let rest = s.split_once("://").map_or(s.as_str(), |(_, r)| r);
            let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            rest.split(['/', '?', '#'])
                .next()
                .unwrap_or(rest)
                .to_string()
        })
        .collect();
    for (seed, host) in seeds.iter().zip(&hosts) {
        let Some((id, info)) = seed_probe(seed, config).await else {
            // A seed down now is no reason to refuse a cluster that works.
            continue;
        };
        // Each seed's own view too: the node the driver asked first may
        // not be the one that lost slots.
        check_coverage(&info, config)?;
        if !known.contains(&id.as_str()) {
            return Err(topology_error(format!(
                "the seed node {host} belongs to another Redis Cluster than the others \
                 (its id {id} is not among the cluster's nodes)",
            )));
        }
    }
    Ok(())
}

/// `CLUSTER INFO` must say the cluster state is ok and every slot assigned.
fn check_coverage(info: &str, config: &RedisConfig) -> Result<()> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .unwrap_or("?")
            .to_string()
    };
    let (state, assigned) = (field("cluster_state"), field("cluster_slots_assigned"));
    if state != "ok" || assigned != "16384" {
        return Err(topology_error(format!(
            "the Redis Cluster at {} is not serving every slot \
             (cluster_state:{state}, cluster_slots_assigned:{assigned} of 16384)",
            config.redacted_url()
        )));
    }
    Ok(())
}

/// A seed node's own cluster id and `CLUSTER INFO`, or `None` when it
/// cannot be asked now.
async fn seed_probe(seed: &str, config: &RedisConfig) -> Option<(String, String)> {
    let client = redis::Client::open(seed).ok()?;
    let ask = async {
        let mut conn = client
            .get_multiplexed_async_connection_with_config(
                &redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(config.connection_timeout))
                    .set_response_timeout(Some(config.response_timeout)),
            )
            .await
            .ok()?;
        let mut cmd = Cmd::new();
        cmd.arg("CLUSTER").arg("MYID");
        let reply: Value = cmd.query_async(&mut conn).await.ok()?;
        let id = text_of("cache.connect", reply).ok()?;
        let mut cmd = Cmd::new();
        cmd.arg("CLUSTER").arg("INFO");
        let reply: Value = cmd.query_async(&mut conn).await.ok()?;
        Some((id, text_of("cache.connect", reply).ok()?))
    };
    let limit = config.connection_timeout + config.response_timeout;
    tokio::time::timeout(limit, ask).await.ok().flatten()
}

fn text_of(op: &'static str, reply: Value) -> Result<String> {
    match reply {
        Value::BulkString(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Value::VerbatimString { text, .. } => Ok(text),
        Value::SimpleString(s) => Ok(s),
        other => Err(unexpected(op, &other)),
    }
}

/// The addresses of the cluster's primaries, as redis-rs's slot map has them.
pub(crate) async fn primaries(cache: &RedisCache, op: &'static str) -> Result<Vec<String>> {
    let mut ping = Cmd::new();
    ping.arg("PING");
    Ok(cache
        .call_primaries(&ping, op)
        .await?
        .into_iter()
        .map(|(addr, _)| addr)
        .collect())
}

/// The run ids of every primary, by address: a primary restarted, restored
/// or replaced by its replica (a failover) changes it, and so does a
/// primary added or removed.
pub(crate) async fn identity(cache: &RedisCache) -> Result<Option<String>> {
    const OP: &str = "cache.identity";
    let mut info = Cmd::new();
    info.arg("INFO").arg("server");
    let mut parts = Vec::new();
    for (addr, reply) in cache.call_primaries(&info, OP).await? {
        let text = text_of(OP, reply)?;
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(str::trim)
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Backend,
                    format!("INFO server of {addr} did not report a run_id"),
                )
                .with_operation(OP)
                .with_backend(BACKEND)
            })?;
        parts.push(format!("{addr}={id}"));
    }
    Ok(Some(format!("redis-cluster run_ids={}", parts.join(","))))
}

/// redis-rs's cluster connection, and a new one when it stops answering.
///
/// The cluster connection refreshes its slot map on `MOVED` and reconnects
/// to nodes by itself. Seen here under load: after a primary was killed
/// and its replica promoted, a connection could keep timing out on every
/// request for as long as the test ran. So, as redis-rs's
/// `ConnectionManager` does for one server: when every call has failed
/// with a timeout or a connection error for longer than
/// `2 × response_timeout` (at least a second), a new cluster connection is
/// made from the seeds in the background and replaces the old one.
pub(crate) struct Cluster {
    client: ClusterClient,
    config: RedisConfig,
    conn: parking_lot::RwLock<ClusterConnection>,
    /// Since when calls fail, in milliseconds since `started`, plus one (0: the last call worked).
    failing_since: std::sync::atomic::AtomicU64,
    rebuilding: std::sync::atomic::AtomicBool,
    started: std::time::Instant,
    rebuilds: std::sync::atomic::AtomicU64,
}

impl Cluster {
    pub(crate) fn new(client: ClusterClient, config: RedisConfig, conn: ClusterConnection) -> Self {
        Cluster {
            client,
            config,
            conn: parking_lot::RwLock::new(conn),
            failing_since: std::sync::atomic::AtomicU64::new(0),
            rebuilding: std::sync::atomic::AtomicBool::new(false),
            started: std::time::Instant::now(),
            rebuilds: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The connection to send on (a cheap clone of a handle).
    pub(crate) fn conn(&self) -> ClusterConnection {
        self.conn.read().clone()
    }

    /// How many times the connection was replaced.
    pub(crate) fn rebuilds(&self) -> u64 {
        self.rebuilds.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records how a call went; replaces a connection stuck failing.
    pub(crate) fn observe<T>(self: &std::sync::Arc<Self>, result: &redis::RedisResult<T>) {
        use std::sync::atomic::Ordering;
        let now = self.started.elapsed().as_millis() as u64 + 1;
        match result {
            Err(e) if e.is_timeout() || e.is_io_error() || e.is_connection_dropped() => {
                let since = match self.failing_since.compare_exchange(
                    0,
                    now,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => now,
                    Err(since) => since,
                };
                let patience = (self.config.response_timeout * 2)
                    .max(std::time::Duration::from_secs(1))
                    .as_millis() as u64;
                if now.saturating_sub(since) < patience
                    || self.rebuilding.swap(true, Ordering::AcqRel)
                {
                    return;
                }
                let me = self.clone();
                tokio::spawn(async move {
                    match connect(&me.client, &me.config).await {
                        Ok(fresh) => {
                            *me.conn.write() = fresh;
                            me.rebuilds.fetch_add(1, Ordering::Relaxed);
                            me.failing_since.store(0, Ordering::Release);
                            tracing::warn!(
                                "the Redis Cluster connection kept failing; made a new one"
                            );
                        }
                        Err(e) => tracing::warn!(
                            error = %e,
                            "the Redis Cluster connection keeps failing and a new one cannot be made yet"
                        ),
                    }
                    me.rebuilding.store(false, Ordering::Release);
                });
            }
            Err(_) => {}
            Ok(_) => self.failing_since.store(0, Ordering::Release),
        }
    }
}

//! A local Redis Cluster: primaries and replicas on free ports, each node a
//! [`RedisClusterNode`] that can be killed, paused and restarted, and the
//! cluster operations tests need (failover, resharding), done with
//! `redis-cli` as an operator would.

use std::time::{Duration, Instant};

use tokio::process::Command;

use super::ServerError;
use super::process;
use super::redis::RedisClusterNode;

/// How long the cluster may take to agree on its state after a change.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `redis-cli --cluster create` or `reshard` may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one command on one node may take (a paused node never answers).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Who serves which slots: each primary's port and its slot ranges.
type SlotOwners = Vec<(u16, Vec<(u16, u16)>)>;

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
struct NodeLine {
    id: String,
    port: u16,
    flags: String,
    primary_id: String,
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn parse(line: &str) -> Option<Self> {
        let mut parts = line.split_whitespace();
        let id = parts.next()?.to_string();
        let addr = parts.next()?;
        let port = addr.split('@').next()?.rsplit_once(':')?.1.parse().ok()?;
        let flags = parts.next()?.to_string();
        let primary_id = parts.next()?.to_string();
        let slots = parts
            .skip(4)
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => s.parse().ok().map(|a| (a, a)),
            })
            .collect();
        Some(NodeLine {
            id,
            port,
            flags,
            primary_id,
            slots,
        })
    }

    fn is_primary(&self) -> bool {
        self.flags.split(',').any(|f| f == "master")
    }

    fn is_failed(&self) -> bool {
        self.flags.split(',').any(|f| f == "fail" || f == "fail?")
    }
}

/// A Redis Cluster of `redis-server` child processes on free loopback
/// ports: by default 3 primaries with one replica each, slots spread by
/// `redis-cli --cluster create`.
///
/// ```no_run
/// # async fn demo() -> Result<(), writethrough_testkit::server::ServerError> {
/// use writethrough_testkit::server::RedisCluster;
///
/// let mut cluster = RedisCluster::start().await?;
/// let url = cluster.url(); // "redis+cluster://127.0.0.1:P1,127.0.0.1:P2,..."
/// let primary = cluster.primary_of("some-key").await?;
/// cluster.kill_and_fail_over(primary).await?; // its replica takes over
/// # let _ = url;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisClusterNode>,
    cli: std::path::PathBuf,
}

impl RedisCluster {
    /// Starts 3 primaries with one replica each and waits until every node
    /// reports `cluster_state:ok` and agrees on who serves which slots.
    ///
    /// # Errors
    ///
    /// When `redis-server` or `redis-cli` is missing (with the install
    /// hint), or the cluster does not form within 60 s.
    pub async fn start() -> Result<Self, ServerError> {
        Self::start_with(3, 1).await
    }

    /// Starts `primaries` primaries (at least 3, as `redis-cli` requires)
    /// with `replicas` replicas each.
    ///
    /// # Errors
    ///
    /// As for [`start`](Self::start).
    pub async fn start_with(primaries: usize, replicas: usize) -> Result<Self, ServerError> {
        let cli = process::find_on_path("redis-cli")
            .ok_or_else(|| process::missing_binary("redis-cli", "on PATH", "redis-tools"))?;
        let count = primaries * (1 + replicas);
        let nodes =
            futures::future::try_join_all((0..count).map(|_| RedisClusterNode::start())).await?;
        let cluster = RedisCluster { nodes, cli };
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(
            cluster
                .nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port())),
        );
        args.extend([
            "--cluster-replicas".into(),
            replicas.to_string(),
            "--cluster-yes".into(),
        ]);
        cluster.cli_args(&args, CLI_TIMEOUT).await?;
        cluster.wait_healthy().await?;
        Ok(cluster)
    }

    /// The URL the cache connects with: every node as a seed,
    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...`.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// How many nodes the cluster has, primaries and replicas.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`, to pause, resume or read the log of.
    ///
    /// # Panics
    ///
    /// When `i` is not below [`len`](Self::len) (a test's mistake).
    pub fn node(&self, i: usize) -> &RedisClusterNode {
        &self.nodes[i]
    }

    /// Node `i`, to kill, stop or restart.
    ///
    /// # Panics
    ///
    /// When `i` is not below [`len`](Self::len) (a test's mistake).
    pub fn node_mut(&mut self, i: usize) -> &mut RedisClusterNode {
        &mut self.nodes[i]
    }

    /// Every node's log, for a failing test's message.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("--- node {i} (port {}) ---\n{}", n.port(), n.log()))
            .collect()
    }

    fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port() == port)
    }

    async fn cli_args(&self, args: &[String], limit: Duration) -> Result<String, ServerError> {
        let mut cmd = Command::new(&self.cli);
        cmd.args(args).kill_on_drop(true);
        let out = tokio::time::timeout(limit, cmd.output())
            .await
            .map_err(|_| ServerError::new(format!("redis-cli {args:?} hung for {limit:?}")))?
            .map_err(|e| ServerError::new(format!("cannot run redis-cli: {e}")))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() || text.starts_with("ERR") || text.contains("[ERR]") {
            return Err(ServerError::new(format!(
                "redis-cli {args:?} failed ({}): {text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(text)
    }

    /// Runs one command on node `i` with `redis-cli` and returns its output.
    ///
    /// # Errors
    ///
    /// When the node does not answer or answers an error.
    pub async fn command(&self, i: usize, args: &[&str]) -> Result<String, ServerError> {
        let mut all = vec![
            "-h".to_string(),
            "127.0.0.1".into(),
            "-p".into(),
            self.nodes[i].port().to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        self.cli_args(&all, COMMAND_TIMEOUT).await
    }

    async fn view(&self, i: usize) -> Result<Vec<NodeLine>, ServerError> {
        let text = self.command(i, &["CLUSTER", "NODES"]).await?;
        Ok(text.lines().filter_map(NodeLine::parse).collect())
    }

    /// A running node's view of the cluster: the first node that answers.
    async fn any_view(&self) -> Result<Vec<NodeLine>, ServerError> {
        let mut last = None;
        for i in 0..self.nodes.len() {
            match self.view(i).await {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ServerError::new("the cluster has no nodes")))
    }

    /// The nodes that serve slots now, as indices.
    ///
    /// # Errors
    ///
    /// When no node answers.
    pub async fn primaries(&self) -> Result<Vec<usize>, ServerError> {
        Ok(self
            .any_view()
            .await?
            .iter()
            .filter(|n| n.is_primary() && !n.is_failed() && !n.slots.is_empty())
            .filter_map(|n| self.index_of_port(n.port))
            .collect())
    }

    /// The primary that serves `key` now.
    ///
    /// # Errors
    ///
    /// When no node answers, or no primary serves the key's slot.
    pub async fn primary_of(&self, key: &str) -> Result<usize, ServerError> {
        let slot = self.slot_of(key).await?;
        self.any_view()
            .await?
            .iter()
            .filter(|n| n.is_primary() && !n.is_failed())
            .find(|n| n.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
            .and_then(|n| self.index_of_port(n.port))
            .ok_or_else(|| ServerError::new(format!("no primary serves slot {slot}")))
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    ///
    /// # Errors
    ///
    /// When no node answers.
    pub async fn slot_of(&self, key: &str) -> Result<u16, ServerError> {
        let mut last = None;
        for i in 0..self.nodes.len() {
            match self.command(i, &["CLUSTER", "KEYSLOT", key]).await {
                Ok(t) => {
                    return t
                        .trim()
                        .parse()
                        .map_err(|_| ServerError::new(format!("CLUSTER KEYSLOT answered {t:?}")));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ServerError::new("the cluster has no nodes")))
    }

    /// The replicas of node `primary`, as indices.
    ///
    /// # Errors
    ///
    /// When no node answers.
    pub async fn replicas_of(&self, primary: usize) -> Result<Vec<usize>, ServerError> {
        let view = self.any_view().await?;
        let port = self.nodes[primary].port();
        let Some(id) = view.iter().find(|n| n.port == port).map(|n| n.id.clone()) else {
            return Ok(Vec::new());
        };
        Ok(view
            .iter()
            .filter(|n| n.primary_id == id && !n.is_failed())
            .filter_map(|n| self.index_of_port(n.port))
            .collect())
    }

    /// Kills primary `i` with `SIGKILL` and waits until one of its replicas
    /// has taken over and the cluster is healthy again; returns the index
    /// of the new primary. The killed node stays down ([`restart`] it to
    /// have it rejoin as a replica).
    ///
    /// [`restart`]: RedisClusterNode::restart
    ///
    /// # Errors
    ///
    /// When `i` has no replica, or no replica takes over within 60 s.
    pub async fn kill_and_fail_over(&mut self, i: usize) -> Result<usize, ServerError> {
        let replicas = self.replicas_of(i).await?;
        if replicas.is_empty() {
            return Err(ServerError::new(format!(
                "node {i} has no replica to take over"
            )));
        }
        self.nodes[i].kill().await?;
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            if let Ok(primaries) = self.primaries().await
                && let Some(&new) = replicas.iter().find(|r| primaries.contains(r))
                && self.wait_healthy_once().await.is_ok()
            {
                return Ok(new);
            }
            if Instant::now() > deadline {
                return Err(ServerError::new(format!(
                    "no replica of node {i} took over within {SETTLE_TIMEOUT:?}\n{}",
                    self.logs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A manual failover: replica `i` takes over from its primary with
    /// `CLUSTER FAILOVER` (the primary stops writes, the replica catches up,
    /// then swaps roles), and the cluster settles.
    ///
    /// # Errors
    ///
    /// When `i` is not a replica, or the failover does not finish in 60 s.
    pub async fn fail_over_to(&self, i: usize) -> Result<(), ServerError> {
        self.command(i, &["CLUSTER", "FAILOVER"]).await?;
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            if self.primaries().await.is_ok_and(|p| p.contains(&i))
                && self.wait_healthy_once().await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ServerError::new(format!(
                    "node {i} did not take over within {SETTLE_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Moves `slots` slots, with their keys, from primary `from` to primary
    /// `to` with `redis-cli --cluster reshard`, as an operator would while
    /// clients run (`MIGRATING` / `IMPORTING`, `MIGRATE` of the keys, then
    /// `SETSLOT NODE`): clients see `ASK` and `MOVED` meanwhile.
    ///
    /// # Errors
    ///
    /// When the reshard fails or the cluster does not settle.
    pub async fn reshard(&self, from: usize, to: usize, slots: u16) -> Result<(), ServerError> {
        let from_id = self.command(from, &["CLUSTER", "MYID"]).await?;
        let to_id = self.command(to, &["CLUSTER", "MYID"]).await?;
        let args: Vec<String> = vec![
            "--cluster".into(),
            "reshard".into(),
            format!("127.0.0.1:{}", self.nodes[to].port()),
            "--cluster-from".into(),
            from_id.trim().into(),
            "--cluster-to".into(),
            to_id.trim().into(),
            "--cluster-slots".into(),
            slots.to_string(),
            "--cluster-yes".into(),
        ];
        self.cli_args(&args, CLI_TIMEOUT).await?;
        self.wait_healthy().await
    }

    /// Waits until every running node reports `cluster_state:ok`, sees no
    /// live node as failed, and all of them agree on the primaries.
    ///
    /// # Errors
    ///
    /// When that does not happen within 60 s; the message has every log.
    pub async fn wait_healthy(&self) -> Result<(), ServerError> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            match self.wait_healthy_once().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(ServerError::new(format!(
                        "the cluster did not settle within {SETTLE_TIMEOUT:?}: {e}\n{}",
                        self.logs()
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn wait_healthy_once(&self) -> Result<(), ServerError> {
        let mut agreed: Option<SlotOwners> = None;
        for (i, node) in self.nodes.iter().enumerate() {
            // Killed or paused nodes have no say.
            let Ok(info) = self.command(i, &["CLUSTER", "INFO"]).await else {
                continue;
            };
            if !info.contains("cluster_state:ok") {
                return Err(ServerError::new(format!("node {i}: {info}")));
            }
            let view = self.view(i).await?;
            let running: Vec<u16> = self.running_ports();
            if let Some(bad) = view
                .iter()
                .find(|n| n.is_failed() && running.contains(&n.port))
            {
                return Err(ServerError::new(format!(
                    "node {i} (port {}) still sees {} as failed",
                    node.port(),
                    bad.port
                )));
            }
            let mut primaries: SlotOwners = view
                .iter()
                .filter(|n| n.is_primary() && !n.slots.is_empty())
                .map(|n| (n.port, n.slots.clone()))
                .collect();
            primaries.sort();
            match &agreed {
                None => agreed = Some(primaries),
                Some(a) if *a == primaries => {}
                Some(_) => {
                    return Err(ServerError::new(format!(
                        "node {i} disagrees on the primaries"
                    )));
                }
            }
        }
        if agreed.is_none() {
            return Err(ServerError::new("no node answers"));
        }
        Ok(())
    }

    fn running_ports(&self) -> Vec<u16> {
        // A node killed by the test refuses connections: ask the handle's
        // process table rather than the network.
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.port())
            .collect()
    }
}

//! `redis-server` without persistence.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use super::ServerError;
use super::handle::{Flavor, server_type};
use super::process::{self, Launch};

server_type! {
    /// A `redis-server` child process on a free loopback port.
    ///
    /// It keeps nothing on disk (`--save "" --appendonly no`), so after
    /// [`kill`](Self::kill) or [`stop`](Self::stop) and
    /// [`restart`](Self::restart) it comes back empty, as a cache node that
    /// lost its memory does.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), writethrough_testkit::server::ServerError> {
    /// let redis = writethrough_testkit::server::RedisServer::start().await?;
    /// assert!(redis.url().starts_with("redis://127.0.0.1:"));
    /// # Ok(())
    /// # }
    /// ```
    RedisServer, Redis, "a `redis-server`", "redis://127.0.0.1:PORT", "WT_TEST_REDIS_URL"
}

#[derive(Debug)]
pub(crate) struct Redis {
    binary: PathBuf,
}

impl Flavor for Redis {
    const BINARY: &'static str = "redis-server";
    const ENV_VAR: &'static str = "WT_TEST_REDIS_URL";
    const DEFAULT_PORT: u16 = 6379;
    const STOP_SIGNAL: Signal = Signal::SIGTERM;

    fn url(port: u16) -> String {
        format!("redis://127.0.0.1:{port}")
    }

    async fn prepare() -> Result<(Self, tempfile::TempDir), ServerError> {
        let binary = process::find_on_path("redis-server")
            .ok_or_else(|| process::missing_binary("redis-server", "on PATH", "redis-server"))?;
        Ok((Self { binary }, process::temp_dir("wt-redis-")?))
    }

    fn launch(&self, port: u16, dir: &Path) -> Launch {
        // No --logfile: Redis then logs to stdout, which goes to the same
        // file as anything it prints before reading its configuration.
        Launch::new(&self.binary, dir, Self::log_file(dir))
            .arg("--port")
            .arg(port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--daemonize")
            .arg("no")
            .arg("--dir")
            .arg(dir)
    }

    fn log_file(dir: &Path) -> PathBuf {
        dir.join("redis.log")
    }

    async fn probe(&self, addr: SocketAddr, pid: u32, _dir: &Path) -> Result<(), String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut stream = BufReader::new(stream);
        stream
            .get_mut()
            .write_all(b"PING\r\n")
            .await
            .map_err(|e| format!("PING: {e}"))?;
        let mut line = String::new();
        stream
            .read_line(&mut line)
            .await
            .map_err(|e| format!("PING: {e}"))?;
        if line.trim_end() != "+PONG" {
            return Err(format!("PING answered {line:?}"));
        }
        // The process id tells our server from one that took the port.
        stream
            .get_mut()
            .write_all(b"INFO server\r\n")
            .await
            .map_err(|e| format!("INFO: {e}"))?;
        line.clear();
        stream
            .read_line(&mut line)
            .await
            .map_err(|e| format!("INFO: {e}"))?;
        let len: usize = line
            .trim_end()
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("INFO answered {line:?}"))?;
        let mut body = vec![0; len + 2];
        stream
            .read_exact(&mut body)
            .await
            .map_err(|e| format!("INFO: {e}"))?;
        let body = String::from_utf8_lossy(&body);
        let server_pid = body
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse::<u32>().ok());
        match server_pid {
            Some(p) if p == pid => Ok(()),
            other => Err(format!(
                "the Redis on {addr} is process {other:?}, not ours ({pid})"
            )),
        }
    }
}

server_type! {
    /// A `redis-server` with cluster support on a free loopback port: one
    /// node of a [`RedisCluster`](super::RedisCluster).
    ///
    /// Like [`RedisServer`] it keeps no data on disk, but it keeps its
    /// cluster state (`nodes.conf`) in its directory, so that after a
    /// [`restart`](Self::restart) it rejoins the cluster with its old id and
    /// no data: a primary restarted before its replica took over comes back
    /// empty, one restarted after comes back as a replica.
    RedisClusterNode, ClusterNode, "a `redis-server` cluster node", "redis://127.0.0.1:PORT",
    "WT_TEST_REDIS_CLUSTER_NODE_URL"
}

/// How long a cluster node may be unreachable before the others count it
/// failed and its replica takes over. Short, so that failover tests are.
pub const CLUSTER_NODE_TIMEOUT_MS: u64 = 1000;

#[derive(Debug)]
pub(crate) struct ClusterNode(Redis);

impl Flavor for ClusterNode {
    const BINARY: &'static str = "redis-server";
    const ENV_VAR: &'static str = "WT_TEST_REDIS_CLUSTER_NODE_URL";
    const DEFAULT_PORT: u16 = 6379;
    const STOP_SIGNAL: Signal = Signal::SIGTERM;

    fn url(port: u16) -> String {
        Redis::url(port)
    }

    async fn prepare() -> Result<(Self, tempfile::TempDir), ServerError> {
        let binary = process::find_on_path("redis-server")
            .ok_or_else(|| process::missing_binary("redis-server", "on PATH", "redis-server"))?;
        Ok((Self(Redis { binary }), process::temp_dir("wt-redis-node-")?))
    }

    fn launch(&self, port: u16, dir: &Path) -> Launch {
        self.0
            .launch(port, dir)
            .arg("--cluster-enabled")
            .arg("yes")
            .arg("--cluster-config-file")
            .arg(dir.join("nodes.conf"))
            .arg("--cluster-node-timeout")
            .arg(CLUSTER_NODE_TIMEOUT_MS.to_string())
            // A replica that lost touch with its primary for a while may
            // still take over: the tests kill primaries on purpose.
            .arg("--cluster-replica-validity-factor")
            .arg("0")
            .arg("--cluster-allow-replica-migration")
            .arg("no")
    }

    fn log_file(dir: &Path) -> PathBuf {
        Redis::log_file(dir)
    }

    async fn probe(&self, addr: SocketAddr, pid: u32, dir: &Path) -> Result<(), String> {
        self.0.probe(addr, pid, dir).await
    }
}

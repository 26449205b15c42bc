//! Real server processes for tests: Redis, Memcached and a throwaway
//! PostgreSQL cluster.
//!
//! Each server is a child process of the test, listening on a free loopback
//! port and living in its own temporary directory (the redis-rs test suite is
//! the model). [`RedisServer::start`] returns once the server answers its
//! protocol, so a test can connect at once. Because the process belongs to
//! the test, the test can inject faults into it:
//!
//! - `kill` sends `SIGKILL` to the server and every process it forked, and
//!   waits until all of them are gone;
//! - `pause` / `resume` send `SIGSTOP` / `SIGCONT` to the same processes:
//!   connections stay open but nothing answers, like a server stuck in a long
//!   GC pause or swapped out;
//! - `restart` starts the server again on the same port (and, for
//!   PostgreSQL, the same data directory, so committed data survives a kill);
//! - `stop` shuts it down gracefully.
//!
//! Dropping the handle kills the server and removes the directory.
//!
//! Each server leads its own process group, but PostgreSQL puts every
//! backend in a session of its own, so the testkit finds a server's
//! processes by walking `/proc` from the server's pid. It also makes the test
//! process a "child subreaper" (Linux `prctl`), so that the backends of a
//! killed PostgreSQL are re-parented to the test and reaped, rather than
//! left as zombies under a PID 1 that may never reap them.
//!
//! Server directories go under `WT_TEST_TMPDIR` when it is set, else
//! `/dev/shm` when it is writable (memory: much faster than disk on a busy
//! machine), else the system temporary directory.
//!
//! A missing binary is an error naming the package to install, never a
//! silently skipped test. When `WT_TEST_REDIS_URL`, `WT_TEST_MEMCACHED_URL`
//! or `WT_TEST_POSTGRES_URL` is set, `start` returns a handle to that
//! external server instead; fault injection then fails with an error, since
//! the testkit cannot signal a process it did not start.
//!
//! ```no_run
//! # async fn demo() -> Result<(), writethrough_testkit::server::ServerError> {
//! use writethrough_testkit::server::RedisServer;
//!
//! let mut redis = RedisServer::start().await?;
//! let url = redis.url(); // "redis://127.0.0.1:PORT"
//! redis.kill().await?; // clients now get "connection refused"
//! redis.restart().await?; // same port, empty dataset
//! # let _ = url;
//! # Ok(())
//! # }
//! ```

mod handle;
mod memcached;
mod pg_wire;
mod postgres;
mod process;
mod redis;
mod redis_cluster;
pub(crate) mod url;

use std::fmt;

pub use memcached::MemcachedServer;
pub use postgres::PostgresServer;
pub use redis::{CLUSTER_NODE_TIMEOUT_MS, RedisClusterNode, RedisServer};
pub use redis_cluster::RedisCluster;

/// Why a test server could not be started, stopped or signalled.
///
/// The message is meant to be read in a failed test's output: it names the
/// binary and the command that installs it when the binary is missing, and
/// ends with the tail of the server's log when the server itself failed.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerError {
    message: String,
}

impl ServerError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The full message, log tail included.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

// Written out rather than derived: `.unwrap()` and `?` in tests print the
// Debug form, and an escaped one-line log tail is unreadable.
impl fmt::Debug for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ServerError {}

/// Whether this process runs with an effective user id of 0.
///
/// Memcached then needs `-u`, and PostgreSQL refuses to run at all, so the
/// testkit runs it as the `postgres` user (or `nobody`) instead.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Fault injection on a server behind a shared handle, whatever its kind:
/// what the fault suite needs to kill, pause and restart it.
#[async_trait::async_trait]
pub trait ServerControl: Send + Sync {
    /// The binary, for messages (`redis-server`, ...).
    fn kind(&self) -> &'static str;
    /// `SIGKILL`s the server; see [`RedisServer::kill`].
    async fn kill(&self) -> Result<(), ServerError>;
    /// Starts it again on the same port.
    async fn restart(&self) -> Result<(), ServerError>;
    /// `SIGSTOP`s it.
    async fn pause(&self) -> Result<(), ServerError>;
    /// `SIGCONT`s it.
    async fn resume(&self) -> Result<(), ServerError>;
    /// Its log so far.
    async fn log(&self) -> String;
}

macro_rules! controlled {
    ($($t:ident => $kind:literal),*) => {$(
        #[async_trait::async_trait]
        impl ServerControl for tokio::sync::Mutex<$t> {
            fn kind(&self) -> &'static str {
                $kind
            }
            async fn kill(&self) -> Result<(), ServerError> {
                self.lock().await.kill().await
            }
            async fn restart(&self) -> Result<(), ServerError> {
                self.lock().await.restart().await
            }
            async fn pause(&self) -> Result<(), ServerError> {
                self.lock().await.pause()
            }
            async fn resume(&self) -> Result<(), ServerError> {
                self.lock().await.resume()
            }
            async fn log(&self) -> String {
                self.lock().await.log()
            }
        }
    )*};
}

controlled!(RedisServer => "redis-server", MemcachedServer => "memcached", PostgresServer => "postgres");

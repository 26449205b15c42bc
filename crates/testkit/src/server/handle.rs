//! What the three servers share: start on a free port and wait until ready,
//! kill, pause, restart, stop, and the external-server override.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::ServerError;
use super::process::{self, Launch, Proc};
use super::url::Parts;

/// How long a server may take to answer after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one readiness check may take (a hung server must not hang it).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `stop` waits for a graceful shutdown.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// How many free ports `start` tries when another process takes the port
/// between our pick and the server's bind.
const PORT_ATTEMPTS: usize = 5;

/// One kind of server: how to prepare, launch and probe it.
pub(crate) trait Flavor: Sized + Send + Sync + 'static {
    /// The binary, for messages.
    const BINARY: &'static str;
    /// The variable naming an external server to use instead.
    const ENV_VAR: &'static str;
    /// The port an external URL without one means.
    const DEFAULT_PORT: u16;
    /// The signal that asks for a graceful shutdown.
    const STOP_SIGNAL: Signal;

    /// The URL clients use for a testkit server on `port`.
    fn url(port: u16) -> String;

    /// Finds the binaries and prepares a directory for one server.
    fn prepare() -> impl Future<Output = Result<(Self, tempfile::TempDir), ServerError>> + Send;

    /// The command that runs the server on `port` in `dir`.
    fn launch(&self, port: u16, dir: &Path) -> Launch;

    /// The file the server's output goes to.
    fn log_file(dir: &Path) -> PathBuf;

    /// Cleans up what a server killed with `SIGKILL` leaves outside its
    /// directory; called after every process is gone, before the directory
    /// is removed.
    fn after_kill(&self, _dir: &Path) {}

    /// `Ok` once the server on `addr` answers its protocol and is the
    /// process `pid` (and not some other process that took the port);
    /// otherwise why not yet.
    fn probe(
        &self,
        addr: SocketAddr,
        pid: u32,
        dir: &Path,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// A server the testkit runs.
#[derive(Debug)]
pub(crate) struct Managed<F: Flavor> {
    flavor: F,
    port: u16,
    // Declared before `dir`: fields drop in order, and the processes must
    // be gone before their directory is removed.
    proc: Option<Proc>,
    dir: tempfile::TempDir,
}

enum LaunchError {
    /// Another process holds the port.
    PortTaken(ServerError),
    Failed(ServerError),
}

impl<F: Flavor> Managed<F> {
    async fn start() -> Result<Self, ServerError> {
        let (flavor, dir) = F::prepare().await?;
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = process::free_port()?;
            match launch_until_ready(&flavor, port, dir.path()).await {
                Ok(proc) => {
                    return Ok(Self {
                        flavor,
                        port,
                        proc: Some(proc),
                        dir,
                    });
                }
                Err(LaunchError::PortTaken(e)) => last = Some(e),
                Err(LaunchError::Failed(e)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ServerError::new("no free port")))
    }

    fn log_path(&self) -> PathBuf {
        F::log_file(self.dir.path())
    }

    fn with_log(&self, message: String) -> ServerError {
        let path = self.log_path();
        let log = process::read_log(&path);
        ServerError::new(message + &process::log_tail(&path, &log))
    }

    /// The running process, or why there is none.
    fn running(&self, op: &str) -> Result<&Proc, ServerError> {
        self.proc.as_ref().ok_or_else(|| {
            ServerError::new(format!(
                "cannot {op} {} on port {}: it is not running (killed or stopped; restart it first)",
                F::BINARY,
                self.port
            ))
        })
    }

    async fn kill(&mut self) -> Result<(), ServerError> {
        if let Some(mut proc) = self.proc.take() {
            proc.kill()
                .await
                .map_err(|e| self.with_log(e.to_string()))?;
        }
        Ok(())
    }

    async fn stop(&mut self) -> Result<(), ServerError> {
        let Some(mut proc) = self.proc.take() else {
            return Ok(());
        };
        if proc.shut_down(F::STOP_SIGNAL, STOP_GRACE).await? {
            return Ok(());
        }
        let killed = proc.kill().await;
        Err(self.with_log(format!(
            "{} on port {} did not exit within {} s of {}; it was killed{}",
            F::BINARY,
            self.port,
            STOP_GRACE.as_secs(),
            F::STOP_SIGNAL,
            killed.err().map(|e| format!(" ({e})")).unwrap_or_default()
        )))
    }

    async fn restart(&mut self) -> Result<(), ServerError> {
        if let Some(proc) = self.proc.as_mut() {
            if proc.exit_status().is_none() {
                self.stop().await?;
            } else {
                // It died on its own; make sure nothing of it is left.
                self.kill().await?;
            }
        }
        match launch_until_ready(&self.flavor, self.port, self.dir.path()).await {
            Ok(proc) => {
                self.proc = Some(proc);
                Ok(())
            }
            Err(LaunchError::PortTaken(e)) => Err(ServerError::new(format!(
                "cannot restart {} on port {}: another process took the port meanwhile. {e}",
                F::BINARY,
                self.port
            ))),
            Err(LaunchError::Failed(e)) => Err(e),
        }
    }

    fn pause(&self) -> Result<(), ServerError> {
        self.running("pause")?.pause()
    }

    fn resume(&self) -> Result<(), ServerError> {
        self.running("resume")?.resume()
    }
}

impl<F: Flavor> Drop for Managed<F> {
    fn drop(&mut self) {
        if let Some(proc) = self.proc.take() {
            // Kills everything and waits for it.
            drop(proc);
        }
        self.flavor.after_kill(self.dir.path());
    }
}

/// Spawns the server on `port` and polls it until it is ready, it exits,
/// or [`READY_TIMEOUT`] passes.
async fn launch_until_ready<F: Flavor>(
    flavor: &F,
    port: u16,
    dir: &Path,
) -> Result<Proc, LaunchError> {
    let launch = flavor.launch(port, dir);
    let log_path = F::log_file(dir);
    let (mut proc, log_offset) = Proc::spawn(&launch).map_err(LaunchError::Failed)?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let started = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(status) = proc.exit_status() {
            let log = process::read_log_from(&log_path, log_offset);
            let message = format!(
                "{} exited ({status}) before it was ready on port {port}{}",
                F::BINARY,
                process::log_tail(&log_path, &log)
            );
            // Reap what it may have forked before trying again.
            let _ = proc.kill().await;
            return Err(if log.to_ascii_lowercase().contains("already in use") {
                LaunchError::PortTaken(ServerError::new(message))
            } else {
                LaunchError::Failed(ServerError::new(message))
            });
        }
        let pid = proc.pid();
        let probe = tokio::time::timeout(PROBE_TIMEOUT, flavor.probe(addr, pid, dir));
        // Raced against the server's exit: when another process holds the
        // port and never answers, the probe would wait for nothing.
        let last_probe = tokio::select! {
            probed = probe => match probed {
                Ok(Ok(())) => return Ok(proc),
                Ok(Err(why)) => why,
                Err(_) => format!("no answer within {PROBE_TIMEOUT:?}"),
            },
            () = exited(&mut proc) => continue,
        };
        if started.elapsed() >= READY_TIMEOUT {
            let _ = proc.kill().await;
            let log = process::read_log_from(&log_path, log_offset);
            return Err(LaunchError::Failed(ServerError::new(format!(
                "{} on port {port} was not ready after {} s (last check: {last_probe}); it was killed{}",
                F::BINARY,
                READY_TIMEOUT.as_secs(),
                process::log_tail(&log_path, &log)
            ))));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Resolves once the server's main process has exited.
async fn exited(proc: &mut Proc) {
    while proc.exit_status().is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A server the testkit did not start, named by an environment variable.
#[derive(Debug)]
pub(crate) struct External {
    url: String,
    addr: SocketAddr,
}

/// A managed or an external server: what the public types wrap.
#[derive(Debug)]
pub(crate) enum Handle<F: Flavor> {
    Managed(Managed<F>),
    External(External),
}

impl<F: Flavor> Handle<F> {
    pub(crate) async fn start() -> Result<Self, ServerError> {
        match std::env::var(F::ENV_VAR) {
            Ok(url) if !url.trim().is_empty() => Self::external(url.trim()).await,
            _ => Managed::start().await.map(Handle::Managed),
        }
    }

    pub(crate) async fn external(url: &str) -> Result<Self, ServerError> {
        let (host, port) = Parts::parse(url)
            .host_and_port(F::DEFAULT_PORT)
            .ok_or_else(|| {
                ServerError::new(format!(
                    "{}={url:?} has no host:port the testkit can use",
                    F::ENV_VAR
                ))
            })?;
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| {
                ServerError::new(format!("{}: cannot resolve {host}:{port}: {e}", F::ENV_VAR))
            })?
            .collect();
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| {
                ServerError::new(format!("{}: {host}:{port} has no address", F::ENV_VAR))
            })?;
        Ok(Handle::External(External {
            url: url.to_owned(),
            addr,
        }))
    }

    pub(crate) fn url(&self) -> String {
        match self {
            Handle::Managed(m) => F::url(m.port),
            Handle::External(e) => e.url.clone(),
        }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        match self {
            Handle::Managed(m) => SocketAddr::from((Ipv4Addr::LOCALHOST, m.port)),
            Handle::External(e) => e.addr,
        }
    }

    pub(crate) fn is_running(&self) -> bool {
        match self {
            Handle::Managed(m) => m.proc.is_some(),
            Handle::External(_) => true,
        }
    }

    pub(crate) fn is_external(&self) -> bool {
        matches!(self, Handle::External(_))
    }

    pub(crate) fn log(&self) -> String {
        match self {
            Handle::Managed(m) => process::read_log(&m.log_path()),
            Handle::External(e) => format!(
                "(no log: {} points at an external server, {})",
                F::ENV_VAR,
                e.url
            ),
        }
    }

    pub(crate) fn managed(&self, op: &str) -> Result<&Managed<F>, ServerError> {
        match self {
            Handle::Managed(m) => Ok(m),
            Handle::External(e) => Err(Self::external_error(op, e)),
        }
    }

    pub(crate) fn managed_mut(&mut self, op: &str) -> Result<&mut Managed<F>, ServerError> {
        match self {
            Handle::Managed(m) => Ok(m),
            Handle::External(e) => Err(Self::external_error(op, e)),
        }
    }

    fn external_error(op: &str, e: &External) -> ServerError {
        ServerError::new(format!(
            "cannot {op} the server at {}: {} points at an external server, and fault \
             injection needs a server the testkit started (unset {} to let it start one)",
            e.url,
            F::ENV_VAR,
            F::ENV_VAR
        ))
    }

    pub(crate) async fn kill(&mut self) -> Result<(), ServerError> {
        self.managed_mut("kill")?.kill().await
    }

    pub(crate) async fn restart(&mut self) -> Result<(), ServerError> {
        self.managed_mut("restart")?.restart().await
    }

    pub(crate) async fn stop(&mut self) -> Result<(), ServerError> {
        self.managed_mut("stop")?.stop().await
    }

    pub(crate) fn pause(&self) -> Result<(), ServerError> {
        self.managed("pause")?.pause()
    }

    pub(crate) fn resume(&self) -> Result<(), ServerError> {
        self.managed("resume")?.resume()
    }

    /// The managed server's directory, if any.
    pub(crate) fn dir(&self) -> Option<&Path> {
        match self {
            Handle::Managed(m) => Some(m.dir.path()),
            Handle::External(_) => None,
        }
    }
}

/// Defines a public server type wrapping [`Handle`], with the documented
/// API every server has.
macro_rules! server_type {
    (
        $(#[$meta:meta])*
        $name:ident, $flavor:ty, $what:literal, $url:literal, $env:literal
    ) => {
        $(#[$meta])*
        pub struct $name {
            inner: $crate::server::handle::Handle<$flavor>,
        }

        impl $name {
            #[doc = concat!(
                "Starts ", $what, " on a free loopback port in a new temporary directory, ",
                "and returns once it answers its protocol.\n\n",
                "When `", $env, "` is set, returns a handle to that external ",
                "server instead (see [`is_external`](Self::is_external)).\n\n",
                "# Errors\n\n",
                "When the binary is missing (the message says how to install it), or the ",
                "server exits or is not ready within 30 s (the message ends with its log)."
            )]
            pub async fn start() -> Result<Self, $crate::server::ServerError> {
                $crate::server::handle::Handle::start()
                    .await
                    .map(|inner| Self { inner })
            }

            #[doc = concat!("The URL clients connect to: `", $url, "`.")]
            pub fn url(&self) -> String {
                self.inner.url()
            }

            /// The address the server listens on.
            pub fn addr(&self) -> std::net::SocketAddr {
                self.inner.addr()
            }

            /// The port the server listens on; it does not change on restart.
            pub fn port(&self) -> u16 {
                self.inner.addr().port()
            }

            /// Kills the server and every process it forked with `SIGKILL`,
            /// and waits until all of them are gone. Clients then get
            /// "connection refused". Killing a server that is not running
            /// does nothing.
            ///
            /// # Errors
            ///
            /// For an external server, or when processes survive 10 s.
            pub async fn kill(&mut self) -> Result<(), $crate::server::ServerError> {
                self.inner.kill().await
            }

            /// Starts the server again on the same port and in the same
            /// directory, and waits until it is ready. A server still
            /// running is stopped gracefully first.
            ///
            /// # Errors
            ///
            /// For an external server, when another process took the port
            /// meanwhile, or as for [`start`](Self::start).
            pub async fn restart(&mut self) -> Result<(), $crate::server::ServerError> {
                self.inner.restart().await
            }

            /// Asks the server to shut down gracefully and waits until it
            /// has. A paused server is resumed so that it can.
            ///
            /// # Errors
            ///
            /// For an external server, or when it does not exit within 15 s
            /// (it is killed then).
            pub async fn stop(&mut self) -> Result<(), $crate::server::ServerError> {
                self.inner.stop().await
            }

            /// Freezes the server and every process it forked with `SIGSTOP`. The
            /// kernel still accepts connections and buffers requests, but
            /// nothing answers until [`resume`](Self::resume).
            ///
            /// # Errors
            ///
            /// For an external server, or one that is not running.
            pub fn pause(&self) -> Result<(), $crate::server::ServerError> {
                self.inner.pause()
            }

            /// Continues a paused server with `SIGCONT`; requests sent
            /// meanwhile are answered then.
            ///
            /// # Errors
            ///
            /// For an external server, or one that is not running.
            pub fn resume(&self) -> Result<(), $crate::server::ServerError> {
                self.inner.resume()
            }

            /// Everything the server wrote to its log so far, across
            /// restarts: put it in a failing test's message.
            pub fn log(&self) -> String {
                self.inner.log()
            }

            /// Whether the server runs (it was not killed or stopped, or
            /// was restarted since); an external server always counts.
            pub fn is_running(&self) -> bool {
                self.inner.is_running()
            }

            /// Whether this handle points at an external server (named by
            #[doc = concat!("`", $env, "`),")]
            /// which the testkit cannot kill, pause or restart.
            pub fn is_external(&self) -> bool {
                self.inner.is_external()
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("url", &self.inner.url())
                    .field("external", &self.inner.is_external())
                    .field("dir", &self.inner.dir())
                    .finish()
            }
        }
    };
}

pub(crate) use server_type;

#[cfg(test)]
mod tests {
    use super::super::redis::Redis;
    use super::*;

    #[tokio::test]
    async fn an_external_server_is_used_as_is_and_refuses_fault_injection() {
        let mut handle = Handle::<Redis>::external("redis://127.0.0.1:6390/0")
            .await
            .unwrap();
        assert!(handle.is_external());
        assert_eq!(handle.url(), "redis://127.0.0.1:6390/0");
        assert_eq!(handle.addr(), "127.0.0.1:6390".parse().unwrap());
        assert!(handle.log().contains("WT_TEST_REDIS_URL"));

        let err = handle.kill().await.unwrap_err();
        assert!(
            err.message()
                .contains("fault injection needs a server the testkit started"),
            "{err}"
        );
        assert!(err.message().contains("WT_TEST_REDIS_URL"), "{err}");
        assert!(handle.pause().is_err());
        assert!(handle.resume().is_err());
        assert!(handle.restart().await.is_err());
        assert!(handle.stop().await.is_err());
    }

    #[tokio::test]
    async fn a_taken_port_is_reported_as_such_so_start_can_retry() {
        let (redis, dir) = Redis::prepare().await.unwrap();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        match launch_until_ready(&redis, port, dir.path()).await {
            Err(LaunchError::PortTaken(e)) => {
                assert!(e.message().contains("already in use"), "{e}");
                assert!(e.message().contains("redis.log"), "no log tail: {e}");
            }
            Err(LaunchError::Failed(e)) => panic!("not seen as a port conflict: {e}"),
            Ok(_) => panic!("started on a taken port"),
        }
    }

    #[tokio::test]
    async fn an_external_url_without_a_port_gets_the_default_one() {
        let handle = Handle::<Redis>::external("redis://localhost")
            .await
            .unwrap();
        assert_eq!(handle.addr().port(), 6379);
        assert!(Handle::<Redis>::external("redis://").await.is_err());
    }
}

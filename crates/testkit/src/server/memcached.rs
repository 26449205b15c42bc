//! `memcached` on TCP only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use super::ServerError;
use super::handle::{Flavor, server_type};
use super::process::{self, Launch};

server_type! {
    /// A `memcached` child process on a free loopback port (TCP only,
    /// 64 MB of memory).
    ///
    /// Memcached keeps nothing on disk: after [`kill`](Self::kill) and
    /// [`restart`](Self::restart) it comes back empty. [`stop`](Self::stop)
    /// takes up to a second: memcached acts on `SIGTERM` at its next clock
    /// tick.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), writethrough_testkit::server::ServerError> {
    /// let memcached = writethrough_testkit::server::MemcachedServer::start().await?;
    /// assert!(memcached.url().starts_with("memcached://127.0.0.1:"));
    /// # Ok(())
    /// # }
    /// ```
    MemcachedServer, Memcached, "a `memcached`", "memcached://127.0.0.1:PORT",
    "WT_TEST_MEMCACHED_URL"
}

#[derive(Debug)]
pub(crate) struct Memcached {
    binary: PathBuf,
}

impl Flavor for Memcached {
    const BINARY: &'static str = "memcached";
    const ENV_VAR: &'static str = "WT_TEST_MEMCACHED_URL";
    const DEFAULT_PORT: u16 = 11211;
    const STOP_SIGNAL: Signal = Signal::SIGTERM;

    fn url(port: u16) -> String {
        format!("memcached://127.0.0.1:{port}")
    }

    async fn prepare() -> Result<(Self, tempfile::TempDir), ServerError> {
        let binary = process::find_on_path("memcached")
            .ok_or_else(|| process::missing_binary("memcached", "on PATH", "memcached"))?;
        Ok((Self { binary }, process::temp_dir("wt-memcached-")?))
    }

    fn launch(&self, port: u16, dir: &Path) -> Launch {
        let launch = Launch::new(&self.binary, dir, Self::log_file(dir))
            .arg("-l")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(port.to_string())
            .arg("-U")
            .arg("0")
            .arg("-m")
            .arg("64")
            .arg("-v");
        // Memcached refuses to run as root without -u; staying root keeps
        // it signallable like the other servers and needs no extra user.
        if super::is_root() {
            launch.arg("-u").arg("root")
        } else {
            launch
        }
    }

    fn log_file(dir: &Path) -> PathBuf {
        dir.join("memcached.log")
    }

    async fn probe(&self, addr: SocketAddr, pid: u32, _dir: &Path) -> Result<(), String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut stream = BufReader::new(stream);
        stream
            .get_mut()
            .write_all(b"version\r\n")
            .await
            .map_err(|e| format!("version: {e}"))?;
        let mut line = String::new();
        stream
            .read_line(&mut line)
            .await
            .map_err(|e| format!("version: {e}"))?;
        if !line.starts_with("VERSION ") {
            return Err(format!("version answered {line:?}"));
        }
        // The process id tells our server from one that took the port.
        stream
            .get_mut()
            .write_all(b"stats\r\n")
            .await
            .map_err(|e| format!("stats: {e}"))?;
        let mut server_pid = None;
        loop {
            line.clear();
            let n = stream
                .read_line(&mut line)
                .await
                .map_err(|e| format!("stats: {e}"))?;
            let line = line.trim_end();
            if n == 0 || line == "END" {
                break;
            }
            if let Some(p) = line.strip_prefix("STAT pid ") {
                server_pid = p.trim().parse::<u32>().ok();
            }
        }
        match server_pid {
            Some(p) if p == pid => Ok(()),
            other => Err(format!(
                "the memcached on {addr} is process {other:?}, not ours ({pid})"
            )),
        }
    }
}

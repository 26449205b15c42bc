//! A TCP proxy that injects network faults between a client and a server.
//!
//! Put a [`FaultProxy`] in front of any server (the ones in
//! [`server`](crate::server) or any other), hand the client
//! [`FaultProxy::url`] instead of the server's URL, and turn faults on and
//! off while the test runs:
//!
//! | fault | what the client sees |
//! | --- | --- |
//! | [`set_latency`](FaultProxy::set_latency) | every chunk of bytes, each way, arrives that much later |
//! | [`set_blackhole`](FaultProxy::set_blackhole) | silence: nothing gets through, no reply, no error (a partition); held bytes arrive when it heals |
//! | [`reset_all`](FaultProxy::reset_all) | open connections die with a TCP reset |
//! | [`set_refuse`](FaultProxy::set_refuse) | new connections are reset at once |
//! | [`set_slow_close`](FaultProxy::set_slow_close) | a close by one side reaches the other late |
//!
//! [`heal`](FaultProxy::heal) turns every fault off. The proxy is the
//! network, not the server: to stop or freeze the server itself, use
//! `kill` or `pause` on the server handle.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use writethrough_testkit::proxy::FaultProxy;
//! use writethrough_testkit::server::RedisServer;
//!
//! let redis = RedisServer::start().await?;
//! let proxy = FaultProxy::start(redis.addr()).await?;
//! let url = proxy.url(&redis.url()); // give this to the client
//! proxy.set_latency(Duration::from_millis(50));
//! proxy.set_blackhole(true); // ... the client's calls time out ...
//! proxy.heal();
//! # let _ = url;
//! # Ok(())
//! # }
//! ```

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// How long the proxy waits for the upstream server to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest chunk forwarded at once.
const CHUNK: usize = 16 * 1024;

/// A TCP proxy on a free loopback port that forwards to one upstream
/// server and injects faults on command.
///
/// Settings apply at once to open connections and to new ones. Dropping the
/// proxy stops it and closes every connection through it. It runs on the
/// Tokio runtime that called [`start`](Self::start).
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

/// What the connection tasks share with the handle.
struct Shared {
    faults: watch::Sender<Faults>,
    /// Bumped by `reset_all`; every connection watches it.
    resets: watch::Sender<u64>,
    open: AtomicUsize,
    /// Where new connections go.
    upstream: parking_lot::Mutex<SocketAddr>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Faults {
    latency: Duration,
    blackhole: bool,
    refuse: bool,
    slow_close: Option<Duration>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` on a free port of 127.0.0.1.
    ///
    /// The proxy connects to `upstream` once per client connection, when the
    /// client connects; if that fails, the client's connection is reset.
    ///
    /// # Errors
    ///
    /// When no loopback port can be bound.
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            faults: watch::Sender::new(Faults::default()),
            resets: watch::Sender::new(0),
            open: AtomicUsize::new(0),
            upstream: parking_lot::Mutex::new(upstream),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        *self.shared.upstream.lock()
    }

    /// Sends new connections to `upstream` from now on, as a virtual IP or
    /// a DNS name moved to another server after a failover does. Open
    /// connections keep their server; [`reset_all`](Self::reset_all) ends them.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.shared.upstream.lock() = upstream;
    }

    /// `server_url` with its `host:port` replaced by the proxy's, user,
    /// path and query kept: `postgres://postgres@127.0.0.1:5432/postgres`
    /// becomes `postgres://postgres@127.0.0.1:PROXY_PORT/postgres`.
    pub fn url(&self, server_url: &str) -> String {
        crate::server::url::with_addr(server_url, self.addr)
    }

    /// Delays every chunk of bytes by `latency` before forwarding it, in
    /// both directions, so a request and its reply take at least twice
    /// `latency`. Chunks of one direction stay in order: a slow chunk holds
    /// back the ones behind it. Zero turns it off.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.faults.send_modify(|f| f.latency = latency);
    }

    /// Holds all traffic: nothing is forwarded in either direction and
    /// closes are held back, so connections stall without an error, as in a
    /// network partition. New connections are accepted and stall too (the
    /// proxy connects upstream only once the blackhole lifts).
    ///
    /// As TCP would after a partition that heals before its retransmission
    /// timeout, bytes sent meanwhile are delivered, late and in order, when
    /// the blackhole lifts: requests a client gave up on still reach the
    /// server. A stream is never cut short in the middle, which no real
    /// network does to a live TCP connection either.
    pub fn set_blackhole(&self, on: bool) {
        self.shared.faults.send_modify(|f| f.blackhole = on);
    }

    /// Aborts every open connection with a TCP reset (`SO_LINGER` 0) on
    /// both sides: the client's next read or write fails with "connection
    /// reset", and the server sees the same. New connections are not
    /// affected.
    pub fn reset_all(&self) {
        self.shared.resets.send_modify(|n| *n += 1);
    }

    /// While on, new connections are accepted and then reset at once, as
    /// when a load balancer or a crashing server drops them. Open
    /// connections are not affected.
    pub fn set_refuse(&self, on: bool) {
        self.shared.faults.send_modify(|f| f.refuse = on);
    }

    /// When one side closes (or resets) its connection, waits `delay`
    /// before closing (or resetting) the other side, as when a peer's close
    /// gets lost and is only noticed later. `None` turns it off.
    pub fn set_slow_close(&self, delay: Option<Duration>) {
        self.shared.faults.send_modify(|f| f.slow_close = delay);
    }

    /// How many client connections are open through the proxy now.
    pub fn connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Turns every fault off: no latency, no blackhole, no refusal, no slow
    /// close. Connections stalled by a blackhole carry traffic again.
    pub fn heal(&self) {
        self.shared.faults.send_replace(Faults::default());
    }
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream())
            .field("faults", &*self.shared.faults.borrow())
            .field("connections", &self.connections())
            .finish()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept task owns the listener and, through its JoinSet, every
        // connection task: aborting it closes them all.
        self.accept.abort();
    }
}

/// Counts a connection as open for as long as it lives.
struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.open.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(shared))
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // Collect finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(e) => {
                // Out of file descriptors, most likely: let some close.
                tracing::debug!("fault proxy: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shared.faults.borrow().refuse {
            abort(&client);
            continue;
        }
        let _ = client.set_nodelay(true);
        // Subscribed here, so a reset_all() from now on reaches it.
        let resets = shared.resets.subscribe();
        let guard = OpenGuard::new(&shared);
        let upstream = *shared.upstream.lock();
        connections.spawn(connection(
            client,
            upstream,
            Arc::clone(&shared),
            resets,
            guard,
        ));
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Both sides closed: drop the sockets normally.
    Closed,
    /// Reset both sides.
    Reset,
}

async fn connection(
    mut client: TcpStream,
    upstream_addr: SocketAddr,
    shared: Arc<Shared>,
    mut resets: watch::Receiver<u64>,
    _open: OpenGuard,
) {
    let mut upstream = None;
    let ending = tokio::select! {
        ending = relay(&mut client, &mut upstream, upstream_addr, &shared) => ending,
        _ = resets.changed() => Ending::Reset,
    };
    if ending == Ending::Reset {
        abort(&client);
        if let Some(upstream) = &upstream {
            abort(upstream);
        }
    }
}

async fn relay(
    client: &mut TcpStream,
    upstream_slot: &mut Option<TcpStream>,
    upstream_addr: SocketAddr,
    shared: &Shared,
) -> Ending {
    let mut faults = shared.faults.subscribe();
    if let Err(ending) = stall_while_blackholed(client, &mut faults).await {
        return ending;
    }
    let upstream =
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream_addr)).await {
            Ok(Ok(upstream)) => upstream,
            // The nearest thing to "connection refused" once the client's
            // connection was accepted.
            _ => return Ending::Reset,
        };
    let _ = upstream.set_nodelay(true);
    let upstream = upstream_slot.insert(upstream);
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    let to_server = pump(client_read, upstream_write, shared.faults.subscribe());
    let to_client = pump(upstream_read, client_write, shared.faults.subscribe());
    match futures::future::try_join(to_server, to_client).await {
        Ok(_) => Ending::Closed,
        Err(Broken) => Ending::Reset,
    }
}

/// A new connection under a blackhole: wait, reading nothing, until the
/// blackhole lifts (what the client sends waits in the kernel's buffers).
async fn stall_while_blackholed(
    _client: &mut TcpStream,
    faults: &mut watch::Receiver<Faults>,
) -> Result<(), Ending> {
    wait_out_blackhole(faults)
        .await
        .map_err(|()| Ending::Closed)
}

/// Returns once no blackhole is on; `Err` if the proxy is gone.
async fn wait_out_blackhole(faults: &mut watch::Receiver<Faults>) -> Result<(), ()> {
    while faults.borrow_and_update().blackhole {
        faults.changed().await.map_err(drop)?;
    }
    Ok(())
}

/// One direction of a connection broke: reset both sides.
struct Broken;

/// Forwards one direction until `from` closes (then half-closes `to`) or
/// either side fails.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut faults: watch::Receiver<Faults>,
) -> Result<(), Broken> {
    let mut buf = vec![0; CHUNK];
    loop {
        let read = from.read(&mut buf).await;
        let now = *faults.borrow_and_update();
        match read {
            Ok(0) => {
                closing(&mut faults).await;
                let _ = to.shutdown().await;
                return Ok(());
            }
            Ok(n) => {
                if !now.latency.is_zero() {
                    tokio::time::sleep(now.latency).await;
                }
                // Held, not dropped, while a blackhole is on.
                if wait_out_blackhole(&mut faults).await.is_err() {
                    return Err(Broken);
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    closing(&mut faults).await;
                    return Err(Broken);
                }
            }
            Err(_) => {
                closing(&mut faults).await;
                return Err(Broken);
            }
        }
    }
}

/// Before a close is passed on: held while blackholed, then delayed by the
/// slow-close setting.
async fn closing(faults: &mut watch::Receiver<Faults>) {
    while faults.borrow_and_update().blackhole {
        if faults.changed().await.is_err() {
            return;
        }
    }
    let delay = faults.borrow().slow_close;
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
}

/// Closes with a TCP reset rather than a FIN.
fn abort(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

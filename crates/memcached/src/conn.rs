//! One pipelined connection to one memcached server, shared by every task.
//!
//! A single task owns the socket. Callers queue encoded commands to it on
//! a channel; it appends whatever is queued to one write buffer, writes as
//! much as the socket takes, and reads answers whenever they arrive.
//! Memcached answers in order, so the task pairs answers with requests
//! first-in, first-out: no request waits for another's round trip, and a
//! burst of requests leaves in one `write`. Reading and writing in the same
//! task never deadlocks, because neither waits for the other: the task
//! waits for whichever of "readable", "writable" or "a new request" comes.
//!
//! Timeouts cost no timer per request: the task wakes on a coarse tick and
//! fails every request past its deadline with [`ClientError::Timeout`]. (A
//! Tokio timer per call costs 10-20 % of a loopback read hit, because a
//! lone timer re-arms the runtime's driver every time.) A request that timed
//! out keeps its place in the queue, so its answers are still consumed and
//! the stream stays in step; a request whose caller went away before it was
//! written is never sent. When the socket fails, every request in flight
//! fails and the connection reports itself dead, so the next call dials
//! again.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::ClientError;
use crate::proto::{self, Kind, Partial, Resp};

/// The answers to one request, one per command.
pub(crate) type Reply = Result<Vec<Resp>, ClientError>;

/// When a request gives up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    /// The instant.
    pub(crate) at: Instant,
    /// The timeout it came from, for the error.
    pub(crate) limit: Duration,
}

impl Deadline {
    /// `limit` from now.
    pub(crate) fn after(limit: Duration) -> Self {
        Deadline {
            at: Instant::now() + limit,
            limit,
        }
    }
}

/// Encoded commands and what each answers.
pub(crate) struct Request {
    /// The commands, back to back.
    pub(crate) bytes: Vec<u8>,
    /// The kind of answer every command gets.
    pub(crate) kind: Kind,
    /// How many commands `bytes` holds.
    pub(crate) count: usize,
    /// When to stop waiting.
    pub(crate) deadline: Deadline,
    /// Where the answers go.
    pub(crate) reply: oneshot::Sender<Reply>,
}

struct Pending {
    kind: Kind,
    count: usize,
    got: Vec<Resp>,
    deadline: Deadline,
    /// Taken when the request times out; its answers are still consumed.
    reply: Option<oneshot::Sender<Reply>>,
}

/// Requests taken off the channel per wake-up, so that reading keeps up.
const MAX_BATCH: usize = 1024;

/// A handle on a live connection; cheap to clone.
#[derive(Clone)]
pub(crate) struct Conn {
    tx: mpsc::UnboundedSender<Request>,
    dead: Arc<AtomicBool>,
}

impl Conn {
    /// Dials `addr` and starts the connection's task. Deadlines are
    /// checked every `tick`.
    pub(crate) async fn connect(
        addr: &str,
        timeout: Duration,
        tick: Duration,
    ) -> Result<Conn, ClientError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout(timeout))??;
        stream.set_nodelay(true)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let dead = Arc::new(AtomicBool::new(false));
        tokio::spawn(run(stream, rx, dead.clone(), tick));
        Ok(Conn { tx, dead })
    }

    /// Whether the connection has failed (or closed) and must be replaced.
    pub(crate) fn is_dead(&self) -> bool {
        // A closed channel means the task is gone without saying so: its
        // runtime shut down (a cache shared across test runtimes, say).
        self.dead.load(Ordering::Acquire) || self.tx.is_closed()
    }

    /// Queues a request; its answers (or its failure) arrive on its `reply`.
    pub(crate) fn send(&self, req: Request) {
        if let Err(mpsc::error::SendError(req)) = self.tx.send(req) {
            let _ = req.reply.send(Err(ClientError::Closed));
        }
    }
}

/// The connection's state, owned by its task.
struct State {
    sock: TcpStream,
    /// Bytes to write; `wbuf[wpos..]` are not written yet.
    wbuf: Vec<u8>,
    wpos: usize,
    rbuf: BytesMut,
    queue: VecDeque<Pending>,
    partial: Partial,
}

impl State {
    fn accept(&mut self, req: Request) {
        if req.reply.is_closed() {
            // Its caller gave up before it was written: never send it.
            return;
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
        self.wbuf.extend_from_slice(&req.bytes);
        self.queue.push_back(Pending {
            kind: req.kind,
            count: req.count,
            got: Vec::with_capacity(req.count),
            deadline: req.deadline,
            reply: Some(req.reply),
        });
    }

    /// Writes what the socket takes without waiting.
    fn flush(&mut self) -> Result<(), ClientError> {
        while self.wpos < self.wbuf.len() {
            match self.sock.try_write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
            if self.wbuf.capacity() > 1 << 20 {
                self.wbuf = Vec::with_capacity(16 * 1024);
            }
        }
        Ok(())
    }

    /// Reads what has arrived without waiting, and hands out every complete answer.
    fn receive(&mut self) -> Result<(), ClientError> {
        loop {
            if self.rbuf.capacity() - self.rbuf.len() < 8 * 1024 {
                self.rbuf.reserve(64 * 1024);
            }
            match self.sock.try_read_buf(&mut self.rbuf) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(_) => self.parse()?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn parse(&mut self) -> Result<(), ClientError> {
        while !self.rbuf.is_empty() {
            let Some(head) = self.queue.front_mut() else {
                return Err(ClientError::Protocol("an answer nobody asked for".into()));
            };
            let Some(resp) = proto::parse(&mut self.rbuf, &head.kind, &mut self.partial)? else {
                return Ok(());
            };
            head.got.push(resp);
            if head.got.len() == head.count {
                let done = self.queue.pop_front().expect("head exists");
                if let Some(r) = done.reply {
                    let _ = r.send(Ok(done.got));
                }
            }
        }
        Ok(())
    }

    fn expire(&mut self, now: Instant) {
        for p in self.queue.iter_mut().filter(|p| p.deadline.at <= now) {
            if let Some(r) = p.reply.take() {
                let _ = r.send(Err(ClientError::Timeout(p.deadline.limit)));
            }
        }
    }
}

async fn run(
    sock: TcpStream,
    mut rx: mpsc::UnboundedReceiver<Request>,
    dead: Arc<AtomicBool>,
    tick: Duration,
) {
    let mut st = State {
        sock,
        wbuf: Vec::with_capacity(16 * 1024),
        wpos: 0,
        rbuf: BytesMut::with_capacity(64 * 1024),
        queue: VecDeque::new(),
        partial: Partial::default(),
    };
    let timer = tokio::time::sleep(tick);
    tokio::pin!(timer);
    let failure = loop {
        if let Err(e) = st.flush() {
            break e;
        }
        let unsent = st.wpos < st.wbuf.len();
        tokio::select! {
            biased;
            ready = st.sock.readable() => {
                if let Err(e) = ready.map_err(ClientError::from).and_then(|()| st.receive()) {
                    break e;
                }
            }
            ready = st.sock.writable(), if unsent => {
                if let Err(e) = ready {
                    break e.into();
                }
            }
            req = rx.recv() => {
                let Some(req) = req else {
                    // Every handle is gone: nobody can ask anything any more.
                    break ClientError::Closed;
                };
                st.accept(req);
                for _ in 1..MAX_BATCH {
                    match rx.try_recv() {
                        Ok(req) => st.accept(req),
                        Err(_) => break,
                    }
                }
            }
            () = &mut timer => {
                let now = Instant::now();
                st.expire(now);
                timer.as_mut().reset(now + tick);
            }
        }
    };
    dead.store(true, Ordering::Release);
    tracing::debug!(error = %failure, "memcached connection closed");
    rx.close();
    while let Ok(req) = rx.try_recv() {
        let _ = req.reply.send(Err(ClientError::Closed));
    }
    let reason = failure.to_string();
    for p in st.queue.drain(..) {
        if let Some(r) = p.reply {
            let _ = r.send(Err(ClientError::Io(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("the connection failed with the request in flight: {reason}"),
            ))));
        }
    }
}

/// How often a connection checks its requests' deadlines: a quarter of the
/// timeout, between 1 ms and 100 ms. A request times out at most this much
/// after its deadline.
pub(crate) fn tick_for(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(1), Duration::from_millis(100))
}

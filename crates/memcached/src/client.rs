//! The servers of a tier: for each, a few pipelined connections that are
//! dialed on first use and dialed again after they fail.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::conn::{self, Conn, Deadline, Request};
use crate::error::ClientError;
use crate::proto::{Kind, Resp};

struct Slot {
    conn: Mutex<Option<Conn>>,
    /// Held while dialing, so that a burst of callers after a restart opens
    /// one connection rather than one each.
    dial: tokio::sync::Mutex<()>,
    /// Counts finished dials, and keeps the last failure: callers that
    /// queued behind a dial that failed share its failure instead of each
    /// waiting out a connect timeout of their own, one after another.
    dialed: Mutex<(u64, Option<String>)>,
}

/// One memcached server.
pub(crate) struct Server {
    /// `host:port`, as configured.
    pub(crate) name: String,
    slots: Vec<Slot>,
    next: AtomicUsize,
    connect_timeout: Duration,
    tick: Duration,
}

impl Server {
    /// A server named `host:port`, whose requests usually time out after
    /// `timeout` (which sets how often deadlines are checked).
    pub(crate) fn new(
        name: String,
        connections: usize,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Self {
        Server {
            name,
            slots: (0..connections.max(1))
                .map(|_| Slot {
                    conn: Mutex::new(None),
                    dial: tokio::sync::Mutex::new(()),
                    dialed: Mutex::new((0, None)),
                })
                .collect(),
            next: AtomicUsize::new(0),
            connect_timeout,
            tick: conn::tick_for(timeout),
        }
    }

    /// Sends `count` encoded commands that each answer with `kind`, and
    /// waits for all the answers until `deadline`.
    pub(crate) async fn call(
        &self,
        bytes: Vec<u8>,
        kind: Kind,
        count: usize,
        deadline: Deadline,
    ) -> Result<Vec<Resp>, ClientError> {
        // A later round of a multi-step operation must not start past the
        // operation's deadline.
        if tokio::time::Instant::now() >= deadline.at {
            return Err(ClientError::Timeout(deadline.limit));
        }
        let slot = if self.slots.len() == 1 {
            &self.slots[0]
        } else {
            &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()]
        };
        let (reply, rx) = oneshot::channel();
        let req = Request {
            bytes,
            kind,
            count,
            deadline,
            reply,
        };
        let req = {
            let mut guard = slot.conn.lock();
            match guard.as_mut() {
                Some(c) if !c.is_dead() => {
                    c.send(req);
                    None
                }
                _ => Some(req),
            }
        };
        if let Some(req) = req {
            let left = deadline
                .at
                .saturating_duration_since(tokio::time::Instant::now());
            self.dial(slot, left.min(self.connect_timeout), req).await?;
        }
        rx.await.unwrap_or(Err(ClientError::Closed))
    }

    /// Dials the slot's connection again and sends `req` on it, or on the
    /// one a concurrent caller dialed meanwhile.
    async fn dial(&self, slot: &Slot, timeout: Duration, req: Request) -> Result<(), ClientError> {
        let seen = slot.dialed.lock().0;
        let _dialing = slot.dial.lock().await;
        {
            let mut guard = slot.conn.lock();
            if let Some(c) = guard.as_mut()
                && !c.is_dead()
            {
                c.send(req);
                return Ok(());
            }
        }
        {
            let dialed = slot.dialed.lock();
            if dialed.0 != seen
                && let Some(why) = &dialed.1
            {
                return Err(ClientError::Io(std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    why.clone(),
                )));
            }
        }
        let result = Conn::connect(&self.name, timeout, self.tick).await;
        let mut dialed = slot.dialed.lock();
        dialed.0 += 1;
        match result {
            Ok(conn) => {
                dialed.1 = None;
                tracing::debug!(server = %self.name, "connected to memcached");
                conn.send(req);
                *slot.conn.lock() = Some(conn);
                Ok(())
            }
            Err(e) => {
                dialed.1 = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Opens a connection of its own, for long answers (a metadump) that
    /// would hold up everyone else's requests on the shared ones.
    pub(crate) async fn dedicated(&self) -> Result<Conn, ClientError> {
        Conn::connect(&self.name, self.connect_timeout, self.tick).await
    }
}

/// Sends a request on a connection and waits for its answers.
pub(crate) async fn call_on(
    conn: &Conn,
    bytes: Vec<u8>,
    kind: Kind,
    count: usize,
    deadline: Deadline,
) -> Result<Vec<Resp>, ClientError> {
    let (reply, rx) = oneshot::channel();
    conn.send(Request {
        bytes,
        kind,
        count,
        deadline,
        reply,
    });
    rx.await.unwrap_or(Err(ClientError::Closed))
}

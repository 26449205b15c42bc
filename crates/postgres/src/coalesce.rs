//! Write coalescing: concurrent single upserts to one table commit together,
//! one statement and one commit (one WAL flush) for many writers.
//!
//! A write runs at once, on its own, while fewer than `lanes` writes or
//! batches are in flight: an uncontended write pays nothing for the
//! mechanism. Otherwise it queues, and the next lane to finish takes the
//! queue's front — every queued write of the same table and outbox setting,
//! one per key, up to `max` — into one multi-row statement (the batch
//! upsert: keys locked in hash order, versions drawn after the locks, outbox
//! rows in the same statement). A key queued twice keeps its order: the
//! second write waits for the next batch.
//!
//! The lanes narrow under load: a lane that finishes while others are busy
//! leaves the queue to the last one, and after a batch of at least `lanes`
//! writes only one write runs alone at a time, so that the queue grows into
//! big batches (on two cores, one batch of fifteen costs the database far
//! less than four statements of four). A batch smaller than `lanes` widens
//! them again: that load runs as well in parallel, without queueing.
//!
//! A batch would wait for the slowest of its key locks, so its statement
//! waits at most `sql::BATCH_LOCK_WAIT` for each (it sets its own
//! `lock_timeout`); past that it has committed nothing and its writes run
//! one by one, all at once, so that only the writer of a key held by a long
//! transaction waits for it. And a queued write that has waited `STALL`
//! opens one more lane (up to the pool's size), so the queue never waits on
//! a stalled lane for longer than that.
//!
//! Nothing is acknowledged before its commit: a queued writer learns its
//! outcome from the batch that carried it. A batch the database refused as
//! a whole (one row breaking a constraint) committed nothing, and its writes
//! run again one by one, so that only the bad one fails; a batch whose
//! outcome is unknown reports that to every writer in it.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use writethrough_core::backend::{TxOptions, WriteOutcome};
use writethrough_core::{Error, ErrorKind, Key, Result};

use crate::PostgresStore;
use crate::tx::Prepared;

/// One queued write and where its outcome goes.
struct Job {
    p: Prepared,
    opts: TxOptions,
    reply: oneshot::Sender<Result<WriteOutcome>>,
}

#[derive(Default)]
struct State {
    /// Writes and batches running now.
    in_flight: usize,
    queue: VecDeque<Job>,
    /// The last batch was at least `lanes` writes: the load is one that
    /// batches pay for, so writes run alone only when no lane is busy.
    narrow: bool,
}

/// The coalescer of one store.
pub(crate) struct Coalescer {
    lanes: usize,
    /// Most lanes, extra ones for a stalled queue included.
    cap: usize,
    max: usize,
    state: Mutex<State>,
    batches: AtomicU64,
    coalesced: AtomicU64,
    extra_lanes: AtomicU64,
    split: AtomicU64,
}

/// How long a queued write waits before it opens one more lane.
const STALL: Duration = Duration::from_millis(10);

/// What coalescing has done so far (see [`PostgresStore::coalesce_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CoalesceStats {
    /// Statements that carried writes of several callers.
    pub batches: u64,
    /// Writes carried by those statements.
    pub writes: u64,
    /// Writes waiting in the queue now.
    pub queued: u64,
    /// Lanes opened beyond the configured ones because the queue stalled
    /// (its lanes waiting for key locks held elsewhere).
    pub extra_lanes: u64,
    /// Batches refused as a whole (a bad row, or a key lock not granted
    /// within 50 ms) whose writes then ran one by one.
    pub split: u64,
}

impl Coalescer {
    pub(crate) fn new(lanes: usize, max: usize, pool: usize) -> Self {
        let lanes = lanes.max(1);
        Coalescer {
            lanes,
            cap: pool.max(lanes),
            max: max.max(2),
            state: Mutex::new(State::default()),
            batches: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            extra_lanes: AtomicU64::new(0),
            split: AtomicU64::new(0),
        }
    }

    /// The queue, whatever a panic elsewhere left: every critical section
    /// is a few pushes and pops, never half done.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn stats(&self) -> CoalesceStats {
        CoalesceStats {
            batches: self.batches.load(Ordering::Relaxed),
            writes: self.coalesced.load(Ordering::Relaxed),
            queued: self.state().queue.len() as u64,
            extra_lanes: self.extra_lanes.load(Ordering::Relaxed),
            split: self.split.load(Ordering::Relaxed),
        }
    }

    /// Runs one prepared upsert, alone or in a batch with others.
    pub(crate) async fn submit(
        store: &PostgresStore,
        this: &Arc<Coalescer>,
        p: Prepared,
        opts: TxOptions,
    ) -> Result<WriteOutcome> {
        let queued = {
            let mut st = this.state();
            let width = if st.narrow { 1 } else { this.lanes };
            if st.in_flight < width && st.queue.is_empty() {
                st.in_flight += 1;
                Err(p)
            } else {
                let (tx, rx) = oneshot::channel();
                st.queue.push_back(Job { p, opts, reply: tx });
                Ok(rx)
            }
        };
        let mut rx = match queued {
            Ok(rx) => rx,
            Err(p) => {
                // This lane is ours; whatever queued meanwhile is handed on
                // when it ends, even if the caller stops waiting.
                let lane = Lane {
                    store,
                    coalescer: this,
                };
                let r = store.run_retrying(std::slice::from_ref(&p), opts).await;
                drop(lane);
                return r.and_then(one);
            }
        };
        // A lane held up (its key locked by a long transaction) must not
        // hold the queue for long: each `STALL` a queued writer waits, it
        // opens one more lane, up to the pool's size.
        loop {
            match tokio::time::timeout(STALL, &mut rx).await {
                Ok(r) => {
                    return r.unwrap_or_else(|_| {
                        Err(Error::new(
                            ErrorKind::Unavailable,
                            "the batch carrying this write stopped before reporting its outcome",
                        )
                        .with_backend("postgres")
                        .in_doubt())
                    });
                }
                Err(_) => Coalescer::open_lane(store, this),
            }
        }
    }

    /// Ends a lane: hands it to the queued writes, or frees it.
    fn settle(store: &PostgresStore, this: &Arc<Coalescer>) {
        let batch = {
            let mut st = this.state();
            // Only the last lane carries the queue: under load the lanes
            // narrow to one that takes everything queued meanwhile (the
            // biggest batches), and widen again once the queue is empty.
            if st.queue.is_empty() || st.in_flight > 1 {
                st.in_flight -= 1;
                return;
            }
            take_batch(&mut st.queue, this.max)
        };
        Coalescer::drain(store, this, batch);
    }

    /// One more lane for the queue, when there is a queue and the pool has
    /// room for it.
    fn open_lane(store: &PostgresStore, this: &Arc<Coalescer>) {
        let batch = {
            let mut st = this.state();
            if st.queue.is_empty() || st.in_flight >= this.cap {
                return;
            }
            st.in_flight += 1;
            this.extra_lanes.fetch_add(1, Ordering::Relaxed);
            take_batch(&mut st.queue, this.max)
        };
        Coalescer::drain(store, this, batch);
    }

    /// Runs `batch` and then the queue on a lane already counted in
    /// `in_flight`, in a task of its own (no caller's cancellation stops
    /// it), and frees the lane when the queue is empty.
    fn drain(store: &PostgresStore, this: &Arc<Coalescer>, batch: Vec<Job>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime to carry the queue (it is shutting down): nothing
            // queued was sent, so each writer learns it failed.
            this.state().in_flight -= 1;
            for j in batch {
                let _ = j.reply.send(Err(Error::new(
                    ErrorKind::Unavailable,
                    "the runtime stopped before this write was sent",
                )
                .with_backend("postgres")
                .with_key(&j.p.key)));
            }
            return;
        };
        let (store, this) = (store.clone(), this.clone());
        rt.spawn(async move {
            let mut batch = batch;
            loop {
                let n = batch.len();
                run_batch(&store, &this, batch).await;
                let mut st = this.state();
                // A batch smaller than the lanes would have run as well in
                // parallel, alone: widen again.
                st.narrow = n >= this.lanes;
                if st.queue.is_empty() {
                    st.in_flight -= 1;
                    return;
                }
                batch = take_batch(&mut st.queue, this.max);
            }
        });
    }
}

/// A lane in use by a caller; handed on when dropped.
struct Lane<'a> {
    store: &'a PostgresStore,
    coalescer: &'a Arc<Coalescer>,
}

impl Drop for Lane<'_> {
    fn drop(&mut self) {
        Coalescer::settle(self.store, self.coalescer);
    }
}

fn one(mut out: Vec<WriteOutcome>) -> Result<WriteOutcome> {
    out.pop()
        .ok_or_else(|| crate::tx::unexpected("the database returned no outcome"))
}

/// The queue's front job and every later one that can share its statement:
/// same table statements and options, a key not yet in the batch. The rest
/// keep their order.
fn take_batch(queue: &mut VecDeque<Job>, max: usize) -> Vec<Job> {
    let Some(first) = queue.pop_front() else {
        return Vec::new();
    };
    let mut keys: HashSet<Key> = HashSet::from([first.p.key.clone()]);
    let mut batch = vec![first];
    let mut rest = VecDeque::with_capacity(queue.len());
    while let Some(j) = queue.pop_front() {
        let lead = &batch[0];
        if batch.len() < max
            && Arc::ptr_eq(&j.p.sql, &lead.p.sql)
            && j.opts == lead.opts
            && keys.insert(j.p.key.clone())
        {
            batch.push(j);
        } else {
            rest.push_back(j);
        }
    }
    *queue = rest;
    batch
}

/// Runs a batch as one statement and reports each outcome to its writer.
async fn run_batch(store: &PostgresStore, c: &Coalescer, batch: Vec<Job>) {
    if batch.is_empty() {
        return;
    }
    let opts = batch[0].opts;
    let (ps, replies): (Vec<Prepared>, Vec<_>) = batch.into_iter().map(|j| (j.p, j.reply)).unzip();
    if ps.len() > 1 {
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.coalesced.fetch_add(ps.len() as u64, Ordering::Relaxed);
    }
    // Bounded lock waits: a key held by a long transaction splits the
    // batch (below) instead of making all its writers wait for it.
    match store.run_retrying_as(&ps, opts, true).await {
        Ok(out) if out.len() == ps.len() => {
            for (reply, o) in replies.into_iter().zip(out) {
                let _ = reply.send(Ok(o));
            }
        }
        Ok(_) => {
            let e = crate::tx::unexpected("the batch returned too few outcomes").in_doubt();
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        Err(e) if ps.len() == 1 => {
            let _ = replies.into_iter().next().map(|r| r.send(Err(e)));
        }
        Err(e) if e.is_in_doubt() => {
            for (reply, p) in replies.into_iter().zip(&ps) {
                let _ = reply.send(Err(e.clone().with_key(&p.key)));
            }
        }
        // Refused as a whole, nothing committed (a bad row, or a key lock
        // not granted within the bound): each write alone, so that one bad
        // row fails only its own writer; all at once, so that one waiting
        // for its key lock does not hold the others.
        Err(_) => {
            c.split.fetch_add(1, Ordering::Relaxed);
            let mut alone = tokio::task::JoinSet::new();
            for (reply, p) in replies.into_iter().zip(ps) {
                let store = store.clone();
                alone.spawn(async move {
                    let r = store
                        .run_retrying(std::slice::from_ref(&p), opts)
                        .await
                        .and_then(one);
                    let _ = reply.send(r);
                });
            }
            while alone.join_next().await.is_some() {}
        }
    }
}

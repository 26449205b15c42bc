//! Single flight: concurrent misses on one key share one load.
//!
//! A load is a shared future kept in a map until it finishes; every reader
//! that misses on the key while it is in the map awaits the same future, so
//! one database read serves them all, and the load goes on as long as any
//! of them is still waiting (a cancelled first reader does not cancel it).
//!
//! Sharing must not break read-your-writes across processes: a reader that
//! starts after some write was acknowledged must not be handed a row the
//! load fetched before that write committed. This process can detach its
//! own loads when it writes ([`Flights::forget`]), but it cannot see the
//! writes of other processes. So every reader takes a stamp when it
//! arrives, and every load takes one just before it queries the database;
//! a reader uses the load's result only if the query was sent after it
//! arrived. A reader that came too late gets [`Joined::Late`]: it waits for
//! the load to finish (which fills the cache) and reads the cache again —
//! by then the cache holds anything written before the reader arrived,
//! because writes update the cache before they are acknowledged.
//!
//! A finished load stays in the map a little while (until the next sweep),
//! marked with the stamp of its completion: a reader that missed the cache
//! just before the load filled it, and reaches the map just after, then
//! finds the load (and reads the cache again) instead of loading anew. A
//! reader that arrived after the completion starts a new load.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use parking_lot::Mutex;

use crate::error::Result;
use crate::value::VersionedRow;

pub(crate) type LoadResult = Result<Option<VersionedRow>>;
type SharedLoad = Shared<BoxFuture<'static, LoadResult>>;

/// What a reader got from [`Flights::run`].
pub(crate) enum Joined {
    /// The load's result, fetched after the reader arrived.
    Fresh(LoadResult),
    /// The load's query was sent before the reader arrived; its result may
    /// predate writes the reader must see. The load has finished.
    Late,
}

impl Flight {
    /// Whether the load had finished before clock value `t`.
    fn finished_before(&self, t: u64) -> bool {
        let done = self.done.load(Ordering::SeqCst);
        done != 0 && done < t
    }
}

/// The moment a load sends its query; see the module docs.
#[derive(Clone)]
pub(crate) struct Issue {
    clock: Arc<AtomicU64>,
    stamp: Arc<AtomicU64>,
}

impl Issue {
    /// Marks the query as sent now. Call it right before querying.
    pub(crate) fn now(&self) {
        let t = self.clock.fetch_add(1, Ordering::SeqCst) + 1;
        self.stamp.store(t, Ordering::SeqCst);
    }

    /// A mark for a load that does not share (single flight off).
    pub(crate) fn unshared() -> Self {
        Issue {
            clock: Arc::default(),
            stamp: Arc::default(),
        }
    }
}

struct Flight {
    load: SharedLoad,
    issued: Arc<AtomicU64>,
    /// The clock at completion; 0 while running.
    done: Arc<AtomicU64>,
}

#[derive(Default)]
pub(crate) struct Flights {
    map: Arc<Mutex<HashMap<String, Flight>>>,
    clock: Arc<AtomicU64>,
    last_sweep: AtomicU64,
}

impl Flights {
    /// A reader's arrival stamp: take it before looking in the cache.
    pub(crate) fn arrive(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Awaits the load in flight for `key`, or starts `load` as the new one.
    pub(crate) async fn run(
        &self,
        key: &str,
        arrival: u64,
        load: impl FnOnce(Issue) -> BoxFuture<'static, LoadResult>,
    ) -> Joined {
        let (shared, issued) = {
            let mut map = self.map.lock();
            match map.get(key) {
                Some(f) if !f.finished_before(arrival) => (f.load.clone(), f.issued.clone()),
                _ => {
                    let issued = Arc::new(AtomicU64::new(0));
                    let done = Arc::new(AtomicU64::new(0));
                    let fut = load(Issue {
                        clock: self.clock.clone(),
                        stamp: issued.clone(),
                    });
                    let (clock, done_mark) = (self.clock.clone(), done.clone());
                    let shared = async move {
                        let out = fut.await;
                        done_mark.store(clock.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                        out
                    }
                    .boxed()
                    .shared();
                    map.insert(
                        key.to_owned(),
                        Flight {
                            load: shared.clone(),
                            issued: issued.clone(),
                            done,
                        },
                    );
                    (shared, issued)
                }
            }
        };
        let out = shared.await;
        let sent = issued.load(Ordering::SeqCst);
        // A load that failed before querying fetched nothing stale: its
        // error is as good for every waiter.
        if out.is_ok() && sent != 0 && sent < arrival {
            Joined::Late
        } else {
            Joined::Fresh(out)
        }
    }

    /// Detaches the load in flight for `key`, if any: later readers start anew.
    pub(crate) fn forget(&self, key: &str) {
        self.forget_all([key]);
    }

    /// [`Flights::forget`] for many keys, under one lock.
    pub(crate) fn forget_all<'k>(&self, keys: impl IntoIterator<Item = &'k str>) {
        let mut map = self.map.lock();
        if map.is_empty() {
            return;
        }
        for k in keys {
            map.remove(k);
        }
    }

    /// Drops the loads that finished before the previous sweep.
    pub(crate) fn sweep(&self) {
        let horizon = self
            .last_sweep
            .swap(self.clock.load(Ordering::SeqCst), Ordering::SeqCst);
        let mut map = self.map.lock();
        if !map.is_empty() {
            map.retain(|_, f| !f.finished_before(horizon + 1));
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    fn counting_load(
        count: Arc<AtomicUsize>,
        version: u64,
        issue: Issue,
    ) -> BoxFuture<'static, LoadResult> {
        async move {
            issue.now();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(Some(VersionedRow {
                row: Default::default(),
                version,
            }))
        }
        .boxed()
    }

    fn version(j: Joined) -> Option<u64> {
        match j {
            Joined::Fresh(r) => Some(r.unwrap().unwrap().version),
            Joined::Late => None,
        }
    }

    #[tokio::test]
    async fn callers_arriving_before_the_query_share_its_result() {
        let flights = Arc::new(Flights::default());
        let count = Arc::new(AtomicUsize::new(0));
        // Every caller arrives before any query is sent.
        let stamps: Vec<u64> = (0..50).map(|_| flights.arrive()).collect();
        let tasks: Vec<_> = stamps
            .into_iter()
            .map(|a| {
                let (f, c) = (flights.clone(), count.clone());
                tokio::spawn(async move { f.run("k", a, |i| counting_load(c, 1, i)).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(version(t.await.unwrap()), Some(1));
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);
        flights.sweep();
        flights.sweep();
        assert_eq!(flights.len(), 0, "finished loads are swept");
    }

    #[tokio::test]
    async fn a_reader_arriving_after_a_load_finished_starts_a_new_one() {
        let flights = Flights::default();
        let count = Arc::new(AtomicUsize::new(0));
        let a = flights.arrive();
        let c = count.clone();
        assert_eq!(
            version(flights.run("k", a, |i| counting_load(c, 1, i)).await),
            Some(1)
        );
        let b = flights.arrive();
        let c = count.clone();
        assert_eq!(
            version(flights.run("k", b, |i| counting_load(c, 2, i)).await),
            Some(2)
        );
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_reader_that_arrived_before_a_load_finished_joins_it_even_after() {
        let flights = Flights::default();
        let count = Arc::new(AtomicUsize::new(0));
        let a = flights.arrive();
        let late_but_before_the_end = flights.arrive();
        let c = count.clone();
        assert_eq!(
            version(flights.run("k", a, |i| counting_load(c, 1, i)).await),
            Some(1)
        );
        let c = count.clone();
        let joined = flights
            .run("k", late_but_before_the_end, |i| counting_load(c, 2, i))
            .await;
        assert!(
            matches!(joined, Joined::Fresh(_)),
            "its query was sent after this reader arrived"
        );
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_caller_arriving_after_the_query_is_told_it_came_late() {
        let flights = Arc::new(Flights::default());
        let count = Arc::new(AtomicUsize::new(0));
        let (f1, c1) = (flights.clone(), count.clone());
        let a1 = flights.arrive();
        let first = tokio::spawn(async move { f1.run("k", a1, |i| counting_load(c1, 1, i)).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let late = flights.arrive();
        let c2 = count.clone();
        let joined = flights.run("k", late, |i| counting_load(c2, 2, i)).await;
        assert!(matches!(joined, Joined::Late));
        assert_eq!(version(first.await.unwrap()), Some(1));
        assert_eq!(
            count.load(Ordering::SeqCst),
            1,
            "the late caller did not load"
        );
    }

    #[tokio::test]
    async fn a_forgotten_flight_is_not_joined_by_later_callers() {
        let flights = Arc::new(Flights::default());
        let count = Arc::new(AtomicUsize::new(0));
        let (f1, c1) = (flights.clone(), count.clone());
        let a1 = flights.arrive();
        let first = tokio::spawn(async move { f1.run("k", a1, |i| counting_load(c1, 1, i)).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        flights.forget("k");
        let a2 = flights.arrive();
        let second = flights
            .run("k", a2, |i| counting_load(count.clone(), 2, i))
            .await;
        assert_eq!(version(second), Some(2));
        assert_eq!(version(first.await.unwrap()), Some(1));
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_cancelled_first_caller_does_not_cancel_the_load_for_others() {
        let flights = Arc::new(Flights::default());
        let count = Arc::new(AtomicUsize::new(0));
        let (a1, a2) = (flights.arrive(), flights.arrive());
        let (f1, c1) = (flights.clone(), count.clone());
        let first = tokio::spawn(async move { f1.run("k", a1, |i| counting_load(c1, 1, i)).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (f2, c2) = (flights.clone(), count.clone());
        let second =
            tokio::spawn(async move { f2.run("k", a2, |i| counting_load(c2, 2, i)).await });
        tokio::time::sleep(Duration::from_millis(1)).await;
        first.abort();
        assert_eq!(version(second.await.unwrap()), Some(1));
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }
}

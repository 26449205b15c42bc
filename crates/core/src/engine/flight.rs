//! Single flight: concurrent misses on one key share one load.
//!
//! A load is a shared future kept in a map until it finishes; every reader
//! that misses on the key while it is in the map awaits the same future, so
//! one database read serves them all, and the load goes on as long as any
//! of them is still waiting (a cancelled first reader does not cancel it).
//!
//! A write to the key removes its entry as soon as the write commits: a
//! reader that starts after the write was acknowledged must not be handed a
//! load that began before it (that would return the old row, breaking
//! read-your-writes), so it starts a fresh one.

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

#[derive(Default)]
pub(crate) struct Flights {
    map: Arc<Mutex<HashMap<String, (u64, SharedLoad)>>>,
    next_id: AtomicU64,
}

impl Flights {
    /// Awaits the load in flight for `key`, or starts `load` as the new one.
    pub(crate) async fn run(
        &self,
        key: &str,
        load: impl FnOnce() -> BoxFuture<'static, LoadResult>,
    ) -> LoadResult {
        let shared = {
            let mut map = self.map.lock();
            match map.get(key) {
                Some((_, shared)) => shared.clone(),
                None => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let fut = load();
                    let map_ref = Arc::downgrade(&self.map);
                    let owned_key = key.to_owned();
                    // The future removes its own entry when done, whoever polls it last.
                    let shared = async move {
                        let out = fut.await;
                        if let Some(map) = map_ref.upgrade() {
                            let mut map = map.lock();
                            if map.get(&owned_key).is_some_and(|(i, _)| *i == id) {
                                map.remove(&owned_key);
                            }
                        }
                        out
                    }
                    .boxed()
                    .shared();
                    map.insert(key.to_owned(), (id, shared.clone()));
                    shared
                }
            }
        };
        shared.await
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

    fn counting_load(count: Arc<AtomicUsize>, version: u64) -> BoxFuture<'static, LoadResult> {
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(Some(VersionedRow {
                row: Default::default(),
                version,
            }))
        }
        .boxed()
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_load_and_the_entry_is_removed() {
        let flights = Arc::new(Flights::default());
        let count = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (f, c) = (flights.clone(), count.clone());
                tokio::spawn(async move { f.run("k", || counting_load(c, 1)).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().unwrap().version, 1);
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_forgotten_flight_is_not_joined_by_later_callers() {
        let flights = Arc::new(Flights::default());
        let count = Arc::new(AtomicUsize::new(0));
        let f1 = flights.clone();
        let c1 = count.clone();
        let first = tokio::spawn(async move { f1.run("k", || counting_load(c1, 1)).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        flights.forget("k");
        let second = flights
            .run("k", || counting_load(count.clone(), 2))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(second.version, 2);
        assert_eq!(first.await.unwrap().unwrap().unwrap().version, 1);
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_cancelled_first_caller_does_not_cancel_the_load_for_others() {
        let flights = Arc::new(Flights::default());
        let count = Arc::new(AtomicUsize::new(0));
        let f1 = flights.clone();
        let c1 = count.clone();
        let first = tokio::spawn(async move { f1.run("k", || counting_load(c1, 1)).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let f2 = flights.clone();
        let c2 = count.clone();
        let second = tokio::spawn(async move { f2.run("k", || counting_load(c2, 2)).await });
        tokio::time::sleep(Duration::from_millis(1)).await;
        first.abort();
        assert_eq!(second.await.unwrap().unwrap().unwrap().version, 1);
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }
}

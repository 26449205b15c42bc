//! Counters that many threads bump without fighting over one cache line.
//!
//! Every read hit bumps a few counters; with one atomic each, two cores
//! serving hits at once bounce its cache line between them, which costs
//! more than the rest of a hit on an in-process cache. Each thread bumps
//! its own shard instead, and readers add the shards up.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Shards per counter; threads map onto them round-robin.
pub(crate) const SHARDS: usize = 8;

/// This thread's shard.
#[inline]
pub(crate) fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static ID: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    ID.with(|id| *id)
}

#[derive(Default)]
#[repr(align(64))]
struct Line(AtomicU64);

/// A counter split over [`SHARDS`] cache lines.
#[derive(Default)]
pub(crate) struct Sharded([Line; SHARDS]);

impl Sharded {
    /// Adds `n` on this thread's shard.
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.0[shard()].0.fetch_add(n, Ordering::Relaxed);
    }

    /// The sum over the shards.
    pub(crate) fn get(&self) -> u64 {
        self.0.iter().map(|l| l.0.load(Ordering::Relaxed)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_from_many_threads_sum_up() {
        let c = std::sync::Arc::new(Sharded::default());
        let threads: Vec<_> = (0..12)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.add(2);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.get(), 24_000);
    }
}

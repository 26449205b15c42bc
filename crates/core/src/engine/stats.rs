//! Counters of what the engine did, readable at any time.

use super::shard::Sharded;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        #[derive(Default)]
        pub(crate) struct Counters { $(pub(crate) $name: Sharded,)* }

        impl Counters {
            pub(crate) fn snapshot(&self) -> Stats {
                Stats { $($name: self.$name.get(),)* }
            }
        }

        /// What the engine did since it was built.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
        #[non_exhaustive]
        pub struct Stats { $($(#[$doc])* pub $name: u64,)* }
    };
}

counters! {
    /// Reads answered from the cache.
    hits,
    /// Reads that did not find a usable entry in the cache.
    misses,
    /// Rows loaded from the database (or a caller's loader) on a miss.
    loads,
    /// Loaded rows put in the cache.
    populates,
    /// Cache writes refused because the cache held the same or a newer version.
    stale_refused,
    /// Writes (puts, updates, deletes) committed to the database.
    writes,
    /// Cache writes that failed after their retries.
    cache_write_failures,
    /// Failed cache calls of any kind.
    cache_errors,
    /// Failed database calls.
    db_errors,
    /// Cache entries that were not readable (foreign, truncated, old format).
    corrupt_entries,
    /// Keys whose cache entries were repaired by resync.
    resynced,
    /// Outbox records replayed by the reconciler.
    replayed,
    /// Writes made outside the engine (recorded by the triggers of tables
    /// that track them) whose keys this engine repaired in its cache.
    external_repaired,
    /// Recorded external changes this engine's follower read (each is
    /// read once, or twice when its transaction was in flight as a pass
    /// read past it).
    external_read,
    /// Whole-table external changes (`TRUNCATE`) this engine applied.
    external_truncates,
    /// Entries read as misses because they predate a whole-table external
    /// change of their table.
    below_floor_entries,
    /// Loads that took longer than the load deadline and were not cached.
    late_loads,
    /// Cache effects of writes not applied as prepared because their write
    /// deadline had passed; their rows were re-read instead.
    late_effects,
    /// Times this engine found that the cache forgot or went back in time
    /// and moved to a new epoch.
    epoch_changes,
    /// Cache entries read as misses because they were prepared in an
    /// earlier epoch.
    old_epoch_entries,
    /// Runs of an [`crate::Engine::transaction`] closure started again after
    /// a serialization failure, a deadlock or a busy database.
    transaction_retries,
}

impl Counters {
    #[inline]
    pub(crate) fn add(c: &Sharded, n: u64) {
        c.add(n);
    }
}

impl Stats {
    /// Hits over all reads, or 0 before the first read.
    pub fn hit_ratio(&self) -> f64 {
        let reads = self.hits + self.misses;
        if reads == 0 {
            0.0
        } else {
            self.hits as f64 / reads as f64
        }
    }
}

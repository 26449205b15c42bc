//! Audit, repair and warm-up: comparing the cache with the database.

use std::time::Duration;

use super::handle::Handle;
use super::stats::Counters;
use super::{Inner, TableState};
use crate::codec::{self, Decoded};
use crate::entity::Record;
use crate::error::Result;
use crate::value::{Key, VersionedRow};

/// What an audit found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditReport {
    /// Rows compared.
    pub checked: usize,
    /// Rows whose cache entry holds the same version and content.
    pub agree: usize,
    /// Rows with no entry (or a tombstone) in the cache: allowed.
    pub absent: usize,
    /// Rows whose cache entry disagrees with the database (older version,
    /// other content, unreadable bytes), confirmed by a second look.
    pub divergent: Vec<Key>,
    /// Of those, how many were repaired (when asked to).
    pub repaired: usize,
}

enum Verdict {
    Agree,
    Absent,
    Divergent,
}

/// A walk through a table in key order, at most `left` more rows in all,
/// [`PAGE`] rows a query.
struct Pages {
    after: Option<Key>,
    left: usize,
}

/// The most rows one scan asks for.
const PAGE: usize = 500;

impl Inner {
    /// The next page of rows with their keys; empty once the table or the
    /// limit is exhausted.
    async fn next_page(
        &self,
        st: &TableState,
        pages: &mut Pages,
    ) -> Result<Vec<(Key, VersionedRow)>> {
        if pages.left == 0 {
            return Ok(Vec::new());
        }
        let page = pages.left.min(PAGE);
        let rows = self.db().scan(&st.table, pages.after.clone(), page).await?;
        // A short page is the last one.
        pages.left = if rows.len() < page {
            0
        } else {
            pages.left.saturating_sub(rows.len())
        };
        let keyed: Vec<(Key, VersionedRow)> = rows
            .into_iter()
            .map(|vr| {
                let key = st
                    .table
                    .key_of(&vr.row)
                    .expect("scanned rows carry their key");
                (key, vr)
            })
            .collect();
        pages.after = keyed.last().map(|(key, _)| key.clone());
        Ok(keyed)
    }

    fn verdict(&self, st: &TableState, vr: &VersionedRow, cached: Option<&[u8]>) -> Verdict {
        let Some(bytes) = cached else {
            return Verdict::Absent;
        };
        let decoded = codec::decode(bytes);
        if decoded
            .epoch()
            .is_some_and(|e| self.epochs.watched && e < self.epochs.current())
        {
            // Of an earlier epoch: read as a miss, never served.
            return Verdict::Absent;
        }
        match decoded {
            Decoded::Tombstone { version, .. } if version >= vr.version => Verdict::Absent,
            Decoded::Row {
                version,
                codec,
                payload,
                ..
            } if version == vr.version => match codec::decode_row(codec, &st.table, payload) {
                Ok(row) if row == vr.row => Verdict::Agree,
                _ => Verdict::Divergent,
            },
            _ => Verdict::Divergent,
        }
    }
}

impl<R: Record> Handle<R> {
    /// Compares up to `limit` rows (in key order) with their cache entries.
    /// A disagreement is looked at again after `settle` (a write in flight
    /// between its commit and its cache write is not a divergence), and
    /// with `repair` the confirmed ones are rewritten from the database.
    /// Confirmed divergences count in `writethrough_consistency_violations_total`.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// use std::time::Duration;
    /// let report = products.audit(1000, Duration::from_millis(100), true).await?;
    /// println!("{report:?}");
    /// # Ok(()) }
    /// ```
    pub async fn audit(&self, limit: usize, settle: Duration, repair: bool) -> Result<AuditReport> {
        let inner = &self.inner;
        let st = &self.st;
        let mut report = AuditReport::default();
        let mut suspects = Vec::new();
        let mut pages = Pages {
            after: None,
            left: limit,
        };
        loop {
            let rows = inner.next_page(st, &mut pages).await?;
            if rows.is_empty() {
                break;
            }
            let cks: Vec<String> = rows.iter().map(|(key, _)| st.cache_key(key)).collect();
            let cached = inner.cache().get_many(&cks).await?;
            for ((key, vr), c) in rows.iter().zip(&cached) {
                report.checked += 1;
                match inner.verdict(st, vr, c.as_deref()) {
                    Verdict::Agree => report.agree += 1,
                    Verdict::Absent => report.absent += 1,
                    Verdict::Divergent => suspects.push(key.clone()),
                }
            }
        }
        if suspects.is_empty() {
            return Ok(report);
        }
        tokio::time::sleep(settle).await;
        for key in suspects {
            let ck = st.cache_key(&key);
            let epoch = inner.epoch_for_write().await;
            let row = inner.db().get(&st.table, &key).await?;
            let cached = inner.cache().get(&ck).await?;
            let confirmed = match &row {
                Some(vr) => matches!(inner.verdict(st, vr, cached.as_deref()), Verdict::Divergent),
                None => cached.as_deref().is_some_and(|b| {
                    matches!(codec::decode(b), Decoded::Row { .. } | Decoded::Corrupt)
                }),
            };
            if !confirmed {
                continue;
            }
            st.metrics.violations.increment(1);
            report.divergent.push(key.clone());
            if repair {
                // Delete first: the fence would keep an entry at the same
                // version with other content.
                inner.cache().delete(&ck).await?;
                inner.repair(st, &ck, row, 0, epoch).await?;
                Counters::add(&inner.stats.resynced, 1);
                report.repaired += 1;
            }
        }
        Ok(report)
    }

    /// Loads up to `limit` rows (in key order) into the cache, fenced like
    /// any read, one batched cache call per page of 500; returns how many
    /// were written (rows already cached at their version are not).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// let loaded = products.warm(10_000).await?;
    /// println!("{loaded} rows preloaded");
    /// # Ok(()) }
    /// ```
    pub async fn warm(&self, limit: usize) -> Result<usize> {
        let inner = &self.inner;
        let st = &self.st;
        let mut warmed = 0;
        let mut pages = Pages {
            after: None,
            left: limit,
        };
        loop {
            let epoch = inner.epoch_for_write().await;
            let started = std::time::Instant::now();
            let rows = inner.next_page(st, &mut pages).await?;
            if rows.is_empty() {
                break;
            }
            // One fenced batch per page, not a round trip per row.
            let (cks, rows): (Vec<String>, Vec<Option<VersionedRow>>) = rows
                .into_iter()
                .map(|(key, vr)| (st.cache_key(&key), Some(vr)))
                .unzip();
            warmed += inner.populate_many(st, &cks, &rows, started, epoch).await;
        }
        Ok(warmed)
    }
}

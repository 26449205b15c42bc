//! Audit, repair and warm-up: comparing the cache with the database.

use std::collections::HashSet;
use std::time::Duration;

use super::handle::Handle;
use super::stats::Counters;
use super::{Inner, TableState};
use crate::cache::ScanCursor;
use crate::codec::{self, Decoded};
use crate::entity::Record;
use crate::error::{ErrorKind, Result};
use crate::mapping::KeyArg;
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
    /// What each of [`AuditReport::divergent`] was, in the same order.
    pub divergences: Vec<Divergence>,
    /// Of those, how many were repaired (when asked to).
    pub repaired: usize,
    /// The search of the cache for entries whose row the database does not
    /// have (see [`AuditRun::scan_cache`]).
    pub extra_scan: ExtraScan,
    /// The seed of a random sample ([`AuditRun::sampled`]); `None` when
    /// the rows were walked in key order.
    pub sample_seed: Option<u64>,
}

/// How the audit searched the cache for entries without a row: it lists
/// the table's cache keys ([`CacheStore::scan_keys`](crate::backend::CacheStore::scan_keys))
/// and looks up the rows of those keys; an entry whose row is absent is an
/// [`DivergenceKind::Extra`] (a tombstone or an invalidation there is
/// correct: it says "absent").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExtraScan {
    /// Not run: turned off, or the audit stopped before it.
    #[default]
    NotRun,
    /// The keys were listed.
    Done {
        /// Cache keys of the table looked at.
        keys: usize,
        /// Of those, keys that name no key of the table (`ns:t:x` for an
        /// int key): written by something else, never read by the engine,
        /// left alone.
        foreign: usize,
        /// Whether every key was listed; false when the audit's limit
        /// stopped the listing first.
        complete: bool,
    },
    /// The cache cannot list its keys (or refused to): why.
    Skipped(String),
}

impl ExtraScan {
    /// A short description for reports: `12 keys`, `skipped (why)`.
    pub fn describe(&self) -> String {
        match self {
            ExtraScan::NotRun => "not run".to_owned(),
            ExtraScan::Done {
                keys,
                foreign,
                complete,
            } => {
                let mut s = format!("{keys} cache keys looked at");
                if *foreign > 0 {
                    s.push_str(&format!(
                        ", {foreign} not of this table's keys (left alone)"
                    ));
                }
                if !*complete {
                    s.push_str(", stopped at the limit");
                }
                s
            }
            ExtraScan::Skipped(why) => format!("skipped ({why})"),
        }
    }
}

impl AuditReport {
    /// How many confirmed divergences were of `kind`.
    pub fn count(&self, kind: DivergenceKind) -> usize {
        self.divergences.iter().filter(|d| d.kind == kind).count()
    }
}

/// How a cache entry disagrees with its database row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DivergenceKind {
    /// The entry holds an older version of the row than the database.
    Stale,
    /// The entry holds the row's version (or a newer one the database never
    /// committed) with other content.
    Differs,
    /// The entry's bytes cannot be read (a foreign value, a bad checksum).
    Corrupt,
    /// The entry holds a row the database does not have.
    Extra,
}

impl DivergenceKind {
    /// A short name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            DivergenceKind::Stale => "stale",
            DivergenceKind::Differs => "differs",
            DivergenceKind::Corrupt => "corrupt",
            DivergenceKind::Extra => "extra",
        }
    }
}

/// One confirmed divergence.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Divergence {
    /// The row's key.
    pub key: Key,
    /// What was wrong.
    pub kind: DivergenceKind,
    /// The version in the cache entry, when it could be read.
    pub cached_version: Option<u64>,
    /// The row's version in the database; `None` when it has no row.
    pub db_version: Option<u64>,
}

/// How one cache entry compares with its database row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Verdict {
    /// The entry holds the row's version and content.
    Agree,
    /// No entry, a tombstone or invalidation at the row's version or later,
    /// or an entry of an earlier cache epoch (read as a miss): allowed.
    Absent,
    /// The entry disagrees with the database.
    Divergent(DivergenceKind),
}

/// One key's cache entry beside its database row (see [`Handle::inspect`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Inspection {
    /// The full cache key.
    pub cache_key: String,
    /// The entry's bytes, as stored.
    pub entry: Option<bytes::Bytes>,
    /// The committed row and its version.
    pub row: Option<VersionedRow>,
    /// How they compare, as an audit would judge them (one look, no settle).
    pub verdict: Verdict,
}

/// A walk through a table in key order, at most `left` more rows in all,
/// [`PAGE`] rows a query.
struct Pages {
    after: Option<Key>,
    left: usize,
    /// Rows a query asks for, at most [`PAGE`].
    page: usize,
}

impl Pages {
    fn new(limit: usize) -> Self {
        Pages {
            after: None,
            left: limit,
            page: PAGE,
        }
    }
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
        let page = pages.left.min(pages.page);
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

    /// Compares a cache entry with the row the database holds (`None`: no row).
    pub(crate) fn verdict(
        &self,
        st: &TableState,
        row: Option<&VersionedRow>,
        cached: Option<&[u8]>,
    ) -> Verdict {
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
        if decoded.version().is_some_and(|v| v < st.floor()) {
            // From before a whole-table external change: never served.
            return Verdict::Absent;
        }
        let Some(vr) = row else {
            return match decoded {
                Decoded::Row { .. } => Verdict::Divergent(DivergenceKind::Extra),
                Decoded::Corrupt => Verdict::Divergent(DivergenceKind::Corrupt),
                Decoded::Tombstone { .. } => Verdict::Absent,
            };
        };
        match decoded {
            Decoded::Tombstone { version, .. } if version >= vr.version => Verdict::Absent,
            Decoded::Tombstone { .. } => Verdict::Divergent(DivergenceKind::Stale),
            Decoded::Row { version, .. } if version < vr.version => {
                Verdict::Divergent(DivergenceKind::Stale)
            }
            Decoded::Row {
                version,
                codec,
                payload,
                ..
            } if version == vr.version => match codec::decode_row(codec, &st.table, payload) {
                Ok(row) if row == vr.row => Verdict::Agree,
                Ok(_) => Verdict::Divergent(DivergenceKind::Differs),
                Err(_) => Verdict::Divergent(DivergenceKind::Corrupt),
            },
            Decoded::Row { .. } => Verdict::Divergent(DivergenceKind::Differs),
            Decoded::Corrupt => Verdict::Divergent(DivergenceKind::Corrupt),
        }
    }

    /// Looks at one key again: re-reads its row and its entry, and returns
    /// the divergence if it is still there, with the row read.
    pub(crate) async fn recheck(
        &self,
        st: &TableState,
        key: &Key,
    ) -> Result<Option<(Divergence, Option<VersionedRow>)>> {
        let row = self.db().get(&st.table, key).await?;
        let cached = self.cache().get(&st.cache_key(key)).await?;
        let Verdict::Divergent(kind) = self.verdict(st, row.as_ref(), cached.as_deref()) else {
            return Ok(None);
        };
        let divergence = Divergence {
            key: key.clone(),
            kind,
            cached_version: cached.as_deref().and_then(codec::entry_version),
            db_version: row.as_ref().map(|vr| vr.version),
        };
        Ok(Some((divergence, row)))
    }
}

/// Where an audit takes its rows from.
enum Rows {
    /// In key order, a page a query.
    Walk(Pages),
    /// A random sample, read in one query on the first step and handed
    /// out a page at a time.
    Sample {
        seed: u64,
        limit: usize,
        rows: Option<std::collections::VecDeque<VersionedRow>>,
    },
}

/// The audit's listing of the cache keys.
struct KeyScan {
    on: bool,
    /// Where the listing stands; `None` once it is complete.
    cursor: Option<ScanCursor>,
    /// At most this many more keys.
    left: usize,
    keys: usize,
    foreign: usize,
}

/// An audit in progress, driven a page at a time so that a caller can
/// show progress or stop early: [`AuditRun::step`] until it returns 0, then
/// [`AuditRun::finish`], which confirms (and repairs) what the pages found.
/// [`Handle::audit`] does all of it in one call.
///
/// It has two passes. The first compares rows with their entries (the
/// first rows in key order, or a random sample with [`AuditRun::sampled`]).
/// The second ([`AuditRun::scan_cache`], on by default) lists the table's
/// keys in the cache, at most as many as the row limit, and looks for
/// entries whose row the database does not have ([`DivergenceKind::Extra`]);
/// a cache that cannot list its keys is noted in
/// [`AuditReport::extra_scan`], never passed over in silence.
pub struct AuditRun<R: Record> {
    handle: Handle<R>,
    rows: Rows,
    scan: KeyScan,
    settle: Duration,
    repair: bool,
    report: AuditReport,
    suspects: Vec<Key>,
    suspected: HashSet<Key>,
}

impl<R: Record> std::fmt::Debug for AuditRun<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditRun")
            .field("table", self.handle.table().name())
            .field("checked", &self.report.checked)
            .field("scanned", &self.scan.keys)
            .field("suspects", &self.suspects.len())
            .finish_non_exhaustive()
    }
}

impl<R: Record> AuditRun<R> {
    /// Compares a random sample of rows instead of the first ones in key
    /// order: the row limit's worth, picked by the database in one query
    /// ([`DbStore::sample`](crate::backend::DbStore::sample)); the same
    /// `seed` over the same keys picks the same rows. The sample is held
    /// in memory, so keep the limit moderate. Call it before the first step.
    #[must_use]
    pub fn sampled(mut self, seed: u64) -> Self {
        let limit = match &self.rows {
            Rows::Walk(p) => p.left,
            Rows::Sample { limit, .. } => *limit,
        };
        self.rows = Rows::Sample {
            seed,
            limit,
            rows: None,
        };
        self.report.sample_seed = Some(seed);
        self
    }

    /// Whether to list the table's cache keys after the rows, looking for
    /// entries without a row (default true). Call it before the first step.
    #[must_use]
    pub fn scan_cache(mut self, on: bool) -> Self {
        self.scan.on = on;
        self
    }

    /// Compares the next page of rows (at most 500) or, once the rows are
    /// done, looks at the next page of the table's cache keys; returns how
    /// many rows or keys it looked at, 0 once both passes are done.
    pub async fn step(&mut self) -> Result<usize> {
        let rows = self.next_rows().await?;
        if !rows.is_empty() {
            let n = rows.len();
            self.compare_rows(rows).await?;
            return Ok(n);
        }
        self.scan_step().await
    }

    /// Whether the run is in its second pass, over the cache keys.
    pub fn scanning(&self) -> bool {
        match &self.rows {
            Rows::Walk(p) => p.left == 0,
            Rows::Sample { rows, .. } => rows.as_ref().is_some_and(|r| r.is_empty()),
        }
    }

    async fn next_rows(&mut self) -> Result<Vec<(Key, VersionedRow)>> {
        let inner = &self.handle.inner;
        let st = &self.handle.st;
        match &mut self.rows {
            Rows::Walk(pages) => inner.next_page(st, pages).await,
            Rows::Sample { seed, limit, rows } => {
                if rows.is_none() {
                    let picked = inner.db().sample(&st.table, *limit, *seed).await?;
                    *rows = Some(picked.into());
                }
                let rows = rows.as_mut().expect("filled above");
                let n = rows.len().min(PAGE);
                Ok(rows
                    .drain(..n)
                    .filter_map(|vr| Some((st.table.key_of(&vr.row)?, vr)))
                    .collect())
            }
        }
    }

    async fn compare_rows(&mut self, rows: Vec<(Key, VersionedRow)>) -> Result<()> {
        let handle = self.handle.clone();
        let (inner, st) = (&handle.inner, &handle.st);
        let cks: Vec<String> = rows.iter().map(|(key, _)| st.cache_key(key)).collect();
        let cached = inner.cache().get_many(&cks).await?;
        for ((key, vr), c) in rows.into_iter().zip(&cached) {
            self.report.checked += 1;
            match inner.verdict(st, Some(&vr), c.as_deref()) {
                Verdict::Agree => self.report.agree += 1,
                Verdict::Absent => self.report.absent += 1,
                Verdict::Divergent(_) => self.suspect(key),
            }
        }
        Ok(())
    }

    fn suspect(&mut self, key: Key) {
        if self.suspected.insert(key.clone()) {
            self.suspects.push(key);
        }
    }

    /// One page of the cache keys: those whose row is absent and whose
    /// entry is a row (or unreadable) become suspects. Pages that list no
    /// key of the table are skipped over; returns the keys looked at, 0
    /// once the listing is complete, at the limit, or unsupported.
    async fn scan_step(&mut self) -> Result<usize> {
        let handle = self.handle.clone();
        let (inner, st) = (&handle.inner, &handle.st);
        if !self.scan.on || self.scan.left == 0 {
            return Ok(0);
        }
        // The engine's own records (the epoch record) are not entries.
        let internal = format!("{}:_wt:", inner.cfg.namespace);
        loop {
            let Some(cursor) = self.scan.cursor.take() else {
                return Ok(0);
            };
            let page = match inner
                .cache()
                .scan_keys(&st.prefix, cursor, self.scan.left.min(PAGE))
                .await
            {
                Ok(page) => page,
                Err(e) if e.kind() == ErrorKind::Unsupported => {
                    self.scan.left = 0;
                    self.report.extra_scan = ExtraScan::Skipped(e.to_string());
                    return Ok(0);
                }
                Err(e) => return Err(e),
            };
            self.scan.cursor = page.next;
            let mut keys = Vec::new();
            let mut cut = false;
            for ck in page.keys {
                if ck.starts_with(&internal) || !ck.starts_with(&st.prefix) {
                    continue;
                }
                if self.scan.left == 0 {
                    cut = true;
                    break;
                }
                self.scan.left -= 1;
                self.scan.keys += 1;
                match st.key_of_cache_key(&ck) {
                    Some(key) => keys.push(key),
                    None => self.scan.foreign += 1,
                }
            }
            if self.scan.left == 0 && self.scan.cursor.is_some() {
                // At the limit before the listing's end.
                cut = true;
                self.scan.cursor = None;
            }
            self.report.extra_scan = ExtraScan::Done {
                keys: self.scan.keys,
                foreign: self.scan.foreign,
                complete: !cut && self.scan.cursor.is_none(),
            };
            if keys.is_empty() {
                continue;
            }
            let n = keys.len();
            let rows = inner.db().get_many(&st.table, &keys).await?;
            let gone: Vec<Key> = keys
                .into_iter()
                .zip(rows)
                .filter_map(|(k, row)| row.is_none().then_some(k))
                .collect();
            if !gone.is_empty() {
                let cks: Vec<String> = gone.iter().map(|k| st.cache_key(k)).collect();
                let cached = inner.cache().get_many(&cks).await?;
                for (key, c) in gone.into_iter().zip(cached) {
                    if let Verdict::Divergent(_) = inner.verdict(st, None, c.as_deref()) {
                        self.suspect(key);
                    }
                }
            }
            return Ok(n);
        }
    }

    /// Rows compared so far.
    pub fn checked(&self) -> usize {
        self.report.checked
    }

    /// Cache keys looked at so far by the second pass.
    pub fn scanned(&self) -> usize {
        self.scan.keys
    }

    /// Waits `settle` (a write in flight between its commit and its cache
    /// write is not a divergence), looks at each suspect again, counts the
    /// confirmed ones in `writethrough_consistency_violations_total` and,
    /// if asked to, repairs them from the database (an entry whose row is
    /// gone is deleted).
    pub async fn finish(mut self) -> Result<AuditReport> {
        if self.suspects.is_empty() {
            return Ok(self.report);
        }
        let inner = &self.handle.inner;
        let st = &self.handle.st;
        tokio::time::sleep(self.settle).await;
        for key in std::mem::take(&mut self.suspects) {
            let epoch = inner.epoch_for_write().await;
            let Some((divergence, row)) = inner.recheck(st, &key).await? else {
                continue;
            };
            st.metrics.violations.increment(1);
            self.report.divergent.push(key.clone());
            self.report.divergences.push(divergence);
            if self.repair {
                let ck = st.cache_key(&key);
                // Delete first: the fence would keep an entry at the same
                // version with other content.
                inner.cache().delete(&ck).await?;
                inner.repair(st, &ck, row, 0, epoch).await?;
                Counters::add(&inner.stats.resynced, 1);
                self.report.repaired += 1;
            }
        }
        Ok(self.report)
    }
}

/// A warm-up in progress, a page at a time (see [`Handle::warm_run`]).
pub struct WarmRun<R: Record> {
    handle: Handle<R>,
    pages: Pages,
    scanned: usize,
    warmed: usize,
}

impl<R: Record> std::fmt::Debug for WarmRun<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmRun")
            .field("table", self.handle.table().name())
            .field("scanned", &self.scanned)
            .field("warmed", &self.warmed)
            .finish_non_exhaustive()
    }
}

impl<R: Record> WarmRun<R> {
    /// Loads the next page of rows (at most 500) into the cache, fenced like
    /// any read, in one batched cache call; returns how many rows it read,
    /// 0 once the table or the limit is exhausted.
    pub async fn step(&mut self) -> Result<usize> {
        let inner = &self.handle.inner;
        let st = &self.handle.st;
        let epoch = inner.epoch_for_write().await;
        let started = std::time::Instant::now();
        let rows = inner.next_page(st, &mut self.pages).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let n = rows.len();
        let (cks, rows): (Vec<String>, Vec<Option<VersionedRow>>) = rows
            .into_iter()
            .map(|(key, vr)| (st.cache_key(&key), Some(vr)))
            .unzip();
        self.warmed += inner.populate_many(st, &cks, &rows, started, epoch).await;
        self.scanned += n;
        Ok(n)
    }

    /// Reads `rows` rows a page (1 to 500; 500 unless set): smaller pages
    /// let a caller pace the warm-up evenly.
    #[must_use]
    pub fn page_size(mut self, rows: usize) -> Self {
        self.pages.page = rows.clamp(1, PAGE);
        self
    }

    /// Rows read so far.
    pub fn scanned(&self) -> usize {
        self.scanned
    }

    /// Rows written to the cache so far (rows already cached at their
    /// version are not).
    pub fn warmed(&self) -> usize {
        self.warmed
    }
}

impl<R: Record> Handle<R> {
    /// Reads one key's cache entry and its database row and compares them,
    /// changing nothing: what an operator looks at first.
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
    /// let seen = products.inspect(1).await?;
    /// println!("{}: {:?}", seen.cache_key, seen.verdict);
    /// # Ok(()) }
    /// ```
    pub async fn inspect(&self, key: impl KeyArg<R::Key>) -> Result<Inspection> {
        let key = key.into_key()?;
        let cache_key = self.inner.key_for(&self.st, &key)?;
        let row = self.inner.db().get(&self.st.table, &key).await?;
        let entry = self.inner.cache().get(&cache_key).await?;
        let verdict = self.inner.verdict(&self.st, row.as_ref(), entry.as_deref());
        Ok(Inspection {
            cache_key,
            entry,
            row,
            verdict,
        })
    }

    /// How many rows the table holds in the database, counted exactly
    /// ([`DbStore::count`](crate::backend::DbStore::count)): the total of
    /// a progress report.
    pub async fn row_count(&self) -> Result<u64> {
        self.inner.db().count(&self.st.table).await
    }

    /// Compares up to `limit` rows (in key order) with their cache entries,
    /// then lists up to `limit` of the table's keys in the cache and looks
    /// for entries whose row is gone (see [`AuditRun`]).
    /// A disagreement is looked at again after `settle` (a write in flight
    /// between its commit and its cache write is not a divergence), and
    /// with `repair` the confirmed ones are rewritten from the database
    /// (an entry without a row is deleted).
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
        let mut run = self.audit_run(limit, settle, repair);
        while run.step().await? > 0 {}
        run.finish().await
    }

    /// [`Handle::audit`], a page at a time: for progress reports, or to stop
    /// early and still confirm what was found.
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
    /// let mut run = products.audit_run(usize::MAX, Duration::from_millis(100), false);
    /// while run.step().await? > 0 {
    ///     println!("{} rows compared", run.checked());
    /// }
    /// println!("{:?}", run.finish().await?);
    /// # Ok(()) }
    /// ```
    pub fn audit_run(&self, limit: usize, settle: Duration, repair: bool) -> AuditRun<R> {
        AuditRun {
            handle: self.clone(),
            rows: Rows::Walk(Pages::new(limit)),
            scan: KeyScan {
                on: true,
                cursor: Some(ScanCursor::start()),
                left: limit,
                keys: 0,
                foreign: 0,
            },
            settle,
            repair,
            report: AuditReport::default(),
            suspects: Vec::new(),
            suspected: HashSet::new(),
        }
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
        let mut run = self.warm_run(limit);
        while run.step().await? > 0 {}
        Ok(run.warmed())
    }

    /// [`Handle::warm`], a page at a time: for progress reports, a rate
    /// limit between pages, or stopping early.
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
    /// let mut run = products.warm_run(usize::MAX);
    /// while run.step().await? > 0 {
    ///     println!("{} rows read, {} cached", run.scanned(), run.warmed());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn warm_run(&self, limit: usize) -> WarmRun<R> {
        WarmRun {
            handle: self.clone(),
            pages: Pages::new(limit),
            scanned: 0,
            warmed: 0,
        }
    }
}

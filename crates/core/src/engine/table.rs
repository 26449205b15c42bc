//! Per-table settings: TTLs, conditional caching, validation.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::entity::Record;
use crate::schema::Table;
use crate::value::{Key, Row};

type RowPredicate = Arc<dyn Fn(&Row) -> bool + Send + Sync>;
type RowTtl = Arc<dyn Fn(&Row) -> Option<Duration> + Send + Sync>;
pub(crate) type Validator<R> = Arc<dyn Fn(&R) -> Result<(), String> + Send + Sync>;
type Predicate<R> = Arc<dyn Fn(&R) -> bool + Send + Sync>;
type TtlFn<R> = Arc<dyn Fn(&R) -> Option<Duration> + Send + Sync>;

/// How one table is cached. Every setting is optional.
///
/// ```
/// use std::time::Duration;
/// use writethrough_core::{Row, TableOptions, Value};
///
/// let opts = TableOptions::<Row>::new()
///     .ttl(Duration::from_secs(600))
///     // Cache only rows that are not archived; archived ones are read from the database.
///     .cache_if(|row: &Row| row.get("archived") != Some(&Value::Bool(true)))
///     .validate(|row: &Row| match row.get("price") {
///         Some(Value::Float(p)) if *p < 0.0 => Err("price must not be negative".into()),
///         _ => Ok(()),
///     });
/// ```
pub struct TableOptions<R> {
    pub(crate) ttl: Option<Duration>,
    pub(crate) ttl_fn: Option<TtlFn<R>>,
    pub(crate) cache_if: Option<Predicate<R>>,
    pub(crate) validate: Option<Validator<R>>,
    pub(crate) create: bool,
    pub(crate) external: bool,
}

impl<R> Default for TableOptions<R> {
    fn default() -> Self {
        TableOptions {
            ttl: None,
            ttl_fn: None,
            cache_if: None,
            validate: None,
            create: true,
            external: false,
        }
    }
}

impl<R> fmt::Debug for TableOptions<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableOptions")
            .field("ttl", &self.ttl)
            .field("ttl_fn", &self.ttl_fn.is_some())
            .field("cache_if", &self.cache_if.is_some())
            .field("validate", &self.validate.is_some())
            .field("create", &self.create)
            .field("external", &self.external)
            .finish()
    }
}

impl<R: Record> TableOptions<R> {
    /// Default options: the engine's TTL, everything cached, no validation,
    /// the table created if missing.
    pub fn new() -> Self {
        Self::default()
    }

    /// TTL of this table's entries, unless a call or [`TableOptions::ttl_with`] says otherwise.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Computes each entry's TTL from its value; `None` falls back to the table's TTL.
    #[must_use]
    pub fn ttl_with(mut self, f: impl Fn(&R) -> Option<Duration> + Send + Sync + 'static) -> Self {
        self.ttl_fn = Some(Arc::new(f));
        self
    }

    /// Caches only values for which `f` is true. The others are written to
    /// the database, and any cached entry for their key is invalidated.
    #[must_use]
    pub fn cache_if(mut self, f: impl Fn(&R) -> bool + Send + Sync + 'static) -> Self {
        self.cache_if = Some(Arc::new(f));
        self
    }

    /// Checks every value before it is written; an `Err` fails the write with
    /// `ErrorKind::Validation` before anything is written anywhere.
    #[must_use]
    pub fn validate(
        mut self,
        f: impl Fn(&R) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.validate = Some(Arc::new(f));
        self
    }

    /// Whether registering the table creates it in the database when missing
    /// (default true). Either way its columns are checked.
    #[must_use]
    pub fn create_table(mut self, create: bool) -> Self {
        self.create = create;
        self
    }

    /// Whether writes made outside the engine (psql, migrations, other
    /// services, other languages) are tracked (default false). When on,
    /// registering installs database triggers, idempotently and all or
    /// nothing, that give every `INSERT`, `UPDATE` and `DELETE` not made by
    /// an engine a version from the engine's own source and record it in
    /// the change table `_wt_changes` in the same transaction (a
    /// `TRUNCATE` on PostgreSQL is recorded once for the whole table).
    /// Every engine follows that table, woken by PostgreSQL `LISTEN/NOTIFY`
    /// or SQLite's `data_version`, and repairs its cache through the fence
    /// exactly like a replay: it re-reads each changed row and writes it,
    /// or a tombstone. See the README's "Writes made outside the engine"
    /// for the bound and the costs.
    #[must_use]
    pub fn track_external_writes(mut self, on: bool) -> Self {
        self.external = on;
        self
    }

    pub(crate) fn erase(&self, table: &Table) -> (Option<RowPredicate>, Option<RowTtl>) {
        let cache_if = self.cache_if.clone().map(|f| {
            let t = table.clone();
            Arc::new(move |row: &Row| R::from_row(&t, row.clone()).map(|r| f(&r)).unwrap_or(false))
                as RowPredicate
        });
        let ttl_fn = self.ttl_fn.clone().map(|f| {
            let t = table.clone();
            Arc::new(move |row: &Row| R::from_row(&t, row.clone()).ok().and_then(|r| f(&r)))
                as RowTtl
        });
        (cache_if, ttl_fn)
    }
}

/// Options of one write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteOptions {
    /// TTL of this entry, over the table's and the engine's.
    pub ttl: Option<Duration>,
    /// Write the database only, and invalidate the cache entry.
    pub skip_cache: bool,
}

impl WriteOptions {
    /// Default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the TTL of this entry.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Writes the database only and invalidates the cache entry.
    #[must_use]
    pub fn skip_cache(mut self) -> Self {
        self.skip_cache = true;
        self
    }
}

/// A registered table, type-erased: what the engine's background work needs.
pub(crate) struct TableState {
    pub(crate) table: Table,
    /// `{namespace}:{table}:`
    pub(crate) prefix: String,
    pub(crate) ttl: Option<Duration>,
    pub(crate) ttl_fn: Option<RowTtl>,
    pub(crate) cache_if: Option<RowPredicate>,
    pub(crate) metrics: super::metrics::TableMetrics,
    /// Whether writes made outside the engine are followed.
    pub(crate) external: bool,
    /// Entries of a version below this are from before a whole-table
    /// external change (a `TRUNCATE`): read as misses.
    pub(crate) floor: std::sync::atomic::AtomicU64,
}

impl TableState {
    pub(crate) fn cache_key(&self, key: &Key) -> String {
        match key {
            Key::Int(i) => {
                let mut s = String::with_capacity(self.prefix.len() + 20);
                s.push_str(&self.prefix);
                push_int(&mut s, *i);
                s
            }
            Key::Text(t) => {
                let mut s = String::with_capacity(self.prefix.len() + t.len());
                s.push_str(&self.prefix);
                s.push_str(t);
                s
            }
        }
    }

    /// The key a cache key of this table names: `None` for a key outside
    /// the prefix or one that [`TableState::cache_key`] would not write
    /// (`ns:t:007` for an int key, say).
    pub(crate) fn key_of_cache_key(&self, cache_key: &str) -> Option<Key> {
        let rest = cache_key.strip_prefix(self.prefix.as_str())?;
        let key = match self.table.key_column().ty {
            crate::schema::ColumnType::Int => Key::Int(rest.parse().ok()?),
            _ => Key::Text(rest.to_owned()),
        };
        (self.table.check_key(&key).is_ok() && self.cache_key(&key) == cache_key).then_some(key)
    }

    /// The version below which this table's entries are not trusted.
    #[inline]
    pub(crate) fn floor(&self) -> u64 {
        self.floor.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn caches(&self, row: &Row) -> bool {
        self.cache_if.as_ref().is_none_or(|f| f(row))
    }
}

/// Appends `i` in decimal, without the formatting machinery (this is on
/// every read's path).
fn push_int(s: &mut String, i: i64) {
    let mut buf = [0u8; 20];
    let mut n = i.unsigned_abs();
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if i < 0 {
        s.push('-');
    }
    s.push_str(std::str::from_utf8(&buf[at..]).expect("ASCII digits"));
}

#[cfg(test)]
mod tests {
    use super::push_int;

    #[test]
    fn integers_are_written_like_display() {
        for i in [0, 7, -7, 10, 1234567890, i64::MAX, i64::MIN] {
            let mut s = String::new();
            push_int(&mut s, i);
            assert_eq!(s, i.to_string());
        }
    }
}

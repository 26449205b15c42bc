//! Interactive transactions and the write paths of `execute`.

use std::collections::HashSet;
use std::sync::Arc;

use sqlx::postgres::PgConnection;
use writethrough_core::backend::{Transaction, Write, WriteOp, WriteOutcome, async_trait};
use writethrough_core::{Error, ErrorKind, Key, Patch, Result, Row, Table, VersionedRow};

use crate::Shared;
use crate::error::{Phase, RETRY_SQLSTATE, map_err, sqlstate};
use crate::sql::{self, TableSql, Variant, bind, bind_key, query};

/// A write checked against its table's schema, ready to bind.
pub(crate) struct Prepared {
    pub(crate) sql: Arc<TableSql>,
    pub(crate) key: Key,
    pub(crate) op: PreparedOp,
}

pub(crate) enum PreparedOp {
    Upsert(Row),
    Update(Patch),
    Delete,
}

impl Prepared {
    pub(crate) fn table(&self) -> &Table {
        &self.sql.table
    }

    pub(crate) fn lock_text(&self) -> String {
        sql::lock_text(self.table(), &self.key)
    }
}

/// Checks a write before any side effect: rows and patches are normalized
/// (column order, types, NOT NULL), keys checked.
pub(crate) fn prepare(shared: &Shared, w: &Write) -> Result<Prepared> {
    let sql = shared.table_sql(&w.table);
    let t = &w.table;
    let (key, op) = match &w.op {
        WriteOp::Upsert(row) => {
            let (key, row) = t.normalize_row(row.clone())?;
            (key, PreparedOp::Upsert(row))
        }
        WriteOp::Update(key, patch) => {
            t.check_key(key)?;
            (
                key.clone(),
                PreparedOp::Update(t.normalize_patch(patch.clone())?),
            )
        }
        WriteOp::Delete(key) => {
            t.check_key(key)?;
            (key.clone(), PreparedOp::Delete)
        }
    };
    Ok(Prepared { sql, key, op })
}

/// Why [`run_one`] failed.
pub(crate) enum RunError {
    /// The fresh-snapshot check found a row the statement's snapshot
    /// missed; the statement was rolled back and may simply run again.
    Retry,
    /// Anything else.
    Failed(Error),
}

impl From<Error> for RunError {
    fn from(e: Error) -> Self {
        RunError::Failed(e)
    }
}

impl RunError {
    pub(crate) fn into_error(self) -> Error {
        match self {
            RunError::Failed(e) => e,
            RunError::Retry => unexpected("a write kept meeting concurrent inserts of its key"),
        }
    }
}

/// Runs one write as one statement on `conn`.
///
/// With `auto`, the statement is meant to run alone in autocommit: it takes
/// its key lock and checks a miss with a fresh snapshot (it may then fail
/// with [`RunError::Retry`]). Without, the caller's transaction already
/// holds the key lock (upserts take it again, which is free). `phase` says
/// whether a lost connection leaves the outcome unknown.
pub(crate) async fn run_one(
    conn: &mut PgConnection,
    p: &Prepared,
    outbox: bool,
    auto: bool,
    phase: Phase,
) -> std::result::Result<WriteOutcome, RunError> {
    let t = p.table();
    let v = Variant { outbox, auto };
    let enc = p.key.encode();
    let fail = |e: sqlx::Error| {
        if sql_retry(&e) {
            RunError::Retry
        } else {
            RunError::Failed(map_err(e, phase))
        }
    };
    match &p.op {
        PreparedOp::Upsert(row) => {
            let mut q = query(p.sql.upsert(outbox));
            for (col, (_, value)) in t.columns().iter().zip(row.iter()) {
                q = bind(q, col.ty, value, col.name.as_str())?;
            }
            q = q.bind(p.lock_text());
            if outbox {
                q = q.bind(enc);
            }
            let r = q.fetch_one(&mut *conn).await.map_err(fail)?;
            Ok(WriteOutcome {
                version: sql::version(sql::get_i64(&r, 0)?),
                existed: sql::get_bool(&r, 1)?,
                row: None,
                outbox_id: sql::get_opt_i64(&r, 2)?,
            })
        }
        PreparedOp::Update(patch) => {
            let cols = sql::patch_columns(t, patch);
            let text = p.sql.update(cols.clone(), v);
            let mut q = bind_key(query(&text), &p.key);
            if auto {
                q = q.bind(p.lock_text());
            }
            for (&i, (_, value)) in cols.iter().zip(patch.columns().iter()) {
                let col = &t.columns()[i];
                q = bind(q, col.ty, value, col.name.as_str())?;
            }
            if outbox {
                q = q.bind(enc);
            }
            let r = q.fetch_one(&mut *conn).await.map_err(fail)?;
            let found = sql::read_row(t, &r, 3)?;
            Ok(WriteOutcome {
                version: sql::version(sql::get_i64(&r, 0)?),
                existed: found.is_some(),
                row: found.map(|vr| vr.row),
                outbox_id: sql::get_opt_i64(&r, 1)?,
            })
        }
        PreparedOp::Delete => {
            let mut q = bind_key(query(p.sql.delete(v)), &p.key);
            if auto {
                q = q.bind(p.lock_text());
            }
            if outbox {
                q = q.bind(enc);
            }
            let r = q.fetch_one(&mut *conn).await.map_err(fail)?;
            Ok(WriteOutcome {
                version: sql::version(sql::get_i64(&r, 0)?),
                existed: sql::get_bool(&r, 1)?,
                row: None,
                outbox_id: sql::get_opt_i64(&r, 2)?,
            })
        }
    }
}

fn sql_retry(e: &sqlx::Error) -> bool {
    sqlstate(e).as_deref() == Some(RETRY_SQLSTATE)
}

/// Locks the slots of the keys (`lock_text`s) in slot order, in the open
/// transaction on `conn`.
pub(crate) async fn lock_keys(
    conn: &mut PgConnection,
    shared: &Shared,
    keys: Vec<String>,
) -> Result<()> {
    query(&shared.lock_many)
        .bind(keys)
        .execute(&mut *conn)
        .await
        .map(drop)
        .map_err(|e| map_err(e, Phase::NoCommit))
}

/// An interactive transaction on one pooled connection; dropping it rolls back.
pub(crate) struct PgTx {
    pub(crate) tx: sqlx::Transaction<'static, sqlx::Postgres>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) outbox: bool,
    /// Keys (lock texts) whose slot lock this transaction holds.
    pub(crate) locked: HashSet<String>,
}

impl PgTx {
    /// Takes the slot lock of `lock` unless this transaction holds it.
    async fn lock(&mut self, lock: &str) -> Result<()> {
        if !self.locked.contains(lock) {
            lock_keys(&mut self.tx, &self.shared, vec![lock.to_owned()]).await?;
            self.locked.insert(lock.to_owned());
        }
        Ok(())
    }

    async fn select(&mut self, table: &Table, key: &Key) -> Result<Option<VersionedRow>> {
        let sql = self.shared.table_sql(table);
        let r = bind_key(query(&sql.select), key)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(|e| map_err(e, Phase::NoCommit).with_operation("db.get"))?;
        match r {
            Some(r) => sql::read_row(table, &r, 0),
            None => Ok(None),
        }
    }
}

#[async_trait]
impl Transaction for PgTx {
    async fn apply(&mut self, write: &Write) -> Result<WriteOutcome> {
        let p = prepare(&self.shared, write)?;
        let lock = p.lock_text();
        // Updates and deletes must start after the lock is granted (their
        // snapshot would miss a row its holder inserted); upserts lock in
        // their own statement, which the ON CONFLICT check makes safe.
        if !matches!(p.op, PreparedOp::Upsert(_)) {
            self.lock(&lock).await?;
        }
        let out = run_one(&mut self.tx, &p, self.outbox, false, Phase::NoCommit)
            .await
            .map_err(RunError::into_error)
            .map_err(|e| e.with_operation("db.apply").with_key(&p.key))?;
        self.locked.insert(lock);
        Ok(out)
    }

    async fn get(&mut self, table: &Table, key: &Key) -> Result<Option<VersionedRow>> {
        table.check_key(key)?;
        self.select(table, key).await
    }

    /// The key's slot lock (the one its writes take), then a `SELECT`: under
    /// `READ COMMITTED` the statement's snapshot is taken after the lock is
    /// granted, so it sees every write of the key committed before, and no
    /// other write of the key commits until this transaction ends. A
    /// missing row is locked as well as a present one: the lock is on the
    /// key, not the row.
    async fn get_for_update(&mut self, table: &Table, key: &Key) -> Result<Option<VersionedRow>> {
        table.check_key(key)?;
        self.lock(&sql::lock_text(table, key))
            .await
            .map_err(|e| e.with_operation("db.get_for_update").with_key(key))?;
        self.select(table, key).await
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.tx
            .commit()
            .await
            .map_err(|e| map_err(e, Phase::Commit).with_operation("db.commit"))
    }

    async fn rollback(self: Box<Self>) -> Result<()> {
        self.tx
            .rollback()
            .await
            .map_err(|e| map_err(e, Phase::NoCommit).with_operation("db.rollback"))
    }
}

/// Refuses a batch upsert whose rows repeat a key (one statement cannot
/// write a row twice); the caller then takes the general path.
pub(crate) fn distinct_keys(ps: &[Prepared]) -> bool {
    let mut seen = HashSet::with_capacity(ps.len());
    ps.iter().all(|p| seen.insert(&p.key))
}

pub(crate) fn unexpected(msg: &str) -> Error {
    Error::new(ErrorKind::Backend, msg.to_owned()).with_backend("postgres")
}

//! Writes made outside the engine: the triggers that record them, the
//! change table the engines follow, and the `LISTEN` doorbell.
//!
//! # Recognising the engine's own writes
//!
//! Every connection of a [`PostgresStore`](crate::PostgresStore) starts with
//! the session setting `writethrough.engine = on` (a startup parameter: no
//! extra round trip). The row trigger returns at once on such sessions, so
//! the engine's writes keep the versions they drew and are not recorded
//! twice. Any other session (psql, a migration tool, another service) is an
//! external writer.
//!
//! # Versions
//!
//! For an external `INSERT`, `UPDATE` or `DELETE` the row trigger (`BEFORE
//! ... FOR EACH ROW`) takes the key's engine lock (the advisory slot lock of
//! `sql.rs`), draws the version from `_wt_version_seq`, stores it in the
//! row's `_wt_version` and records `(table, key, version)` in `_wt_changes`,
//! all in the writer's transaction. So versions of a key keep increasing in
//! commit order across both kinds of writer, deletes included, exactly as
//! between engine writes. (For `UPDATE` and `DELETE` PostgreSQL locks the
//! row before the trigger runs, so the key lock comes second there; an
//! engine write of a key in the same lock slot that waits for that row can
//! deadlock with it, which PostgreSQL breaks after `deadlock_timeout` by
//! aborting one of the two. Nothing inconsistent commits either way.)
//! An `UPDATE` that changes the key records the old key as well.
//!
//! The recording function is `SECURITY DEFINER` with the installer's
//! `search_path`: an external writer needs no rights on the engine's
//! sequence and change table, only on the table it writes.
//!
//! A `TRUNCATE` is recorded once, by a statement trigger, with a key of
//! `NULL` and a version drawn after every earlier write of the table
//! committed (it waits for them); the table's *floor* in `_wt_floors` is
//! raised to that version, and entries below it read as misses.
//!
//! # Reading in order
//!
//! Each record carries its writer's transaction id (`xid8`); a page is read
//! in one statement together with the snapshot's transactions in flight
//! (`pg_snapshot_xip`), see `writethrough_core`'s follower.
//!
//! # The doorbell
//!
//! The triggers `pg_notify('_wt_changes', table)` (one notification per
//! transaction and table: PostgreSQL folds duplicates). A task holds a
//! `LISTEN` connection and rings the engine's follower; when the connection
//! drops and comes back it rings as well, since notifications sent meanwhile
//! are lost.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row as _};
use writethrough_core::backend::{
    Bells, CHANGES_TABLE, ChangePage, ChangeRange, ExternalChange, VERSION_COLUMN, WeakBells,
};
use writethrough_core::{ColumnType, Error, ErrorKind, Result, Table};

use crate::error::{Phase, map_err};
use crate::sql::{self, LOCK_CLASS, LOCK_SLOTS, SEQ};

/// The session setting that marks the engine's connections.
pub(crate) const ENGINE_SETTING: &str = "writethrough.engine";
/// The channel of the doorbell.
pub(crate) const CHANNEL: &str = "_wt_changes";
/// The row trigger's function and name.
const ROW_FN: &str = "_wt_external_row";
/// The triggers' format, passed as their last argument: a trigger of the
/// engine's with other arguments (an older format) is replaced.
const FORMAT: &str = "wt2";
const ROW_TRIGGER: &str = "_wt_external";
/// The `TRUNCATE` trigger's function and name.
const TRUNCATE_FN: &str = "_wt_external_truncate";
const TRUNCATE_TRIGGER: &str = "_wt_external_truncate";
/// Whole-table change versions, per table.
const FLOORS_TABLE: &str = "_wt_floors";

/// The engine objects the triggers write to; `schema` (already quoted)
/// is where they live.
///
/// The row trigger's `WHEN` settles the engine's own writes with one
/// setting read, without calling the function at all (the executor
/// evaluates it), unless they come from a trigger or a foreign key's
/// cascade (`pg_trigger_depth() > 0`): those are side effects the engine
/// does not know of, and are recorded. The functions are `SECURITY
/// DEFINER` (external writers need no rights on the engine's objects) with
/// `search_path` set to the installing schema and then `pg_temp`, so that
/// no temporary object can stand in for the engine's; trigger functions
/// cannot be called directly. Each takes a transaction id first
/// (`pg_current_xact_id()`), before it draws a record id, so that a
/// follower's snapshot never sees the record's id drawn by a transaction
/// it cannot name as in flight.
pub(crate) fn objects_sql(schema: &str) -> String {
    format!(
        "CREATE SEQUENCE IF NOT EXISTS \"{SEQ}\"; \
         CREATE TABLE IF NOT EXISTS \"{CHANGES_TABLE}\" (\
             id BIGSERIAL PRIMARY KEY, \
             tbl TEXT NOT NULL, \
             key TEXT, \
             version BIGINT NOT NULL, \
             xid xid8 NOT NULL DEFAULT pg_current_xact_id(), \
             created_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()); \
         CREATE INDEX IF NOT EXISTS \"{CHANGES_TABLE}_xid\" ON \"{CHANGES_TABLE}\" (xid); \
         CREATE INDEX IF NOT EXISTS \"{CHANGES_TABLE}_created\" ON \"{CHANGES_TABLE}\" (created_at); \
         CREATE TABLE IF NOT EXISTS \"{FLOORS_TABLE}\" (\
             tbl TEXT PRIMARY KEY, version BIGINT NOT NULL); \
         DROP FUNCTION IF EXISTS \"_wt_record_change\"(text, text, text); \
         CREATE OR REPLACE FUNCTION \"{ROW_FN}\"() RETURNS trigger \
           LANGUAGE plpgsql SECURITY DEFINER SET search_path = {schema}, pg_temp AS $wt$ \
         DECLARE k text; ok text; v bigint; \
         BEGIN \
           PERFORM pg_current_xact_id(); \
           IF TG_OP <> 'INSERT' THEN ok := to_jsonb(OLD) ->> TG_ARGV[0]; END IF; \
           IF TG_OP <> 'DELETE' THEN k := to_jsonb(NEW) ->> TG_ARGV[0]; END IF; \
           IF ok IS NOT NULL AND ok IS DISTINCT FROM k THEN \
             PERFORM {lock_old}; \
             INSERT INTO \"{CHANGES_TABLE}\" (tbl, key, version) \
               VALUES (TG_TABLE_NAME, TG_ARGV[1] || ':' || ok, nextval('\"{SEQ}\"')); \
           END IF; \
           IF k IS NOT NULL THEN \
             PERFORM {lock_new}; \
             v := nextval('\"{SEQ}\"'); \
             INSERT INTO \"{CHANGES_TABLE}\" (tbl, key, version) \
               VALUES (TG_TABLE_NAME, TG_ARGV[1] || ':' || k, v); \
             NEW.\"{VERSION_COLUMN}\" := v; \
           END IF; \
           PERFORM pg_notify('{CHANNEL}', TG_TABLE_NAME); \
           IF TG_OP = 'DELETE' THEN RETURN OLD; END IF; \
           RETURN NEW; \
         END $wt$; \
         CREATE OR REPLACE FUNCTION \"{TRUNCATE_FN}\"() RETURNS trigger \
           LANGUAGE plpgsql SECURITY DEFINER SET search_path = {schema}, pg_temp AS $wt$ \
         DECLARE v bigint; \
         BEGIN \
           PERFORM pg_current_xact_id(); \
           v := nextval('\"{SEQ}\"'); \
           INSERT INTO \"{CHANGES_TABLE}\" (tbl, key, version) VALUES (TG_TABLE_NAME, NULL, v); \
           INSERT INTO \"{FLOORS_TABLE}\" (tbl, version) VALUES (TG_TABLE_NAME, v) \
             ON CONFLICT (tbl) DO UPDATE SET version = GREATEST(\"{FLOORS_TABLE}\".version, EXCLUDED.version); \
           PERFORM pg_notify('{CHANNEL}', TG_TABLE_NAME); \
           RETURN NULL; \
         END $wt$;",
        lock_old = key_lock("TG_TABLE_NAME", "ok"),
        lock_new = key_lock("TG_TABLE_NAME", "k"),
    )
}

/// The engine's key lock (`sql::lock_text` + `sql::slot_of`) of the key
/// text in the plpgsql variable `key` of the table named by `table`.
fn key_lock(table: &str, key: &str) -> String {
    let text = format!("({table} || ':' || {key})");
    format!(
        "pg_advisory_xact_lock({LOCK_CLASS}, (hashtextextended({text}, 0) & {})::int)",
        LOCK_SLOTS - 1
    )
}

/// The two triggers of `t`, as `CREATE TRIGGER` statements.
/// Each: name, function, arguments (as `pg_trigger.tgargs` stores them),
/// `CREATE TRIGGER`.
fn triggers_sql(t: &Table) -> [(&'static str, &'static str, Vec<u8>, String); 2] {
    let name = t.name().quoted();
    let key = t.key_column();
    let kind = match key.ty {
        ColumnType::Int => "i",
        _ => "t",
    };
    [
        (
            ROW_TRIGGER,
            ROW_FN,
            format!("{}\0{kind}\0{FORMAT}\0", key.name.as_str()).into_bytes(),
            format!(
                "CREATE TRIGGER \"{ROW_TRIGGER}\" BEFORE INSERT OR UPDATE OR DELETE ON {name} \
                 FOR EACH ROW WHEN (current_setting('{ENGINE_SETTING}', true) IS DISTINCT FROM 'on' \
                                    OR pg_trigger_depth() > 0) \
                 EXECUTE FUNCTION \"{ROW_FN}\"('{}', '{kind}', '{FORMAT}')",
                // A checked identifier: ASCII letters, digits and '_' only.
                key.name.as_str()
            ),
        ),
        (
            TRUNCATE_TRIGGER,
            TRUNCATE_FN,
            format!("{FORMAT}\0").into_bytes(),
            format!(
                "CREATE TRIGGER \"{TRUNCATE_TRIGGER}\" BEFORE TRUNCATE ON {name} \
                 FOR EACH STATEMENT EXECUTE FUNCTION \"{TRUNCATE_FN}\"('{FORMAT}')"
            ),
        ),
    ]
}

/// Installs the objects and `t`'s triggers in `tx` (the caller holds the
/// DDL lock and commits), checking that a trigger of the same name, if
/// any, is the engine's. Returns the table's floor.
pub(crate) async fn install(tx: &mut sqlx::PgConnection, t: &Table, oid: i64) -> Result<u64> {
    let e = |e| map_err(e, Phase::NoCommit).with_operation("db.track_external");
    let schema: String = sqlx::query_scalar("SELECT quote_ident(current_schema())")
        .fetch_one(&mut *tx)
        .await
        .map_err(e)?;
    sqlx::raw_sql(AssertSqlSafe(objects_sql(&schema)))
        .execute(&mut *tx)
        .await
        .map_err(e)?;
    for (trigger, function, args, create) in triggers_sql(t) {
        let existing: Option<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT p.proname::text, g.tgargs FROM pg_trigger g JOIN pg_proc p ON p.oid = g.tgfoid \
             WHERE g.tgrelid = $1::oid AND g.tgname = $2 AND NOT g.tgisinternal",
        )
        .bind(oid)
        .bind(trigger)
        .fetch_optional(&mut *tx)
        .await
        .map_err(e)?;
        match existing {
            Some((f, a)) if f == function && a == args => {}
            Some((f, _)) if f == function => {
                // The engine's, of an older format: replaced.
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "DROP TRIGGER \"{trigger}\" ON {}; {create}",
                    t.name().quoted()
                )))
                .execute(&mut *tx)
                .await
                .map_err(e)?;
            }
            Some((other, _)) => {
                return Err(Error::new(
                    ErrorKind::SchemaMismatch,
                    format!(
                        "table {} has a trigger named {trigger:?} that runs {other:?}, not the \
                         engine's {function:?}: rename or drop it to track writes made outside \
                         the engine",
                        t.name()
                    ),
                )
                .with_backend("postgres")
                .with_operation("db.track_external"));
            }
            None => {
                sqlx::raw_sql(AssertSqlSafe(create))
                    .execute(&mut *tx)
                    .await
                    .map_err(e)?;
            }
        }
    }
    let floor: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT version FROM \"{FLOORS_TABLE}\" WHERE tbl = $1"
    )))
    .bind(t.name().as_str())
    .fetch_optional(&mut *tx)
    .await
    .map_err(e)?;
    Ok(floor.map_or(0, sql::version))
}

/// One page of recorded changes, with the page's horizon, in one statement.
pub(crate) async fn changes(
    pool: &sqlx::PgPool,
    tables: &[String],
    range: ChangeRange<'_>,
    limit: usize,
) -> Result<ChangePage> {
    let e = |e| map_err(e, Phase::NoCommit).with_operation("db.external_changes");
    let positions: Option<Vec<i64>> = range.positions.map(|p| {
        p.iter()
            .map(|&x| i64::try_from(x).unwrap_or(i64::MAX))
            .collect()
    });
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT (SELECT coalesce(array_agg(x::text::bigint), '{{}}'::bigint[]) \
                 FROM pg_snapshot_xip(pg_current_snapshot()) AS x), \
                (SELECT coalesce(max(id), 0) FROM \"{CHANGES_TABLE}\"), \
                c.id, c.tbl, c.key, c.version, c.xid::text::bigint \
         FROM (SELECT 1) AS one LEFT JOIN LATERAL (\
             SELECT id, tbl, key, version, xid FROM \"{CHANGES_TABLE}\" \
             WHERE id > $1 AND id <= $2 AND tbl = ANY($3) \
               AND ($4::bigint[] IS NULL OR xid = ANY(($4::bigint[]::text[])::xid8[])) \
             ORDER BY id LIMIT $5) AS c ON true \
         ORDER BY c.id"
    )))
    .bind(range.after)
    .bind(range.upto)
    .bind(tables)
    .bind(positions)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await
    .map_err(e)?;
    let mut page = ChangePage::default();
    for r in &rows {
        let in_flight: Vec<i64> = r.try_get(0).map_err(e)?;
        page.in_flight = in_flight.into_iter().map(sql::version).collect();
        page.max_id = r.try_get(1).map_err(e)?;
        let Some(id) = r.try_get::<Option<i64>, _>(2).map_err(e)? else {
            continue;
        };
        let key: Option<String> = r.try_get(4).map_err(e)?;
        let Some(key) = ExternalChange::record_key(id, key.as_deref()) else {
            continue;
        };
        page.changes.push(ExternalChange {
            id,
            table: r.try_get(3).map_err(e)?,
            key,
            version: sql::version(r.try_get(5).map_err(e)?),
            position: sql::version(r.try_get(6).map_err(e)?),
        });
    }
    Ok(page)
}

/// Removes records older than `age`.
pub(crate) async fn prune(pool: &sqlx::PgPool, age: Duration) -> Result<u64> {
    let done = sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM \"{CHANGES_TABLE}\" WHERE created_at < now() - make_interval(secs => $1)"
    )))
    .bind(age.as_secs_f64())
    .execute(pool)
    .await
    .map_err(|e| map_err(e, Phase::Commit).with_operation("db.prune_external_changes"))?;
    Ok(done.rows_affected())
}

/// Listens on the doorbell's channel on its own connection (not one of
/// the pool's) for as long as the store lives, ringing every follower on
/// every notification and after every reconnect.
pub(crate) async fn listen(options: PgConnectOptions, bells: WeakBells) {
    // A pool of one that is never shared: PgListener reconnects through it.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(options);
    while bells.alive() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(err) => {
                tracing::debug!(error = %err, "LISTEN connection failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if let Err(err) = listener.listen(CHANNEL).await {
            tracing::debug!(error = %err, "LISTEN failed; retrying");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        // Whatever was sent before this LISTEN is lost: look now.
        if !bells.ring() {
            return;
        }
        loop {
            // `try_recv` answers `None` when the connection dropped (the
            // next call reconnects): notifications sent meanwhile are lost.
            let got = tokio::time::timeout(Duration::from_secs(5), listener.try_recv()).await;
            let alive = match got {
                Err(_) => bells.alive(),
                Ok(Ok(_)) => bells.ring(),
                Ok(Err(err)) => {
                    tracing::debug!(error = %err, "LISTEN connection lost; reconnecting");
                    bells.ring();
                    break;
                }
            };
            if !alive {
                return;
            }
        }
    }
}

/// The doorbell of a store: its listener starts with the first tracked
/// table; every follower subscribes.
#[derive(Default)]
pub(crate) struct Doorbell {
    bells: Bells,
    started: std::sync::OnceLock<()>,
}

impl Doorbell {
    /// Starts the listener if it is not running.
    pub(crate) fn start(&self, options: PgConnectOptions) {
        self.started.get_or_init(|| {
            tokio::spawn(listen(options, self.bells.downgrade()));
        });
    }

    /// A new follower's bell, once the listener runs.
    pub(crate) fn subscribe(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.started.get().map(|()| self.bells.subscribe())
    }
}

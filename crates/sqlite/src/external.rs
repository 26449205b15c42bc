//! Writes made outside the engine: the triggers that record them, the
//! change table the engines follow, and the `data_version` doorbell.
//!
//! Every connection of a [`SqliteStore`](crate::SqliteStore) attaches an
//! empty in-memory database named `_wt_engine`; the triggers run only on
//! connections without it (`pragma_database_list`), so the engine's own
//! writes keep their versions and are not recorded twice, while any other
//! connection (the `sqlite3` shell, another program, another language) is an
//! external writer. SQLite runs one writer at a time, so a trigger can draw
//! the version from the engine's own counter (`_wt_seq`) without locks, and
//! record ids follow commit order: nothing is ever in flight.
//!
//! The triggers test the version before the mark: an engine write of one
//! row carries the counter's current value, which settles it without
//! reading `pragma_database_list`. (So an external write that sets
//! `_wt_version` to exactly the counter's current value, non-zero, is taken
//! for the engine's.)
//!
//! SQLite has no `TRUNCATE`: a `DELETE` without `WHERE` fires the row
//! trigger for every row (the truncate optimisation is off for tables with
//! triggers).

use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension};
use writethrough_core::backend::{
    Bells, CHANGES_TABLE, ChangePage, ChangeRange, ExternalChange, VERSION_COLUMN, WeakBells,
};
use writethrough_core::{ColumnType, Error, ErrorKind, Result, Table};

use crate::sql::{SEQ_TABLE, engine_tables_sql, map_err, now_ms, table_exists};

/// In every trigger the engine installs: an older version of the
/// engine's trigger is replaced, anything else of the name refused.
const MARKER: &str = "/* writethrough external writes */";

/// The name every engine connection attaches an empty database as.
pub(crate) const ENGINE_MARK: &str = "_wt_engine";

/// Attaches the mark on an engine connection.
pub(crate) fn mark(conn: &Connection) -> Result<()> {
    conn.execute_batch(&format!("ATTACH DATABASE ':memory:' AS \"{ENGINE_MARK}\""))
        .map_err(map_err)
}

fn changes_sql() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS \"{CHANGES_TABLE}\" (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             tbl TEXT NOT NULL,
             key TEXT,
             version INTEGER NOT NULL,
             created_ms INTEGER NOT NULL
         ) STRICT;"
    )
}

/// The triggers of `t`: `(name, CREATE TRIGGER statement)`.
fn triggers(t: &Table) -> Vec<(String, String)> {
    let name = t.name().as_str();
    let q = t.name().quoted();
    let key = t.key_column().name.quoted();
    let kind = if t.key_column().ty == ColumnType::Int {
        "i"
    } else {
        "t"
    };
    let external =
        format!("NOT EXISTS (SELECT 1 FROM pragma_database_list WHERE name = '{ENGINE_MARK}')");
    let current = format!("(SELECT v FROM \"{SEQ_TABLE}\" WHERE id = 1)");
    let bump = format!("UPDATE \"{SEQ_TABLE}\" SET v = v + 1 WHERE id = 1;");
    let now = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";
    let record = |row: &str, only_if: &str| {
        format!(
            "INSERT INTO \"{CHANGES_TABLE}\" (tbl, key, version, created_ms) \
             SELECT '{name}', '{kind}:' || {row}.{key}, {current}, {now}{only_if};"
        )
    };
    let stamp = format!("UPDATE {q} SET \"{VERSION_COLUMN}\" = {current} WHERE {key} = NEW.{key};");
    vec![
        (
            format!("_wt_ext_ins_{name}"),
            format!(
                "CREATE TRIGGER \"_wt_ext_ins_{name}\" AFTER INSERT ON {q} \
                 WHEN (NEW.\"{VERSION_COLUMN}\" = 0 OR NEW.\"{VERSION_COLUMN}\" IS NOT {current}) \
                 AND {external} \
                 BEGIN {MARKER} {bump} {stamp} {} END",
                record("NEW", "")
            ),
        ),
        (
            // The stamp's own UPDATE changes the version to the counter,
            // which the WHEN refuses: no recursion even with
            // recursive_triggers on. An external UPDATE leaves the version
            // as it was (or sets another). The version test comes first:
            // it settles a single engine write (whose version is the
            // counter) without reading `pragma_database_list`.
            format!("_wt_ext_upd_{name}"),
            format!(
                "CREATE TRIGGER \"_wt_ext_upd_{name}\" AFTER UPDATE ON {q} \
                 WHEN (OLD.\"{VERSION_COLUMN}\" IS NEW.\"{VERSION_COLUMN}\" \
                      OR NEW.\"{VERSION_COLUMN}\" IS NOT {current}) AND {external} \
                 BEGIN {MARKER} {bump} {} {bump} {stamp} {} END",
                record("OLD", &format!(" WHERE OLD.{key} IS NOT NEW.{key}")),
                record("NEW", "")
            ),
        ),
        (
            format!("_wt_ext_del_{name}"),
            format!(
                "CREATE TRIGGER \"_wt_ext_del_{name}\" AFTER DELETE ON {q} WHEN {external} \
                 BEGIN {MARKER} {bump} {} END",
                record("OLD", "")
            ),
        ),
    ]
}

/// Installs the change table and `t`'s triggers in one transaction (on the
/// writer's connection), all or nothing. A trigger of one of the engine's
/// names that is not the engine's is refused.
pub(crate) fn install(conn: &Connection, t: &Table) -> Result<u64> {
    let run = || -> Result<()> {
        conn.execute_batch(&engine_tables_sql()).map_err(map_err)?;
        conn.execute_batch(&changes_sql()).map_err(map_err)?;
        for (name, create) in triggers(t) {
            let existing: Option<String> = conn
                .query_row(
                    "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?1",
                    [&name],
                    |r| r.get(0),
                )
                .optional()
                .map_err(map_err)?;
            match existing {
                Some(sql) if sql == create => {}
                Some(sql) if sql.contains(MARKER) => {
                    conn.execute_batch(&format!("DROP TRIGGER \"{name}\"; {create}"))
                        .map_err(map_err)?;
                }
                Some(_) => {
                    return Err(Error::new(
                        ErrorKind::SchemaMismatch,
                        format!(
                            "a trigger named {name:?} exists that is not the engine's: rename \
                             or drop it to track writes made outside the engine on table {}",
                            t.name()
                        ),
                    )
                    .with_backend("sqlite")
                    .with_operation("db.track_external"));
                }
                None => conn.execute_batch(&create).map_err(map_err)?,
            }
        }
        Ok(())
    };
    conn.execute_batch("BEGIN IMMEDIATE").map_err(map_err)?;
    match run() {
        Ok(()) => {
            conn.execute_batch("COMMIT").map_err(map_err)?;
            Ok(0)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// One page of recorded changes of `tables` in `range`, in one
/// statement. SQLite's writers are serial: record ids follow commit order,
/// nothing is ever in flight, and every position is 0.
pub(crate) fn changes(
    conn: &Connection,
    tables: &[String],
    range: ChangeRange<'_>,
    limit: usize,
) -> Result<ChangePage> {
    let names = serde_json::to_string(tables)
        .map_err(|e| Error::new(ErrorKind::Codec, "table names").with_source(e))?;
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT (SELECT coalesce(max(id), 0) FROM \"{CHANGES_TABLE}\"), \
                    c.id, c.tbl, c.key, c.version \
             FROM (SELECT 1) AS one LEFT JOIN (\
                 SELECT id, tbl, key, version FROM \"{CHANGES_TABLE}\" \
                 WHERE id > ?1 AND id <= ?2 AND tbl IN (SELECT value FROM json_each(?3)) \
                 ORDER BY id LIMIT ?4) AS c \
             ORDER BY c.id"
        ))
        .map_err(map_err)?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = stmt
        .query_map(
            rusqlite::params![range.after, range.upto, names, limit],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                ))
            },
        )
        .map_err(map_err)?;
    // Changes of given transactions: none is ever in flight here.
    let wanted = range.positions.is_none_or(|p| p.contains(&0));
    let mut page = ChangePage::default();
    for row in rows {
        let (max_id, id, table, key, version) = row.map_err(map_err)?;
        page.max_id = max_id;
        let (Some(id), Some(table), Some(version), true) = (id, table, version, wanted) else {
            continue;
        };
        let Some(key) = ExternalChange::record_key(id, key.as_deref()) else {
            continue;
        };
        page.changes.push(ExternalChange {
            id,
            table,
            key,
            version: version.max(0) as u64,
            position: 0,
        });
    }
    Ok(page)
}

/// Removes records older than `age`.
pub(crate) fn prune(conn: &Connection, age: Duration) -> Result<u64> {
    if !table_exists(conn, CHANGES_TABLE)? {
        return Ok(0);
    }
    let cutoff = now_ms().saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX));
    let n = conn
        .execute(
            &format!("DELETE FROM \"{CHANGES_TABLE}\" WHERE created_ms < ?1"),
            [cutoff],
        )
        .map_err(map_err)?;
    Ok(n as u64)
}

/// How often the doorbell reads `PRAGMA data_version`.
const POLL: Duration = Duration::from_millis(10);

/// Polls `PRAGMA data_version` on its own connection (which changes when
/// another connection commits) and rings every follower on a change, for
/// as long as the store lives.
pub(crate) fn poll_data_version(conn: Connection, bells: WeakBells) {
    let read = |c: &Connection| c.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0));
    let mut last = read(&conn).ok();
    while bells.alive() {
        std::thread::sleep(POLL);
        let now = read(&conn).ok();
        if now != last || now.is_none() {
            bells.ring();
            last = now;
        }
    }
}

/// The store's doorbell, started with the first tracked table; every
/// follower subscribes.
#[derive(Default)]
pub(crate) struct Doorbell {
    bells: Bells,
    started: std::sync::Mutex<bool>,
}

impl Doorbell {
    /// Starts the poller (on `open()`'s connection) unless it runs.
    pub(crate) fn start(&self, open: impl FnOnce() -> Result<Connection>) -> Result<()> {
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        if *started {
            return Ok(());
        }
        let conn = open()?;
        let weak = self.bells.downgrade();
        std::thread::Builder::new()
            .name("wt-sqlite-doorbell".into())
            .spawn(move || poll_data_version(conn, weak))
            .map_err(|e| {
                Error::new(ErrorKind::Unavailable, "cannot start a SQLite thread").with_source(e)
            })?;
        *started = true;
        Ok(())
    }

    /// A new follower's bell, once the poller runs.
    pub(crate) fn subscribe(&self) -> Option<Arc<tokio::sync::Notify>> {
        let started = *self.started.lock().unwrap_or_else(|p| p.into_inner());
        started.then(|| self.bells.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use writethrough_core::{ColumnType, Key};

    fn table() -> Table {
        Table::builder("things")
            .key("id", ColumnType::Int)
            .column("qty", ColumnType::Int)
            .build()
            .unwrap()
    }

    /// An engine connection's writes are not recorded; a plain
    /// connection's are, with versions from the engine's counter.
    #[test]
    fn plain_connections_are_recorded_and_engine_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let engine = Connection::open(&path).unwrap();
        mark(&engine).unwrap();
        engine.execute_batch(&engine_tables_sql()).unwrap();
        engine
            .execute_batch(
                "CREATE TABLE things (id INTEGER PRIMARY KEY, qty INTEGER NOT NULL, \
                 _wt_version INTEGER NOT NULL DEFAULT 0) STRICT",
            )
            .unwrap();
        install(&engine, &table()).unwrap();
        // Idempotent.
        install(&engine, &table()).unwrap();
        engine
            .execute(
                "INSERT INTO things (id, qty, _wt_version) VALUES (1, 1, 5)",
                [],
            )
            .unwrap();
        let plain = Connection::open(&path).unwrap();
        plain
            .execute("UPDATE things SET qty = 2 WHERE id = 1", [])
            .unwrap();
        plain
            .execute("INSERT INTO things (id, qty) VALUES (2, 20)", [])
            .unwrap();
        plain
            .execute("UPDATE things SET id = 3 WHERE id = 2", [])
            .unwrap();
        plain
            .execute("DELETE FROM things WHERE id = 1", [])
            .unwrap();
        let all = ChangeRange {
            after: 0,
            upto: i64::MAX,
            positions: None,
        };
        let page = changes(&engine, &["things".to_owned()], all, 100).unwrap();
        let got: Vec<(Option<Key>, u64)> = page
            .changes
            .iter()
            .map(|c| (c.key.clone(), c.version))
            .collect();
        let keys: Vec<Option<Key>> = got.iter().map(|g| g.0.clone()).collect();
        assert_eq!(
            keys,
            vec![
                Some(Key::Int(1)),
                Some(Key::Int(2)),
                Some(Key::Int(2)),
                Some(Key::Int(3)),
                Some(Key::Int(1))
            ],
            "{got:?}"
        );
        assert!(got.windows(2).all(|w| w[0].1 < w[1].1), "{got:?}");
        let v3: i64 = plain
            .query_row("SELECT _wt_version FROM things WHERE id = 3", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(v3 as u64, got[3].1);
        assert_eq!(page.max_id, page.changes.last().unwrap().id);
        assert!(page.in_flight.is_empty());
    }

    /// A trigger of an older engine version (the marker, another body) is
    /// replaced; a foreign one of the same name is refused.
    #[test]
    fn older_engine_triggers_are_replaced_and_foreign_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("t.db")).unwrap();
        mark(&conn).unwrap();
        conn.execute_batch(&engine_tables_sql()).unwrap();
        conn.execute_batch(
            "CREATE TABLE things (id INTEGER PRIMARY KEY, qty INTEGER NOT NULL, \
             _wt_version INTEGER NOT NULL DEFAULT 0) STRICT",
        )
        .unwrap();
        conn.execute_batch(&format!(
            "CREATE TRIGGER \"_wt_ext_del_things\" AFTER DELETE ON things BEGIN {MARKER} SELECT 1; END"
        ))
        .unwrap();
        install(&conn, &table()).unwrap();
        let sql: String = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE name = '_wt_ext_del_things'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(sql.contains("_wt_changes"), "{sql}");
        conn.execute_batch(
            "DROP TRIGGER \"_wt_ext_ins_things\"; \
             CREATE TRIGGER \"_wt_ext_ins_things\" AFTER INSERT ON things BEGIN SELECT 1; END",
        )
        .unwrap();
        let e = install(&conn, &table()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::SchemaMismatch);
    }
}

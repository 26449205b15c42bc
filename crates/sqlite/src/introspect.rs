//! Reading schemas and the outbox from the catalog, for operators' tools
//! that know no Rust types (the `writethrough` command line).
//!
//! SQLite stores booleans as integers and JSON as text, so a table read
//! back here has `int` columns where the engine declared `bool`, and
//! `text` where it declared `json`.

use std::time::Duration;

use rusqlite::Connection;
use writethrough_core::backend::{OUTBOX_TABLE, OutboxSummary, VERSION_COLUMN};
use writethrough_core::{ColumnType, Error, ErrorKind, Ident, Result, Table};

use crate::sql::{self, map_err};

fn schema_err(msg: String) -> Error {
    Error::new(ErrorKind::SchemaMismatch, msg).with_backend("sqlite")
}

/// The column type of a declared SQLite type, by its affinity.
fn column_type(declared: &str) -> Option<ColumnType> {
    let d = declared.to_ascii_uppercase();
    if d.contains("INT") {
        Some(ColumnType::Int)
    } else if d.contains("CHAR") || d.contains("CLOB") || d.contains("TEXT") {
        Some(ColumnType::Text)
    } else if d.contains("BLOB") {
        Some(ColumnType::Bytes)
    } else if d.contains("REAL") || d.contains("FLOA") || d.contains("DOUB") {
        Some(ColumnType::Float)
    } else {
        None
    }
}

pub(crate) fn describe_table(conn: &Connection, name: &str) -> Result<Table> {
    Ident::new(name)?;
    let mut stmt = conn
        .prepare_cached(
            "SELECT name, type, \"notnull\", pk FROM pragma_table_info(?1) ORDER BY cid",
        )
        .map_err(map_err)?;
    let cols: Vec<(String, String, bool, i64)> = stmt
        .query_map([name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .map_err(map_err)?
        .collect::<rusqlite::Result<_>>()
        .map_err(map_err)?;
    if cols.is_empty() {
        return Err(schema_err(format!("no table {name} in the database")));
    }
    if !cols.iter().any(|(n, ..)| n == VERSION_COLUMN) {
        return Err(schema_err(format!(
            "table {name} has no {VERSION_COLUMN} column: no engine manages it"
        )));
    }
    let keys: Vec<_> = cols.iter().filter(|c| c.3 > 0).collect();
    let [(key, key_sql, ..)] = keys.as_slice() else {
        return Err(schema_err(format!(
            "table {name} has no single-column primary key to key it by"
        )));
    };
    let typed = |col: &str, sql: &str| {
        column_type(sql).ok_or_else(|| {
            schema_err(format!(
                "column {name}.{col} is declared {sql:?}, a type the engine does not map"
            ))
        })
    };
    let mut b = Table::builder(name).key(key, typed(key, key_sql)?);
    for (col, sql, not_null, pk) in &cols {
        if *pk > 0 || col == VERSION_COLUMN {
            continue;
        }
        b = b.column_with(col, typed(col, sql)?, !*not_null);
    }
    b.build()
}

pub(crate) fn managed_tables(conn: &Connection) -> Result<Vec<String>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT m.name FROM sqlite_master m, pragma_table_info(m.name) p \
             WHERE m.type = 'table' AND p.name = ?1 ORDER BY 1",
        )
        .map_err(map_err)?;
    stmt.query_map([VERSION_COLUMN], |r| r.get(0))
        .map_err(map_err)?
        .collect::<rusqlite::Result<_>>()
        .map_err(map_err)
}

pub(crate) fn outbox_summary(conn: &Connection) -> Result<Vec<OutboxSummary>> {
    if !sql::table_exists(conn, OUTBOX_TABLE)? {
        return Ok(Vec::new());
    }
    let now = sql::now_ms();
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT tbl, count(*), min(created_ms) FROM \"{OUTBOX_TABLE}\" GROUP BY tbl ORDER BY tbl"
        ))
        .map_err(map_err)?;
    stmt.query_map([], |r| {
        let (t, n, oldest): (String, i64, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
        let age = u64::try_from(now.saturating_sub(oldest)).unwrap_or(0);
        Ok(OutboxSummary::new(
            t,
            u64::try_from(n).unwrap_or(0),
            Duration::from_millis(age),
        ))
    })
    .map_err(map_err)?
    .collect::<rusqlite::Result<_>>()
    .map_err(map_err)
}

//! Reading schemas and the outbox from the catalog, for operators' tools
//! that know no Rust types (the `writethrough` command line).

use std::time::Duration;

use sqlx::postgres::PgPool;
use writethrough_core::backend::{OUTBOX_TABLE, OutboxSummary, VERSION_COLUMN};
use writethrough_core::{ColumnType, Error, ErrorKind, Ident, Result, Table};

use crate::error::{Phase, map_err};

fn db_err(op: &'static str) -> impl Fn(sqlx::Error) -> Error {
    move |e| map_err(e, Phase::NoCommit).with_operation(op)
}

fn schema_err(msg: String) -> Error {
    Error::new(ErrorKind::SchemaMismatch, msg).with_backend("postgres")
}

/// The column type a PostgreSQL type (as `format_type` names it) holds.
fn column_type(sql: &str) -> Option<ColumnType> {
    [
        ColumnType::Bool,
        ColumnType::Int,
        ColumnType::Float,
        ColumnType::Text,
        ColumnType::Bytes,
        ColumnType::Json,
    ]
    .into_iter()
    .find(|&ty| crate::sql::accepted_types(ty).contains(&sql))
}

pub(crate) async fn describe_table(pool: &PgPool, name: &str) -> Result<Table> {
    let ident = Ident::new(name)?;
    let e = db_err("db.describe_table");
    let oid: Option<i64> = sqlx::query_scalar("SELECT to_regclass($1)::oid::bigint")
        .bind(ident.quoted())
        .fetch_one(pool)
        .await
        .map_err(&e)?;
    let Some(oid) = oid else {
        return Err(schema_err(format!("no table {name} in the database")));
    };
    let cols: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT attname::text, format_type(atttypid, NULL), attnotnull FROM pg_attribute \
         WHERE attrelid = $1::oid AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    .bind(oid)
    .fetch_all(pool)
    .await
    .map_err(&e)?;
    if !cols.iter().any(|(n, _, _)| n == VERSION_COLUMN) {
        return Err(schema_err(format!(
            "table {name} has no {VERSION_COLUMN} column: no engine manages it"
        )));
    }
    let key: Option<String> = sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_index i \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
         WHERE i.indrelid = $1::oid AND i.indisunique AND i.indnkeyatts = 1 \
         AND i.indpred IS NULL AND i.indexprs IS NULL \
         ORDER BY i.indisprimary DESC LIMIT 1",
    )
    .bind(oid)
    .fetch_optional(pool)
    .await
    .map_err(&e)?;
    let Some(key) = key else {
        return Err(schema_err(format!(
            "table {name} has no primary key or single-column unique index to key it by"
        )));
    };
    let typed = |col: &str, sql: &str| {
        column_type(sql).ok_or_else(|| {
            schema_err(format!(
                "column {name}.{col} is {sql}, a type the engine does not map"
            ))
        })
    };
    let (_, key_sql, _) = cols
        .iter()
        .find(|(n, _, _)| *n == key)
        .ok_or_else(|| schema_err(format!("key column {name}.{key} is not in the table")))?;
    let mut b = Table::builder(name).key(&key, typed(&key, key_sql)?);
    for (col, sql, not_null) in &cols {
        if *col == key || col == VERSION_COLUMN {
            continue;
        }
        b = b.column_with(col, typed(col, sql)?, !*not_null);
    }
    b.build()
}

pub(crate) async fn managed_tables(pool: &PgPool) -> Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid \
         WHERE c.relkind IN ('r', 'p') AND a.attname = $1 AND NOT a.attisdropped \
         AND pg_table_is_visible(c.oid) ORDER BY 1",
    )
    .bind(VERSION_COLUMN)
    .fetch_all(pool)
    .await
    .map_err(db_err("db.managed_tables"))
}

pub(crate) async fn outbox_summary(pool: &PgPool) -> Result<Vec<OutboxSummary>> {
    let e = db_err("db.outbox_summary");
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("\"{OUTBOX_TABLE}\""))
        .fetch_one(pool)
        .await
        .map_err(&e)?;
    if !exists {
        return Ok(Vec::new());
    }
    let rows: Vec<(String, i64, f64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT tbl, count(*), \
         GREATEST(extract(epoch FROM now() - min(created_at)), 0)::float8 \
         FROM \"{OUTBOX_TABLE}\" GROUP BY tbl ORDER BY tbl"
    )))
    .fetch_all(pool)
    .await
    .map_err(&e)?;
    Ok(rows
        .into_iter()
        .map(|(t, n, age)| {
            OutboxSummary::new(
                t,
                u64::try_from(n).unwrap_or(0),
                Duration::try_from_secs_f64(age).unwrap_or_default(),
            )
        })
        .collect())
}

//! Table schemas, and the checks that keep rows that do not fit them away
//! from both stores.

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::value::{Ident, Key, Patch, Row, Value};

/// The type of a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ColumnType {
    /// A boolean.
    Bool,
    /// A 64-bit signed integer.
    Int,
    /// A 64-bit float; NaN and infinities are refused.
    Float,
    /// UTF-8 text.
    Text,
    /// Raw bytes.
    Bytes,
    /// A JSON document.
    Json,
}

impl ColumnType {
    /// The type's name, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ColumnType::Bool => "bool",
            ColumnType::Int => "int",
            ColumnType::Float => "float",
            ColumnType::Text => "text",
            ColumnType::Bytes => "bytes",
            ColumnType::Json => "json",
        }
    }
}

/// One column of a table.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// Its name.
    pub name: Ident,
    /// Its type.
    pub ty: ColumnType,
    /// Whether it may hold NULL.
    pub nullable: bool,
}

/// A table the engine manages: its name, its key column and its columns.
///
/// Cheap to clone. Build one with [`Table::builder`]:
///
/// ```
/// use writethrough_core::{ColumnType, Table};
/// let products = Table::builder("products")
///     .key("id", ColumnType::Int)
///     .column("name", ColumnType::Text)
///     .column("price", ColumnType::Float)
///     .nullable("note", ColumnType::Text)
///     .build()
///     .unwrap();
/// assert_eq!(products.key_column().name.as_str(), "id");
/// ```
#[derive(Clone, PartialEq)]
pub struct Table {
    inner: Arc<TableInner>,
}

#[derive(PartialEq)]
struct TableInner {
    name: Ident,
    key: usize,
    columns: Vec<Column>,
}

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table")
            .field("name", &self.inner.name)
            .field("key", &self.key_column().name)
            .field("columns", &self.inner.columns)
            .finish()
    }
}

/// Builds a [`Table`]; names are validated in [`TableBuilder::build`].
#[derive(Debug, Clone)]
pub struct TableBuilder {
    name: String,
    key: Option<(String, ColumnType)>,
    columns: Vec<(String, ColumnType, bool)>,
}

impl TableBuilder {
    /// The key column: `Int` or `Text`, never NULL.
    #[must_use]
    pub fn key(mut self, name: &str, ty: ColumnType) -> Self {
        self.key = Some((name.to_owned(), ty));
        self
    }

    /// A NOT NULL column.
    #[must_use]
    pub fn column(mut self, name: &str, ty: ColumnType) -> Self {
        self.columns.push((name.to_owned(), ty, false));
        self
    }

    /// A column that may hold NULL.
    #[must_use]
    pub fn nullable(mut self, name: &str, ty: ColumnType) -> Self {
        self.columns.push((name.to_owned(), ty, true));
        self
    }

    /// A column that may hold NULL if `nullable` says so: for schemas read
    /// from a database's catalog.
    #[must_use]
    pub fn column_with(mut self, name: &str, ty: ColumnType, nullable: bool) -> Self {
        self.columns.push((name.to_owned(), ty, nullable));
        self
    }

    /// Validates every name and builds the table.
    pub fn build(self) -> Result<Table> {
        let name = Ident::new(&self.name)?;
        let (key_name, key_ty) = self.key.ok_or_else(|| {
            Error::new(
                ErrorKind::SchemaMismatch,
                format!("table {name} has no key column"),
            )
        })?;
        if !matches!(key_ty, ColumnType::Int | ColumnType::Text) {
            return Err(Error::new(
                ErrorKind::SchemaMismatch,
                format!(
                    "key column {key_name} must be int or text, not {}",
                    key_ty.as_str()
                ),
            ));
        }
        let mut columns = vec![Column {
            name: Ident::new(&key_name)?,
            ty: key_ty,
            nullable: false,
        }];
        for (n, ty, nullable) in self.columns {
            let name = Ident::new(&n)?;
            if columns.iter().any(|c| c.name == name) {
                return Err(Error::new(
                    ErrorKind::SchemaMismatch,
                    format!("column {name} is declared twice"),
                ));
            }
            columns.push(Column { name, ty, nullable });
        }
        Ok(Table {
            inner: Arc::new(TableInner {
                name,
                key: 0,
                columns,
            }),
        })
    }
}

impl Table {
    /// Starts a table named `name`.
    pub fn builder(name: &str) -> TableBuilder {
        TableBuilder {
            name: name.to_owned(),
            key: None,
            columns: Vec::new(),
        }
    }

    /// The same schema under another name (several tables of one entity).
    pub fn renamed(&self, name: &str) -> Result<Table> {
        Ok(Table {
            inner: Arc::new(TableInner {
                name: Ident::new(name)?,
                key: self.inner.key,
                columns: self.inner.columns.clone(),
            }),
        })
    }

    /// The table's name.
    pub fn name(&self) -> &Ident {
        &self.inner.name
    }

    /// The key column.
    pub fn key_column(&self) -> &Column {
        &self.inner.columns[self.inner.key]
    }

    /// The key `row` carries in the key column, or `None` when it has no
    /// value there that can be a key.
    pub fn key_of(&self, row: &Row) -> Option<Key> {
        row.get(self.key_column().name.as_str())
            .and_then(Key::from_value)
    }

    /// Every column, key first.
    pub fn columns(&self) -> &[Column] {
        &self.inner.columns
    }

    /// The column named `name`.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.inner.columns.iter().find(|c| c.name.as_str() == name)
    }

    /// Checks that `key` has the key column's type.
    pub fn check_key(&self, key: &Key) -> Result<()> {
        let ok = matches!(
            (key, self.key_column().ty),
            (Key::Int(_), ColumnType::Int) | (Key::Text(_), ColumnType::Text)
        );
        if !ok {
            return Err(Error::new(
                ErrorKind::InvalidKey,
                format!(
                    "table {} has a {} key, got {key:?}",
                    self.name(),
                    self.key_column().ty.as_str()
                ),
            ));
        }
        if matches!(key, Key::Text(s) if s.is_empty()) {
            return Err(Error::new(ErrorKind::InvalidKey, "the key is empty"));
        }
        Ok(())
    }

    /// Checks a full row and returns it in column order, with absent nullable
    /// columns set to NULL and integers in float columns widened.
    pub fn normalize_row(&self, row: Row) -> Result<(Key, Row)> {
        row.check()?;
        let mut values: Vec<Option<Value>> = vec![None; self.columns().len()];
        for (name, value) in row {
            let Some(i) = self.columns().iter().position(|c| c.name == name) else {
                return Err(self.unknown_column(&name));
            };
            values[i] = Some(value);
        }
        let mut out = Row::with_capacity(values.len());
        for (col, value) in self.columns().iter().zip(values) {
            let value = coerce(col, value.unwrap_or(Value::Null))?;
            out.insert(col.name.clone(), value);
        }
        let key = self
            .key_of(&out)
            .expect("coerce fills the key column with a value of the key's type");
        self.check_key(&key)?;
        Ok((key, out))
    }

    /// Checks a patch: known columns, not the key, values of the right type.
    pub fn normalize_patch(&self, patch: Patch) -> Result<Patch> {
        patch.check()?;
        if patch.is_empty() {
            return Err(Error::new(
                ErrorKind::SchemaMismatch,
                "the patch sets no column",
            ));
        }
        let mut out = Row::with_capacity(patch.columns().len());
        for (name, value) in patch.columns().iter() {
            let Some(col) = self.column(name.as_str()) else {
                return Err(self.unknown_column(name));
            };
            if col.name == self.key_column().name {
                return Err(Error::new(
                    ErrorKind::SchemaMismatch,
                    format!("the key column {name} cannot be updated"),
                ));
            }
            out.insert(col.name.clone(), coerce(col, value.clone())?);
        }
        Ok(Patch::from(out))
    }

    fn unknown_column(&self, name: &Ident) -> Error {
        Error::new(
            ErrorKind::SchemaMismatch,
            format!("table {} has no column {name}", self.name()),
        )
    }

    /// Decodes a row from a JSON object whose fields are the columns; values
    /// take the column's type (JSON cannot tell bytes from arrays on its own).
    pub fn row_from_json(&self, json: serde_json::Value) -> Result<Row> {
        let serde_json::Value::Object(mut map) = json else {
            return Err(Error::new(ErrorKind::Codec, "a row must be a JSON object"));
        };
        let mut row = Row::with_capacity(self.columns().len());
        for col in self.columns() {
            let j = map
                .remove(col.name.as_str())
                .unwrap_or(serde_json::Value::Null);
            row.insert(col.name.clone(), coerce(col, Value::Json(j))?);
        }
        Ok(row)
    }
}

/// Converts `value` to `col`'s type where that is lossless, or explains why not.
pub(crate) fn coerce(col: &Column, value: Value) -> Result<Value> {
    let mismatch = |v: &Value| {
        let got = match v {
            Value::Json(serde_json::Value::String(_)) => "string",
            Value::Json(serde_json::Value::Number(_)) => "number",
            Value::Json(serde_json::Value::Bool(_)) => "bool",
            Value::Json(serde_json::Value::Array(_)) => "array",
            Value::Json(serde_json::Value::Object(_)) => "object",
            other => other.type_name(),
        };
        Error::new(
            ErrorKind::InvalidValue,
            format!("column {} is {}, got {got}", col.name, col.ty.as_str()),
        )
    };
    if value.is_null() || matches!(value, Value::Json(serde_json::Value::Null)) {
        return if col.nullable {
            Ok(Value::Null)
        } else {
            Err(Error::new(
                ErrorKind::InvalidValue,
                format!(
                    "column {} is NOT NULL, got null (NaN and infinities also become null in JSON)",
                    col.name
                ),
            ))
        };
    }
    let v = match (col.ty, value) {
        (ColumnType::Bool, v @ Value::Bool(_)) => v,
        (ColumnType::Bool, Value::Json(serde_json::Value::Bool(b))) => Value::Bool(b),
        (ColumnType::Int, v @ Value::Int(_)) => v,
        (ColumnType::Int, Value::Json(serde_json::Value::Number(n))) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => {
                return Err(Error::new(
                    ErrorKind::InvalidValue,
                    format!("column {} is int, got {n} which does not fit i64", col.name),
                ));
            }
        },
        (ColumnType::Float, Value::Float(f)) => Value::Float(f),
        (ColumnType::Float, Value::Int(i)) => Value::Float(i as f64),
        (ColumnType::Float, Value::Json(serde_json::Value::Number(n))) => {
            Value::Float(n.as_f64().unwrap_or(f64::NAN))
        }
        (ColumnType::Text, v @ Value::Text(_)) => v,
        (ColumnType::Text, Value::Json(serde_json::Value::String(s))) => Value::Text(s),
        (ColumnType::Bytes, v @ Value::Bytes(_)) => v,
        (ColumnType::Bytes, Value::Json(serde_json::Value::Array(a))) => {
            let bytes: Option<Vec<u8>> = a
                .iter()
                .map(|x| x.as_u64().and_then(|n| u8::try_from(n).ok()))
                .collect();
            Value::Bytes(bytes.ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidValue,
                    format!(
                        "column {} is bytes, got an array that is not of bytes",
                        col.name
                    ),
                )
            })?)
        }
        (ColumnType::Json, v @ Value::Json(_)) => v,
        (ColumnType::Json, v) => Value::Json(crate::codec::value_to_json(&v)),
        (_, v) => return Err(mismatch(&v)),
    };
    if let Value::Float(f) = v
        && !f.is_finite()
    {
        return Err(Error::new(
            ErrorKind::InvalidValue,
            format!(
                "column {} got {f}: only finite floats can be stored",
                col.name
            ),
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn products() -> Table {
        Table::builder("products")
            .key("id", ColumnType::Int)
            .column("name", ColumnType::Text)
            .column("price", ColumnType::Float)
            .nullable("note", ColumnType::Text)
            .build()
            .unwrap()
    }

    #[test]
    fn normalize_orders_columns_fills_nullables_and_widens_ints() {
        let (key, row) = products()
            .normalize_row(Row::new().set("price", 3).set("name", "pen").set("id", 7))
            .unwrap();
        assert_eq!(key, Key::Int(7));
        let cols: Vec<_> = row.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(cols, ["id", "name", "price", "note"]);
        assert_eq!(row.get("price"), Some(&Value::Float(3.0)));
        assert_eq!(row.get("note"), Some(&Value::Null));
    }

    #[test]
    fn normalize_refuses_unknown_missing_mistyped_and_non_finite() {
        let t = products();
        let base = || Row::new().set("id", 1).set("name", "a").set("price", 1.0);
        let cases = [
            (base().set("colour", "red"), ErrorKind::SchemaMismatch),
            (
                Row::new().set("id", 1).set("price", 1.0),
                ErrorKind::InvalidValue,
            ),
            (base().set("name", 5), ErrorKind::InvalidValue),
            (base().set("price", f64::NAN), ErrorKind::InvalidValue),
            (base().set("price", f64::INFINITY), ErrorKind::InvalidValue),
            (base().set("id", "1"), ErrorKind::InvalidValue),
        ];
        for (row, kind) in cases {
            let err = t.normalize_row(row.clone()).unwrap_err();
            assert_eq!(err.kind(), kind, "{row:?}: {err}");
        }
    }

    #[test]
    fn patches_cannot_touch_the_key_or_unknown_columns() {
        let t = products();
        assert!(t.normalize_patch(Patch::new().set("price", 2)).is_ok());
        for p in [
            Patch::new().set("id", 2),
            Patch::new().set("nope", 1),
            Patch::new(),
        ] {
            assert_eq!(
                t.normalize_patch(p).unwrap_err().kind(),
                ErrorKind::SchemaMismatch
            );
        }
    }

    #[test]
    fn tables_refuse_bad_names_and_non_key_types() {
        assert!(
            Table::builder("bad name")
                .key("id", ColumnType::Int)
                .build()
                .is_err()
        );
        assert!(
            Table::builder("t")
                .key("id", ColumnType::Float)
                .build()
                .is_err()
        );
        assert!(
            Table::builder("t")
                .column("x", ColumnType::Int)
                .build()
                .is_err()
        );
        assert!(
            Table::builder("t")
                .key("id", ColumnType::Int)
                .column("id", ColumnType::Int)
                .build()
                .is_err()
        );
    }

    #[test]
    fn empty_text_keys_are_refused() {
        let t = Table::builder("t")
            .key("k", ColumnType::Text)
            .build()
            .unwrap();
        assert_eq!(
            t.check_key(&Key::Text(String::new())).unwrap_err().kind(),
            ErrorKind::InvalidKey
        );
        assert_eq!(
            t.check_key(&Key::Int(1)).unwrap_err().kind(),
            ErrorKind::InvalidKey
        );
    }
}

//! Backend-neutral data: identifiers, values, keys, rows and patches.
//!
//! A [`Row`] is an ordered map from column to [`Value`]; every database
//! adapter binds these values as parameters, never as SQL text, and every
//! name that reaches SQL is an [`Ident`], validated once and always quoted.

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};

/// Longest identifier accepted: PostgreSQL truncates names past 63 bytes, so
/// longer ones would silently alias there; we refuse them everywhere.
pub const MAX_IDENT_LEN: usize = 63;

/// Prefix reserved for the engine's own columns and tables.
pub const RESERVED_PREFIX: &str = "_wt_";

/// A validated SQL identifier: ASCII letter or `_` first, then letters,
/// digits or `_`, at most [`MAX_IDENT_LEN`] bytes, not starting with `_wt_`.
///
/// Identifiers are compared case-sensitively and always quoted in SQL, so
/// `Price` and `price` are different columns on every backend.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ident(Arc<str>);

impl Ident {
    /// Validates `name` as an identifier.
    pub fn new(name: &str) -> Result<Self> {
        Self::check(name, false)?;
        Ok(Ident(Arc::from(name)))
    }

    /// Like [`Ident::new`] but allows the reserved `_wt_` prefix: for the engine's own names.
    pub fn reserved(name: &str) -> Result<Self> {
        Self::check(name, true)?;
        Ok(Ident(Arc::from(name)))
    }

    fn check(name: &str, allow_reserved: bool) -> Result<()> {
        let bad = |why: &str| {
            Err(Error::new(
                ErrorKind::InvalidIdentifier,
                format!("{name:?} is not a valid identifier: {why}"),
            ))
        };
        let Some(first) = name.bytes().next() else {
            return bad("it is empty");
        };
        if name.len() > MAX_IDENT_LEN {
            return bad("it is longer than 63 bytes");
        }
        if !(first.is_ascii_alphabetic() || first == b'_') {
            return bad("it must start with an ASCII letter or '_'");
        }
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return bad("only ASCII letters, digits and '_' are allowed");
        }
        if !allow_reserved && name.starts_with(RESERVED_PREFIX) {
            return bad("the prefix '_wt_' is reserved for writethrough");
        }
        Ok(())
    }

    /// The identifier as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The identifier in double quotes, ready for SQL. Validation guarantees
    /// there is no quote inside to escape.
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for Ident {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// One typed value of a column.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A boolean.
    Bool(bool),
    /// A 64-bit signed integer.
    Int(i64),
    /// A finite 64-bit float (NaN and infinities are refused on write).
    Float(f64),
    /// UTF-8 text.
    Text(String),
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// A JSON document (TEXT on SQLite, JSONB on PostgreSQL).
    Json(serde_json::Value),
}

impl Value {
    /// A short name of the variant, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Text(_) => "text",
            Value::Bytes(_) => "bytes",
            Value::Json(_) => "json",
        }
    }

    /// Whether this is [`Value::Null`].
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

macro_rules! value_from {
    ($($t:ty => $v:ident $(as $cast:ty)?),* $(,)?) => {$(
        impl From<$t> for Value {
            fn from(x: $t) -> Self { Value::$v(x $(as $cast)?) }
        }
    )*};
}
value_from!(bool => Bool, i64 => Int, i32 => Int as i64, u32 => Int as i64, f64 => Float,
    String => Text, Vec<u8> => Bytes, serde_json::Value => Json);

impl From<&str> for Value {
    fn from(x: &str) -> Self {
        Value::Text(x.to_owned())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(x: Option<T>) -> Self {
        x.map_or(Value::Null, Into::into)
    }
}

/// The primary key of a row: an integer or a text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// An integer key.
    Int(i64),
    /// A text key.
    Text(String),
}

impl Key {
    /// The key as a [`Value`], for binding.
    pub fn to_value(&self) -> Value {
        match self {
            Key::Int(i) => Value::Int(*i),
            Key::Text(s) => Value::Text(s.clone()),
        }
    }

    /// The key taken from a value, if it is an integer or a text.
    pub fn from_value(v: &Value) -> Option<Key> {
        match v {
            Value::Int(i) => Some(Key::Int(*i)),
            Value::Text(s) => Some(Key::Text(s.clone())),
            _ => None,
        }
    }

    /// A type-tagged text form (`i:42`, `t:abc`) that parses back with
    /// [`Key::decode`]: used in the outbox table.
    pub fn encode(&self) -> String {
        match self {
            Key::Int(i) => format!("i:{i}"),
            Key::Text(s) => format!("t:{s}"),
        }
    }

    /// Parses the form written by [`Key::encode`].
    pub fn decode(s: &str) -> Result<Key> {
        let bad = || Error::new(ErrorKind::Codec, format!("{s:?} is not an encoded key"));
        match s.split_at_checked(2) {
            Some(("i:", rest)) => rest.parse().map(Key::Int).map_err(|_| bad()),
            Some(("t:", rest)) => Ok(Key::Text(rest.to_owned())),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Int(i) => write!(f, "{i}"),
            Key::Text(s) => f.write_str(s),
        }
    }
}

impl From<i64> for Key {
    fn from(x: i64) -> Self {
        Key::Int(x)
    }
}
impl From<i32> for Key {
    fn from(x: i32) -> Self {
        Key::Int(x.into())
    }
}
impl From<&str> for Key {
    fn from(x: &str) -> Self {
        Key::Text(x.to_owned())
    }
}
impl From<String> for Key {
    fn from(x: String) -> Self {
        Key::Text(x)
    }
}
impl From<&String> for Key {
    fn from(x: &String) -> Self {
        Key::Text(x.clone())
    }
}
impl From<&Key> for Key {
    fn from(x: &Key) -> Self {
        x.clone()
    }
}

/// An ordered map from column to value.
///
/// Columns keep the order they were inserted in; rows built by the engine
/// follow the table's column order. Lookups are linear, which beats hashing
/// for the handful of columns a row has.
///
/// [`Row::set`] never panics: a column name that is not a valid identifier
/// is remembered, and every use of the row (a write, a schema check) fails
/// with [`ErrorKind::InvalidIdentifier`] naming it.
///
/// ```
/// use writethrough_core::{ErrorKind, Row};
/// let row = Row::new().set("id", 1).set("bad name", 2);
/// assert_eq!(row.check().unwrap_err().kind(), ErrorKind::InvalidIdentifier);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    cols: Vec<(Ident, Value)>,
    /// Why the first refused column name was refused.
    invalid: Option<Box<str>>,
}

impl Row {
    /// An empty row.
    pub fn new() -> Self {
        Row::default()
    }

    /// An empty row with room for `n` columns.
    pub fn with_capacity(n: usize) -> Self {
        Row {
            cols: Vec::with_capacity(n),
            invalid: None,
        }
    }

    /// Sets `column` (validated as an identifier) to `value`, builder style.
    ///
    /// A name that is not a valid identifier is not set; the row remembers
    /// it, and [`Row::check`] — which every write and schema check calls —
    /// fails with `InvalidIdentifier`. Use [`Row::try_set`] to see the error
    /// at once.
    #[must_use]
    pub fn set(mut self, column: &str, value: impl Into<Value>) -> Self {
        match Ident::new(column) {
            Ok(ident) => self.insert(ident, value.into()),
            Err(e) => {
                if self.invalid.is_none() {
                    self.invalid = Some(e.message().into());
                }
            }
        }
        self
    }

    /// Fails with `InvalidIdentifier` if [`Row::set`] was given a column
    /// name that is not a valid identifier.
    pub fn check(&self) -> Result<()> {
        match &self.invalid {
            Some(why) => Err(Error::new(ErrorKind::InvalidIdentifier, why.to_string())),
            None => Ok(()),
        }
    }

    /// Sets `column` to `value`, returning an error if `column` is not a valid identifier.
    pub fn try_set(&mut self, column: &str, value: impl Into<Value>) -> Result<()> {
        self.insert(Ident::new(column)?, value.into());
        Ok(())
    }

    /// Inserts or replaces a column.
    pub fn insert(&mut self, column: Ident, value: Value) {
        match self.cols.iter_mut().find(|(c, _)| *c == column) {
            Some(slot) => slot.1 = value,
            None => self.cols.push((column, value)),
        }
    }

    /// The value of `column`, if present.
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.cols
            .iter()
            .find(|(c, _)| c.as_str() == column)
            .map(|(_, v)| v)
    }

    /// Removes and returns `column`'s value.
    pub fn remove(&mut self, column: &str) -> Option<Value> {
        let i = self.cols.iter().position(|(c, _)| c.as_str() == column)?;
        Some(self.cols.remove(i).1)
    }

    /// The columns in order.
    pub fn iter(&self) -> impl Iterator<Item = (&Ident, &Value)> {
        self.cols.iter().map(|(c, v)| (c, v))
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        self.cols.len()
    }

    /// Whether the row has no column.
    pub fn is_empty(&self) -> bool {
        self.cols.is_empty()
    }
}

impl IntoIterator for Row {
    type Item = (Ident, Value);
    type IntoIter = std::vec::IntoIter<(Ident, Value)>;
    fn into_iter(self) -> Self::IntoIter {
        self.cols.into_iter()
    }
}

impl FromIterator<(Ident, Value)> for Row {
    fn from_iter<I: IntoIterator<Item = (Ident, Value)>>(iter: I) -> Self {
        let mut row = Row::new();
        for (c, v) in iter {
            row.insert(c, v);
        }
        row
    }
}

/// A partial update: the columns to set, in order. The key column and the
/// engine's version column cannot be set through a patch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Patch {
    row: Row,
}

impl Patch {
    /// An empty patch.
    pub fn new() -> Self {
        Patch::default()
    }

    /// Sets `column` to `value`.
    ///
    /// Never panics: a column name that is not a valid identifier makes the
    /// update that uses the patch fail with `InvalidIdentifier` (see
    /// [`Patch::check`]); [`Patch::try_set`] reports it at once.
    ///
    /// ```
    /// use writethrough_core::{ErrorKind, Patch};
    /// let p = Patch::new().set("price", 2.5).set("price; DROP TABLE x", 0);
    /// assert_eq!(p.check().unwrap_err().kind(), ErrorKind::InvalidIdentifier);
    /// ```
    #[must_use]
    pub fn set(mut self, column: &str, value: impl Into<Value>) -> Self {
        self.row = self.row.set(column, value);
        self
    }

    /// Fails with `InvalidIdentifier` if [`Patch::set`] was given a column
    /// name that is not a valid identifier.
    pub fn check(&self) -> Result<()> {
        self.row.check()
    }

    /// Sets `column` to `value`, returning an error for an invalid identifier.
    pub fn try_set(&mut self, column: &str, value: impl Into<Value>) -> Result<()> {
        self.row.try_set(column, value)
    }

    /// The columns the patch sets.
    pub fn columns(&self) -> &Row {
        &self.row
    }

    /// Whether the patch sets nothing.
    pub fn is_empty(&self) -> bool {
        self.row.is_empty()
    }

    /// Applies the patch to `row` in place.
    pub fn apply_to(&self, row: &mut Row) {
        for (c, v) in self.row.iter() {
            row.insert(c.clone(), v.clone());
        }
    }
}

impl From<Row> for Patch {
    fn from(row: Row) -> Self {
        Patch { row }
    }
}

/// A row as the database holds it, with the version the engine assigned to
/// its last write.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionedRow {
    /// The row's columns.
    pub row: Row,
    /// The version of the write that produced this row.
    pub version: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_accept_plain_names_and_refuse_everything_else() {
        for ok in ["a", "_x", "Price", "col_1", &"a".repeat(63)] {
            assert!(Ident::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1a",
            "a b",
            "a-b",
            "a\"b",
            "a;drop",
            "é",
            "a\0",
            &"a".repeat(64),
            "_wt_version",
        ] {
            let e = Ident::new(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidIdentifier, "{bad:?}");
        }
        assert!(Ident::reserved("_wt_version").is_ok());
        assert_eq!(Ident::new("Price").unwrap().quoted(), "\"Price\"");
    }

    #[test]
    fn keys_encode_and_decode_with_their_type() {
        for k in [
            Key::Int(-7),
            Key::Text("i:1".into()),
            Key::Text(String::new()),
        ] {
            assert_eq!(Key::decode(&k.encode()).unwrap(), k);
        }
        assert!(Key::decode("x:1").is_err());
        assert!(Key::decode("i:abc").is_err());
    }

    #[test]
    fn rows_keep_insertion_order_and_replace_in_place() {
        let row = Row::new().set("b", 1).set("a", "x").set("b", 2);
        let cols: Vec<_> = row.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(cols, ["b", "a"]);
        assert_eq!(row.get("b"), Some(&Value::Int(2)));
    }

    #[test]
    fn set_with_a_bad_column_name_does_not_panic_and_fails_at_use() {
        let row = Row::new().set("id", 1).set("a b", 2).set("c;--", 3);
        assert_eq!(row.len(), 1, "refused names are not set");
        let e = row.check().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidIdentifier);
        assert!(
            e.message().contains("\"a b\""),
            "the first one is named: {e}"
        );
        let p = Patch::new().set("", 1);
        assert_eq!(p.check().unwrap_err().kind(), ErrorKind::InvalidIdentifier);
        assert!(Patch::new().set("ok", 1).check().is_ok());
    }

    #[test]
    fn patch_applies_over_a_row() {
        let mut row = Row::new().set("id", 1).set("price", 1.0);
        Patch::new().set("price", 2.5).apply_to(&mut row);
        assert_eq!(row.get("price"), Some(&Value::Float(2.5)));
    }
}

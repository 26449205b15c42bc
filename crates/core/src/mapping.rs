//! How Rust types map to columns and keys: what `#[derive(Entity)]` reads
//! a struct's schema from, and what makes a handle's key typed.
//!
//! - [`ColumnKind`] gives a field type its [`ColumnType`] and nullability.
//! - [`KeyType`] marks the types a table's key may have (integers, `String`).
//! - [`KeyArg<K>`] is what a handle of an entity keyed by `K` accepts as a
//!   key: `K` itself or a reference to it (and `&str` for `String` keys), so
//!   `users.get("42")` does not compile on an integer-keyed table. Plain
//!   [`Row`](crate::Row) tables take anything that converts into a [`Key`].

use crate::error::{Error, ErrorKind, Result};
use crate::schema::ColumnType;
use crate::value::Key;

/// A Rust type that can be one column of a derived entity.
///
/// Implemented for the integers (`i8`..`i64`, `u8`..`u64`; `u64` values
/// above `i64::MAX` are refused when written), `f32`/`f64`, `bool`,
/// `String`, `char`, `Vec<u8>`, `serde_json::Value`, and `Option<T>` of
/// any of them (a nullable column). Behind features: `chrono` dates and
/// times, `uuid::Uuid` and `rust_decimal::Decimal`, stored as text in
/// their canonical serde form. Any other serde type can be stored as a
/// JSON column with `#[writethrough(json)]` on the field.
#[diagnostic::on_unimplemented(
    message = "`{Self}` has no column type",
    label = "writethrough cannot map this field's type to a column",
    note = "columns are integers, f32/f64, bool, String, char, Vec<u8>, serde_json::Value, \
            Option of these, and (behind features) chrono, uuid and rust_decimal types",
    note = "store any other serde type as a JSON column with `#[writethrough(json)]` on the field"
)]
pub trait ColumnKind {
    /// The column's type.
    const TYPE: ColumnType;
    /// Whether the column holds NULL (`Option<T>`).
    const NULLABLE: bool = false;
}

impl<T: ColumnKind> ColumnKind for Option<T> {
    const TYPE: ColumnType = T::TYPE;
    const NULLABLE: bool = true;
}

macro_rules! columns {
    ($ty:expr => $($t:ty),* $(,)?) => {$(
        impl ColumnKind for $t {
            const TYPE: ColumnType = $ty;
        }
    )*};
}

columns!(ColumnType::Int => i8, i16, i32, i64, u8, u16, u32, u64);
columns!(ColumnType::Float => f32, f64);
columns!(ColumnType::Bool => bool);
columns!(ColumnType::Text => String, char);
columns!(ColumnType::Bytes => Vec<u8>);
columns!(ColumnType::Json => serde_json::Value);

#[cfg(feature = "chrono")]
columns!(ColumnType::Text =>
    chrono::DateTime<chrono::Utc>,
    chrono::DateTime<chrono::FixedOffset>,
    chrono::NaiveDate,
    chrono::NaiveDateTime,
    chrono::NaiveTime,
);
#[cfg(feature = "uuid")]
columns!(ColumnType::Text => uuid::Uuid);
#[cfg(feature = "rust_decimal")]
columns!(ColumnType::Text => rust_decimal::Decimal);

mod sealed {
    pub trait Sealed {}
}

/// A type a table's key may have: an integer or a `String` (and, for
/// untyped [`Row`](crate::Row) tables, the [`Key`] enum itself).
///
/// Sealed: the engine stores every key as an `INT` or a `TEXT`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a table's key",
    label = "a key is an integer (i8..i64, u8..u64) or a String",
    note = "a key is never NULL: the key field cannot be an Option"
)]
pub trait KeyType: sealed::Sealed + KeyArg<Self> + Clone + Send + Sync + 'static {
    /// The key as the engine stores it; `u64` keys above `i64::MAX` are
    /// refused with [`ErrorKind::InvalidKey`].
    fn to_key(&self) -> Result<Key>;
}

/// What a handle whose key type is `K` accepts as a key: `K` or `&K`; for
/// `String` keys also `&str` and `&String`; for [`Key`] (plain row tables)
/// anything that converts into one.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a key of this table: its key is `{K}`",
    label = "expected a `{K}` (or a reference to one)",
    note = "convert the value first, e.g. with `{K}::try_from(..)` or `.parse::<{K}>()`"
)]
pub trait KeyArg<K> {
    /// The key as the engine stores it.
    fn into_key(self) -> Result<Key>;
}

macro_rules! int_keys {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl KeyType for $t {
            fn to_key(&self) -> Result<Key> {
                Ok(Key::Int(i64::from(*self)))
            }
        }
        impl KeyArg<$t> for $t {
            fn into_key(self) -> Result<Key> {
                self.to_key()
            }
        }
        impl KeyArg<$t> for &$t {
            fn into_key(self) -> Result<Key> {
                self.to_key()
            }
        }
    )*};
}

int_keys!(i8, i16, i32, i64, u8, u16, u32);

impl sealed::Sealed for u64 {}
impl KeyType for u64 {
    fn to_key(&self) -> Result<Key> {
        i64::try_from(*self).map(Key::Int).map_err(|_| {
            Error::new(
                ErrorKind::InvalidKey,
                format!("key {self} is above the largest storable key, {}", i64::MAX),
            )
        })
    }
}
impl KeyArg<u64> for u64 {
    fn into_key(self) -> Result<Key> {
        self.to_key()
    }
}
impl KeyArg<u64> for &u64 {
    fn into_key(self) -> Result<Key> {
        self.to_key()
    }
}

impl sealed::Sealed for String {}
impl KeyType for String {
    fn to_key(&self) -> Result<Key> {
        Ok(Key::Text(self.clone()))
    }
}
impl KeyArg<String> for String {
    fn into_key(self) -> Result<Key> {
        Ok(Key::Text(self))
    }
}
impl KeyArg<String> for &String {
    fn into_key(self) -> Result<Key> {
        Ok(Key::Text(self.clone()))
    }
}
impl KeyArg<String> for &str {
    fn into_key(self) -> Result<Key> {
        Ok(Key::Text(self.to_owned()))
    }
}

impl sealed::Sealed for Key {}
impl KeyType for Key {
    fn to_key(&self) -> Result<Key> {
        Ok(self.clone())
    }
}
impl<T: Into<Key>> KeyArg<Key> for T {
    fn into_key(self) -> Result<Key> {
        Ok(self.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key<K, A: KeyArg<K>>(a: A) -> Result<Key> {
        a.into_key()
    }

    #[test]
    fn keys_convert_and_unsigned_ones_are_range_checked() {
        assert_eq!(key::<i64, _>(7).unwrap(), Key::Int(7));
        assert_eq!(key::<u32, _>(&7).unwrap(), Key::Int(7));
        assert_eq!(key::<u64, _>(i64::MAX as u64).unwrap(), Key::Int(i64::MAX));
        let e = key::<u64, _>(u64::MAX).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidKey);
        assert!(e.message().contains("largest storable key"), "{e}");
        assert_eq!(key::<String, _>("a").unwrap(), Key::Text("a".into()));
        assert_eq!(key::<Key, _>(3).unwrap(), Key::Int(3));
        assert_eq!(key::<Key, _>("b").unwrap(), Key::Text("b".into()));
    }

    #[test]
    fn column_kinds_follow_the_rust_types() {
        fn kind<T: ColumnKind>() -> (ColumnType, bool) {
            (T::TYPE, T::NULLABLE)
        }
        assert_eq!(kind::<u16>(), (ColumnType::Int, false));
        assert_eq!(kind::<Option<String>>(), (ColumnType::Text, true));
        assert_eq!(kind::<Vec<u8>>(), (ColumnType::Bytes, false));
        assert_eq!(kind::<Option<f32>>(), (ColumnType::Float, true));
    }
}

//! Typed entities: serde structs that map to a table.
//!
//! An [`Entity`] names its [`Table`]; the engine turns it into a [`Row`]
//! through a small serde serializer (so a NaN field is an error, not a silent
//! NULL) and reads it back from the cache's JSON payload directly.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde::ser::{self, Impossible};

use crate::codec::{self, Codec};
use crate::error::{Error, ErrorKind, Result};
use crate::mapping::KeyType;
use crate::schema::Table;
use crate::value::{Ident, Key, Row, Value};

/// A serde struct stored as one row of a table.
///
/// Derive it: the table's columns come from the struct's fields and their
/// Rust types (see [`ColumnKind`](crate::ColumnKind)), so the struct and
/// its table cannot drift apart, and the key's type is the key field's.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use writethrough_core::Entity;
///
/// #[derive(Entity, Serialize, Deserialize)]
/// #[writethrough(table = "products", crate = "writethrough_core")]
/// struct Product {
///     #[writethrough(key)]
///     id: i64,
///     name: String,
///     price: f64,
///     note: Option<String>, // a nullable column
/// }
///
/// let t = Product::table();
/// assert_eq!(t.name().as_str(), "products");
/// assert_eq!(t.key_column().name.as_str(), "id");
/// ```
///
/// (Through the `writethrough` facade, which applications use, the
/// `crate = ...` argument is not needed.) A hand-written implementation
/// names the key type and builds the [`Table`] itself:
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use writethrough_core::{ColumnType, Entity, Table};
///
/// #[derive(Serialize, Deserialize)]
/// struct Product { id: i64, name: String }
///
/// impl Entity for Product {
///     type Key = i64;
///     fn table() -> Table {
///         Table::builder("products")
///             .key("id", ColumnType::Int)
///             .column("name", ColumnType::Text)
///             .build()
///             .expect("a valid schema")
///     }
/// }
/// ```
pub trait Entity: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The type of the key field: an integer or a `String`.
    type Key: KeyType;
    /// The table this entity lives in; its field names are the columns.
    fn table() -> Table;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::value::Row {}
    impl<T: super::Entity> Sealed for T {}
}

/// What a table handle reads and writes: a plain [`Row`], or any [`Entity`].
///
/// Sealed: implement [`Entity`] (or derive it) for your types.
pub trait Record: sealed::Sealed + Sized + Send + Sync + 'static {
    /// The key type a handle of this record takes ([`Key`] for rows).
    type Key: KeyType;
    /// The record as a row (not yet checked against the schema).
    fn to_row(&self) -> Result<Row>;
    /// The record from a row of `table`.
    fn from_row(table: &Table, row: Row) -> Result<Self>;
    /// The record from a cache payload.
    fn from_payload(codec: Codec, table: &Table, payload: &[u8]) -> Result<Self>;
}

impl Record for Row {
    type Key = Key;
    fn to_row(&self) -> Result<Row> {
        self.check()?;
        Ok(self.clone())
    }
    fn from_row(_: &Table, row: Row) -> Result<Self> {
        Ok(row)
    }
    fn from_payload(codec: Codec, table: &Table, payload: &[u8]) -> Result<Self> {
        codec::decode_row(codec, table, payload)
    }
}

impl<T: Entity> Record for T {
    type Key = T::Key;
    fn to_row(&self) -> Result<Row> {
        self.serialize(RowSerializer)
    }

    fn from_row(_: &Table, row: Row) -> Result<Self> {
        let obj: serde_json::Map<String, serde_json::Value> = row
            .iter()
            .map(|(c, v)| (c.as_str().to_owned(), codec::value_to_json(v)))
            .collect();
        serde_json::from_value(serde_json::Value::Object(obj))
            .map_err(|e| Error::new(ErrorKind::Codec, "row does not fit the entity").with_source(e))
    }

    fn from_payload(codec: Codec, table: &Table, payload: &[u8]) -> Result<Self> {
        match codec {
            Codec::Json => serde_json::from_slice(payload).map_err(|e| {
                Error::new(ErrorKind::Codec, "cached row does not fit the entity").with_source(e)
            }),
            #[allow(unreachable_patterns)]
            _ => Self::from_row(table, codec::decode_row(codec, table, payload)?),
        }
    }
}

fn ser_err(msg: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::InvalidValue, msg.to_string())
}

impl ser::Error for Error {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        ser_err(msg)
    }
}

/// Serializes a struct or map into a [`Row`].
struct RowSerializer;

struct RowBuilder {
    row: Row,
    pending_key: Option<String>,
}

impl RowBuilder {
    fn field(&mut self, name: &str, v: Value) -> Result<()> {
        self.row.insert(Ident::new(name)?, v);
        Ok(())
    }
}

macro_rules! not_a_struct {
    ($($f:ident($($t:ty),*)),* $(,)?) => {$(
        fn $f(self, $(_: $t),*) -> Result<Self::Ok> {
            Err(ser_err("an entity must serialize as a struct or a map"))
        }
    )*};
}

impl ser::Serializer for RowSerializer {
    type Ok = Row;
    type Error = Error;
    type SerializeSeq = Impossible<Row, Error>;
    type SerializeTuple = Impossible<Row, Error>;
    type SerializeTupleStruct = Impossible<Row, Error>;
    type SerializeTupleVariant = Impossible<Row, Error>;
    type SerializeMap = RowBuilder;
    type SerializeStruct = RowBuilder;
    type SerializeStructVariant = Impossible<Row, Error>;

    not_a_struct!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
        serialize_none(),
        serialize_unit(),
        serialize_unit_struct(&'static str),
        serialize_unit_variant(&'static str, u32, &'static str),
    );

    fn serialize_some<T: ?Sized + Serialize>(self, v: &T) -> Result<Row> {
        v.serialize(self)
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        v: &T,
    ) -> Result<Row> {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<Row> {
        Err(ser_err("an entity must serialize as a struct or a map"))
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq> {
        Err(ser_err("an entity must serialize as a struct or a map"))
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple> {
        Err(ser_err("an entity must serialize as a struct or a map"))
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct> {
        Err(ser_err("an entity must serialize as a struct or a map"))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant> {
        Err(ser_err("an entity must serialize as a struct or a map"))
    }
    fn serialize_map(self, len: Option<usize>) -> Result<RowBuilder> {
        Ok(RowBuilder {
            row: Row::with_capacity(len.unwrap_or(8)),
            pending_key: None,
        })
    }
    fn serialize_struct(self, _: &'static str, len: usize) -> Result<RowBuilder> {
        self.serialize_map(Some(len))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant> {
        Err(ser_err("an entity must serialize as a struct or a map"))
    }
}

impl ser::SerializeStruct for RowBuilder {
    type Ok = Row;
    type Error = Error;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, name: &'static str, v: &T) -> Result<()> {
        let v = v.serialize(ValueSerializer)?;
        self.field(name, v)
            .map_err(|e| ser_err(format!("field {name}: {}", e.message())))
    }
    fn skip_field(&mut self, _: &'static str) -> Result<()> {
        Ok(())
    }
    fn end(self) -> Result<Row> {
        Ok(self.row)
    }
}

impl ser::SerializeMap for RowBuilder {
    type Ok = Row;
    type Error = Error;
    fn serialize_key<T: ?Sized + Serialize>(&mut self, k: &T) -> Result<()> {
        match k.serialize(ValueSerializer)? {
            Value::Text(s) => {
                self.pending_key = Some(s);
                Ok(())
            }
            other => Err(ser_err(format!(
                "map keys must be strings, got {}",
                other.type_name()
            ))),
        }
    }
    fn serialize_value<T: ?Sized + Serialize>(&mut self, v: &T) -> Result<()> {
        let k = self
            .pending_key
            .take()
            .ok_or_else(|| ser_err("map value without a key"))?;
        let v = v.serialize(ValueSerializer)?;
        self.field(&k, v)
    }
    fn end(self) -> Result<Row> {
        Ok(self.row)
    }
}

/// Serializes one field into a [`Value`]; nested data becomes [`Value::Json`].
struct ValueSerializer;

fn json_of<T: ?Sized + Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v)
        .map(Value::Json)
        .map_err(|e| ser_err(format!("cannot encode nested value: {e}")))
}

impl ser::Serializer for ValueSerializer {
    type Ok = Value;
    type Error = Error;
    type SerializeSeq = JsonCollect;
    type SerializeTuple = JsonCollect;
    type SerializeTupleStruct = JsonCollect;
    type SerializeTupleVariant = Nested<<JsonSer as ser::Serializer>::SerializeTupleVariant>;
    type SerializeMap = Nested<<JsonSer as ser::Serializer>::SerializeMap>;
    type SerializeStruct = Nested<<JsonSer as ser::Serializer>::SerializeStruct>;
    type SerializeStructVariant = Nested<<JsonSer as ser::Serializer>::SerializeStructVariant>;

    fn serialize_bool(self, v: bool) -> Result<Value> {
        Ok(Value::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Result<Value> {
        Ok(Value::Int(v.into()))
    }
    fn serialize_i16(self, v: i16) -> Result<Value> {
        Ok(Value::Int(v.into()))
    }
    fn serialize_i32(self, v: i32) -> Result<Value> {
        Ok(Value::Int(v.into()))
    }
    fn serialize_i64(self, v: i64) -> Result<Value> {
        Ok(Value::Int(v))
    }
    fn serialize_u8(self, v: u8) -> Result<Value> {
        Ok(Value::Int(v.into()))
    }
    fn serialize_u16(self, v: u16) -> Result<Value> {
        Ok(Value::Int(v.into()))
    }
    fn serialize_u32(self, v: u32) -> Result<Value> {
        Ok(Value::Int(v.into()))
    }
    fn serialize_u64(self, v: u64) -> Result<Value> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| ser_err(format!("{v} does not fit a 64-bit signed integer")))
    }
    fn serialize_f32(self, v: f32) -> Result<Value> {
        self.serialize_f64(v.into())
    }
    fn serialize_f64(self, v: f64) -> Result<Value> {
        if !v.is_finite() {
            return Err(ser_err(format!("{v}: only finite floats can be stored")));
        }
        Ok(Value::Float(v))
    }
    fn serialize_char(self, v: char) -> Result<Value> {
        Ok(Value::Text(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> Result<Value> {
        Ok(Value::Text(v.to_owned()))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Value> {
        Ok(Value::Bytes(v.to_vec()))
    }
    fn serialize_none(self) -> Result<Value> {
        Ok(Value::Null)
    }
    fn serialize_some<T: ?Sized + Serialize>(self, v: &T) -> Result<Value> {
        v.serialize(self)
    }
    fn serialize_unit(self) -> Result<Value> {
        Ok(Value::Null)
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<Value> {
        Ok(Value::Null)
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<Value> {
        Ok(Value::Text(variant.to_owned()))
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        v: &T,
    ) -> Result<Value> {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        name: &'static str,
        idx: u32,
        variant: &'static str,
        v: &T,
    ) -> Result<Value> {
        json_of(&NewtypeVariant(name, idx, variant, v))
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<JsonCollect> {
        Ok(JsonCollect(Vec::with_capacity(len.unwrap_or(0))))
    }
    fn serialize_tuple(self, len: usize) -> Result<JsonCollect> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<JsonCollect> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        idx: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant> {
        nested(serde_json::value::Serializer.serialize_tuple_variant(name, idx, variant, len))
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap> {
        nested(serde_json::value::Serializer.serialize_map(len))
    }
    fn serialize_struct(self, name: &'static str, len: usize) -> Result<Self::SerializeStruct> {
        nested(serde_json::value::Serializer.serialize_struct(name, len))
    }
    fn serialize_struct_variant(
        self,
        name: &'static str,
        idx: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant> {
        nested(serde_json::value::Serializer.serialize_struct_variant(name, idx, variant, len))
    }
}

type JsonSer = serde_json::value::Serializer;

/// Nested data (structs, maps, enum variants with data) inside a field:
/// serde_json builds it, and the column holds it as JSON.
struct Nested<S>(S);

fn nested<S>(r: std::result::Result<S, serde_json::Error>) -> Result<Nested<S>> {
    r.map(Nested)
        .map_err(|e| ser_err(format!("cannot encode nested value: {e}")))
}

fn nested_end(r: std::result::Result<serde_json::Value, serde_json::Error>) -> Result<Value> {
    r.map(Value::Json)
        .map_err(|e| ser_err(format!("cannot encode nested value: {e}")))
}

fn nested_ok(r: std::result::Result<(), serde_json::Error>) -> Result<()> {
    r.map_err(|e| ser_err(format!("cannot encode nested value: {e}")))
}

impl<S: ser::SerializeMap<Ok = serde_json::Value, Error = serde_json::Error>> ser::SerializeMap
    for Nested<S>
{
    type Ok = Value;
    type Error = Error;
    fn serialize_key<T: ?Sized + Serialize>(&mut self, k: &T) -> Result<()> {
        nested_ok(self.0.serialize_key(k))
    }
    fn serialize_value<T: ?Sized + Serialize>(&mut self, v: &T) -> Result<()> {
        nested_ok(self.0.serialize_value(v))
    }
    fn end(self) -> Result<Value> {
        nested_end(self.0.end())
    }
}

impl<S: ser::SerializeStruct<Ok = serde_json::Value, Error = serde_json::Error>>
    ser::SerializeStruct for Nested<S>
{
    type Ok = Value;
    type Error = Error;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, k: &'static str, v: &T) -> Result<()> {
        nested_ok(self.0.serialize_field(k, v))
    }
    fn end(self) -> Result<Value> {
        nested_end(self.0.end())
    }
}

impl<S: ser::SerializeStructVariant<Ok = serde_json::Value, Error = serde_json::Error>>
    ser::SerializeStructVariant for Nested<S>
{
    type Ok = Value;
    type Error = Error;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, k: &'static str, v: &T) -> Result<()> {
        nested_ok(self.0.serialize_field(k, v))
    }
    fn end(self) -> Result<Value> {
        nested_end(self.0.end())
    }
}

impl<S: ser::SerializeTupleVariant<Ok = serde_json::Value, Error = serde_json::Error>>
    ser::SerializeTupleVariant for Nested<S>
{
    type Ok = Value;
    type Error = Error;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, v: &T) -> Result<()> {
        nested_ok(self.0.serialize_field(v))
    }
    fn end(self) -> Result<Value> {
        nested_end(self.0.end())
    }
}

struct NewtypeVariant<'a, T: ?Sized>(&'static str, u32, &'static str, &'a T);
impl<T: ?Sized + Serialize> Serialize for NewtypeVariant<'_, T> {
    fn serialize<S: ser::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_newtype_variant(self.0, self.1, self.2, self.3)
    }
}

/// Collects a sequence field as a JSON array (a `Vec<u8>` becomes an array
/// of numbers, which a bytes column takes back as bytes).
struct JsonCollect(Vec<serde_json::Value>);

impl JsonCollect {
    fn push<T: ?Sized + Serialize>(&mut self, v: &T) -> Result<()> {
        let Value::Json(j) = json_of(v)? else {
            unreachable!("json_of returns Json")
        };
        self.0.push(j);
        Ok(())
    }
}

impl ser::SerializeSeq for JsonCollect {
    type Ok = Value;
    type Error = Error;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, v: &T) -> Result<()> {
        self.push(v)
    }
    fn end(self) -> Result<Value> {
        Ok(Value::Json(serde_json::Value::Array(self.0)))
    }
}
impl ser::SerializeTuple for JsonCollect {
    type Ok = Value;
    type Error = Error;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, v: &T) -> Result<()> {
        self.push(v)
    }
    fn end(self) -> Result<Value> {
        Ok(Value::Json(serde_json::Value::Array(self.0)))
    }
}
impl ser::SerializeTupleStruct for JsonCollect {
    type Ok = Value;
    type Error = Error;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, v: &T) -> Result<()> {
        self.push(v)
    }
    fn end(self) -> Result<Value> {
        Ok(Value::Json(serde_json::Value::Array(self.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::ColumnType;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Product {
        id: i64,
        name: String,
        price: f64,
        tags: Vec<String>,
        blob: Vec<u8>,
        note: Option<String>,
    }

    impl Entity for Product {
        type Key = i64;
        fn table() -> Table {
            Table::builder("products")
                .key("id", ColumnType::Int)
                .column("name", ColumnType::Text)
                .column("price", ColumnType::Float)
                .column("tags", ColumnType::Json)
                .column("blob", ColumnType::Bytes)
                .nullable("note", ColumnType::Text)
                .build()
                .unwrap()
        }
    }

    fn pen() -> Product {
        Product {
            id: 1,
            name: "pen".into(),
            price: 2.5,
            tags: vec!["a".into()],
            blob: vec![1, 2],
            note: None,
        }
    }

    #[test]
    fn entities_round_trip_through_rows_and_cache_payloads() {
        let t = Product::table();
        let (_, row) = t.normalize_row(pen().to_row().unwrap()).unwrap();
        assert_eq!(row.get("blob"), Some(&Value::Bytes(vec![1, 2])));
        assert_eq!(Product::from_row(&t, row.clone()).unwrap(), pen());
        let entry = Codec::Json.encode(&t, &row).unwrap().into_entry(9);
        let codec::Decoded::Row { codec, payload, .. } = codec::decode(&entry) else {
            panic!()
        };
        assert_eq!(Product::from_payload(codec, &t, payload).unwrap(), pen());
    }

    #[test]
    fn a_nan_field_is_an_error_not_a_null() {
        let mut p = pen();
        p.price = f64::NAN;
        let e = p.to_row().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidValue);
        assert!(e.message().contains("finite"), "{e}");
    }

    #[test]
    fn a_non_struct_is_refused() {
        #[derive(Serialize, Deserialize)]
        struct Wrapper(i64);
        impl Entity for Wrapper {
            type Key = i64;
            fn table() -> Table {
                Table::builder("w")
                    .key("id", ColumnType::Int)
                    .build()
                    .unwrap()
            }
        }
        assert_eq!(
            Wrapper(1).to_row().unwrap_err().kind(),
            ErrorKind::InvalidValue
        );
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone, crate::Entity)]
    #[writethrough(crate = "crate")]
    struct UserProfile {
        #[writethrough(key)]
        handle: String,
        age: u8,
        score: f32,
        admin: bool,
        avatar: Option<Vec<u8>>,
        #[serde(rename = "full_name")]
        name: String,
        #[writethrough(json)]
        tags: Vec<String>,
        #[writethrough(json)]
        prefs: Option<std::collections::BTreeMap<String, i64>>,
        #[serde(skip)]
        cached_len: usize,
        extra: serde_json::Value,
    }

    #[test]
    fn a_derived_entity_maps_every_field_and_round_trips() {
        let t = UserProfile::table();
        assert_eq!(
            t.name().as_str(),
            "user_profile",
            "snake_case of the struct"
        );
        assert_eq!(t.key_column().name.as_str(), "handle");
        let cols: Vec<(&str, ColumnType, bool)> = t
            .columns()
            .iter()
            .map(|c| (c.name.as_str(), c.ty, c.nullable))
            .collect();
        assert_eq!(
            cols,
            [
                ("handle", ColumnType::Text, false),
                ("age", ColumnType::Int, false),
                ("score", ColumnType::Float, false),
                ("admin", ColumnType::Bool, false),
                ("avatar", ColumnType::Bytes, true),
                ("full_name", ColumnType::Text, false),
                ("tags", ColumnType::Json, false),
                ("prefs", ColumnType::Json, true),
                ("extra", ColumnType::Json, false),
            ]
        );
        let u = UserProfile {
            handle: "ada".into(),
            age: 36,
            score: 1.5,
            admin: true,
            avatar: None,
            name: "Ada Lovelace".into(),
            tags: vec!["math".into()],
            prefs: Some([("theme".to_owned(), 2)].into()),
            cached_len: 0,
            extra: serde_json::json!({"a": [1]}),
        };
        let (key, row) = t.normalize_row(u.to_row().unwrap()).unwrap();
        assert_eq!(key, Key::Text("ada".into()));
        assert_eq!(UserProfile::from_row(&t, row.clone()).unwrap(), u);
        let entry = Codec::Json.encode(&t, &row).unwrap().into_entry(3);
        let codec::Decoded::Row { codec, payload, .. } = codec::decode(&entry) else {
            panic!()
        };
        assert_eq!(UserProfile::from_payload(codec, &t, payload).unwrap(), u);
        // The key type is the key field's.
        let k: <UserProfile as Entity>::Key = "ada".to_owned();
        assert_eq!(k.to_key().unwrap(), key);
    }

    #[derive(Serialize, Deserialize, crate::Entity)]
    #[writethrough(table = "counters", crate = "crate")]
    struct Counter {
        id: u64,
        n: i64,
    }

    #[test]
    fn a_field_named_id_is_the_key_by_default_and_u64_keys_are_range_checked() {
        let t = Counter::table();
        assert_eq!(t.name().as_str(), "counters");
        assert_eq!(t.key_column().name.as_str(), "id");
        assert_eq!(t.key_column().ty, ColumnType::Int);
        let e = u64::MAX.to_key().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidKey);
        let e = Counter { id: u64::MAX, n: 1 }.to_row().unwrap_err();
        assert!(e.message().contains("does not fit"), "{e}");
    }
}

//! Cache entries: a self-describing envelope around an encoded row.
//!
//! Every value the engine puts in a cache starts with a fixed 39-byte header:
//!
//! | bytes  | content                                                   |
//! |--------|-----------------------------------------------------------|
//! | 0..2   | magic `wt`                                                |
//! | 2      | envelope format, `2`                                      |
//! | 3      | kind: `V` a row, `T` a tombstone (no row as of the version), `I` an invalidation (the row is at this version or newer, not cached) |
//! | 4..24  | the row's version, 20 ASCII digits, zero-padded           |
//! | 24     | codec of the payload: `j` JSON, `p` postcard              |
//! | 25..29 | CRC-32 of the payload, big-endian                         |
//! | 29..39 | the cache epoch the entry was prepared in, 10 ASCII digits |
//! | 39..   | payload                                                   |
//!
//! The version and the epoch sit at fixed offsets in decimal so that every
//! cache backend can read them without our code: the Redis adapter's Lua
//! script compares them to fence writes, the Memcached adapter parses them
//! inside a `gets`/`cas` loop. The fence orders entries by (version,
//! epoch); see [`replaces`](crate::backend::codec::replaces). The engine bumps the epoch when it finds that
//! the cache forgot or went back in time (see the README's "The cache that
//! forgets"), and reads entries of an earlier epoch as misses. Anything that does not parse (foreign bytes, a truncated value, an
//! older envelope format, a codec this build lacks, a checksum mismatch) is
//! [`Decoded::Corrupt`](crate::backend::codec::Decoded::Corrupt): the engine treats it as a miss and overwrites it.

use bytes::Bytes;
use serde::ser::{SerializeMap, SerializeSeq};

use crate::error::{Error, ErrorKind, Result};
use crate::schema::Table;
use crate::value::{Row, Value};

/// Length of the envelope header.
pub const HEADER_LEN: usize = 39;
const MAGIC: &[u8; 3] = b"wt2";
const VERSION_RANGE: std::ops::Range<usize> = 4..24;
const EPOCH_RANGE: std::ops::Range<usize> = 29..39;
/// Largest epoch the envelope can carry (10 decimal digits).
pub const MAX_EPOCH: u64 = 9_999_999_999;
/// Largest version the envelope can carry (it has 20 decimal digits, and
/// the Redis script compares them as two exact 10-digit halves).
pub const MAX_VERSION: u64 = u64::MAX;

/// How rows are encoded inside cache entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Codec {
    /// A JSON object of the columns. Readable with `redis-cli`, and a typed
    /// read decodes it straight into the entity.
    #[default]
    Json,
    /// postcard, compact and fast; behind the `binary-codec` feature.
    #[cfg(feature = "binary-codec")]
    Binary,
}

impl Codec {
    fn id(self) -> u8 {
        match self {
            Codec::Json => b'j',
            #[cfg(feature = "binary-codec")]
            Codec::Binary => b'p',
        }
    }

    fn from_id(id: u8) -> Option<Codec> {
        match id {
            b'j' => Some(Codec::Json),
            #[cfg(feature = "binary-codec")]
            b'p' => Some(Codec::Binary),
            _ => None,
        }
    }

    /// Encodes `row` (already normalized to `table`) into a payload that
    /// becomes a cache entry once its version is known.
    pub fn encode(self, table: &Table, row: &Row) -> Result<Payload> {
        let mut buf = Vec::with_capacity(HEADER_LEN + 32 * row.len());
        buf.resize(HEADER_LEN, 0);
        match self {
            Codec::Json => serde_json::to_writer(&mut buf, &JsonRow(row))
                .map_err(|e| Error::new(ErrorKind::Codec, "cannot encode row").with_source(e))?,
            #[cfg(feature = "binary-codec")]
            Codec::Binary => {
                let _ = table;
                let values: Vec<binary::BinValue<'_>> =
                    row.iter().map(|(_, v)| binary::BinValue::from(v)).collect();
                buf = postcard::to_extend(&values, buf).map_err(|e| {
                    Error::new(ErrorKind::Codec, "cannot encode row").with_source(e)
                })?;
            }
        }
        let _ = table;
        Ok(Payload { buf, codec: self })
    }
}

/// An encoded row waiting for its version.
#[derive(Debug, Clone)]
pub struct Payload {
    buf: Vec<u8>,
    codec: Codec,
}

impl Payload {
    /// Size of the entry this payload becomes, header included.
    pub fn entry_len(&self) -> usize {
        self.buf.len()
    }

    /// Writes the header and returns the finished cache entry, of epoch 0.
    pub fn into_entry(self, version: u64) -> Bytes {
        self.into_entry_at(version, 0)
    }

    /// Writes the header and returns the finished cache entry of `epoch`
    /// (clamped to [`MAX_EPOCH`]).
    pub fn into_entry_at(mut self, version: u64, epoch: u64) -> Bytes {
        let crc = crc32fast::hash(&self.buf[HEADER_LEN..]);
        write_header(
            &mut self.buf[..HEADER_LEN],
            b'V',
            version,
            epoch,
            self.codec.id(),
            crc,
        );
        Bytes::from(self.buf)
    }
}

/// The cache entry a delete leaves: "no row, as of `version`" (epoch 0).
pub fn tombstone(version: u64) -> Bytes {
    marker(b'T', version, 0)
}

/// [`tombstone`] of `epoch`.
pub fn tombstone_at(version: u64, epoch: u64) -> Bytes {
    marker(b'T', version, epoch)
}

/// The cache entry a write leaves when its row is not to be cached: "the
/// row is at `version` or newer". Unlike a tombstone, it lets the row of
/// exactly `version` in, so a later read can cache it.
pub fn invalidation(version: u64) -> Bytes {
    marker(b'I', version, 0)
}

/// [`invalidation`] of `epoch`.
pub fn invalidation_at(version: u64, epoch: u64) -> Bytes {
    marker(b'I', version, epoch)
}

fn marker(kind: u8, version: u64, epoch: u64) -> Bytes {
    let mut buf = vec![0; HEADER_LEN];
    write_header(&mut buf, kind, version, epoch, b'j', crc32fast::hash(&[]));
    Bytes::from(buf)
}

fn write_digits(h: &mut [u8], mut v: u64) {
    for d in h.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

fn write_header(h: &mut [u8], kind: u8, version: u64, epoch: u64, codec: u8, crc: u32) {
    h[..3].copy_from_slice(MAGIC);
    h[3] = kind;
    write_digits(&mut h[VERSION_RANGE], version);
    h[24] = codec;
    h[25..29].copy_from_slice(&crc.to_be_bytes());
    write_digits(&mut h[EPOCH_RANGE], epoch.min(MAX_EPOCH));
}

/// The record of a cache's current epoch, stored under the engine's epoch
/// key: an entry of `epoch` at version `epoch` whose payload names the
/// cache server's identity (see [`crate::backend::CacheStore::identity`]). Written
/// with the fence, the highest proposal wins.
pub fn epoch_record(epoch: u64, identity: &str) -> Bytes {
    let payload = serde_json::Value::from(identity).to_string().into_bytes();
    let mut buf = vec![0; HEADER_LEN];
    buf.extend_from_slice(&payload);
    let crc = crc32fast::hash(&payload);
    write_header(&mut buf[..HEADER_LEN], b'V', epoch, epoch, b'j', crc);
    Bytes::from(buf)
}

/// Reads an [`epoch_record`]: the epoch and the identity it was made for.
pub fn read_epoch_record(bytes: &[u8]) -> Option<(u64, String)> {
    match decode(bytes) {
        Decoded::Row {
            epoch,
            codec: Codec::Json,
            payload,
            ..
        } => match serde_json::from_slice(payload) {
            Ok(serde_json::Value::String(id)) => Some((epoch, id)),
            _ => None,
        },
        _ => None,
    }
}

/// A cache entry, read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A row at `version`, encoded with `codec`.
    Row {
        /// The row's version.
        version: u64,
        /// The cache epoch the entry was prepared in.
        epoch: u64,
        /// The codec of `payload`.
        codec: Codec,
        /// The encoded row.
        payload: &'a [u8],
    },
    /// A delete's tombstone at `version`.
    Tombstone {
        /// The delete's version.
        version: u64,
        /// The cache epoch the entry was prepared in.
        epoch: u64,
    },
    /// Bytes that are not an entry this build can read.
    Corrupt,
}

impl Decoded<'_> {
    /// The entry's version, unless corrupt.
    pub fn version(&self) -> Option<u64> {
        match self {
            Decoded::Row { version, .. } | Decoded::Tombstone { version, .. } => Some(*version),
            Decoded::Corrupt => None,
        }
    }

    /// The entry's epoch, unless corrupt.
    pub fn epoch(&self) -> Option<u64> {
        match self {
            Decoded::Row { epoch, .. } | Decoded::Tombstone { epoch, .. } => Some(*epoch),
            Decoded::Corrupt => None,
        }
    }
}

/// Reads an entry's envelope, verifying its checksum.
pub fn decode(bytes: &[u8]) -> Decoded<'_> {
    let Some((epoch, version)) = entry_order(bytes) else {
        return Decoded::Corrupt;
    };
    let payload = &bytes[HEADER_LEN..];
    let crc = u32::from_be_bytes(bytes[25..29].try_into().expect("4 bytes"));
    if crc32fast::hash(payload) != crc {
        return Decoded::Corrupt;
    }
    match bytes[3] {
        b'T' | b'I' if payload.is_empty() => Decoded::Tombstone { version, epoch },
        b'V' => match Codec::from_id(bytes[24]) {
            Some(codec) => Decoded::Row {
                version,
                epoch,
                codec,
                payload,
            },
            None => Decoded::Corrupt,
        },
        _ => Decoded::Corrupt,
    }
}

/// The version in an entry's header, or `None` when the bytes are not an
/// entry. This reads the header only; cache adapters use it to fence writes.
pub fn entry_version(bytes: &[u8]) -> Option<u64> {
    entry_order(bytes).map(|(_, v)| v)
}

/// The epoch in an entry's header, or `None` when the bytes are not an entry.
pub fn entry_epoch(bytes: &[u8]) -> Option<u64> {
    entry_order(bytes).map(|(e, _)| e)
}

/// The (epoch, version) an entry is fenced by, reading the header only.
pub fn entry_order(bytes: &[u8]) -> Option<(u64, u64)> {
    if bytes.len() < HEADER_LEN || &bytes[..3] != MAGIC || !matches!(bytes[3], b'V' | b'T' | b'I') {
        return None;
    }
    Some((
        parse_digits(&bytes[EPOCH_RANGE])?,
        parse_digits(&bytes[VERSION_RANGE])?,
    ))
}

fn parse_digits(digits: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(v)
}

/// The fencing rule every cache backend applies: an entry of `epoch` at
/// `version` replaces what is stored only if nothing readable is stored,
/// or the stored entry is strictly older, or it is of the same version and
/// an invalidation (which stands for the row of its version and lets it
/// in) or of an earlier epoch (the same committed write, prepared again
/// after the cache forgot). Versions come first: they follow commit order
/// in the database, so an entry of a newer write always wins, whichever
/// epoch its writer knew; readers then decide by the epoch whether to
/// trust what they find.
pub fn replaces(stored: Option<&[u8]>, epoch: u64, version: u64) -> bool {
    let Some(stored) = stored else {
        return true;
    };
    let Some((stored_epoch, stored_version)) = entry_order(stored) else {
        return true;
    };
    stored_version < version
        || (stored_version == version && (stored[3] == b'I' || stored_epoch < epoch))
}

/// Decodes a payload into a row of `table`.
pub fn decode_row(codec: Codec, table: &Table, payload: &[u8]) -> Result<Row> {
    match codec {
        Codec::Json => {
            let json: serde_json::Value = serde_json::from_slice(payload).map_err(|e| {
                Error::new(ErrorKind::Codec, "cached row is not JSON").with_source(e)
            })?;
            table.row_from_json(json)
        }
        #[cfg(feature = "binary-codec")]
        Codec::Binary => binary::decode(table, payload),
    }
}

/// The JSON form of a value: bytes become an array of numbers, as serde
/// writes a `Vec<u8>`, so typed entities decode cached rows directly.
pub fn value_to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => (*b).into(),
        Value::Int(i) => (*i).into(),
        Value::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into)
        }
        Value::Text(s) => s.clone().into(),
        Value::Bytes(b) => b.iter().map(|x| serde_json::Value::from(*x)).collect(),
        Value::Json(j) => j.clone(),
    }
}

/// Serializes a row as a JSON object without building a `serde_json::Value`.
pub(crate) struct JsonRow<'a>(pub(crate) &'a Row);

impl serde::Serialize for JsonRow<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (c, v) in self.0.iter() {
            m.serialize_entry(c.as_str(), &JsonValue(v))?;
        }
        m.end()
    }
}

struct JsonValue<'a>(&'a Value);

impl serde::Serialize for JsonValue<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.0 {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::Float(f) => s.serialize_f64(*f),
            Value::Text(t) => s.serialize_str(t),
            Value::Bytes(b) => {
                let mut seq = s.serialize_seq(Some(b.len()))?;
                for x in b {
                    seq.serialize_element(x)?;
                }
                seq.end()
            }
            Value::Json(j) => j.serialize(s),
        }
    }
}

#[cfg(feature = "binary-codec")]
mod binary {
    use serde::{Deserialize, Serialize};
    use std::borrow::Cow;

    use crate::error::{Error, ErrorKind, Result};
    use crate::schema::Table;
    use crate::value::{Row, Value};

    #[derive(Serialize, Deserialize)]
    pub(super) enum BinValue<'a> {
        Null,
        Bool(bool),
        Int(i64),
        Float(f64),
        Text(#[serde(borrow)] Cow<'a, str>),
        Bytes(#[serde(borrow)] Cow<'a, [u8]>),
        Json(Cow<'a, str>),
    }

    impl<'a> From<&'a Value> for BinValue<'a> {
        fn from(v: &'a Value) -> Self {
            match v {
                Value::Null => BinValue::Null,
                Value::Bool(b) => BinValue::Bool(*b),
                Value::Int(i) => BinValue::Int(*i),
                Value::Float(f) => BinValue::Float(*f),
                Value::Text(t) => BinValue::Text(Cow::Borrowed(t)),
                Value::Bytes(b) => BinValue::Bytes(Cow::Borrowed(b)),
                Value::Json(j) => BinValue::Json(Cow::Owned(j.to_string())),
            }
        }
    }

    pub(super) fn decode(table: &Table, payload: &[u8]) -> Result<Row> {
        let bad = |why: String| Error::new(ErrorKind::Codec, why);
        let values: Vec<BinValue<'_>> = postcard::from_bytes(payload)
            .map_err(|e| bad("cached row is not postcard".into()).with_source(e))?;
        if values.len() != table.columns().len() {
            return Err(bad(format!(
                "cached row has {} columns, table {} has {}",
                values.len(),
                table.name(),
                table.columns().len()
            )));
        }
        let mut row = Row::with_capacity(values.len());
        for (col, v) in table.columns().iter().zip(values) {
            let v = match v {
                BinValue::Null => Value::Null,
                BinValue::Bool(b) => Value::Bool(b),
                BinValue::Int(i) => Value::Int(i),
                BinValue::Float(f) => Value::Float(f),
                BinValue::Text(t) => Value::Text(t.into_owned()),
                BinValue::Bytes(b) => Value::Bytes(b.into_owned()),
                BinValue::Json(j) => Value::Json(
                    serde_json::from_str(&j)
                        .map_err(|e| bad("bad JSON column".into()).with_source(e))?,
                ),
            };
            row.insert(col.name.clone(), crate::schema::coerce(col, v)?);
        }
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::ColumnType;

    fn table() -> Table {
        Table::builder("t")
            .key("id", ColumnType::Int)
            .column("name", ColumnType::Text)
            .column("price", ColumnType::Float)
            .nullable("blob", ColumnType::Bytes)
            .nullable("meta", ColumnType::Json)
            .build()
            .unwrap()
    }

    fn row() -> Row {
        Row::new()
            .set("id", 42)
            .set("name", "pen \"fancy\" ✓")
            .set("price", 1.5)
            .set("blob", vec![0u8, 255, 7])
            .set("meta", serde_json::json!({"a": [1, 2]}))
    }

    fn codecs() -> Vec<Codec> {
        vec![
            Codec::Json,
            #[cfg(feature = "binary-codec")]
            Codec::Binary,
        ]
    }

    #[test]
    fn entries_round_trip_with_their_version_for_every_codec() {
        let t = table();
        for codec in codecs() {
            let entry = codec.encode(&t, &row()).unwrap().into_entry(12_345);
            assert_eq!(entry_version(&entry), Some(12_345));
            let Decoded::Row {
                version,
                codec: c,
                payload,
                ..
            } = decode(&entry)
            else {
                panic!("not a row")
            };
            assert_eq!((version, c), (12_345, codec));
            assert_eq!(decode_row(c, &t, payload).unwrap(), row());
        }
    }

    #[test]
    fn the_largest_version_survives_the_header() {
        let e = tombstone(MAX_VERSION);
        assert_eq!(
            decode(&e),
            Decoded::Tombstone {
                version: MAX_VERSION,
                epoch: 0
            }
        );
        let e = tombstone_at(MAX_VERSION, MAX_EPOCH + 5);
        assert_eq!(entry_order(&e), Some((MAX_EPOCH, MAX_VERSION)));
    }

    #[test]
    fn foreign_truncated_or_flipped_bytes_decode_as_corrupt() {
        let entry = Codec::Json.encode(&table(), &row()).unwrap().into_entry(3);
        let mut flipped = entry.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let mut bad_digit = entry.to_vec();
        bad_digit[10] = b'x';
        let mut old_format = entry.to_vec();
        old_format[2] = b'0';
        for bytes in [
            &b"hello"[..],
            b"",
            &entry[..HEADER_LEN - 1],
            &entry[..entry.len() - 1],
            &flipped,
            &bad_digit,
            &old_format,
        ] {
            assert_eq!(decode(bytes), Decoded::Corrupt, "{bytes:?}");
        }
    }

    #[test]
    fn an_invalidation_lets_its_own_version_in_and_nothing_older() {
        let inv = invalidation(5);
        assert_eq!(
            decode(&inv),
            Decoded::Tombstone {
                version: 5,
                epoch: 0
            }
        );
        assert!(replaces(Some(&inv), 0, 5));
        assert!(replaces(Some(&inv), 0, 6));
        assert!(!replaces(Some(&inv), 0, 4));
    }

    #[test]
    fn fencing_replaces_only_older_absent_or_unreadable_entries() {
        let at5 = tombstone(5);
        assert!(replaces(None, 0, 1));
        assert!(replaces(Some(b"junk"), 0, 1));
        assert!(replaces(Some(&at5), 0, 6));
        assert!(!replaces(Some(&at5), 0, 5));
        assert!(!replaces(Some(&at5), 0, 4));
    }

    #[test]
    fn versions_come_first_and_the_epoch_breaks_ties() {
        let old_epoch = tombstone_at(900, 3);
        assert!(
            !replaces(Some(&old_epoch), 4, 1),
            "an older write never wins"
        );
        assert!(
            replaces(Some(&tombstone_at(1, 4)), 3, 900),
            "a newer write always wins"
        );
        assert!(
            replaces(Some(&old_epoch), 4, 900),
            "the same write, prepared again"
        );
        assert!(!replaces(Some(&tombstone_at(900, 4)), 3, 900));
        assert!(replaces(Some(&tombstone_at(5, 4)), 4, 6));
        assert!(!replaces(Some(&tombstone_at(5, 4)), 4, 5));
        let entry = Codec::Json
            .encode(&table(), &row())
            .unwrap()
            .into_entry_at(7, 12);
        assert_eq!(decode(&entry).epoch(), Some(12));
        assert_eq!(entry_order(&entry), Some((12, 7)));
    }

    #[test]
    fn epoch_records_round_trip_and_fence_by_epoch() {
        let r = epoch_record(8, "run_id=abc");
        assert_eq!(read_epoch_record(&r), Some((8, "run_id=abc".to_owned())));
        assert!(replaces(Some(&r), 9, 9));
        assert!(!replaces(Some(&r), 8, 8));
        assert_eq!(read_epoch_record(&tombstone(3)), None);
        assert_eq!(read_epoch_record(b"junk"), None);
    }

    #[test]
    fn json_payload_is_the_plain_object_a_serde_struct_reads() {
        #[derive(serde::Deserialize, PartialEq, Debug)]
        struct T {
            id: i64,
            name: String,
            price: f64,
            blob: Option<Vec<u8>>,
            meta: serde_json::Value,
        }
        let entry = Codec::Json.encode(&table(), &row()).unwrap().into_entry(1);
        let t: T = serde_json::from_slice(&entry[HEADER_LEN..]).unwrap();
        assert_eq!(t.blob, Some(vec![0, 255, 7]));
        assert_eq!(t.name, "pen \"fancy\" ✓");
    }
}

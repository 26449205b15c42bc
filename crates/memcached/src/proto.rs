//! The slice of memcached's text protocol this crate speaks: meta commands
//! (`mg`, `ms`, `md`, `mn`) for data, and `version`, `stats settings`,
//! `flush_all` and `lru_crawler metadump` for administration.
//!
//! Encoding writes whole commands into one buffer; decoding is incremental
//! and never consumes a partial response, so the connection's reader can
//! call it whenever bytes arrive.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};

use crate::error::ClientError;

/// Memcached reads an expiration time above this many seconds (30 days) as
/// an absolute Unix time rather than a delay.
pub(crate) const MAX_RELATIVE_EXPTIME: u64 = 30 * 86_400;

/// Longest response line we accept before calling the stream corrupt: a
/// metadump line holds a percent-encoded 250-byte key and a few fields.
const MAX_LINE: usize = 16 * 1024;

/// The expiration time to send for `ttl`: `0` for none, otherwise whole
/// seconds rounded up, plus one, and as an absolute Unix time when that is
/// past memcached's 30-day limit.
///
/// The extra second is because memcached's clock ticks once a second and an
/// item expires at the first tick at or past its expiry: a TTL of `n` sent
/// as is lasts anywhere between `n - 1` and `n` seconds, so a one-second
/// entry could vanish before anyone reads it. Sent as `n + 1`, an entry
/// lives at least its TTL and at most one second longer.
pub(crate) fn exptime(ttl: Option<Duration>, now_unix: u64) -> u64 {
    let Some(ttl) = ttl else { return 0 };
    let mut secs = ttl.as_secs();
    if ttl.subsec_nanos() > 0 {
        secs += 1;
    }
    secs += 1;
    if secs > MAX_RELATIVE_EXPTIME {
        now_unix + secs
    } else {
        secs
    }
}

/// How `ms` treats an existing item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SetMode {
    /// Store unconditionally.
    Set,
    /// Store only if nothing is stored (`add`).
    Add,
    /// Store only if the item's CAS token is still this one.
    Cas(u64),
}

/// `mg <key> v\r\n`, or with the CAS token when `cas` is set.
pub(crate) fn get(buf: &mut Vec<u8>, key: &str, cas: bool) {
    buf.extend_from_slice(b"mg ");
    buf.extend_from_slice(key.as_bytes());
    buf.extend_from_slice(if cas { b" v c\r\n" } else { b" v\r\n" });
}

/// `mg <key> t\r\n`: the remaining TTL, no value.
pub(crate) fn ttl(buf: &mut Vec<u8>, key: &str) {
    buf.extend_from_slice(b"mg ");
    buf.extend_from_slice(key.as_bytes());
    buf.extend_from_slice(b" t\r\n");
}

/// `ms <key> <len> [T<exptime>] [C<cas>|ME]\r\n<value>\r\n`.
pub(crate) fn set(buf: &mut Vec<u8>, key: &str, value: &[u8], exptime: u64, mode: SetMode) {
    use std::io::Write;
    buf.reserve(key.len() + value.len() + 48);
    buf.extend_from_slice(b"ms ");
    buf.extend_from_slice(key.as_bytes());
    let _ = write!(buf, " {}", value.len());
    if exptime > 0 {
        let _ = write!(buf, " T{exptime}");
    }
    match mode {
        SetMode::Set => {}
        SetMode::Add => buf.extend_from_slice(b" ME"),
        SetMode::Cas(cas) => {
            let _ = write!(buf, " C{cas}");
        }
    }
    buf.extend_from_slice(b"\r\n");
    buf.extend_from_slice(value);
    buf.extend_from_slice(b"\r\n");
}

/// `md <key>\r\n`.
pub(crate) fn delete(buf: &mut Vec<u8>, key: &str) {
    buf.extend_from_slice(b"md ");
    buf.extend_from_slice(key.as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// What a request expects back, one of these per command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    /// One meta response (`VA`, `HD`, `EN`, `NF`, `NS`, `EX`, `MN`).
    Meta,
    /// One line (`VERSION ...`, `OK`).
    Line,
    /// `STAT name value` lines up to `END`.
    Stats,
    /// `lru_crawler metadump` lines up to `END`; keeps the keys starting with the prefix.
    Dump(String),
}

/// The status of a meta response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Code {
    /// `VA`: a value follows.
    Value,
    /// `HD`: done (stored, deleted, or a hit without value).
    Done,
    /// `EN`: miss.
    Miss,
    /// `NF`: not found.
    NotFound,
    /// `NS`: not stored (an `add` found an item).
    NotStored,
    /// `EX`: the CAS token no longer matches.
    Exists,
    /// `MN`: the answer to `mn`.
    Noop,
}

/// One decoded response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resp {
    /// A meta response.
    Meta {
        /// Its status.
        code: Code,
        /// The `c` flag's CAS token, when asked for.
        cas: Option<u64>,
        /// The `t` flag's remaining TTL in seconds (-1: none), when asked for.
        ttl: Option<i64>,
        /// The value of a `VA` response.
        value: Option<Bytes>,
    },
    /// A single line, without its CRLF.
    Line(String),
    /// `stats` output.
    Stats(Vec<(String, String)>),
    /// Keys from a metadump.
    Keys(Vec<String>),
    /// `ERROR`, `CLIENT_ERROR ...` or `SERVER_ERROR ...`: the server refused
    /// this command and the stream is still in step.
    Error(String),
}

/// Lines of a multi-line response read so far.
#[derive(Debug, Default)]
pub(crate) struct Partial {
    stats: Vec<(String, String)>,
    keys: Vec<String>,
}

fn take_line(buf: &BytesMut, from: usize) -> Result<Option<usize>, ClientError> {
    match buf[from..].iter().position(|&b| b == b'\n') {
        Some(i) => Ok(Some(from + i)),
        None if buf.len() - from > MAX_LINE => Err(ClientError::Protocol(
            "a response line is longer than any memcached sends".into(),
        )),
        None => Ok(None),
    }
}

fn line_str(raw: &[u8]) -> &str {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    std::str::from_utf8(raw).unwrap_or("<non-UTF-8 line>")
}

fn error_line(line: &str) -> Option<Resp> {
    (line == "ERROR"
        || line.starts_with("ERROR ")
        || line.starts_with("CLIENT_ERROR")
        || line.starts_with("SERVER_ERROR"))
    .then(|| Resp::Error(line.to_owned()))
}

/// Decodes one response of `kind` from the front of `buf`; `Ok(None)` when
/// more bytes are needed. Multi-line responses move their finished lines
/// into `partial` so they are not scanned twice.
pub(crate) fn parse(
    buf: &mut BytesMut,
    kind: &Kind,
    partial: &mut Partial,
) -> Result<Option<Resp>, ClientError> {
    match kind {
        Kind::Meta => parse_meta(buf),
        Kind::Line => {
            let Some(end) = take_line(buf, 0)? else {
                return Ok(None);
            };
            let line = line_str(&buf[..end]).to_owned();
            buf.advance(end + 1);
            Ok(Some(error_line(&line).unwrap_or(Resp::Line(line))))
        }
        Kind::Stats | Kind::Dump(_) => loop {
            let Some(end) = take_line(buf, 0)? else {
                return Ok(None);
            };
            let line = line_str(&buf[..end]).to_owned();
            buf.advance(end + 1);
            if line == "END" {
                return Ok(Some(match kind {
                    Kind::Stats => Resp::Stats(std::mem::take(&mut partial.stats)),
                    _ => Resp::Keys(std::mem::take(&mut partial.keys)),
                }));
            }
            if let Some(e) = error_line(&line) {
                return Ok(Some(e));
            }
            match kind {
                Kind::Stats => {
                    let mut parts = line.splitn(3, ' ');
                    if let (Some("STAT"), Some(name), value) =
                        (parts.next(), parts.next(), parts.next())
                    {
                        partial
                            .stats
                            .push((name.to_owned(), value.unwrap_or("").to_owned()));
                    } else {
                        return Err(ClientError::Protocol(format!(
                            "unexpected stats line {line:?}"
                        )));
                    }
                }
                Kind::Dump(prefix) => {
                    if let Some(key) = metadump_key(&line) {
                        if key.starts_with(prefix.as_str()) {
                            partial.keys.push(key);
                        }
                    } else {
                        // `BUSY currently processing crawler request` and the like:
                        // the whole answer is this one line.
                        return Ok(Some(Resp::Error(line)));
                    }
                }
                _ => unreachable!("only multi-line kinds loop"),
            }
        },
    }
}

fn parse_meta(buf: &mut BytesMut) -> Result<Option<Resp>, ClientError> {
    let Some(end) = take_line(buf, 0)? else {
        return Ok(None);
    };
    let line = line_str(&buf[..end]);
    if let Some(e) = error_line(line) {
        buf.advance(end + 1);
        return Ok(Some(e));
    }
    let mut tokens = line.split(' ');
    let code = match tokens.next() {
        Some("VA") => Code::Value,
        Some("HD") => Code::Done,
        Some("EN") => Code::Miss,
        Some("NF") => Code::NotFound,
        Some("NS") => Code::NotStored,
        Some("EX") => Code::Exists,
        Some("MN") => Code::Noop,
        _ => {
            return Err(ClientError::Protocol(format!(
                "unexpected meta response {line:?}"
            )));
        }
    };
    let mut len = None;
    if code == Code::Value {
        len = tokens.next().and_then(|t| t.parse::<usize>().ok());
        if len.is_none() {
            return Err(ClientError::Protocol(format!("bad VA line {line:?}")));
        }
    }
    let (mut cas, mut ttl) = (None, None);
    for t in tokens {
        let bad = || ClientError::Protocol(format!("bad flag in {line:?}"));
        match t.as_bytes().first() {
            Some(b'c') => cas = Some(t[1..].parse().map_err(|_| bad())?),
            Some(b't') => ttl = Some(t[1..].parse().map_err(|_| bad())?),
            _ => {}
        }
    }
    let value = match len {
        None => None,
        Some(n) => {
            let start = end + 1;
            if buf.len() < start + n + 2 {
                // Make room once for the whole value instead of growing step by step.
                buf.reserve(start + n + 2 - buf.len());
                return Ok(None);
            }
            if &buf[start + n..start + n + 2] != b"\r\n" {
                return Err(ClientError::Protocol(
                    "a value is not followed by CRLF".into(),
                ));
            }
            // Copied so that a cached value never pins the connection's read buffer.
            Some(Bytes::copy_from_slice(&buf[start..start + n]))
        }
    };
    let consumed = end + 1 + len.map_or(0, |n| n + 2);
    buf.advance(consumed);
    Ok(Some(Resp::Meta {
        code,
        cas,
        ttl,
        value,
    }))
}

/// The key of a metadump line (`key=<percent-encoded> exp=... la=...`).
fn metadump_key(line: &str) -> Option<String> {
    let enc = line.strip_prefix("key=")?.split(' ').next()?;
    let raw = enc.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' && i + 2 < raw.len() {
            let hex = std::str::from_utf8(&raw[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(bytes: &[u8], kind: Kind) -> (Vec<Resp>, usize) {
        let mut buf = BytesMut::from(bytes);
        let mut partial = Partial::default();
        let mut out = Vec::new();
        while let Some(r) = parse(&mut buf, &kind, &mut partial).unwrap() {
            out.push(r);
            if buf.is_empty() {
                break;
            }
        }
        (out, buf.len())
    }

    #[test]
    fn ttls_past_thirty_days_become_absolute_unix_times() {
        let now = 1_700_000_000;
        let secs = |s| exptime(Some(Duration::from_secs(s)), now);
        assert_eq!(exptime(None, now), 0);
        assert_eq!(exptime(Some(Duration::from_millis(1)), now), 2);
        assert_eq!(secs(1), 2);
        assert_eq!(exptime(Some(Duration::from_millis(1500)), now), 3);
        assert_eq!(secs(30 * 86_400 - 1), 2_592_000);
        assert_eq!(secs(30 * 86_400), now + 2_592_001);
        assert_eq!(secs(31 * 86_400), now + 31 * 86_400 + 1);
        assert_eq!(secs(365 * 86_400), now + 365 * 86_400 + 1);
    }

    #[test]
    fn commands_are_encoded_as_memcached_expects() {
        let mut b = Vec::new();
        get(&mut b, "k", true);
        get(&mut b, "k", false);
        set(&mut b, "k", b"ab", 0, SetMode::Set);
        set(&mut b, "k", b"ab", 5, SetMode::Add);
        set(&mut b, "k", b"", 7, SetMode::Cas(42));
        delete(&mut b, "k");
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "mg k v c\r\nmg k v\r\nms k 2\r\nab\r\nms k 2 T5 ME\r\nab\r\nms k 0 T7 C42\r\n\r\nmd k\r\n"
        );
    }

    #[test]
    fn meta_responses_decode_with_values_and_flags() {
        let (r, rest) = parse_all(
            b"VA 3 c77\r\nabc\r\nEN\r\nHD\r\nNS\r\nEX\r\nNF\r\nMN\r\nHD t-1\r\nSERVER_ERROR object too large for cache\r\n",
            Kind::Meta,
        );
        assert_eq!(rest, 0);
        assert_eq!(
            r[0],
            Resp::Meta {
                code: Code::Value,
                cas: Some(77),
                ttl: None,
                value: Some(Bytes::from_static(b"abc"))
            }
        );
        let codes: Vec<_> = r
            .iter()
            .filter_map(|r| match r {
                Resp::Meta { code, .. } => Some(*code),
                _ => None,
            })
            .collect();
        assert_eq!(
            codes,
            [
                Code::Value,
                Code::Miss,
                Code::Done,
                Code::NotStored,
                Code::Exists,
                Code::NotFound,
                Code::Noop,
                Code::Done
            ]
        );
        assert!(matches!(&r[7], Resp::Meta { ttl: Some(-1), .. }));
        assert_eq!(
            r[8],
            Resp::Error("SERVER_ERROR object too large for cache".into())
        );
    }

    #[test]
    fn a_value_split_across_reads_is_not_consumed_until_complete() {
        let whole = b"VA 5 c1\r\nhello\r\n";
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            let mut p = Partial::default();
            assert_eq!(parse(&mut buf, &Kind::Meta, &mut p).unwrap(), None, "{cut}");
            assert_eq!(buf.len(), cut);
            buf.extend_from_slice(&whole[cut..]);
            assert!(matches!(
                parse(&mut buf, &Kind::Meta, &mut p).unwrap(),
                Some(Resp::Meta {
                    code: Code::Value,
                    ..
                })
            ));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        let mut buf = BytesMut::from(&b"WAT\r\n"[..]);
        assert!(parse(&mut buf, &Kind::Meta, &mut Partial::default()).is_err());
        let mut buf = BytesMut::from(&b"VA 3\r\nabcXY"[..]);
        assert!(parse(&mut buf, &Kind::Meta, &mut Partial::default()).is_err());
    }

    #[test]
    fn stats_and_metadump_collect_lines_up_to_end() {
        let (r, _) = parse_all(
            b"STAT item_size_max 1048576\r\nSTAT maxconns 1024\r\nEND\r\n",
            Kind::Stats,
        );
        assert_eq!(
            r,
            [Resp::Stats(vec![
                ("item_size_max".into(), "1048576".into()),
                ("maxconns".into(), "1024".into())
            ])]
        );
        let dump = b"key=app%3Aa exp=-1 la=1 cas=2 fetch=no cls=1 size=60\r\n\
key=other exp=-1 la=1 cas=3 fetch=no cls=1 size=60\r\n\
key=app%C3%BC exp=-1 la=1 cas=3 fetch=no cls=1 size=60\r\nEND\r\n";
        let (r, _) = parse_all(dump, Kind::Dump("app".into()));
        assert_eq!(r, [Resp::Keys(vec!["app:a".into(), "appü".into()])]);
        let (r, _) = parse_all(
            b"BUSY currently processing crawler request\r\n",
            Kind::Dump(String::new()),
        );
        assert!(matches!(&r[0], Resp::Error(l) if l.starts_with("BUSY")));
    }

    #[test]
    fn a_multi_line_answer_can_arrive_in_pieces() {
        let whole = b"STAT a 1\r\nSTAT b 2\r\nEND\r\n";
        let mut buf = BytesMut::new();
        let mut p = Partial::default();
        let mut got = None;
        for b in whole {
            buf.extend_from_slice(&[*b]);
            if let Some(r) = parse(&mut buf, &Kind::Stats, &mut p).unwrap() {
                got = Some(r);
            }
        }
        assert_eq!(
            got,
            Some(Resp::Stats(vec![
                ("a".into(), "1".into()),
                ("b".into(), "2".into())
            ]))
        );
    }
}

//! Redis as a writethrough cache.
//!
//! [`RedisCache`] implements [`CacheStore`](writethrough_core::backend::CacheStore)
//! on one Redis server through redis-rs's multiplexed, self-reconnecting
//! [`ConnectionManager`](redis::aio::ConnectionManager):
//!
//! | `CacheStore` call      | Redis                                                      |
//! |------------------------|------------------------------------------------------------|
//! | `get`                  | `GET`                                                      |
//! | `get_many`             | `MGET`                                                     |
//! | `set`, `set_many`      | `SET [PX ms]`, pipelined                                   |
//! | `set_if_newer`         | `EVALSHA` of the fencing script                            |
//! | `set_many_if_newer`    | one `EVALSHA` per 128 keys, pipelined                      |
//! | `replace_if_unchanged` | `EVALSHA` of a compare-and-set on the whole value          |
//! | `delete`               | `DEL`                                                      |
//! | `clear(prefix)`        | `SCAN MATCH <escaped prefix>* COUNT 1000` + `UNLINK` pages |
//! | `ping`                 | `PING`                                                     |
//!
//! # Fencing
//!
//! A fenced write is a Lua script that reads the version in the stored
//! entry's header (see [`writethrough_core::backend::codec`]) and writes only if
//! [`codec::replaces`](writethrough_core::backend::codec::replaces) would: nothing
//! stored, bytes that are not an entry (another type, wrong magic or kind,
//! non-digits, too short, a version past `u64::MAX`), or a strictly lower
//! version. Versions are compared exactly as two 10-digit halves. One call
//! fences up to 128 keys in order (a batch of 100 is one script run on the
//! server instead of 100); on a Redis Cluster the
//! keys of one call would have to share a slot, so batches would be grouped
//! by slot first. When the server has
//! forgotten the script (`NOSCRIPT` after a restart or `SCRIPT FLUSH`) the
//! adapter loads it and resends the calls that failed, in the same order.
//!
//! # Failures
//!
//! Driver errors map to writethrough errors in one function: connection
//! refused, reset or dropped are [`ErrorKind::Unavailable`](writethrough_core::ErrorKind::Unavailable)
//! (temporary), no reply in time is [`ErrorKind::Timeout`](writethrough_core::ErrorKind::Timeout),
//! anything else [`ErrorKind::Backend`](writethrough_core::ErrorKind::Backend).
//! The adapter does not retry: the engine's retry, breaker and resync do
//! that once, for every backend.
//!
//! # TLS
//!
//! `rediss://` URLs need the crate feature `tls`: rustls, checking the
//! server against the platform's root certificates (`SSL_CERT_FILE` /
//! `SSL_CERT_DIR` add a private CA). `rediss://host/#insecure` skips the
//! check and needs the feature `tls-insecure`. Without the feature such URLs
//! fail with [`ErrorKind::Config`](writethrough_core::ErrorKind::Config),
//! naming it.

mod cache;
mod cluster;
mod config;
mod error;
mod script;

pub use cache::{MAX_TTL, RedisCache};
pub use config::{DEFAULT_MAX_VALUE_LEN, MAX_KEY_LEN, REDIS_MAX_VALUE_LEN, RedisConfig};

/// The Lua source of the fencing script behind `set_if_newer` and
/// `set_many_if_newer`, for operators who want to read what runs on their
/// server. For each key of `KEYS`, in order, five arguments: the entry; the
/// new version's high and low 10 decimal digits; the TTL in milliseconds,
/// `0` for none; the entry's epoch. Returns one integer per key: 1 when it
/// stored the entry, 0 when the stored entry is as new or newer. A batch
/// is one call per 128 keys.
pub const FENCING_SCRIPT: &str = script::FENCED_SET;

/// The Lua source of the compare-and-set behind `replace_if_unchanged`.
/// `KEYS[1]` the key; `ARGV[1]` the bytes expected; `ARGV[2]` the new
/// entry; `ARGV[3]` the TTL in milliseconds, `0` for none. Returns 1 when
/// it replaced the expected bytes, 0 when the key held anything else.
pub const REPLACE_SCRIPT: &str = script::REPLACE_IF_UNCHANGED;

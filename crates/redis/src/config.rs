//! How to reach the server and how long to wait for it.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use writethrough_core::{Error, ErrorKind, Result};

/// The largest value Redis accepts (its `proto-max-bulk-len` default).
pub const REDIS_MAX_VALUE_LEN: usize = 512 << 20;

/// The default largest cache entry: 16 MiB.
///
/// Redis itself takes 512 MiB ([`REDIS_MAX_VALUE_LEN`]), but every call of a
/// [`RedisCache`](crate::RedisCache) shares one multiplexed connection: a
/// huge entry stalls every other request behind it for as long as it takes
/// to send, which turns into timeouts for unrelated keys. 16 MiB goes out in
/// a few milliseconds on a local network; raise it per cache with
/// [`RedisConfig::with_max_value_len`] if you must.
pub const DEFAULT_MAX_VALUE_LEN: usize = 16 << 20;

/// The longest key a [`RedisCache`](crate::RedisCache) accepts: 8 KiB.
///
/// Redis would take 512 MiB, but a key is sent with every call and stored in
/// the keyspace; engine keys are `namespace:table:primary-key`, far shorter.
pub const MAX_KEY_LEN: usize = 8 << 10;

/// Where a [`RedisCache`](crate::RedisCache) connects and how long it waits.
///
/// Built from a URL:
///
/// * `redis://[user][:password@]host[:port][/db]`
/// * `rediss://...` — TLS, with the crate feature `tls`; the server's
///   certificate is checked against the platform's roots (`SSL_CERT_FILE`
///   or `SSL_CERT_DIR` add a private CA). `rediss://host/#insecure` skips
///   the check and needs the feature `tls-insecure`.
/// * `redis+unix:///path/to/redis.sock[?db=N&user=U&pass=P]`, or `unix:///...`
///
/// `Debug` never shows the password.
///
/// ```
/// use std::time::Duration;
/// use writethrough_redis::RedisConfig;
///
/// let config = RedisConfig::from_url("redis://:s3cret@127.0.0.1:6379/2")
///     .unwrap()
///     .with_response_timeout(Duration::from_millis(250));
/// assert!(!format!("{config:?}").contains("s3cret"));
/// assert!(RedisConfig::from_url("http://example.org").is_err());
/// ```
#[derive(Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The server's URL.
    pub url: String,
    /// How long one connection attempt may take (default 1 s).
    #[serde(with = "millis", default = "default_connect_timeout")]
    pub connection_timeout: Duration,
    /// How long one call waits for its reply before it fails with
    /// [`ErrorKind::Timeout`] (default 1 s).
    #[serde(with = "millis", default = "default_response_timeout")]
    pub response_timeout: Duration,
    /// How many times a reconnection retries, with exponential backoff from
    /// 50 ms, before the calls waiting on it fail with
    /// [`ErrorKind::Unavailable`] (default 2). Kept small on purpose: the
    /// engine retries and opens its circuit breaker, and a cache call that
    /// waits seconds for a dead server helps nobody. The next call starts a
    /// new reconnection.
    #[serde(default = "default_reconnect_retries")]
    pub reconnect_retries: usize,
    /// The largest entry accepted, in bytes (default
    /// [`DEFAULT_MAX_VALUE_LEN`], at most [`REDIS_MAX_VALUE_LEN`]).
    #[serde(default = "default_max_value_len")]
    pub max_value_len: usize,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_reconnect_retries() -> usize {
    2
}
fn default_max_value_len() -> usize {
    DEFAULT_MAX_VALUE_LEN
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// The URL schemes this crate connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Tcp,
    Tls,
    Unix,
    /// `redis+cluster://`, or `rediss+cluster://` (`tls` true).
    Cluster {
        tls: bool,
    },
}

fn scheme_of(url: &str) -> Option<Scheme> {
    let (scheme, _) = url.split_once("://")?;
    match scheme.to_ascii_lowercase().as_str() {
        "redis" => Some(Scheme::Tcp),
        "rediss" => Some(Scheme::Tls),
        "redis+unix" | "unix" => Some(Scheme::Unix),
        "redis+cluster" => Some(Scheme::Cluster { tls: false }),
        "rediss+cluster" => Some(Scheme::Cluster { tls: true }),
        _ => None,
    }
}

/// What [`RedisConfig::validate`] builds: a client for one server, or for a
/// cluster from its seed nodes.
// Built once per connect and taken apart at once: the size does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Target {
    Node(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Node(_) => "Target::Node",
            Target::Cluster(_) => "Target::Cluster",
        })
    }
}

/// The seed nodes of a `redis+cluster://[user:pass@]h1:p1,h2:p2[/?query]`
/// URL, each as a one-node URL with the same credentials and query.
pub(crate) fn cluster_seeds(url: &str, tls: bool) -> std::result::Result<Vec<String>, String> {
    let rest = url.split_once("://").map_or("", |(_, r)| r);
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let tail = tail.strip_prefix('/').unwrap_or(tail);
    if !(tail.is_empty() || tail.starts_with('?') || tail.starts_with('#')) {
        return Err(
            "a cluster URL names no database: Redis Cluster has database 0 only".to_string(),
        );
    }
    let scheme = if tls { "rediss" } else { "redis" };
    let mut seeds = Vec::new();
    for host in hosts.split(',') {
        let host = host.trim();
        if host.is_empty() {
            return Err("the cluster URL has an empty seed node".to_string());
        }
        let auth = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        seeds.push(format!("{scheme}://{auth}{host}/{tail}"));
    }
    Ok(seeds)
}

fn config_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, message)
        .with_backend("redis")
        .with_operation("cache.connect")
}

impl RedisConfig {
    /// A configuration for `url` with the default timeouts and limits.
    ///
    /// Fails with [`ErrorKind::Config`] for a URL that is not one of the
    /// forms above, and for `rediss://` when the crate was built without its
    /// `tls` feature.
    pub fn from_url(url: impl Into<String>) -> Result<Self> {
        let config = RedisConfig {
            url: url.into(),
            connection_timeout: default_connect_timeout(),
            response_timeout: default_response_timeout(),
            reconnect_retries: default_reconnect_retries(),
            max_value_len: default_max_value_len(),
        };
        config.validate()?;
        Ok(config)
    }

    /// Sets how long one connection attempt may take.
    #[must_use]
    pub fn with_connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// Sets how long one call waits for its reply.
    #[must_use]
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Sets how many times a reconnection retries before waiting calls fail.
    #[must_use]
    pub fn with_reconnect_retries(mut self, retries: usize) -> Self {
        self.reconnect_retries = retries;
        self
    }

    /// Sets the largest entry accepted, in bytes (at most [`REDIS_MAX_VALUE_LEN`]).
    #[must_use]
    pub fn with_max_value_len(mut self, bytes: usize) -> Self {
        self.max_value_len = bytes;
        self
    }

    /// The URL with its password replaced by `***`, for logs.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// Checks the URL and the limits; the redis client is built from them.
    pub(crate) fn validate(&self) -> Result<Target> {
        let scheme = scheme_of(&self.url).ok_or_else(|| {
            config_error(format!(
                "{:?} is not a Redis URL (redis://, rediss://, redis+unix://, unix:// \
                 or redis+cluster://)",
                self.redacted_url()
            ))
        })?;
        let tls = matches!(scheme, Scheme::Tls | Scheme::Cluster { tls: true });
        if tls && !cfg!(feature = "tls") {
            return Err(config_error(
                "rediss:// needs TLS: enable the `tls` feature of writethrough-redis",
            ));
        }
        if tls && self.url.ends_with("#insecure") && !cfg!(feature = "tls-insecure") {
            return Err(config_error(
                "rediss://...#insecure skips certificate checks: enable the `tls-insecure` \
                 feature of writethrough-redis to allow it",
            ));
        }
        if self.max_value_len == 0 || self.max_value_len > REDIS_MAX_VALUE_LEN {
            return Err(config_error(format!(
                "max_value_len is {}; Redis takes 1 to {REDIS_MAX_VALUE_LEN} bytes",
                self.max_value_len
            )));
        }
        if self.response_timeout.is_zero() || self.connection_timeout.is_zero() {
            return Err(config_error("timeouts must be longer than zero"));
        }
        // The driver's message may quote the URL; say what failed without it.
        let refused = |e: redis::RedisError| {
            config_error(format!(
                "cannot use {:?}: {}",
                self.redacted_url(),
                e.detail().unwrap_or(e.category())
            ))
        };
        if let Scheme::Cluster { tls } = scheme {
            let seeds = cluster_seeds(&self.url, tls).map_err(|why| {
                config_error(format!("cannot use {:?}: {why}", self.redacted_url()))
            })?;
            return redis::cluster::ClusterClientBuilder::new(seeds)
                .connection_timeout(self.connection_timeout)
                .response_timeout(self.response_timeout)
                // Redirections (`MOVED`, `ASK`) use up retries too: a few
                // more than a single server needs, for a failover's.
                .retries(u32::try_from(self.reconnect_retries + 4).unwrap_or(u32::MAX))
                .min_retry_wait(50)
                .max_retry_wait(1000)
                .build()
                .map(Target::Cluster)
                .map_err(refused);
        }
        redis::Client::open(self.url.as_str())
            .map(Target::Node)
            .map_err(refused)
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.redacted_url())
            .field("connection_timeout", &self.connection_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("reconnect_retries", &self.reconnect_retries)
            .field("max_value_len", &self.max_value_len)
            .finish()
    }
}

/// Hides the password of `scheme://user:password@host` and of a unix URL's
/// `pass=` query parameter.
fn redact(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let rest = match url.split_once("://") {
        Some((scheme, rest)) => {
            out.push_str(scheme);
            out.push_str("://");
            rest
        }
        None => url,
    };
    // The authority ends at the first '/', '?' or '#'; its userinfo at the last '@' in it.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            match userinfo.split_once(':') {
                Some((user, _password)) => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                None => out.push_str(userinfo),
            }
            out.push('@');
            out.push_str(host);
        }
        None => out.push_str(authority),
    }
    match tail.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let (query, fragment) = match query.split_once('#') {
                Some((q, frag)) => (q, Some(frag)),
                None => (query, None),
            };
            for (i, pair) in query.split('&').enumerate() {
                if i > 0 {
                    out.push('&');
                }
                match pair.split_once('=') {
                    Some((k, _))
                        if k.eq_ignore_ascii_case("pass") || k.eq_ignore_ascii_case("password") =>
                    {
                        out.push_str(k);
                        out.push_str("=***");
                    }
                    _ => out.push_str(pair),
                }
            }
            if let Some(frag) = fragment {
                out.push('#');
                out.push_str(frag);
            }
        }
        None => out.push_str(tail),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_debug_output() {
        for (url, shown) in [
            (
                "redis://:hunter2@127.0.0.1:6379/1",
                "redis://:***@127.0.0.1:6379/1",
            ),
            (
                "redis://app:hunter2@cache.internal",
                "redis://app:***@cache.internal",
            ),
            (
                "redis://app:p%40ss@h:1/0?protocol=resp3",
                "redis://app:***@h:1/0?protocol=resp3",
            ),
            (
                "redis+unix:///run/redis.sock?db=2&pass=hunter2",
                "redis+unix:///run/redis.sock?db=2&pass=***",
            ),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://user@h", "redis://user@h"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
            let config = RedisConfig::from_url(url).unwrap();
            let debug = format!("{config:?}");
            assert!(!debug.contains("hunter2"), "{debug}");
            assert!(!debug.contains("p%40ss"), "{debug}");
        }
    }

    #[test]
    fn cluster_urls_name_every_seed_with_the_same_credentials() {
        assert_eq!(
            cluster_seeds("redis+cluster://u:pw@h1:1,h2:2/?protocol=resp3", false).unwrap(),
            vec![
                "redis://u:pw@h1:1/?protocol=resp3",
                "redis://u:pw@h2:2/?protocol=resp3"
            ]
        );
        assert_eq!(
            cluster_seeds("rediss+cluster://h1:1", true).unwrap(),
            vec!["rediss://h1:1/"]
        );
        for bad in [
            "redis+cluster://",
            "redis+cluster://h1:1,,h2:2",
            "redis+cluster://h:1/2",
        ] {
            assert!(cluster_seeds(bad, false).is_err(), "{bad}");
            assert!(RedisConfig::from_url(bad).is_err(), "{bad}");
        }
        let config = RedisConfig::from_url("redis+cluster://app:hunter2@h1:1,h2:2").unwrap();
        assert_eq!(config.redacted_url(), "redis+cluster://app:***@h1:1,h2:2");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn tcp_and_unix_urls_are_accepted() {
        for url in [
            "redis://127.0.0.1",
            "REDIS://localhost:7000/3",
            "redis+unix:///tmp/redis.sock",
            "unix:///tmp/redis.sock?db=1",
        ] {
            assert!(RedisConfig::from_url(url).is_ok(), "{url}");
        }
    }

    #[test]
    fn foreign_and_broken_urls_are_config_errors() {
        for url in [
            "http://127.0.0.1",
            "127.0.0.1:6379",
            "",
            "memcache://h",
            "redis://",
            "redis://:pw@0.0.0.0",
        ] {
            let e = RedisConfig::from_url(url).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{url}: {e}");
            assert!(!e.to_string().contains(":pw@"), "{e}");
        }
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn rediss_without_the_tls_feature_names_the_feature() {
        let e = RedisConfig::from_url("rediss://127.0.0.1:6380").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("`tls` feature"), "{e}");
    }

    #[cfg(feature = "tls")]
    #[test]
    fn rediss_with_the_tls_feature_is_accepted() {
        assert!(RedisConfig::from_url("rediss://127.0.0.1:6380").is_ok());
        let insecure = RedisConfig::from_url("rediss://127.0.0.1:6380/#insecure");
        if cfg!(feature = "tls-insecure") {
            assert!(insecure.is_ok());
        } else {
            let e = insecure.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config);
            assert!(e.to_string().contains("`tls-insecure` feature"), "{e}");
        }
    }

    #[test]
    fn limits_outside_what_redis_takes_are_refused() {
        let base = RedisConfig::from_url("redis://127.0.0.1").unwrap();
        for bad in [0, REDIS_MAX_VALUE_LEN + 1] {
            let e = base.clone().with_max_value_len(bad).validate().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config);
        }
        let e = base
            .clone()
            .with_response_timeout(Duration::ZERO)
            .validate()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(
            base.with_max_value_len(REDIS_MAX_VALUE_LEN)
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn config_round_trips_through_serde_with_millisecond_durations() {
        let c = RedisConfig::from_url("redis://127.0.0.1")
            .unwrap()
            .with_response_timeout(Duration::from_millis(250));
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["response_timeout"], 250);
        let back: RedisConfig =
            serde_json::from_value(serde_json::json!({"url": "redis://h"})).unwrap();
        assert_eq!(back.response_timeout, Duration::from_secs(1));
        assert_eq!(back.max_value_len, DEFAULT_MAX_VALUE_LEN);
    }
}

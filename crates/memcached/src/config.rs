//! [`MemcachedConfig`]: which servers, and how to talk to them.

use std::time::Duration;

use writethrough_core::{Error, ErrorKind, Result};

/// How to reach a memcached tier.
///
/// Parse it from a URL with [`MemcachedConfig::from_url`]:
///
/// ```
/// use std::time::Duration;
/// use writethrough_memcached::MemcachedConfig;
///
/// let c = MemcachedConfig::from_url(
///     "memcached://10.0.0.1:11211,10.0.0.2?timeout=250ms&connections=2",
/// )
/// .unwrap();
/// assert_eq!(c.servers, ["10.0.0.1:11211", "10.0.0.2:11211"]);
/// assert_eq!(c.timeout, Duration::from_millis(250));
/// assert_eq!(c.connections, 2);
/// ```
///
/// Query parameters (all optional): `timeout` and `connect_timeout`
/// (`250ms`, `2s`, or a number of milliseconds), `connections` (pipelined
/// connections per server), `cas_retries` (how often a fenced write retries
/// a lost compare-and-swap), `max_value_len` (bytes; overrides the limit read
/// from the servers' `item_size_max`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct MemcachedConfig {
    /// The servers, as `host:port`. Keys are placed on them by rendezvous
    /// hashing of these names, so every client must spell them alike.
    pub servers: Vec<String>,
    /// Longest wait for any one operation, connecting included (default 1 s).
    #[serde(with = "millis")]
    pub timeout: Duration,
    /// Longest wait to open a connection (default 1 s).
    #[serde(with = "millis")]
    pub connect_timeout: Duration,
    /// Pipelined connections per server (default 1). Each carries any number
    /// of requests at once; a second one helps only when one connection's
    /// memcached worker thread is saturated.
    pub connections: usize,
    /// How many times a fenced write retries after losing a race (default 32).
    pub cas_retries: u32,
    /// Largest entry accepted, in bytes. `None` (the default) reads
    /// `item_size_max` from the servers and keeps a margin for memcached's
    /// item header.
    pub max_value_len: Option<usize>,
}

impl Default for MemcachedConfig {
    fn default() -> Self {
        MemcachedConfig {
            servers: vec!["127.0.0.1:11211".into()],
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            connections: 1,
            cas_retries: 32,
            max_value_len: None,
        }
    }
}

mod millis {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Duration, D::Error> {
        let ms = <u64 as serde::Deserialize>::deserialize(d)?;
        Ok(Duration::from_millis(ms))
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, msg).with_backend("memcached")
}

fn parse_duration(name: &str, v: &str) -> Result<Duration> {
    let (num, unit) = match v.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => v.split_at(i),
        None => (v, "ms"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| bad(format!("{name}={v:?} is not a duration like 500ms or 2s")))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        _ => return Err(bad(format!("{name}={v:?}: the unit must be ms or s"))),
    };
    if d.is_zero() {
        return Err(bad(format!("{name} must be longer than zero")));
    }
    Ok(d)
}

fn parse_number<T: std::str::FromStr>(name: &str, v: &str) -> Result<T> {
    v.parse()
        .map_err(|_| bad(format!("{name}={v:?} is not a whole number")))
}

fn parse_server(s: &str) -> Result<String> {
    let s = s
        .strip_prefix("memcached://")
        .or_else(|| s.strip_prefix("memcache://"))
        .unwrap_or(s);
    let s = s.trim_end_matches('/');
    if s.is_empty() {
        return Err(bad("a server in the URL is empty"));
    }
    if s.contains(['/', '@', ' ']) {
        return Err(bad(format!(
            "{s:?} is not host:port (memcached URLs have no path or credentials)"
        )));
    }
    // `[v6]:port`, `[v6]`, `host:port`, `host`.
    let has_port = if let Some(rest) = s.strip_prefix('[') {
        match rest.split_once(']') {
            Some((_, "")) => false,
            Some((_, p)) if p.starts_with(':') => true,
            _ => return Err(bad(format!("{s:?} is not a valid [IPv6]:port"))),
        }
    } else {
        match s.matches(':').count() {
            0 => false,
            1 => true,
            _ => return Err(bad(format!("write the IPv6 address {s:?} in brackets"))),
        }
    };
    if has_port {
        let port = s.rsplit_once(':').map(|(_, p)| p).unwrap_or_default();
        parse_number::<u16>("port", port)?;
        Ok(s.to_owned())
    } else {
        Ok(format!("{s}:11211"))
    }
}

impl MemcachedConfig {
    /// Parses `memcached://host[:port][,host[:port]...][?param=value&...]`.
    ///
    /// Each server may repeat the scheme (`memcached://a:1,memcached://b:2`);
    /// the port defaults to 11211; `memcache://` is accepted too.
    pub fn from_url(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("memcached://")
            .or_else(|| url.strip_prefix("memcache://"))
            .ok_or_else(|| {
                bad(format!(
                    "{url:?} does not start with memcached:// (e.g. memcached://127.0.0.1:11211)"
                ))
            })?;
        let (hosts, query) = match rest.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (rest, None),
        };
        let mut c = MemcachedConfig {
            servers: hosts
                .split(',')
                .map(parse_server)
                .collect::<Result<Vec<_>>>()?,
            ..MemcachedConfig::default()
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "timeout" => c.timeout = parse_duration(k, v)?,
                "connect_timeout" => c.connect_timeout = parse_duration(k, v)?,
                "connections" => c.connections = parse_number(k, v)?,
                "cas_retries" => c.cas_retries = parse_number(k, v)?,
                "max_value_len" => c.max_value_len = Some(parse_number(k, v)?),
                _ => {
                    return Err(bad(format!(
                        "unknown parameter {k:?} (known: timeout, connect_timeout, \
                         connections, cas_retries, max_value_len)"
                    )));
                }
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the values are usable.
    pub fn validate(&self) -> Result<()> {
        if self.servers.is_empty() {
            return Err(bad("no memcached server given"));
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.servers {
            if !seen.insert(s) {
                return Err(bad(format!("server {s} is listed twice")));
            }
        }
        if !(1..=64).contains(&self.connections) {
            return Err(bad("connections must be between 1 and 64"));
        }
        if self.timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(bad("timeouts must be longer than zero"));
        }
        if self.max_value_len == Some(0) {
            return Err(bad("max_value_len must be more than zero"));
        }
        Ok(())
    }
}

impl std::str::FromStr for MemcachedConfig {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_url(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_one_or_many_servers_parse() {
        let c = MemcachedConfig::from_url("memcached://127.0.0.1:11211").unwrap();
        assert_eq!(c.servers, ["127.0.0.1:11211"]);
        assert_eq!(c, MemcachedConfig::default());
        let c = MemcachedConfig::from_url("memcache://127.0.0.1").unwrap();
        assert_eq!(c, MemcachedConfig::default());
        let c = MemcachedConfig::from_url(
            "memcached://h1:1,memcached://h2,[::1]:3,[::1]?timeout=2s&connect_timeout=300\
             &connections=4&cas_retries=5&max_value_len=1000",
        )
        .unwrap();
        assert_eq!(c.servers, ["h1:1", "h2:11211", "[::1]:3", "[::1]:11211"]);
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert_eq!(c.connect_timeout, Duration::from_millis(300));
        assert_eq!(c.connections, 4);
        assert_eq!(c.cas_retries, 5);
        assert_eq!(c.max_value_len, Some(1000));
    }

    #[test]
    fn bad_urls_are_config_errors() {
        for bad in [
            "redis://h:1",
            "memcached://",
            "memcached://h:1,",
            "memcached://h:port",
            "memcached://h:99999",
            "memcached://::1",
            "memcached://user:pw@h:1",
            "memcached://h:1/db",
            "memcached://h:1?timeout=0",
            "memcached://h:1?timeout=5m",
            "memcached://h:1?connections=0",
            "memcached://h:1?nope=1",
            "memcached://h:1,h:1",
        ] {
            let e = MemcachedConfig::from_url(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{bad}");
        }
    }

    #[test]
    fn config_round_trips_through_serde() {
        let c = MemcachedConfig::from_url("memcached://a:1,b:2?timeout=250").unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("\"timeout\":250"), "{json}");
        let back: MemcachedConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
    }
}

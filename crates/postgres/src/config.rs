//! Settings of a [`crate::PostgresStore`]: where to connect and how to pool.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use writethrough_core::{Error, ErrorKind, Result};

/// Settings of a [`crate::PostgresStore`].
///
/// Parse one from a URL with [`PostgresConfig::from_url`] (or `str::parse`):
/// everything libpq-style that sqlx understands (`sslmode`, `application_name`,
/// `options`, ...) plus these pool settings as query parameters:
///
/// | parameter | meaning | default |
/// | --- | --- | --- |
/// | `max_connections` | pool size | 10 |
/// | `min_connections` | connections kept open | 0 |
/// | `acquire_timeout` | wait for a free connection before `PoolExhausted` | `5s` |
/// | `idle_timeout` | close connections idle this long (`off` to keep) | `10m` |
/// | `max_lifetime` | recycle connections this old (`off` to keep) | `30m` |
/// | `ping_idle_after` | ping a pooled connection idle this long before using it (`off` never) | `5s` |
/// | `statement_timeout` | server-side limit per statement, lock waits included (`off`) | off |
/// | `idle_in_transaction_timeout` | the server ends a session idle inside a transaction this long (`off`) | `30s` |
/// | `coalesce_lanes` | single fenced upserts running at once before later ones queue and share one statement (`off` or `0` never coalesces) | 4 |
/// | `coalesce_max` | most writes one coalesced statement carries | 128 |
///
/// Durations are written `250ms`, `5s`, `2m`, `1h`, or a bare number of seconds.
///
/// ```
/// use std::time::Duration;
/// use writethrough_postgres::PostgresConfig;
///
/// let cfg = PostgresConfig::from_url(
///     "postgres://app:secret@db.internal:5432/shop?max_connections=20&acquire_timeout=2s",
/// )
/// .unwrap()
/// .min_connections(2);
/// assert_eq!(cfg.max_connections, 20);
/// assert_eq!(cfg.acquire_timeout, Duration::from_secs(2));
/// assert!(!format!("{cfg:?}").contains("secret"));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct PostgresConfig {
    connect: PgConnectOptions,
    has_password: bool,
    /// Most connections in the pool.
    pub max_connections: u32,
    /// Connections the pool keeps open even when idle.
    pub min_connections: u32,
    /// How long a call waits for a free connection before failing with
    /// `ErrorKind::PoolExhausted`.
    pub acquire_timeout: Duration,
    /// Pooled connections idle this long are closed.
    pub idle_timeout: Option<Duration>,
    /// Connections older than this are replaced.
    pub max_lifetime: Option<Duration>,
    /// A pooled connection idle at least this long is pinged before it is
    /// handed out, so that a server restart is noticed before a write is
    /// sent (where a broken connection would make its outcome unknown).
    /// Busy connections skip the ping and keep a write at one round trip.
    pub ping_idle_after: Option<Duration>,
    /// The server's `statement_timeout`: bounds every statement, waits for
    /// key locks included; exceeding it fails with `ErrorKind::Timeout`.
    pub statement_timeout: Option<Duration>,
    /// The server's `idle_in_transaction_session_timeout`: a transaction left
    /// open and idle this long is ended by the server, releasing its locks.
    pub idle_in_transaction_timeout: Option<Duration>,
    /// Write coalescing: while this many single fenced upserts are running,
    /// later ones queue and the next to finish carries the queue in one
    /// statement and one commit (one WAL flush for many writers). `0`
    /// turns it off. An uncontended write never waits for it.
    pub coalesce_lanes: usize,
    /// Most writes one coalesced statement carries.
    pub coalesce_max: usize,
}

const POOL_PARAMS: &[&str] = &[
    "max_connections",
    "min_connections",
    "acquire_timeout",
    "idle_timeout",
    "max_lifetime",
    "ping_idle_after",
    "statement_timeout",
    "idle_in_transaction_timeout",
    "coalesce_lanes",
    "coalesce_max",
];

fn config_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, msg).with_backend("postgres")
}

impl PostgresConfig {
    /// Default pool settings for the server described by `connect`.
    pub fn new(connect: PgConnectOptions) -> Self {
        PostgresConfig {
            connect,
            has_password: false,
            max_connections: 10,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            ping_idle_after: Some(Duration::from_secs(5)),
            statement_timeout: None,
            idle_in_transaction_timeout: Some(Duration::from_secs(30)),
            coalesce_lanes: 4,
            coalesce_max: 128,
        }
    }

    /// Parses a `postgres://` or `postgresql://` URL with optional pool
    /// parameters (see the type's documentation).
    pub fn from_url(url: &str) -> Result<Self> {
        let lower = url.get(..14).unwrap_or(url).to_ascii_lowercase();
        if !(lower.starts_with("postgres://") || lower.starts_with("postgresql://")) {
            return Err(config_err(format!(
                "{:?} is not a PostgreSQL URL: it must start with postgres:// or postgresql://",
                redact_url(url)
            )));
        }
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let mut pool = Vec::new();
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if POOL_PARAMS.contains(&k) {
                pool.push((k, v));
            } else {
                rest.push(pair);
            }
        }
        let sqlx_url = if rest.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        let connect = PgConnectOptions::from_str(&sqlx_url).map_err(|e| {
            config_err(format!("cannot parse {:?}", redact_url(url))).with_source(e)
        })?;
        let mut cfg = PostgresConfig::new(connect);
        cfg.has_password =
            url_has_password(base) || rest.iter().any(|p| p.starts_with("password="));
        for (k, v) in pool {
            let bad = |why: &str| config_err(format!("URL parameter {k}={v:?}: {why}"));
            match k {
                "max_connections" | "min_connections" => {
                    let n: u32 = v.parse().map_err(|_| bad("not a whole number"))?;
                    if k == "max_connections" {
                        if n == 0 {
                            return Err(bad("must be at least 1"));
                        }
                        cfg.max_connections = n;
                    } else {
                        cfg.min_connections = n;
                    }
                }
                "coalesce_lanes" => {
                    cfg.coalesce_lanes = match v {
                        "off" => 0,
                        _ => v.parse().map_err(|_| bad("not a whole number or off"))?,
                    }
                }
                "coalesce_max" => {
                    let n: usize = v.parse().map_err(|_| bad("not a whole number"))?;
                    if n < 2 {
                        return Err(bad("must be at least 2"));
                    }
                    cfg.coalesce_max = n;
                }
                "acquire_timeout" => {
                    cfg.acquire_timeout =
                        parse_duration(v).ok_or_else(|| bad("not a duration like 250ms, 5s, 2m"))?
                }
                _ => {
                    let d = parse_opt_duration(v)
                        .ok_or_else(|| bad("not a duration like 250ms, 5s, 2m, or off"))?;
                    match k {
                        "idle_timeout" => cfg.idle_timeout = d,
                        "max_lifetime" => cfg.max_lifetime = d,
                        "ping_idle_after" => cfg.ping_idle_after = d,
                        "statement_timeout" => cfg.statement_timeout = d,
                        _ => cfg.idle_in_transaction_timeout = d,
                    }
                }
            }
        }
        Ok(cfg)
    }

    /// The sqlx connection options (host, user, database, TLS, ...).
    pub fn connect_options(&self) -> &PgConnectOptions {
        &self.connect
    }

    /// Replaces the sqlx connection options.
    #[must_use]
    pub fn with_connect_options(mut self, connect: PgConnectOptions) -> Self {
        self.connect = connect;
        self
    }

    /// Sets the password.
    #[must_use]
    pub fn password(mut self, password: &str) -> Self {
        self.connect = self.connect.password(password);
        self.has_password = true;
        self
    }

    /// Sets the `application_name` the server shows for these connections.
    #[must_use]
    pub fn application_name(mut self, name: &str) -> Self {
        self.connect = self.connect.application_name(name);
        self
    }

    /// Sets the pool size (at least 1).
    #[must_use]
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Sets the connections kept open when idle.
    #[must_use]
    pub fn min_connections(mut self, n: u32) -> Self {
        self.min_connections = n;
        self
    }

    /// Sets how long a call waits for a free connection.
    #[must_use]
    pub fn acquire_timeout(mut self, d: Duration) -> Self {
        self.acquire_timeout = d;
        self
    }

    /// Sets when idle connections are closed.
    #[must_use]
    pub fn idle_timeout(mut self, d: Option<Duration>) -> Self {
        self.idle_timeout = d;
        self
    }

    /// Sets when connections are recycled.
    #[must_use]
    pub fn max_lifetime(mut self, d: Option<Duration>) -> Self {
        self.max_lifetime = d;
        self
    }

    /// Sets how long a connection may sit idle before it is pinged on acquire.
    #[must_use]
    pub fn ping_idle_after(mut self, d: Option<Duration>) -> Self {
        self.ping_idle_after = d;
        self
    }

    /// Sets the server-side statement timeout.
    #[must_use]
    pub fn statement_timeout(mut self, d: Option<Duration>) -> Self {
        self.statement_timeout = d;
        self
    }

    /// Sets the server-side idle-in-transaction timeout.
    #[must_use]
    pub fn idle_in_transaction_timeout(mut self, d: Option<Duration>) -> Self {
        self.idle_in_transaction_timeout = d;
        self
    }

    /// Sets how many single fenced upserts run at once before later ones are
    /// coalesced (`0`: never).
    #[must_use]
    pub fn coalesce_lanes(mut self, n: usize) -> Self {
        self.coalesce_lanes = n;
        self
    }

    /// Sets the most writes one coalesced statement carries (at least 2).
    #[must_use]
    pub fn coalesce_max(mut self, n: usize) -> Self {
        self.coalesce_max = n.max(2);
        self
    }

    /// The connection options with the session settings the store relies on.
    pub(crate) fn session_options(&self) -> PgConnectOptions {
        let ms = |d: Duration| format!("{}ms", d.as_millis().max(1));
        // READ COMMITTED is what the version and lock scheme is built for
        // (see `sql.rs`); a database whose default is stricter would turn
        // concurrent upserts into serialization failures.
        let mut settings = vec![(
            "default_transaction_isolation".to_owned(),
            "read committed".to_owned(),
        )];
        // Marks the engine's own sessions: the triggers that track writes
        // made outside the engine (`external.rs`) skip what these write.
        settings.push((crate::external::ENGINE_SETTING.into(), "on".into()));
        if let Some(d) = self.statement_timeout {
            settings.push(("statement_timeout".into(), ms(d)));
        }
        if let Some(d) = self.idle_in_transaction_timeout {
            settings.push(("idle_in_transaction_session_timeout".into(), ms(d)));
        }
        self.connect.clone().options(settings)
    }
}

impl FromStr for PostgresConfig {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_url(s)
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.connect;
        f.debug_struct("PostgresConfig")
            .field("host", &c.get_host())
            .field("port", &c.get_port())
            .field("username", &c.get_username())
            .field("password", &self.has_password.then_some("***"))
            .field("database", &c.get_database())
            .field("max_connections", &self.max_connections)
            .field("min_connections", &self.min_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_lifetime", &self.max_lifetime)
            .field("ping_idle_after", &self.ping_idle_after)
            .field("statement_timeout", &self.statement_timeout)
            .field(
                "idle_in_transaction_timeout",
                &self.idle_in_transaction_timeout,
            )
            .field("coalesce_lanes", &self.coalesce_lanes)
            .field("coalesce_max", &self.coalesce_max)
            .finish()
    }
}

fn authority(base: &str) -> &str {
    let after = base.split_once("://").map_or(base, |(_, r)| r);
    after.split('/').next().unwrap_or(after)
}

fn url_has_password(base: &str) -> bool {
    authority(base)
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

/// `url` with the password (in the authority or as a parameter) replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    let auth = authority(url);
    if let Some((userinfo, _)) = auth.rsplit_once('@')
        && let Some((user, _)) = userinfo.split_once(':')
    {
        let start = url.find(auth).unwrap_or(0);
        out = format!(
            "{}{user}:***{}",
            &url[..start],
            &url[start + userinfo.len()..]
        );
    }
    if let Some((head, query)) = out.clone().split_once('?') {
        let q: Vec<String> = query
            .split('&')
            .map(|p| {
                if p.starts_with("password=") {
                    "password=***".to_owned()
                } else {
                    p.to_owned()
                }
            })
            .collect();
        out = format!("{head}?{}", q.join("&"));
    }
    out
}

fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" | "min" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    })
}

fn parse_opt_duration(s: &str) -> Option<Option<Duration>> {
    match s {
        "off" | "none" | "" => Some(None),
        _ => parse_duration(s).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_pool_parameters_parse_and_the_rest_goes_to_sqlx() {
        let cfg = PostgresConfig::from_url(
            "postgresql://u:p%40ss@h:6543/db?max_connections=3&sslmode=disable&acquire_timeout=250ms&statement_timeout=off&ping_idle_after=2m",
        )
        .unwrap();
        assert_eq!(cfg.max_connections, 3);
        assert_eq!(cfg.acquire_timeout, Duration::from_millis(250));
        assert_eq!(cfg.statement_timeout, None);
        assert_eq!(cfg.ping_idle_after, Some(Duration::from_secs(120)));
        assert_eq!(cfg.coalesce_lanes, 4);
        let off =
            PostgresConfig::from_url("postgres://h/db?coalesce_lanes=off&coalesce_max=9").unwrap();
        assert_eq!((off.coalesce_lanes, off.coalesce_max), (0, 9));
        assert_eq!(cfg.connect_options().get_host(), "h");
        assert_eq!(cfg.connect_options().get_port(), 6543);
        assert_eq!(cfg.connect_options().get_database(), Some("db"));
        assert_eq!(cfg.connect_options().get_username(), "u");
    }

    #[test]
    fn debug_and_errors_never_show_the_password() {
        let cfg = PostgresConfig::from_url("postgres://u:hunter2@h/db").unwrap();
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("***"), "{dbg}");
        let cfg = PostgresConfig::from_url("postgres://h/db?password=hunter2").unwrap();
        assert!(!format!("{cfg:?}").contains("hunter2"));
        let e =
            PostgresConfig::from_url("postgres://u:hunter2@h/db?max_connections=x").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = PostgresConfig::from_url("mysql://u:hunter2@h/db").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let no_pw = PostgresConfig::from_url("postgres://u@h/db").unwrap();
        assert!(format!("{no_pw:?}").contains("password: None"));
    }

    #[test]
    fn bad_pool_parameters_are_config_errors() {
        for url in [
            "postgres://h/db?max_connections=0",
            "postgres://h/db?acquire_timeout=soon",
            "postgres://h/db?idle_timeout=5x",
            "postgres://h/db?coalesce_lanes=many",
            "postgres://h/db?coalesce_max=1",
        ] {
            assert_eq!(
                PostgresConfig::from_url(url).unwrap_err().kind(),
                ErrorKind::Config,
                "{url}"
            );
        }
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("7ms"), Some(Duration::from_millis(7)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_opt_duration("off"), Some(None));
    }
}

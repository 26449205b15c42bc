//! Just enough URL handling for server URLs (`scheme://user@host:port/db`):
//! finding the host and port, and swapping them for a proxy's address.

use std::net::SocketAddr;

/// A URL cut around its `host:port` part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Parts<'a> {
    /// Everything before the host: scheme, `://` and `user[:password]@`.
    pub(crate) before: &'a str,
    /// The user name, if the URL has one.
    pub(crate) user: Option<&'a str>,
    /// The `host[:port]` part (for a list such as `a:1,b:2`, all of it).
    pub(crate) host_port: &'a str,
    /// Everything after the host: `/path?query#fragment`.
    pub(crate) after: &'a str,
}

impl<'a> Parts<'a> {
    pub(crate) fn parse(url: &'a str) -> Self {
        let authority_start = url.find("://").map_or(0, |i| i + 3);
        let rest = &url[authority_start..];
        let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..authority_len];
        let (user_info, host_port) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let before_len = authority_start + (authority.len() - host_port.len());
        let user = user_info
            .map(|info| info.split(':').next().unwrap_or(info))
            .filter(|user| !user.is_empty());
        Self {
            before: &url[..before_len],
            user,
            host_port,
            after: &rest[authority_len..],
        }
    }

    /// The first host and its port (`default_port` when the URL has none).
    pub(crate) fn host_and_port(&self, default_port: u16) -> Option<(String, u16)> {
        let first = self.host_port.split(',').next()?.trim();
        if first.is_empty() {
            return None;
        }
        if let Some(bracketed) = first.strip_prefix('[') {
            let (host, tail) = bracketed.split_once(']')?;
            let port = match tail.strip_prefix(':') {
                Some(port) => port.parse().ok()?,
                None if tail.is_empty() => default_port,
                None => return None,
            };
            return Some((host.to_owned(), port));
        }
        match first.rsplit_once(':') {
            Some((host, port)) => Some((host.to_owned(), port.parse().ok()?)),
            None => Some((first.to_owned(), default_port)),
        }
    }

    /// The database name: the first path segment, if any.
    pub(crate) fn database(&self) -> Option<&'a str> {
        let path = self.after.strip_prefix('/')?;
        let end = path.find(['/', '?', '#']).unwrap_or(path.len());
        Some(&path[..end]).filter(|db| !db.is_empty())
    }
}

/// `url` with its `host:port` replaced by `addr`.
pub(crate) fn with_addr(url: &str, addr: SocketAddr) -> String {
    let parts = Parts::parse(url);
    format!("{}{}{}", parts.before, addr, parts.after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_user_host_port_and_database() {
        let parts = Parts::parse("postgres://postgres:secret@db.local:5433/app?sslmode=disable");
        assert_eq!(parts.before, "postgres://postgres:secret@");
        assert_eq!(parts.user, Some("postgres"));
        assert_eq!(
            parts.host_and_port(5432),
            Some(("db.local".to_owned(), 5433))
        );
        assert_eq!(parts.database(), Some("app"));
        assert_eq!(parts.after, "/app?sslmode=disable");
    }

    #[test]
    fn falls_back_to_the_default_port_and_reads_ipv6_hosts() {
        assert_eq!(
            Parts::parse("redis://cache").host_and_port(6379),
            Some(("cache".to_owned(), 6379))
        );
        assert_eq!(
            Parts::parse("redis://[::1]:7000/0").host_and_port(6379),
            Some(("::1".to_owned(), 7000))
        );
        assert_eq!(
            Parts::parse("memcached://a:1,b:2").host_and_port(11211),
            Some(("a".to_owned(), 1))
        );
        assert_eq!(Parts::parse("redis://").host_and_port(6379), None);
    }

    #[test]
    fn replaces_only_the_host_and_port() {
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(
            with_addr("postgres://postgres@127.0.0.1:5432/postgres", addr),
            "postgres://postgres@127.0.0.1:4000/postgres"
        );
        assert_eq!(
            with_addr("redis://127.0.0.1:6379", addr),
            "redis://127.0.0.1:4000"
        );
        assert_eq!(with_addr("127.0.0.1:11211", addr), "127.0.0.1:4000");
        assert_eq!(
            with_addr("redis://u:p@[::1]:6379/2?x=1", addr),
            "redis://u:p@127.0.0.1:4000/2?x=1"
        );
    }
}

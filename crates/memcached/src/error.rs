//! The client's own failures, and the one function that turns them into
//! [`writethrough_core::Error`].

use std::time::Duration;

use writethrough_core::{Error, ErrorKind, Status};

/// What went wrong talking to a memcached server.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// Could not connect, or the socket failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The connection closed while the request was in flight or queued.
    #[error("the connection closed")]
    Closed,
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server answered `ERROR`, `CLIENT_ERROR ...` or `SERVER_ERROR ...`.
    #[error("the server answered {0:?}")]
    Server(String),
    /// Bytes that do not follow the protocol; the connection is dropped.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A fenced write lost the race this many times in a row.
    #[error("the compare-and-swap lost {0} races in a row")]
    Contention(u32),
}

/// The one mapping from client failures to writethrough errors.
///
/// Connection failures are `Unavailable` and timeouts `Timeout` (both
/// temporary); `SERVER_ERROR object too large` is `ValueTooLarge`; a CAS
/// loop that keeps losing is a temporary `Backend` error; any other answer
/// the server refuses with, or a broken stream, is `Backend`.
pub(crate) fn map_err(e: ClientError, operation: &'static str, server: &str) -> Error {
    let (kind, message) = match &e {
        ClientError::Io(_) | ClientError::Closed => (
            ErrorKind::Unavailable,
            format!("cannot reach memcached at {server}"),
        ),
        ClientError::Timeout(_) => (
            ErrorKind::Timeout,
            format!("memcached at {server} did not answer in time"),
        ),
        ClientError::Server(line) if line.contains("too large") => (
            ErrorKind::ValueTooLarge,
            format!("memcached at {server} refused the item as too large"),
        ),
        ClientError::Server(_) | ClientError::Protocol(_) => (
            ErrorKind::Backend,
            format!("memcached at {server} failed the command"),
        ),
        ClientError::Contention(_) => (
            ErrorKind::Backend,
            format!("memcached at {server}: too much contention on the key"),
        ),
    };
    let mut err = Error::new(kind, message)
        .with_operation(operation)
        .with_backend("memcached");
    if matches!(e, ClientError::Contention(_)) {
        err = err.with_status(Status::Temporary);
    }
    err.with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_maps_to_its_kind_and_status() {
        let cases = [
            (
                ClientError::Io(std::io::ErrorKind::ConnectionRefused.into()),
                ErrorKind::Unavailable,
                true,
            ),
            (ClientError::Closed, ErrorKind::Unavailable, true),
            (
                ClientError::Timeout(Duration::from_millis(5)),
                ErrorKind::Timeout,
                true,
            ),
            (
                ClientError::Server("SERVER_ERROR object too large for cache".into()),
                ErrorKind::ValueTooLarge,
                false,
            ),
            (
                ClientError::Server("SERVER_ERROR out of memory storing object".into()),
                ErrorKind::Backend,
                false,
            ),
            (
                ClientError::Protocol("junk".into()),
                ErrorKind::Backend,
                false,
            ),
            (ClientError::Contention(32), ErrorKind::Backend, true),
        ];
        for (e, kind, temporary) in cases {
            let text = e.to_string();
            let mapped = map_err(e, "cache.get", "127.0.0.1:1");
            assert_eq!(mapped.kind(), kind, "{text}");
            assert_eq!(mapped.is_temporary(), temporary, "{text}");
            assert_eq!(mapped.backend(), Some("memcached"));
            assert_eq!(mapped.operation(), "cache.get");
        }
    }
}

//! The one place where the driver's errors become writethrough errors.

use redis::{RedisError, ServerErrorKind, Value};
use writethrough_core::{Error, ErrorKind};

pub(crate) const BACKEND: &str = "redis";

/// Maps a driver error into the writethrough error of `operation`.
///
/// * the connection could not be made, was refused, dropped or broke:
///   [`ErrorKind::Unavailable`], temporary;
/// * no reply within the response or connection timeout: [`ErrorKind::Timeout`], temporary;
/// * the server says it cannot serve yet (`LOADING` after a restart,
///   `TRYAGAIN`, `MASTERDOWN`, `CLUSTERDOWN`), or a cluster redirection
///   (`MOVED`, `ASK`) outlasted the driver's retries:
///   [`ErrorKind::Unavailable`], temporary;
/// * the server refused our credentials or the client settings are unusable:
///   [`ErrorKind::Config`], permanent;
/// * anything else (a script error, `OOM`, `NOPERM`, a reply of the wrong
///   shape): [`ErrorKind::Backend`], permanent.
pub(crate) fn map_err(e: RedisError, operation: &'static str) -> Error {
    let (kind, message) = if e.is_timeout() {
        (ErrorKind::Timeout, "no reply within the timeout")
    } else if e.is_connection_refusal() || e.is_connection_dropped() || e.is_io_error() {
        (
            ErrorKind::Unavailable,
            "the server cannot be reached or dropped the connection",
        )
    } else {
        match e.kind() {
            redis::ErrorKind::Server(
                ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ClusterDown,
            ) => (ErrorKind::Unavailable, "the server cannot serve yet"),
            // A redirection left over after the driver's retries: the
            // cluster is moving the slot or failing over; try again.
            redis::ErrorKind::Server(ServerErrorKind::Moved | ServerErrorKind::Ask) => (
                ErrorKind::Unavailable,
                "the cluster is moving this key's slot or failing over",
            ),
            redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::InvalidClientConfig => (
                ErrorKind::Config,
                "the server refused the client's settings",
            ),
            _ => (ErrorKind::Backend, "the server refused the call"),
        }
    };
    Error::new(kind, message)
        .with_operation(operation)
        .with_backend(BACKEND)
        .with_source(e)
}

/// A reply whose shape the command cannot produce: a protocol mix-up, not bad input.
pub(crate) fn unexpected(operation: &'static str, reply: &Value) -> Error {
    Error::new(
        ErrorKind::Backend,
        format!("unexpected reply {}", describe(reply)),
    )
    .with_operation(operation)
    .with_backend(BACKEND)
}

/// A short description of a reply that never includes its payload, which
/// may be a user's data.
fn describe(v: &Value) -> String {
    match v {
        Value::Nil => "nil".into(),
        Value::Int(i) => format!("integer {i}"),
        Value::BulkString(b) => format!("bulk string of {} bytes", b.len()),
        Value::Array(a) => format!("array of {}", a.len()),
        Value::SimpleString(s) => format!("status {s:?}"),
        Value::Okay => "OK".into(),
        Value::ServerError(e) => format!("error {}", e.code()),
        _ => "of another type".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn io_failures_are_unavailable_and_temporary() {
        for k in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::UnexpectedEof,
            io::ErrorKind::NotFound,
            io::ErrorKind::Other,
        ] {
            let e = map_err(io::Error::from(k).into(), "cache.get");
            assert_eq!(e.kind(), ErrorKind::Unavailable, "{k:?}");
            assert!(e.is_temporary());
            assert_eq!(e.backend(), Some("redis"));
            assert_eq!(e.operation(), "cache.get");
        }
    }

    #[test]
    fn timeouts_are_timeouts() {
        let e = map_err(io::Error::from(io::ErrorKind::TimedOut).into(), "cache.set");
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(e.is_temporary());
    }

    #[test]
    fn other_driver_errors_are_backend_errors() {
        let e = map_err(
            RedisError::from((redis::ErrorKind::UnexpectedReturnType, "bad")),
            "cache.get",
        );
        assert_eq!(e.kind(), ErrorKind::Backend);
        assert!(!e.is_temporary());
        let e = map_err(
            RedisError::from((redis::ErrorKind::AuthenticationFailed, "WRONGPASS")),
            "cache.connect",
        );
        assert_eq!(e.kind(), ErrorKind::Config);
    }

    #[test]
    fn unexpected_replies_do_not_leak_payloads() {
        let e = unexpected("cache.get", &Value::BulkString(b"secret".to_vec()));
        assert_eq!(e.kind(), ErrorKind::Backend);
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}

//! The one place where sqlx errors become writethrough errors.

use writethrough_core::{Error, ErrorKind, Status};

/// SQLSTATE raised by `_wt_assert_absent` when a statement's snapshot missed
/// a row that a concurrent writer of the same key committed while the
/// statement waited for the key lock; the statement is rolled back and is
/// safe to run again.
pub(crate) const RETRY_SQLSTATE: &str = "WT001";

/// What the failed call was doing, which decides whether a lost connection
/// leaves the outcome unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Nothing that can commit: a read, a statement inside an open
    /// transaction, `BEGIN`, taking a connection from the pool.
    NoCommit,
    /// A `COMMIT`, or a write statement run in autocommit: if the
    /// connection breaks while it is in flight, the write may have committed.
    Commit,
}

/// Whether the error means the connection broke (rather than the server
/// refusing the statement and carrying on).
pub(crate) fn is_connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")),
        _ => false,
    }
}

/// The SQLSTATE of a database error.
pub(crate) fn sqlstate(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
}

/// Maps a sqlx error to ours. A lost connection during a [`Phase::Commit`]
/// call is marked in doubt: the server may have committed before it went.
pub(crate) fn map_err(e: sqlx::Error, phase: Phase) -> Error {
    let lost = is_connection_lost(&e);
    let (kind, msg): (ErrorKind, &str) = match &e {
        sqlx::Error::PoolTimedOut => (
            ErrorKind::PoolExhausted,
            "no pooled connection became free within the acquire timeout",
        ),
        sqlx::Error::PoolClosed => (ErrorKind::Unavailable, "the connection pool is closed"),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => (ErrorKind::Unavailable, "the connection failed"),
        sqlx::Error::Configuration(_) | sqlx::Error::InvalidArgument(_) => (ErrorKind::Config, ""),
        sqlx::Error::Encode(_) => (ErrorKind::InvalidValue, "a value could not be encoded"),
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. } => (
            ErrorKind::SchemaMismatch,
            "a stored value does not fit the declared column type",
        ),
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            match code.as_str() {
                _ if lost => (ErrorKind::Unavailable, "the server ended the connection"),
                "53300" => (
                    ErrorKind::Unavailable,
                    "the server has no free connection slot",
                ),
                "40001" => (
                    ErrorKind::SerializationFailure,
                    "the transaction could not be serialized with a concurrent one",
                ),
                "40P01" => (
                    ErrorKind::Deadlock,
                    "a deadlock was found between this transaction and another; this one was aborted",
                ),
                "53200" => (
                    ErrorKind::Unavailable,
                    "the server is out of shared memory (for locks: raise max_locks_per_transaction)",
                ),
                "53100" => (ErrorKind::Unavailable, "the server's disk is full"),
                // The database named in the URL does not exist, or the role
                // may not log in: nothing a retry can fix.
                "3D000" => (ErrorKind::Config, "the database does not exist"),
                "28000" | "28P01" => (
                    ErrorKind::Config,
                    "the server refused the credentials or the role",
                ),
                "3F000" => (ErrorKind::Config, "the schema does not exist"),
                // insufficient privilege: a grant is missing, no retry helps.
                "42501" => (ErrorKind::Config, ""),
                "22021" | "22P05" => (
                    ErrorKind::InvalidValue,
                    "PostgreSQL cannot store this text (NUL byte or invalid encoding)",
                ),
                // The rest of class 22 (data exception): out-of-range numbers,
                // strings too long for a varchar(n) column, ... all bad values.
                c if c.starts_with("22") => (ErrorKind::InvalidValue, ""),
                c if c.starts_with("23") => (ErrorKind::ConstraintViolation, ""),
                // undefined table, undefined column, datatype mismatch, no
                // unique index for ON CONFLICT: the table is not what the schema says.
                "42P01" | "42703" | "42804" | "42P10" => (ErrorKind::SchemaMismatch, ""),
                "57014" => (ErrorKind::Timeout, "the statement timeout was reached"),
                // The server ended a session left idle inside a transaction:
                // that transaction was rolled back, so this is never in doubt.
                "25P03" => (
                    ErrorKind::Timeout,
                    "the transaction stayed idle past idle_in_transaction_timeout and was rolled back",
                ),
                "55P03" => (ErrorKind::Busy, "a lock was not available"),
                _ => (ErrorKind::Backend, ""),
            }
        }
        _ => (ErrorKind::Backend, ""),
    };
    let mut err = Error::new(kind, msg).with_backend("postgres");
    if matches!(e, sqlx::Error::PoolClosed) {
        err = err.with_status(Status::Permanent);
    }
    let err = err.with_source(e);
    if lost && phase == Phase::Commit {
        err.in_doubt()
    } else {
        err
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    /// A server error with a SQLSTATE, as sqlx hands it over.
    #[derive(Debug)]
    struct ServerError(&'static str, &'static str);

    impl std::fmt::Display for ServerError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.1)
        }
    }

    impl std::error::Error for ServerError {}

    impl sqlx::error::DatabaseError for ServerError {
        fn message(&self) -> &str {
            self.1
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn mapped(code: &'static str, text: &'static str) -> Error {
        map_err(
            sqlx::Error::Database(Box::new(ServerError(code, text))),
            Phase::NoCommit,
        )
    }

    #[test]
    fn server_errors_get_their_kind_and_a_message() {
        for (code, text, kind) in [
            ("53200", "out of shared memory", ErrorKind::Unavailable),
            (
                "3D000",
                "database \"nope\" does not exist",
                ErrorKind::Config,
            ),
            ("28P01", "password authentication failed", ErrorKind::Config),
            ("40P01", "deadlock detected", ErrorKind::Deadlock),
            (
                "40001",
                "could not serialize access",
                ErrorKind::SerializationFailure,
            ),
            ("XX000", "internal error", ErrorKind::Backend),
        ] {
            let e = mapped(code, text);
            assert_eq!(e.kind(), kind, "{code}: {e}");
            assert!(!e.message().is_empty(), "{code}: {e:?}");
            assert!(
                e.to_string().contains(text),
                "{code}: the server's text is kept: {e}"
            );
        }
        assert!(
            mapped("53200", "out of shared memory")
                .message()
                .contains("shared memory")
        );
        assert!(
            mapped("XX000", "internal error")
                .message()
                .contains("internal error")
        );
    }
}

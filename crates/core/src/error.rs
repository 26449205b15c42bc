//! The one error type of writethrough.
//!
//! Every failure, from a bad key to a lost connection, is an [`Error`] with a
//! matchable [`ErrorKind`], a [`Status`] a retry layer reads, the operation
//! and key it concerns, and the backend's own error as its source. Adapters map
//! their driver's errors into it in one function each.

use std::fmt;
use std::sync::Arc;

/// What went wrong, coarse enough to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The key is empty, of the wrong type for the table, or cannot be held by the cache backend.
    InvalidKey,
    /// A value is not acceptable: wrong type, non-finite float, NUL byte where the database forbids it.
    InvalidValue,
    /// A time-to-live the cache backend cannot honour (zero, too long, finer than its granularity).
    InvalidTtl,
    /// A table or column name that is not a plain identifier.
    InvalidIdentifier,
    /// The row does not fit the table's schema (unknown column, missing required column).
    SchemaMismatch,
    /// The encoded value is larger than the cache backend's item limit.
    ValueTooLarge,
    /// The application's validator rejected the value.
    Validation,
    /// A configuration or URL that cannot be used.
    Config,
    /// Bytes that could not be encoded or decoded.
    Codec,
    /// The operation did not finish within its timeout.
    Timeout,
    /// The backend could not be reached or dropped the connection.
    Unavailable,
    /// The database is busy (SQLite's lock was not released within its busy timeout).
    Busy,
    /// No connection was free in the pool within the acquire timeout.
    PoolExhausted,
    /// The database refused the write for a constraint (unique, check, foreign key, not null).
    ConstraintViolation,
    /// An insert found a row with its key already there; nothing was written.
    Conflict,
    /// The database aborted the transaction to keep it serializable; retrying may succeed.
    SerializationFailure,
    /// The database found transactions waiting on each other's locks and
    /// aborted this one (PostgreSQL `40P01`); retrying may succeed.
    Deadlock,
    /// The call would wait for a lock its own caller holds, so it could
    /// never finish: on SQLite, a write (or a second scope) from the task or
    /// thread that holds an open transaction scope. Refused at once, before
    /// any side effect; retrying the same call cannot succeed.
    WouldDeadlock,
    /// The cache's circuit breaker is open; the cache was not called.
    CircuitOpen,
    /// The backend does not support this operation.
    Unsupported,
    /// Anything else the backend reported.
    Backend,
}

impl ErrorKind {
    /// A short, stable name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidKey => "invalid_key",
            ErrorKind::InvalidValue => "invalid_value",
            ErrorKind::InvalidTtl => "invalid_ttl",
            ErrorKind::InvalidIdentifier => "invalid_identifier",
            ErrorKind::SchemaMismatch => "schema_mismatch",
            ErrorKind::ValueTooLarge => "value_too_large",
            ErrorKind::Validation => "validation",
            ErrorKind::Config => "config",
            ErrorKind::Codec => "codec",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Busy => "busy",
            ErrorKind::PoolExhausted => "pool_exhausted",
            ErrorKind::ConstraintViolation => "constraint_violation",
            ErrorKind::Conflict => "conflict",
            ErrorKind::SerializationFailure => "serialization_failure",
            ErrorKind::Deadlock => "deadlock",
            ErrorKind::WouldDeadlock => "would_deadlock",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Backend => "backend",
        }
    }

    /// A one-line description, the message of an error that has no other.
    pub fn describe(self) -> &'static str {
        match self {
            ErrorKind::InvalidKey => "the key cannot be used",
            ErrorKind::InvalidValue => "a value cannot be stored",
            ErrorKind::InvalidTtl => "the TTL cannot be used",
            ErrorKind::InvalidIdentifier => "a name is not a plain identifier",
            ErrorKind::SchemaMismatch => "the row or table does not fit the schema",
            ErrorKind::ValueTooLarge => "the value is too large for the cache",
            ErrorKind::Validation => "the validator refused the value",
            ErrorKind::Config => "the configuration cannot be used",
            ErrorKind::Codec => "bytes could not be encoded or decoded",
            ErrorKind::Timeout => "no answer within the timeout",
            ErrorKind::Unavailable => "the backend is unavailable",
            ErrorKind::Busy => "the database is busy",
            ErrorKind::PoolExhausted => "no pooled connection is free",
            ErrorKind::ConstraintViolation => "the database refused the write for a constraint",
            ErrorKind::Conflict => "a row with this key already exists",
            ErrorKind::SerializationFailure => {
                "the database aborted the transaction to keep it serializable"
            }
            ErrorKind::Deadlock => "the database aborted the transaction to break a deadlock",
            ErrorKind::WouldDeadlock => "the call would wait for a lock its caller holds",
            ErrorKind::CircuitOpen => "the cache circuit breaker is open",
            ErrorKind::Unsupported => "the backend does not support this",
            ErrorKind::Backend => "the backend reported an error",
        }
    }

    /// Whether a transaction that failed with this kind may succeed if run
    /// again from the start: serialization failures, deadlocks, and a busy
    /// database. What [`crate::Engine::transaction`] retries.
    pub fn is_retryable_transaction(self) -> bool {
        matches!(
            self,
            ErrorKind::SerializationFailure | ErrorKind::Deadlock | ErrorKind::Busy
        )
    }

    /// Whether this kind is bad input, found before any side effect.
    pub fn is_input(self) -> bool {
        matches!(
            self,
            ErrorKind::InvalidKey
                | ErrorKind::InvalidValue
                | ErrorKind::InvalidTtl
                | ErrorKind::InvalidIdentifier
                | ErrorKind::SchemaMismatch
                | ErrorKind::ValueTooLarge
                | ErrorKind::Validation
                | ErrorKind::Config
        )
    }

    fn default_status(self) -> Status {
        match self {
            ErrorKind::Timeout
            | ErrorKind::Unavailable
            | ErrorKind::Busy
            | ErrorKind::PoolExhausted
            | ErrorKind::SerializationFailure
            | ErrorKind::Deadlock
            | ErrorKind::CircuitOpen => Status::Temporary,
            _ => Status::Permanent,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether retrying the same call may succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Retrying the same call will fail the same way.
    Permanent,
    /// A retry, after a pause, may succeed.
    Temporary,
}

type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// The error of every writethrough operation.
///
/// Cheap to clone (one `Arc`), so one failed load can be handed to every
/// caller that waited on it.
#[derive(Clone)]
pub struct Error {
    inner: Arc<Inner>,
}

struct Inner {
    kind: ErrorKind,
    status: Status,
    operation: &'static str,
    message: String,
    key: Option<String>,
    backend: Option<&'static str>,
    in_doubt: bool,
    source: Option<Source>,
    /// The message was taken from the source (which had the only text), so
    /// `Display` does not print it twice.
    message_from_source: bool,
}

impl Error {
    /// A new error of `kind` with a human-readable message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            inner: Arc::new(Inner {
                kind,
                status: kind.default_status(),
                operation: "",
                message: message.into(),
                key: None,
                backend: None,
                in_doubt: false,
                source: None,
                message_from_source: false,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => f(inner),
            None => {
                let old = &*self.inner;
                let mut inner = Inner {
                    kind: old.kind,
                    status: old.status,
                    operation: old.operation,
                    message: old.message.clone(),
                    key: old.key.clone(),
                    backend: old.backend,
                    in_doubt: old.in_doubt,
                    source: old.source.clone(),
                    message_from_source: old.message_from_source,
                };
                f(&mut inner);
                self.inner = Arc::new(inner);
            }
        }
        self
    }

    /// Names the operation (`"write"`, `"cache.get"`, ...) if none is set yet.
    pub fn with_operation(self, operation: &'static str) -> Self {
        if !self.inner.operation.is_empty() {
            return self;
        }
        self.edit(|i| i.operation = operation)
    }

    /// Names the key the operation concerned, if none is set yet.
    pub fn with_key(self, key: impl fmt::Display) -> Self {
        if self.inner.key.is_some() {
            return self;
        }
        self.edit(|i| i.key = Some(key.to_string()))
    }

    /// Names the backend (`"redis"`, `"sqlite"`, ...) if none is set yet.
    pub fn with_backend(self, backend: &'static str) -> Self {
        if self.inner.backend.is_some() {
            return self;
        }
        self.edit(|i| i.backend = Some(backend))
    }

    /// Attaches the underlying error. An error created without a message
    /// takes the source's text as its message, so that [`Error::message`]
    /// is never empty when there is something to say.
    pub fn with_source(self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.edit(|i| {
            if i.message.is_empty() || i.message_from_source {
                i.message = source.to_string();
                i.message_from_source = true;
            }
            i.source = Some(Arc::new(source));
        })
    }

    /// Overrides the retry status.
    pub fn with_status(self, status: Status) -> Self {
        self.edit(|i| i.status = status)
    }

    /// Marks a database error whose transaction may or may not have committed
    /// (the connection failed while the commit was in flight).
    pub fn in_doubt(self) -> Self {
        self.edit(|i| i.in_doubt = true)
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// Whether a retry may succeed.
    pub fn status(&self) -> Status {
        self.inner.status
    }

    /// Shorthand for `status() == Status::Temporary`.
    pub fn is_temporary(&self) -> bool {
        self.inner.status == Status::Temporary
    }

    /// Whether the failed database call may nevertheless have committed.
    pub fn is_in_doubt(&self) -> bool {
        self.inner.in_doubt
    }

    /// The operation that failed, or `""` if unknown.
    pub fn operation(&self) -> &'static str {
        self.inner.operation
    }

    /// The key the failed operation concerned, if any.
    pub fn key(&self) -> Option<&str> {
        self.inner.key.as_deref()
    }

    /// The backend that failed, if any.
    pub fn backend(&self) -> Option<&'static str> {
        self.inner.backend
    }

    /// The message, without operation, key or source. When the error was
    /// created without one, the source's text; else, for an error with
    /// neither, the kind's description.
    pub fn message(&self) -> &str {
        if self.inner.message.is_empty() {
            return self.inner.kind.describe();
        }
        &self.inner.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &*self.inner;
        if !i.operation.is_empty() {
            write!(f, "{}: ", i.operation)?;
        }
        write!(f, "{}", i.kind)?;
        if let Some(b) = i.backend {
            write!(f, " ({b})")?;
        }
        if let Some(k) = &i.key {
            write!(f, " at key {k:?}")?;
        }
        if !i.message.is_empty() {
            write!(f, ": {}", i.message)?;
        }
        if i.in_doubt {
            f.write_str(" [outcome unknown]")?;
        }
        if let Some(s) = &i.source
            && !i.message_from_source
        {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &*self.inner;
        let mut d = f.debug_struct("Error");
        d.field("kind", &i.kind).field("status", &i.status);
        if !i.operation.is_empty() {
            d.field("operation", &i.operation);
        }
        if let Some(k) = &i.key {
            d.field("key", k);
        }
        if let Some(b) = i.backend {
            d.field("backend", &b);
        }
        d.field("message", &i.message);
        if i.in_doubt {
            d.field("in_doubt", &true);
        }
        if let Some(s) = &i.source {
            d.field("source", &s.to_string());
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// The result of every writethrough operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_operation_kind_backend_key_and_source() {
        let e = Error::new(ErrorKind::Timeout, "no reply within 50ms")
            .with_operation("cache.get")
            .with_backend("redis")
            .with_key("app:products:1")
            .with_source(std::io::Error::other("boom"));
        assert_eq!(
            e.to_string(),
            "cache.get: timeout (redis) at key \"app:products:1\": no reply within 50ms: boom"
        );
        assert!(e.is_temporary());
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn first_operation_and_key_win_so_inner_context_is_kept() {
        let e = Error::new(ErrorKind::Busy, "")
            .with_operation("db.upsert")
            .with_operation("write")
            .with_key("a")
            .with_key("b");
        assert_eq!(e.operation(), "db.upsert");
        assert_eq!(e.key(), Some("a"));
    }

    #[test]
    fn input_kinds_are_permanent() {
        for k in [
            ErrorKind::InvalidKey,
            ErrorKind::InvalidTtl,
            ErrorKind::Validation,
        ] {
            assert!(k.is_input());
            assert_eq!(Error::new(k, "").status(), Status::Permanent);
        }
        assert!(!ErrorKind::Timeout.is_input());
    }

    #[test]
    fn an_error_without_a_message_takes_its_source_text_once() {
        let e = Error::new(ErrorKind::Backend, "")
            .with_backend("postgres")
            .with_source(std::io::Error::other("out of shared memory"));
        assert_eq!(e.message(), "out of shared memory");
        assert_eq!(e.to_string(), "backend (postgres): out of shared memory");
        let bare = Error::new(ErrorKind::Deadlock, "");
        assert!(!bare.message().is_empty());
        assert!(bare.is_temporary());
        let kept = Error::new(ErrorKind::Busy, "locked").with_source(std::io::Error::other("x"));
        assert_eq!(kept.message(), "locked");
        assert_eq!(kept.to_string(), "busy: locked: x");
    }

    #[test]
    fn every_kind_has_a_description() {
        for k in [
            ErrorKind::InvalidKey,
            ErrorKind::WouldDeadlock,
            ErrorKind::Deadlock,
            ErrorKind::Backend,
        ] {
            assert!(!k.describe().is_empty());
        }
        assert!(ErrorKind::Deadlock.is_retryable_transaction());
        assert!(!ErrorKind::WouldDeadlock.is_retryable_transaction());
        assert_eq!(
            Error::new(ErrorKind::WouldDeadlock, "").status(),
            Status::Permanent
        );
    }

    #[test]
    fn editing_a_shared_error_does_not_change_the_other_clone() {
        let a = Error::new(ErrorKind::Backend, "x");
        let b = a.clone().with_key("k");
        assert_eq!(a.key(), None);
        assert_eq!(b.key(), Some("k"));
    }
}

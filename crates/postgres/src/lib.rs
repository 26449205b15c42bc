//! PostgreSQL as a writethrough database (in progress).

//! Memcached as a writethrough cache (in progress).

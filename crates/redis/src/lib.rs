//! Redis as a writethrough cache (in progress).

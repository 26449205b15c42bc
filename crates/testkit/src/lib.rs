//! Test support for writethrough: real servers on free loopback ports,
//! fault injection, the conformance suites, and the history checker.

pub mod faults;
pub mod gates;
pub mod history;
pub mod proxy;
pub mod server;
pub mod suite;

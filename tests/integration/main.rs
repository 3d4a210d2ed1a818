//! Integration tests: the real `dispatchd` binary over real sockets on 127.0.0.1.

// Test code, as `allow-unwrap-in-tests` has it for `#[test]` functions: the behaviour tests
// written once for both backends are plain `async fn`s that `both!` calls.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod backup;
mod cli;
mod cluster;
mod compat;
mod config;
mod delivery;
mod disk_full;
mod hardening;
mod inbound;
mod ingest;
mod operator;
mod packaging;
mod postgres;
mod producers;
mod retention;
mod server;
mod tls;

//! Integration tests: the real `dispatchd` binary over real sockets on 127.0.0.1.

mod support;

mod backup;
mod cli;
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

//! Integration tests: the real `dispatchd` binary over real sockets on 127.0.0.1.

mod support;

mod config;
mod delivery;
mod inbound;
mod ingest;
mod backup;
mod disk_full;
mod packaging;
mod operator;
mod retention;

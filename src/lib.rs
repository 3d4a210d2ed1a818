//! dispatchd: a webhook delivery daemon. Events come in over HTTP, are kept in an append-only
//! log in an embedded redb file, fan out to subscriptions and are delivered signed, retried,
//! rate-limited and circuit-broken per destination. See docs/ARCHITECTURE.md.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod breaker;
pub mod callbacks;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod delivery;
pub mod filter;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod operations;
pub mod ratelimit;
pub mod redact;
pub mod retention;
pub mod retry;
pub mod scheduler;
pub mod signing;
pub mod storage;
pub mod subscriptions;
pub mod swap;
#[cfg(test)]
mod testrng;
pub mod tls;
pub mod units;
pub mod wire;

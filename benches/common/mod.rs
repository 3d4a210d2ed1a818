//! Pieces the load generators share: command-line flags, child processes, the HTTP client
//! connection, load connections and their window, the daemon's metrics, the latency
//! histogram and the event request. Each benchmark uses a part of them.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result};

pub mod args;
pub mod event_request;
pub mod histogram;
pub mod http_client;
pub mod load;
pub mod metrics;
pub mod proc;

/// Untimed load before each measurement window.
pub const WARMUP: Duration = Duration::from_secs(1);
/// Safety bound on the requests of one run, whatever the window.
pub const MAX_REQUESTS: u64 = 50_000_000;
/// A request without a full response after this long is an I/O error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `f` to its end on a multi-threaded tokio runtime of `workers` threads; `what` names
/// the runtime if it cannot start.
pub fn block_on<F: Future>(workers: usize, what: &str, f: F) -> Result<F::Output> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .with_context(|| format!("cannot start {what}"))?
        .block_on(f))
}

//! Delivery-engine benchmarks: how fast acknowledged events reach a real HTTP endpoint, how
//! soon after their acknowledgement, and what a large retry backlog costs in memory and in
//! restart time.
//!
//! # What it measures
//!
//! The real daemon binary (release build) runs on 127.0.0.1 with a fresh temporary data
//! directory and a config file with one subscription, `bench`, for every event type, signed
//! with one `whsec_` secret, `max_in_flight = 256` (64 in `backlog`; `--max-in-flight`) and a
//! retry policy of `initial = "1h", max = "2h"` (so a failed attempt is not retried during a
//! run and shows up as missing). `max_in_flight` bounds requests under way (an attempt's
//! slot is free once its response is read, before its outcome is committed); with a
//! publisher that outruns the deliveries, the destination's in-memory queue (10,000 jobs)
//! fills and the rest waits in the scheduler. Three modes:
//!
//! - `throughput` (default; `--seconds`, default 30): the subscription points at a receiver in
//!   this process (hyper 1.x on 127.0.0.1:0, answers 200 with an empty body, records the first
//!   arrival time of each `webhook-id`). `--connections` (default 128) keep-alive connections
//!   each run a closed loop of `POST /v1/events` with a `--body-bytes` (default 1024) JSON
//!   event, or with `--batch N` (N > 1) of `POST /v1/events/batch` with N such events, which
//!   leaves more of the machine to the delivery side. After a 1 s warm-up, the window lasts `--seconds`: events/s counts publishes
//!   acknowledged inside it, deliveries/s counts first arrivals at the receiver inside it.
//!   Publishing stops at the end of the window; the bench then reports how many acknowledged
//!   events had not reached the receiver yet and how long they took to arrive (bounded by
//!   60 s), duplicates (a second arrival of a `webhook-id`), and any acknowledged event that
//!   never arrived.
//! - `latency` (`--rate`, default 10,000/s; `--seconds`, default 30; `--connections`, default
//!   256): each connection publishes on its own tokio interval (period = connections / rate,
//!   staggered, missed ticks caught up in a burst), so the offered rate is fixed whatever the
//!   response times. Ack-to-delivery latency is the receiver's first arrival of `webhook-id` X
//!   minus the instant the publisher read the 202 for X (one process, one monotonic clock).
//!   A delivery can land before the publisher has read its ack (the daemon starts the
//!   delivery once the commit is durable, in parallel with the response): those count as 0
//!   and are reported.
//! - `backlog` (`--events`, default 1,000,000): the subscription points at a closed port on
//!   127.0.0.1 (a listener bound, then dropped), so every first attempt fails at once with a
//!   connection error and is rescheduled up to 1 h later (full jitter: uniform in [0, 1 h], so
//!   a small share comes due again during the run). The breaker is configured never to open
//!   (an open breaker defers deliveries without spending attempts, and the run waits for
//!   attempts). Events go in through `POST /v1/events/batch` (`--batch`, default 500;
//!   `server.max_batch` is set to match) on `--connections` (default 4). The bench polls
//!   `/metrics` until `dispatchd_delivery_attempts_total{subscription="bench"}` reaches N
//!   (bounded by `--wait-secs`), then reports the daemon's RSS (VmRSS, VmHWM) and
//!   `dispatchd_scheduled_deliveries`, stops it with SIGTERM, restarts it on the same data
//!   directory and times spawn → `listening on`, spawn → first 200 from `GET /readyz` and
//!   spawn → `dispatchd_scheduled_deliveries` back at its value, then reports RSS again
//!   about 5 s later. Before and after the restart it samples 5,000 `retrying` deliveries
//!   (`GET /v1/deliveries`, lowest ids first) and counts those whose `next_attempt_at` is
//!   more than 5 s in the past: retries the scheduler has not started on time.
//!
//! After `throughput`, the bench measures a reference in the same process: reqwest with 64
//! requests in flight against a bare hyper server that reads the body and answers 200, for
//! 5 s. It prints that rate and the ratio of deliveries/s to it. This in-process reference
//! runs faster than `../shared/bench-reference`'s client and server as two processes (60-68k
//! against 47-49k requests/s here on the same day), so its ratios are lower than theirs.
//!
//! Every 64th delivery the receiver also checks the Standard Webhooks signature with the
//! `hmac` and `sha2` crates (not the daemon's `ring`), the timestamp, and that the body's
//! `id` is the `webhook-id`.
//!
//! The daemon, the load generator and the receiver share the machine's CPUs (2 on the
//! reference machine): the load generator and the receiver run in this process on one tokio
//! runtime with 2 workers. Each mode prints how much CPU each side used.
//!
//! # Running
//!
//! ```text
//! cargo bench --bench delivery                                   # throughput, 30 s
//! cargo bench --bench delivery -- throughput --seconds 10 --connections 64
//! cargo bench --bench delivery -- throughput --batch 10 --connections 64 --max-in-flight 1024
//! cargo bench --bench delivery -- latency --rate 10000 --seconds 10
//! cargo bench --bench delivery -- backlog --events 50000         # quick check
//! cargo bench --bench delivery -- backlog --events 1000000 --cache-size 32MiB
//! ```
//!
//! The data directory is created under `$TMPDIR` (default `/tmp`): point it at the disk to be
//! measured, since an fsync on tmpfs costs nothing.

// A benchmark observes the daemon from outside, with the machine's own clocks; the
// daemon's one-clock rule (clippy.toml) is not for it.
#![allow(clippy::disallowed_methods)]

#[path = "../common/mod.rs"]
mod common;

mod backlog;
mod daemon;
mod latency;
mod publish;
mod receiver;
mod report;
mod run;
mod throughput;

use backlog::*;
use daemon::*;
use latency::*;
use publish::*;
use receiver::*;
use report::*;
use run::*;
use throughput::*;

use common::event_request::EventRequest;
use common::histogram::Histogram;
use common::http_client::{HttpConn, get as http_get};
use common::load::{LoadConn, Window};
use common::metrics::{Scrape, scrape};
use common::proc::{Listening, lock};
use common::{MAX_REQUESTS, REQUEST_TIMEOUT, START_TIMEOUT, WARMUP};

use std::collections::HashMap;
use std::collections::hash_map::{DefaultHasher, Entry};
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

const USAGE: &str = "\
usage: cargo bench --bench delivery -- [throughput|latency|backlog] [options]
  --seconds N          measured window after a 1 s warm-up (throughput, latency; default 30)
  --connections N      publisher connections (default: throughput 128, latency 256, backlog 4)
  --rate N             latency: events published per second (default 10000)
  --events N           backlog: events to publish, one delivery each (default 1000000)
  --batch N            events per publish request: throughput 1 (POST /v1/events; more
                       uses POST /v1/events/batch), backlog 500
  --body-bytes N       size of each event's JSON (default 1024)
  --max-in-flight N    the subscription's max_in_flight (default: 256, backlog 64)
  --cache-size SIZE    storage.cache_size for the daemon (default: the daemon's default)
  --journal-size SIZE  storage.journal_size for the daemon (default: the daemon's default)
  --wait-secs N        backlog: bound on publishing + waiting for the attempts (default 1200)
  --postgres-url URL   cluster mode: run the daemon on this PostgreSQL database (an empty
                       one; benches/cluster.sh starts a server and makes one per run)
  --nodes N            cluster mode: daemons sharing the database, publishers spread over
                       them round-robin (default 1)
  --destinations N     throughput, latency: N subscriptions to the receiver, each taking one
                       event type; the connections publish the types in turn, so every event
                       has one delivery (default 1; in cluster mode the leases spread them
                       over the nodes)
  --node-workers N     runtime worker threads of each daemon (TOKIO_WORKER_THREADS; default
                       one per CPU): nodes sharing this machine can be sized to their share
                       of it";

/// The subscription's secret; the receiver verifies signatures with it.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SUBSCRIPTION: &str = "bench";
/// A batch of the backlog without a full response after this long is an I/O error.
const BATCH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the daemon may take to stop after SIGTERM (it drains for up to 30 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Throughput: how long the backlog left at the end of the window may take to arrive.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// Latency: how long to wait for the last deliveries after publishing stops.
const LATENCY_WAIT: Duration = Duration::from_secs(60);
/// Backlog: how long after the restart RSS is read again.
const SETTLE_AFTER_RESTART: Duration = Duration::from_secs(5);
/// Tokio workers of this process (load generator and receiver).
const WORKERS: usize = 2;
/// The receiver verifies one delivery in this many.
const SAMPLE_EVERY: u64 = 64;
/// Shards of the receiver's arrival table.
const SHARDS: usize = 16;
/// Bound on the receiver's accepted connections (the daemon keeps a small pool).
const MAX_ACCEPTS: u64 = 1_000_000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse_options(&args).and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("delivery bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Throughput,
    Latency,
    Backlog,
}

struct Options {
    mode: Mode,
    seconds: Option<u64>,
    connections: Option<usize>,
    rate: u64,
    events: u64,
    batch: Option<usize>,
    body_bytes: usize,
    max_in_flight: Option<u32>,
    cache_size: Option<String>,
    journal_size: Option<String>,
    wait_secs: u64,
    /// Cluster mode: the database every node shares.
    postgres_url: Option<String>,
    /// Cluster mode: how many nodes.
    nodes: usize,
    /// Subscriptions, each taking one event type (`Options::subscriptions`).
    destinations: usize,
    /// Runtime worker threads of each daemon (`None`: the daemon's default, one per CPU).
    node_workers: Option<usize>,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Throughput => "throughput",
            Mode::Latency => "latency",
            Mode::Backlog => "backlog",
        }
    }
}

impl Options {
    fn seconds(&self) -> u64 {
        self.seconds.unwrap_or(30)
    }

    /// The subscription's `max_in_flight`: 256 measured best for throughput and latency here
    /// (64 lets the destination queue overflow, see the module docs); 64 for the backlog.
    fn max_in_flight(&self) -> u32 {
        self.max_in_flight.unwrap_or(match self.mode {
            Mode::Throughput | Mode::Latency => 256,
            Mode::Backlog => 64,
        })
    }

    /// Events per publish request.
    fn batch(&self) -> usize {
        self.batch.unwrap_or(match self.mode {
            Mode::Throughput | Mode::Latency => 1,
            Mode::Backlog => 500,
        })
    }

    /// The subscriptions, with the event type each takes: one (`SUBSCRIPTION`, every event)
    /// or `destinations` of them, `bench.d{i}` each. Their ids are picked so that the leases
    /// split evenly over the nodes (`bench-node-{i}`): the bench measures destinations spread
    /// over a cluster, not how a few ids happen to hash.
    fn subscriptions(&self) -> Vec<(String, Option<String>)> {
        if self.destinations <= 1 {
            return vec![(SUBSCRIPTION.to_string(), None)];
        }
        let nodes: Vec<String> = (0..self.nodes.max(1))
            .map(|i| format!("bench-node-{i}"))
            .collect();
        let mut share = vec![0_usize; nodes.len()];
        let mut out = Vec::with_capacity(self.destinations);
        for k in 0..100_000 {
            if out.len() == self.destinations {
                break;
            }
            let id = format!("{SUBSCRIPTION}-{k}");
            let owner = dispatchd::storage::postgres::leases::owner(&id, &nodes)
                .and_then(|o| nodes.iter().position(|n| n == o));
            let fewest = share.iter().copied().min().unwrap_or(0);
            if let Some(o) = owner
                && share.get(o) == Some(&fewest)
            {
                share[o] += 1;
                out.push((id, Some(format!("bench.d{}", out.len()))));
            }
        }
        out
    }

    /// The event type connection `conn` publishes. Connections go to the nodes round-robin,
    /// so the types are dealt over each node's share in turn: every node publishes to every
    /// destination.
    fn event_type(&self, conn: usize) -> String {
        if self.destinations <= 1 {
            return EventRequest::EVENT_TYPE.to_string();
        }
        format!("bench.d{}", (conn / self.nodes.max(1)) % self.destinations)
    }

    fn connections(&self) -> usize {
        self.connections.unwrap_or(match self.mode {
            Mode::Throughput => 128,
            Mode::Latency => 256,
            Mode::Backlog => 4,
        })
    }
}

fn positive(flag: &str, v: &str) -> Result<u64> {
    match v.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => bail!("{flag} needs a positive whole number, got {v:?}"),
    }
}

/// A size for the daemon's config file, written there between quotes.
fn size(flag: &str, v: String, example: &str) -> Result<String> {
    if v.is_empty() || v.contains('"') || v.contains('\\') {
        bail!("{flag} needs a size such as {example}");
    }
    Ok(v)
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut o = Options {
        mode: Mode::Throughput,
        seconds: None,
        connections: None,
        rate: 10_000,
        events: 1_000_000,
        batch: None,
        body_bytes: 1024,
        max_in_flight: None,
        cache_size: None,
        journal_size: None,
        wait_secs: 1200,
        postgres_url: None,
        nodes: 1,
        destinations: 1,
        node_workers: None,
    };
    let mut mode_seen = false;
    common::args::parse(args, USAGE, |flag, value| {
        match flag {
            "throughput" | "latency" | "backlog" if !mode_seen => {
                mode_seen = true;
                o.mode = match flag {
                    "throughput" => Mode::Throughput,
                    "latency" => Mode::Latency,
                    _ => Mode::Backlog,
                };
            }
            "--seconds" => o.seconds = Some(positive(flag, &value()?)?),
            "--connections" => {
                o.connections = Some(usize::try_from(positive(flag, &value()?)?)?);
            }
            "--rate" => o.rate = positive(flag, &value()?)?,
            "--events" => o.events = positive(flag, &value()?)?,
            "--batch" => {
                let n = positive(flag, &value()?)?;
                if n > 10_000 {
                    bail!("--batch: the daemon takes at most 10000 events per batch");
                }
                o.batch = Some(usize::try_from(n)?);
            }
            "--body-bytes" => o.body_bytes = usize::try_from(positive(flag, &value()?)?)?,
            "--max-in-flight" => {
                let n = positive(flag, &value()?)?;
                if n > 1024 {
                    bail!("--max-in-flight: the daemon accepts 1 to 1024");
                }
                o.max_in_flight = Some(u32::try_from(n)?);
            }
            "--cache-size" => o.cache_size = Some(size(flag, value()?, "64MiB")?),
            "--journal-size" => o.journal_size = Some(size(flag, value()?, "4MiB")?),
            "--wait-secs" => o.wait_secs = positive(flag, &value()?)?,
            "--postgres-url" => {
                let v = value()?;
                if v.contains('"') || v.contains('\\') {
                    bail!("--postgres-url: no quotes or backslashes");
                }
                o.postgres_url = Some(v);
            }
            "--nodes" => {
                let n = positive(flag, &value()?)?;
                if n > 8 {
                    bail!("--nodes: at most 8");
                }
                o.nodes = usize::try_from(n)?;
            }
            "--destinations" => {
                let n = positive(flag, &value()?)?;
                if n > 64 {
                    bail!("--destinations: at most 64");
                }
                o.destinations = usize::try_from(n)?;
            }
            "--node-workers" => {
                let n = positive(flag, &value()?)?;
                if n > 64 {
                    bail!("--node-workers: at most 64");
                }
                o.node_workers = Some(usize::try_from(n)?);
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if o.nodes > 1 && o.postgres_url.is_none() {
        bail!("--nodes: more than one node needs --postgres-url");
    }
    if o.nodes > 1 && o.mode == Mode::Backlog {
        bail!("--nodes: the backlog mode runs one node");
    }
    if o.destinations > 1 && o.mode == Mode::Backlog {
        bail!("--destinations: the backlog mode has one destination");
    }
    if o.mode == Mode::Latency && o.batch() > 1 {
        bail!("--batch: latency publishes one event per request");
    }
    Ok(o)
}

fn run(opts: Options) -> Result<()> {
    common::block_on(WORKERS, "the bench's runtime", async {
        match opts.mode {
            Mode::Throughput => throughput(&opts).await,
            Mode::Latency => latency(&opts).await,
            Mode::Backlog => backlog(&opts).await,
        }
    })?
}

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

mod common;

use common::event_request::EventRequest;
use common::histogram::Histogram;
use common::http_client::{HttpConn, HttpResponse};
use common::proc::Proc;

use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
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
use tokio::sync::{oneshot, watch};
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
  --wait-secs N        backlog: bound on publishing + waiting for the attempts (default 1200)";

/// The subscription's secret; the receiver verifies signatures with it.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SUBSCRIPTION: &str = "bench";
/// Untimed load before each measurement window.
const WARMUP: Duration = Duration::from_secs(1);
/// Safety bound on the requests of one run, whatever the window.
const MAX_REQUESTS: u64 = 50_000_000;
/// A request without a full response after this long is an I/O error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The same for one batch of the backlog.
const BATCH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the daemon may take to start listening, and to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);
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
    };
    let mut mode_seen = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
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
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            // cargo bench appends `--bench` to the arguments of harness = false targets.
            f if f.starts_with("--bench") => {}
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if o.mode == Mode::Latency && o.batch() > 1 {
        bail!("--batch: latency publishes one event per request");
    }
    Ok(o)
}

fn run(opts: Options) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_all()
        .build()
        .context("cannot start the bench's runtime")?
        .block_on(async {
            match opts.mode {
                Mode::Throughput => throughput(&opts).await,
                Mode::Latency => latency(&opts).await,
                Mode::Backlog => backlog(&opts).await,
            }
        })
}

// ---------------------------------------------------------------------------------------------
// Mode 1: throughput

async fn throughput(opts: &Options) -> Result<()> {
    let seconds = opts.seconds();
    let conns = opts.connections();
    let receiver = Receiver::start().await?;
    let work = Workdir::new(&config_text(opts, &receiver.url(), false))?;
    let daemon = Daemon::start(&work).await?;
    wait_ready(daemon.addr, Instant::now() + START_TIMEOUT).await?;

    println!("dispatchd delivery benchmark: throughput");
    print_setup(opts, &work, &receiver.url());
    println!(
        "  load: {conns} keep-alive connections, closed loop, {} with {}-byte JSON events, {}s \
         warm-up + {seconds}s measured",
        match opts.batch() {
            1 => "POST /v1/events".to_owned(),
            n => format!("POST /v1/events/batch of {n} events"),
        },
        EventRequest::body_len(opts.body_bytes),
        WARMUP.as_secs()
    );
    println!();

    let t0 = Instant::now();
    let window = Window {
        start: t0 + WARMUP,
        end: t0 + WARMUP + Duration::from_secs(seconds),
    };
    let sampler = WindowSampler::spawn(daemon.addr, daemon.pid(), window);
    let pubs = run_publishers(
        daemon.addr,
        conns,
        opts.body_bytes,
        opts.batch(),
        window,
        None,
    )
    .await?;
    let published_at_end = Instant::now();
    let sample = sampler.await.context("the sampling task panicked")??;

    // The backlog left at the end of the window: wait for every acknowledged event.
    let keys: Vec<(u128, Instant)> = pubs.acks.clone();
    let missing = receiver
        .wait_for(&keys, published_at_end + DRAIN_LIMIT)
        .await;
    let arrivals = receiver.arrivals(&keys);
    let (in_window, per_second) = receiver.first_arrivals_in(window);

    let secs = seconds as f64;
    let acked_in_window = pubs
        .acks
        .iter()
        .filter(|(_, t)| window.contains(*t))
        .count();
    let pending_at_end = arrivals
        .iter()
        .filter(|a| a.is_none_or(|t| t > window.end))
        .count();
    let last_arrival = arrivals.iter().flatten().max().copied();
    let mut e2e = Histogram::default();
    for ((_, ack), at) in keys.iter().zip(&arrivals) {
        if let Some(at) = at {
            e2e.record(at.saturating_duration_since(*ack));
        }
    }

    println!(
        "published (acked in window)  {acked_in_window:>10} events      {:>10.1} events/s",
        acked_in_window as f64 / secs
    );
    println!(
        "delivered (received in window){in_window:>9} deliveries  {:>10.1} deliveries/s",
        in_window as f64 / secs
    );
    print_per_second(&per_second);
    println!(
        "publish ack latency          p50 {} ms, p99 {} ms, p99.9 {} ms ({} publish errors{})",
        ms(&pubs.hist, 0.50),
        ms(&pubs.hist, 0.99),
        ms(&pubs.hist, 0.999),
        pubs.errors,
        pubs.first_error
            .as_deref()
            .map(|e| format!("; first: {e}"))
            .unwrap_or_default()
    );
    println!(
        "pending at window end        {pending_at_end} of {} acknowledged events not yet \
         received",
        keys.len()
    );
    match (missing, last_arrival) {
        (0, Some(last)) => println!(
            "backlog drained              {:.3} s after the window ended",
            last.saturating_duration_since(window.end).as_secs_f64()
        ),
        (0, None) => println!("backlog drained              nothing was published"),
        (n, _) => println!(
            "backlog NOT drained          {n} acknowledged events still not received {} s \
             after publishing stopped",
            DRAIN_LIMIT.as_secs()
        ),
    }
    println!(
        "ack-to-delivery (saturated)  p50 {} ms, p99 {} ms, max {} ms (queueing included)",
        ms(&e2e, 0.50),
        ms(&e2e, 0.99),
        ms(&e2e, 1.0)
    );
    receiver.print_checks(keys.len() as u64);
    let after = scrape(daemon.addr).await?;
    print_attempts(&after);
    sample.print(secs);
    let rate = in_window as f64 / secs;
    println!(
        "target: >= 25000 deliveries/s sustained for 30 s: {:.1}/s over {seconds} s -> {}{}",
        rate,
        verdict(rate >= 25_000.0 && missing == 0),
        if seconds < 30 {
            " (window shorter than the 30 s of the target)"
        } else {
            ""
        }
    );
    print_machine_note();
    daemon.log.print();
    let stopped = daemon.stop().await?;
    println!(
        "dispatchd stopped cleanly {:.2} s after SIGTERM",
        stopped.as_secs_f64()
    );
    receiver.stop();
    let reference = reference_rate(opts.body_bytes).await?;
    println!(
        "reference (same run)         reqwest, {REFERENCE_CONCURRENCY} in flight, against a bare \
         hyper server, both in this process: {reference:.0} requests/s over {} s; \
         deliveries/s / reference = {:.3}",
        REFERENCE_TIME.as_secs(),
        rate / reference.max(1.0)
    );
    Ok(())
}

/// Requests in flight of the reference client.
const REFERENCE_CONCURRENCY: usize = 64;
/// How long the reference client runs.
const REFERENCE_TIME: Duration = Duration::from_secs(5);

/// What this machine does with no product logic: reqwest POSTs of a `body_bytes` body to a
/// hyper server that reads it and answers 200, both in this process, for `REFERENCE_TIME`.
/// The delivery figure is quoted as a ratio of it, since absolute figures drift here.
async fn reference_rate(body_bytes: usize) -> Result<f64> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        for _ in 0..MAX_ACCEPTS {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let _ = req.into_body().collect().await?;
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::new())))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    // The same TLS provider as the daemon's; only plain HTTP is used here.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(REFERENCE_CONCURRENCY)
        .build()?;
    let url = format!("http://{addr}/");
    let body = Bytes::from(vec![b'a'; body_bytes]);
    let start = Instant::now();
    let end = start + REFERENCE_TIME;
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..REFERENCE_CONCURRENCY {
        let (client, url, body, sent) = (client.clone(), url.clone(), body.clone(), sent.clone());
        tasks.spawn(async move {
            let mut ok = 0u64;
            while Instant::now() < end && sent.fetch_add(1, Ordering::Relaxed) < MAX_REQUESTS {
                let resp = tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    client.post(url.as_str()).body(body.clone()).send(),
                )
                .await;
                if let Ok(Ok(r)) = resp
                    && r.status().is_success()
                    && r.bytes().await.is_ok()
                {
                    ok += 1;
                }
            }
            ok
        });
    }
    let mut ok = 0u64;
    while let Some(n) = tasks.join_next().await {
        ok += n.context("a reference task panicked")?;
    }
    let secs = start.elapsed().as_secs_f64();
    server.abort();
    Ok(ok as f64 / secs)
}

fn print_per_second(per_second: &[u64]) {
    if per_second.is_empty() {
        return;
    }
    let mut sorted = per_second.to_vec();
    sorted.sort_unstable();
    println!(
        "  per second in the window: min {}, median {}, max {}; each: {}",
        sorted[0],
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1],
        per_second
            .iter()
            .map(|n| format!("{:.1}k", *n as f64 / 1000.0))
            .collect::<Vec<_>>()
            .join(" ")
    );
}

// ---------------------------------------------------------------------------------------------
// Mode 2: latency

async fn latency(opts: &Options) -> Result<()> {
    let seconds = opts.seconds();
    let conns = opts.connections();
    let receiver = Receiver::start().await?;
    let work = Workdir::new(&config_text(opts, &receiver.url(), false))?;
    let daemon = Daemon::start(&work).await?;
    wait_ready(daemon.addr, Instant::now() + START_TIMEOUT).await?;

    let period = Duration::from_secs_f64(conns as f64 / opts.rate as f64);
    println!("dispatchd delivery benchmark: latency");
    print_setup(opts, &work, &receiver.url());
    println!(
        "  load: {} events/s offered on {conns} keep-alive connections (each on a tokio \
         interval of {:.3} ms, staggered), POST /v1/events with a {}-byte JSON event, {}s \
         warm-up + {seconds}s measured",
        opts.rate,
        period.as_secs_f64() * 1000.0,
        EventRequest::body_len(opts.body_bytes),
        WARMUP.as_secs()
    );
    println!();

    let t0 = Instant::now();
    let window = Window {
        start: t0 + WARMUP,
        end: t0 + WARMUP + Duration::from_secs(seconds),
    };
    let sampler = WindowSampler::spawn(daemon.addr, daemon.pid(), window);
    let pubs = run_publishers(
        daemon.addr,
        conns,
        opts.body_bytes,
        1,
        window,
        Some((t0, period)),
    )
    .await?;
    let published_at_end = Instant::now();
    let sample = sampler.await.context("the sampling task panicked")??;
    let keys: Vec<(u128, Instant)> = pubs.acks.clone();
    receiver
        .wait_for(&keys, published_at_end + LATENCY_WAIT)
        .await;
    let arrivals = receiver.arrivals(&keys);

    let mut hist = Histogram::default();
    let (mut measured, mut early, mut missing) = (0u64, 0u64, 0u64);
    for ((_, ack), at) in keys.iter().zip(&arrivals) {
        if !window.contains(*ack) {
            continue;
        }
        measured += 1;
        match at {
            Some(at) if at < ack => {
                early += 1;
                hist.record(Duration::ZERO);
            }
            Some(at) => hist.record(at.saturating_duration_since(*ack)),
            None => missing += 1,
        }
    }
    let secs = seconds as f64;
    let achieved = measured as f64 / secs;
    println!(
        "published (acked in window)  {measured} events: {achieved:.1} events/s of {} offered",
        opts.rate
    );
    println!(
        "publish ack latency          p50 {} ms, p99 {} ms, p99.9 {} ms ({} publish errors{})",
        ms(&pubs.hist, 0.50),
        ms(&pubs.hist, 0.99),
        ms(&pubs.hist, 0.999),
        pubs.errors,
        pubs.first_error
            .as_deref()
            .map(|e| format!("; first: {e}"))
            .unwrap_or_default()
    );
    println!(
        "ack-to-delivery latency      p50 {} ms, p99 {} ms, p99.9 {} ms, max {} ms \
         ({} deliveries)",
        ms(&hist, 0.50),
        ms(&hist, 0.99),
        ms(&hist, 0.999),
        ms(&hist, 1.0),
        hist.total
    );
    println!(
        "  delivered before the publisher read the ack (counted as 0 ms): {early}; \
         not delivered {} s after publishing stopped: {missing}",
        LATENCY_WAIT.as_secs()
    );
    receiver.print_checks(keys.len() as u64);
    let after = scrape(daemon.addr).await?;
    print_attempts(&after);
    sample.print(secs);
    let p99_ms = hist
        .percentile(0.99)
        .map_or(f64::NAN, |us| us as f64 / 1000.0);
    println!(
        "target: p99 ack-to-delivery < 25 ms at 10000/s: p99 {p99_ms:.3} ms at {achieved:.0}/s \
         -> {}{}",
        verdict(p99_ms < 25.0 && achieved >= 0.99 * 10_000.0 && missing == 0),
        if opts.rate < 10_000 {
            " (offered rate below the target's)"
        } else {
            ""
        }
    );
    print_machine_note();
    daemon.log.print();
    let stopped = daemon.stop().await?;
    println!(
        "dispatchd stopped cleanly {:.2} s after SIGTERM",
        stopped.as_secs_f64()
    );
    receiver.stop();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Mode 3: backlog

async fn backlog(opts: &Options) -> Result<()> {
    let n = opts.events;
    let conns = opts.connections();
    // A port nobody listens on: bind one, then let it go.
    let closed_port = {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("cannot bind a port to close")?;
        l.local_addr()?.port()
    };
    let url = format!("http://127.0.0.1:{closed_port}/hook");
    let work = Workdir::new(&config_text(opts, &url, true))?;
    let daemon = Daemon::start(&work).await?;
    wait_ready(daemon.addr, Instant::now() + START_TIMEOUT).await?;

    println!("dispatchd delivery benchmark: backlog");
    print_setup(opts, &work, &url);
    println!(
        "  load: {n} events in batches of {} on {conns} keep-alive connections \
         (POST /v1/events/batch), {}-byte JSON events; the endpoint refuses connections, so \
         every first attempt fails and is rescheduled 0-1 h later (full jitter)",
        opts.batch(),
        BatchRequest::event_len(opts.body_bytes)
    );
    println!();

    let started = Instant::now();
    let deadline = started + Duration::from_secs(opts.wait_secs);
    let published = publish_backlog(
        daemon.addr,
        conns,
        n,
        opts.batch(),
        opts.body_bytes,
        deadline,
    )
    .await
    .context("publishing the backlog failed")?;
    let publish_time = started.elapsed();
    println!(
        "published                    {} events ({} deliveries) in {:.1} s: {:.0} events/s",
        published.events,
        published.deliveries,
        publish_time.as_secs_f64(),
        published.events as f64 / publish_time.as_secs_f64()
    );
    println!(
        "  RSS right after publishing: {}",
        memory(daemon.pid()).rss_text()
    );
    if published.deliveries != n {
        bail!(
            "expected {n} deliveries, the daemon created {}",
            published.deliveries
        );
    }

    // Wait for every first attempt to be made (a few attempts counted may be early retries).
    let sub_label = format!("subscription=\"{SUBSCRIPTION}\"");
    let before_attempts = scrape(daemon.addr).await?;
    let attempts_from = Instant::now();
    let mut next_progress = Instant::now() + Duration::from_secs(15);
    let mut polls = 0u64;
    let reached = loop {
        polls += 1;
        let m = scrape(daemon.addr).await.ok();
        let attempts = m.as_ref().map_or(0.0, |m| {
            m.sum("dispatchd_delivery_attempts_total", &sub_label)
        });
        if attempts >= n as f64 {
            break Some(started.elapsed());
        }
        if Instant::now() >= deadline || polls > opts.wait_secs * 4 + 100 {
            break None;
        }
        if Instant::now() >= next_progress {
            let gauge = |name: &str| m.as_ref().map_or(f64::NAN, |m| m.sum(name, &sub_label));
            println!(
                "  ... {:.0} s: {attempts:.0} of {n} attempts; destination queue {:.0}, in \
                 flight {:.0}",
                started.elapsed().as_secs_f64(),
                gauge("dispatchd_destination_queue_depth"),
                gauge("dispatchd_destination_in_flight"),
            );
            next_progress += Duration::from_secs(15);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let Some(reached) = reached else {
        daemon.log.print();
        bail!(
            "dispatchd_delivery_attempts_total did not reach {n} within {} s",
            opts.wait_secs
        );
    };
    println!(
        "attempts reached {n}           {:.1} s after publishing began",
        reached.as_secs_f64()
    );
    let after_attempts = scrape(daemon.addr).await?;
    print_phase(
        &before_attempts,
        &after_attempts,
        attempts_from.elapsed(),
        "while attempting",
    );
    // The scheduled gauge refreshes every 5 s: let it catch up.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let m = scrape(daemon.addr).await?;
    let mem = memory(daemon.pid());
    let scheduled = m.sum("dispatchd_scheduled_deliveries", "");
    println!(
        "holding the backlog          RSS {} (peak {}), dispatchd_scheduled_deliveries {:.0}, \
         dispatchd_timer_wheel_entries {:.0}",
        mem.rss_text(),
        mem.hwm_text(),
        scheduled,
        m.sum("dispatchd_timer_wheel_entries", "")
    );
    print_attempts(&m);
    print_overdue(daemon.addr).await;
    println!(
        "database file                {:.1} MiB",
        file_mib(&work.db_file())
    );
    daemon.log.print();

    let pid = daemon.pid();
    let stopped = daemon.stop().await?;
    println!(
        "SIGTERM                      exited cleanly after {:.2} s",
        stopped.as_secs_f64()
    );

    let restarted = Daemon::start(&work).await?;
    let ready_at = wait_ready(restarted.addr, restarted.spawned + START_TIMEOUT).await?;
    let to_ready = ready_at.saturating_duration_since(restarted.spawned);
    println!(
        "restart                      `listening on` {:.3} s after spawn, GET /readyz 200 \
         {:.3} s after spawn (pid {} -> {})",
        restarted.listening_after.as_secs_f64(),
        to_ready.as_secs_f64(),
        pid,
        restarted.pid()
    );
    // The reload: when the scheduled gauge shows the backlog again (bounded).
    let mut reloaded = None;
    let mut seen = 0.0;
    for _ in 0..1000 {
        if let Ok(m) = scrape(restarted.addr).await {
            seen = m.sum("dispatchd_scheduled_deliveries", "");
            if seen >= scheduled {
                reloaded = Some(restarted.spawned.elapsed());
                break;
            }
        }
        if restarted.spawned.elapsed() > START_TIMEOUT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match reloaded {
        Some(t) => println!(
            "  dispatchd_scheduled_deliveries back at {seen:.0} {:.3} s after spawn",
            t.as_secs_f64()
        ),
        None => println!(
            "  dispatchd_scheduled_deliveries still {seen:.0} (not {scheduled:.0}) {:.0} s after \
             spawn",
            restarted.spawned.elapsed().as_secs_f64()
        ),
    }
    tokio::time::sleep_until((restarted.spawned + SETTLE_AFTER_RESTART).into()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m2 = scrape(restarted.addr).await?;
    let mem2 = memory(restarted.pid());
    println!(
        "after restart (+{} s)         RSS {} (peak {}), dispatchd_scheduled_deliveries {:.0}, \
         dispatchd_timer_wheel_entries {:.0}, attempts since restart {:.0} (early retries \
         coming due)",
        SETTLE_AFTER_RESTART.as_secs() + 1,
        mem2.rss_text(),
        mem2.hwm_text(),
        m2.sum("dispatchd_scheduled_deliveries", ""),
        m2.sum("dispatchd_timer_wheel_entries", ""),
        m2.sum(
            "dispatchd_delivery_attempts_total",
            &format!("subscription=\"{SUBSCRIPTION}\"")
        )
    );
    print_overdue(restarted.addr).await;
    let rss_mb = mem.rss_kb.map_or(f64::NAN, |kb| kb as f64 / 1024.0);
    println!(
        "target: RSS < 250 MB holding 1000000 scheduled retries: {rss_mb:.1} MiB holding \
         {scheduled:.0} -> {}{}",
        verdict(rss_mb < 250.0 && scheduled >= n as f64),
        if n < 1_000_000 {
            " (fewer events than the target's)"
        } else {
            ""
        }
    );
    println!(
        "target: restart serving within 3 s: {:.3} s -> {}",
        to_ready.as_secs_f64(),
        verdict(to_ready < Duration::from_secs(3))
    );
    print_machine_note();
    restarted.log.print();
    let stopped = restarted.stop().await?;
    println!(
        "dispatchd stopped cleanly {:.2} s after SIGTERM",
        stopped.as_secs_f64()
    );
    Ok(())
}

#[derive(Default)]
struct BacklogStats {
    events: u64,
    deliveries: u64,
}

/// Publishes `total` events in batches on `conns` connections; any failure ends the run (a
/// retried batch would publish its events twice, since the daemon makes the ids).
async fn publish_backlog(
    addr: SocketAddr,
    conns: usize,
    total: u64,
    batch: usize,
    body_bytes: usize,
    deadline: Instant,
) -> Result<BacklogStats> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..conns {
        let next = next.clone();
        tasks.spawn(async move {
            let mut stats = BacklogStats::default();
            let mut conn = HttpConn::connect(addr).await?;
            let most = total / batch as u64 + 1;
            for _ in 0..most {
                let first = next.fetch_add(batch as u64, Ordering::Relaxed);
                if first >= total {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("publishing did not finish in time");
                }
                let count = usize::try_from((total - first).min(batch as u64))?;
                let req = BatchRequest::build(addr, first, count, body_bytes);
                let resp = tokio::time::timeout(BATCH_TIMEOUT, conn.round_trip(&req))
                    .await
                    .context("POST /v1/events/batch timed out")??;
                if resp.status != 202 {
                    bail!(
                        "POST /v1/events/batch answered {}: {}",
                        resp.status,
                        String::from_utf8_lossy(&resp.body[..resp.body.len().min(300)])
                    );
                }
                let acks: BatchAck =
                    serde_json::from_slice(&resp.body).context("unexpected batch response")?;
                if acks.items.len() != count {
                    bail!("sent {count} events, got {} results", acks.items.len());
                }
                stats.events += acks.items.iter().filter(|a| !a.duplicate).count() as u64;
                stats.deliveries += acks
                    .items
                    .iter()
                    .map(|a| u64::from(a.deliveries))
                    .sum::<u64>();
                if resp.close {
                    conn = HttpConn::connect(addr).await?;
                }
            }
            Ok::<_, anyhow::Error>(stats)
        });
    }
    let mut all = BacklogStats::default();
    while let Some(joined) = tasks.join_next().await {
        let s = joined.context("a publishing task panicked")??;
        all.events += s.events;
        all.deliveries += s.deliveries;
    }
    Ok(all)
}

#[derive(Deserialize)]
struct BatchAck {
    items: Vec<Ack>,
}

/// The answer to one publish (other fields ignored).
#[derive(Deserialize)]
struct Ack {
    id: String,
    deliveries: u32,
    #[serde(default)]
    duplicate: bool,
}

/// One `POST /v1/events/batch` of `count` events of about `body_bytes` each.
struct BatchRequest;

impl BatchRequest {
    fn event_head(n: u64) -> String {
        format!(r#"{{"type":"bench.backlog","data":{{"n":{n},"pad":""#)
    }

    fn event_len(body_bytes: usize) -> usize {
        body_bytes.max(Self::event_head(0).len() + 3)
    }

    fn build(addr: SocketAddr, first: u64, count: usize, body_bytes: usize) -> Vec<u8> {
        let mut body = Vec::with_capacity(count * (body_bytes + 1) + 16);
        body.extend_from_slice(br#"{"events":["#);
        for i in 0..count {
            if i > 0 {
                body.push(b',');
            }
            let head = Self::event_head(first + i as u64);
            let pad = body_bytes.saturating_sub(head.len() + 3);
            body.extend_from_slice(head.as_bytes());
            body.extend((0..pad).map(|j| b'a' + (j % 26) as u8));
            body.extend_from_slice(br#""}}"#);
        }
        body.extend_from_slice(b"]}");
        let mut req = format!(
            "POST /v1/events/batch HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        req
    }
}

// ---------------------------------------------------------------------------------------------
// Report helpers

fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "NOT MET" }
}

fn ms(h: &Histogram, q: f64) -> String {
    h.percentile(q)
        .map_or_else(|| "-".to_owned(), |us| format!("{:.3}", us as f64 / 1000.0))
}

fn print_setup(opts: &Options, work: &Workdir, url: &str) {
    println!(
        "  dispatchd: release build, data dir {} (one journal fsync per group commit), storage.cache_size {}",
        work.data_dir().display(),
        opts.cache_size.as_deref().unwrap_or("default")
    );
    println!(
        "  subscription {SUBSCRIPTION:?} -> {url}, max_in_flight {}, retry initial 1h max 2h",
        opts.max_in_flight()
    );
}

/// Attempts by outcome, as the daemon counted them.
fn print_attempts(m: &Scrape) {
    let outcomes = m.by_label("dispatchd_delivery_attempts_total", "outcome");
    let text = if outcomes.is_empty() {
        "none".to_owned()
    } else {
        outcomes
            .iter()
            .map(|(o, v)| format!("{o} {v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("daemon attempts by outcome   {text}");
    let dead = m.sum("dispatchd_dead_deliveries_total", "");
    let failures = m.sum("dispatchd_writer_commit_failures_total", "");
    let trips = m.sum("dispatchd_breaker_trips_total", "");
    if dead + failures + trips > 0.0 {
        println!(
            "  dead deliveries {dead:.0}, writer commit failures {failures:.0}, breaker trips {trips:.0}"
        );
    }
}

/// Deliveries sampled from `GET /v1/deliveries?status=retrying` (lowest ids first, so the
/// earliest attempted): how many have a due time already well past, which the scheduler
/// should have attempted.
async fn print_overdue(addr: SocketAddr) {
    const PAGES: usize = 5;
    const LATE: Duration = Duration::from_secs(5);
    #[derive(Deserialize)]
    struct Page {
        items: Vec<Item>,
        next_cursor: Option<String>,
    }
    #[derive(Deserialize)]
    struct Item {
        attempts: u32,
        next_attempt_at: Option<String>,
    }
    let (mut sampled, mut overdue, mut retried) = (0u64, 0u64, 0u64);
    let mut latest = Duration::ZERO;
    let mut cursor = String::new();
    for _ in 0..PAGES {
        let path = format!(
            "/v1/deliveries?status=retrying&subscription={SUBSCRIPTION}&limit=1000&cursor={cursor}"
        );
        let page = match http_get(addr, &path, REQUEST_TIMEOUT).await {
            Ok(r) if r.status == 200 => match serde_json::from_slice::<Page>(&r.body) {
                Ok(p) => p,
                Err(e) => {
                    println!("  overdue probe: unexpected answer: {e}");
                    return;
                }
            },
            Ok(r) => {
                println!("  overdue probe: GET {path} answered {}", r.status);
                return;
            }
            Err(e) => {
                println!("  overdue probe: {e:#}");
                return;
            }
        };
        let now = SystemTime::now();
        for item in &page.items {
            sampled += 1;
            if item.attempts > 1 {
                retried += 1;
            }
            let due = item
                .next_attempt_at
                .as_deref()
                .and_then(|t| humantime::parse_rfc3339(t).ok());
            if let Some(late) = due.and_then(|d| now.duration_since(d).ok())
                && late > LATE
            {
                overdue += 1;
                latest = latest.max(late);
            }
        }
        match page.next_cursor {
            Some(c) if !page.items.is_empty() => cursor = c,
            _ => break,
        }
    }
    println!(
        "  overdue probe: of {sampled} retrying deliveries (lowest ids), {overdue} are due more \
         than {} s ago (latest by {:.1} s); {retried} have had 2+ attempts",
        LATE.as_secs(),
        latest.as_secs_f64()
    );
}

/// The writer and the attempts between two scrapes.
fn print_phase(a: &Scrape, b: &Scrape, took: Duration, what: &str) {
    let d = |name: &str| b.sum(name, "") - a.sum(name, "");
    let commits = d("dispatchd_writer_batch_size_count");
    let attempts = d("dispatchd_delivery_attempt_seconds_count");
    println!(
        "daemon {what:<22}{:.0} attempts/s, mean attempt {:.3} ms; writer {:.0} commits/s, \
         mean batch {:.1} commands, mean commit {:.3} ms",
        attempts / took.as_secs_f64(),
        d("dispatchd_delivery_attempt_seconds_sum") / attempts * 1000.0,
        commits / took.as_secs_f64(),
        d("dispatchd_writer_batch_size_sum") / commits,
        d("dispatchd_writer_commit_seconds_sum") / commits * 1000.0
    );
}

fn print_machine_note() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0 / 1024.0);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".to_owned());
    println!(
        "note: one machine, {cpus} CPUs ({model}), {mem_gib:.1} GiB RAM, shared by the daemon \
         (tokio runtime + writer thread), the load generator and the receiver (both in this \
         process, one tokio runtime with {WORKERS} workers); the receiver is on 127.0.0.1; \
         load average now {load} (other work on the machine skews the figures)"
    );
}

// ---------------------------------------------------------------------------------------------
// Window sampling: CPU and the daemon's metrics at the start and end of the window

#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn contains(&self, t: Instant) -> bool {
        t >= self.start && t <= self.end
    }
}

struct WindowSample {
    daemon_cpu: Option<f64>,
    bench_cpu: Option<f64>,
    machine_cpu: Option<f64>,
    commits: f64,
    batch_sum: f64,
    commit_sum: f64,
    sync_sum: f64,
    durable_sum: f64,
    success: f64,
}

struct WindowSampler;

impl WindowSampler {
    fn spawn(
        addr: SocketAddr,
        pid: u32,
        window: Window,
    ) -> tokio::task::JoinHandle<Result<WindowSample>> {
        tokio::spawn(async move {
            let tick = clock_ticks();
            let take = || {
                (
                    cpu_seconds(&pid.to_string(), tick),
                    cpu_seconds("self", tick),
                    machine_busy_seconds(tick),
                )
            };
            tokio::time::sleep_until(window.start.into()).await;
            let (d0, b0, c0) = take();
            let m0 = scrape(addr).await?;
            tokio::time::sleep_until(window.end.into()).await;
            let (d1, b1, c1) = take();
            let m1 = scrape(addr).await?;
            let delta = |name: &str, label: &str| m1.sum(name, label) - m0.sum(name, label);
            Ok(WindowSample {
                daemon_cpu: d0.zip(d1).map(|(a, b)| b - a),
                bench_cpu: b0.zip(b1).map(|(a, b)| b - a),
                machine_cpu: c0.zip(c1).map(|(a, b)| b - a),
                commits: delta("dispatchd_writer_batch_size_count", ""),
                batch_sum: delta("dispatchd_writer_batch_size_sum", ""),
                commit_sum: delta("dispatchd_writer_commit_seconds_sum", ""),
                sync_sum: delta("dispatchd_writer_sync_seconds_sum", ""),
                durable_sum: delta("dispatchd_writer_durable_seconds_sum", ""),
                success: delta("dispatchd_delivery_attempts_total", "outcome=\"success\""),
            })
        })
    }
}

impl WindowSample {
    fn print(&self, secs: f64) {
        println!(
            "daemon in the window         {:.1} successful attempts/s counted; writer {:.0} \
             commits/s, mean batch {:.1} commands, mean commit {:.3} ms (apply {:.3} ms + \
             commit call {:.3} ms), durable {:.3} ms after the commit call, writer busy {:.0}% \
             of the window",
            self.success / secs,
            self.commits / secs,
            self.batch_sum / self.commits,
            self.commit_sum / self.commits * 1000.0,
            (self.commit_sum - self.sync_sum) / self.commits * 1000.0,
            self.sync_sum / self.commits * 1000.0,
            self.durable_sum / self.commits * 1000.0,
            self.commit_sum / secs * 100.0
        );
        let pct = |c: Option<f64>| {
            c.map_or_else(|| "?".to_owned(), |c| format!("{:.0}%", c / secs * 100.0))
        };
        println!(
            "CPU in the window            daemon {} of one core, bench process (publisher + \
             receiver) {}, whole machine {} (so other processes {})",
            pct(self.daemon_cpu),
            pct(self.bench_cpu),
            pct(self.machine_cpu),
            pct(self
                .machine_cpu
                .zip(self.daemon_cpu.zip(self.bench_cpu))
                .map(|(m, (d, b))| (m - d - b).max(0.0)))
        );
    }
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// CPU seconds the whole machine has spent busy (not idle, not waiting for I/O) since boot.
fn machine_busy_seconds(ticks: f64) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4);
    Some(busy.map(|(_, x)| x).sum::<f64>() / ticks)
}

/// User + system CPU seconds of a process (`self` or a pid).
fn cpu_seconds(pid: &str, ticks: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

struct Memory {
    rss_kb: Option<u64>,
    hwm_kb: Option<u64>,
}

impl Memory {
    fn rss_text(&self) -> String {
        Self::text(self.rss_kb)
    }

    fn hwm_text(&self) -> String {
        Self::text(self.hwm_kb)
    }

    fn text(kb: Option<u64>) -> String {
        kb.map_or_else(
            || "?".to_owned(),
            |kb| format!("{:.1} MiB", kb as f64 / 1024.0),
        )
    }
}

/// VmRSS and VmHWM of a process.
fn memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Memory {
        rss_kb: field("VmRSS:"),
        hwm_kb: field("VmHWM:"),
    }
}

fn file_mib(path: &std::path::Path) -> f64 {
    std::fs::metadata(path).map_or(f64::NAN, |m| m.len() as f64 / 1024.0 / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// The daemon: config file, process, log

/// Config file for one run. Listen address and data directory come from the command line.
fn config_text(opts: &Options, url: &str, backlog: bool) -> String {
    let mut t = String::new();
    if backlog || opts.batch() > 1 {
        t.push_str(&format!(
            "[server]\nmax_batch = {}\nmax_body = \"64MiB\"\n\n",
            opts.batch()
        ));
    }
    if opts.cache_size.is_some() || opts.journal_size.is_some() {
        t.push_str("[storage]\n");
        if let Some(c) = &opts.cache_size {
            t.push_str(&format!("cache_size = \"{c}\"\n"));
        }
        if let Some(j) = &opts.journal_size {
            t.push_str(&format!("journal_size = \"{j}\"\n"));
        }
        t.push('\n');
    }
    t.push_str("[delivery]\nallow_private_networks = true\n\n");
    t.push_str(&format!(
        "[[subscriptions]]\nid = \"{SUBSCRIPTION}\"\nurl = \"{url}\"\nsecrets = [\"{SECRET}\"]\n\
         max_in_flight = {}\nretry = {{ max_attempts = 10, initial = \"1h\", max = \"2h\" }}\n",
        opts.max_in_flight()
    ));
    if backlog {
        // Every attempt fails: a breaker that opens would defer them without attempting.
        t.push_str("breaker = { failure_threshold = 4000000000, min_requests = 4000000000 }\n");
    }
    t
}

/// A temporary directory holding the config file and the data directory.
struct Workdir {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Workdir {
    fn new(config: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("dispatchd-delivery-bench-")
            .tempdir()
            .context("cannot create the bench directory")?;
        let path = dir.path().join("dispatchd.toml");
        std::fs::write(&path, config).context("cannot write the config file")?;
        Ok(Self { dir, config: path })
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn db_file(&self) -> PathBuf {
        self.data_dir().join("dispatchd.redb")
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the daemon wrote on stderr: the last lines, and its warnings and errors.
#[derive(Default)]
struct DaemonLog {
    inner: Mutex<LogInner>,
}

#[derive(Default)]
struct LogInner {
    tail: VecDeque<String>,
    warnings: u64,
    errors: u64,
    notable: Vec<String>,
}

impl DaemonLog {
    fn add(&self, line: String) {
        let mut l = lock(&self.inner);
        // Text format: `TIMESTAMP  LEVEL target: message fields`.
        match line.split_whitespace().nth(1) {
            Some("WARN") => l.warnings += 1,
            Some("ERROR") => l.errors += 1,
            _ => {}
        }
        if line
            .split_whitespace()
            .nth(1)
            .is_some_and(|lv| lv == "WARN" || lv == "ERROR")
            && l.notable.len() < 10
        {
            l.notable.push(line.clone());
        }
        if l.tail.len() == 200 {
            l.tail.pop_front();
        }
        l.tail.push_back(line);
    }

    fn tail(&self) -> String {
        lock(&self.inner)
            .tail
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn print(&self) {
        let l = lock(&self.inner);
        println!(
            "daemon log: {} warnings, {} errors{}",
            l.warnings,
            l.errors,
            if l.notable.is_empty() {
                ""
            } else {
                "; the first:"
            }
        );
        for line in &l.notable {
            println!("  {line}");
        }
    }
}

/// The real daemon, on a loopback port.
struct Daemon {
    proc: Proc,
    addr: SocketAddr,
    log: Arc<DaemonLog>,
    spawned: Instant,
    /// From spawn to the `listening on` line.
    listening_after: Duration,
}

impl Daemon {
    async fn start(work: &Workdir) -> Result<Self> {
        let spawned = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_dispatchd"))
            .arg("serve")
            .arg("--config")
            .arg(&work.config)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(work.data_dir())
            .env_remove("DISPATCHD_LISTEN")
            .env_remove("DISPATCHD_DATA_DIR")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start dispatchd")?;
        let stderr = child.stderr.take();
        let proc = Proc {
            name: "dispatchd",
            child,
        };
        let log = Arc::new(DaemonLog::default());
        let rx = watch_log(stderr.context("no stderr pipe")?, log.clone());
        let (addr, at) = match tokio::time::timeout(START_TIMEOUT, rx).await {
            Ok(Ok(found)) => found,
            Ok(Err(_)) => bail!(
                "dispatchd exited before listening; its output:\n{}",
                log.tail()
            ),
            Err(_) => bail!(
                "dispatchd did not start listening within {START_TIMEOUT:?}; its output:\n{}",
                log.tail()
            ),
        };
        Ok(Self {
            proc,
            addr,
            log,
            spawned,
            listening_after: at.saturating_duration_since(spawned),
        })
    }

    fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// SIGTERM, wait, and insist on a clean exit; returns how long it took.
    async fn stop(mut self) -> Result<Duration> {
        let t = Instant::now();
        let status = self.proc.terminate(STOP_TIMEOUT).await?;
        if !status.success() {
            bail!(
                "dispatchd exited with {status} after SIGTERM; its last output:\n{}",
                self.log.tail()
            );
        }
        Ok(t.elapsed())
    }
}

/// Drains the daemon's stderr for its whole life (so it never blocks on a full pipe) and
/// sends the address of the `listening on` line with the instant it was read.
fn watch_log(
    output: impl Read + Send + 'static,
    log: Arc<DaemonLog>,
) -> oneshot::Receiver<(SocketAddr, Instant)> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(output).lines().map_while(Result::ok) {
            if tx.is_some()
                && let Some(addr) = dispatchd::daemon::listen_addr_in(&line)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send((addr, Instant::now()));
            }
            log.add(line);
        }
    });
    rx
}

/// Polls `GET /readyz` until it answers 200; returns when it did.
async fn wait_ready(addr: SocketAddr, deadline: Instant) -> Result<Instant> {
    let mut last = String::new();
    for _ in 0..100_000 {
        match http_get(addr, "/readyz", Duration::from_secs(2)).await {
            Ok(r) if r.status == 200 => return Ok(Instant::now()),
            Ok(r) => last = format!("HTTP {}", r.status),
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    bail!("dispatchd not ready in time (last answer: {last})")
}

// ---------------------------------------------------------------------------------------------
// The receiver

/// A hyper 1.x server on 127.0.0.1 that answers 200 and records first arrivals by webhook-id.
struct Receiver {
    addr: SocketAddr,
    state: Arc<RecvState>,
    stop: watch::Sender<bool>,
}

struct RecvState {
    shards: Vec<Mutex<HashMap<u128, Instant>>>,
    requests: AtomicU64,
    unique: AtomicU64,
    duplicates: AtomicU64,
    checked: AtomicU64,
    bad: AtomicU64,
    first_problem: Mutex<Option<String>>,
    secret: Vec<u8>,
}

impl RecvState {
    fn shard(&self, key: u128) -> &Mutex<HashMap<u128, Instant>> {
        &self.shards[(key % SHARDS as u128) as usize]
    }

    fn arrive(&self, key: u128, at: Instant) {
        match lock(self.shard(key)).entry(key) {
            Entry::Occupied(_) => {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            Entry::Vacant(v) => {
                v.insert(at);
                self.unique.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn problem(&self, what: String) {
        self.bad.fetch_add(1, Ordering::Relaxed);
        let mut p = lock(&self.first_problem);
        if p.is_none() {
            *p = Some(what);
        }
    }
}

impl Receiver {
    async fn start() -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("receiver: cannot bind")?;
        let addr = listener.local_addr()?;
        let secret = B64
            .decode(&SECRET["whsec_".len()..])
            .context("the bench secret is not base64")?;
        let state = Arc::new(RecvState {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            requests: AtomicU64::new(0),
            unique: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            checked: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            first_problem: Mutex::new(None),
            secret,
        });
        let (stop, mut stopped) = watch::channel(false);
        let st = state.clone();
        tokio::spawn(async move {
            let mut http = http1::Builder::new();
            http.keep_alive(true);
            for _ in 0..MAX_ACCEPTS {
                let stream = tokio::select! {
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        Err(e) => {
                            eprintln!("receiver: accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = stopped.changed() => break,
                };
                let _ = stream.set_nodelay(true);
                let st = st.clone();
                let conn = http.serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |req| receive(st.clone(), req)),
                );
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Ok(Self { addr, state, stop })
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until every key has arrived or `deadline`; returns how many have not.
    async fn wait_for(&self, keys: &[(u128, Instant)], deadline: Instant) -> usize {
        let mut missing = keys.len();
        for _ in 0..1_000_000 {
            if self.state.unique.load(Ordering::Relaxed) >= keys.len() as u64 {
                missing = self.arrivals(keys).iter().filter(|a| a.is_none()).count();
                if missing == 0 {
                    return 0;
                }
            }
            if Instant::now() >= deadline {
                return self.arrivals(keys).iter().filter(|a| a.is_none()).count();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        missing
    }

    /// The first arrival of each key.
    fn arrivals(&self, keys: &[(u128, Instant)]) -> Vec<Option<Instant>> {
        let shards: Vec<_> = self.state.shards.iter().map(lock).collect();
        keys.iter()
            .map(|(k, _)| shards[(k % SHARDS as u128) as usize].get(k).copied())
            .collect()
    }

    /// First arrivals inside the window, in total and per whole second of it.
    fn first_arrivals_in(&self, w: Window) -> (u64, Vec<u64>) {
        let secs = w.end.saturating_duration_since(w.start).as_secs();
        let mut per_second = vec![0u64; usize::try_from(secs).unwrap_or(0)];
        let mut total = 0;
        for shard in &self.state.shards {
            for at in lock(shard).values() {
                if w.contains(*at) {
                    total += 1;
                    let i = at.saturating_duration_since(w.start).as_secs();
                    if let Some(c) = usize::try_from(i).ok().and_then(|i| per_second.get_mut(i)) {
                        *c += 1;
                    }
                }
            }
        }
        (total, per_second)
    }

    fn print_checks(&self, acked: u64) {
        let s = &self.state;
        let requests = s.requests.load(Ordering::Relaxed);
        let unique = s.unique.load(Ordering::Relaxed);
        println!(
            "receiver                     {requests} requests, {unique} distinct webhook-ids \
             ({acked} events acknowledged), {} duplicates",
            s.duplicates.load(Ordering::Relaxed)
        );
        println!(
            "  sampled checks (1 in {SAMPLE_EVERY}): {} deliveries verified (hmac+sha2 \
             signature, timestamp, body id), {} bad{}",
            s.checked.load(Ordering::Relaxed),
            s.bad.load(Ordering::Relaxed),
            lock(&s.first_problem)
                .as_deref()
                .map(|p| format!("; first: {p}"))
                .unwrap_or_default()
        );
    }
}

async fn receive(
    st: Arc<RecvState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let at = Instant::now();
    let n = st.requests.fetch_add(1, Ordering::Relaxed);
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let id = header("webhook-id");
    let signed = n
        .is_multiple_of(SAMPLE_EVERY)
        .then(|| (header("webhook-timestamp"), header("webhook-signature")));
    let body = req.into_body().collect().await?.to_bytes();
    match id {
        None => st.problem("a request without a webhook-id".to_owned()),
        Some(id) => {
            st.arrive(id_key(&id), at);
            if let Some((ts, sig)) = signed {
                st.checked.fetch_add(1, Ordering::Relaxed);
                if let Err(why) = verify(&st.secret, &id, ts.as_deref(), sig.as_deref(), &body) {
                    st.problem(format!("webhook-id {id}: {why}"));
                }
            }
        }
    }
    Ok(Response::new(Full::new(Bytes::new())))
}

/// Checks one delivery independently of the daemon's code: Standard Webhooks signature with
/// the hmac + sha2 crates, a current timestamp, and a body whose `id` is the webhook-id.
fn verify(
    secret: &[u8],
    id: &str,
    ts: Option<&str>,
    sig: Option<&str>,
    body: &[u8],
) -> Result<(), String> {
    let ts = ts.ok_or("no webhook-timestamp")?;
    let sig = sig.ok_or("no webhook-signature")?;
    let secs: i64 = ts
        .parse()
        .map_err(|_| format!("bad webhook-timestamp {ts:?}"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if (now - secs).abs() > 300 {
        return Err(format!("webhook-timestamp {ts} is {} s off", now - secs));
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|e| e.to_string())?;
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let expected = B64.encode(mac.finalize().into_bytes());
    if !sig
        .split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
    {
        return Err(format!("webhook-signature {sig:?} does not verify"));
    }
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    if v.get("id").and_then(|i| i.as_str()) != Some(id) {
        return Err("the body's id is not the webhook-id".to_owned());
    }
    for field in ["type", "timestamp", "data"] {
        if v.get(field).is_none() {
            return Err(format!("the body has no {field:?}"));
        }
    }
    Ok(())
}

/// A compact key for an event id: the 128 bits of `evt_<uuid>` ids, a hash of anything else.
fn id_key(id: &str) -> u128 {
    if let Some(hex) = id.strip_prefix("evt_")
        && hex.len() == 32
        && let Ok(v) = u128::from_str_radix(hex, 16)
    {
        return v;
    }
    let half = |seed: u8| {
        let mut h = DefaultHasher::new();
        seed.hash(&mut h);
        id.hash(&mut h);
        h.finish()
    };
    (u128::from(half(0)) << 64) | u128::from(half(1))
}

// ---------------------------------------------------------------------------------------------
// The publishers (throughput and latency)

#[derive(Default)]
struct PubStats {
    /// Every acknowledged event (inside the window or not): its key and when the ack was read.
    acks: Vec<(u128, Instant)>,
    errors: u64,
    first_error: Option<String>,
    /// Publish round trips completed inside the window (2xx only).
    hist: Histogram,
}

impl PubStats {
    fn error(&mut self, what: impl FnOnce() -> String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what());
        }
    }

    fn merge(&mut self, o: PubStats) {
        self.acks.extend(o.acks);
        self.errors += o.errors;
        self.first_error = self.first_error.take().or(o.first_error);
        self.hist.merge(&o.hist);
    }
}

/// Runs `conns` publishing connections until the window ends: closed loops, or paced by
/// `pace` = (common start, period per connection).
async fn run_publishers(
    addr: SocketAddr,
    conns: usize,
    body_bytes: usize,
    batch: usize,
    window: Window,
    pace: Option<(Instant, Duration)>,
) -> Result<PubStats> {
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for id in 0..conns {
        // Staggered so the connections do not all send on the same millisecond.
        let ticker = pace.map(|(start, period)| {
            let offset = period.mul_f64(id as f64 / conns as f64);
            (start + offset, period)
        });
        tasks.spawn(publish_loop(
            id,
            addr,
            window,
            ticker,
            sent.clone(),
            EventRequest::batch(addr, id, body_bytes, batch),
        ));
    }
    let mut total = PubStats::default();
    while let Some(joined) = tasks.join_next().await {
        total.merge(joined.context("a publishing task panicked")?);
    }
    Ok(total)
}

/// One connection: publish, read the ack, record its id; reconnects after errors.
async fn publish_loop(
    id: usize,
    addr: SocketAddr,
    window: Window,
    ticker: Option<(Instant, Duration)>,
    sent: Arc<AtomicU64>,
    mut req: EventRequest,
) -> PubStats {
    let mut stats = PubStats::default();
    let mut conn: Option<HttpConn> = None;
    let mut interval = ticker.map(|(start, period)| {
        let mut i = tokio::time::interval_at(start.into(), period);
        i.set_missed_tick_behavior(MissedTickBehavior::Burst);
        i
    });
    while Instant::now() < window.end && sent.fetch_add(1, Ordering::Relaxed) < MAX_REQUESTS {
        if let Some(i) = interval.as_mut()
            && tokio::time::timeout_at(window.end.into(), i.tick())
                .await
                .is_err()
        {
            break;
        }
        if conn.is_none() {
            match tokio::time::timeout(REQUEST_TIMEOUT, HttpConn::connect(addr)).await {
                Ok(Ok(c)) => conn = Some(c),
                failed => {
                    stats.error(|| match failed {
                        Ok(Err(e)) => format!("connection {id}: connect: {e}"),
                        _ => format!("connection {id}: connect timed out"),
                    });
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let sent_at = Instant::now();
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, c.round_trip(req.next())).await;
        let done = Instant::now();
        match outcome {
            Ok(Ok(resp)) => {
                if (200..300).contains(&resp.status) {
                    let acks = if req.counters.len() == 1 {
                        serde_json::from_slice::<Ack>(&resp.body).map(|a| vec![a])
                    } else {
                        serde_json::from_slice::<BatchAck>(&resp.body).map(|b| b.items)
                    };
                    match acks {
                        Ok(acks) if acks.len() != req.counters.len() => stats.error(|| {
                            format!(
                                "sent {} events, got {} results",
                                req.counters.len(),
                                acks.len()
                            )
                        }),
                        Ok(acks) => {
                            for ack in acks {
                                if ack.deliveries != 1 {
                                    stats.error(|| {
                                        format!(
                                            "event {} made {} deliveries, not 1",
                                            ack.id, ack.deliveries
                                        )
                                    });
                                    continue;
                                }
                                stats.acks.push((id_key(&ack.id), done));
                            }
                            if window.contains(done) {
                                stats.hist.record(done.duration_since(sent_at));
                            }
                        }
                        Err(e) => stats.error(|| format!("unexpected publish response: {e}")),
                    }
                } else {
                    stats.error(|| {
                        format!(
                            "HTTP {}: {}",
                            resp.status,
                            String::from_utf8_lossy(&resp.body[..resp.body.len().min(300)])
                        )
                    });
                }
                if resp.close {
                    conn = None;
                }
            }
            Ok(Err(e)) => {
                stats.error(|| format!("connection {id}: {e}"));
                conn = None;
            }
            Err(_) => {
                stats.error(|| format!("connection {id}: no response within {REQUEST_TIMEOUT:?}"));
                conn = None;
            }
        }
    }
    stats
}

// ---------------------------------------------------------------------------------------------
// The daemon's metrics

/// One scrape of `/metrics`: (name, labels, value) per sample line.
struct Scrape {
    samples: Vec<(String, String, f64)>,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, labels, rest) = match (line.find('{'), line.rfind('}')) {
                (Some(open), Some(close)) if open < close => {
                    (&line[..open], &line[open + 1..close], &line[close + 1..])
                }
                _ => match line.split_once(' ') {
                    Some((name, rest)) => (name, "", rest),
                    None => continue,
                },
            };
            if let Some(v) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) {
                samples.push((name.to_owned(), labels.to_owned(), v));
            }
        }
        Self { samples }
    }

    /// The sum of a metric's samples whose labels contain `label` (all when empty).
    fn sum(&self, name: &str, label: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| n == name && l.contains(label))
            .map(|(_, _, v)| v)
            .sum()
    }

    /// A metric's samples summed by the value of one label.
    fn by_label(&self, name: &str, key: &str) -> Vec<(String, f64)> {
        let pattern = format!("{key}=\"");
        let mut out: Vec<(String, f64)> = Vec::new();
        for (n, l, v) in &self.samples {
            if n != name {
                continue;
            }
            let Some(start) = l.find(&pattern).map(|i| i + pattern.len()) else {
                continue;
            };
            let value = l[start..].split('"').next().unwrap_or("").to_owned();
            match out.iter_mut().find(|(k, _)| *k == value) {
                Some((_, sum)) => *sum += v,
                None => out.push((value, *v)),
            }
        }
        out
    }
}

async fn scrape(addr: SocketAddr) -> Result<Scrape> {
    let resp = http_get(addr, "/metrics", REQUEST_TIMEOUT).await?;
    if resp.status != 200 {
        bail!("GET /metrics answered {}", resp.status);
    }
    Ok(Scrape::parse(&String::from_utf8_lossy(&resp.body)))
}

/// One GET on a fresh connection.
async fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<HttpResponse> {
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    let resp = tokio::time::timeout(timeout, async {
        let mut conn = HttpConn::connect(addr).await?;
        conn.round_trip(request.as_bytes()).await
    })
    .await
    .with_context(|| format!("GET {path} timed out"))?
    .with_context(|| format!("GET {path} failed"))?;
    Ok(resp)
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client connection

// ---------------------------------------------------------------------------------------------
// Latency histogram

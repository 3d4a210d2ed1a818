//! Ingest benchmark: how many events per second `dispatchd` accepts durably, and at what
//! latency, next to a bare hyper server that does no work at all.
//!
//! # What it measures
//!
//! The real daemon binary (release build) is started on 127.0.0.1 with a fresh temporary data
//! directory and its default configuration (no subscriptions: every event fans out to zero
//! deliveries). For each connection count, N keep-alive HTTP/1.1 connections each run a closed
//! loop: send `POST /v1/events` with a JSON event of `--body-bytes` bytes (a per-connection
//! counter makes every body different; the server generates the ids), wait for the whole
//! response, send the next one. dispatchd answers 202 only after the group commit holding the
//! event was fsynced, so every figure includes the durable write.
//!
//! Each run has a 1 s warm-up, then a measurement window of `--seconds`. Only responses that
//! complete inside the window count: events/s is 2xx responses per second of window, latency is
//! from the first byte written to the last byte of the response (2xx only), and errors are
//! non-2xx answers plus I/O failures (resets, malformed responses, 10 s timeouts).
//!
//! The same load then runs against a bare hyper 1.x server: this bench binary re-executed with
//! `--bare-server`, 2 tokio workers, reading the body and answering 200 without storing
//! anything. It is the HTTP floor of the machine; dispatchd/bare is the share of that floor
//! the daemon keeps while making every event durable.
//!
//! From the daemon's `/metrics` (`dispatchd_writer_batch_size` and
//! `dispatchd_writer_commit_seconds`), each run shows the writer's commits per second, mean
//! batch size and mean commit time over its window, and the end shows them over the whole
//! process: with many connections, one fsync should carry many events.
//!
//! The load generator runs in this process on a 2-worker tokio runtime, on the same machine
//! as the server under test, so both compete for the same cores (2 on the reference machine):
//! the figures describe that setup, not the server alone.
//!
//! # Running
//!
//! ```text
//! cargo bench --bench ingest                                  # 64 and 256 connections, 10 s each
//! cargo bench --bench ingest -- --seconds 5 --connections 16,64,256 --body-bytes 4096
//! cargo bench --bench ingest -- --no-bare                     # dispatchd only
//! ```
//!
//! The data directory is created under `$TMPDIR` (default `/tmp`): point it at the disk to be
//! measured, since an fsync on tmpfs costs nothing.

// A benchmark observes the daemon from outside, with the machine's own clocks; the
// daemon's one-clock rule (clippy.toml) is not for it.
#![allow(clippy::disallowed_methods)]

mod common;

use common::event_request::EventRequest;
use common::histogram::Histogram;
use common::load::{LoadConn, Window};
use common::metrics::{Scrape, scrape};
use common::proc::{Listening, Watch};
use common::{MAX_REQUESTS, WARMUP};

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

const USAGE: &str = "\
usage: cargo bench --bench ingest -- [options]
  --connections LIST   comma-separated connection counts (default 64,256)
  --seconds N          measurement window per run, after a 1 s warm-up (default 10)
  --body-bytes N       size of each event's JSON body (default 1024)
  --no-bare            skip the bare hyper baseline";

/// How long dispatchd may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Tokio workers of the load generator, and of the bare server.
const LOAD_WORKERS: usize = 2;
const BARE_WORKERS: usize = 2;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = if args.iter().any(|a| a == "--bare-server") {
        bare_server_main()
    } else {
        parse_options(&args).and_then(run)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ingest bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Options

struct Options {
    connections: Vec<usize>,
    seconds: u64,
    body_bytes: usize,
    bare: bool,
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut o = Options {
        connections: vec![64, 256],
        seconds: 10,
        body_bytes: 1024,
        bare: true,
    };
    common::args::parse(args, USAGE, |flag, value| {
        match flag {
            "--connections" => {
                o.connections = value()?
                    .split(',')
                    .map(|s| match s.trim().parse::<usize>() {
                        Ok(n) if n > 0 => Ok(n),
                        _ => Err(anyhow!("--connections: {s:?} is not a positive count")),
                    })
                    .collect::<Result<_>>()?;
            }
            "--seconds" => {
                o.seconds = match value()?.parse::<u64>() {
                    Ok(n) if n > 0 => n,
                    _ => bail!("--seconds needs a positive whole number"),
                };
            }
            "--body-bytes" => {
                o.body_bytes = value()?
                    .parse()
                    .context("--body-bytes needs a byte count")?;
            }
            "--no-bare" => o.bare = false,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// The benchmark

fn run(opts: Options) -> Result<()> {
    common::block_on(LOAD_WORKERS, "the load generator's runtime", async {
        let daemon = Daemon::start().await?;
        let bare = if opts.bare {
            Some(start_bare_server().await?)
        } else {
            None
        };
        bench(&opts, daemon, bare).await
    })?
}

async fn bench(opts: &Options, daemon: Daemon, bare: Option<Listening>) -> Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let window = Duration::from_secs(opts.seconds);
    println!("dispatchd ingest benchmark");
    println!(
        "  load: closed loop, keep-alive HTTP/1.1, POST /v1/events with a {}-byte JSON event, \
         {}s warm-up + {}s measured per run",
        EventRequest::body_len(opts.body_bytes),
        WARMUP.as_secs(),
        opts.seconds
    );
    println!(
        "  machine: {cpus} CPUs, shared by the load generator (tokio, {LOAD_WORKERS} workers, \
         in this process) and the server under test"
    );
    println!(
        "  dispatchd: release build, default config, data dir {} (202 after fsync)",
        daemon.data_dir().display()
    );
    if bare.is_some() {
        println!(
            "  bare: hyper 1.x, {BARE_WORKERS} tokio workers, reads the body, answers 200, no storage"
        );
    }
    println!();
    println!(
        "{:<10} {:>6} {:>10} {:>11} {:>7} {:>8} {:>8} {:>9}",
        "target", "conns", "requests", "events/s", "errors", "p50 ms", "p99 ms", "p99.9 ms"
    );

    for &conns in &opts.connections {
        let addr = daemon.server.addr;
        let d = load(addr, conns, window, opts.body_bytes, Some(addr)).await?;
        print_row("dispatchd", conns, &d);
        if let Some(w) = &d.writer {
            let secs = window.as_secs_f64();
            println!(
                "  writer: {:.0} commits/s, mean batch {:.1} events, mean commit {:.3} ms",
                w.batch_count / secs,
                w.mean_batch(),
                w.mean_commit_ms()
            );
        }
        settle().await;
        if let Some(b) = &bare {
            let r = load(b.addr, conns, window, opts.body_bytes, None).await?;
            print_row("bare", conns, &r);
            let ratio = if r.ok > 0 {
                d.ok as f64 / r.ok as f64
            } else {
                f64::NAN
            };
            println!(
                "  dispatchd/bare throughput at {conns} connections: {ratio:.3} ({:.1}%)",
                ratio * 100.0
            );
            settle().await;
        }
    }

    let total = fetch_writer_stats(daemon.server.addr)
        .await
        .context("cannot read the daemon's metrics")?;
    println!();
    println!(
        "group commit over the daemon's life (warm-ups included): {:.0} commits, \
         mean batch {:.1} events (writer_batch_size_sum/_count), \
         mean commit {:.3} ms (writer_commit_seconds_sum/_count)",
        total.batch_count,
        total.mean_batch(),
        total.mean_commit_ms()
    );
    println!(
        "note: the load generator and the server share the same {cpus} CPUs; for bare, \
         events/s counts 200 responses; latency covers 2xx responses only"
    );

    if let Some(mut b) = bare {
        // The bare server has no signal handler: SIGTERM ends it, which is all it needs.
        b.proc.terminate(STOP_TIMEOUT).await?;
    }
    daemon.stop().await
}

/// Lets the previous run's connections close before the next one starts.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(250)).await;
}

fn print_row(target: &str, conns: usize, r: &LoadResult) {
    let ms = |q: f64| {
        r.hist
            .percentile(q)
            .map_or_else(|| "-".to_owned(), |us| format!("{:.3}", us as f64 / 1000.0))
    };
    println!(
        "{:<10} {:>6} {:>10} {:>11.1} {:>7} {:>8} {:>8} {:>9}",
        target,
        conns,
        r.ok + r.non_2xx,
        r.ok as f64 / r.window.as_secs_f64(),
        r.non_2xx + r.io_errors,
        ms(0.50),
        ms(0.99),
        ms(0.999),
    );
    if r.non_2xx + r.io_errors > 0 {
        println!(
            "  errors: {} non-2xx, {} I/O; first: {}",
            r.non_2xx,
            r.io_errors,
            r.first_error.as_deref().unwrap_or("?")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// The real daemon, on a loopback port with a fresh data directory.
struct Daemon {
    server: Listening,
    dir: tempfile::TempDir,
}

impl Daemon {
    async fn start() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("dispatchd-bench-")
            .tempdir()
            .context("cannot create the data directory")?;
        let server = common::proc::start_daemon(&dir.path().join("data"), |_| {}).await?;
        Ok(Self { server, dir })
    }

    fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// SIGTERM, wait, and insist on a clean exit.
    async fn stop(self) -> Result<()> {
        let (status, _) = self.server.stop(STOP_TIMEOUT).await?;
        println!("dispatchd stopped cleanly after SIGTERM ({status})");
        Ok(())
    }
}

/// The bare hyper server: this binary, re-executed with `--bare-server`, which prints its
/// port on stdout.
async fn start_bare_server() -> Result<Listening> {
    let exe = std::env::current_exe().context("cannot find the bench executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--bare-server")
        // Kept open for the child's life: it exits when this pipe closes.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    Listening::start(
        "bare server",
        "the bare server",
        cmd,
        Watch::Stdout,
        |line| {
            let port = line.trim().parse::<u16>().ok()?;
            Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// The bare server (child process side)

fn bare_server_main() -> Result<()> {
    // The parent holds our stdin: when it goes away, so do we.
    std::thread::spawn(|| {
        let _ = io::copy(&mut io::stdin(), &mut io::sink());
        std::process::exit(0);
    });
    common::block_on(BARE_WORKERS, "the bare server's runtime", bare_serve())?
}

async fn bare_serve() -> Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .context("bare server: cannot bind")?;
    let port = listener.local_addr()?.port();
    {
        let mut out = io::stdout().lock();
        writeln!(out, "{port}")?;
        out.flush()?;
    }
    let mut http = http1::Builder::new();
    http.keep_alive(true);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("bare server: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = http.serve_connection(TokioIo::new(stream), service_fn(bare_handle));
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

async fn bare_handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let body = req.into_body().collect().await?.to_bytes();
    let mut resp = Response::new(Full::new(Bytes::from(format!(
        r#"{{"ok":true,"bytes":{}}}"#,
        body.len()
    ))));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

// ---------------------------------------------------------------------------------------------
// The load generator

struct LoadResult {
    window: Duration,
    /// 2xx responses completed in the window.
    ok: u64,
    non_2xx: u64,
    io_errors: u64,
    first_error: Option<String>,
    hist: Histogram,
    /// The writer's metrics over the window (dispatchd only).
    writer: Option<WriterStats>,
}

/// Runs `conns` closed-loop connections against `addr`: warm-up, then `measure`.
async fn load(
    addr: SocketAddr,
    conns: usize,
    measure: Duration,
    body_bytes: usize,
    metrics: Option<SocketAddr>,
) -> Result<LoadResult> {
    let window = Window::after_warmup(Instant::now(), measure);
    let scrape = metrics.map(|m| {
        tokio::spawn(async move {
            tokio::time::sleep_until(window.start.into()).await;
            let before = fetch_writer_stats(m).await?;
            tokio::time::sleep_until(window.end.into()).await;
            let after = fetch_writer_stats(m).await?;
            Ok::<_, anyhow::Error>(after.minus(&before))
        })
    });
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for id in 0..conns {
        tasks.spawn(drive(
            id,
            addr,
            window,
            sent.clone(),
            EventRequest::batch(addr, id, body_bytes, 1),
        ));
    }
    let mut total = ConnStats::default();
    while let Some(joined) = tasks.join_next().await {
        total.merge(joined.context("a load task panicked")?);
    }
    let writer = match scrape {
        Some(task) => Some(
            task.await
                .context("the metrics task panicked")?
                .context("cannot read the daemon's metrics")?,
        ),
        None => None,
    };
    Ok(LoadResult {
        window: measure,
        ok: total.ok,
        non_2xx: total.non_2xx,
        io_errors: total.io_errors,
        first_error: total.first_error,
        hist: total.hist,
        writer,
    })
}

#[derive(Default)]
struct ConnStats {
    ok: u64,
    non_2xx: u64,
    io_errors: u64,
    first_error: Option<String>,
    hist: Histogram,
}

impl ConnStats {
    fn error(&mut self, io: bool, what: impl FnOnce() -> String) {
        if io {
            self.io_errors += 1;
        } else {
            self.non_2xx += 1;
        }
        if self.first_error.is_none() {
            self.first_error = Some(what());
        }
    }

    fn merge(&mut self, o: ConnStats) {
        self.ok += o.ok;
        self.non_2xx += o.non_2xx;
        self.io_errors += o.io_errors;
        self.first_error = self.first_error.take().or(o.first_error);
        self.hist.merge(&o.hist);
    }
}

/// One connection's closed loop, reconnecting after errors, until the window ends.
async fn drive(
    id: usize,
    addr: SocketAddr,
    window: Window,
    sent: Arc<AtomicU64>,
    mut req: EventRequest,
) -> ConnStats {
    let mut stats = ConnStats::default();
    let mut conn = LoadConn::new(id, addr);
    while Instant::now() < window.end && sent.fetch_add(1, Ordering::Relaxed) < MAX_REQUESTS {
        match conn.send(&mut req).await {
            Ok(reply) => {
                if window.contains(reply.done) {
                    if (200..300).contains(&reply.resp.status) {
                        stats.ok += 1;
                        stats.hist.record(reply.done.duration_since(reply.sent_at));
                    } else {
                        stats.error(false, || reply.resp.summary());
                    }
                }
            }
            Err(failure) => {
                if window.contains(failure.at) {
                    stats.error(true, || failure.describe());
                }
            }
        }
    }
    stats
}

// ---------------------------------------------------------------------------------------------
// The daemon's writer metrics

#[derive(Clone, Copy, Default)]
struct WriterStats {
    batch_sum: f64,
    batch_count: f64,
    commit_sum: f64,
    commit_count: f64,
}

impl WriterStats {
    fn minus(&self, before: &Self) -> Self {
        Self {
            batch_sum: self.batch_sum - before.batch_sum,
            batch_count: self.batch_count - before.batch_count,
            commit_sum: self.commit_sum - before.commit_sum,
            commit_count: self.commit_count - before.commit_count,
        }
    }

    fn mean_batch(&self) -> f64 {
        self.batch_sum / self.batch_count
    }

    fn mean_commit_ms(&self) -> f64 {
        self.commit_sum / self.commit_count * 1000.0
    }
}

async fn fetch_writer_stats(addr: SocketAddr) -> Result<WriterStats> {
    writer_stats(&scrape(addr).await?)
}

/// The writer's four sums and counts.
fn writer_stats(m: &Scrape) -> Result<WriterStats> {
    Ok(WriterStats {
        batch_sum: m.value("dispatchd_writer_batch_size_sum")?,
        batch_count: m.value("dispatchd_writer_batch_size_count")?,
        commit_sum: m.value("dispatchd_writer_commit_seconds_sum")?,
        commit_count: m.value("dispatchd_writer_commit_seconds_count")?,
    })
}

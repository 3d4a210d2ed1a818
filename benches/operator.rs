//! Delivery list latency with a large database: fills a fresh store with 1,000,000
//! deliveries through the library (`Store::open` + `writer::spawn`, batched publishes, then
//! attempt outcomes so the status indexes are realistic), and prints the latency of one page
//! of 100 for each kind of filter the operator API offers. Target: under 20 ms a page.
//!
//! ```sh
//! cargo bench --bench operator                 # 1,000,000 deliveries
//! cargo bench --bench operator -- --events 50000 --subscriptions 4
//! ```

// A benchmark observes the daemon from outside, with the machine's own clocks; the
// daemon's one-clock rule (clippy.toml) is not for it.
#![allow(clippy::disallowed_methods)]

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dispatchd::metrics::Metrics;
use dispatchd::model::{Attempt, DeliveryId, DeliveryStatus, now_micros};
use dispatchd::storage::inspect::{DeadFilter, DeliveryFilter};
use dispatchd::storage::writer::{self, AttemptRecord, NewEvent, Next, WriterConfig};
use dispatchd::storage::{Page, Store};

/// Event types, with how often each is published (per mille): one is rare on purpose.
const TYPES: &[(&str, u32)] = &[
    ("order.created", 400),
    ("order.paid", 300),
    ("invoice.sent", 200),
    ("user.signup", 99),
    ("audit.rare", 1),
];

struct Options {
    events: usize,
    subscriptions: usize,
    /// Samples per query.
    samples: usize,
}

fn parse_options() -> Result<Options> {
    let mut o = Options {
        events: 250_000,
        subscriptions: 4,
        samples: 200,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = |i: usize| -> Result<usize> {
            args.get(i + 1)
                .with_context(|| format!("{} needs a value", args[i]))?
                .parse()
                .with_context(|| format!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--events" => o.events = value(i)?,
            "--subscriptions" => o.subscriptions = value(i)?,
            "--samples" => o.samples = value(i)?,
            // cargo bench passes --bench; nothing else is expected.
            "--bench" => {
                i += 1;
                continue;
            }
            other => bail!("unknown option {other}"),
        }
        i += 2;
    }
    if o.subscriptions == 0 || o.events == 0 {
        bail!("--events and --subscriptions must be at least 1");
    }
    Ok(o)
}

fn main() -> ExitCode {
    let opts = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("operator bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("operator bench: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("operator bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn event_type(i: usize) -> &'static str {
    let slot = (i.wrapping_mul(7919) % 1000) as u32;
    let mut acc = 0;
    for (t, share) in TYPES {
        acc += share;
        if slot < acc {
            return t;
        }
    }
    TYPES[0].0
}

async fn run(o: Options) -> Result<()> {
    let dir = tempfile::tempdir().context("tempdir")?;
    let path = dir.path().join("dispatchd.redb");
    let store = Store::open(&path, 256 << 20, 32 << 20).context("open store")?;
    let metrics = Arc::new(Metrics::new().context("metrics")?);
    let (writer, thread) = writer::spawn(
        store.clone(),
        WriterConfig {
            max_batch: 64,
            queue: 4096,
            clock: dispatchd::clock::Clock::system(),
        },
        metrics,
        None,
    )
    .context("writer")?;
    let subs: Vec<Arc<str>> = (0..o.subscriptions)
        .map(|i| Arc::from(format!("sub-{i}").as_str()))
        .collect();
    let total = o.events * o.subscriptions;
    println!(
        "filling {} events x {} subscriptions = {total} deliveries ...",
        o.events, o.subscriptions
    );

    // Publishes: 4 tasks, 1000 events per command, so commits group.
    let started = Instant::now();
    let per_task = o.events.div_ceil(4);
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (writer, subs) = (writer.clone(), subs.clone());
        let range = (t * per_task)..((t + 1) * per_task).min(o.events);
        tasks.push(tokio::spawn(async move {
            let ids: Vec<usize> = range.collect();
            for chunk in ids.chunks(1000) {
                let events = chunk
                    .iter()
                    .map(|&i| NewEvent {
                        id: format!("evt_{i:09}"),
                        event_type: event_type(i).to_string(),
                        source: None,
                        data: format!("{{\"i\":{i},\"total\":{}}}", i % 500),
                        idempotency_key: None,
                        subscriptions: subs.clone(),
                        ..NewEvent::default()
                    })
                    .collect();
                writer.publish(events).await?;
            }
            Ok::<_, writer::WriteError>(())
        }));
    }
    for t in tasks {
        t.await.context("publisher task")??;
    }
    let fill = started.elapsed();
    println!(
        "  published in {:.1} s ({:.0} deliveries/s)",
        fill.as_secs_f64(),
        total as f64 / fill.as_secs_f64()
    );

    // Outcomes: 30% succeeded, 2% dead (mostly on sub-1), the rest stays pending.
    let started = Instant::now();
    let mut records = Vec::new();
    let mut outcomes = (0usize, 0usize);
    for id in 1..=total as DeliveryId {
        let sub = &subs[((id - 1) as usize) % subs.len()];
        let next = match id % 100 {
            0..=29 => Next::Succeeded,
            30 | 31 if &**sub == "sub-1" || id % 1000 == 30 => Next::Dead,
            _ => continue,
        };
        match next {
            Next::Dead => outcomes.1 += 1,
            _ => outcomes.0 += 1,
        }
        records.push(AttemptRecord {
            delivery: id,
            subscription: sub.clone(),
            attempt: Attempt {
                started_at: now_micros(),
                duration_us: 1000,
                status_code: Some(if next == Next::Dead { 500 } else { 200 }),
                error: None,
                response_body: String::new(),
            },
            error: (next == Next::Dead).then(|| "HTTP 500".to_string()),
            next,
        });
        if records.len() >= 2000 {
            writer
                .record_outcomes(std::mem::take(&mut records), true)
                .await?;
        }
    }
    if !records.is_empty() {
        writer.record_outcomes(records, true).await?;
    }
    println!(
        "  recorded {} succeeded and {} dead in {:.1} s",
        outcomes.0,
        outcomes.1,
        started.elapsed().as_secs_f64()
    );
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!("  database file: {:.0} MiB", size as f64 / (1 << 20) as f64);
    writer.stop();
    drop(writer);
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .context("writer join")?
        .map_err(|_| anyhow::anyhow!("writer thread panicked"))?;

    // Time bounds for a window in the middle of the fill.
    let mid_lo = store
        .delivery((total as u64) * 2 / 5)?
        .map(|d| d.created_at)
        .unwrap_or(0);
    let mid_hi = store
        .delivery((total as u64) * 3 / 5)?
        .map(|d| d.created_at)
        .unwrap_or(i64::MAX);

    let f = |status: Option<DeliveryStatus>,
             subscription: Option<&str>,
             event_type: Option<&str>,
             since: Option<i64>,
             until: Option<i64>| DeliveryFilter {
        status,
        subscription: subscription.map(str::to_string),
        event_type: event_type.map(str::to_string),
        since,
        until,
        priority: None,
    };
    use DeliveryStatus::{Dead, Pending, Succeeded};
    let queries: Vec<(&str, DeliveryFilter)> = vec![
        ("no filter", f(None, None, None, None, None)),
        ("status=pending", f(Some(Pending), None, None, None, None)),
        ("status=dead", f(Some(Dead), None, None, None, None)),
        (
            "subscription=sub-2",
            f(None, Some("sub-2"), None, None, None),
        ),
        (
            "subscription=sub-1&status=dead",
            f(Some(Dead), Some("sub-1"), None, None, None),
        ),
        (
            "subscription=sub-0&status=succeeded",
            f(Some(Succeeded), Some("sub-0"), None, None, None),
        ),
        (
            "event_type=order.paid",
            f(None, None, Some("order.paid"), None, None),
        ),
        (
            "event_type=order.paid&subscription=sub-3&status=pending",
            f(Some(Pending), Some("sub-3"), Some("order.paid"), None, None),
        ),
        (
            "since..until (middle 20%)",
            f(None, None, None, Some(mid_lo), Some(mid_hi)),
        ),
        (
            "since..until&subscription=sub-1&status=dead",
            f(Some(Dead), Some("sub-1"), None, Some(mid_lo), Some(mid_hi)),
        ),
        (
            "event_type=audit.rare&status=pending (0.1% of rows)",
            f(Some(Pending), None, Some("audit.rare"), None, None),
        ),
        (
            "event_type=audit.rare&status=succeeded (empty intersection)",
            f(Some(Succeeded), None, Some("audit.rare"), None, None),
        ),
    ];

    println!();
    println!(
        "{:<62} {:>9} {:>9} {:>9} {:>6}",
        "list of 100 (first page and pages at random cursors)",
        "p50 ms",
        "p99 ms",
        "max ms",
        "rows"
    );
    let mut worst = Duration::ZERO;
    for (name, filter) in &queries {
        let (lat, rows) = measure(&o, |i| {
            // Half the samples read the first page, half start at a cursor spread over the ids.
            let after = (i % 2 == 1).then(|| (i as u64 * 7_919_993) % total as u64);
            store.list_deliveries(filter, after, 100)
        })?;
        worst = worst.max(lat[lat.len() * 99 / 100]);
        print_row(name, &lat, rows);
    }
    for (name, filter) in [
        ("dead letters", DeadFilter::default()),
        (
            "dead letters&subscription=sub-1",
            DeadFilter {
                subscription: Some("sub-1".into()),
                since: None,
            },
        ),
    ] {
        let (lat, rows) = measure(&o, |i| {
            let after = (i % 2 == 1).then(|| (i as u64 * 7_919_993) % total as u64);
            store.list_dead_letters(&filter, after, 100).map(|p| Page {
                next: p.next,
                items: p.items.into_iter().map(|d| (d.id, d.delivery)).collect(),
            })
        })?;
        worst = worst.max(lat[lat.len() * 99 / 100]);
        print_row(name, &lat, rows);
    }
    println!();
    println!(
        "worst p99: {:.2} ms (target < 20 ms) with {total} deliveries",
        worst.as_secs_f64() * 1000.0
    );
    drop(store);
    drop(dir);
    Ok(())
}

type Listed = Page<(DeliveryId, dispatchd::model::Delivery)>;

fn measure(
    o: &Options,
    mut list: impl FnMut(usize) -> Result<Listed, dispatchd::storage::StoreError>,
) -> Result<(Vec<Duration>, usize)> {
    // One warm-up pass, as an operator's second request would find the cache warm.
    list(0)?;
    let mut lat = Vec::with_capacity(o.samples);
    let mut rows = 0;
    for i in 0..o.samples {
        let t = Instant::now();
        let page = list(i)?;
        lat.push(t.elapsed());
        rows = rows.max(page.items.len());
    }
    lat.sort();
    Ok((lat, rows))
}

fn print_row(name: &str, lat: &[Duration], rows: usize) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{:<62} {:>9.2} {:>9.2} {:>9.2} {:>6}",
        name,
        ms(lat[lat.len() / 2]),
        ms(lat[lat.len() * 99 / 100]),
        ms(lat[lat.len() - 1]),
        rows
    );
}

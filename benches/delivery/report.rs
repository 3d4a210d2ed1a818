//! What the modes print: setup, phases, attempts, overdue retries, CPU and memory of each side.

use super::*;

pub(crate) fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "NOT MET" }
}

/// `note` where it `applies`: a run smaller than its target's says so.
pub(crate) fn caveat(applies: bool, note: &'static str) -> &'static str {
    if applies { note } else { "" }
}

pub(crate) fn ms(h: &Histogram, q: f64) -> String {
    h.percentile(q)
        .map_or_else(|| "-".to_owned(), |us| format!("{:.3}", us as f64 / 1000.0))
}

pub(crate) fn print_setup(opts: &Options, work: &Workdir, url: &str) {
    println!(
        "  dispatchd: release build, data dir {} (one journal fsync per group commit), storage.cache_size {}, {}",
        work.data_dir().display(),
        opts.cache_size.as_deref().unwrap_or("default"),
        match opts.node_workers {
            Some(n) => format!("{n} runtime worker thread(s) per node"),
            None => "runtime worker threads one per CPU".to_owned(),
        }
    );
    let subs = opts.subscriptions();
    let named = match subs.as_slice() {
        [(id, None)] => format!("subscription {id:?}"),
        _ => format!(
            "{} subscriptions {:?}..{:?}, one event type each (bench.d0..), spread over the connections",
            subs.len(),
            subs.first().map(|s| s.0.as_str()).unwrap_or_default(),
            subs.last().map(|s| s.0.as_str()).unwrap_or_default()
        ),
    };
    println!(
        "  {named} -> {url}, max_in_flight {}, retry initial 1h max 2h",
        opts.max_in_flight()
    );
}

/// Attempts by outcome, as the daemon counted them.
pub(crate) fn print_attempts(m: &Scrape) {
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
pub(crate) async fn print_overdue(addr: SocketAddr) {
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
pub(crate) fn print_phase(a: &Scrape, b: &Scrape, took: Duration, what: &str) {
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

pub(crate) fn print_machine_note() {
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

pub(crate) struct WindowSample {
    pub(crate) daemon_cpu: Option<f64>,
    pub(crate) bench_cpu: Option<f64>,
    pub(crate) machine_cpu: Option<f64>,
    pub(crate) commits: f64,
    pub(crate) batch_sum: f64,
    pub(crate) commit_sum: f64,
    pub(crate) sync_sum: f64,
    pub(crate) durable_sum: f64,
    pub(crate) success: f64,
}

pub(crate) struct WindowSampler;

impl WindowSampler {
    pub(crate) fn spawn(
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
    pub(crate) fn print(&self, secs: f64) {
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

pub(crate) fn clock_ticks() -> f64 {
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
pub(crate) fn machine_busy_seconds(ticks: f64) -> Option<f64> {
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
pub(crate) fn cpu_seconds(pid: &str, ticks: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

pub(crate) struct Memory {
    pub(crate) rss_kb: Option<u64>,
    pub(crate) hwm_kb: Option<u64>,
}

impl Memory {
    pub(crate) fn rss_text(&self) -> String {
        Self::text(self.rss_kb)
    }

    pub(crate) fn hwm_text(&self) -> String {
        Self::text(self.hwm_kb)
    }

    pub(crate) fn text(kb: Option<u64>) -> String {
        kb.map_or_else(
            || "?".to_owned(),
            |kb| format!("{:.1} MiB", kb as f64 / 1024.0),
        )
    }
}

/// VmRSS and VmHWM of a process.
pub(crate) fn memory(pid: u32) -> Memory {
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

pub(crate) fn file_mib(path: &std::path::Path) -> f64 {
    std::fs::metadata(path).map_or(f64::NAN, |m| m.len() as f64 / 1024.0 / 1024.0)
}

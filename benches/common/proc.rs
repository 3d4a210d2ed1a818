//! The child processes a benchmark starts (the daemon, reference servers): spawned with the
//! output that names their address watched, stopped with SIGTERM, killed if left running.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::oneshot;

use super::START_TIMEOUT;

/// A child process, killed if dropped while still running (so a failed bench leaves no orphan).
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
}

impl Proc {
    /// SIGTERM, then waits up to `grace` (and SIGKILLs after that).
    pub async fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .context("cannot run kill")?;
        if !sent.success() {
            bail!("kill -TERM {} ({}) failed", self.child.id(), self.name);
        }
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "{} still running {grace:?} after SIGTERM; killed",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a child wrote on its watched output: the last lines, and the warnings and errors of
/// the daemon's text log format (`TIMESTAMP  LEVEL target: message fields`).
#[derive(Default)]
pub struct ChildLog {
    inner: Mutex<LogInner>,
}

#[derive(Default)]
struct LogInner {
    tail: VecDeque<String>,
    warnings: u64,
    errors: u64,
    notable: Vec<String>,
    /// Cluster mode: when this node's destination leases changed.
    leases: Vec<String>,
}

impl ChildLog {
    pub fn add(&self, line: String) {
        let mut l = lock(&self.inner);
        let level = line.split_whitespace().nth(1);
        match level {
            Some("WARN") => l.warnings += 1,
            Some("ERROR") => l.errors += 1,
            _ => {}
        }
        if matches!(level, Some("WARN" | "ERROR")) && l.notable.len() < 10 {
            l.notable.push(line.clone());
        }
        if line.contains("destination leases changed") && l.leases.len() < 10 {
            l.leases.push(line.clone());
        }
        if l.tail.len() == 200 {
            l.tail.pop_front();
        }
        l.tail.push_back(line);
    }

    pub fn tail(&self) -> String {
        lock(&self.inner)
            .tail
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Prints the count of warnings and errors, and the first of them.
    pub fn print(&self) {
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
        if !l.leases.is_empty() {
            println!("daemon lease changes:");
            for line in &l.leases {
                println!("  {line}");
            }
        }
    }
}

/// Which output of a child names the address it listens on.
#[derive(Clone, Copy)]
pub enum Watch {
    Stdout,
    Stderr,
}

/// A child that has said where it listens.
pub struct Listening {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub log: Arc<ChildLog>,
    pub spawned: Instant,
    /// From spawn to the line that named the address.
    pub listening_after: Duration,
}

impl Listening {
    /// Spawns `cmd`, whose `watch` output must be piped, and waits up to `START_TIMEOUT` for
    /// the first line of that output `find` reads an address from. `what` names the child in
    /// messages ("dispatchd", "the bare server"), `name` in the process table's terms.
    pub async fn start(
        name: &'static str,
        what: &str,
        mut cmd: Command,
        watch: Watch,
        find: fn(&str) -> Option<SocketAddr>,
    ) -> Result<Self> {
        let spawned = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let output: Option<Box<dyn Read + Send>> = match watch {
            Watch::Stdout => child.stdout.take().map(|o| Box::new(o) as _),
            Watch::Stderr => child.stderr.take().map(|o| Box::new(o) as _),
        };
        let proc = Proc { name, child };
        let log = Arc::new(ChildLog::default());
        let output = output.with_context(|| match watch {
            Watch::Stdout => "no stdout pipe",
            Watch::Stderr => "no stderr pipe",
        })?;
        let rx = watch_output(output, log.clone(), find);
        let (addr, at) = match tokio::time::timeout(START_TIMEOUT, rx).await {
            Ok(Ok(found)) => found,
            Ok(Err(_)) => bail!(
                "{what} exited before listening; its output:\n{}",
                log.tail()
            ),
            Err(_) => bail!(
                "{what} did not start listening within {START_TIMEOUT:?}; its output:\n{}",
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

    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// SIGTERM, wait up to `grace`, and insist on a clean exit; returns the exit status and
    /// how long the stop took.
    pub async fn stop(mut self, grace: Duration) -> Result<(ExitStatus, Duration)> {
        let t = Instant::now();
        let status = self.proc.terminate(grace).await?;
        if !status.success() {
            bail!(
                "{} exited with {status} after SIGTERM; its last output:\n{}",
                self.proc.name,
                self.log.tail()
            );
        }
        Ok((status, t.elapsed()))
    }
}

/// Starts `dispatchd serve` on a free loopback port with `data_dir`, without the environment
/// variables that would override either, its log (stderr) watched for the `listening on`
/// line; `more` adds arguments or environment of the caller's.
pub async fn start_daemon(data_dir: &Path, more: impl FnOnce(&mut Command)) -> Result<Listening> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dispatchd"));
    cmd.arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("DISPATCHD_LISTEN")
        .env_remove("DISPATCHD_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    more(&mut cmd);
    Listening::start(
        "dispatchd",
        "dispatchd",
        cmd,
        Watch::Stderr,
        dispatchd::daemon::listen_addr_in,
    )
    .await
}

/// Drains a child's output for its whole life (so it never blocks on a full pipe) into `log`,
/// and sends the first address `find` reads from a line, with the instant it was read.
fn watch_output(
    output: impl Read + Send + 'static,
    log: Arc<ChildLog>,
    find: fn(&str) -> Option<SocketAddr>,
) -> oneshot::Receiver<(SocketAddr, Instant)> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(output).lines().map_while(Result::ok) {
            if tx.is_some()
                && let Some(addr) = find(&line)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send((addr, Instant::now()));
            }
            log.add(line);
        }
    });
    rx
}

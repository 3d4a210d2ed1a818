//! The daemon under test: its config, data directory, log and process.

use super::*;

/// Config file for one run. Listen address and data directory come from the command line.
pub(crate) fn config_text(opts: &Options, url: &str, backlog: bool) -> String {
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
pub(crate) struct Workdir {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) config: PathBuf,
}

impl Workdir {
    pub(crate) fn new(config: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("dispatchd-delivery-bench-")
            .tempdir()
            .context("cannot create the bench directory")?;
        let path = dir.path().join("dispatchd.toml");
        std::fs::write(&path, config).context("cannot write the config file")?;
        Ok(Self { dir, config: path })
    }

    pub(crate) fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub(crate) fn db_file(&self) -> PathBuf {
        self.data_dir().join("dispatchd.redb")
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the daemon wrote on stderr: the last lines, and its warnings and errors.
#[derive(Default)]
pub(crate) struct DaemonLog {
    pub(crate) inner: Mutex<LogInner>,
}

#[derive(Default)]
pub(crate) struct LogInner {
    pub(crate) tail: VecDeque<String>,
    pub(crate) warnings: u64,
    pub(crate) errors: u64,
    pub(crate) notable: Vec<String>,
}

impl DaemonLog {
    pub(crate) fn add(&self, line: String) {
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

    pub(crate) fn tail(&self) -> String {
        lock(&self.inner)
            .tail
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub(crate) fn print(&self) {
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
pub(crate) struct Daemon {
    pub(crate) proc: Proc,
    pub(crate) addr: SocketAddr,
    pub(crate) log: Arc<DaemonLog>,
    pub(crate) spawned: Instant,
    /// From spawn to the `listening on` line.
    pub(crate) listening_after: Duration,
}

impl Daemon {
    pub(crate) async fn start(work: &Workdir) -> Result<Self> {
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

    pub(crate) fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// SIGTERM, wait, and insist on a clean exit; returns how long it took.
    pub(crate) async fn stop(mut self) -> Result<Duration> {
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
pub(crate) fn watch_log(
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
pub(crate) async fn wait_ready(addr: SocketAddr, deadline: Instant) -> Result<Instant> {
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

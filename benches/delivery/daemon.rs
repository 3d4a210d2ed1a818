//! The daemon under test: its config, data directory and process, and the start and end
//! every mode shares.

use super::*;

/// Config file for one run. Listen address and data directory come from the command line.
pub(crate) fn config_text(opts: &Options, url: &str, backlog: bool, node: usize) -> String {
    let mut t = String::new();
    if backlog || opts.batch() > 1 {
        t.push_str(&format!(
            "[server]\nmax_batch = {}\nmax_body = \"64MiB\"\n\n",
            opts.batch()
        ));
    }
    if opts.postgres_url.is_none() && (opts.cache_size.is_some() || opts.journal_size.is_some()) {
        t.push_str("[storage]\n");
        if let Some(c) = &opts.cache_size {
            t.push_str(&format!("cache_size = \"{c}\"\n"));
        }
        if let Some(j) = &opts.journal_size {
            t.push_str(&format!("journal_size = \"{j}\"\n"));
        }
        t.push('\n');
    }
    if let Some(pg) = &opts.postgres_url {
        t.push_str(&format!(
            "[storage]\nbackend = \"postgres\"\npostgres_url = \"{pg}\"\n\n\
             [cluster]\nnode_id = \"bench-node-{node}\"\n\n"
        ));
    }
    t.push_str("[delivery]\nallow_private_networks = true\n");
    for (id, event_type) in opts.subscriptions() {
        t.push_str(&format!(
            "\n[[subscriptions]]\nid = \"{id}\"\nurl = \"{url}\"\nsecrets = [\"{SECRET}\"]\n\
             max_in_flight = {}\nretry = {{ max_attempts = 10, initial = \"1h\", max = \"2h\" }}\n",
            opts.max_in_flight()
        ));
        if let Some(types) = event_type {
            t.push_str(&format!("event_types = [\"{types}\"]\n"));
        }
    }
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

/// The real daemon, on a loopback port.
pub(crate) type Daemon = Listening;

/// Starts the daemon on `work`'s config and data directory, with `workers` runtime worker
/// threads when given (`TOKIO_WORKER_THREADS`; the daemon's default is one per CPU).
pub(crate) async fn start_daemon(work: &Workdir, workers: Option<usize>) -> Result<Daemon> {
    common::proc::start_daemon(&work.data_dir(), |cmd| {
        cmd.arg("--config").arg(&work.config).env_remove("RUST_LOG");
        match workers {
            Some(n) => cmd.env("TOKIO_WORKER_THREADS", n.to_string()),
            None => cmd.env_remove("TOKIO_WORKER_THREADS"),
        };
    })
    .await
}

/// Writes the mode's config with the subscription pointing at `url`, starts the daemon,
/// waits until it is ready, and prints the run's title and setup.
pub(crate) async fn start_run(opts: &Options, url: &str) -> Result<(Workdir, Daemon)> {
    let work = Workdir::new(&config_text(opts, url, opts.mode == Mode::Backlog, 0))?;
    let daemon = start_daemon(&work, opts.node_workers).await?;
    wait_ready(daemon.addr, Instant::now() + START_TIMEOUT).await?;
    println!("dispatchd delivery benchmark: {}", opts.mode.name());
    print_setup(opts, &work, url);
    Ok((work, daemon))
}

/// Cluster mode: nodes 1.. beside the first, on the same database.
pub(crate) async fn start_more_nodes(opts: &Options, url: &str) -> Result<Vec<(Workdir, Daemon)>> {
    let mut out = Vec::new();
    for node in 1..opts.nodes {
        let work = Workdir::new(&config_text(opts, url, false, node))?;
        let daemon = start_daemon(&work, opts.node_workers).await?;
        wait_ready(daemon.addr, Instant::now() + START_TIMEOUT).await?;
        out.push((work, daemon));
    }
    if opts.nodes > 1 {
        println!(
            "  cluster: {} nodes on one PostgreSQL database, publishers spread round-robin",
            opts.nodes
        );
    }
    Ok(out)
}

/// Cluster mode: waits until every subscription's lease is where the hashing puts it among
/// all the nodes, with no hand-over under way, so that the window measures a settled cluster
/// rather than a node joining. `addrs[i]` is `bench-node-{i}`.
pub(crate) async fn settle_leases(opts: &Options, addrs: &[SocketAddr]) -> Result<()> {
    let names: Vec<String> = (0..addrs.len())
        .map(|i| format!("bench-node-{i}"))
        .collect();
    // How many leases each node should end up with.
    let mut share = vec![0_usize; names.len()];
    for (id, _) in opts.subscriptions() {
        let owner = dispatchd::storage::postgres::leases::owner(&id, &names)
            .and_then(|o| names.iter().position(|n| n == o))
            .with_context(|| format!("no owner for subscription {id}"))?;
        if let Some(s) = share.get_mut(owner) {
            *s += 1;
        }
    }
    let placed = share
        .iter()
        .enumerate()
        .map(|(i, n)| format!("bench-node-{i} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    loop {
        let mut settled = true;
        for (i, addr) in addrs.iter().enumerate() {
            let m = scrape(*addr).await?;
            let held = m.value("dispatchd_cluster_leases_held").unwrap_or(0.0);
            let moving = m
                .value("dispatchd_cluster_leases_handing_over")
                .unwrap_or(0.0);
            let want = share.get(i).copied().unwrap_or(0);
            settled &= held == want as f64 && moving == 0.0;
        }
        if settled {
            println!(
                "  cluster: the leases settled ({placed}) {:.1} s after the last node was ready",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the leases did not settle ({placed}) within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM, wait, and insist on a clean exit; returns how long it took.
pub(crate) async fn stop_daemon(daemon: Daemon) -> Result<Duration> {
    Ok(daemon.stop(STOP_TIMEOUT).await?.1)
}

/// The end of every mode: the machine note, the daemon's log, and a clean stop.
pub(crate) async fn finish(daemon: Daemon) -> Result<()> {
    print_machine_note();
    daemon.log.print();
    let stopped = stop_daemon(daemon).await?;
    println!(
        "dispatchd stopped cleanly {:.2} s after SIGTERM",
        stopped.as_secs_f64()
    );
    Ok(())
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

//! The daemon's wiring: opens the store, starts the writer, the API and the delivery engine,
//! and shuts them down in order: stop accepting, finish requests, flush the writer, close the
//! file.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::{self, ApiState};
use crate::auth::Auth;
use crate::config::Config;
use crate::delivery::worker::WorkerEnv;
use crate::delivery::{EngineConfig, Supervisor};
use crate::metrics::Metrics;
use crate::scheduler::driver::{Msg, Scheduler, SchedulerConfig};
use crate::storage::Store;
use crate::storage::writer::{self, WriterConfig};
use crate::subscriptions::Registry;
use tokio::sync::mpsc;

/// Binds the configured address and runs until SIGTERM or SIGINT.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    // Poll the signal future once so its handlers exist before READY=1 and the "listening"
    // line: a SIGTERM right after start then drains instead of killing the process.
    let mut shutdown = std::pin::pin!(shutdown_signal());
    tokio::select! {
        biased;
        () = &mut shutdown => return Ok(()),
        () = std::future::ready(()) => {}
    }
    run(config, listener, shutdown).await
}

/// Runs the daemon on an already bound listener until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // The outbound client's TLS stack uses ring, like the rest of the crypto here.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = Arc::new(Metrics::new().context("cannot register metrics")?);
    let attempting = Arc::new(crate::delivery::attempting::Attempting::default());
    let (sched_tx, sched_rx) = mpsc::unbounded_channel();
    // Lets the watchdog see whether the scheduler task still runs, without keeping it alive.
    let sched_watch = sched_tx.downgrade();
    let (due_tx, mut due_rx) = mpsc::unbounded_channel();
    // One clock for the delivery loop: writer, scheduler, destination tasks, attempts.
    let clock = crate::clock::Clock::system();
    let storage = open_storage(&config, &metrics, &clock, due_tx).await?;
    let (store, writer) = (storage.store.clone(), storage.writer.clone());
    // Commits' due times reach the scheduler through its own channel.
    let forward = sched_tx.clone();
    tokio::spawn(async move {
        while let Some(d) = due_rx.recv().await {
            if forward.send(Msg::Due(d)).is_err() {
                break;
            }
        }
    });

    let registry = Arc::new(Registry::default());
    // Destinations ask the subscriptions' owner (control) to disable their subscription.
    let (disables_tx, disables_rx) = tokio::sync::mpsc::unbounded_channel();
    let supervisor = Supervisor::new(
        EngineConfig {
            allow_private_networks: config.allow_private_networks,
            max_response_body: config.max_response_body,
            callbacks: config.callbacks.clone(),
            defaults: crate::subscriptions::spec::SubscriptionDefaults {
                timeout: config.delivery_timeout,
                max_attempts: config.max_attempts,
            },
        },
        WorkerEnv {
            store: store.clone(),
            scheduler: sched_tx,
            auto_disable_after: config.auto_disable_after,
            attempting: attempting.clone(),
            disables: disables_tx,
            clock: clock.clone(),
            send: crate::delivery::worker::http_attempts(),
            leases: storage.shared.as_ref().map(|s| s.leases.clone()),
        },
        writer.clone(),
        metrics.clone(),
    )
    .context("cannot build the HTTP client")?;
    let supervisor = Arc::new(supervisor);
    // The subscriptions' owner puts the set in force and starts its destination tasks
    // before the scheduler runs, whose first load then finds their scheduled deliveries.
    let control = crate::subscriptions::Control::new(
        store.clone(),
        writer.clone(),
        registry.clone(),
        supervisor.clone(),
        config.clone(),
    );
    control
        .start()
        .context("cannot load the subscriptions created over the API")?;
    let hangups = crate::subscriptions::control::hangups();
    let scheduler = Scheduler::new(
        store.clone(),
        supervisor.router(),
        SchedulerConfig {
            horizon: config.scheduler_horizon,
            max_wheel: 200_000,
            // On PostgreSQL a load is a query whose rows cross the network, and a busy
            // destination makes the scheduler read its rows again: smaller loads.
            load_chunk: if store.embedded().is_some() {
                10_000
            } else {
                1_000
            },
            clock: clock.clone(),
        },
        metrics.clone(),
    );
    let (sched_stop_tx, sched_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let scheduler_task = tokio::spawn(scheduler.run(sched_rx, async move {
        let _ = sched_stop_rx.await;
    }));

    let auth = Arc::new(
        Auth::new(&config.tokens, &config.keys, config.key_tolerance)
            .map_err(|_| anyhow::anyhow!("no system randomness"))?,
    );
    let addr = listener.local_addr().context("listener has no address")?;
    if auth.is_open() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "no API tokens or keys configured and listening beyond loopback: anyone who can reach this address can publish and administer");
    }
    let state = Arc::new(ApiState {
        attempting,
        store: store.clone(),
        writer: writer.clone(),
        metrics: metrics.clone(),
        auth,
        registry,
        sources: Arc::new(crate::ingest::source::Sources::new(
            &config.sources,
            crate::clock::now(),
        )),
        control: control.clone(),
        max_body: config.max_body,
        max_batch: config.max_batch,
        callbacks: config.callbacks.clone(),
        allow_private_networks: config.allow_private_networks,
        limits: crate::api::conn::Limits {
            max_connections: crate::api::conn::connection_cap(config.limits.max_connections),
            ..config.limits
        },
        tls: config
            .tls
            .as_ref()
            .map(|t| Arc::new(crate::tls::Certs::from_arc(t.certified.clone()))),
        draining: Default::default(),
    });

    tracing::info!(
        backend = store.backend(),
        data = %storage.location,
        events = store.embedded().and_then(|s| s.event_count().ok()),
        subscriptions = state.registry.snapshot().len(),
        https = state.tls.is_some(),
        "listening on {addr}"
    );
    // Upkeep beside the API: retention sweeps, healing after I/O failures, systemd's notify
    // protocol. Dropping `upkeep_stop` stops them.
    let (upkeep_stop, upkeep_rx) = tokio::sync::watch::channel(());
    let mut upkeep = Vec::new();
    // Cluster mode's lease loop stops after the destinations, so their last outcomes are
    // recorded under the leases before the other nodes take them.
    let (leases_stop, leases_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut leases_task = None;
    match (&store, &storage.shared, &config.backend) {
        (crate::storage::Store::Embedded(embedded), _, _) => {
            upkeep.push(tokio::spawn(
                crate::retention::Sweeper::new(
                    embedded.clone(),
                    writer.clone(),
                    metrics.clone(),
                    crate::retention::RetentionConfig {
                        retention: config.retention,
                        interval: config.sweep_interval,
                    },
                )
                .run(stopped(upkeep_rx.clone())),
            ));
            if let Some(w) = writer.embedded() {
                upkeep.push(tokio::spawn(crate::storage::recovery::heal(
                    w.clone(),
                    std::time::Duration::from_secs(1),
                    stopped(upkeep_rx.clone()),
                )));
            }
        }
        (_, Some(shared), crate::config::Backend::Postgres(pg)) => {
            use crate::storage::postgres::cluster;
            let registry = state.registry.clone();
            let refresher = control.clone();
            let reloader = control.clone();
            let (sources, auth, tls) =
                (state.sources.clone(), state.auth.clone(), state.tls.clone());
            let busy = Arc::downgrade(&supervisor);
            let node = Arc::new(cluster::Node {
                shared: shared.clone(),
                lease: pg.lease,
                scan_interval: pg.scan_interval,
                horizon: config.scheduler_horizon,
                scheduler: supervisor.scheduler(),
                destinations: Box::new(move || {
                    registry.snapshot().iter().map(|s| s.id.clone()).collect()
                }),
                refresh: Box::new(move || {
                    let c = refresher.clone();
                    Box::pin(async move {
                        if let Err(e) = c.refresh().await {
                            tracing::warn!(error = %e, "cannot reload subscriptions from the database");
                        }
                    })
                }),
                busy: Box::new(move |d| busy.upgrade().is_some_and(|s| s.busy(d))),
                rebalance: tokio::sync::Notify::new(),
                reload: Box::new(move || {
                    let (c, sources, auth, tls) =
                        (reloader.clone(), sources.clone(), auth.clone(), tls.clone());
                    Box::pin(async move {
                        match c.reload(&sources, &auth, tls.as_deref()).await {
                            Ok(_) => tracing::info!("configuration reloaded"),
                            Err(e) => {
                                tracing::error!(error = %e, "reload refused; the old configuration stays in force")
                            }
                        }
                    })
                }),
            });
            leases_task = Some(tokio::spawn(cluster::run_leases(
                node.clone(),
                async move {
                    let _ = leases_stopped.await;
                },
            )));
            upkeep.push(tokio::spawn(cluster::run_feed(
                node,
                stopped(upkeep_rx.clone()),
            )));
            upkeep.push(tokio::spawn(cluster::run_retention(
                shared.clone(),
                config.retention,
                config.sweep_interval,
                stopped(upkeep_rx.clone()),
            )));
        }
        _ => {}
    }
    let notifier = crate::notify::Notifier::from_env(&config.systemd).map(Arc::new);
    if let Some(n) = &notifier {
        n.ready(&format!("listening on {addr}"));
        if let Some(wd) = config.systemd.watchdog {
            let scheduler_alive = move || sched_watch.upgrade().is_some_and(|s| !s.is_closed());
            upkeep.push(tokio::spawn(crate::notify::watchdog(
                n.clone(),
                crate::notify::ping_interval(wd),
                writer.clone(),
                scheduler_alive,
                stopped(upkeep_rx.clone()),
            )));
        }
    }
    // Disables asked for by destinations: served until the destinations have stopped, since
    // an attempt that finishes during the drain may still ask.
    let (disables_stop, disables_stopped) = tokio::sync::oneshot::channel::<()>();
    let disables_task = tokio::spawn(control.clone().run_disables(disables_rx, async move {
        let _ = disables_stopped.await;
    }));
    // Secret expiry after rotations, and SIGHUP reloads.
    upkeep.push(tokio::spawn(
        control.clone().run_expiry(stopped(upkeep_rx.clone())),
    ));
    upkeep.push(tokio::spawn(
        crate::subscriptions::control::reload_on_sighup(
            control.clone(),
            state.sources.clone(),
            state.auth.clone(),
            state.tls.clone(),
            hangups,
            stopped(upkeep_rx.clone()),
        ),
    ));
    drop(control);
    drop(upkeep_rx);
    let drain_state = state.clone();
    let drain_notifier = notifier.clone();
    let shutdown = async move {
        shutdown.await;
        if let Some(n) = &drain_notifier {
            n.stopping();
        }
        drain_state.draining.store(true, Ordering::Relaxed);
        tracing::info!("shutting down: no new connections, finishing open requests");
    };
    api::serve(listener, state, shutdown, config.shutdown_timeout).await;
    drop(upkeep_stop);
    for task in upkeep {
        let _ = task.await;
    }

    // Deliveries: no new ones start; those in flight finish and are recorded, up to the
    // deadline. What is left stays scheduled on disk.
    let _ = sched_stop_tx.send(());
    let _ = scheduler_task.await;
    supervisor.shutdown(config.shutdown_timeout).await;
    let _ = disables_stop.send(());
    let _ = disables_task.await;

    let _ = leases_stop.send(());
    if let Some(t) = leases_task {
        let _ = t.await;
    }

    writer.stop();
    drop(writer);
    if let Some(thread) = storage.writer_thread {
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .context("writer join task failed")?
            .map_err(|_| anyhow::anyhow!("the writer thread panicked"))?;
    }
    drop(store);
    tracing::info!("stopped cleanly");
    Ok(())
}

/// The backend the daemon runs on, opened, with its writer started.
struct Storage {
    store: Store,
    writer: crate::storage::writer::WriterHandle,
    /// The embedded backend's writer thread.
    writer_thread: Option<std::thread::JoinHandle<()>>,
    /// Cluster mode: what the node's parts share.
    shared: Option<crate::storage::postgres::Shared>,
    /// Where the data is, for the log: the redb file, or the database (no password).
    location: String,
}

async fn open_storage(
    config: &Config,
    metrics: &Arc<Metrics>,
    clock: &crate::clock::Clock,
    due_tx: crate::storage::writer::DueSink,
) -> anyhow::Result<Storage> {
    match &config.backend {
        crate::config::Backend::Redb => {
            let db_path = config.db_path();
            let store = {
                let path = db_path.clone();
                let (cache, journal) = (config.cache_size, config.journal_size);
                tokio::task::spawn_blocking(move || Store::open(&path, cache, journal))
                    .await
                    .context("store opening task failed")?
                    .with_context(|| format!("cannot open database {}", db_path.display()))?
            };
            let (writer, thread) = writer::spawn(
                store.clone(),
                WriterConfig {
                    max_batch: config.commit_batch,
                    queue: 65_536,
                    clock: clock.clone(),
                },
                metrics.clone(),
                Some(due_tx),
            )
            .context("cannot start the writer")?;
            Ok(Storage {
                store,
                writer,
                writer_thread: Some(thread),
                shared: None,
                location: db_path.display().to_string(),
            })
        }
        crate::config::Backend::Postgres(pg) => {
            use crate::storage::postgres;
            let location = database_name(&pg.url);
            // A quarter of the node's connections (at least one) serve its destination tasks'
            // reads (`PgStore::new`), the rest everything else.
            let queue_reads = (pg.pool / 4).max(1);
            let pool = postgres::pool(&pg.url, pg.pool.saturating_sub(queue_reads).max(1))
                .with_context(|| format!("cannot use PostgreSQL database {location}"))?;
            {
                let mut c = pool
                    .get()
                    .await
                    .with_context(|| format!("cannot connect to PostgreSQL database {location}"))?;
                let m = postgres::migrate::migrate(&mut c)
                    .await
                    .with_context(|| format!("cannot migrate PostgreSQL database {location}"))?;
                tracing::info!(from = m.from, to = m.to, "database schema ready");
                if postgres::migrate::commits_may_be_lost(&c)
                    .await
                    .unwrap_or(false)
                {
                    tracing::warn!(
                        "PostgreSQL runs with synchronous_commit = off: a crash of the database server can lose commits dispatchd acknowledged"
                    );
                }
            }
            let shared = postgres::Shared {
                pool,
                url: Arc::from(pg.url.as_str()),
                node: Arc::from(pg.node_id.as_str()),
                leases: Arc::default(),
                metrics: metrics.clone(),
            };
            tracing::info!(node = %pg.node_id, lease = ?pg.lease, "cluster mode: PostgreSQL backend");
            Ok(Storage {
                store: Store::Postgres(
                    postgres::PgStore::new(shared.clone(), queue_reads)
                        .with_context(|| format!("cannot open PostgreSQL database {location}"))?,
                ),
                writer: crate::storage::writer::WriterHandle::Postgres(
                    postgres::writer::PgWriter::spawn(shared.clone(), Some(due_tx)),
                ),
                writer_thread: None,
                shared: Some(shared),
                location,
            })
        }
    }
}

/// A PostgreSQL URL as it may be logged: host, port and database, never the password.
fn database_name(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => {
            let host = c
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_default();
            let port = c.get_ports().first().copied().unwrap_or(5432);
            format!("{host}:{port}/{}", c.get_dbname().unwrap_or("postgres"))
        }
        Err(_) => "(unparsable URL)".into(),
    }
}

/// Resolves once the `watch::Sender` of `rx` is dropped: the upkeep tasks' stop signal.
async fn stopped(mut rx: tokio::sync::watch::Receiver<()>) {
    while rx.changed().await.is_ok() {}
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// The address in the daemon's `listening on ADDR` log line (what tests, benchmarks and
/// supervisors read to find a daemon started on port 0).
pub fn listen_addr_in(line: &str) -> Option<std::net::SocketAddr> {
    let rest = line.split("listening on ").nth(1)?;
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    addr.parse().ok()
}

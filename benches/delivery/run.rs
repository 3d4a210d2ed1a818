//! What throughput and latency share: the receiver with the daemon pointed at it, a window of
//! publishing with the wait for its deliveries, and the report lines around the modes' own.

use super::*;

/// A receiver, and the daemon delivering to it.
pub(crate) struct Run {
    pub(crate) receiver: Receiver,
    pub(crate) daemon: Daemon,
    /// Holds the config and data directory for as long as the daemon runs.
    _work: Workdir,
    /// Cluster mode: the other nodes.
    others: Vec<(Workdir, Daemon)>,
}

/// One window of publishing and what reached the receiver.
pub(crate) struct Published {
    pub(crate) window: Window,
    pub(crate) pubs: PubStats,
    pub(crate) sample: WindowSample,
    /// Acknowledged events not received by the end of the wait.
    pub(crate) missing: usize,
    /// The first arrival of each acknowledged event, in the order of `pubs.acks`.
    pub(crate) arrivals: Vec<Option<Instant>>,
}

impl Run {
    /// Starts the receiver and the daemon, and prints the run's title and setup.
    pub(crate) async fn start(opts: &Options) -> Result<Self> {
        let receiver = Receiver::start().await?;
        let (work, daemon) = start_run(opts, &receiver.url()).await?;
        let others = start_more_nodes(opts, &receiver.url()).await?;
        let run = Self {
            receiver,
            daemon,
            _work: work,
            others,
        };
        if !run.others.is_empty() {
            settle_leases(opts, &run.addrs()).await?;
        }
        Ok(run)
    }

    /// Every node's address: the first daemon's, then the others' (`bench-node-{i}`).
    fn addrs(&self) -> Vec<SocketAddr> {
        std::iter::once(self.daemon.addr)
            .chain(self.others.iter().map(|(_, d)| d.addr))
            .collect()
    }

    /// Publishes `batch` events a request on the mode's connections for a warm-up and the
    /// measured window (closed loops, or each connection on its own interval of `pace`), then
    /// waits up to `wait` for every acknowledged event to arrive.
    pub(crate) async fn publish(
        &self,
        opts: &Options,
        batch: usize,
        pace: Option<Duration>,
        wait: Duration,
    ) -> Result<Published> {
        let t0 = Instant::now();
        let window = Window::after_warmup(t0, Duration::from_secs(opts.seconds()));
        let sampler = WindowSampler::spawn(self.daemon.addr, self.daemon.pid(), window);
        let pubs = run_publishers(
            &self.addrs(),
            opts,
            batch,
            window,
            pace.map(|period| (t0, period)),
        )
        .await?;
        let published_at_end = Instant::now();
        let sample = sampler.await.context("the sampling task panicked")??;
        let missing = self
            .receiver
            .wait_for(&pubs.acks, published_at_end + wait)
            .await;
        let arrivals = self.receiver.arrivals(&pubs.acks);
        Ok(Published {
            window,
            pubs,
            sample,
            missing,
            arrivals,
        })
    }

    /// The lines after the mode's figures: the receiver's checks, the daemon's attempts by
    /// outcome, and its writer and CPU in the window.
    pub(crate) async fn print_daemon(&self, p: &Published, secs: f64) -> Result<()> {
        self.receiver.print_checks(p.pubs.acks.len() as u64);
        let after = scrape(self.daemon.addr).await?;
        print_attempts(&after);
        p.sample.print(secs);
        Ok(())
    }

    /// The machine note, the daemon's log, a clean stop, and the receiver's.
    pub(crate) async fn finish(self) -> Result<()> {
        for (_, d) in self.others {
            stop_daemon(d).await?;
        }
        finish(self.daemon).await?;
        self.receiver.stop();
        Ok(())
    }
}

impl PubStats {
    pub(crate) fn print_ack_latency(&self) {
        println!(
            "publish ack latency          p50 {} ms, p99 {} ms, p99.9 {} ms ({} publish errors{})",
            ms(&self.hist, 0.50),
            ms(&self.hist, 0.99),
            ms(&self.hist, 0.999),
            self.errors,
            self.first_error
                .as_deref()
                .map(|e| format!("; first: {e}"))
                .unwrap_or_default()
        );
    }
}

//! The retention sweeper: every `storage.sweep_interval` it removes events older than
//! `storage.retention` whose deliveries are all terminal (succeeded, dead or cancelled), with
//! their receipts, deliveries, attempts and index rows, and refreshes the storage gauges.
//!
//! It finds candidates in short read transactions and hands them to the writer in small
//! `purge` commands, each one ordinary group-commit work: ingest never waits behind a sweep.
//! A pending, in-flight or retrying delivery keeps its event, however old.
//!
//! redb reuses the freed pages, so the file stops growing at its high-water mark; it does not
//! shrink (a `dispatchd backup` copy is compact).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::model::{Micros, now_micros};
use crate::storage::writer::{Purged, WriteError, WriterHandle};

/// Events proposed to the writer per purge command: small, so one commit stays short.
const PURGE_BATCH: usize = 256;

/// Events looked at per read transaction while searching for candidates.
const SCAN_BUDGET: usize = 5_000;

/// Sweeper settings.
#[derive(Debug, Clone, Copy)]
pub struct RetentionConfig {
    /// Age after which an event with only terminal deliveries goes; zero keeps everything.
    pub retention: Duration,
    pub interval: Duration,
}

/// The sweeper task's state.
pub struct Sweeper {
    store: crate::storage::embedded::Store,
    writer: WriterHandle,
    metrics: Arc<Metrics>,
    cfg: RetentionConfig,
}

impl Sweeper {
    pub fn new(
        store: crate::storage::embedded::Store,
        writer: WriterHandle,
        metrics: Arc<Metrics>,
        cfg: RetentionConfig,
    ) -> Self {
        Self {
            store,
            writer,
            metrics,
            cfg,
        }
    }

    /// Sweeps at once and then every interval until `stop` resolves.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(self.cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = &mut stop => return,
            }
            let sweep = self.sweep();
            tokio::select! {
                r = sweep => match r {
                    Ok(p) if p.events > 0 => tracing::info!(
                        events = p.events,
                        deliveries = p.deliveries,
                        attempts = p.attempts,
                        receipts = p.receipts,
                        "retention removed expired events"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "retention sweep stopped early; the next one resumes"),
                },
                () = &mut stop => return,
            }
            self.refresh_gauges().await;
        }
    }

    /// One pass over the expired events, oldest first.
    pub async fn sweep(&self) -> Result<Purged, SweepError> {
        let mut total = Purged::default();
        if self.cfg.retention.is_zero() {
            return Ok(total);
        }
        let age = Micros::try_from(self.cfg.retention.as_micros()).unwrap_or(Micros::MAX);
        let cutoff = now_micros().saturating_sub(age);
        let mut from = 0;
        loop {
            let store = self.store.clone();
            let scan = tokio::task::spawn_blocking(move || {
                store.expired_events(cutoff, from, PURGE_BATCH, SCAN_BUDGET)
            })
            .await
            .map_err(|e| SweepError::Read(e.to_string()))?
            .map_err(|e| SweepError::Read(e.to_string()))?;
            if !scan.seqs.is_empty() {
                let p = self.writer.purge(scan.seqs, cutoff).await?;
                self.count(&p);
                total.events += p.events;
                total.deliveries += p.deliveries;
                total.attempts += p.attempts;
                total.receipts += p.receipts;
                total.kept += p.kept;
            }
            match scan.next {
                Some(n) => from = n,
                None => break,
            }
        }
        self.metrics
            .retention_last_sweep
            .set(now_micros() / 1_000_000);
        Ok(total)
    }

    fn count(&self, p: &Purged) {
        let m = &self.metrics.retention_removed;
        m.with_label_values(&["events"]).inc_by(p.events);
        m.with_label_values(&["deliveries"]).inc_by(p.deliveries);
        m.with_label_values(&["attempts"]).inc_by(p.attempts);
        m.with_label_values(&["receipts"]).inc_by(p.receipts);
    }

    /// Database file size and rows per table.
    async fn refresh_gauges(&self) {
        let store = self.store.clone();
        let read = tokio::task::spawn_blocking(move || {
            (
                store.db().file_size(),
                crate::storage::backup::table_rows(&store),
            )
        })
        .await;
        match read {
            Ok((size, rows)) => {
                self.metrics
                    .db_file_bytes
                    .set(i64::try_from(size).unwrap_or(i64::MAX));
                match rows {
                    Ok(rows) => {
                        for (table, n) in rows {
                            self.metrics
                                .table_rows
                                .with_label_values(&[table.as_str()])
                                .set(i64::try_from(n).unwrap_or(i64::MAX));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot count table rows"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "storage gauge task failed"),
        }
    }
}

/// Why a sweep stopped before the end.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("cannot read candidates: {0}")]
    Read(String),
    #[error(transparent)]
    Write(#[from] WriteError),
}

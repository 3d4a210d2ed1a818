//! One Prometheus registry holding every metric the daemon exports.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric, registered once at start.
pub struct Metrics {
    registry: Registry,
    pub events_received: IntCounterVec,
    pub events_stored: IntCounter,
    pub batch_size: Histogram,
    pub commit_seconds: Histogram,
    pub sync_seconds: Histogram,
    pub durable_seconds: Histogram,
    pub commit_failures: IntCounter,
    pub http_requests: IntCounterVec,
    pub http_panics: IntCounter,
    pub accept_errors: IntCounter,
    pub attempts: IntCounterVec,
    pub attempt_seconds: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub in_flight: IntGaugeVec,
    pub breaker_state: IntGaugeVec,
    pub breaker_trips: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub attempts_by_priority: IntCounterVec,
    pub scheduled: IntGauge,
    pub wheel_size: IntGauge,
    pub dead: IntCounterVec,
    pub subscriptions_disabled: IntCounterVec,
    pub receipts: IntCounterVec,
    pub db_file_bytes: IntGauge,
    pub table_rows: IntGaugeVec,
    pub retention_last_sweep: IntGauge,
    pub retention_removed: IntCounterVec,
    /// Cluster mode: destination leases this node holds.
    pub cluster_leases_held: IntGauge,
    /// Cluster mode: leases this node took or lost.
    pub cluster_lease_changes: IntCounter,
    /// Cluster mode: leases held while being handed over to another node.
    pub cluster_leases_handing_over: IntGauge,
    /// Cluster mode: from a delivery made on another node to its owner's scan.
    pub cluster_notify_lag: Histogram,
    /// Cluster mode: failed database operations.
    pub cluster_db_errors: IntCounter,
}

macro_rules! register {
    ($reg:expr, $m:expr) => {{
        let m = $m?;
        $reg.register(Box::new(m.clone()))?;
        m
    }};
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new_custom(Some("dispatchd".into()), None)?;
        let latency = vec![
            0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0, 30.0,
        ];
        Ok(Self {
            events_received: register!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "events_received_total",
                        "Events accepted by the API, by route"
                    ),
                    &["route"]
                )
            ),
            events_stored: register!(
                r,
                IntCounter::new("events_stored_total", "Events committed to the log")
            ),
            batch_size: register!(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("writer_batch_size", "Commands per write transaction")
                        .buckets(vec![
                            1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                            4096.0
                        ])
                )
            ),
            commit_seconds: register!(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "writer_commit_seconds",
                        "Time to apply and commit one batch"
                    )
                    .buckets(latency.clone())
                )
            ),
            sync_seconds: register!(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "writer_sync_seconds",
                        "Time in the commit call of one batch: page writes, and the fsync when \
                         there is no commit journal"
                    )
                    .buckets(latency.clone())
                )
            ),
            durable_seconds: register!(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "writer_durable_seconds",
                        "Time from the end of a commit call until the commit is durable and \
                         its requests are answered (the journal's append and fsync)"
                    )
                    .buckets(latency.clone())
                )
            ),
            commit_failures: register!(
                r,
                IntCounter::new(
                    "writer_commit_failures_total",
                    "Write transactions that failed"
                )
            ),
            http_requests: register!(
                r,
                IntCounterVec::new(
                    Opts::new("http_requests_total", "HTTP requests by route and status"),
                    &["route", "status"]
                )
            ),
            accept_errors: register!(
                r,
                IntCounter::new(
                    "http_accept_errors_total",
                    "Failed accepts of API connections (out of file descriptors and the like)"
                )
            ),
            http_panics: register!(
                r,
                IntCounter::new(
                    "http_handler_panics_total",
                    "Request handlers that panicked (answered 500 internal)"
                )
            ),
            attempts: register!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "delivery_attempts_total",
                        "Delivery attempts by subscription and outcome"
                    ),
                    &["subscription", "outcome"]
                )
            ),
            attempt_seconds: register!(
                r,
                HistogramVec::new(
                    HistogramOpts::new("delivery_attempt_seconds", "Duration of delivery attempts")
                        .buckets(latency.clone()),
                    &["subscription"]
                )
            ),
            queue_depth: register!(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "destination_queue_depth",
                        "Deliveries waiting in a destination task"
                    ),
                    &["subscription"]
                )
            ),
            in_flight: register!(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "destination_in_flight",
                        "Attempts in flight per destination"
                    ),
                    &["subscription"]
                )
            ),
            breaker_state: register!(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "breaker_state",
                        "Circuit breaker state: 0 closed, 1 open, 2 half-open"
                    ),
                    &["subscription"]
                )
            ),
            breaker_trips: register!(
                r,
                IntCounterVec::new(
                    Opts::new("breaker_trips_total", "Times a circuit breaker opened"),
                    &["subscription"]
                )
            ),
            rate_limited: register!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "rate_limited_total",
                        "Deliveries whose attempt waited for the destination's rate limiter"
                    ),
                    &["subscription"]
                )
            ),
            attempts_by_priority: register!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "attempts_by_priority_total",
                        "Delivery attempts started, by the priority of their event"
                    ),
                    &["priority"]
                )
            ),
            scheduled: register!(
                r,
                IntGauge::new("scheduled_deliveries", "Deliveries in the durable schedule")
            ),
            wheel_size: register!(
                r,
                IntGauge::new(
                    "timer_wheel_entries",
                    "Deliveries held in the in-memory timer wheel"
                )
            ),
            dead: register!(
                r,
                IntCounterVec::new(
                    Opts::new("dead_deliveries_total", "Deliveries dead-lettered"),
                    &["subscription"]
                )
            ),
            subscriptions_disabled: register!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "subscriptions_disabled_total",
                        "Subscriptions disabled automatically, by reason"
                    ),
                    &["reason"]
                )
            ),
            receipts: register!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "inbound_receipts_total",
                        "Inbound webhooks by source and result"
                    ),
                    &["source", "result"]
                )
            ),
            db_file_bytes: register!(
                r,
                IntGauge::new("database_file_bytes", "Size of the database file")
            ),
            table_rows: register!(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "table_rows",
                        "Rows per database table, as of the last sweep"
                    ),
                    &["table"]
                )
            ),
            retention_last_sweep: register!(
                r,
                IntGauge::new(
                    "retention_last_sweep_timestamp_seconds",
                    "When the retention sweeper last finished a sweep (unix seconds)"
                )
            ),
            retention_removed: register!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "retention_removed_total",
                        "Rows removed by retention, by table"
                    ),
                    &["table"]
                )
            ),
            cluster_leases_held: register!(
                r,
                IntGauge::new(
                    "cluster_leases_held",
                    "Destination leases this node holds (cluster mode)"
                )
            ),
            cluster_lease_changes: register!(
                r,
                IntCounter::new(
                    "cluster_lease_changes_total",
                    "Destination leases this node took or lost (cluster mode)"
                )
            ),
            cluster_leases_handing_over: register!(
                r,
                IntGauge::new(
                    "cluster_leases_handing_over",
                    "Destination leases this node holds only until the attempts under way end, \
                     to hand them to the node that should run them (cluster mode)"
                )
            ),
            cluster_notify_lag: register!(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "cluster_notify_lag_seconds",
                        "From a delivery made on another node to its owner hearing of it (cluster mode)"
                    )
                    .buckets(latency.clone())
                )
            ),
            cluster_db_errors: register!(
                r,
                IntCounter::new(
                    "cluster_database_errors_total",
                    "Failed database operations (cluster mode)"
                )
            ),
            registry: r,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

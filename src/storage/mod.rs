//! Storage, one folder per backend, behind one seam.
//!
//! - `embedded/`: the default. One redb file on the node's disk, written by one writer thread
//!   with group commit through the commit journal; reads from any thread.
//! - `postgres/`: cluster mode (`../shared/CLUSTER.md`): several nodes on one PostgreSQL
//!   database, with destination leases.
//!
//! The rest of the daemon reaches storage through `Store` (every read) and
//! `writer::WriterHandle` (every write, as commands): the seam. Both are an enum over the two
//! backends with the same methods, answers and errors, so the API, subscriptions, scheduler,
//! destination tasks and operator actions do not know which one they run on. What only the
//! embedded backend has (the commit journal, `backup`, `verify-db`, the sweeper's file
//! figures) is reached through `Store::embedded()`, and says so on PostgreSQL.

pub mod embedded;
pub mod postgres;
pub mod writer;

use std::ops::Bound;

pub use embedded::{EventFilter, Page, StoreError, Tips};
pub use embedded::{backup, inspect, journal, recovery, schema};

use crate::model::{Attempt, Delivery, DeliveryId, DeliveryStatus, Event, Micros, Receipt, Seq};
use inspect::{
    AttemptCursor, DeadFilter, DeadLetter, DeliveryFilter, EventAttempt, LiveChunk, LiveCursor,
};
use schema::{BatchRecord, SubscriptionRecord};

/// One load of the scheduler: the schedule rows read (how many, the last one) and the jobs
/// made of them (due time, delivery, destination, priority).
pub struct DueChunk {
    pub read: usize,
    pub last: Option<(Micros, DeliveryId)>,
    pub jobs: Vec<(Micros, DeliveryId, String, crate::model::Priority)>,
}

/// Reads, on whichever backend the daemon runs; cheap to clone.
#[derive(Clone)]
pub enum Store {
    Embedded(embedded::Store),
    Postgres(postgres::PgStore),
}

/// A run of reads by a destination task (one read transaction on the embedded backend).
/// Made once per run of attempts and dropped after it: the size of the embedded variant
/// costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Snapshot {
    Embedded(embedded::Snapshot),
    Postgres(postgres::reads::PgSnapshot),
}

impl Snapshot {
    pub fn delivery(&self, id: DeliveryId) -> Result<Option<Delivery>, StoreError> {
        match self {
            Snapshot::Embedded(s) => s.delivery(id),
            Snapshot::Postgres(s) => s.delivery(id),
        }
    }

    pub fn event_by_seq(&self, seq: Seq) -> Result<Option<Event>, StoreError> {
        match self {
            Snapshot::Embedded(s) => s.event_by_seq(seq),
            Snapshot::Postgres(s) => s.event_by_seq(seq),
        }
    }

    /// Whether this view was read for delivery `id` (with its event, if `event`), so that
    /// asking it costs no further read. The embedded view answers everything from its read
    /// transaction.
    pub fn answers(&self, id: DeliveryId, event: bool) -> bool {
        match self {
            Snapshot::Embedded(_) => true,
            Snapshot::Postgres(s) => s.answers(id, event),
        }
    }

    /// Whether this view holds each of these deliveries at the due time given (and its
    /// event, where marked): a view read earlier may then serve them.
    pub fn covers(&self, jobs: &[(DeliveryId, Micros, bool)]) -> bool {
        match self {
            Snapshot::Embedded(_) => false,
            Snapshot::Postgres(s) => s.covers(jobs),
        }
    }
}

/// Each read, on each backend: the same name, arguments and answer.
macro_rules! reads {
    ($( $(#[$m:meta])* fn $name:ident(&self $(, $arg:ident : $ty:ty)*) -> $ret:ty; )*) => {
        impl Store {
            $(
                $(#[$m])*
                pub fn $name(&self $(, $arg: $ty)*) -> $ret {
                    match self {
                        Store::Embedded(s) => s.$name($($arg),*),
                        Store::Postgres(s) => s.$name($($arg),*),
                    }
                }
            )*
        }
    };
}

reads! {
    /// Whether a read can be made now (readiness).
    fn readable(&self) -> bool;
    fn event_by_id(&self, id: &str) -> Result<Option<(Seq, Event)>, StoreError>;
    fn event_by_seq(&self, seq: Seq) -> Result<Option<Event>, StoreError>;
    fn receipt(&self, id: u64) -> Result<Option<Receipt>, StoreError>;
    fn event_count(&self) -> Result<u64, StoreError>;
    /// Events in seq order after the cursor, filtered.
    fn list_events(&self, f: &EventFilter, after: Option<Seq>, limit: usize) -> Result<Page<(Seq, Event)>, StoreError>;
    fn event_delivery_ids(&self, seq: Seq) -> Result<Vec<DeliveryId>, StoreError>;
    fn delivery(&self, id: DeliveryId) -> Result<Option<Delivery>, StoreError>;
    /// Deliveries by id, in the order asked; missing ones are left out.
    fn deliveries(&self, ids: &[DeliveryId]) -> Result<Vec<(DeliveryId, Delivery)>, StoreError>;
    fn attempts(&self, id: DeliveryId) -> Result<Vec<(u32, Attempt)>, StoreError>;
    /// Scheduled deliveries in due order from `from`, due before `until`: the scheduler's
    /// loads (on PostgreSQL, of the destinations this node holds).
    fn due(&self, from: Bound<(Micros, DeliveryId)>, until: Micros, limit: usize) -> Result<Vec<(Micros, DeliveryId)>, StoreError>;
    fn scheduled_count(&self) -> Result<u64, StoreError>;
    /// Since when every attempt to a subscription has failed (auto-disable's clock).
    fn failing_since(&self, subscription: &str) -> Result<Option<Micros>, StoreError>;
    fn subscription_states(&self) -> Result<std::collections::HashMap<String, writer::SubscriptionState>, StoreError>;
    fn list_deliveries(&self, f: &DeliveryFilter, after: Option<DeliveryId>, limit: usize) -> Result<Page<(DeliveryId, Delivery)>, StoreError>;
    fn list_dead_letters(&self, f: &DeadFilter, after: Option<DeliveryId>, limit: usize) -> Result<Page<DeadLetter>, StoreError>;
    /// The head of a FIFO subscription: its oldest delivery still to be attempted.
    fn first_live_delivery(&self, subscription: &str) -> Result<Option<DeliveryId>, StoreError>;
    fn live_deliveries(&self, subscription: &str, after: Option<LiveCursor>, limit: usize) -> Result<LiveChunk, StoreError>;
    fn seq_range_for_time(&self, since: Micros, until: Micros) -> Result<(Seq, Seq), StoreError>;
    fn events_in_range(&self, from: Seq, to: Seq, limit: usize) -> Result<Vec<(Seq, Event)>, StoreError>;
    fn subscription_records(&self) -> Result<Vec<(String, SubscriptionRecord)>, StoreError>;
    fn subscription_record(&self, id: &str) -> Result<Option<SubscriptionRecord>, StoreError>;
    fn delivery_statuses(&self, seqs: &[Seq]) -> Result<Vec<(DeliveryId, DeliveryStatus)>, StoreError>;
    fn batch(&self, id: &str) -> Result<Option<BatchRecord>, StoreError>;
    /// An event's attempts, newest first, after the cursor.
    fn event_attempts(&self, seq: Seq, after: Option<AttemptCursor>, limit: usize) -> Result<(Vec<EventAttempt>, Option<AttemptCursor>), StoreError>;
}

impl Store {
    /// Opens (or creates) the embedded backend's redb file.
    pub fn open(
        path: &std::path::Path,
        cache_size: usize,
        journal_size: u64,
    ) -> Result<Self, StoreError> {
        embedded::Store::open(path, cache_size, journal_size).map(Store::Embedded)
    }

    /// `due`, with each delivery's destination and priority: what the scheduler puts in
    /// its wheel (one query on PostgreSQL).
    pub fn due_jobs(
        &self,
        from: Bound<(Micros, DeliveryId)>,
        until: Micros,
        limit: usize,
    ) -> Result<DueChunk, StoreError> {
        match self {
            Store::Postgres(s) => {
                let jobs = s.due_jobs(from, until, limit)?;
                Ok(DueChunk {
                    read: jobs.len(),
                    last: jobs.last().map(|j| (j.0, j.1)),
                    jobs,
                })
            }
            Store::Embedded(s) => {
                let rows = s.due(from, until, limit)?;
                let ids: Vec<DeliveryId> = rows.iter().map(|r| r.1).collect();
                let mut by_id: std::collections::HashMap<DeliveryId, Delivery> =
                    s.deliveries(&ids)?.into_iter().collect();
                Ok(DueChunk {
                    read: rows.len(),
                    last: rows.last().copied(),
                    jobs: rows
                        .into_iter()
                        .filter_map(|(due, id)| {
                            by_id
                                .remove(&id)
                                .map(|d| (due, id, d.subscription, d.priority))
                        })
                        .collect(),
                })
            }
        }
    }

    /// The embedded backend, for what only it has (its file, its journal, backups).
    pub fn embedded(&self) -> Option<&embedded::Store> {
        match self {
            Store::Embedded(s) => Some(s),
            Store::Postgres(_) => None,
        }
    }

    /// The backend's name, as `storage.backend` spells it.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Embedded(_) => "redb",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Reads for a run of attempts that will read deliveries `ids` (and the events of those
    /// marked): on PostgreSQL they are read at once, in one query, instead of one by one.
    pub fn snapshot_for(&self, ids: &[(DeliveryId, bool)]) -> Result<Snapshot, StoreError> {
        match self {
            Store::Embedded(s) => s.snapshot().map(Snapshot::Embedded),
            Store::Postgres(s) => s.prefetch(ids).map(Snapshot::Postgres),
        }
    }

    /// Reads for a run of attempts.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        match self {
            Store::Embedded(s) => s.snapshot().map(Snapshot::Embedded),
            Store::Postgres(s) => s.prefetch(&[]).map(Snapshot::Postgres),
        }
    }
}

//! Every write, as commands to the backend's writer: the write half of the storage seam.
//! `WriterHandle` has the same methods on both backends; each resolves once what it wrote is
//! committed (durable on the embedded backend, committed in PostgreSQL on the other).

use std::sync::Arc;
use std::thread::JoinHandle;

pub use super::embedded::writer::{
    AttemptRecord, CancelOutcome, Due, DueSink, Ingested, NewEvent, NewReceipt, Next, Published,
    Purged, RetryOutcome, SubscriptionState, WriteError, WriterConfig, WriterHealth,
};
use super::postgres::writer::PgWriter;
use super::schema::SubscriptionRecord;
use super::{Store, StoreError};
use crate::metrics::Metrics;
use crate::model::{DeliveryId, DeliveryStatus, Micros, Origin, Seq};

/// The sending side of the backend's writer, cloned into every producer of writes.
#[derive(Clone)]
pub enum WriterHandle {
    Embedded(super::embedded::writer::WriterHandle),
    Postgres(PgWriter),
}

/// Starts the embedded backend's writer thread over `store`.
pub fn spawn(
    store: Store,
    cfg: WriterConfig,
    metrics: Arc<Metrics>,
    due_sink: Option<DueSink>,
) -> Result<(WriterHandle, JoinHandle<()>), StoreError> {
    let Store::Embedded(store) = store else {
        return Err(StoreError::Unsupported(
            "the writer thread is the embedded backend's",
        ));
    };
    let (w, join) = super::embedded::writer::spawn(store, cfg, metrics, due_sink)?;
    Ok((WriterHandle::Embedded(w), join))
}

macro_rules! both {
    ($self:ident, $w:ident => $e:expr) => {
        match $self {
            WriterHandle::Embedded($w) => $e,
            WriterHandle::Postgres($w) => $e,
        }
    };
}

impl WriterHandle {
    /// Appends events with their deliveries; resolves after the commit.
    pub async fn publish(&self, events: Vec<NewEvent>) -> Result<Vec<Published>, WriteError> {
        match self {
            WriterHandle::Embedded(w) => w.publish(events).await,
            WriterHandle::Postgres(w) => w.publish(events, None).await,
        }
    }

    /// Appends a batch's events, stamped with `batch`, and keeps the batch.
    pub async fn publish_batch(
        &self,
        events: Vec<NewEvent>,
        batch: String,
    ) -> Result<Vec<Published>, WriteError> {
        match self {
            WriterHandle::Embedded(w) => w.publish_batch(events, batch).await,
            WriterHandle::Postgres(w) => w.publish(events, Some(batch)).await,
        }
    }

    /// Stores an inbound receipt with its event and deliveries in one transaction.
    pub async fn ingest(
        &self,
        receipt: NewReceipt,
        event: NewEvent,
    ) -> Result<Ingested, WriteError> {
        both!(self, w => w.ingest(receipt, event).await)
    }

    /// Records finished attempts (on PostgreSQL, only while this node holds the lease);
    /// `awaited` says whether their destination waits for the commit before its next
    /// attempt (FIFO). On PostgreSQL outcomes nothing waits on may be held a few
    /// milliseconds to share a commit with others.
    pub async fn record_outcomes(
        &self,
        records: Vec<AttemptRecord>,
        awaited: bool,
    ) -> Result<(), WriteError> {
        match self {
            WriterHandle::Embedded(w) => w.record_attempts(records).await,
            WriterHandle::Postgres(w) => w.record_outcomes(records, awaited).await,
        }
    }

    /// Moves a delivery to a new due time without spending an attempt.
    pub async fn reschedule(
        &self,
        delivery: DeliveryId,
        subscription: Arc<str>,
        at: Micros,
    ) -> Result<(), WriteError> {
        both!(self, w => w.reschedule(delivery, subscription, at).await)
    }

    /// Persists a subscription's switch (pause, 410 Gone, auto-disable).
    pub async fn set_subscription_state(
        &self,
        id: String,
        state: SubscriptionState,
    ) -> Result<(), WriteError> {
        both!(self, w => w.set_subscription_state(id, state).await)
    }

    /// Finishes what is queued and refuses later writes.
    pub fn stop(&self) {
        both!(self, w => w.stop())
    }

    /// Proves the database writable (embedded) or reachable (PostgreSQL).
    pub async fn probe(&self) -> Result<(), WriteError> {
        both!(self, w => w.probe().await)
    }

    /// False after a failed commit, true again after the next good one.
    pub fn healthy(&self) -> bool {
        match self {
            WriterHandle::Embedded(w) => w.health.ok(),
            WriterHandle::Postgres(w) => w.healthy(),
        }
    }

    /// Makes deliveries due now; `only` restricts it to one status.
    pub async fn retry_deliveries(
        &self,
        ids: Vec<DeliveryId>,
        only: Option<DeliveryStatus>,
    ) -> Result<Vec<RetryOutcome>, WriteError> {
        both!(self, w => w.retry_deliveries(ids, only).await)
    }

    /// Cancels live deliveries, optionally noting why.
    pub async fn cancel_deliveries(
        &self,
        ids: Vec<DeliveryId>,
        reason: Option<String>,
    ) -> Result<Vec<CancelOutcome>, WriteError> {
        both!(self, w => w.cancel_deliveries(ids, reason).await)
    }

    /// New deliveries of stored events (replay, redrive); answers how many were made.
    pub async fn create_deliveries(
        &self,
        items: Vec<(Seq, Arc<str>)>,
        origin: Origin,
    ) -> Result<u32, WriteError> {
        both!(self, w => w.create_deliveries(items, origin).await)
    }

    /// Stores an API subscription's record.
    pub async fn put_subscription(
        &self,
        id: String,
        record: &SubscriptionRecord,
    ) -> Result<(), WriteError> {
        both!(self, w => w.put_subscription(id, record).await)
    }

    /// Removes an API subscription and its state; answers whether it existed.
    pub async fn delete_subscription(&self, id: String) -> Result<bool, WriteError> {
        both!(self, w => w.delete_subscription(id).await)
    }

    /// Retention's removal on the embedded backend (PostgreSQL sweeps in SQL).
    pub async fn purge(&self, seqs: Vec<Seq>, cutoff: Micros) -> Result<Purged, WriteError> {
        match self {
            WriterHandle::Embedded(w) => w.purge(seqs, cutoff).await,
            WriterHandle::Postgres(_) => Err(WriteError::Storage(
                "purge is the embedded backend's; PostgreSQL sweeps in SQL".into(),
            )),
        }
    }

    /// Cluster mode: asks every node to re-read its config file (an API reload on one node
    /// applies to all). Nothing to do on one node.
    pub async fn announce_reload(&self) {
        if let WriterHandle::Postgres(w) = self {
            w.announce_reload().await;
        }
    }

    /// The embedded backend's writer, for what only it does (reopening after I/O errors).
    pub fn embedded(&self) -> Option<&super::embedded::writer::WriterHandle> {
        match self {
            WriterHandle::Embedded(w) => Some(w),
            WriterHandle::Postgres(_) => None,
        }
    }
}

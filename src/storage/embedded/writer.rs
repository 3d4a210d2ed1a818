//! The writer thread: owns every write. Group commit: it takes everything waiting on its
//! channel (bounded per batch), applies it in one redb write transaction, commits once, and
//! answers each sender once that commit is durable. With the commit journal the fsync is
//! pipelined: `commit()` returns when the journal record is sealed, the writer goes on with
//! the next batch while the journal's syncer appends and fsyncs it, and the answers go out
//! from there (`journal::Durability::after`).
//!
//! **Invariant:** no reply, and no due delivery, leaves before the commit that made it true
//! is durable. Reads may see a commit a moment before that (the overlay is shared); nothing
//! acknowledged depends on it, and a commit that then fails to become durable fails every
//! reply and leaves the database to be reopened.
//! An event and its deliveries are written by the same command in the same transaction,
//! so no interleaving of client hang-ups, cancelled futures or crashes can separate them.

use crate::clock::Instant;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use redb::ReadableTable;
use thiserror::Error;
use tokio::sync::oneshot;

use super::schema::*;
use super::{Store, StoreError, Tips};

mod operator;
pub use operator::{CancelOutcome, RetryOutcome};
mod purge;
pub use purge::Purged;
mod reopen;
use crate::metrics::Metrics;
use crate::model::{
    Attempt, Callback, Delivery, DeliveryId, DeliveryStatus, Event, Micros, Origin, Priority, Seq,
};

/// Why a write was not done. Every waiting sender of a failed batch gets one.
#[derive(Debug, Error, Clone)]
pub enum WriteError {
    #[error("storage failure: {0}")]
    Storage(String),
    #[error("the writer is overloaded")]
    Overloaded,
    #[error("the writer has stopped")]
    Stopped,
}

/// An event to append, with the subscriptions it fans out to (matched by the caller).
#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    pub id: String,
    pub event_type: String,
    pub source: Option<String>,
    pub data: String,
    pub idempotency_key: Option<String>,
    /// Where its deliveries go: subscription ids, and a callback's destination.
    pub subscriptions: Vec<Arc<str>>,
    pub priority: Priority,
    pub callback: Option<Callback>,
}

/// What became of one published event.
#[derive(Debug, Clone)]
pub enum Published {
    Created {
        seq: Seq,
        id: String,
        deliveries: u32,
    },
    /// The id or idempotency key was already known: nothing was stored.
    Duplicate {
        seq: Seq,
        event: Box<Event>,
        deliveries: u32,
    },
}

/// An inbound provider request to keep as a receipt beside the event made from it: the
/// receipt as it will be stored (the writer fills in `event_id` and `event_seq`), and how
/// replays of its body are caught.
#[derive(Debug, Clone)]
pub struct NewReceipt {
    /// Its `delivery_id` is the provider's: a later request with the same id in the same
    /// source is a duplicate; `None` turns de-duplication by id off for this request.
    pub receipt: crate::model::Receipt,
    /// Replay detection by content: the body's fingerprint (`model::body_fingerprint`) and
    /// the receipt time before which an earlier receipt of it no longer counts.
    pub fingerprint: Option<(String, Micros)>,
}

/// What became of one inbound request.
#[derive(Debug, Clone)]
pub enum Ingested {
    Created {
        receipt_id: u64,
        seq: Seq,
        event_id: String,
        deliveries: u32,
    },
    /// The provider delivery id was already known in this source: nothing was stored.
    Duplicate { receipt_id: u64, event_id: String },
}

/// A delivery that became due (or changed due time) in a committed transaction.
#[derive(Debug, Clone)]
pub struct Due {
    pub at: Micros,
    pub delivery: DeliveryId,
    pub subscription: Arc<str>,
    /// The event, when the writer had it at hand (fresh deliveries): saves a read.
    pub event: Option<Arc<Event>>,
    /// Attempts already made.
    pub attempts: u32,
    /// The event's priority: due deliveries go out highest first.
    pub priority: Priority,
    /// An operator asked for this attempt (retry, redrive, resume): it goes now, even
    /// through an open breaker's cooldown.
    pub operator: bool,
}

/// What a finished attempt leads to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    Succeeded,
    Retry { at: Micros },
    Dead,
}

/// A finished attempt to record, and the delivery's next state.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub delivery: DeliveryId,
    pub subscription: Arc<str>,
    pub attempt: Attempt,
    /// A one-line summary kept as the delivery's `last_error` (None on success).
    pub error: Option<String>,
    pub next: Next,
}

#[cfg(test)]
impl AttemptRecord {
    /// A test's attempt of `delivery` answered with HTTP `status` at time 0 (its summary
    /// `HTTP {status}` unless 2xx), leading to `next`.
    pub fn answered(delivery: DeliveryId, subscription: &str, status: u16, next: Next) -> Self {
        AttemptRecord {
            delivery,
            subscription: Arc::from(subscription),
            attempt: Attempt {
                started_at: 0,
                duration_us: 0,
                status_code: Some(status),
                error: None,
                response_body: String::new(),
            },
            error: (!(200..300).contains(&status)).then(|| format!("HTTP {status}")),
            next,
        }
    }
}

/// A persisted switch on a subscription (410 Gone, auto-disable, pause).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SubscriptionState {
    pub enabled: bool,
    pub reason: Option<String>,
    pub changed_at: Micros,
}

/// Receives what each commit scheduled; the scheduler listens here.
pub type DueSink = tokio::sync::mpsc::UnboundedSender<Vec<Due>>;

type Reply = Box<dyn FnOnce(Result<(), WriteError>) + Send>;

enum Command {
    Publish {
        events: Vec<NewEvent>,
        /// A batch id: its events are stamped with it and it is kept in `BATCHES`.
        batch: Option<String>,
        reply: oneshot::Sender<Result<Vec<Published>, WriteError>>,
    },
    /// Stores an inbound receipt and its event (with deliveries) unless the provider
    /// delivery id is already known.
    Ingest {
        // Boxed: this is by far the largest command and every queue slot is sized for it.
        receipt: Box<NewReceipt>,
        event: Box<NewEvent>,
        reply: oneshot::Sender<Result<Ingested, WriteError>>,
    },
    /// A no-op transaction: proves the database is writable.
    Probe {
        reply: oneshot::Sender<Result<(), WriteError>>,
    },
    /// Records finished attempts and moves their deliveries on.
    RecordAttempts {
        records: Vec<AttemptRecord>,
        reply: oneshot::Sender<Result<(), WriteError>>,
    },
    /// Moves a delivery's due time without spending an attempt.
    Reschedule {
        delivery: DeliveryId,
        subscription: Arc<str>,
        at: Micros,
        reply: oneshot::Sender<Result<(), WriteError>>,
    },
    /// Persists a subscription's enabled switch.
    SetSubscriptionState {
        id: String,
        state: SubscriptionState,
        reply: oneshot::Sender<Result<(), WriteError>>,
    },
    /// Operator actions: retry, cancel, replay, redrive, API subscriptions (see `operator`).
    Operator(operator::Op),
    /// Retention: removes old events whose deliveries are all terminal (see `purge`).
    Purge(purge::Purge),
    /// Commit what came before, then stop the thread.
    Stop,
}

/// The shared health of the writer, read by readiness.
#[derive(Debug, Default)]
pub struct WriterHealth {
    failed: AtomicBool,
}

impl WriterHealth {
    /// False after a failed commit, true again after the next good one.
    pub fn ok(&self) -> bool {
        !self.failed.load(Ordering::Relaxed)
    }
}

/// The sending side, cloned into every producer of writes.
#[derive(Clone)]
pub struct WriterHandle {
    tx: Sender<Command>,
    pub health: Arc<WriterHealth>,
}

impl WriterHandle {
    fn submit(&self, cmd: Command) -> Result<(), WriteError> {
        self.tx.try_send(cmd).map_err(|e| match e {
            TrySendError::Full(_) => WriteError::Overloaded,
            TrySendError::Disconnected(_) => WriteError::Stopped,
        })
    }

    /// Appends events with their deliveries; resolves after the commit.
    pub async fn publish(&self, events: Vec<NewEvent>) -> Result<Vec<Published>, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Command::Publish {
            events,
            batch: None,
            reply,
        })?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }

    /// Appends a batch's events with their deliveries, stamps them with `batch` and keeps
    /// the batch (the seqs of its events, new or duplicate); resolves after the commit.
    pub async fn publish_batch(
        &self,
        events: Vec<NewEvent>,
        batch: String,
    ) -> Result<Vec<Published>, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Command::Publish {
            events,
            batch: Some(batch),
            reply,
        })?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }

    /// Stores an inbound receipt with its event and deliveries in one transaction; resolves
    /// after the commit.
    pub async fn ingest(
        &self,
        receipt: NewReceipt,
        event: NewEvent,
    ) -> Result<Ingested, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Command::Ingest {
            receipt: Box::new(receipt),
            event: Box::new(event),
            reply,
        })?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }

    /// Records finished attempts; resolves after the commit.
    pub async fn record_attempts(&self, records: Vec<AttemptRecord>) -> Result<(), WriteError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Command::RecordAttempts { records, reply })?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }

    /// Moves a delivery to a new due time; resolves after the commit.
    pub async fn reschedule(
        &self,
        delivery: DeliveryId,
        subscription: Arc<str>,
        at: Micros,
    ) -> Result<(), WriteError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Command::Reschedule {
            delivery,
            subscription,
            at,
            reply,
        })?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }

    /// Persists a subscription's enabled switch; resolves after the commit.
    pub async fn set_subscription_state(
        &self,
        id: String,
        state: SubscriptionState,
    ) -> Result<(), WriteError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Command::SetSubscriptionState { id, state, reply })?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }

    /// Asks the writer to finish what is queued and stop; later writes fail with `Stopped`.
    pub fn stop(&self) {
        // A full queue would refuse; this one waits, as it runs once at shutdown.
        let _ = self.tx.send(Command::Stop);
    }

    /// Commits an empty transaction.
    pub async fn probe(&self) -> Result<(), WriteError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Command::Probe { reply })?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }
}

/// Settings of the writer thread.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Commands taken into one transaction at most.
    pub max_batch: usize,
    /// Commands that may wait on the channel before senders are told to back off.
    pub queue: usize,
    /// Stamps stored times (received, created, updated, due).
    pub clock: crate::clock::Clock,
}

/// Starts the writer thread. It stops when every `WriterHandle` is dropped, after committing
/// what was already queued.
pub fn spawn(
    store: Store,
    cfg: WriterConfig,
    metrics: Arc<Metrics>,
    due_sink: Option<DueSink>,
) -> Result<(WriterHandle, JoinHandle<()>), StoreError> {
    let tips = store.tips()?;
    let (tx, rx) = crossbeam_channel::bounded(cfg.queue);
    let health = Arc::new(WriterHealth::default());
    let mut w = Writer {
        store,
        rx,
        tips,
        max_batch: cfg.max_batch.max(1),
        metrics,
        due_sink,
        health: health.clone(),
        stopping: false,
        clock: cfg.clock.clone(),
    };
    let join = std::thread::Builder::new()
        .name("dispatchd-writer".into())
        .spawn(move || w.run())
        .map_err(|e| StoreError::Encode(format!("cannot start writer thread: {e}")))?;
    Ok((WriterHandle { tx, health }, join))
}

struct Writer {
    store: Store,
    rx: Receiver<Command>,
    tips: Tips,
    max_batch: usize,
    metrics: Arc<Metrics>,
    due_sink: Option<DueSink>,
    health: Arc<WriterHealth>,
    stopping: bool,
    clock: crate::clock::Clock,
}

/// Everything one transaction produced that must be acted on after it commits.
#[derive(Default)]
struct Effects {
    replies: Vec<Reply>,
    due: Vec<Due>,
    events: u64,
}

/// A committed transaction's effects, acted on once the commit is durable.
struct Answer {
    effects: Effects,
    committed: Instant,
    commands: usize,
    due_sink: Option<DueSink>,
    metrics: Arc<Metrics>,
    health: Arc<WriterHealth>,
}

impl Answer {
    /// Answers every sender and tells the scheduler of the deliveries that became due; or,
    /// when the commit cannot be made durable, answers every sender with the error.
    fn send(self, durable: Result<(), String>) {
        let fx = self.effects;
        match durable {
            Ok(()) => {
                self.metrics
                    .durable_seconds
                    .observe(self.committed.elapsed().as_secs_f64());
                self.health.failed.store(false, Ordering::Relaxed);
                self.metrics.events_stored.inc_by(fx.events);
                if let Some(sink) = &self.due_sink
                    && !fx.due.is_empty()
                {
                    let _ = sink.send(fx.due);
                }
                for r in fx.replies {
                    r(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, commands = self.commands, "commit not durable; answering every waiting request with an error");
                let err = WriteError::Storage(format!("the commit could not be made durable: {e}"));
                failed_commit(fx.replies, &err, &self.health, &self.metrics);
            }
        }
    }
}

/// A commit that failed, or could not be made durable: the writer reports unhealthy and
/// every sender waiting on it hears why.
fn failed_commit(replies: Vec<Reply>, err: &WriteError, health: &WriterHealth, metrics: &Metrics) {
    health.failed.store(true, Ordering::Relaxed);
    metrics.commit_failures.inc();
    for r in replies {
        r(Err(err.clone()));
    }
}

impl Writer {
    fn run(&mut self) {
        self.store.db().pipeline();
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Ok(first) = self.rx.recv() {
            batch.push(first);
            while batch.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            self.commit_batch(&mut batch);
            if self.stopping {
                break;
            }
        }
        if let Some(d) = self.store.db().durability()
            && let Err(e) = d.wait()
        {
            tracing::error!(error = %e, "the last commits could not be made durable");
        }
        tracing::info!("writer stopped");
    }

    fn commit_batch(&mut self, batch: &mut Vec<Command>) {
        let started = Instant::now();
        let size = batch.len();
        let saved_tips = self.tips;
        let mut effects = Effects::default();
        let result = self.apply_all(batch, &mut effects);
        let result = match result {
            Ok(txn) => {
                let syncing = Instant::now();
                let r = txn.commit().map_err(StoreError::from);
                self.metrics
                    .sync_seconds
                    .observe(syncing.elapsed().as_secs_f64());
                r
            }
            Err(e) => Err(e),
        };
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.batch_size.observe(size as f64);
        match result {
            Ok(()) => {
                let answer = Answer {
                    effects,
                    committed: Instant::now(),
                    commands: size,
                    due_sink: self.due_sink.clone(),
                    metrics: self.metrics.clone(),
                    health: self.health.clone(),
                };
                // The next batch is applied while this commit's record is synced; its senders
                // hear back once it is durable.
                match self.store.db().durability() {
                    Some(d) => d.after(Box::new(move |r| answer.send(r))),
                    None => answer.send(Ok(())),
                }
            }
            Err(e) => {
                self.tips = saved_tips;
                tracing::error!(error = %e, commands = size, "commit failed; answering every waiting request with an error");
                let err = WriteError::Storage(e.to_string());
                failed_commit(effects.replies, &err, &self.health, &self.metrics);
            }
        }
        batch.clear();
    }

    /// Applies every command to one write transaction. Replies are queued in `effects` and
    /// sent only after the commit; on error every command of the batch is answered here.
    fn apply_all(
        &mut self,
        batch: &mut Vec<Command>,
        fx: &mut Effects,
    ) -> Result<redb::WriteTransaction, StoreError> {
        let txn = match self.begin_write() {
            Ok(t) => t,
            Err(e) => {
                for cmd in batch.drain(..) {
                    fail(cmd, WriteError::Storage(e.to_string()));
                }
                return Err(e);
            }
        };
        {
            let mut t = match Tables::open(&txn) {
                Ok(t) => t,
                Err(e) => {
                    for cmd in batch.drain(..) {
                        fail(cmd, WriteError::Storage(e.to_string()));
                    }
                    return Err(e);
                }
            };
            let mut cmds = batch.drain(..);
            while let Some(cmd) = cmds.next() {
                if let Err(e) = self.apply(&mut t, cmd, fx) {
                    for rest in cmds {
                        fail(rest, WriteError::Storage(e.to_string()));
                    }
                    return Err(e);
                }
            }
        }
        Ok(txn)
    }

    /// Applies one command; on failure answers its sender with the error.
    fn apply(
        &mut self,
        t: &mut Tables<'_>,
        cmd: Command,
        fx: &mut Effects,
    ) -> Result<(), StoreError> {
        match cmd {
            Command::Publish {
                events,
                batch,
                reply,
            } => {
                let mut out = Vec::with_capacity(events.len());
                for ev in events {
                    match self.publish_one(t, ev, None, batch.as_deref(), fx) {
                        Ok(p) => out.push(p),
                        Err(e) => {
                            drop(reply.send(Err(WriteError::Storage(e.to_string()))));
                            return Err(e);
                        }
                    }
                }
                if let Some(id) = &batch {
                    let mut seqs: Vec<Seq> =
                        out.iter()
                            .map(|p| match p {
                                Published::Created { seq, .. }
                                | Published::Duplicate { seq, .. } => *seq,
                            })
                            .collect();
                    seqs.sort_unstable();
                    seqs.dedup();
                    let record = super::schema::BatchRecord {
                        created_at: self.clock.now_micros(),
                        seqs,
                    };
                    if let Err(e) = insert_record(&mut t.batches, id.as_str(), &record) {
                        drop(reply.send(Err(WriteError::Storage(e.to_string()))));
                        return Err(e);
                    }
                }
                fx.replies
                    .push(Box::new(move |r| drop(reply.send(r.map(|()| out)))));
            }
            Command::Ingest {
                receipt,
                event,
                reply,
            } => match self.ingest_one(t, *receipt, *event, fx) {
                Ok(i) => fx
                    .replies
                    .push(Box::new(move |r| drop(reply.send(r.map(|()| i))))),
                Err(e) => {
                    drop(reply.send(Err(WriteError::Storage(e.to_string()))));
                    return Err(e);
                }
            },
            Command::Probe { reply } => {
                fx.replies.push(Box::new(move |r| drop(reply.send(r))));
            }
            Command::RecordAttempts { records, reply } => {
                let now = self.clock.now_micros();
                let streaks = streaks(&records);
                let recorded = records
                    .into_iter()
                    .try_for_each(|r| record_attempt(t, r, now, fx))
                    .and_then(|()| {
                        streaks
                            .into_iter()
                            .try_for_each(|(sub, s)| keep_streak(&mut t.meta, &sub, s))
                    });
                if let Err(e) = recorded {
                    drop(reply.send(Err(WriteError::Storage(e.to_string()))));
                    return Err(e);
                }
                fx.replies.push(Box::new(move |r| drop(reply.send(r))));
            }
            Command::Reschedule {
                delivery,
                subscription,
                at,
                reply,
            } => {
                let now = self.clock.now_micros();
                if let Err(e) = reschedule(t, (delivery, subscription), at, now, fx) {
                    drop(reply.send(Err(WriteError::Storage(e.to_string()))));
                    return Err(e);
                }
                fx.replies.push(Box::new(move |r| drop(reply.send(r))));
            }
            Command::SetSubscriptionState { id, state, reply } => {
                // A switch (pause, resume, disable) starts the failure count afresh.
                let written = insert_record(&mut t.subscription_state, id.as_str(), &state)
                    .and_then(|()| {
                        t.meta.remove(super::schema::failing_key(&id).as_str())?;
                        Ok(())
                    });
                if let Err(e) = written {
                    drop(reply.send(Err(WriteError::Storage(e.to_string()))));
                    return Err(e);
                }
                fx.replies.push(Box::new(move |r| drop(reply.send(r))));
            }
            Command::Operator(op) => self.apply_operator(t, op, fx)?,
            Command::Purge(p) => self.apply_purge(t, p, fx)?,
            Command::Stop => self.stopping = true,
        }
        Ok(())
    }

    /// Appends one event (from a producer, or from an inbound `receipt`) with its deliveries.
    fn publish_one(
        &mut self,
        t: &mut Tables<'_>,
        ev: NewEvent,
        receipt: Option<u64>,
        batch: Option<&str>,
        fx: &mut Effects,
    ) -> Result<Published, StoreError> {
        let known = match &ev.idempotency_key {
            Some(k) => t.idempotency_keys.get(k.as_str())?.map(|g| g.value()),
            None => None,
        };
        let seq = self.tips.last_seq + 1;
        let known = match known {
            Some(s) => Some(s),
            None => claim_event_id(&mut t.event_ids, ev.id.as_str(), seq)?,
        };
        if let Some(seq) = known {
            let event: Event = match t.events.get(seq)? {
                Some(v) => decode(v.value(), "event")?,
                None => {
                    return Err(StoreError::Decode(
                        "event",
                        format!("index points at missing seq {seq}"),
                    ));
                }
            };
            let deliveries = t
                .event_deliveries
                .range((seq, 0)..=(seq, u64::MAX))?
                .count() as u32;
            return Ok(Published::Duplicate {
                seq,
                event: Box::new(event),
                deliveries,
            });
        }

        let now = self.clock.now_micros().max(self.tips.last_received_at);
        let event = Event {
            id: ev.id,
            event_type: ev.event_type,
            source: ev.source,
            data: ev.data,
            received_at: now,
            idempotency_key: ev.idempotency_key,
            receipt,
            priority: ev.priority,
            batch: batch.map(str::to_owned),
            callback: ev.callback,
        };
        insert_record(&mut t.events, seq, &event)?;
        let event = Arc::new(event);
        if let Some(k) = &event.idempotency_key {
            t.idempotency_keys.insert(k.as_str(), seq)?;
        }
        t.events_by_type
            .insert((event.event_type.as_str(), seq), ())?;
        self.tips.last_seq = seq;
        self.tips.last_received_at = now;
        fx.events += 1;

        let n = ev.subscriptions.len() as u32;
        for sub in ev.subscriptions {
            self.create_delivery(t, seq, &event, sub, now, Origin::Publish, fx)?;
        }
        Ok(Published::Created {
            seq,
            id: event.id.clone(),
            deliveries: n,
        })
    }

    /// Stores a receipt and the event made from it, or finds the receipt that already holds
    /// this provider delivery id.
    fn ingest_one(
        &mut self,
        t: &mut Tables<'_>,
        new: NewReceipt,
        event: NewEvent,
        fx: &mut Effects,
    ) -> Result<Ingested, StoreError> {
        let NewReceipt {
            receipt: mut record,
            fingerprint,
        } = new;
        if let Some(did) = &record.delivery_id {
            let known = t
                .receipt_ids
                .get((record.source.as_str(), did.as_str()))?
                .map(|g| g.value());
            if let Some(receipt_id) = known {
                let Some(v) = t.receipts.get(receipt_id)? else {
                    return Err(StoreError::Decode(
                        "receipt",
                        format!("index points at missing receipt {receipt_id}"),
                    ));
                };
                let r: crate::model::Receipt = decode(v.value(), "receipt")?;
                return Ok(Ingested::Duplicate {
                    receipt_id,
                    event_id: r.event_id,
                });
            }
        }
        if let Some((fp, not_before)) = &fingerprint {
            let known = t
                .receipt_ids
                .get((record.source.as_str(), fp.as_str()))?
                .map(|g| g.value());
            if let Some(receipt_id) = known
                && let Some(v) = t.receipts.get(receipt_id)?
            {
                let r: crate::model::Receipt = decode(v.value(), "receipt")?;
                if r.received_at >= *not_before {
                    return Ok(Ingested::Duplicate {
                        receipt_id,
                        event_id: r.event_id,
                    });
                }
            }
        }
        let receipt_id = self.tips.last_receipt + 1;
        let (seq, event_id, deliveries) =
            match self.publish_one(t, event, Some(receipt_id), None, fx)? {
                Published::Created {
                    seq,
                    id,
                    deliveries,
                } => (seq, id, deliveries),
                // Callers mint a fresh event id and no idempotency key, so this is a collision.
                Published::Duplicate { seq, .. } => {
                    return Err(StoreError::Encode(format!(
                        "inbound event id collides with the event at seq {seq}"
                    )));
                }
            };
        record.event_id = event_id.clone();
        record.event_seq = seq;
        insert_record(&mut t.receipts, receipt_id, &record)?;
        if let Some(did) = &record.delivery_id {
            t.receipt_ids
                .insert((record.source.as_str(), did.as_str()), receipt_id)?;
        }
        if let Some((fp, _)) = &fingerprint {
            t.receipt_ids
                .insert((record.source.as_str(), fp.as_str()), receipt_id)?;
        }
        self.tips.last_receipt = receipt_id;
        Ok(Ingested::Created {
            receipt_id,
            seq,
            event_id,
            deliveries,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn create_delivery(
        &mut self,
        t: &mut Tables<'_>,
        seq: Seq,
        event: &Arc<Event>,
        subscription: Arc<str>,
        now: Micros,
        origin: Origin,
        fx: &mut Effects,
    ) -> Result<DeliveryId, StoreError> {
        let id = self.tips.last_delivery + 1;
        let d = Delivery {
            event_seq: seq,
            event_id: event.id.clone(),
            subscription: subscription.to_string(),
            status: DeliveryStatus::Pending,
            attempts: 0,
            next_attempt_at: Some(now),
            last_error: None,
            created_at: now,
            updated_at: now,
            origin,
            priority: event.priority,
        };
        insert_record(&mut t.deliveries, id, &d)?;
        t.event_deliveries.insert((seq, id), ())?;
        t.deliveries_by_sub_status
            .insert((&*subscription, DeliveryStatus::Pending.code(), id), ())?;
        t.deliveries_by_type
            .insert((event.event_type.as_str(), id), ())?;
        t.schedule.insert((now, id), ())?;
        self.tips.last_delivery = id;
        fx.due.push(Due {
            at: now,
            delivery: id,
            subscription,
            event: Some(event.clone()),
            attempts: 0,
            priority: event.priority,
            // Replays and redrives are an operator's: they go now.
            operator: origin != Origin::Publish,
        });
        Ok(id)
    }
}

/// Maps an event id to `seq` unless it is taken, and then returns the seq it already had.
/// One B-tree walk in the common case, where a lookup and then an insert took two.
fn claim_event_id(
    ids: &mut redb::Table<'_, &'static str, u64>,
    id: &str,
    seq: Seq,
) -> Result<Option<Seq>, StoreError> {
    let taken = ids.insert(id, seq)?.map(|g| g.value());
    if let Some(old) = taken {
        ids.insert(id, old)?;
    }
    Ok(taken)
}

fn load_delivery(t: &Tables<'_>, id: DeliveryId) -> Result<Option<Delivery>, StoreError> {
    super::get_record(&t.deliveries, id, "delivery")
}

fn store_delivery(
    t: &mut Tables<'_>,
    id: DeliveryId,
    d: &Delivery,
    old_status: DeliveryStatus,
) -> Result<(), StoreError> {
    insert_record(&mut t.deliveries, id, d)?;
    if old_status != d.status {
        let sub = d.subscription.as_str();
        t.deliveries_by_sub_status
            .remove((sub, old_status.code(), id))?;
        t.deliveries_by_sub_status
            .insert((sub, d.status.code(), id), ())?;
        if old_status == DeliveryStatus::Dead {
            t.dead.remove(id)?;
        }
    }
    Ok(())
}

/// Appends the attempt and moves the delivery to its next state. A delivery made terminal
/// meanwhile (cancelled while in flight) keeps its status; the attempt is still recorded.
fn record_attempt(
    t: &mut Tables<'_>,
    r: AttemptRecord,
    now: Micros,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    let id = r.delivery;
    let Some(mut d) = load_delivery(t, id)? else {
        tracing::warn!(delivery = id, "attempt for an unknown delivery ignored");
        return Ok(());
    };
    let n = d.attempts + 1;
    insert_record(&mut t.attempts, (id, n), &r.attempt)?;
    if let Some(old) = d.next_attempt_at.take() {
        t.schedule.remove((old, id))?;
    }
    let old_status = d.status;
    d.attempts = n;
    d.updated_at = now;
    if !old_status.is_terminal() {
        d.last_error = r.error;
        match r.next {
            Next::Succeeded => d.status = DeliveryStatus::Succeeded,
            Next::Retry { at } => {
                d.status = DeliveryStatus::Retrying;
                d.next_attempt_at = Some(at);
                t.schedule.insert((at, id), ())?;
                fx.due.push(Due {
                    at,
                    delivery: id,
                    subscription: r.subscription,
                    event: None,
                    attempts: n,
                    priority: d.priority,
                    operator: false,
                });
            }
            Next::Dead => {
                d.status = DeliveryStatus::Dead;
                t.dead.insert(id, now)?;
            }
        }
    }
    store_delivery(t, id, &d, old_status)
}

/// What one subscription's attempts, in the order they are recorded, do to its failing mark
/// (`schema::failing_key`: since when every attempt has failed, which auto-disable reads).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Streak {
    /// The last attempt succeeded.
    Ended,
    /// A success, then failures from this time on.
    Restarted(Micros),
    /// Failures only: the streak under way goes on, or one starts at this time.
    Failing(Micros),
}

/// The streaks a command's attempts leave, one per run of attempts of one subscription.
pub(crate) fn streaks<R: std::borrow::Borrow<AttemptRecord>>(
    records: &[R],
) -> Vec<(Arc<str>, Streak)> {
    records
        .chunk_by(|a, b| a.borrow().subscription == b.borrow().subscription)
        .filter_map(|run| {
            let first = run.first()?.borrow();
            let streak = match run.iter().rposition(|r| r.borrow().next == Next::Succeeded) {
                Some(i) => match run.get(i + 1) {
                    None => Streak::Ended,
                    Some(r) => Streak::Restarted(r.borrow().attempt.started_at),
                },
                None => Streak::Failing(first.attempt.started_at),
            };
            Some((first.subscription.clone(), streak))
        })
        .collect()
}

/// Keeps a subscription's failing mark in step with its attempts, in the transaction that
/// records them: written when a streak starts and removed when it ends, so a destination
/// that keeps succeeding (or keeps failing) costs one lookup per command and no write.
fn keep_streak(
    meta: &mut redb::Table<'_, &'static str, &'static [u8]>,
    subscription: &str,
    streak: Streak,
) -> Result<(), StoreError> {
    let key = super::schema::failing_key(subscription);
    let kept = meta.get(key.as_str())?.is_some();
    match streak {
        Streak::Ended if kept => {
            meta.remove(key.as_str())?;
        }
        Streak::Restarted(since) => {
            meta.insert(key.as_str(), since.to_le_bytes().as_slice())?;
        }
        Streak::Failing(since) if !kept => {
            meta.insert(key.as_str(), since.to_le_bytes().as_slice())?;
        }
        Streak::Ended | Streak::Failing(_) => {}
    }
    Ok(())
}

/// Moves a live delivery's due time; terminal ones are left alone.
fn reschedule(
    t: &mut Tables<'_>,
    (id, subscription): (DeliveryId, Arc<str>),
    at: Micros,
    now: Micros,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    let Some(mut d) = load_delivery(t, id)? else {
        return Ok(());
    };
    if d.status.is_terminal() {
        return Ok(());
    }
    if let Some(old) = d.next_attempt_at {
        t.schedule.remove((old, id))?;
    }
    d.next_attempt_at = Some(at);
    d.updated_at = now;
    t.schedule.insert((at, id), ())?;
    let status = d.status;
    store_delivery(t, id, &d, status)?;
    fx.due.push(Due {
        at,
        delivery: id,
        subscription,
        event: None,
        attempts: d.attempts,
        priority: d.priority,
        operator: false,
    });
    Ok(())
}

fn fail(cmd: Command, err: WriteError) {
    match cmd {
        Command::Publish { reply, .. } => drop(reply.send(Err(err))),
        Command::Ingest { reply, .. } => drop(reply.send(Err(err))),
        Command::Probe { reply }
        | Command::RecordAttempts { reply, .. }
        | Command::Reschedule { reply, .. }
        | Command::SetSubscriptionState { reply, .. } => drop(reply.send(Err(err))),
        Command::Operator(op) => op.fail(err),
        Command::Purge(p) => p.fail(err),
        Command::Stop => {}
    }
}

/// The tables a batch touches, opened once per transaction.
struct Tables<'t> {
    events: redb::Table<'t, u64, &'static [u8]>,
    event_ids: redb::Table<'t, &'static str, u64>,
    idempotency_keys: redb::Table<'t, &'static str, u64>,
    events_by_type: redb::Table<'t, (&'static str, u64), ()>,
    deliveries: redb::Table<'t, u64, &'static [u8]>,
    event_deliveries: redb::Table<'t, (u64, u64), ()>,
    schedule: redb::Table<'t, (i64, u64), ()>,
    attempts: redb::Table<'t, (u64, u32), &'static [u8]>,
    dead: redb::Table<'t, u64, i64>,
    subscription_state: redb::Table<'t, &'static str, &'static [u8]>,
    meta: redb::Table<'t, &'static str, &'static [u8]>,
    receipts: redb::Table<'t, u64, &'static [u8]>,
    receipt_ids: redb::Table<'t, (&'static str, &'static str), u64>,
    deliveries_by_sub_status: redb::Table<'t, (&'static str, u8, u64), ()>,
    deliveries_by_type: redb::Table<'t, (&'static str, u64), ()>,
    subscriptions: redb::Table<'t, &'static str, &'static [u8]>,
    batches: redb::Table<'t, &'static str, &'static [u8]>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            events: txn.open_table(EVENTS)?,
            event_ids: txn.open_table(EVENT_IDS)?,
            idempotency_keys: txn.open_table(IDEMPOTENCY_KEYS)?,
            events_by_type: txn.open_table(EVENTS_BY_TYPE)?,
            deliveries: txn.open_table(DELIVERIES)?,
            event_deliveries: txn.open_table(EVENT_DELIVERIES)?,
            schedule: txn.open_table(SCHEDULE)?,
            attempts: txn.open_table(ATTEMPTS)?,
            dead: txn.open_table(DEAD)?,
            subscription_state: txn.open_table(SUBSCRIPTION_STATE)?,
            meta: txn.open_table(META)?,
            receipts: txn.open_table(RECEIPTS)?,
            receipt_ids: txn.open_table(RECEIPT_IDS)?,
            deliveries_by_sub_status: txn.open_table(DELIVERIES_BY_SUB_STATUS)?,
            deliveries_by_type: txn.open_table(DELIVERIES_BY_TYPE)?,
            subscriptions: txn.open_table(SUBSCRIPTIONS)?,
            batches: txn.open_table(BATCHES)?,
        })
    }
}

/// What the storage tests share: a writer over a fresh database, and events to publish.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use super::{NewEvent, WriterConfig, WriterHandle, spawn};
    use crate::metrics::Metrics;
    use crate::storage::embedded::Store;

    /// A writer (taking up to `max_batch` commands per commit) over a new database file in a
    /// temp dir, on the system clock, with no due-sink; and the writer thread.
    pub fn open(
        max_batch: usize,
    ) -> (
        tempfile::TempDir,
        Store,
        WriterHandle,
        std::thread::JoinHandle<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("dispatchd.redb"), 1 << 20, 1 << 20).unwrap();
        let cfg = WriterConfig {
            max_batch,
            queue: 64,
            clock: crate::clock::Clock::system(),
        };
        let metrics = Arc::new(Metrics::new().unwrap());
        let (w, join) = spawn(store.clone(), cfg, metrics, None).unwrap();
        (dir, store, w, join)
    }

    /// `n` events `e0`, `e1`, … of type `t`, each to these subscriptions.
    pub fn events(n: usize, subscriptions: &[&str]) -> Vec<NewEvent> {
        (0..n)
            .map(|i| NewEvent {
                id: format!("e{i}"),
                event_type: "t".into(),
                data: "{}".into(),
                subscriptions: subscriptions.iter().map(|s| Arc::from(*s)).collect(),
                ..NewEvent::default()
            })
            .collect()
    }
}

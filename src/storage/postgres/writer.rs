//! Writes on PostgreSQL. Publishing keeps group commit: one writer task per node takes every
//! publish waiting, applies them in one statement (`INSERT_EVENTS`: the events and their
//! deliveries, `INSERT … SELECT FROM unnest(…)` in one `WITH`), which commits by itself in
//! one round trip, and only then answers each sender.
//! Publishes that record a batch, or repeat an event id or key among them, take a
//! transaction of several statements instead. A 2xx therefore means the event and all its deliveries are
//! committed, as on the embedded backend. Attempt outcomes are group-committed the same way
//! by a second task on a connection of its own, beside the publishes rather than after them:
//! on PostgreSQL the two need not share a transaction, and neither then waits for the other's
//! commit. Outcomes that no destination waits on may wait a few milliseconds for others to
//! share their commit (`unawaited`). The other writes (operator actions, inbound receipts, subscriptions) each run in
//! a transaction of their own on a pooled connection: they come from many tasks at once and
//! PostgreSQL runs them side by side.
//!
//! Idempotency holds across nodes: event ids and idempotency keys are unique in the table,
//! and a row that conflicts is skipped (`ON CONFLICT DO NOTHING`). When two nodes publish the
//! same id at once, PostgreSQL makes the second insert wait for the first transaction; once
//! that commits the second finds the row and answers it as a duplicate.
//!
//! New deliveries reach their destination's owner once committed: this node's scheduler
//! directly for the destinations it holds, a NOTIFY sent after the commit for the others
//! (`notify::Announcer`; never inside the publish's own transaction, whose commit would
//! then wait for every other node's).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use super::Shared;
use super::notify::{Announcer, Work};
use crate::model::{DeliveryId, DeliveryStatus, Event, Micros, Origin, Seq};
use crate::storage::schema::SubscriptionRecord;
use crate::storage::writer::{
    AttemptRecord, CancelOutcome, Due, DueSink, Ingested, NewEvent, NewReceipt, Published,
    RetryOutcome, SubscriptionState, WriteError,
};

/// Publishes taken into one transaction at most.
const MAX_BATCH: usize = 1024;

/// How long an outcome that no destination waits on may wait for others to share its
/// commit (see `unawaited`), counted from when it was handed to the writer.
const OUTCOME_LINGER: std::time::Duration = std::time::Duration::from_millis(5);

/// Outcomes waiting that end the lingering: enough to share a commit.
const OUTCOME_LINGER_MAX: usize = 64;

/// How long the publishes' task, once free to commit, may wait for the others this node
/// expects (`Company`); rounded up to the runtime's next millisecond tick. Counted from then, not from when the oldest was queued: under load
/// the oldest has waited through the previous commit, and the senders expected are those
/// that commit answered.
const PUBLISH_LINGER: std::time::Duration = std::time::Duration::from_millis(1);

/// Publish commits `Company` remembers.
const PUBLISH_RECENT: usize = 8;

/// Events waiting that end a publish's wait, however many more requests are expected: the
/// statement's fixed cost is by then a small part of it. Also the most requests waited for.
const PUBLISH_LINGER_MAX: usize = 64;

/// How long a group-commit task keeps its connection's prepared statements. After five runs
/// PostgreSQL keeps a prepared statement's generic plan, and one made while a table was small
/// (a new cluster's first seconds) would, for the outcomes' `UPDATE … FROM unnest(…)`, scan
/// the whole table for as long as the connection lives. Preparing again now and then bounds
/// that to this long, while every other run reuses the plan instead of planning again (the
/// outcome statement took about 0.4 ms to plan).
const REPLAN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Error, Clone)]
pub enum PgWriteError {
    #[error("database: {0}")]
    Db(String),
    #[error("the writer has stopped")]
    Stopped,
}

impl From<tokio_postgres::Error> for PgWriteError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgWriteError::Db(super::describe(&e))
    }
}

impl From<deadpool_postgres::PoolError> for PgWriteError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        PgWriteError::Db(e.to_string())
    }
}

impl From<PgWriteError> for WriteError {
    fn from(e: PgWriteError) -> Self {
        match e {
            PgWriteError::Db(m) => WriteError::Storage(m),
            PgWriteError::Stopped => WriteError::Stopped,
        }
    }
}

struct Publish {
    events: Vec<NewEvent>,
    batch: Option<String>,
    reply: oneshot::Sender<Result<Vec<Published>, PgWriteError>>,
}

/// One destination's finished attempts, to record under the lease epoch held.
struct Record {
    destination: Arc<str>,
    epoch: i64,
    records: Vec<AttemptRecord>,
    /// Its destination waits for this commit before the next attempt (FIFO): no lingering.
    awaited: bool,
    /// When it was handed to the writer.
    queued: tokio::time::Instant,
    reply: oneshot::Sender<Result<Recorded, PgWriteError>>,
}

/// Outcomes in `batch` plus `more`, when none of them is awaited: the outcomes' task waits
/// for more while this is under `OUTCOME_LINGER_MAX`, for `OUTCOME_LINGER` from the oldest.
/// An awaited one (FIFO) ends the wait: its commit goes at once, with whatever is waiting.
///
/// Why wait: each node group-commits its outcomes apart, and an outcome commit does not
/// wait for a WAL flush, so a task that took only what was waiting ran as fast as its
/// statement, in small runs, and a cluster made as many outcome statements per event as it
/// has nodes: 10.6 outcomes a statement on each of two nodes against 32 on one, with four
/// destinations spread over them.
fn unawaited(batch: &[Cmd]) -> Option<usize> {
    batch.iter().try_fold(0, |n, c| match c {
        Cmd::Record(r) if !r.awaited => Some(n + r.records.len()),
        _ => None,
    })
}

/// How many senders this node's publishes lately committed together: the most publish
/// requests of the last `PUBLISH_RECENT` publish commits. The publishes' task waits, once
/// free, up to `PUBLISH_LINGER` for that many (or `PUBLISH_LINGER_MAX` events) before it
/// commits.
///
/// Why wait: a publish commit costs the database a statement and a WAL flush whatever it
/// carries (about 0.2 ms of its CPU, against 0.02 ms an event), and a task that took only
/// what was waiting committed in runs as small as its senders' timing made them. Senders
/// that publish one after another (a closed loop: each waits for its answer, then sends the
/// next) come back a moment after their commit is answered, while the next commit has
/// already started with the first of them. On one node at 64 connections that gave runs of
/// about 29 events; two nodes behind one load balancer each get half the senders and
/// committed runs of 13, so the database paid that fixed cost more than twice as often for
/// the same events. Waiting for as many as the recent commits carried gathers the senders
/// that are coming back.
///
/// The cost: a sender that publishes alone never waits (it expects one), but where
/// independent senders' publishes now and then arrive together, the ones arriving alone in
/// the next `PUBLISH_RECENT` commits wait the whole linger. The runtime's timers tick in
/// milliseconds, so that is 1 to 2 ms.
#[derive(Default)]
struct Company {
    recent: std::collections::VecDeque<usize>,
}

impl Company {
    /// Publish requests a publish commit waits for.
    fn expected(&self) -> usize {
        self.recent
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .min(PUBLISH_LINGER_MAX)
    }

    /// Notes a publish commit's batch.
    fn committed(&mut self, batch: &[Cmd]) {
        if self.recent.len() == PUBLISH_RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(batch.len());
    }
}

/// Events in the publishes of `batch`.
fn events(batch: &[Cmd]) -> usize {
    batch
        .iter()
        .map(|c| match c {
            Cmd::Publish(p) => p.events.len(),
            Cmd::Record(_) => 0,
        })
        .sum()
}

/// Which group-commit task gathers, and so how long it may wait for company.
#[derive(Clone, Copy)]
enum Gather {
    /// Publishes: until `expected` requests (or `PUBLISH_LINGER_MAX` events) are waiting,
    /// `PUBLISH_LINGER` at most from when the task took the first (`Company`).
    Publishes { expected: usize },
    /// Outcomes: while `unawaited` allows, `OUTCOME_LINGER` at most.
    Outcomes,
}

/// One batch: `first` and the commands waiting after it, up to `MAX_BATCH`; then more as
/// they come, while the task's rule (`Gather`) says to wait.
async fn gather(first: Cmd, rx: &mut mpsc::Receiver<Cmd>, how: Gather) -> Vec<Cmd> {
    let free = tokio::time::Instant::now();
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(c) => batch.push(c),
            Err(_) => break,
        }
    }
    let expected = match how {
        Gather::Publishes { expected } => expected,
        Gather::Outcomes => return linger_outcomes(batch, rx).await,
    };
    if !matches!(batch.first(), Some(Cmd::Publish(_))) {
        return batch;
    }
    let until = free + PUBLISH_LINGER;
    let mut waiting = events(&batch);
    while batch.len() < expected.min(MAX_BATCH) && waiting < PUBLISH_LINGER_MAX {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(c)) => {
                waiting += events(std::slice::from_ref(&c));
                batch.push(c);
            }
            Ok(None) | Err(_) => break,
        }
    }
    batch
}

/// The outcomes' task's wait: more outcomes as they come while `unawaited` allows, until
/// `OUTCOME_LINGER` after the oldest was queued.
async fn linger_outcomes(mut batch: Vec<Cmd>, rx: &mut mpsc::Receiver<Cmd>) -> Vec<Cmd> {
    let Some(Cmd::Record(oldest)) = batch.first() else {
        return batch;
    };
    let until = oldest.queued + OUTCOME_LINGER;
    let mut waiting = unawaited(&batch);
    while waiting.is_some_and(|n| n < OUTCOME_LINGER_MAX) && batch.len() < MAX_BATCH {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(c)) => {
                waiting = waiting
                    .zip(unawaited(std::slice::from_ref(&c)))
                    .map(|(a, b)| a + b);
                batch.push(c);
            }
            Ok(None) | Err(_) => break,
        }
    }
    batch
}

/// What the group-commit tasks take. Publishes and attempt outcomes go to two tasks of their
/// own, each with its connection, so that neither waits for the other's commit: publishes
/// wait for the WAL flush, outcomes do not, and they touch different rows.
enum Cmd {
    Publish(Publish),
    Record(Record),
}

impl Cmd {
    fn fail(self, e: PgWriteError) {
        match self {
            Cmd::Publish(p) => drop(p.reply.send(Err(e))),
            Cmd::Record(r) => drop(r.reply.send(Err(e))),
        }
    }
}

/// Hands a command to a group-commit task: a full queue is overload, a closed one a stop.
fn queue(tx: &mpsc::Sender<Cmd>, cmd: Cmd) -> Result<(), WriteError> {
    tx.try_send(cmd).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => WriteError::Overloaded,
        mpsc::error::TrySendError::Closed(_) => WriteError::Stopped,
    })
}

/// Column `i` of a row of this module's own statements; a type that does not match fails the
/// transaction, not the task.
fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    r: &'a tokio_postgres::Row,
    i: usize,
) -> Result<T, PgWriteError> {
    Ok(r.try_get(i)?)
}

/// The writes of one node on the cluster's database; cheap to clone.
#[derive(Clone)]
pub struct PgWriter {
    tx: mpsc::Sender<Cmd>,
    /// Attempt outcomes' group-commit task.
    outcomes: mpsc::Sender<Cmd>,
    shared: Shared,
    /// True after a failed transaction, false again after the next good one.
    failed: Arc<AtomicBool>,
    stopped: Arc<AtomicBool>,
    due: Option<DueSink>,
    /// Tells the other nodes of the work this node's commits made for them.
    announcer: Announcer,
    commits: Arc<AtomicU64>,
}

impl PgWriter {
    /// Starts the group-commit task; `due` hears the deliveries this node's commits make for
    /// the destinations it holds.
    pub fn spawn(shared: Shared, due: Option<DueSink>) -> Self {
        let (tx, rx) = mpsc::channel(65_536);
        let (outcomes, outcomes_rx) = mpsc::channel(65_536);
        let w = PgWriter {
            tx,
            outcomes,
            announcer: Announcer::spawn(shared.pool.clone(), shared.metrics.clone()),
            shared,
            failed: Arc::default(),
            stopped: Arc::default(),
            due,
            commits: Arc::default(),
        };
        tokio::spawn(w.clone().run(rx, false));
        tokio::spawn(w.clone().run(outcomes_rx, true));
        w
    }

    pub fn healthy(&self) -> bool {
        !self.failed.load(Ordering::Relaxed)
    }

    /// Transactions committed by the group-commit task so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Refuses writes from now on; publishes already queued are still committed.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    fn outcome<T>(&self, r: Result<T, PgWriteError>) -> Result<T, WriteError> {
        match &r {
            Ok(_) => self.failed.store(false, Ordering::Relaxed),
            Err(PgWriteError::Db(e)) => {
                self.failed.store(true, Ordering::Relaxed);
                self.shared.metrics.cluster_db_errors.inc();
                self.shared.metrics.commit_failures.inc();
                tracing::warn!(error = %e, "database write failed");
            }
            Err(PgWriteError::Stopped) => {}
        }
        r.map_err(WriteError::from)
    }

    fn open(&self) -> Result<(), WriteError> {
        if self.stopped.load(Ordering::Relaxed) {
            Err(WriteError::Stopped)
        } else {
            Ok(())
        }
    }

    /// Appends events with their deliveries (stamped with `batch` and kept as one, when
    /// given); resolves after the commit.
    pub async fn publish(
        &self,
        events: Vec<NewEvent>,
        batch: Option<String>,
    ) -> Result<Vec<Published>, WriteError> {
        self.open()?;
        let (reply, rx) = oneshot::channel();
        queue(
            &self.tx,
            Cmd::Publish(Publish {
                events,
                batch,
                reply,
            }),
        )?;
        rx.await
            .map_err(|_| WriteError::Stopped)?
            .map_err(WriteError::from)
    }

    /// The group-commit loop of one task: the publishes' or the outcomes' (`outcomes`). Each
    /// may wait a little for company (`Gather`).
    async fn run(self, mut rx: mpsc::Receiver<Cmd>, outcomes: bool) {
        let mut conn: Option<deadpool_postgres::Object> = None;
        let mut planned = crate::clock::Instant::now();
        let mut company = Company::default();
        while let Some(first) = rx.recv().await {
            let how = if outcomes {
                Gather::Outcomes
            } else {
                Gather::Publishes {
                    expected: company.expected(),
                }
            };
            let batch = gather(first, &mut rx, how).await;
            if !outcomes {
                company.committed(&batch);
            }
            let (mut publishes, mut records) = (Vec::new(), Vec::new());
            for c in batch {
                match c {
                    Cmd::Publish(p) => publishes.push(p),
                    Cmd::Record(r) => records.push(r),
                }
            }
            let started = crate::clock::Instant::now();
            let result = match conn.take() {
                Some(c) => {
                    if planned.elapsed() >= REPLAN_EVERY {
                        c.statement_cache.clear();
                        planned = crate::clock::Instant::now();
                    }
                    Ok(c)
                }
                None => {
                    // A pooled connection may hold statements prepared long ago.
                    planned = crate::clock::Instant::now();
                    let c = self.shared.pool.get().await.map_err(PgWriteError::from);
                    if let Ok(c) = &c {
                        c.statement_cache.clear();
                    }
                    c
                }
            };
            let result = match result {
                Ok(mut c) => {
                    let r = commit(&mut c, &publishes, &records, &self.shared).await;
                    if r.is_ok() {
                        conn = Some(c);
                    }
                    r
                }
                Err(e) => Err(e),
            };
            match self.outcome(result) {
                Ok(Committed {
                    mut out,
                    due,
                    elsewhere,
                    fenced,
                }) => {
                    self.commits.fetch_add(1, Ordering::Relaxed);
                    let m = &self.shared.metrics;
                    m.durable_seconds.observe(started.elapsed().as_secs_f64());
                    let stored = out
                        .iter()
                        .filter(|p| matches!(p, Published::Created { .. }))
                        .count();
                    m.events_stored.inc_by(stored as u64);
                    self.hand_over(due);
                    self.announcer.send(&elsewhere);
                    // The answers in the order the events came, handed back per sender.
                    for p in publishes {
                        let rest = out.split_off(p.events.len().min(out.len()));
                        let mine = std::mem::replace(&mut out, rest);
                        drop(p.reply.send(Ok(mine)));
                    }
                    for r in records {
                        let answer = if fenced
                            .iter()
                            .any(|(d, e)| **d == *r.destination && *e == r.epoch)
                        {
                            Recorded::Fenced
                        } else {
                            Recorded::Committed
                        };
                        drop(r.reply.send(Ok(answer)));
                    }
                }
                Err(e) => {
                    // Nothing of it was stored, unless it failed after its statement committed
                    // (reading a duplicate): a retry under the same id answers `duplicate`.
                    tracing::error!(error = %e, "group commit failed; its callers get an error");
                    let e = match e {
                        WriteError::Stopped => PgWriteError::Stopped,
                        other => PgWriteError::Db(other.to_string()),
                    };
                    for c in publishes.into_iter().map(Cmd::Publish) {
                        c.fail(e.clone());
                    }
                    for c in records.into_iter().map(Cmd::Record) {
                        c.fail(e.clone());
                    }
                }
            }
        }
    }

    /// Stores an inbound receipt with its event and deliveries in one transaction.
    pub async fn ingest(&self, new: NewReceipt, event: NewEvent) -> Result<Ingested, WriteError> {
        self.open()?;
        let r = async {
            let mut c = self.shared.pool.get().await?;
            ingest(&mut c, new, event, &self.shared).await
        }
        .await;
        let (ingested, due, elsewhere) = self.outcome(r)?;
        self.hand_over(due);
        self.announcer.send(&elsewhere);
        Ok(ingested)
    }

    fn hand_over(&self, due: Vec<Due>) {
        if let Some(sink) = &self.due
            && !due.is_empty()
        {
            let _ = sink.send(due);
        }
    }

    /// Records one destination's finished attempts, fenced by this node's lease on it.
    /// `awaited`: the destination waits for this commit before its next attempt (FIFO), so
    /// it is not held back to share a commit with later outcomes (`unawaited`).
    pub async fn record_outcomes(
        &self,
        records: Vec<AttemptRecord>,
        awaited: bool,
    ) -> Result<(), WriteError> {
        self.open()?;
        let mut by_dest: Vec<(Arc<str>, Vec<AttemptRecord>)> = Vec::new();
        for r in records {
            match by_dest.iter_mut().find(|(d, _)| *d == r.subscription) {
                Some((_, v)) => v.push(r),
                None => by_dest.push((r.subscription.clone(), vec![r])),
            }
        }
        for (dest, records) in by_dest {
            let Some(epoch) = self.shared.leases.epoch(&dest) else {
                return Err(WriteError::Storage(format!(
                    "this node no longer holds destination {dest}"
                )));
            };
            let (reply, rx) = oneshot::channel();
            queue(
                &self.outcomes,
                Cmd::Record(Record {
                    destination: dest.clone(),
                    epoch,
                    records,
                    awaited,
                    queued: tokio::time::Instant::now(),
                    reply,
                }),
            )?;
            let r = rx.await.map_err(|_| WriteError::Stopped)?;
            match self.outcome(r)? {
                Recorded::Committed => {}
                Recorded::Fenced => {
                    self.shared.leases.lost(&dest);
                    return Err(WriteError::Storage(format!(
                        "the lease on destination {dest} moved to another node; its outcomes                          were not recorded here"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Moves a scheduled delivery's due time without spending an attempt.
    pub async fn reschedule(
        &self,
        delivery: DeliveryId,
        subscription: Arc<str>,
        at: Micros,
    ) -> Result<(), WriteError> {
        self.open()?;
        let r = async {
            let c = self.shared.pool.get().await?;
            let row = c
                .query_opt(
                    "UPDATE deliveries SET next_attempt_at = $2, updated_at = $3
                     WHERE id = $1 AND next_attempt_at IS NOT NULL
                     RETURNING attempts, priority",
                    &[
                        &i64::try_from(delivery).unwrap_or(i64::MAX),
                        &at,
                        &crate::clock::now_micros(),
                    ],
                )
                .await?;
            Ok::<_, PgWriteError>(row.map(|r| (r.get::<_, i32>(0), r.get::<_, i16>(1))))
        }
        .await;
        if let Some((attempts, prio)) = self.outcome(r)? {
            self.hand_over(vec![Due {
                at,
                delivery,
                subscription,
                event: None,
                attempts: u32::try_from(attempts).unwrap_or(0),
                priority: super::reads::priority(prio),
                operator: false,
            }]);
        }
        Ok(())
    }

    /// Persists a subscription's switch; a switch starts the failure count afresh.
    pub async fn set_subscription_state(
        &self,
        id: String,
        state: SubscriptionState,
    ) -> Result<(), WriteError> {
        self.open()?;
        let r = async {
            let c = self.shared.pool.get().await?;
            c.execute(
                "INSERT INTO subscription_state (id, enabled, reason, changed_at, failing_since)
                 VALUES ($1, $2, $3, $4, NULL)
                 ON CONFLICT (id) DO UPDATE SET enabled = excluded.enabled,
                     reason = excluded.reason, changed_at = excluded.changed_at,
                     failing_since = NULL",
                &[&id, &state.enabled, &state.reason, &state.changed_at],
            )
            .await?;
            super::notify::subscriptions_changed(&**c, &id).await?;
            Ok(())
        }
        .await;
        self.outcome(r)
    }

    /// Proves the database answers.
    pub async fn probe(&self) -> Result<(), WriteError> {
        let r = async {
            let c = self.shared.pool.get().await?;
            c.execute("SELECT 1", &[]).await?;
            Ok(())
        }
        .await;
        self.outcome(r)
    }

    pub async fn retry_deliveries(
        &self,
        ids: Vec<DeliveryId>,
        only: Option<DeliveryStatus>,
    ) -> Result<Vec<RetryOutcome>, WriteError> {
        self.open()?;
        let r = async {
            let mut c = self.shared.pool.get().await?;
            super::operator::retry_deliveries(&mut c, &ids, only).await
        }
        .await;
        self.outcome(r)
    }

    pub async fn cancel_deliveries(
        &self,
        ids: Vec<DeliveryId>,
        reason: Option<String>,
    ) -> Result<Vec<CancelOutcome>, WriteError> {
        self.open()?;
        let r = async {
            let mut c = self.shared.pool.get().await?;
            super::operator::cancel_deliveries(&mut c, &ids, reason.as_deref()).await
        }
        .await;
        self.outcome(r)
    }

    pub async fn create_deliveries(
        &self,
        items: Vec<(Seq, Arc<str>)>,
        origin: Origin,
    ) -> Result<u32, WriteError> {
        self.open()?;
        let r = async {
            let mut c = self.shared.pool.get().await?;
            let items: Vec<(Seq, &str)> = items.iter().map(|(s, d)| (*s, &**d)).collect();
            super::operator::create_deliveries(&mut c, &items, origin).await
        }
        .await;
        Ok(u32::try_from(self.outcome(r)?).unwrap_or(u32::MAX))
    }

    pub async fn put_subscription(
        &self,
        id: String,
        record: &SubscriptionRecord,
    ) -> Result<(), WriteError> {
        self.open()?;
        let json = serde_json::to_string(record).map_err(|e| WriteError::Storage(e.to_string()))?;
        let r = async {
            let c = self.shared.pool.get().await?;
            c.execute(
                "INSERT INTO subscriptions (id, record) VALUES ($1, $2::text::jsonb)
                 ON CONFLICT (id) DO UPDATE SET record = excluded.record",
                &[&id, &json],
            )
            .await?;
            super::notify::subscriptions_changed(&**c, &id).await?;
            Ok(())
        }
        .await;
        self.outcome(r)
    }

    /// Asks every node to re-read its config file (best effort: a node that misses it
    /// reloads on its own SIGHUP or API call).
    pub async fn announce_reload(&self) {
        let r = async {
            let c = self.shared.pool.get().await?;
            c.execute(
                "SELECT pg_notify($1, $2)",
                &[&super::notify::RELOAD, &&*self.shared.node],
            )
            .await?;
            Ok::<_, PgWriteError>(())
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot ask the other nodes to reload");
        }
    }

    pub async fn delete_subscription(&self, id: String) -> Result<bool, WriteError> {
        self.open()?;
        let r = async {
            let mut c = self.shared.pool.get().await?;
            let tx = c.transaction().await?;
            let n = tx
                .execute("DELETE FROM subscriptions WHERE id = $1", &[&id])
                .await?;
            tx.execute("DELETE FROM subscription_state WHERE id = $1", &[&id])
                .await?;
            super::notify::subscriptions_changed(&*tx, &id).await?;
            tx.commit().await?;
            Ok(n > 0)
        }
        .await;
        self.outcome(r)
    }
}

/// What one group commit did.
#[derive(Default)]
struct Committed {
    /// Each event's outcome, in order.
    out: Vec<Published>,
    /// Deliveries made or rescheduled for destinations this node holds.
    due: Vec<Due>,
    /// Deliveries made for destinations held elsewhere, to announce.
    elsewhere: Vec<Work>,
    /// The destinations whose outcomes were fenced off, with the epochs they came under.
    fenced: Vec<(String, i64)>,
}

/// One group commit: the publishes (events not stored yet, duplicates skipped, their
/// deliveries and their batches), or the attempt outcomes of the destinations still held
/// under their epochs; each task is given one kind.
async fn commit(
    client: &mut deadpool_postgres::Object,
    batch: &[Publish],
    records: &[Record],
    shared: &Shared,
) -> Result<Committed, PgWriteError> {
    let mut due = Vec::new();
    let fenced = if records.is_empty() {
        Vec::new()
    } else {
        let groups: Vec<(&str, i64, &[AttemptRecord])> = records
            .iter()
            .map(|r| (&*r.destination, r.epoch, r.records.as_slice()))
            .collect();
        record_outcomes(client, &shared.node, &groups, &mut due).await?
    };
    if batch.is_empty() {
        return Ok(Committed {
            due,
            fenced,
            ..Committed::default()
        });
    }
    let events: Vec<(&NewEvent, Option<&str>)> = batch
        .iter()
        .flat_map(|p| p.events.iter().map(|e| (e, p.batch.as_deref())))
        .collect();
    let parts = segments(&events);
    // With no batch to record and no event id or key repeated: one statement, which commits
    // by itself.
    if batch.iter().all(|p| p.batch.is_none()) && parts.len() <= 1 {
        let (out, made, elsewhere) = insert_events(&*client, &events, &parts, None, shared).await?;
        due.extend(made);
        return Ok(Committed {
            out,
            due,
            elsewhere,
            fenced,
        });
    }
    let tx = client.transaction().await?;
    let (out, made, elsewhere) = insert_events(&tx, &events, &parts, None, shared).await?;
    due.extend(made);
    // Each batch keeps the seqs of its events, new or duplicate, sorted.
    let mut at = 0;
    for p in batch {
        let mine = out.get(at..at + p.events.len()).unwrap_or_default();
        at += p.events.len();
        if let Some(id) = &p.batch {
            let mut seqs: Vec<i64> = mine
                .iter()
                .map(|o| match o {
                    Published::Created { seq, .. } | Published::Duplicate { seq, .. } => {
                        i64::try_from(*seq).unwrap_or(i64::MAX)
                    }
                })
                .collect();
            seqs.sort_unstable();
            seqs.dedup();
            tx.execute(
                "INSERT INTO batches (id, created_at, seqs) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO NOTHING",
                &[id, &crate::clock::now_micros(), &seqs],
            )
            .await?;
        }
    }
    tx.commit().await?;
    Ok(Committed {
        out,
        due,
        elsewhere,
        fenced,
    })
}

/// The statement that stores one segment of events (no id or key twice) with their
/// deliveries, in one round trip. `x` lists the events in the order given, so their seqs
/// follow it; a conflicting event (its id or key already stored) is skipped, and with it its
/// deliveries, which are made in the events' order (so their ids follow it too), from the
/// events just stored (no foreign key checks them: see migration 3). It notifies no one:
/// the deliveries for destinations held elsewhere are announced after the commit (see
/// `notify`). The rows: `0, seq, id` per event stored; `1, delivery, event seq, destination,
/// priority` per delivery made.
const INSERT_EVENTS: &str = "
    WITH x AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::smallint[], $7::text[], $8::text[])
             WITH ORDINALITY AS x(id, t, s, d, k, p, b, c, ord)
    ), e AS (
        INSERT INTO events (id, event_type, source, data, received_at, idempotency_key,
                            priority, receipt, batch, callback)
        SELECT id, t, s, d, $9::bigint, k, p, $10::bigint, b, c::jsonb FROM x ORDER BY ord
        ON CONFLICT DO NOTHING
        RETURNING seq, id
    ), d AS (
        INSERT INTO deliveries (event_seq, event_id, event_type, subscription, status,
                                attempts, next_attempt_at, created_at, updated_at,
                                origin, priority)
        SELECT e.seq, x.id, x.t, y.sub, 0, 0, $9::bigint, $9::bigint, $9::bigint, 0, x.p
        FROM unnest($11::bigint[], $12::text[]) WITH ORDINALITY AS y(ord, sub, n)
        JOIN x ON x.ord = y.ord
        JOIN e ON e.id = x.id
        ORDER BY y.n
        RETURNING id, event_seq, subscription, priority
    )
    SELECT 0::smallint, seq, NULL::bigint, id, NULL::smallint FROM e
    UNION ALL
    SELECT 1::smallint, id, event_seq, subscription, priority FROM d";

/// The events split, in order, into runs in which no event id and no idempotency key comes
/// twice: one `INSERT_EVENTS` each, so that a repeat is judged against the stored first one.
fn segments(events: &[(&NewEvent, Option<&str>)]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut ids = std::collections::HashSet::new();
    let mut keys = std::collections::HashSet::new();
    for (i, (e, _)) in events.iter().enumerate() {
        let key = e.idempotency_key.as_deref();
        let repeat = ids.contains(e.id.as_str()) || key.is_some_and(|k| keys.contains(k));
        if repeat {
            out.push(start..i);
            start = i;
            ids.clear();
            keys.clear();
        }
        ids.insert(e.id.as_str());
        if let Some(k) = key {
            keys.insert(k);
        }
    }
    if start < events.len() {
        out.push(start..events.len());
    }
    out
}

/// Writes events (those not stored yet) with their deliveries, and answers each event's
/// outcome in order, the deliveries made for destinations this node holds, and the work
/// made for destinations held elsewhere (to announce once the transaction has committed).
/// `receipt` names the inbound receipt the events came from; `parts` are the events'
/// `segments`. On a connection outside a transaction, with one segment, this is one
/// statement that commits by itself.
async fn insert_events(
    c: &impl deadpool_postgres::GenericClient,
    events: &[(&NewEvent, Option<&str>)],
    parts: &[std::ops::Range<usize>],
    receipt: Option<i64>,
    shared: &Shared,
) -> Result<(Vec<Published>, Vec<Due>, Vec<Work>), PgWriteError> {
    let now = crate::clock::now_micros();
    let mut out = Vec::with_capacity(events.len());
    let mut due = Vec::new();
    let mut elsewhere: Vec<Work> = Vec::new();
    let st = c.prepare_cached(INSERT_EVENTS).await?;
    for part in parts {
        let Some(seg) = events.get(part.clone()) else {
            continue;
        };
        let ids: Vec<&str> = seg.iter().map(|(e, _)| e.id.as_str()).collect();
        let types: Vec<&str> = seg.iter().map(|(e, _)| e.event_type.as_str()).collect();
        let sources: Vec<Option<&str>> = seg.iter().map(|(e, _)| e.source.as_deref()).collect();
        let data: Vec<&str> = seg.iter().map(|(e, _)| e.data.as_str()).collect();
        let keys: Vec<Option<&str>> = seg
            .iter()
            .map(|(e, _)| e.idempotency_key.as_deref())
            .collect();
        let priorities: Vec<i16> = seg
            .iter()
            .map(|(e, _)| i16::from(e.priority.rank()))
            .collect();
        let batches: Vec<Option<&str>> = seg.iter().map(|(_, b)| *b).collect();
        let callbacks: Vec<Option<String>> = seg
            .iter()
            .map(|(e, _)| e.callback.as_ref().map(serde_json::to_string).transpose())
            .collect::<Result<_, _>>()
            .map_err(|e| PgWriteError::Db(e.to_string()))?;
        // Each delivery names its event by ordinal (from 1, as `WITH ORDINALITY` counts).
        let (mut d_ord, mut d_sub) = (Vec::new(), Vec::new());
        for (i, (e, _)) in seg.iter().enumerate() {
            for s in &e.subscriptions {
                d_ord.push(i64::try_from(i + 1).unwrap_or(i64::MAX));
                d_sub.push(&**s);
            }
        }
        let rows = c
            .query(
                &st,
                &[
                    &ids,
                    &types,
                    &sources,
                    &data,
                    &keys,
                    &priorities,
                    &batches,
                    &callbacks,
                    &now,
                    &receipt,
                    &d_ord,
                    &d_sub,
                ],
            )
            .await?;
        // Each event's seq if it was stored (ids are unique within the segment), and the
        // stored events by seq, with the copy made for this node's scheduler.
        let at: std::collections::HashMap<&str, usize> =
            ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut seqs: Vec<Option<Seq>> = vec![None; seg.len()];
        let mut by_seq: std::collections::HashMap<i64, (usize, Option<Arc<Event>>)> =
            std::collections::HashMap::new();
        let (mut stored, mut made) = (Vec::new(), Vec::new());
        for r in &rows {
            match col::<i16>(r, 0)? {
                0 => stored.push(r),
                1 => made.push(r),
                _ => {}
            }
        }
        for r in stored {
            let seq: i64 = col(r, 1)?;
            if let Some(&i) = at.get(col::<&str>(r, 3)?)
                && let Some(slot) = seqs.get_mut(i)
            {
                *slot = Some(u64::try_from(seq).unwrap_or(0));
                by_seq.insert(seq, (i, None));
            }
        }
        // Deliveries for the destinations held here go to this node's scheduler, each with
        // its event at hand (one copy per event); the others are work to announce.
        // Per destination: `None` if held here, else where its work is in `elsewhere`.
        let mut placed: std::collections::HashMap<&str, Option<usize>> =
            std::collections::HashMap::new();
        for r in made {
            let seq: i64 = col(r, 2)?;
            let sub: &str = col(r, 3)?;
            let place = *placed.entry(sub).or_insert_with(|| {
                (!shared.leases.holds(sub)).then(|| {
                    elsewhere.push(Work {
                        destination: sub.to_string(),
                        at: now,
                        deliveries: Vec::new(),
                    });
                    elsewhere.len() - 1
                })
            });
            if let Some(i) = place {
                let delivery = u64::try_from(col::<i64>(r, 1)?).unwrap_or(0);
                if let Some(w) = elsewhere.get_mut(i) {
                    w.deliveries.push((delivery, col(r, 4)?));
                }
                continue;
            }
            let Some((i, event)) = by_seq.get_mut(&seq) else {
                continue;
            };
            let Some((e, b)) = seg.get(*i) else {
                continue;
            };
            let Some(subscription) = e.subscriptions.iter().find(|s| &***s == sub) else {
                continue;
            };
            let event = event.get_or_insert_with(|| {
                Arc::new(Event {
                    id: e.id.clone(),
                    event_type: e.event_type.clone(),
                    source: e.source.clone(),
                    data: e.data.clone(),
                    received_at: now,
                    idempotency_key: e.idempotency_key.clone(),
                    receipt: receipt.and_then(|r| u64::try_from(r).ok()),
                    priority: e.priority,
                    batch: b.map(str::to_string),
                    callback: e.callback.clone(),
                })
            });
            due.push(Due {
                at: now,
                delivery: u64::try_from(col::<i64>(r, 1)?).unwrap_or(0),
                subscription: subscription.clone(),
                event: Some(event.clone()),
                attempts: 0,
                priority: super::reads::priority(col(r, 4)?),
                operator: false,
            });
        }
        // Duplicates answer the event already stored (by id, or by idempotency key).
        for ((e, _), seq) in seg.iter().zip(seqs) {
            match seq {
                Some(seq) => out.push(Published::Created {
                    seq,
                    id: e.id.clone(),
                    deliveries: u32::try_from(e.subscriptions.len()).unwrap_or(0),
                }),
                None => out.push(duplicate(c, e).await?),
            }
        }
    }
    for w in &mut elsewhere {
        w.deliveries.sort_unstable();
    }
    Ok((out, due, elsewhere))
}

/// The stored event a skipped one duplicates, with its delivery count.
async fn duplicate(
    c: &impl deadpool_postgres::GenericClient,
    e: &NewEvent,
) -> Result<Published, PgWriteError> {
    let sql = format!(
        "SELECT {}, (SELECT count(*) FROM deliveries d WHERE d.event_seq = events.seq)
         FROM events
         WHERE id = $1 OR ($2::text IS NOT NULL AND idempotency_key = $2)
         ORDER BY seq LIMIT 1",
        super::reads::EVENT_COLUMNS
    );
    // Prepared afresh, not cached: planned for these parameters (see `PgStore::query`).
    let row = c.query(sql.as_str(), &[&e.id, &e.idempotency_key]).await?;
    let Some(row) = row.first() else {
        return Err(PgWriteError::Db(format!(
            "event {} was neither stored nor found",
            e.id
        )));
    };
    let (seq, event) = super::reads::event_row(row).map_err(|e| PgWriteError::Db(e.to_string()))?;
    let deliveries: i64 = row.get(11);
    Ok(Published::Duplicate {
        seq,
        event: Box::new(event),
        deliveries: u32::try_from(deliveries).unwrap_or(u32::MAX),
    })
}

/// What recording a destination's outcomes came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Every outcome is committed.
    Committed,
    /// The node no longer holds the destination's lease under that epoch: nothing was
    /// written, and the node must drop the destination.
    Fenced,
}

/// Records a destination's attempt outcomes in one transaction, fenced by its lease: the
/// transaction checks (and share-locks) that `node` still holds `destination` under `epoch`,
/// so a node that lost its lease — a pause, a partition — writes nothing. As on the embedded
/// backend, each attempt is appended and its delivery moves on (succeeded, retrying at its
/// next time, or dead) unless it was made terminal meanwhile (cancelled while in flight):
/// then only the attempt is kept. The writer does the same for many destinations in its
/// group commits.
pub async fn record_attempts(
    client: &mut deadpool_postgres::Object,
    (destination, node, epoch): (&str, &str, i64),
    records: &[AttemptRecord],
) -> Result<Recorded, PgWriteError> {
    let fenced = record_outcomes(
        client,
        node,
        &[(destination, epoch, records)],
        &mut Vec::new(),
    )
    .await?;
    Ok(if fenced.is_empty() {
        Recorded::Committed
    } else {
        Recorded::Fenced
    })
}

/// The statement that records attempt outcomes, in a transaction of its own (one round
/// trip). `held` share-locks the leases `$17` still holds under the epochs given (a takeover
/// waits for this transaction); only the outcomes given under those leases are written. Each
/// delivery moves on (locked by the UPDATE against a concurrent operator), its attempt is
/// appended under the number the UPDATE gave it (from the UPDATE's own rows: a join of two
/// CTEs would be planned as a nested loop, since a prepared statement's generic plan counts
/// on few rows, and cost the square of the batch), and the destinations' failure streaks are
/// kept as the embedded backend keeps them. The commit does not wait for the WAL flush
/// (`cfg`): outcomes are not acknowledged to anyone; if the database server itself crashes
/// before the flush (never when a dispatchd node dies), the last outcomes are lost and those
/// deliveries are attempted again: at-least-once, as promised. The next flush (the next
/// publish's commit, or the WAL writer within 200 ms) makes them durable. The leases are
/// locked in the order `leases::balance` renews them in, so the two cannot deadlock. The
/// rows: `0, destination, epoch` per lease held; `1, destination, delivery, attempts, next attempt,
/// priority` per delivery to retry, for this node's scheduler; one row that makes `cfg` run.
const RECORD_OUTCOMES: &str = "
    WITH cfg AS (
        SELECT set_config('synchronous_commit', 'off', true) AS v
    ), held AS (
        SELECT l.destination, l.epoch FROM destination_leases l
        JOIN unnest($15::text[], $16::bigint[]) AS g(d, e)
          ON l.destination = g.d AND l.epoch = g.e
        WHERE l.owner = $17 AND l.expires_at >= $14
        ORDER BY l.destination
        FOR SHARE OF l
    ), r AS (
        SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::int[],
                             $5::text[], $6::text[], $7::text[], $8::smallint[],
                             $9::bigint[], $18::text[], $24::bigint[])
            AS x(id, started, dur, code, err, body, summary, kind, next_at, dest, epoch)
        WHERE (x.dest, x.epoch) IN (SELECT destination, epoch FROM held)
    ), moved AS (
        UPDATE deliveries d SET
            attempts = d.attempts + 1,
            status = CASE WHEN d.status = ANY($10::smallint[]) THEN d.status
                          WHEN r.kind = 0 THEN $11::smallint
                          WHEN r.kind = 1 THEN $12::smallint
                          ELSE $13::smallint END,
            next_attempt_at = CASE WHEN d.status = ANY($10::smallint[]) THEN NULL
                                   WHEN r.kind = 1 THEN r.next_at ELSE NULL END,
            last_error = CASE WHEN d.status = ANY($10::smallint[]) THEN d.last_error
                              ELSE r.summary END,
            updated_at = $14,
            dead_at = CASE WHEN NOT d.status = ANY($10::smallint[]) AND r.kind = 2
                           THEN $14 ELSE d.dead_at END
        FROM r WHERE d.id = r.id
        RETURNING d.id, d.attempts, d.next_attempt_at, d.priority, d.subscription,
                  r.started, r.dur, r.code, r.err, r.body
    ), appended AS (
        INSERT INTO attempts (delivery, n, started_at, duration_us, status_code, error,
                              response_body)
        SELECT id, attempts, started, dur, code, err, body FROM moved
    ), ended AS (
        UPDATE subscription_state SET failing_since = NULL
        FROM unnest($19::text[], $25::bigint[]) AS s(id, epoch)
        WHERE subscription_state.id = s.id AND subscription_state.failing_since IS NOT NULL
          AND (s.id, s.epoch) IN (SELECT destination, epoch FROM held)
    ), restarted AS (
        INSERT INTO subscription_state (id, failing_since)
        SELECT s.id, s.at FROM unnest($20::text[], $21::bigint[], $26::bigint[]) AS s(id, at, epoch)
        WHERE (s.id, s.epoch) IN (SELECT destination, epoch FROM held)
        ON CONFLICT (id) DO UPDATE SET failing_since = excluded.failing_since
    ), failing AS (
        INSERT INTO subscription_state (id, failing_since)
        SELECT s.id, s.at FROM unnest($22::text[], $23::bigint[], $27::bigint[]) AS s(id, at, epoch)
        WHERE (s.id, s.epoch) IN (SELECT destination, epoch FROM held)
        ON CONFLICT (id) DO UPDATE
        SET failing_since = COALESCE(subscription_state.failing_since, excluded.failing_since)
    )
    SELECT 0::smallint, destination, epoch, NULL::int, NULL::bigint, NULL::smallint
    FROM held
    UNION ALL
    SELECT 1::smallint, subscription, id, attempts, next_attempt_at, priority FROM moved
    WHERE next_attempt_at IS NOT NULL
    UNION ALL
    SELECT 2::smallint, v, NULL, NULL, NULL, NULL FROM cfg";

/// Records the outcomes of the destinations `node` still holds under the epochs given, in one
/// statement that commits by itself (`RECORD_OUTCOMES`, prepared on the connection: see
/// `REPLAN_EVERY`), and answers the destinations and epochs fenced off (nothing of theirs is
/// written). Deliveries to retry are added to `due`. Each destination's records may come in
/// several groups (several runs of attempts), in the order they were made.
pub async fn record_outcomes(
    c: &deadpool_postgres::Object,
    node: &str,
    groups: &[(&str, i64, &[AttemptRecord])],
    due: &mut Vec<Due>,
) -> Result<Vec<(String, i64)>, PgWriteError> {
    use crate::storage::writer::Next;
    let now = crate::clock::now_micros();
    let dests: Vec<&str> = groups.iter().map(|g| g.0).collect();
    let epochs: Vec<i64> = groups.iter().map(|g| g.1).collect();
    let mut ids = Vec::new();
    let (mut started, mut dur, mut code, mut err, mut body) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut summary, mut kind, mut next_at, mut dest, mut epoch) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (d, e, records) in groups {
        for r in records.iter() {
            let a = &r.attempt;
            ids.push(i64::try_from(r.delivery).unwrap_or(i64::MAX));
            started.push(a.started_at);
            dur.push(i64::try_from(a.duration_us).unwrap_or(i64::MAX));
            code.push(a.status_code.map(i32::from));
            err.push(a.error.as_deref());
            body.push(a.response_body.as_str());
            summary.push(r.error.as_deref());
            let (k, at): (i16, Option<i64>) = match r.next {
                Next::Succeeded => (0, None),
                Next::Retry { at } => (1, Some(at)),
                Next::Dead => (2, None),
            };
            kind.push(k);
            next_at.push(at);
            dest.push(*d);
            epoch.push(*e);
        }
    }
    use DeliveryStatus as S;
    let terminal: Vec<i16> = [S::Succeeded, S::Dead, S::Cancelled]
        .iter()
        .map(|s| i16::from(s.code()))
        .collect();
    // Auto-disable's clock, kept as the embedded backend keeps it, from the records given
    // under each destination's newest epoch here (an older one is fenced off for sure; the
    // statement skips the newest too if it is). One streak per destination, however its
    // records are spread over the group: the statement may change a destination's row once.
    let mut newest: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for (d, e, _) in groups {
        let n = newest.entry(*d).or_insert(*e);
        *n = (*n).max(*e);
    }
    let mut records: Vec<&AttemptRecord> = groups
        .iter()
        .filter(|(d, e, _)| newest.get(d) == Some(e))
        .flat_map(|g| g.2.iter())
        .collect();
    // Stable: each destination's records keep the order they came in.
    records.sort_by(|a, b| a.subscription.cmp(&b.subscription));
    let (mut ended, mut restarted, mut restarted_at, mut failing, mut failing_at) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ended_e, mut restarted_e, mut failing_e) = (Vec::new(), Vec::new(), Vec::new());
    for (sub, streak) in crate::storage::embedded::writer::streaks(&records) {
        use crate::storage::embedded::writer::Streak;
        let epoch = newest.get(&*sub).copied().unwrap_or(0);
        match streak {
            Streak::Ended => {
                ended.push(sub.to_string());
                ended_e.push(epoch);
            }
            Streak::Restarted(t) => {
                restarted.push(sub.to_string());
                restarted_at.push(t);
                restarted_e.push(epoch);
            }
            Streak::Failing(t) => {
                failing.push(sub.to_string());
                failing_at.push(t);
                failing_e.push(epoch);
            }
        }
    }
    let (succeeded, retrying, dead) = (
        i16::from(S::Succeeded.code()),
        i16::from(S::Retrying.code()),
        i16::from(S::Dead.code()),
    );
    let st = c.prepare_cached(RECORD_OUTCOMES).await?;
    let rows = c
        .query(
            &st,
            &[
                &ids,
                &started,
                &dur,
                &code,
                &err,
                &body,
                &summary,
                &kind,
                &next_at,
                &terminal,
                &succeeded,
                &retrying,
                &dead,
                &now,
                &dests,
                &epochs,
                &node,
                &dest,
                &ended,
                &restarted,
                &restarted_at,
                &failing,
                &failing_at,
                &epoch,
                &ended_e,
                &restarted_e,
                &failing_e,
            ],
        )
        .await?;
    let mut held = std::collections::HashSet::new();
    let mut names = std::collections::HashMap::new();
    for r in &rows {
        match col::<i16>(r, 0)? {
            0 => {
                held.insert((col::<String>(r, 1)?, col::<i64>(r, 2)?));
            }
            1 => due.push(Due {
                at: col(r, 4)?,
                delivery: u64::try_from(col::<i64>(r, 2)?).unwrap_or(0),
                subscription: crate::model::intern(&mut names, col(r, 1)?),
                event: None,
                attempts: u32::try_from(col::<i32>(r, 3)?).unwrap_or(0),
                priority: super::reads::priority(col(r, 5)?),
                operator: false,
            }),
            _ => {}
        }
    }
    let mut fenced: Vec<(String, i64)> = groups
        .iter()
        .map(|(d, e, _)| (d.to_string(), *e))
        .filter(|g| !held.contains(g))
        .collect();
    fenced.dedup();
    Ok(fenced)
}

/// Stores an inbound provider request as a receipt with the event made from it (and its
/// deliveries), in one transaction, unless the source has seen it: by the provider's
/// delivery id, or by the body's fingerprint while the earlier receipt is within the window.
/// Two nodes receiving the same delivery at once store it once: the second's claim on the
/// de-duplication key waits for the first transaction and then finds the key taken.
pub async fn ingest(
    client: &mut deadpool_postgres::Object,
    new: NewReceipt,
    event: NewEvent,
    shared: &Shared,
) -> Result<(Ingested, Vec<Due>, Vec<Work>), PgWriteError> {
    let r = &new.receipt;
    let tx = client.transaction().await?;
    let headers = serde_json::to_string(&r.headers).map_err(|e| PgWriteError::Db(e.to_string()))?;
    let receipt_id: i64 = tx
        .query_one(
            "INSERT INTO receipts (source, method, headers, body, received_at, scheme,
                                   signed_timestamp, delivery_id, event_id, event_seq)
             VALUES ($1, $2, $3::text::jsonb, $4, $5, $6, $7, $8, $9, 0) RETURNING id",
            &[
                &r.source,
                &r.method,
                &headers,
                &r.body,
                &r.received_at,
                &r.scheme,
                &r.signed_timestamp,
                &r.delivery_id,
                &event.id,
            ],
        )
        .await?
        .get(0);
    // Claim the de-duplication keys; a key held by a receipt that still counts wins.
    let claims: Vec<(&str, Option<Micros>)> = r
        .delivery_id
        .iter()
        .map(|d| (d.as_str(), None))
        .chain(
            new.fingerprint
                .iter()
                .map(|(fp, nb)| (fp.as_str(), Some(*nb))),
        )
        .collect();
    for (key, not_before) in claims {
        let claimed = tx
            .query_opt(
                "INSERT INTO receipt_ids (source, key, receipt) VALUES ($1, $2, $3)
                 ON CONFLICT (source, key) DO UPDATE SET receipt = excluded.receipt
                 WHERE $4::bigint IS NOT NULL
                   AND (SELECT received_at FROM receipts WHERE id = receipt_ids.receipt) < $4
                 RETURNING receipt",
                &[&r.source, &key, &receipt_id, &not_before],
            )
            .await?;
        if claimed.is_none() {
            let seen = tx
                .query_one(
                    "SELECT r.id, r.event_id FROM receipt_ids k JOIN receipts r ON r.id = k.receipt
                     WHERE k.source = $1 AND k.key = $2",
                    &[&r.source, &key],
                )
                .await?;
            tx.rollback().await?;
            let id: i64 = seen.get(0);
            return Ok((
                Ingested::Duplicate {
                    receipt_id: u64::try_from(id).unwrap_or(0),
                    event_id: seen.get(1),
                },
                Vec::new(),
                Vec::new(),
            ));
        }
    }
    let events = [(&event, None)];
    let (out, due, elsewhere) =
        insert_events(&tx, &events, &segments(&events), Some(receipt_id), shared).await?;
    let Some(Published::Created {
        seq,
        id,
        deliveries,
    }) = out.into_iter().next()
    else {
        // Callers mint a fresh event id and no idempotency key: a clash is a bug.
        tx.rollback().await?;
        return Err(PgWriteError::Db(format!(
            "inbound event id {} collides with a stored event",
            event.id
        )));
    };
    let seq_db = i64::try_from(seq).unwrap_or(i64::MAX);
    tx.execute(
        "UPDATE receipts SET event_seq = $2 WHERE id = $1",
        &[&receipt_id, &seq_db],
    )
    .await?;
    tx.commit().await?;
    Ok((
        Ingested::Created {
            receipt_id: u64::try_from(receipt_id).unwrap_or(0),
            seq,
            event_id: id,
            deliveries,
        },
        due,
        elsewhere,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, key: Option<&str>) -> NewEvent {
        NewEvent {
            id: id.into(),
            idempotency_key: key.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn segments_split_before_a_repeated_id_or_key_and_keep_the_order() {
        let evs = [
            ev("a", None),
            ev("b", Some("k1")),
            ev("c", Some("k2")),
            ev("a", None),       // id again: a new segment
            ev("d", Some("k1")), // k1 is from the first segment: stays
            ev("e", Some("k1")), // key again
            ev("f", None),
        ];
        let list: Vec<(&NewEvent, Option<&str>)> = evs.iter().map(|e| (e, None)).collect();
        assert_eq!(segments(&list), vec![0..3, 3..5, 5..7]);
        let unique: Vec<(&NewEvent, Option<&str>)> = evs[..3].iter().map(|e| (e, None)).collect();
        assert_eq!(segments(&unique), vec![0..3]);
        assert!(segments(&[]).is_empty());
    }

    /// A run of `n` outcomes of `destination`; `awaited` as FIFO sends them.
    fn record(destination: &str, n: usize, awaited: bool) -> Cmd {
        let one =
            AttemptRecord::answered(1, destination, 200, crate::storage::writer::Next::Succeeded);
        Cmd::Record(Record {
            destination: destination.into(),
            epoch: 1,
            records: vec![one; n],
            awaited,
            queued: tokio::time::Instant::now(),
            reply: oneshot::channel().0,
        })
    }

    /// Commands received from a channel by `gather`, and how long it took.
    async fn gathered(cmds: Vec<Cmd>, how: Gather) -> (usize, std::time::Duration) {
        let (tx, mut rx) = mpsc::channel(MAX_BATCH);
        let mut cmds = cmds.into_iter();
        let Some(first) = cmds.next() else {
            return (0, std::time::Duration::ZERO);
        };
        for c in cmds {
            assert!(tx.try_send(c).is_ok());
        }
        let started = tokio::time::Instant::now();
        let batch = gather(first, &mut rx, how).await;
        drop(tx);
        (batch.len(), started.elapsed())
    }

    /// A publish of `n` events.
    fn publish(n: usize) -> Cmd {
        Cmd::Publish(Publish {
            events: (0..n).map(|i| ev(&format!("e{i}"), None)).collect(),
            batch: None,
            reply: oneshot::channel().0,
        })
    }

    /// The publishes' rule, expecting `expected` events.
    fn publishes(expected: usize) -> Gather {
        Gather::Publishes { expected }
    }

    #[tokio::test(start_paused = true)]
    async fn publishes_wait_for_as_many_as_lately_committed_together_a_millisecond_at_most() {
        use std::time::Duration;
        let mut company = Company::default();
        // A node that has committed nothing, or only lone publishes, never waits; a lone
        // sender's publish of many events is still one sender.
        assert_eq!(company.expected(), 0);
        for n in [1, 20, 1] {
            company.committed(&[publish(n)]);
        }
        assert_eq!(company.expected(), 1);
        assert_eq!(
            gathered(vec![publish(1)], publishes(company.expected())).await,
            (1, Duration::ZERO)
        );
        company.committed(&[publish(1), publish(2), publish(1)]);
        assert_eq!(company.expected(), 3);
        // Fewer waiting than expected: they wait, PUBLISH_LINGER from when the task is free
        // to commit, however long the oldest has waited already (through the previous
        // commit: the senders expected are those it answered)...
        assert_eq!(
            gathered(vec![publish(1), publish(2)], publishes(3)).await,
            (2, PUBLISH_LINGER)
        );
        let old = publish(1);
        tokio::time::advance(PUBLISH_LINGER).await;
        assert_eq!(
            gathered(vec![old, publish(1)], publishes(3)).await,
            (2, PUBLISH_LINGER)
        );
        // ... unless as many requests as expected are waiting, or PUBLISH_LINGER_MAX events.
        assert_eq!(
            gathered(vec![publish(1), publish(1), publish(1)], publishes(3)).await,
            (3, Duration::ZERO)
        );
        assert_eq!(
            gathered(vec![publish(PUBLISH_LINGER_MAX)], publishes(3)).await,
            (1, Duration::ZERO)
        );
        // Publishes coming while it waits join the batch, and end the wait once there are
        // as many as expected.
        let (tx, mut rx) = mpsc::channel(8);
        let late = tokio::spawn(async move {
            for _ in 0..2 {
                tokio::task::yield_now().await;
                assert!(tx.send(publish(2)).await.is_ok());
            }
            tx
        });
        let started = tokio::time::Instant::now();
        let batch = gather(publish(1), &mut rx, publishes(3)).await;
        assert_eq!((batch.len(), started.elapsed()), (3, Duration::ZERO));
        assert!(late.await.is_ok());
        // The expectation is the most of the last PUBLISH_RECENT commits, and no more than
        // PUBLISH_LINGER_MAX: a node whose senders went waits for them no longer than that.
        for _ in 0..PUBLISH_RECENT - 1 {
            company.committed(&[publish(1), publish(1)]);
        }
        assert_eq!(company.expected(), 3);
        company.committed(&[publish(1), publish(1)]);
        assert_eq!(company.expected(), 2);
        let many: Vec<Cmd> = (0..=PUBLISH_LINGER_MAX).map(|_| publish(1)).collect();
        company.committed(&many);
        assert_eq!(company.expected(), PUBLISH_LINGER_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_linger_only_while_nothing_waits_on_them_and_the_batch_is_small() {
        use std::time::Duration;
        // The publishes' rule does not hold outcomes; the outcomes' rule does not hold
        // publishes.
        assert_eq!(
            gathered(vec![record("a", 1, false)], publishes(5)).await,
            (1, Duration::ZERO)
        );
        assert_eq!(
            gathered(vec![publish(1)], Gather::Outcomes).await,
            (1, Duration::ZERO)
        );
        // Unordered outcomes wait for company, up to OUTCOME_LINGER from the oldest...
        assert_eq!(
            gathered(vec![record("a", 1, false)], Gather::Outcomes).await,
            (1, OUTCOME_LINGER)
        );
        let old = record("a", 1, false);
        tokio::time::advance(Duration::from_millis(4)).await;
        assert_eq!(
            gathered(vec![old], Gather::Outcomes).await,
            (1, Duration::from_millis(1))
        );
        // ... unless enough are waiting, or one is awaited (FIFO): then they go at once.
        let enough = vec![
            record("a", OUTCOME_LINGER_MAX - 1, false),
            record("b", 1, false),
        ];
        assert_eq!(
            gathered(enough, Gather::Outcomes).await,
            (2, Duration::ZERO)
        );
        let fifo = vec![record("a", 1, false), record("f", 1, true)];
        assert_eq!(gathered(fifo, Gather::Outcomes).await, (2, Duration::ZERO));
        assert_eq!(
            gathered(vec![record("f", 1, true)], Gather::Outcomes).await,
            (1, Duration::ZERO)
        );
        // Outcomes coming while it waits join the batch; an awaited one ends the wait.
        let (tx, mut rx) = mpsc::channel(8);
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            assert!(tx.send(record("b", 1, false)).await.is_ok());
            tokio::time::sleep(Duration::from_millis(1)).await;
            assert!(tx.send(record("f", 1, true)).await.is_ok());
            tx
        });
        let started = tokio::time::Instant::now();
        let batch = gather(record("a", 1, false), &mut rx, Gather::Outcomes).await;
        assert_eq!(
            (batch.len(), started.elapsed()),
            (3, Duration::from_millis(2))
        );
        assert!(late.await.is_ok());
    }
}

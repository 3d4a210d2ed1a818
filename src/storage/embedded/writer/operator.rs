//! Operator writes: retry, cancel, replay (new deliveries of stored events), redrive and the
//! subscriptions created over the API. They run on the writer thread like every other write,
//! so they commit in the same group as ingest and attempt outcomes.
//!
//! **Invariant:** a delivery's index rows (`deliveries_by_subscription_status`, `dead`)
//! change only through `store_delivery`, so an operator action can never leave an index
//! pointing at a status the record does not have.

use std::sync::Arc;

use redb::ReadableTable;
use tokio::sync::oneshot;

use super::{
    Due, Effects, Reply, Tables, WriteError, Writer, WriterHandle, load_delivery, store_delivery,
};
use crate::model::{Delivery, DeliveryId, DeliveryStatus, Event, Micros, Origin, Seq};
use crate::storage::StoreError;
use crate::storage::schema::{SubscriptionRecord, decode, encode, failing_key};

/// What became of one delivery an operator asked to retry.
#[derive(Debug, Clone)]
pub enum RetryOutcome {
    /// Due now; the delivery as stored after the change.
    Scheduled(Delivery),
    NotFound,
    /// Its status does not allow a retry (succeeded, or not the status a redrive asked for).
    NotAllowed(Delivery),
}

/// What became of one delivery an operator asked to cancel.
#[derive(Debug, Clone)]
pub enum CancelOutcome {
    Cancelled(Delivery),
    NotFound,
    /// Already terminal.
    NotAllowed(Delivery),
}

type ReplyTo<T> = oneshot::Sender<Result<T, WriteError>>;

/// The operator commands, carried by `Command::Operator`.
pub enum Op {
    Retry {
        ids: Vec<DeliveryId>,
        /// Only deliveries in this status move (a redrive takes dead ones only).
        only: Option<DeliveryStatus>,
        reply: ReplyTo<Vec<RetryOutcome>>,
    },
    Cancel {
        ids: Vec<DeliveryId>,
        reason: Option<String>,
        reply: ReplyTo<Vec<CancelOutcome>>,
    },
    /// New deliveries of stored events (replay): (event seq, subscription id) pairs.
    CreateDeliveries {
        items: Vec<(Seq, Arc<str>)>,
        origin: Origin,
        reply: ReplyTo<u32>,
    },
    PutSubscription {
        id: String,
        record: Vec<u8>,
        reply: ReplyTo<()>,
    },
    /// Removes an API subscription and its run-time state; answers whether it existed.
    DeleteSubscription { id: String, reply: ReplyTo<bool> },
}

impl Op {
    /// Answers the sender of a command that was never applied.
    pub(super) fn fail(self, err: WriteError) {
        match self {
            Op::Retry { reply, .. } => drop(reply.send(Err(err))),
            Op::Cancel { reply, .. } => drop(reply.send(Err(err))),
            Op::CreateDeliveries { reply, .. } => drop(reply.send(Err(err))),
            Op::PutSubscription { reply, .. } => drop(reply.send(Err(err))),
            Op::DeleteSubscription { reply, .. } => drop(reply.send(Err(err))),
        }
    }
}

/// Queues the reply for after the commit, or answers the error now and fails the batch.
fn finish<T: Send + 'static>(
    fx: &mut Effects,
    reply: ReplyTo<T>,
    result: Result<T, StoreError>,
) -> Result<(), StoreError> {
    match result {
        Ok(v) => {
            let r: Reply = Box::new(move |r| drop(reply.send(r.map(|()| v))));
            fx.replies.push(r);
            Ok(())
        }
        Err(e) => {
            drop(reply.send(Err(WriteError::Storage(e.to_string()))));
            Err(e)
        }
    }
}

impl Writer {
    pub(super) fn apply_operator(
        &mut self,
        t: &mut Tables<'_>,
        op: Op,
        fx: &mut Effects,
    ) -> Result<(), StoreError> {
        let now = self.clock.now_micros();
        match op {
            Op::Retry { ids, only, reply } => {
                let r = ids
                    .iter()
                    .map(|&id| retry_one(t, id, only, now, fx))
                    .collect();
                finish(fx, reply, r)
            }
            Op::Cancel { ids, reason, reply } => {
                let r = ids
                    .iter()
                    .map(|&id| cancel_one(t, id, reason.as_deref(), now))
                    .collect();
                finish(fx, reply, r)
            }
            Op::CreateDeliveries {
                items,
                origin,
                reply,
            } => {
                let r = self.create_deliveries(t, items, origin, fx);
                finish(fx, reply, r)
            }
            Op::PutSubscription { id, record, reply } => {
                let r = (|| {
                    let created = t
                        .subscriptions
                        .insert(id.as_str(), record.as_slice())?
                        .is_none();
                    // A new subscription starts with no failure streak, even one that an
                    // attempt of a deleted namesake recorded after its deletion.
                    if created {
                        t.meta.remove(failing_key(&id).as_str())?;
                    }
                    Ok(())
                })();
                finish(fx, reply, r)
            }
            Op::DeleteSubscription { id, reply } => {
                let r = (|| {
                    let existed = t.subscriptions.remove(id.as_str())?.is_some();
                    // Its run-time state goes with it: a new subscription under this id
                    // starts enabled and with no failure streak.
                    t.subscription_state.remove(id.as_str())?;
                    t.meta.remove(failing_key(&id).as_str())?;
                    Ok(existed)
                })();
                finish(fx, reply, r)
            }
        }
    }

    /// Creates one new delivery per (event, subscription), all due now.
    fn create_deliveries(
        &mut self,
        t: &mut Tables<'_>,
        items: Vec<(Seq, Arc<str>)>,
        origin: Origin,
        fx: &mut Effects,
    ) -> Result<u32, StoreError> {
        // Never before the last event's time, so created_at stays ordered with delivery ids
        // (the time filters of the delivery list rely on it).
        let now = self.clock.now_micros().max(self.tips.last_received_at);
        let mut made = 0u32;
        let mut current: Option<(Seq, Arc<Event>)> = None;
        for (seq, sub) in items {
            let event = match &current {
                Some((s, e)) if *s == seq => e.clone(),
                _ => {
                    let Some(v) = t.events.get(seq)? else {
                        // Removed by retention since the caller read it: nothing to replay.
                        continue;
                    };
                    let e: Arc<Event> = Arc::new(decode(v.value(), "event")?);
                    current = Some((seq, e.clone()));
                    e
                }
            };
            self.create_delivery(t, seq, &event, sub, now, origin, fx)?;
            made += 1;
        }
        Ok(made)
    }
}

/// Makes a dead, retrying, pending or cancelled delivery due now, keeping its attempt count.
fn retry_one(
    t: &mut Tables<'_>,
    id: DeliveryId,
    only: Option<DeliveryStatus>,
    now: Micros,
    fx: &mut Effects,
) -> Result<RetryOutcome, StoreError> {
    let Some(mut d) = load_delivery(t, id)? else {
        return Ok(RetryOutcome::NotFound);
    };
    let allowed = match only {
        Some(st) => d.status == st,
        None => d.status != DeliveryStatus::Succeeded,
    };
    if !allowed {
        return Ok(RetryOutcome::NotAllowed(d));
    }
    if let Some(old) = d.next_attempt_at.take() {
        t.schedule.remove((old, id))?;
    }
    let old_status = d.status;
    d.status = if d.attempts == 0 {
        DeliveryStatus::Pending
    } else {
        DeliveryStatus::Retrying
    };
    d.next_attempt_at = Some(now);
    d.updated_at = now;
    t.schedule.insert((now, id), ())?;
    store_delivery(t, id, &d, old_status)?;
    fx.due.push(Due {
        at: now,
        delivery: id,
        subscription: Arc::from(d.subscription.as_str()),
        event: None,
        attempts: d.attempts,
        priority: d.priority,
        operator: true,
    });
    Ok(RetryOutcome::Scheduled(d))
}

/// Ends a live delivery; an attempt in flight still records its outcome, but the status stays.
fn cancel_one(
    t: &mut Tables<'_>,
    id: DeliveryId,
    reason: Option<&str>,
    now: Micros,
) -> Result<CancelOutcome, StoreError> {
    let Some(mut d) = load_delivery(t, id)? else {
        return Ok(CancelOutcome::NotFound);
    };
    if d.status.is_terminal() {
        return Ok(CancelOutcome::NotAllowed(d));
    }
    if let Some(old) = d.next_attempt_at.take() {
        t.schedule.remove((old, id))?;
    }
    let old_status = d.status;
    d.status = DeliveryStatus::Cancelled;
    d.updated_at = now;
    if let Some(r) = reason {
        d.last_error = Some(r.to_string());
    }
    store_delivery(t, id, &d, old_status)?;
    Ok(CancelOutcome::Cancelled(d))
}

impl WriterHandle {
    async fn operator<T>(&self, make: impl FnOnce(ReplyTo<T>) -> Op) -> Result<T, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.submit(super::Command::Operator(make(reply)))?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }

    /// Makes deliveries due now (see `RetryOutcome`); `only` restricts it to one status.
    pub async fn retry_deliveries(
        &self,
        ids: Vec<DeliveryId>,
        only: Option<DeliveryStatus>,
    ) -> Result<Vec<RetryOutcome>, WriteError> {
        self.operator(|reply| Op::Retry { ids, only, reply }).await
    }

    /// Cancels live deliveries, optionally noting why in their `last_error`.
    pub async fn cancel_deliveries(
        &self,
        ids: Vec<DeliveryId>,
        reason: Option<String>,
    ) -> Result<Vec<CancelOutcome>, WriteError> {
        self.operator(|reply| Op::Cancel { ids, reason, reply })
            .await
    }

    /// Creates new deliveries of stored events; answers how many were made.
    pub async fn create_deliveries(
        &self,
        items: Vec<(Seq, Arc<str>)>,
        origin: Origin,
    ) -> Result<u32, WriteError> {
        self.operator(|reply| Op::CreateDeliveries {
            items,
            origin,
            reply,
        })
        .await
    }

    /// Stores an API subscription's record.
    pub async fn put_subscription(
        &self,
        id: String,
        record: &SubscriptionRecord,
    ) -> Result<(), WriteError> {
        let record = encode(record).map_err(|e| WriteError::Storage(e.to_string()))?;
        self.operator(|reply| Op::PutSubscription { id, record, reply })
            .await
    }

    /// Removes an API subscription and its state; answers whether it existed.
    pub async fn delete_subscription(&self, id: String) -> Result<bool, WriteError> {
        self.operator(|reply| Op::DeleteSubscription { id, reply })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// An API subscription record whose definition is `spec`.
    fn record(spec: &str) -> SubscriptionRecord {
        SubscriptionRecord {
            spec: spec.into(),
            secrets: Vec::new(),
            created_at: 0,
            updated_at: 0,
        }
    }

    use redb::ReadableTableMetadata;

    use super::*;

    use crate::storage::embedded::Store;
    use crate::storage::embedded::writer::{self, AttemptRecord, Next};
    use crate::storage::schema::*;

    fn open() -> (tempfile::TempDir, Store, WriterHandle) {
        let (dir, store, w, _join) = writer::testing::open(8);
        (dir, store, w)
    }

    /// Every index row agrees with the delivery records, and no row is left over.
    fn assert_indexes_consistent(store: &Store) {
        let check = || -> Result<(), StoreError> {
            let r = store.db().begin_read()?;
            let deliveries = r.open_table(DELIVERIES)?;
            let sub_status = r.open_table(DELIVERIES_BY_SUB_STATUS)?;
            let dead = r.open_table(DEAD)?;
            let schedule = r.open_table(SCHEDULE)?;
            let (mut n, mut n_dead, mut n_sched) = (0u64, 0u64, 0u64);
            for row in deliveries.iter()? {
                let (k, v) = row?;
                let id = k.value();
                let d: Delivery = decode(v.value(), "delivery")?;
                let sub = d.subscription.as_str();
                let code = d.status.code();
                assert!(
                    sub_status.get((sub, code, id))?.is_some(),
                    "{id}: sub+status index"
                );
                assert_eq!(
                    dead.get(id)?.is_some(),
                    d.status == DeliveryStatus::Dead,
                    "{id}: dead"
                );
                n_dead += u64::from(d.status == DeliveryStatus::Dead);
                if let Some(at) = d.next_attempt_at {
                    assert!(schedule.get((at, id))?.is_some(), "{id}: schedule");
                    assert!(!d.status.is_terminal(), "{id}: terminal but scheduled");
                    n_sched += 1;
                }
                n += 1;
            }
            assert_eq!(sub_status.len()?, n, "stale sub+status index rows");
            assert_eq!(dead.len()?, n_dead, "stale dead-letter rows");
            assert_eq!(schedule.len()?, n_sched, "stale schedule rows");
            Ok(())
        };
        if let Err(e) = check() {
            panic!("{e}");
        }
    }

    fn attempt(id: DeliveryId, sub: &str, next: Next) -> AttemptRecord {
        AttemptRecord::answered(id, sub, 500, next)
    }

    /// Auto-disable's clock (the failing mark) is written by the command recording the
    /// attempt that starts a streak, kept while failures go on, and removed by a success, a
    /// state switch or the subscription's deletion.
    #[tokio::test]
    async fn the_failing_mark_follows_the_attempts() {
        let (_dir, store, w) = open();
        if let Err(e) = w.publish(writer::testing::events(2, &["a", "b"])).await {
            panic!("{e}");
        }
        let retry = Next::Retry { at: i64::MAX / 2 };
        let at = |sub: &str, next: Next, t: Micros| {
            let mut r = attempt(if sub == "a" { 1 } else { 2 }, sub, next);
            r.attempt.started_at = t;
            r
        };
        let marks = || {
            let get = |sub| match store.failing_since(sub) {
                Ok(m) => m,
                Err(e) => panic!("{e}"),
            };
            (get("a"), get("b"))
        };
        // Each command, and the marks of "a" and "b" after it.
        type Marks = (Option<Micros>, Option<Micros>);
        let steps: Vec<(Vec<AttemptRecord>, Marks)> = vec![
            (vec![at("a", retry, 10)], (Some(10), None)),
            (vec![at("a", retry, 20)], (Some(10), None)),
            (vec![at("a", Next::Succeeded, 30)], (None, None)),
            (
                vec![
                    at("a", retry, 40),
                    at("a", Next::Succeeded, 50),
                    at("a", retry, 60),
                    at("a", Next::Dead, 70),
                ],
                (Some(60), None),
            ),
            (
                vec![at("b", Next::Dead, 80), at("a", Next::Succeeded, 85)],
                (None, Some(80)),
            ),
            (
                vec![at("a", retry, 90), at("b", Next::Succeeded, 95)],
                (Some(90), None),
            ),
            (vec![at("b", retry, 100)], (Some(90), Some(100))),
        ];
        for (i, (records, want)) in steps.into_iter().enumerate() {
            if let Err(e) = w.record_attempts(records).await {
                panic!("{e}");
            }
            assert_eq!(marks(), want, "after step {i}");
        }
        let state = writer::SubscriptionState {
            enabled: false,
            reason: Some("paused".into()),
            changed_at: 1,
        };
        if let Err(e) = w.set_subscription_state("b".into(), state).await {
            panic!("{e}");
        }
        assert_eq!(marks(), (Some(90), None), "after a state switch");
        if let Err(e) = w.delete_subscription("a".into()).await {
            panic!("{e}");
        }
        assert_eq!(marks(), (None, None), "after the deletion");
        // An attempt of the deleted subscription recorded late leaves a mark; a new
        // subscription under that id starts without it, and changing it keeps its streak.
        if let Err(e) = w.record_attempts(vec![at("a", retry, 110)]).await {
            panic!("{e}");
        }
        assert_eq!(marks(), (Some(110), None), "after a late attempt");
        if let Err(e) = w.put_subscription("a".into(), &record("spec 1")).await {
            panic!("{e}");
        }
        assert_eq!(marks(), (None, None), "after the creation");
        if let Err(e) = w.record_attempts(vec![at("a", retry, 120)]).await {
            panic!("{e}");
        }
        if let Err(e) = w.put_subscription("a".into(), &record("spec 2")).await {
            panic!("{e}");
        }
        assert_eq!(marks(), (Some(120), None), "after a change");
    }

    #[tokio::test]
    async fn operator_writes_keep_every_index_in_step() {
        let (_dir, store, w) = open();
        if let Err(e) = w.publish(writer::testing::events(4, &["a", "b"])).await {
            panic!("{e}");
        }
        // 1..=8: make 1, 2 dead, 3 retrying, 4 succeeded; 5..8 stay pending.
        let records = vec![
            attempt(1, "a", Next::Dead),
            attempt(2, "b", Next::Dead),
            attempt(3, "a", Next::Retry { at: i64::MAX / 2 }),
            attempt(4, "b", Next::Succeeded),
        ];
        if let Err(e) = w.record_attempts(records).await {
            panic!("{e}");
        }
        assert_indexes_consistent(&store);

        let out = match w.retry_deliveries(vec![1, 3, 4, 5, 99], None).await {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        };
        assert!(
            matches!(&out[0], RetryOutcome::Scheduled(d) if d.status == DeliveryStatus::Retrying && d.attempts == 1)
        );
        assert!(
            matches!(&out[1], RetryOutcome::Scheduled(d) if d.status == DeliveryStatus::Retrying)
        );
        assert!(
            matches!(&out[2], RetryOutcome::NotAllowed(d) if d.status == DeliveryStatus::Succeeded)
        );
        assert!(
            matches!(&out[3], RetryOutcome::Scheduled(d) if d.status == DeliveryStatus::Pending)
        );
        assert!(matches!(out[4], RetryOutcome::NotFound));
        assert_indexes_consistent(&store);

        // A redrive only takes dead ones.
        let out = match w
            .retry_deliveries(vec![2, 6], Some(DeliveryStatus::Dead))
            .await
        {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        };
        assert!(matches!(&out[0], RetryOutcome::Scheduled(_)));
        assert!(matches!(&out[1], RetryOutcome::NotAllowed(_)));
        assert_indexes_consistent(&store);

        let out = match w
            .cancel_deliveries(vec![6, 7, 4, 99], Some("why".into()))
            .await
        {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        };
        assert!(
            matches!(&out[0], CancelOutcome::Cancelled(d) if d.next_attempt_at.is_none() && d.last_error.as_deref() == Some("why"))
        );
        assert!(matches!(&out[1], CancelOutcome::Cancelled(_)));
        assert!(matches!(&out[2], CancelOutcome::NotAllowed(_)));
        assert!(matches!(out[3], CancelOutcome::NotFound));
        assert_indexes_consistent(&store);

        // An attempt finishing on a cancelled delivery is recorded; the status stays.
        if let Err(e) = w.record_attempts(vec![attempt(6, "b", Next::Dead)]).await {
            panic!("{e}");
        }
        assert!(
            matches!(store.delivery(6), Ok(Some(d)) if d.status == DeliveryStatus::Cancelled && d.attempts == 1)
        );
        assert_indexes_consistent(&store);

        // Replay: new deliveries of stored events; a missing event is skipped.
        let made = match w
            .create_deliveries(
                vec![
                    (1, Arc::from("a")),
                    (2, Arc::from("b")),
                    (99, Arc::from("a")),
                ],
                Origin::Replay,
            )
            .await
        {
            Ok(n) => n,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(made, 2);
        let replayed: BTreeSet<(String, String)> = [9, 10]
            .iter()
            .filter_map(|id| store.delivery(*id).ok().flatten())
            .filter(|d| d.origin == Origin::Replay && d.status == DeliveryStatus::Pending)
            .map(|d| (d.event_id, d.subscription))
            .collect();
        assert_eq!(
            replayed,
            [
                ("e0".to_string(), "a".to_string()),
                ("e1".into(), "b".into())
            ]
            .into_iter()
            .collect()
        );
        assert_indexes_consistent(&store);
        // Created times never go backwards with ids (the time filters rely on it).
        let times: Vec<Micros> = (1..=10)
            .filter_map(|id| store.delivery(id).ok().flatten().map(|d| d.created_at))
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");

        // API subscription records.
        if let Err(e) = w.put_subscription("s1".into(), &record("spec 1")).await {
            panic!("{e}");
        }
        let recs: Vec<(String, String)> = match store.subscription_records() {
            Ok(r) => r.into_iter().map(|(id, r)| (id, r.spec)).collect(),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(recs, vec![("s1".to_string(), "spec 1".to_string())]);
        match store.subscription_record("s1") {
            Ok(Some(r)) => assert_eq!(r.spec, "spec 1"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(w.delete_subscription("s1".into()).await, Ok(true)));
        assert!(matches!(
            w.delete_subscription("s1".into()).await,
            Ok(false)
        ));
    }
}

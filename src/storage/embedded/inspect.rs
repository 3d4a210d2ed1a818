//! Operator reads: the filtered delivery list, the dead-letter queue, a subscription's live
//! deliveries, event ranges for replay and the API subscription records.
//!
//! **Invariant:** every list walks an index keyed for its filter (plus point lookups for the
//! rest) and stops after `SCAN_BUDGET` rows, so a page costs the same with ten rows stored or
//! ten million. (A status filter without a subscription also seeks once per subscription
//! that has deliveries: see `status_prefixes`.) Time filters on deliveries become a delivery
//! id range: the writer never gives a later delivery an earlier `created_at`, so a binary
//! search over ids finds the bounds.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::Bound;

use redb::ReadableTable;

use super::schema::*;
use super::{Page, Store, StoreError, first_seq_at_or_after};
use crate::model::{Attempt, Delivery, DeliveryId, DeliveryStatus, Event, Micros, Priority, Seq};

/// Index rows one page may look at before it ends early with a cursor.
const SCAN_BUDGET: usize = 20_000;

/// Delivery list filters; `since` inclusive, `until` exclusive, both on `created_at`.
#[derive(Debug, Default, Clone)]
pub struct DeliveryFilter {
    pub status: Option<DeliveryStatus>,
    pub subscription: Option<String>,
    pub event_type: Option<String>,
    pub since: Option<Micros>,
    pub until: Option<Micros>,
    /// Checked on the record (no index): a rare priority ends pages early with a cursor.
    pub priority: Option<Priority>,
}

/// One attempt of one of an event's deliveries.
#[derive(Debug, Clone)]
pub struct EventAttempt {
    pub delivery: DeliveryId,
    pub subscription: String,
    /// The attempt's number within its delivery, from 1.
    pub n: u32,
    pub attempt: Attempt,
}

/// Where a page of an event's attempts ends: they are ordered by these, descending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct AttemptCursor {
    pub started_at: Micros,
    pub delivery: DeliveryId,
    pub n: u32,
}

/// Dead-letter filters; `since` is on the time the delivery was dead-lettered.
#[derive(Debug, Default, Clone)]
pub struct DeadFilter {
    pub subscription: Option<String>,
    pub since: Option<Micros>,
}

/// A dead letter: the delivery and when it died.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: DeliveryId,
    pub dead_at: Micros,
    pub delivery: Delivery,
}

/// Where a walk over a subscription's live deliveries resumes: (status code, delivery id).
pub type LiveCursor = (u8, DeliveryId);

/// One chunk of a subscription's live deliveries.
#[derive(Debug, Default)]
pub struct LiveChunk {
    pub items: Vec<(DeliveryId, Delivery)>,
    /// Where the next chunk starts, when there may be more.
    pub next: Option<LiveCursor>,
}

/// The statuses a delivery can be attempted from, in index order.
const LIVE: [DeliveryStatus; 3] = [
    DeliveryStatus::Pending,
    DeliveryStatus::InFlight,
    DeliveryStatus::Retrying,
];

type IdIter<'a> = Box<dyn Iterator<Item = Result<DeliveryId, StoreError>> + 'a>;

fn ids<'a, K: redb::Key + 'static>(
    range: redb::Range<'a, K, ()>,
    id: impl Fn(K::SelfType<'_>) -> DeliveryId + 'a,
) -> IdIter<'a> {
    Box::new(range.map(move |row| {
        row.map(|(k, _)| id(k.value()))
            .map_err(|e| StoreError::Db(e.into()))
    }))
}

/// Walks ids in order, keeping what `keep` makes of each, until `limit` items or
/// `SCAN_BUDGET` ids; the page's cursor is the last id walked when it stopped early.
fn scan_page<T>(
    walk: IdIter<'_>,
    limit: usize,
    mut keep: impl FnMut(DeliveryId) -> Result<Option<T>, StoreError>,
) -> Result<Page<T>, StoreError> {
    let mut items = Vec::new();
    let mut scanned = 0usize;
    for id in walk {
        let id = id?;
        scanned += 1;
        if let Some(item) = keep(id)? {
            items.push(item);
        }
        if items.len() >= limit || scanned >= SCAN_BUDGET {
            return Ok(Page {
                items,
                next: Some(id),
            });
        }
    }
    Ok(Page { items, next: None })
}

impl Store {
    /// Deliveries in id order after the cursor, filtered through the narrowest index.
    pub fn list_deliveries(
        &self,
        f: &DeliveryFilter,
        after: Option<DeliveryId>,
        limit: usize,
    ) -> Result<Page<(DeliveryId, Delivery)>, StoreError> {
        let r = self.db().begin_read()?;
        let deliveries = r.open_table(DELIVERIES)?;
        let mut lo = after.map_or(0, |a| a.saturating_add(1));
        if let Some(since) = f.since {
            lo = lo.max(first_delivery_at_or_after(&deliveries, since)?);
        }
        let hi = match f.until {
            Some(until) => first_delivery_at_or_after(&deliveries, until)?,
            None => u64::MAX,
        };
        if lo >= hi {
            return Ok(Page {
                items: Vec::new(),
                next: None,
            });
        }
        let by_type = r.open_table(DELIVERIES_BY_TYPE)?;
        let sub_status = r.open_table(DELIVERIES_BY_SUB_STATUS)?;
        let prefixes = status_prefixes(&sub_status, f.subscription.as_deref(), f.status)?;
        if let Some(t) = f.event_type.as_deref()
            && (f.subscription.is_some() || f.status.is_some())
        {
            return leapfrog(
                t,
                prefixes.as_deref().unwrap_or_default(),
                (lo, hi),
                limit,
                f.priority,
                &deliveries,
                &by_type,
                &sub_status,
            );
        }
        // One index answers every filter.
        let (walk, type_checked): (IdIter<'_>, bool) = match (&prefixes, f.event_type.as_deref()) {
            (Some(prefixes), _) => {
                let mut walks = Vec::with_capacity(prefixes.len());
                for (s, code) in prefixes {
                    walks.push(ids(
                        sub_status.range((s.as_str(), *code, lo)..(s.as_str(), *code, hi))?,
                        |k| k.2,
                    ));
                }
                (merged(walks), false)
            }
            (None, Some(t)) => (ids(by_type.range((t, lo)..(t, hi))?, |k| k.1), true),
            (None, None) => (
                Box::new(deliveries.range(lo..hi)?.map(|row| {
                    row.map(|(k, _)| k.value())
                        .map_err(|e| StoreError::Db(e.into()))
                })),
                true,
            ),
        };
        scan_page(walk, limit, |id| {
            let wanted = match f.event_type.as_deref() {
                Some(t) if !type_checked => by_type.get((t, id))?.is_some(),
                _ => true,
            };
            match deliveries.get(id)? {
                Some(v) if wanted => {
                    let d: Delivery = decode(v.value(), "delivery")?;
                    Ok(f.priority
                        .is_none_or(|p| d.priority == p)
                        .then_some((id, d)))
                }
                _ => Ok(None),
            }
        })
    }

    /// Dead letters in delivery id order after the cursor.
    pub fn list_dead_letters(
        &self,
        f: &DeadFilter,
        after: Option<DeliveryId>,
        limit: usize,
    ) -> Result<Page<DeadLetter>, StoreError> {
        let r = self.db().begin_read()?;
        let deliveries = r.open_table(DELIVERIES)?;
        let dead = r.open_table(DEAD)?;
        let sub_status = r.open_table(DELIVERIES_BY_SUB_STATUS)?;
        let lo = after.map_or(0, |a| a.saturating_add(1));
        let code = DeliveryStatus::Dead.code();
        let walk: IdIter<'_> = match f.subscription.as_deref() {
            Some(s) => ids(
                sub_status.range((s, code, lo)..=(s, code, u64::MAX))?,
                |k| k.2,
            ),
            None => Box::new(dead.range(lo..)?.map(|row| {
                row.map(|(k, _)| k.value())
                    .map_err(|e| StoreError::Db(e.into()))
            })),
        };
        scan_page(walk, limit, |id| {
            let Some(dead_at) = dead.get(id)?.map(|g| g.value()) else {
                return Ok(None);
            };
            if f.since.is_none_or(|s| dead_at >= s)
                && let Some(v) = deliveries.get(id)?
            {
                return Ok(Some(DeadLetter {
                    id,
                    dead_at,
                    delivery: decode(v.value(), "delivery")?,
                }));
            }
            Ok(None)
        })
    }

    /// The oldest delivery of `subscription` still to be attempted (pending, in flight or
    /// retrying): the head of a FIFO subscription.
    pub fn first_live_delivery(
        &self,
        subscription: &str,
    ) -> Result<Option<DeliveryId>, StoreError> {
        let r = self.db().begin_read()?;
        let sub_status = r.open_table(DELIVERIES_BY_SUB_STATUS)?;
        let mut first: Option<DeliveryId> = None;
        for st in LIVE {
            let code = st.code();
            if let Some(row) = sub_status
                .range((subscription, code, 0)..=(subscription, code, u64::MAX))?
                .next()
            {
                let id = row?.0.value().2;
                first = Some(first.map_or(id, |f| f.min(id)));
            }
        }
        Ok(first)
    }

    /// A subscription's deliveries that are still to be attempted (pending, in flight,
    /// retrying), after the cursor; the cursor of the next chunk when there may be more.
    pub fn live_deliveries(
        &self,
        subscription: &str,
        after: Option<LiveCursor>,
        limit: usize,
    ) -> Result<LiveChunk, StoreError> {
        let r = self.db().begin_read()?;
        let deliveries = r.open_table(DELIVERIES)?;
        let sub_status = r.open_table(DELIVERIES_BY_SUB_STATUS)?;
        let mut out = Vec::new();
        for st in LIVE {
            let code = st.code();
            let lo = match after {
                Some((c, _)) if c > code => continue,
                Some((c, id)) if c == code => id.saturating_add(1),
                _ => 0,
            };
            for row in
                sub_status.range((subscription, code, lo)..=(subscription, code, u64::MAX))?
            {
                let id = row?.0.value().2;
                if let Some(v) = deliveries.get(id)? {
                    out.push((id, decode(v.value(), "delivery")?));
                }
                if out.len() >= limit {
                    return Ok(LiveChunk {
                        items: out,
                        next: Some((code, id)),
                    });
                }
            }
        }
        Ok(LiveChunk {
            items: out,
            next: None,
        })
    }

    /// The sequence range `[from, to)` of events received in `[since, until)`.
    pub fn seq_range_for_time(
        &self,
        since: Micros,
        until: Micros,
    ) -> Result<(Seq, Seq), StoreError> {
        let r = self.db().begin_read()?;
        let events = r.open_table(EVENTS)?;
        let from = first_seq_at_or_after(&events, since)?;
        let to = first_seq_at_or_after(&events, until)?;
        Ok((from, to.max(from)))
    }

    /// Events with seq in `[from, to)`, at most `limit`, in order.
    pub fn events_in_range(
        &self,
        from: Seq,
        to: Seq,
        limit: usize,
    ) -> Result<Vec<(Seq, Event)>, StoreError> {
        let r = self.db().begin_read()?;
        let events = r.open_table(EVENTS)?;
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        for row in events.range(from..to)? {
            let (k, v) = row?;
            out.push((k.value(), decode(v.value(), "event")?));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Every subscription created over the API, by id.
    pub fn subscription_records(&self) -> Result<Vec<(String, SubscriptionRecord)>, StoreError> {
        let r = self.db().begin_read()?;
        let t = r.open_table(SUBSCRIPTIONS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), decode(v.value(), "subscription")?));
        }
        Ok(out)
    }

    /// The status of every delivery of these events, in one read transaction.
    pub fn delivery_statuses(
        &self,
        seqs: &[Seq],
    ) -> Result<Vec<(DeliveryId, DeliveryStatus)>, StoreError> {
        let r = self.db().begin_read()?;
        let by_event = r.open_table(EVENT_DELIVERIES)?;
        let deliveries = r.open_table(DELIVERIES)?;
        let mut out = Vec::new();
        for &seq in seqs {
            for row in by_event.range((seq, 0)..=(seq, u64::MAX))? {
                let id = row?.0.value().1;
                if let Some(v) = deliveries.get(id)? {
                    let d: Delivery = decode(v.value(), "delivery")?;
                    out.push((id, d.status));
                }
            }
        }
        Ok(out)
    }

    /// A batch by id.
    pub fn batch(&self, id: &str) -> Result<Option<BatchRecord>, StoreError> {
        let r = self.db().begin_read()?;
        let t = r.open_table(BATCHES)?;
        t.get(id)?.map(|v| decode(v.value(), "batch")).transpose()
    }

    /// Every attempt of every delivery of an event, newest first (by start time, then
    /// delivery id and attempt number, descending), after the cursor. An event has a few
    /// deliveries of a bounded number of attempts each: they are read whole and sorted.
    pub fn event_attempts(
        &self,
        seq: Seq,
        after: Option<AttemptCursor>,
        limit: usize,
    ) -> Result<(Vec<EventAttempt>, Option<AttemptCursor>), StoreError> {
        let r = self.db().begin_read()?;
        let by_event = r.open_table(EVENT_DELIVERIES)?;
        let attempts = r.open_table(ATTEMPTS)?;
        let deliveries = r.open_table(DELIVERIES)?;
        let mut all = Vec::new();
        for row in by_event.range((seq, 0)..=(seq, u64::MAX))? {
            let id = row?.0.value().1;
            let subscription = match deliveries.get(id)? {
                Some(v) => decode::<Delivery>(v.value(), "delivery")?.subscription,
                None => continue,
            };
            for row in attempts.range((id, 0)..=(id, u32::MAX))? {
                let (k, v) = row?;
                all.push(EventAttempt {
                    delivery: id,
                    subscription: subscription.clone(),
                    n: k.value().1,
                    attempt: decode(v.value(), "attempt")?,
                });
            }
        }
        let key = |a: &EventAttempt| AttemptCursor {
            started_at: a.attempt.started_at,
            delivery: a.delivery,
            n: a.n,
        };
        all.sort_by_key(|a| std::cmp::Reverse(key(a)));
        let mut page: Vec<EventAttempt> = all
            .into_iter()
            .filter(|a| after.is_none_or(|c| key(a) < c))
            .take(limit.saturating_add(1))
            .collect();
        let next = if page.len() > limit {
            page.truncate(limit);
            page.last().map(key)
        } else {
            None
        };
        Ok((page, next))
    }

    /// One subscription created over the API.
    pub fn subscription_record(&self, id: &str) -> Result<Option<SubscriptionRecord>, StoreError> {
        let r = self.db().begin_read()?;
        let t = r.open_table(SUBSCRIPTIONS)?;
        t.get(id)?
            .map(|v| decode(v.value(), "subscription"))
            .transpose()
    }
}

fn first_key<K: redb::Key + 'static>(
    range: redb::Range<'_, K, ()>,
    id: impl Fn(K::SelfType<'_>) -> DeliveryId,
) -> Result<Option<DeliveryId>, StoreError> {
    match range.into_iter().next() {
        Some(row) => Ok(Some(id(row?.0.value()))),
        None => Ok(None),
    }
}

/// The (subscription, status code) ranges of `deliveries_by_subscription_status` that hold
/// the deliveries a subscription and/or status filter asks for; `None` without either.
/// A subscription alone spans its six statuses. A status alone spans every subscription that
/// has deliveries, found by skipping from one subscription's rows to the next: one seek per
/// subscription, so with thousands of them such a page costs thousands of seeks more.
fn status_prefixes(
    sub_status: &redb::ReadOnlyTable<(&str, u8, u64), ()>,
    subscription: Option<&str>,
    status: Option<DeliveryStatus>,
) -> Result<Option<Vec<(String, u8)>>, StoreError> {
    Ok(match (subscription, status) {
        (Some(s), Some(st)) => Some(vec![(s.to_string(), st.code())]),
        (Some(s), None) => Some(
            DeliveryStatus::ALL
                .iter()
                .map(|st| (s.to_string(), st.code()))
                .collect(),
        ),
        (None, Some(st)) => Some(
            indexed_subscriptions(sub_status)?
                .into_iter()
                .map(|s| (s, st.code()))
                .collect(),
        ),
        (None, None) => None,
    })
}

/// Every subscription with a row in `deliveries_by_subscription_status`, in order.
fn indexed_subscriptions(
    sub_status: &redb::ReadOnlyTable<(&str, u8, u64), ()>,
) -> Result<Vec<String>, StoreError> {
    let mut out: Vec<String> = Vec::new();
    loop {
        let next = match out.last() {
            None => sub_status.first()?.map(|(k, _)| k.value().0.to_string()),
            Some(prev) => {
                let past = (prev.as_str(), u8::MAX, u64::MAX);
                match sub_status
                    .range::<(&str, u8, u64)>((Bound::Excluded(past), Bound::Unbounded))?
                    .next()
                {
                    Some(row) => Some(row?.0.value().0.to_string()),
                    None => None,
                }
            }
        };
        match next {
            Some(s) => out.push(s),
            None => return Ok(out),
        }
    }
}

/// Merges walks that are each in id order into one walk in id order.
fn merged(mut walks: Vec<IdIter<'_>>) -> IdIter<'_> {
    if walks.len() == 1
        && let Some(w) = walks.pop()
    {
        return w;
    }
    let mut heads = BinaryHeap::with_capacity(walks.len());
    let mut failed = None;
    for (i, w) in walks.iter_mut().enumerate() {
        match w.next() {
            Some(Ok(id)) => heads.push(Reverse((id, i))),
            Some(Err(e)) => failed = Some(e),
            None => {}
        }
    }
    Box::new(std::iter::from_fn(move || {
        if let Some(e) = failed.take() {
            return Some(Err(e));
        }
        let Reverse((id, i)) = heads.pop()?;
        match walks[i].next() {
            Some(Ok(next)) => heads.push(Reverse((next, i))),
            Some(Err(e)) => failed = Some(e),
            None => {}
        }
        Some(Ok(id))
    }))
}

/// An event type filter together with a subscription and/or status filter: the two indexes
/// are intersected by leapfrogging. Each step seeks the subscription/status ranges to the
/// candidate id and the type index to what that found; the one behind jumps to the other.
/// The cost follows the smaller set (a rare type among millions of succeeded deliveries is
/// as cheap as a common one), and `SCAN_BUDGET` bounds the seeks of one page.
#[allow(clippy::too_many_arguments)]
fn leapfrog(
    event_type: &str,
    prefixes: &[(String, u8)],
    (lo, hi): (DeliveryId, DeliveryId),
    limit: usize,
    priority: Option<Priority>,
    deliveries: &redb::ReadOnlyTable<u64, &[u8]>,
    by_type: &redb::ReadOnlyTable<(&str, u64), ()>,
    sub_status: &redb::ReadOnlyTable<(&str, u8, u64), ()>,
) -> Result<Page<(DeliveryId, Delivery)>, StoreError> {
    let seek_primary = |from: DeliveryId| {
        let mut first: Option<DeliveryId> = None;
        for (s, code) in prefixes {
            let found = first_key(
                sub_status.range((s.as_str(), *code, from)..(s.as_str(), *code, hi))?,
                |k| k.2,
            )?;
            first = match (first, found) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok::<_, StoreError>(first)
    };
    let seek_type = |from: DeliveryId| {
        first_key(by_type.range((event_type, from)..(event_type, hi))?, |k| {
            k.1
        })
    };
    let mut items = Vec::new();
    let mut candidate = lo;
    let mut seeks = 0usize;
    while candidate < hi {
        seeks += prefixes.len() + 1;
        let Some(a) = seek_primary(candidate)? else {
            break;
        };
        let Some(b) = seek_type(a)? else {
            break;
        };
        if a == b {
            if let Some(v) = deliveries.get(a)? {
                let d: Delivery = decode(v.value(), "delivery")?;
                if priority.is_none_or(|p| d.priority == p) {
                    items.push((a, d));
                }
            }
            if items.len() >= limit {
                return Ok(Page {
                    items,
                    next: Some(a),
                });
            }
            candidate = a + 1;
        } else {
            candidate = b;
        }
        if seeks >= SCAN_BUDGET {
            // Every id below the candidate was looked at.
            return Ok(Page {
                items,
                next: Some(candidate.saturating_sub(1)).filter(|_| candidate < hi),
            });
        }
    }
    Ok(Page { items, next: None })
}

/// The smallest delivery id created at or after `t` (one past the last if none). Ids are
/// dense apart from retention gaps and `created_at` never decreases with id.
fn first_delivery_at_or_after(
    deliveries: &redb::ReadOnlyTable<u64, &[u8]>,
    t: Micros,
) -> Result<DeliveryId, StoreError> {
    let (Some((first, _)), Some((last, _))) = (deliveries.first()?, deliveries.last()?) else {
        return Ok(0);
    };
    let (mut lo, mut hi) = (first.value(), last.value() + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let Some(row) = deliveries.range(mid..hi)?.next() else {
            hi = mid;
            continue;
        };
        let (k, v) = row?;
        let d: Delivery = decode(v.value(), "delivery")?;
        if d.created_at < t {
            lo = k.value() + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    use crate::storage::embedded::writer::{self, AttemptRecord, NewEvent, Next};

    const TYPES: [&str; 3] = ["order.created", "order.paid", "rare"];
    const SUBS: [&str; 3] = ["a", "b", "c"];

    /// A store with 300 events fanned out to 1-3 subscriptions each, and a mix of outcomes.
    async fn filled() -> (tempfile::TempDir, Store) {
        let (dir, store, w, join) = writer::testing::open(16);
        for chunk in 0..6u64 {
            let events = (0..50u64)
                .map(|j| {
                    let i = chunk * 50 + j;
                    let t = if i % 37 == 0 { 2 } else { (i % 2) as usize };
                    let subs = SUBS[..1 + (i % 3) as usize]
                        .iter()
                        .map(|s| Arc::from(*s))
                        .collect();
                    NewEvent {
                        id: format!("e{i}"),
                        event_type: TYPES[t].into(),
                        source: None,
                        data: "{}".into(),
                        idempotency_key: None,
                        subscriptions: subs,
                        ..NewEvent::default()
                    }
                })
                .collect();
            if let Err(e) = w.publish(events).await {
                panic!("{e}");
            }
        }
        let all = match store.list_deliveries(&DeliveryFilter::default(), None, 10_000) {
            Ok(p) => p.items,
            Err(e) => panic!("{e}"),
        };
        let records = all
            .iter()
            .filter(|(id, _)| id % 4 != 0)
            .map(|(id, d)| {
                let next = match id % 4 {
                    1 => Next::Succeeded,
                    2 => Next::Dead,
                    _ => Next::Retry { at: i64::MAX / 2 },
                };
                AttemptRecord::answered(*id, &d.subscription, 200, next)
            })
            .collect();
        if let Err(e) = w.record_attempts(records).await {
            panic!("{e}");
        }
        w.stop();
        drop(w);
        let _ = join.join();
        (dir, store)
    }

    fn walk(store: &Store, f: &DeliveryFilter, limit: usize) -> Vec<DeliveryId> {
        let mut out = Vec::new();
        let mut after = None;
        for _ in 0..10_000 {
            let page = match store.list_deliveries(f, after, limit) {
                Ok(p) => p,
                Err(e) => panic!("{e}"),
            };
            assert!(page.items.len() <= limit);
            out.extend(page.items.iter().map(|(id, _)| *id));
            match page.next {
                Some(n) => after = Some(n),
                None => return out,
            }
        }
        panic!("the walk did not end for {f:?}");
    }

    #[tokio::test]
    async fn every_filter_combination_matches_a_full_scan() {
        let (_dir, store) = filled().await;
        let all = match store.list_deliveries(&DeliveryFilter::default(), None, 10_000) {
            Ok(p) => p.items,
            Err(e) => panic!("{e}"),
        };
        assert!(all.len() > 500, "{}", all.len());
        let events: std::collections::HashMap<String, String> = (0..300u64)
            .filter_map(|i| {
                let (_, e) = store.event_by_id(&format!("e{i}")).ok()??;
                Some((e.id, e.event_type))
            })
            .collect();
        let times: Vec<Micros> = all.iter().map(|(_, d)| d.created_at).collect();
        let (t1, t2) = (times[all.len() / 3], times[2 * all.len() / 3]);
        let statuses = [
            None,
            Some(DeliveryStatus::Pending),
            Some(DeliveryStatus::Succeeded),
            Some(DeliveryStatus::Retrying),
            Some(DeliveryStatus::Dead),
        ];
        let mut checked = 0;
        for status in statuses {
            for sub in [None, Some("a"), Some("c"), Some("zzz")] {
                for ty in [None, Some("order.paid"), Some("rare")] {
                    for (since, until) in [(None, None), (Some(t1), None), (Some(t1), Some(t2))] {
                        let f = DeliveryFilter {
                            status,
                            subscription: sub.map(str::to_string),
                            event_type: ty.map(str::to_string),
                            since,
                            until,
                            priority: None,
                        };
                        let want: Vec<DeliveryId> = all
                            .iter()
                            .filter(|(_, d)| status.is_none_or(|s| d.status == s))
                            .filter(|(_, d)| sub.is_none_or(|s| d.subscription == s))
                            .filter(|(_, d)| {
                                ty.is_none_or(|t| {
                                    events.get(&d.event_id).map(String::as_str) == Some(t)
                                })
                            })
                            .filter(|(_, d)| since.is_none_or(|s| d.created_at >= s))
                            .filter(|(_, d)| until.is_none_or(|u| d.created_at < u))
                            .map(|(id, _)| *id)
                            .collect();
                        for limit in [1, 7, 1000] {
                            assert_eq!(walk(&store, &f, limit), want, "{f:?} limit {limit}");
                        }
                        checked += usize::from(!want.is_empty());
                    }
                }
            }
        }
        assert!(checked > 50, "too few non-empty combinations: {checked}");
    }

    #[tokio::test]
    async fn dead_letters_and_live_deliveries() {
        let (_dir, store) = filled().await;
        let dead = match store.list_dead_letters(&DeadFilter::default(), None, 10_000) {
            Ok(p) => p.items,
            Err(e) => panic!("{e}"),
        };
        assert!(!dead.is_empty());
        assert!(
            dead.iter()
                .all(|d| d.delivery.status == DeliveryStatus::Dead)
        );
        let of_c = match store.list_dead_letters(
            &DeadFilter {
                subscription: Some("c".into()),
                since: None,
            },
            None,
            3,
        ) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(of_c.items.len(), 3);
        assert!(of_c.next.is_some());
        assert!(of_c.items.iter().all(|d| d.delivery.subscription == "c"));
        let future = DeadFilter {
            subscription: None,
            since: Some(i64::MAX),
        };
        assert!(matches!(store.list_dead_letters(&future, None, 10), Ok(p) if p.items.is_empty()));

        // Live: pending and retrying of one subscription, in chunks that resume correctly.
        let mut got = Vec::new();
        let mut cursor = None;
        loop {
            let chunk = match store.live_deliveries("a", cursor, 13) {
                Ok(c) => c,
                Err(e) => panic!("{e}"),
            };
            got.extend(chunk.items.iter().map(|(id, d)| (*id, d.status)));
            match chunk.next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let want: Vec<(DeliveryId, DeliveryStatus)> = {
            let f = |st| DeliveryFilter {
                status: Some(st),
                subscription: Some("a".into()),
                ..Default::default()
            };
            let mut w: Vec<_> = walk(&store, &f(DeliveryStatus::Pending), 1000)
                .into_iter()
                .map(|id| (id, DeliveryStatus::Pending))
                .collect();
            w.extend(
                walk(&store, &f(DeliveryStatus::Retrying), 1000)
                    .into_iter()
                    .map(|id| (id, DeliveryStatus::Retrying)),
            );
            w
        };
        assert!(want.len() > 20);
        assert_eq!(got, want);
    }
}

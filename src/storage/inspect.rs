//! Operator reads: the filtered delivery list, the dead-letter queue, a subscription's live
//! deliveries, event ranges for replay and the API subscription records.
//!
//! **Invariant:** every list walks an index keyed for its filter (plus point lookups for the
//! rest) and stops after `SCAN_BUDGET` rows, so a page costs the same with ten rows stored or
//! ten million. Time filters on deliveries become a delivery id range: the writer never gives
//! a later delivery an earlier `created_at`, so a binary search over ids finds the bounds.

use redb::ReadableTable;
use serde::de::DeserializeOwned;

use super::schema::*;
use super::{Page, Store, StoreError, first_seq_at_or_after};
use crate::model::{Delivery, DeliveryId, DeliveryStatus, Event, Micros, Seq};

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
        let by_sub = r.open_table(DELIVERIES_BY_SUB)?;
        let by_status = r.open_table(DELIVERIES_BY_STATUS)?;
        if let Some(t) = f.event_type.as_deref() {
            if f.subscription.is_some() || f.status.is_some() {
                return leapfrog(
                    f,
                    t,
                    lo,
                    hi,
                    limit,
                    &deliveries,
                    &by_type,
                    &sub_status,
                    &by_sub,
                    &by_status,
                );
            }
        }
        // One index answers every filter.
        let (walk, type_checked): (IdIter<'_>, bool) =
            match (f.subscription.as_deref(), f.status, f.event_type.as_deref()) {
                (Some(s), Some(st), _) => (
                    ids(
                        sub_status.range((s, st.code(), lo)..(s, st.code(), hi))?,
                        |k| k.2,
                    ),
                    false,
                ),
                (Some(s), None, _) => (ids(by_sub.range((s, lo)..(s, hi))?, |k| k.1), false),
                (None, Some(st), _) => (
                    ids(by_status.range((st.code(), lo)..(st.code(), hi))?, |k| k.1),
                    false,
                ),
                (None, None, Some(t)) => (ids(by_type.range((t, lo)..(t, hi))?, |k| k.1), true),
                (None, None, None) => (
                    Box::new(deliveries.range(lo..hi)?.map(|row| {
                        row.map(|(k, _)| k.value())
                            .map_err(|e| StoreError::Db(e.into()))
                    })),
                    true,
                ),
            };
        let mut items = Vec::new();
        let mut scanned = 0usize;
        let mut last = None;
        for id in walk {
            let id = id?;
            scanned += 1;
            last = Some(id);
            let wanted = match f.event_type.as_deref() {
                Some(t) if !type_checked => by_type.get((t, id))?.is_some(),
                _ => true,
            };
            if wanted {
                if let Some(v) = deliveries.get(id)? {
                    items.push((id, decode(v.value(), "delivery")?));
                }
            }
            if items.len() >= limit || scanned >= SCAN_BUDGET {
                break;
            }
        }
        let next = if items.len() >= limit || scanned >= SCAN_BUDGET {
            last
        } else {
            None
        };
        Ok(Page { items, next })
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
        let mut items = Vec::new();
        let mut scanned = 0usize;
        let mut last = None;
        for id in walk {
            let id = id?;
            scanned += 1;
            last = Some(id);
            let Some(dead_at) = dead.get(id)?.map(|g| g.value()) else {
                continue;
            };
            if f.since.is_none_or(|s| dead_at >= s) {
                if let Some(v) = deliveries.get(id)? {
                    items.push(DeadLetter {
                        id,
                        dead_at,
                        delivery: decode(v.value(), "delivery")?,
                    });
                }
            }
            if items.len() >= limit || scanned >= SCAN_BUDGET {
                break;
            }
        }
        let next = if items.len() >= limit || scanned >= SCAN_BUDGET {
            last
        } else {
            None
        };
        Ok(Page { items, next })
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
    pub fn subscription_records<T: DeserializeOwned>(
        &self,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let r = self.db().begin_read()?;
        let t = r.open_table(SUBSCRIPTIONS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), decode(v.value(), "subscription")?));
        }
        Ok(out)
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

/// An event type filter together with a subscription and/or status filter: the two indexes
/// are intersected by leapfrogging. Each step seeks the subscription/status index to the
/// candidate id and the type index to what that found; the one behind jumps to the other.
/// The cost follows the smaller set (a rare type among millions of succeeded deliveries is
/// as cheap as a common one), and `SCAN_BUDGET` bounds the seeks of one page.
#[allow(clippy::too_many_arguments)]
fn leapfrog(
    f: &DeliveryFilter,
    event_type: &str,
    lo: DeliveryId,
    hi: DeliveryId,
    limit: usize,
    deliveries: &redb::ReadOnlyTable<u64, &[u8]>,
    by_type: &redb::ReadOnlyTable<(&str, u64), ()>,
    sub_status: &redb::ReadOnlyTable<(&str, u8, u64), ()>,
    by_sub: &redb::ReadOnlyTable<(&str, u64), ()>,
    by_status: &redb::ReadOnlyTable<(u8, u64), ()>,
) -> Result<Page<(DeliveryId, Delivery)>, StoreError> {
    let seek_primary = |from: DeliveryId| match (f.subscription.as_deref(), f.status) {
        (Some(s), Some(st)) => first_key(
            sub_status.range((s, st.code(), from)..(s, st.code(), hi))?,
            |k| k.2,
        ),
        (Some(s), None) => first_key(by_sub.range((s, from)..(s, hi))?, |k| k.1),
        (None, Some(st)) => first_key(by_status.range((st.code(), from)..(st.code(), hi))?, |k| {
            k.1
        }),
        (None, None) => Ok(None),
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
        seeks += 2;
        let Some(a) = seek_primary(candidate)? else {
            break;
        };
        let Some(b) = seek_type(a)? else {
            break;
        };
        if a == b {
            if let Some(v) = deliveries.get(a)? {
                items.push((a, decode(v.value(), "delivery")?));
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

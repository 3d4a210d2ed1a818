//! Every read the daemon makes, on PostgreSQL: the same methods, arguments and answers as the
//! embedded `Store`, so the API, scheduler and destination tasks do not know which backend
//! they read. Lists page by the same cursors (seq, delivery id); where the embedded backend
//! walks an index, these are one indexed query each.

use std::ops::Bound;

use tokio_postgres::types::ToSql;

use super::{Shared, block};
use crate::model::{
    Attempt, Callback, Delivery, DeliveryId, DeliveryStatus, Event, Micros, Origin, Priority,
    Receipt, Seq,
};
use crate::storage::inspect::{
    AttemptCursor, DeadFilter, DeadLetter, DeliveryFilter, EventAttempt, LiveChunk, LiveCursor,
};
use crate::storage::schema::{BatchRecord, SubscriptionRecord};
use crate::storage::writer::SubscriptionState;
use crate::storage::{EventFilter, Page, StoreError};

/// The columns `delivery_row` reads, in its order.
pub const DELIVERY_COLUMNS: &str = "id, event_seq, event_id, subscription, status, attempts, \
     next_attempt_at, last_error, created_at, updated_at, origin, priority";

/// The columns `event_row` reads, in its order.
pub const EVENT_COLUMNS: &str = "seq, id, event_type, source, data, received_at, \
     idempotency_key, receipt, priority, batch, callback::text";

pub fn priority(code: i16) -> Priority {
    Priority::ALL
        .into_iter()
        .find(|p| i16::from(p.rank()) == code)
        .unwrap_or_default()
}

pub fn origin_code(o: Origin) -> i16 {
    match o {
        Origin::Publish => 0,
        Origin::Replay => 1,
        Origin::Redrive => 2,
    }
}

fn seq_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn db_id(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub fn delivery_row(row: &tokio_postgres::Row) -> (DeliveryId, Delivery) {
    let code = |c: i16| u8::try_from(c).unwrap_or(u8::MAX);
    let attempts: i32 = row.get(5);
    let d = Delivery {
        event_seq: seq_of(row.get(1)),
        event_id: row.get(2),
        subscription: row.get(3),
        status: DeliveryStatus::from_code(code(row.get(4))).unwrap_or(DeliveryStatus::Pending),
        attempts: u32::try_from(attempts).unwrap_or(0),
        next_attempt_at: row.get(6),
        last_error: row.get(7),
        created_at: row.get(8),
        updated_at: row.get(9),
        origin: match row.get::<_, i16>(10) {
            1 => Origin::Replay,
            2 => Origin::Redrive,
            _ => Origin::Publish,
        },
        priority: priority(row.get(11)),
    };
    (seq_of(row.get(0)), d)
}

pub fn event_row(row: &tokio_postgres::Row) -> Result<(Seq, Event), StoreError> {
    event_row_at(row, 0)
}

/// `event_row` for `EVENT_COLUMNS` starting at column `at`.
fn event_row_at(row: &tokio_postgres::Row, at: usize) -> Result<(Seq, Event), StoreError> {
    let callback: Option<String> = row.get(at + 10);
    let callback: Option<Callback> = callback
        .map(|c| serde_json::from_str(&c))
        .transpose()
        .map_err(|e| StoreError::Decode("callback", e.to_string()))?;
    let receipt: Option<i64> = row.get(at + 7);
    Ok((
        seq_of(row.get(at)),
        Event {
            id: row.get(at + 1),
            event_type: row.get(at + 2),
            source: row.get(at + 3),
            data: row.get(at + 4),
            received_at: row.get(at + 5),
            idempotency_key: row.get(at + 6),
            receipt: receipt.map(seq_of),
            priority: priority(row.get(at + 8)),
            batch: row.get(at + 9),
            callback,
        },
    ))
}

/// A run's deliveries (`$1`), without their events.
static DELIVERIES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = ANY($1::bigint[])")
});

/// A run's deliveries (`$1`) with the events of those in `$2` still scheduled, in one query:
/// `DELIVERY_COLUMNS`, then `EVENT_COLUMNS` (null where no event comes with the row).
static DELIVERIES_WITH_EVENTS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let qualified = |alias: &str, columns: &str| {
        columns
            .split(',')
            .map(|c| format!("{alias}.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "SELECT {}, {} FROM deliveries d
         LEFT JOIN events e
           ON e.seq = d.event_seq AND d.next_attempt_at IS NOT NULL AND d.id = ANY($2::bigint[])
         WHERE d.id = ANY($1::bigint[])",
        qualified("d", DELIVERY_COLUMNS),
        qualified("e", EVENT_COLUMNS)
    )
});

/// A page of rows read with `LIMIT limit`: a full one says where the next starts.
fn page<T>(items: Vec<T>, limit: i64, cursor: impl Fn(&T) -> u64) -> Page<T> {
    let next = (items.len() as i64 >= limit)
        .then(|| items.last().map(cursor))
        .flatten();
    Page { items, next }
}

/// Reads on the cluster's database.
#[derive(Clone)]
pub struct PgStore {
    pub(crate) shared: Shared,
    /// Connections for the destination tasks' reads (`prefetch`), whose statements are
    /// prepared once per connection (`QUEUE_READ_SETTINGS`).
    queue_reads: super::Pool,
}

/// The sessions of `PgStore::queue_reads`. Their statements are prepared once per
/// connection and run on a generic plan from the first run; planning took two to three
/// times as long as running them (0.14-0.2 ms against 0.07 ms for 30 deliveries with their
/// events). A generic plan made while a table was small (a new cluster's first minute,
/// before autovacuum analyzes it again) would scan the table whole, or hash it, for
/// `id = ANY(…)`: 24 ms a read at 100,000 rows, in a test. With these settings the planner
/// takes the primary keys' indexes however small the tables look. The generic plan is also
/// forced: left to choose, PostgreSQL kept planning anew for more than half the reads of
/// small runs (3,295 plans for 6,008 reads on a node in a two-node run), where the custom
/// plan it compares with looks cheaper and is the same index scan.
const QUEUE_READ_SETTINGS: &str = "-c enable_seqscan=off -c enable_hashjoin=off \
     -c enable_mergejoin=off -c plan_cache_mode=force_generic_plan";

impl PgStore {
    /// Reads through `shared`'s pool, and the destination tasks' reads through a pool of
    /// `queue_reads` connections of their own.
    pub fn new(shared: Shared, queue_reads: usize) -> Result<Self, StoreError> {
        let queue_reads =
            super::pool_with(&shared.url, queue_reads.max(1), Some(QUEUE_READ_SETTINGS))?;
        Ok(Self {
            shared,
            queue_reads,
        })
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let c = self.shared.pool.get().await?;
        // Planned afresh on every call, not prepared once per connection: after five runs
        // PostgreSQL keeps a prepared statement's generic plan, and one made while a table
        // was small (a new cluster's first seconds) scans the whole table for `id = ANY(…)`
        // for as long as the connection lives. A custom plan sees the table as it is now.
        let stmt = c.prepare(sql).await?;
        Ok(c.query(&stmt, params).await?)
    }

    fn rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let r = block(self.query(sql, params));
        if r.is_err() {
            self.shared.metrics.cluster_db_errors.inc();
        }
        r
    }

    pub fn readable(&self) -> bool {
        self.rows("SELECT 1", &[]).is_ok()
    }

    pub fn event_by_id(&self, id: &str) -> Result<Option<(Seq, Event)>, StoreError> {
        self.rows(
            &format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = $1"),
            &[&id],
        )?
        .first()
        .map(event_row)
        .transpose()
    }

    pub fn event_by_seq(&self, seq: Seq) -> Result<Option<Event>, StoreError> {
        Ok(self
            .rows(
                &format!("SELECT {EVENT_COLUMNS} FROM events WHERE seq = $1"),
                &[&db_id(seq)],
            )?
            .first()
            .map(event_row)
            .transpose()?
            .map(|(_, e)| e))
    }

    pub fn receipt(&self, id: u64) -> Result<Option<Receipt>, StoreError> {
        let rows = self.rows(
            "SELECT source, method, headers::text, body, received_at, scheme, signed_timestamp,
                    delivery_id, event_id, event_seq
             FROM receipts WHERE id = $1",
            &[&db_id(id)],
        )?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let headers: String = r.get(2);
        Ok(Some(Receipt {
            source: r.get(0),
            method: r.get(1),
            headers: serde_json::from_str(&headers)
                .map_err(|e| StoreError::Decode("receipt", e.to_string()))?,
            body: r.get(3),
            received_at: r.get(4),
            scheme: r.get(5),
            signed_timestamp: r.get(6),
            delivery_id: r.get(7),
            event_id: r.get(8),
            event_seq: seq_of(r.get(9)),
        }))
    }

    pub fn event_count(&self) -> Result<u64, StoreError> {
        let rows = self.rows("SELECT count(*) FROM events", &[])?;
        Ok(rows.first().map_or(0, |r| seq_of(r.get(0))))
    }

    pub fn list_events(
        &self,
        f: &EventFilter,
        after: Option<Seq>,
        limit: usize,
    ) -> Result<Page<(Seq, Event)>, StoreError> {
        let after = after.map_or(0, db_id);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let prio = f.priority.map(|p| i16::from(p.rank()));
        let rows = self.rows(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM events
                 WHERE seq > $1
                   AND ($2::text IS NULL OR event_type = $2)
                   AND ($3::text IS NULL OR source = $3)
                   AND ($4::bigint IS NULL OR received_at >= $4)
                   AND ($5::bigint IS NULL OR received_at < $5)
                   AND ($6::smallint IS NULL OR priority = $6)
                 ORDER BY seq LIMIT $7"
            ),
            &[
                &after,
                &f.event_type,
                &f.source,
                &f.since,
                &f.until,
                &prio,
                &limit,
            ],
        )?;
        let items = rows.iter().map(event_row).collect::<Result<Vec<_>, _>>()?;
        Ok(page(items, limit, |(s, _)| *s))
    }

    pub fn event_delivery_ids(&self, seq: Seq) -> Result<Vec<DeliveryId>, StoreError> {
        Ok(self
            .rows(
                "SELECT id FROM deliveries WHERE event_seq = $1 ORDER BY id",
                &[&db_id(seq)],
            )?
            .iter()
            .map(|r| seq_of(r.get(0)))
            .collect())
    }

    pub fn delivery(&self, id: DeliveryId) -> Result<Option<Delivery>, StoreError> {
        Ok(self
            .rows(
                &format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = $1"),
                &[&db_id(id)],
            )?
            .first()
            .map(|r| delivery_row(r).1))
    }

    pub fn deliveries(
        &self,
        ids: &[DeliveryId],
    ) -> Result<Vec<(DeliveryId, Delivery)>, StoreError> {
        let ids: Vec<i64> = ids.iter().map(|&i| db_id(i)).collect();
        let rows = self.rows(
            &format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = ANY($1)"),
            &[&ids],
        )?;
        let mut by_id: std::collections::HashMap<DeliveryId, Delivery> =
            rows.iter().map(delivery_row).collect();
        // In the order asked, as the embedded backend answers.
        Ok(ids
            .iter()
            .filter_map(|&i| {
                let id = seq_of(i);
                by_id.remove(&id).map(|d| (id, d))
            })
            .collect())
    }

    pub fn attempts(&self, id: DeliveryId) -> Result<Vec<(u32, Attempt)>, StoreError> {
        Ok(self
            .rows(
                "SELECT n, started_at, duration_us, status_code, error, response_body
                 FROM attempts WHERE delivery = $1 ORDER BY n",
                &[&db_id(id)],
            )?
            .iter()
            .map(|r| {
                (
                    u32::try_from(r.get::<_, i32>(0)).unwrap_or(0),
                    attempt_row(r, 1),
                )
            })
            .collect())
    }

    /// Scheduled deliveries of the destinations this node holds, in due order: the
    /// scheduler's loads. A destination held elsewhere is that node's to load.
    pub fn due(
        &self,
        from: Bound<(Micros, DeliveryId)>,
        until: Micros,
        limit: usize,
    ) -> Result<Vec<(Micros, DeliveryId)>, StoreError> {
        Ok(self
            .due_jobs(from, until, limit)?
            .into_iter()
            .map(|(at, id, _, _)| (at, id))
            .collect())
    }

    /// `due`, with each delivery's destination and priority.
    #[allow(clippy::type_complexity)]
    pub fn due_jobs(
        &self,
        from: Bound<(Micros, DeliveryId)>,
        until: Micros,
        limit: usize,
    ) -> Result<Vec<(Micros, DeliveryId, String, Priority)>, StoreError> {
        let held = self.shared.leases.held_ids();
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let (at, id, inclusive) = match from {
            Bound::Included((a, i)) => (a, db_id(i), true),
            Bound::Excluded((a, i)) => (a, db_id(i), false),
            Bound::Unbounded => (i64::MIN, 0, true),
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.rows(
            "SELECT next_attempt_at, id, subscription, priority FROM deliveries
             WHERE subscription = ANY($1::text[]) AND next_attempt_at IS NOT NULL
               AND next_attempt_at < $2
               AND (next_attempt_at, id) >= ($3, $4)
               AND ($5 OR (next_attempt_at, id) <> ($3, $4))
             ORDER BY next_attempt_at, id LIMIT $6",
            &[&held, &until, &at, &id, &inclusive, &limit],
        )?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), seq_of(r.get(1)), r.get(2), priority(r.get(3))))
            .collect())
    }

    /// Scheduled deliveries of the destinations this node holds.
    pub fn scheduled_count(&self) -> Result<u64, StoreError> {
        let held = self.shared.leases.held_ids();
        let rows = self.rows(
            "SELECT count(*) FROM deliveries
             WHERE subscription = ANY($1::text[]) AND next_attempt_at IS NOT NULL",
            &[&held],
        )?;
        Ok(rows.first().map_or(0, |r| seq_of(r.get(0))))
    }

    pub fn failing_since(&self, subscription: &str) -> Result<Option<Micros>, StoreError> {
        Ok(self
            .rows(
                "SELECT failing_since FROM subscription_state WHERE id = $1",
                &[&subscription],
            )?
            .first()
            .and_then(|r| r.get(0)))
    }

    pub fn subscription_states(
        &self,
    ) -> Result<std::collections::HashMap<String, SubscriptionState>, StoreError> {
        Ok(self
            .rows(
                "SELECT id, enabled, reason, changed_at FROM subscription_state
                 WHERE enabled IS NOT NULL",
                &[],
            )?
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    SubscriptionState {
                        enabled: r.get(1),
                        reason: r.get(2),
                        changed_at: r.get(3),
                    },
                )
            })
            .collect())
    }

    pub fn list_deliveries(
        &self,
        f: &DeliveryFilter,
        after: Option<DeliveryId>,
        limit: usize,
    ) -> Result<Page<(DeliveryId, Delivery)>, StoreError> {
        let after = after.map_or(0, db_id);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let status = f.status.map(|s| i16::from(s.code()));
        let prio = f.priority.map(|p| i16::from(p.rank()));
        let rows = self.rows(
            &format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries
                 WHERE id > $1
                   AND ($2::smallint IS NULL OR status = $2)
                   AND ($3::text IS NULL OR subscription = $3)
                   AND ($4::text IS NULL OR event_type = $4)
                   AND ($5::bigint IS NULL OR created_at >= $5)
                   AND ($6::bigint IS NULL OR created_at < $6)
                   AND ($7::smallint IS NULL OR priority = $7)
                 ORDER BY id LIMIT $8"
            ),
            &[
                &after,
                &status,
                &f.subscription,
                &f.event_type,
                &f.since,
                &f.until,
                &prio,
                &limit,
            ],
        )?;
        let items: Vec<(DeliveryId, Delivery)> = rows.iter().map(delivery_row).collect();
        Ok(page(items, limit, |(i, _)| *i))
    }

    pub fn list_dead_letters(
        &self,
        f: &DeadFilter,
        after: Option<DeliveryId>,
        limit: usize,
    ) -> Result<Page<DeadLetter>, StoreError> {
        let after = after.map_or(0, db_id);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.rows(
            &format!(
                "SELECT {DELIVERY_COLUMNS}, dead_at FROM deliveries
                 WHERE id > $1 AND status = $2 AND dead_at IS NOT NULL
                   AND ($3::text IS NULL OR subscription = $3)
                   AND ($4::bigint IS NULL OR dead_at >= $4)
                 ORDER BY id LIMIT $5"
            ),
            &[
                &after,
                &i16::from(DeliveryStatus::Dead.code()),
                &f.subscription,
                &f.since,
                &limit,
            ],
        )?;
        let items: Vec<DeadLetter> = rows
            .iter()
            .map(|r| {
                let (id, delivery) = delivery_row(r);
                DeadLetter {
                    id,
                    dead_at: r.get(12),
                    delivery,
                }
            })
            .collect();
        Ok(page(items, limit, |d| d.id))
    }

    pub fn first_live_delivery(
        &self,
        subscription: &str,
    ) -> Result<Option<DeliveryId>, StoreError> {
        Ok(self
            .rows(
                "SELECT min(id) FROM deliveries WHERE subscription = $1 AND status IN (0, 1, 3)",
                &[&subscription],
            )?
            .first()
            .and_then(|r| r.get::<_, Option<i64>>(0))
            .map(seq_of))
    }

    pub fn live_deliveries(
        &self,
        subscription: &str,
        after: Option<LiveCursor>,
        limit: usize,
    ) -> Result<LiveChunk, StoreError> {
        let (code, id) = after.map_or((-1i16, 0i64), |(c, i)| (i16::from(c), db_id(i)));
        let lim = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.rows(
            &format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries
                 WHERE subscription = $1 AND status IN (0, 1, 3) AND (status, id) > ($2, $3)
                 ORDER BY status, id LIMIT $4"
            ),
            &[&subscription, &code, &id, &lim],
        )?;
        let items: Vec<(DeliveryId, Delivery)> = rows.iter().map(delivery_row).collect();
        let next = if items.len() >= limit {
            items.last().map(|(i, d)| (d.status.code(), *i))
        } else {
            None
        };
        Ok(LiveChunk { items, next })
    }

    pub fn seq_range_for_time(
        &self,
        since: Micros,
        until: Micros,
    ) -> Result<(Seq, Seq), StoreError> {
        let rows = self.rows(
            "SELECT COALESCE((SELECT min(seq) FROM events WHERE received_at >= $1),
                             (SELECT COALESCE(max(seq), 0) + 1 FROM events)),
                    COALESCE((SELECT min(seq) FROM events WHERE received_at >= $2),
                             (SELECT COALESCE(max(seq), 0) + 1 FROM events))",
            &[&since, &until],
        )?;
        let (from, to) = rows
            .first()
            .map_or((0, 0), |r| (seq_of(r.get(0)), seq_of(r.get(1))));
        Ok((from, to.max(from)))
    }

    pub fn events_in_range(
        &self,
        from: Seq,
        to: Seq,
        limit: usize,
    ) -> Result<Vec<(Seq, Event)>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.rows(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE seq >= $1 AND seq < $2
                 ORDER BY seq LIMIT $3"
            ),
            &[&db_id(from), &db_id(to), &limit],
        )?
        .iter()
        .map(event_row)
        .collect()
    }

    pub fn subscription_records(&self) -> Result<Vec<(String, SubscriptionRecord)>, StoreError> {
        self.rows(
            "SELECT id, record::text FROM subscriptions ORDER BY id",
            &[],
        )?
        .iter()
        .map(|r| {
            let text: String = r.get(1);
            let rec = serde_json::from_str(&text)
                .map_err(|e| StoreError::Decode("subscription", e.to_string()))?;
            Ok((r.get(0), rec))
        })
        .collect()
    }

    pub fn subscription_record(&self, id: &str) -> Result<Option<SubscriptionRecord>, StoreError> {
        self.rows(
            "SELECT record::text FROM subscriptions WHERE id = $1",
            &[&id],
        )?
        .first()
        .map(|r| {
            serde_json::from_str(&r.get::<_, String>(0))
                .map_err(|e| StoreError::Decode("subscription", e.to_string()))
        })
        .transpose()
    }

    pub fn delivery_statuses(
        &self,
        seqs: &[Seq],
    ) -> Result<Vec<(DeliveryId, DeliveryStatus)>, StoreError> {
        let seqs: Vec<i64> = seqs.iter().map(|&s| db_id(s)).collect();
        Ok(self
            .rows(
                "SELECT id, status FROM deliveries WHERE event_seq = ANY($1) ORDER BY id",
                &[&seqs],
            )?
            .iter()
            .filter_map(|r| {
                let code = u8::try_from(r.get::<_, i16>(1)).ok()?;
                Some((seq_of(r.get(0)), DeliveryStatus::from_code(code)?))
            })
            .collect())
    }

    pub fn batch(&self, id: &str) -> Result<Option<BatchRecord>, StoreError> {
        Ok(self
            .rows("SELECT created_at, seqs FROM batches WHERE id = $1", &[&id])?
            .first()
            .map(|r| {
                let seqs: Vec<i64> = r.get(1);
                BatchRecord {
                    created_at: r.get(0),
                    seqs: seqs.into_iter().map(seq_of).collect(),
                }
            }))
    }

    pub fn event_attempts(
        &self,
        seq: Seq,
        after: Option<AttemptCursor>,
        limit: usize,
    ) -> Result<(Vec<EventAttempt>, Option<AttemptCursor>), StoreError> {
        let (at, id, n) = after.map_or((i64::MAX, i64::MAX, i32::MAX), |c| {
            (
                c.started_at,
                db_id(c.delivery),
                i32::try_from(c.n).unwrap_or(i32::MAX),
            )
        });
        let lim = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
        let rows = self.rows(
            "SELECT a.delivery, d.subscription, a.n, a.started_at, a.duration_us, a.status_code,
                    a.error, a.response_body
             FROM attempts a JOIN deliveries d ON d.id = a.delivery
             WHERE d.event_seq = $1 AND (a.started_at, a.delivery, a.n) < ($2, $3, $4)
             ORDER BY a.started_at DESC, a.delivery DESC, a.n DESC LIMIT $5",
            &[&db_id(seq), &at, &id, &n, &lim],
        )?;
        let mut page: Vec<EventAttempt> = rows
            .iter()
            .map(|r| EventAttempt {
                delivery: seq_of(r.get(0)),
                subscription: r.get(1),
                n: u32::try_from(r.get::<_, i32>(2)).unwrap_or(0),
                attempt: attempt_row(r, 3),
            })
            .collect();
        let next = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|a| AttemptCursor {
                started_at: a.attempt.started_at,
                delivery: a.delivery,
                n: a.n,
            })
        } else {
            None
        };
        Ok((page, next))
    }
}

/// An attempt from columns `at..at+5`: started_at, duration_us, status_code, error,
/// response_body.
fn attempt_row(r: &tokio_postgres::Row, at: usize) -> Attempt {
    let code: Option<i32> = r.get(at + 2);
    Attempt {
        started_at: r.get(at),
        duration_us: u64::try_from(r.get::<_, i64>(at + 1)).unwrap_or(0),
        status_code: code.and_then(|c| u16::try_from(c).ok()),
        error: r.get(at + 3),
        response_body: r.get(at + 4),
    }
}

/// The worker's view of a run of attempts: the deliveries (and events) it asked for, read
/// in one query up front; anything else is read when asked.
pub struct PgSnapshot {
    store: PgStore,
    /// The deliveries the read was made for, and whether their events were asked for too.
    asked: std::collections::HashMap<DeliveryId, bool>,
    deliveries: std::collections::HashMap<DeliveryId, Delivery>,
    events: std::collections::HashMap<Seq, Event>,
}

impl PgStore {
    /// Reads deliveries `ids` at once, with the events of those marked that are still
    /// scheduled: one query (`DELIVERIES_WITH_EVENTS`), prepared once per connection
    /// (`QUEUE_READ_SETTINGS`).
    pub fn prefetch(&self, ids: &[(DeliveryId, bool)]) -> Result<PgSnapshot, StoreError> {
        let mut snap = PgSnapshot {
            store: self.clone(),
            asked: Default::default(),
            deliveries: Default::default(),
            events: Default::default(),
        };
        for (id, event) in ids {
            // One id may come twice (a FIFO head is asked for without its event too).
            *snap.asked.entry(*id).or_default() |= *event;
        }
        if ids.is_empty() {
            return Ok(snap);
        }
        let all: Vec<i64> = ids.iter().map(|(i, _)| db_id(*i)).collect();
        let marked: Vec<i64> = ids
            .iter()
            .filter(|(_, e)| *e)
            .map(|(i, _)| db_id(*i))
            .collect();
        let rows = block(async {
            let c = self.queue_reads.get().await?;
            let rows = if marked.is_empty() {
                let st = c.prepare_cached(&DELIVERIES).await?;
                c.query(&st, &[&all]).await?
            } else {
                let st = c.prepare_cached(&DELIVERIES_WITH_EVENTS).await?;
                c.query(&st, &[&all, &marked]).await?
            };
            Ok(rows)
        })
        .inspect_err(|_| self.shared.metrics.cluster_db_errors.inc())?;
        let events_at = DELIVERY_COLUMNS.split(',').count();
        for r in &rows {
            let (id, d) = delivery_row(r);
            if !marked.is_empty() && r.get::<_, Option<i64>>(events_at).is_some() {
                let (seq, e) = event_row_at(r, events_at)?;
                snap.events.insert(seq, e);
            }
            snap.deliveries.insert(id, d);
        }
        Ok(snap)
    }
}

impl PgSnapshot {
    /// Whether every one of `jobs` is here at its due time (with its event, where marked).
    pub fn covers(&self, jobs: &[(DeliveryId, Micros, bool)]) -> bool {
        jobs.iter().all(|(id, due, need_event)| {
            self.deliveries.get(id).is_some_and(|d| {
                d.next_attempt_at == Some(*due)
                    && (!need_event || self.events.contains_key(&d.event_seq))
            })
        })
    }

    /// Whether this view was read for `id` (with its event, if `event`): what it answers
    /// for it is then final, and no further read is made. A delivery that was not scheduled
    /// when read comes without its event, which no attempt needs.
    pub fn answers(&self, id: DeliveryId, event: bool) -> bool {
        self.asked.get(&id).is_some_and(|e| *e || !event)
    }

    pub fn delivery(&self, id: DeliveryId) -> Result<Option<Delivery>, StoreError> {
        match self.deliveries.get(&id) {
            Some(d) => Ok(Some(d.clone())),
            // Read for, and not there: gone.
            None if self.asked.contains_key(&id) => Ok(None),
            None => self.store.delivery(id),
        }
    }

    pub fn event_by_seq(&self, seq: Seq) -> Result<Option<Event>, StoreError> {
        match self.events.get(&seq) {
            Some(e) => Ok(Some(e.clone())),
            None => self.store.event_by_seq(seq),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The joined read names every column of both lists, each under its table, in the order
    /// `delivery_row` and `event_row_at` read them (a column list entry that is not a plain
    /// column would break the split and this count).
    #[test]
    fn the_joined_read_names_every_column_under_its_table() {
        let sql: &str = &DELIVERIES_WITH_EVENTS;
        let select = sql
            .strip_prefix("SELECT ")
            .and_then(|s| s.split(" FROM ").next())
            .unwrap_or_default();
        let columns: Vec<&str> = select.split(", ").collect();
        assert_eq!(columns.len(), 12 + 11, "{select}");
        assert_eq!(DELIVERY_COLUMNS.split(',').count(), 12);
        assert!(
            columns[..12].iter().all(|c| c.starts_with("d.")),
            "{select}"
        );
        assert!(
            columns[12..].iter().all(|c| c.starts_with("e.")),
            "{select}"
        );
        assert_eq!(columns[0], "d.id");
        assert_eq!(columns[12], "e.seq");
        assert_eq!(columns[22], "e.callback::text");
    }
}

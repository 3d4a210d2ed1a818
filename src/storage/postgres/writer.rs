//! Group commit on PostgreSQL: one writer task per node takes every publish waiting, applies
//! them in one transaction with multi-row statements (events, then their deliveries, each one
//! `INSERT … SELECT FROM unnest(…)`), commits, and only then answers each sender. A 2xx
//! therefore means the event and all its deliveries are committed, as on the embedded
//! backend.
//!
//! Idempotency holds across nodes: event ids and idempotency keys are unique in the table,
//! and a row that conflicts is skipped (`ON CONFLICT DO NOTHING`). When two nodes publish the
//! same id at once, PostgreSQL makes the second insert wait for the first transaction; once
//! that commits the second finds the row and answers it as a duplicate.

use std::sync::Arc;

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::model::{Event, Seq};
use crate::storage::writer::{NewEvent, Published};

/// Publishes taken into one transaction at most.
const MAX_BATCH: usize = 1024;

#[derive(Debug, Error, Clone)]
pub enum PgWriteError {
    #[error("database: {0}")]
    Db(String),
    #[error("the writer has stopped")]
    Stopped,
}

impl From<tokio_postgres::Error> for PgWriteError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgWriteError::Db(e.to_string())
    }
}

struct Publish {
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Result<Vec<Published>, PgWriteError>>,
}

/// Sends publishes to the node's writer task.
#[derive(Clone)]
pub struct PgWriterHandle {
    tx: mpsc::Sender<Publish>,
    commits: Arc<std::sync::atomic::AtomicU64>,
}

impl PgWriterHandle {
    /// Appends events with their deliveries; resolves after the commit.
    pub async fn publish(&self, events: Vec<NewEvent>) -> Result<Vec<Published>, PgWriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Publish { events, reply })
            .await
            .map_err(|_| PgWriteError::Stopped)?;
        rx.await.map_err(|_| PgWriteError::Stopped)?
    }

    /// Transactions committed so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Starts the writer task over its own connection.
pub fn spawn(client: tokio_postgres::Client) -> PgWriterHandle {
    let (tx, rx) = mpsc::channel(65_536);
    let commits = Arc::new(std::sync::atomic::AtomicU64::new(0));
    tokio::spawn(run(client, rx, commits.clone()));
    PgWriterHandle { tx, commits }
}

async fn run(
    mut client: tokio_postgres::Client,
    mut rx: mpsc::Receiver<Publish>,
    commits: Arc<std::sync::atomic::AtomicU64>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let events: Vec<&NewEvent> = batch.iter().flat_map(|p| p.events.iter()).collect();
        match commit(&mut client, &events).await {
            Ok(mut out) => {
                commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // The answers in the order the events came, handed back per sender.
                for p in batch {
                    let rest = out.split_off(p.events.len().min(out.len()));
                    let mine = std::mem::replace(&mut out, rest);
                    drop(p.reply.send(Ok(mine)));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "publish transaction failed; nothing of it was stored");
                for p in batch {
                    drop(p.reply.send(Err(e.clone())));
                }
            }
        }
    }
}

/// One transaction: the new events (duplicates skipped), their deliveries, commit.
async fn commit(
    client: &mut tokio_postgres::Client,
    events: &[&NewEvent],
) -> Result<Vec<Published>, PgWriteError> {
    let tx = client.transaction().await?;
    let out = insert_events(&tx, events, None).await?;
    tx.commit().await?;
    Ok(out)
}

/// Writes events (those not stored yet) with their deliveries, announces the destinations
/// that got work, and answers each event's outcome in order. `receipt` names the inbound
/// receipt the events came from.
async fn insert_events(
    tx: &tokio_postgres::Transaction<'_>,
    events: &[&NewEvent],
    receipt: Option<i64>,
) -> Result<Vec<Published>, PgWriteError> {
    let now = crate::clock::now_micros();
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let sources: Vec<Option<&str>> = events.iter().map(|e| e.source.as_deref()).collect();
    let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
    let keys: Vec<Option<&str>> = events
        .iter()
        .map(|e| e.idempotency_key.as_deref())
        .collect();
    let priorities: Vec<i16> = events
        .iter()
        .map(|e| i16::from(e.priority.rank()))
        .collect();
    let ordinals: Vec<i32> = (0..events.len())
        .map(|i| i32::try_from(i).unwrap_or(i32::MAX))
        .collect();
    // In the order given, so seqs follow it; conflicting rows (an id or key already stored,
    // or repeated within this batch) are skipped.
    let inserted = tx
        .query(
            "INSERT INTO events (id, event_type, source, data, received_at, idempotency_key, priority, receipt)
             SELECT id, t, s, d, $6, k, p, $9
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $7::smallint[], $8::int[])
                  AS x(id, t, s, d, k, p, ord)
             ORDER BY ord
             ON CONFLICT DO NOTHING
             RETURNING seq, id",
            &[&ids, &types, &sources, &data, &keys, &now, &priorities, &ordinals, &receipt],
        )
        .await?;
    let mut created: std::collections::HashMap<String, Seq> = inserted
        .iter()
        .map(|r| {
            let seq: i64 = r.get(0);
            (r.get::<_, String>(1), u64::try_from(seq).unwrap_or(0))
        })
        .collect();
    // Their deliveries, all in one statement.
    let (mut d_seq, mut d_event, mut d_type, mut d_sub, mut d_prio) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut answered: Vec<Option<(Seq, u32)>> = Vec::with_capacity(events.len());
    for e in events {
        match created.remove(&e.id) {
            Some(seq) => {
                for s in &e.subscriptions {
                    d_seq.push(i64::try_from(seq).unwrap_or(i64::MAX));
                    d_event.push(e.id.as_str());
                    d_type.push(e.event_type.as_str());
                    d_sub.push(&**s);
                    d_prio.push(i16::from(e.priority.rank()));
                }
                answered.push(Some((
                    seq,
                    u32::try_from(e.subscriptions.len()).unwrap_or(0),
                )));
            }
            None => answered.push(None),
        }
    }
    if !d_seq.is_empty() {
        tx.execute(
            "INSERT INTO deliveries (event_seq, event_id, event_type, subscription, status,
                                     attempts, next_attempt_at, created_at, updated_at, origin, priority)
             SELECT seq, id, t, sub, 0, 0, $6, $6, $6, 0, p
             FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::smallint[])
                  AS x(seq, id, t, sub, p)",
            &[&d_seq, &d_event, &d_type, &d_sub, &d_prio, &now],
        )
        .await?;
        // Delivered to listeners when this commits, never if it rolls back.
        super::notify::announce(tx, &d_sub).await?;
    }
    // Duplicates answer the event already stored (by id, or by idempotency key).
    let mut out = Vec::with_capacity(events.len());
    for (e, a) in events.iter().zip(answered) {
        match a {
            Some((seq, deliveries)) => out.push(Published::Created {
                seq,
                id: e.id.clone(),
                deliveries,
            }),
            None => out.push(duplicate(tx, e).await?),
        }
    }
    Ok(out)
}

/// The stored event a skipped one duplicates, with its delivery count.
async fn duplicate(
    tx: &tokio_postgres::Transaction<'_>,
    e: &NewEvent,
) -> Result<Published, PgWriteError> {
    let row = tx
        .query_one(
            "SELECT seq, id, event_type, source, data, received_at, idempotency_key, priority,
                    (SELECT count(*) FROM deliveries d WHERE d.event_seq = events.seq)
             FROM events
             WHERE id = $1 OR ($2::text IS NOT NULL AND idempotency_key = $2)
             ORDER BY seq LIMIT 1",
            &[&e.id, &e.idempotency_key],
        )
        .await?;
    let seq: i64 = row.get(0);
    let prio: i16 = row.get(7);
    let deliveries: i64 = row.get(8);
    let event = Event {
        id: row.get(1),
        event_type: row.get(2),
        source: row.get(3),
        data: row.get(4),
        received_at: row.get(5),
        idempotency_key: row.get(6),
        receipt: None,
        priority: crate::model::Priority::ALL
            .into_iter()
            .find(|p| i16::from(p.rank()) == prio)
            .unwrap_or_default(),
        batch: None,
        callback: None,
    };
    Ok(Published::Duplicate {
        seq: u64::try_from(seq).unwrap_or(0),
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
/// transaction first checks (and share-locks) that `node` still holds `destination` under
/// `epoch`, so a node that lost its lease — a pause, a partition — writes nothing. As on the
/// embedded backend, each attempt is appended and its delivery moves on (succeeded, retrying
/// at its next time, or dead) unless it was made terminal meanwhile (cancelled while in
/// flight): then only the attempt is kept.
pub async fn record_attempts(
    client: &mut tokio_postgres::Client,
    (destination, node, epoch): (&str, &str, i64),
    records: &[crate::storage::writer::AttemptRecord],
) -> Result<Recorded, PgWriteError> {
    use crate::storage::writer::Next;
    let now = crate::clock::now_micros();
    let tx = client.transaction().await?;
    if !super::leases::holds(&tx, destination, node, epoch, now).await? {
        tx.rollback().await?;
        return Ok(Recorded::Fenced);
    }
    for r in records {
        let id = i64::try_from(r.delivery).unwrap_or(i64::MAX);
        // The next attempt's number, and the delivery locked against a concurrent operator.
        let Some(row) = tx
            .query_opt(
                "SELECT attempts, status FROM deliveries WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await?
        else {
            tracing::warn!(
                delivery = r.delivery,
                "attempt for an unknown delivery ignored"
            );
            continue;
        };
        let n: i32 = row.get::<_, i32>(0) + 1;
        let status: i16 = row.get(1);
        let a = &r.attempt;
        tx.execute(
            "INSERT INTO attempts (delivery, n, started_at, duration_us, status_code, error, response_body)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &id,
                &n,
                &a.started_at,
                &i64::try_from(a.duration_us).unwrap_or(i64::MAX),
                &a.status_code.map(i32::from),
                &a.error,
                &a.response_body,
            ],
        )
        .await?;
        let terminal = crate::model::DeliveryStatus::from_code(u8::try_from(status).unwrap_or(0))
            .is_some_and(crate::model::DeliveryStatus::is_terminal);
        use crate::model::DeliveryStatus as S;
        let (new_status, next_at, dead_at): (i16, Option<i64>, Option<i64>) = match r.next {
            _ if terminal => (status, None, None),
            Next::Succeeded => (i16::from(S::Succeeded.code()), None, None),
            Next::Retry { at } => (i16::from(S::Retrying.code()), Some(at), None),
            Next::Dead => (i16::from(S::Dead.code()), None, Some(now)),
        };
        tx.execute(
            "UPDATE deliveries SET attempts = $2, status = $3, next_attempt_at = $4,
                    last_error = CASE WHEN $7 THEN last_error ELSE $5 END,
                    updated_at = $6, dead_at = COALESCE($8, dead_at)
             WHERE id = $1",
            &[
                &id,
                &n,
                &new_status,
                &next_at,
                &r.error,
                &now,
                &terminal,
                &dead_at,
            ],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Recorded::Committed)
}

/// Stores an inbound provider request as a receipt with the event made from it (and its
/// deliveries), in one transaction, unless the source has seen it: by the provider's
/// delivery id, or by the body's fingerprint while the earlier receipt is within the window.
/// Two nodes receiving the same delivery at once store it once: the second's claim on the
/// de-duplication key waits for the first transaction and then finds the key taken.
pub async fn ingest(
    client: &mut tokio_postgres::Client,
    new: crate::storage::writer::NewReceipt,
    event: NewEvent,
) -> Result<crate::storage::writer::Ingested, PgWriteError> {
    use crate::storage::writer::Ingested;
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
    let claims: Vec<(&str, Option<crate::model::Micros>)> = r
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
            return Ok(Ingested::Duplicate {
                receipt_id: u64::try_from(id).unwrap_or(0),
                event_id: seen.get(1),
            });
        }
    }
    let out = insert_events(&tx, &[&event], Some(receipt_id)).await?;
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
    Ok(Ingested::Created {
        receipt_id: u64::try_from(receipt_id).unwrap_or(0),
        seq,
        event_id: id,
        deliveries,
    })
}

//! Operator writes on PostgreSQL, with the embedded backend's rules: retry (a delivery not
//! yet succeeded, or only dead ones for a redrive, is due now, its attempt count kept),
//! cancel (a delivery not yet terminal is never attempted again), and new deliveries of
//! stored events (replay, redrive). Each runs in one transaction, locks the rows it changes
//! (`FOR UPDATE`, so an attempt being recorded for them waits or is waited for) after
//! share-locking their events (so retention does not remove an event under them), and
//! once committed tells the owners of the destinations that got work (`notify::wake`).

use crate::model::{Delivery, DeliveryId, DeliveryStatus, Origin, Seq};
use crate::storage::writer::{CancelOutcome, RetryOutcome};

use super::reads::{DELIVERY_COLUMNS, delivery_row, origin_code};
use super::writer::PgWriteError;

/// Delivery `id`, locked for an operator's change, with its event share-locked first (the
/// order retention takes them in: it locks the event, then removes its deliveries). Retention
/// then cannot remove the event while this transaction may make the delivery live again, and
/// a delivery whose event retention is removing is waited for and found gone.
async fn locked(
    tx: &tokio_postgres::Transaction<'_>,
    id: DeliveryId,
) -> Result<Option<Delivery>, PgWriteError> {
    let id = i64::try_from(id).unwrap_or(i64::MAX);
    let event = tx
        .query_opt(
            "SELECT seq FROM events
             WHERE seq = (SELECT event_seq FROM deliveries WHERE id = $1)
             FOR KEY SHARE",
            &[&id],
        )
        .await?;
    if event.is_none() {
        return Ok(None);
    }
    let row = tx
        .query_opt(
            &format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = $1 FOR UPDATE"),
            &[&id],
        )
        .await?;
    Ok(row.as_ref().map(|r| delivery_row(r).1))
}

/// Makes these deliveries due now (only those of status `only`, when given; never a
/// succeeded one), keeping their attempt counts.
pub async fn retry_deliveries(
    client: &mut tokio_postgres::Client,
    ids: &[DeliveryId],
    only: Option<DeliveryStatus>,
) -> Result<Vec<RetryOutcome>, PgWriteError> {
    let now = crate::clock::now_micros();
    let tx = client.transaction().await?;
    let mut out = Vec::with_capacity(ids.len());
    let mut woken = Vec::new();
    for &id in ids {
        let Some(mut d) = locked(&tx, id).await? else {
            out.push(RetryOutcome::NotFound);
            continue;
        };
        let allowed = match only {
            Some(st) => d.status == st,
            None => d.status != DeliveryStatus::Succeeded,
        };
        if !allowed {
            out.push(RetryOutcome::NotAllowed(d));
            continue;
        }
        d.status = if d.attempts == 0 {
            DeliveryStatus::Pending
        } else {
            DeliveryStatus::Retrying
        };
        d.next_attempt_at = Some(now);
        d.updated_at = now;
        tx.execute(
            "UPDATE deliveries SET status = $2, next_attempt_at = $3, updated_at = $3,
                    dead_at = NULL WHERE id = $1",
            &[
                &i64::try_from(id).unwrap_or(i64::MAX),
                &i16::from(d.status.code()),
                &now,
            ],
        )
        .await?;
        woken.push(d.subscription.clone());
        out.push(RetryOutcome::Scheduled(d));
    }
    tx.commit().await?;
    super::notify::wake(client, &woken).await;
    Ok(out)
}

/// Cancels these deliveries unless already terminal; `reason` becomes their last error.
pub async fn cancel_deliveries(
    client: &mut tokio_postgres::Client,
    ids: &[DeliveryId],
    reason: Option<&str>,
) -> Result<Vec<CancelOutcome>, PgWriteError> {
    let now = crate::clock::now_micros();
    let tx = client.transaction().await?;
    let mut out = Vec::with_capacity(ids.len());
    for &id in ids {
        let Some(mut d) = locked(&tx, id).await? else {
            out.push(CancelOutcome::NotFound);
            continue;
        };
        if d.status.is_terminal() {
            out.push(CancelOutcome::NotAllowed(d));
            continue;
        }
        d.status = DeliveryStatus::Cancelled;
        d.next_attempt_at = None;
        d.updated_at = now;
        if let Some(r) = reason {
            d.last_error = Some(r.to_string());
        }
        tx.execute(
            "UPDATE deliveries SET status = $2, next_attempt_at = NULL, updated_at = $3,
                    last_error = COALESCE($4, last_error) WHERE id = $1",
            &[
                &i64::try_from(id).unwrap_or(i64::MAX),
                &i16::from(DeliveryStatus::Cancelled.code()),
                &now,
                &reason,
            ],
        )
        .await?;
        out.push(CancelOutcome::Cancelled(d));
    }
    tx.commit().await?;
    Ok(out)
}

/// New deliveries, due now, of stored events to destinations (replay, redrive); events
/// removed meanwhile are skipped. Answers how many were made.
pub async fn create_deliveries(
    client: &mut tokio_postgres::Client,
    items: &[(Seq, &str)],
    origin: Origin,
) -> Result<u64, PgWriteError> {
    let now = crate::clock::now_micros();
    let origin = origin_code(origin);
    let seqs: Vec<i64> = items
        .iter()
        .map(|(s, _)| i64::try_from(*s).unwrap_or(i64::MAX))
        .collect();
    let subs: Vec<&str> = items.iter().map(|(_, d)| *d).collect();
    let tx = client.transaction().await?;
    let made = tx
        .query(
            "INSERT INTO deliveries (event_seq, event_id, event_type, subscription, status,
                                     attempts, next_attempt_at, created_at, updated_at, origin, priority)
             SELECT e.seq, e.id, e.event_type, x.sub, 0, 0, $3, $3, $3, $4, e.priority
             FROM unnest($1::bigint[], $2::text[]) AS x(seq, sub)
             JOIN events e ON e.seq = x.seq
             -- Held until commit: retention cannot remove the event under its new delivery
             -- (no foreign key checks it), and one it removed first makes none.
             FOR KEY SHARE OF e
             RETURNING subscription",
            &[&seqs, &subs, &now, &origin],
        )
        .await?;
    tx.commit().await?;
    let woken: Vec<String> = made.iter().map(|r| r.get(0)).collect();
    super::notify::wake(client, &woken).await;
    Ok(made.len() as u64)
}

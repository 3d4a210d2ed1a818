//! Retention on PostgreSQL: old events go with everything hanging off them once all their
//! deliveries are terminal, on one node at a time. A sweep takes a session advisory lock
//! without waiting; a node that does not get it skips the sweep (another node is sweeping).

/// The advisory lock key retention sweeps take (`retain` in ASCII, beside the migration's).
const LOCK_KEY: i64 = 0x7265_7461_696e;

/// What one sweep did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swept {
    /// Another node holds the sweep.
    Skipped,
    /// Events removed (their deliveries, attempts, receipts and batches with them).
    Removed(u64),
    /// The database's schema is newer than this node knows (this version; none when the
    /// version could not be read): what goes with an event may have changed, so this node
    /// leaves retention to the nodes of the release that migrated it.
    NewerSchema(Option<i64>),
}

/// Removes up to `limit` events received before `cutoff` whose deliveries are all terminal
/// and last changed before `cutoff`, in one transaction (`expired`, then `remove_locked`):
/// their deliveries and attempts with them, receipts and de-duplication keys with their
/// events, batches with their events.
pub async fn sweep(
    client: &mut tokio_postgres::Client,
    cutoff: crate::model::Micros,
    limit: i64,
) -> Result<Swept, tokio_postgres::Error> {
    let got: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK_KEY])
        .await?
        .get(0);
    if !got {
        return Ok(Swept::Skipped);
    }
    let result = remove(client, cutoff, limit).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await;
    let swept = result?;
    unlocked?;
    Ok(swept)
}

async fn remove(
    client: &mut tokio_postgres::Client,
    cutoff: crate::model::Micros,
    limit: i64,
) -> Result<Swept, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // The migration lock, shared until the transaction ends: no migration commits while
    // this sweep decides by the schema it reads next. One under way: skip this round.
    let got: bool = tx
        .query_one(
            "SELECT pg_try_advisory_xact_lock_shared($1)",
            &[&super::migrate::LOCK_KEY],
        )
        .await?
        .get(0);
    if !got {
        return Ok(Swept::Skipped);
    }
    match super::migrate::version(&tx).await {
        Ok(v) if v <= super::migrate::SCHEMA_VERSION => {}
        Ok(v) => return Ok(Swept::NewerSchema(Some(v))),
        Err(super::migrate::MigrateError::Db(e)) => return Err(e),
        // One that cannot be read is taken for newer: nothing is removed on a guess.
        Err(_) => return Ok(Swept::NewerSchema(None)),
    }
    let doomed = expired(&tx, cutoff, limit).await?;
    let n = if doomed.is_empty() {
        0
    } else {
        remove_locked(&tx, &doomed, cutoff).await?
    };
    tx.commit().await?;
    Ok(Swept::Removed(n))
}

/// An event whose deliveries all ended before the cutoff (`$1`): both steps of a sweep judge
/// by it, the second again after the first's locks.
const ENDED: &str = "NOT EXISTS (
                   SELECT 1 FROM deliveries d
                   WHERE d.event_seq = e.seq
                     AND (d.status NOT IN (2, 4, 5) OR d.updated_at >= $1))";

/// The first step of a sweep: up to `limit` events received before `cutoff` whose
/// deliveries all ended before it, locked (`FOR UPDATE`) in `tx`, skipping any an operator
/// is working on. From here until `tx` ends, a replay, redrive, retry or cancel of them
/// waits (each share-locks the event first).
pub async fn expired(
    tx: &tokio_postgres::Transaction<'_>,
    cutoff: crate::model::Micros,
    limit: i64,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let rows = tx
        .query(
            &format!(
                "SELECT e.seq FROM events e
             WHERE e.received_at < $1
               -- The newest event stays, as on the embedded backend.
               AND e.seq < (SELECT max(seq) FROM events)
               AND {ENDED}
             ORDER BY e.seq
             LIMIT $2
             FOR UPDATE SKIP LOCKED"
            ),
            &[&cutoff, &limit],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The second step: removes the events `expired` locked, with their deliveries and attempts
/// (no foreign key does it: see migration 3), their receipts and their batches. A statement
/// of its own, so it sees what committed before the locks were taken: an event an operator
/// gave live work in between (a replay, a retry) is kept. Answers how many events went.
pub async fn remove_locked(
    tx: &tokio_postgres::Transaction<'_>,
    doomed: &[i64],
    cutoff: crate::model::Micros,
) -> Result<u64, tokio_postgres::Error> {
    let gone = tx
        .query(
            &format!(
                "WITH gone AS (
                 DELETE FROM events e
                 WHERE e.seq = ANY($2)
                   AND {ENDED}
                 RETURNING e.seq, e.receipt, e.batch
             ), deliveries_gone AS (
                 DELETE FROM deliveries d USING gone
                 WHERE d.event_seq = gone.seq
                 RETURNING d.id
             ), attempts_gone AS (
                 DELETE FROM attempts a USING deliveries_gone
                 WHERE a.delivery = deliveries_gone.id
             )
             SELECT receipt, batch FROM gone"
            ),
            &[&cutoff, &doomed],
        )
        .await?;
    let receipts: Vec<i64> = gone.iter().filter_map(|r| r.get(0)).collect();
    let batches: Vec<String> = gone.iter().filter_map(|r| r.get(1)).collect();
    if !receipts.is_empty() {
        // The newest receipt stays, as on the embedded backend.
        tx.execute(
            "DELETE FROM receipts WHERE id = ANY($1) AND id < (SELECT max(id) FROM receipts)",
            &[&receipts],
        )
        .await?;
    }
    if !batches.is_empty() {
        tx.execute("DELETE FROM batches WHERE id = ANY($1)", &[&batches])
            .await?;
    }
    Ok(gone.len() as u64)
}

//! How new work reaches the node that owns its destination: LISTEN/NOTIFY as the fast path,
//! a scan of due deliveries as the correctness path.
//!
//! The transaction that makes deliveries notifies `dispatchd_due` with each destination's
//! id; PostgreSQL delivers a notification only when that transaction commits, and never for
//! one that rolls back. A node listens and hands what it hears to the destinations it holds.
//! A notification can still be lost (a dropped connection, a node that restarts), and some
//! PostgreSQL-compatible databases have no NOTIFY at all: every node also scans its held
//! destinations' due deliveries periodically (`due`), so a lost notification only costs
//! latency.

use std::future::poll_fn;

use tokio::sync::mpsc;

use crate::model::{DeliveryId, Micros};

/// The channel new deliveries are announced on; the payload is the destination's id, with
/// the deliveries' ids when the announcing node has them (`Work`).
pub const CHANNEL: &str = "dispatchd_due";

/// A payload on `CHANNEL` that starts with this names a destination an operator asked for
/// attempts of (retry, redrive): they go now, even through an open breaker's cooldown.
pub const OPERATOR: &str = "operator:";

/// The channel changes to the subscriptions created over the API (and their switches) are
/// announced on; the payload is the subscription's id. Every node reloads its set.
pub const SUBSCRIPTIONS: &str = "dispatchd_subscriptions";

/// The channel a node announces leases it gave up on (the payload is its node id): the
/// others balance at once, so the node that should run them takes them without waiting for
/// its next round.
pub const LEASES: &str = "dispatchd_leases";

/// The channel a node announces an API reload on (the payload is its node id): the others
/// re-read their own config files.
pub const RELOAD: &str = "dispatchd_reload";

/// Announces, within the caller's transaction (or at once), that subscription `id` changed.
pub async fn subscriptions_changed(
    c: &impl tokio_postgres::GenericClient,
    id: &str,
) -> Result<(), tokio_postgres::Error> {
    c.execute("SELECT pg_notify($1, $2)", &[&SUBSCRIPTIONS, &id])
        .await
        .map(drop)
}

/// A notification heard: its channel and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heard {
    pub channel: String,
    pub payload: String,
}

/// Most bytes of one work notification's payload (PostgreSQL refuses over 8000).
const PAYLOAD_MAX: usize = 7_000;

/// New deliveries for one destination, all due at `at`: what a publish on one node tells
/// the node that owns the destination, so that the owner hands them to its scheduler
/// without reading the table. Payload: `{destination} {at} {id}:{priority},{id}:{priority}…`
/// (destination ids hold no spaces); a payload that is only a destination id asks for a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Work {
    pub destination: String,
    pub at: Micros,
    /// Delivery ids with their priority codes.
    pub deliveries: Vec<(DeliveryId, i16)>,
}

impl Work {
    /// The payloads that carry it, each within PostgreSQL's limit.
    pub fn payloads(&self) -> Vec<String> {
        let head = format!("{} {} ", self.destination, self.at);
        let mut out = Vec::new();
        let mut p = head.clone();
        for (id, prio) in &self.deliveries {
            let item = format!("{id}:{prio}");
            if p.len() > head.len() && p.len() + 1 + item.len() > PAYLOAD_MAX {
                out.push(std::mem::replace(&mut p, head.clone()));
            }
            if p.len() > head.len() {
                p.push(',');
            }
            p.push_str(&item);
        }
        if p.len() > head.len() {
            out.push(p);
        }
        out
    }

    /// Reads a payload made by `payloads`; `None` for anything else (a destination id alone,
    /// which asks for a scan, or a payload this version does not know).
    pub fn parse(payload: &str) -> Option<Work> {
        let mut parts = payload.splitn(3, ' ');
        let destination = parts.next()?.to_string();
        let at: Micros = parts.next()?.parse().ok()?;
        let deliveries = parts
            .next()?
            .split(',')
            .map(|item| {
                let (id, prio) = item.split_once(':')?;
                Some((id.parse().ok()?, prio.parse().ok()?))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Work {
            destination,
            at,
            deliveries,
        })
    }
}

/// Announces, within the caller's transaction, new deliveries for destinations held by
/// other nodes, with their ids.
pub async fn announce_work(
    tx: &impl tokio_postgres::GenericClient,
    work: &[Work],
) -> Result<(), tokio_postgres::Error> {
    let payloads: Vec<String> = work.iter().flat_map(Work::payloads).collect();
    notify_each(tx, &payloads).await
}

/// Sends each payload on `CHANNEL`, in one statement (none for none).
async fn notify_each<P: tokio_postgres::types::ToSql + Sync>(
    tx: &impl tokio_postgres::GenericClient,
    payloads: &[P],
) -> Result<(), tokio_postgres::Error> {
    if payloads.is_empty() {
        return Ok(());
    }
    tx.execute(
        "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS x(p)",
        &[&CHANNEL, &payloads],
    )
    .await
    .map(drop)
}

/// Announces, within the caller's transaction, that these destinations have new work (the
/// owner scans for it).
pub async fn announce(
    tx: &impl tokio_postgres::GenericClient,
    destinations: &[&str],
) -> Result<(), tokio_postgres::Error> {
    let mut once = destinations.to_vec();
    once.sort_unstable();
    once.dedup();
    notify_each(tx, &once).await
}

/// Listens on its own connection to `url` to both channels; answers what is announced, as it
/// comes. The channel closes when the connection ends (the caller reconnects; its scans cover
/// the gap).
pub async fn listen(url: &str) -> Result<mpsc::UnboundedReceiver<Heard>, tokio_postgres::Error> {
    let (client, mut conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let heard = tx.clone();
    // Drives the connection: queries' answers, and the notifications they do not ask for.
    tokio::spawn(async move {
        while let Some(msg) = poll_fn(|cx| conn.poll_message(cx)).await {
            match msg {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    let h = Heard {
                        channel: n.channel().to_string(),
                        payload: n.payload().to_string(),
                    };
                    if heard.send(h).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the notification connection ended");
                    return;
                }
            }
        }
    });
    client
        .batch_execute(&format!(
            "LISTEN {CHANNEL}; LISTEN {SUBSCRIPTIONS}; LISTEN {RELOAD}; LISTEN {LEASES}"
        ))
        .await?;
    // The session (and its LISTEN) lasts while someone receives.
    tokio::spawn(async move {
        tx.closed().await;
        drop(client);
    });
    Ok(rx)
}

/// One due delivery found by a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub delivery: DeliveryId,
    pub destination: String,
    pub at: Micros,
    pub priority: i16,
}

/// The deliveries of these destinations due by `until`, earliest first, at most `limit`.
pub async fn due(
    c: &impl tokio_postgres::GenericClient,
    destinations: &[&str],
    until: Micros,
    limit: i64,
) -> Result<Vec<Due>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT id, subscription, next_attempt_at, priority FROM deliveries
             WHERE subscription = ANY($1::text[]) AND next_attempt_at <= $2
             ORDER BY next_attempt_at, id LIMIT $3",
            &[&destinations, &until, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Due {
            delivery: u64::try_from(r.get::<_, i64>(0)).unwrap_or(0),
            destination: r.get(1),
            at: r.get(2),
            priority: r.get(3),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_payloads_round_trip_and_stay_within_the_limit() {
        let w = Work {
            destination: "callback:https://hooks.example.com:443".into(),
            at: 1_764_000_000_123_456,
            deliveries: (1..=2_000u64)
                .map(|i| (i * 1_000_003, (i % 3) as i16))
                .collect(),
        };
        let payloads = w.payloads();
        assert!(payloads.len() > 1, "2,000 ids need more than one payload");
        let mut back = Vec::new();
        for p in &payloads {
            assert!(p.len() <= PAYLOAD_MAX, "{} bytes", p.len());
            let got = Work::parse(p).unwrap_or_else(|| panic!("unparsed: {p}"));
            assert_eq!(got.destination, w.destination);
            assert_eq!(got.at, w.at);
            back.extend(got.deliveries);
        }
        assert_eq!(back, w.deliveries);
        // A bare destination id (scan) or a damaged payload is not work.
        assert_eq!(Work::parse("bench"), None);
        assert_eq!(Work::parse("bench 12 3:x"), None);
        assert_eq!(Work::parse("bench 12 "), None);
        let empty = Work {
            destination: "bench".into(),
            at: 1,
            deliveries: Vec::new(),
        };
        assert!(empty.payloads().is_empty());
    }
}

//! How new work reaches the node that owns its destination: LISTEN/NOTIFY as the fast path,
//! a scan of due deliveries as the correctness path.
//!
//! A node that makes deliveries for destinations held elsewhere announces them on
//! `dispatchd_due` once its transaction has committed (`Announcer`), with each destination's
//! id and the new deliveries' ids (`Work`); an operator's write tells the owners of the
//! destinations it gave work to right after its commit (`wake`). Neither notifies inside
//! its transaction:
//! PostgreSQL serialises the commits of all transactions that notify, across the whole
//! server, with a lock held through each one's WAL flush, so the publishes of every node
//! would commit one after another instead of flushing together. A node listens and hands
//! what it hears to the destinations it holds. A notification can be lost (a node that dies
//! between its commit and the announcement, a dropped connection, a node that restarts), and
//! some PostgreSQL-compatible databases have no NOTIFY at all: every node also scans its held
//! destinations' due deliveries periodically (`due`), so a lost notification only costs
//! latency.

use std::fmt::Write as _;
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

/// Delivery ids in one work notification at most; `Work::payloads` puts fewer in when the
/// destination id is long, so that each payload stays within `PAYLOAD_MAX` bytes
/// (destination ids are at most a few hundred bytes: subscription ids 64, callback hosts
/// 253).
pub const IDS_PER_PAYLOAD: usize = 200;

/// Most bytes of one work notification's payload (PostgreSQL refuses 8000 or more).
pub const PAYLOAD_MAX: usize = 7_000;

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
    /// The payloads that announce this work: one per `IDS_PER_PAYLOAD` deliveries, fewer
    /// when the destination id is long (an id with its priority takes 24 bytes at most, the
    /// destination and the time at most 32 besides its id).
    pub fn payloads(&self) -> Vec<String> {
        let per = IDS_PER_PAYLOAD
            .min((PAYLOAD_MAX.saturating_sub(32 + self.destination.len()) / 24).max(1));
        self.deliveries
            .chunks(per)
            .map(|part| {
                let mut p = format!("{} {} ", self.destination, self.at);
                for (i, (id, prio)) in part.iter().enumerate() {
                    if i > 0 {
                        p.push(',');
                    }
                    let _ = write!(p, "{id}:{prio}");
                }
                p
            })
            .collect()
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

/// Announcements waiting for the announcer at most; past that they are dropped (the owners'
/// scans find the work).
const ANNOUNCE_QUEUE: usize = 4096;

/// Notifies `$1` once with each payload of the array `$2`, in one statement.
const NOTIFY_EACH: &str = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS x(p)";

/// Payloads sent in one statement at most.
const ANNOUNCE_BATCH: usize = 4096;

/// Sends work notifications for transactions that have committed, off the committing task's
/// path: every announcement waiting goes in one statement, on a pooled connection (handed
/// back after it), which notifies in a transaction that writes nothing and so waits for no
/// WAL flush. Cheap to clone.
#[derive(Clone)]
pub struct Announcer {
    tx: mpsc::Sender<Vec<String>>,
}

impl Announcer {
    /// Starts the announcing task on connections from `pool`.
    pub fn spawn(pool: super::Pool, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(ANNOUNCE_QUEUE);
        tokio::spawn(announce_all(pool, metrics, rx));
        Announcer { tx }
    }

    /// Announces `work`, whose transaction has committed. Never waits: with the queue full
    /// (the database slow or gone) the announcement is dropped and the owner's scan finds
    /// the work.
    pub fn send(&self, work: &[Work]) {
        let payloads: Vec<String> = work.iter().flat_map(Work::payloads).collect();
        if !payloads.is_empty() && self.tx.try_send(payloads).is_err() {
            tracing::debug!("announcement queue full; the owners' scans will find the work");
        }
    }
}

async fn announce_all(
    pool: super::Pool,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    mut rx: mpsc::Receiver<Vec<String>>,
) {
    while let Some(mut payloads) = rx.recv().await {
        while payloads.len() < ANNOUNCE_BATCH {
            match rx.try_recv() {
                Ok(more) => payloads.extend(more),
                Err(_) => break,
            }
        }
        let sent = match pool.get().await {
            Ok(c) => notify_all(&c, &payloads)
                .await
                .map_err(|e| super::describe(&e)),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = sent {
            metrics.cluster_db_errors.inc();
            tracing::warn!(error = %e, "cannot announce new work; the owners' scans will find it");
        }
    }
}

/// One statement, one round trip (prepared once per connection).
async fn notify_all(
    c: &deadpool_postgres::Object,
    payloads: &[String],
) -> Result<(), tokio_postgres::Error> {
    let st = c.prepare_cached(NOTIFY_EACH).await?;
    c.execute(&st, &[&CHANNEL, &payloads]).await.map(drop)
}

/// Tells the owners of `destinations` that an operator's write, just committed, gave them
/// work (retry, redrive, replay): each scans for it and starts it at once, through an open
/// breaker's cooldown (`OPERATOR`). Sent on the writer's own connection, once each, in a
/// transaction that writes nothing; not queued like `Announcer::send`, so that a busy
/// node's announcements cannot crowd it out. If it fails the write stands (it has
/// committed), and the owner's scan finds the work without the cooldown's exception.
pub async fn wake(c: &impl tokio_postgres::GenericClient, destinations: &[String]) {
    let mut payloads: Vec<String> = destinations
        .iter()
        .map(|d| format!("{OPERATOR}{d}"))
        .collect();
    payloads.sort_unstable();
    payloads.dedup();
    if payloads.is_empty() {
        return;
    }
    if let Err(e) = c.execute(NOTIFY_EACH, &[&CHANNEL, &payloads]).await {
        tracing::warn!(error = %super::describe(&e), "cannot tell the owners of an operator's work; their scans will find it");
    }
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
    fn work_payloads_parse() {
        let w =
            Work::parse("callback:https://hooks.example.com:443 1764000000123456 7:0,1000003:2");
        assert_eq!(
            w,
            Some(Work {
                destination: "callback:https://hooks.example.com:443".into(),
                at: 1_764_000_000_123_456,
                deliveries: vec![(7, 0), (1_000_003, 2)],
            })
        );
        // A bare destination id (scan) or a damaged payload is not work.
        assert_eq!(Work::parse("bench"), None);
        assert_eq!(Work::parse("bench 12 3:x"), None);
        assert_eq!(Work::parse("bench 12 "), None);
    }

    #[test]
    fn payloads_fit_and_read_back_as_the_work_they_announce() {
        for destination in [
            "a".to_string(),
            format!("callback:https://{}:443", "h".repeat(253)),
        ] {
            let work = Work {
                destination: destination.clone(),
                at: i64::MAX,
                deliveries: (0..1000).map(|i| (u64::MAX - i, i16::MAX)).collect(),
            };
            let payloads = work.payloads();
            // Every id once, in order, and no payload past the limit even with the widest
            // numbers.
            assert!(
                payloads.len() >= 1000 / IDS_PER_PAYLOAD,
                "{}",
                payloads.len()
            );
            let mut back = Vec::new();
            for p in &payloads {
                assert!(p.len() <= PAYLOAD_MAX, "{} bytes", p.len());
                let w = Work::parse(p).expect("a payload made here parses");
                assert_eq!(
                    (w.destination.as_str(), w.at),
                    (destination.as_str(), i64::MAX)
                );
                back.extend(w.deliveries);
            }
            assert_eq!(back, work.deliveries);
        }
        let none = Work {
            destination: "a".into(),
            at: 1,
            deliveries: Vec::new(),
        };
        assert!(none.payloads().is_empty());
    }
}

//! Destination ownership across nodes: every destination (a subscription, or a callback
//! host) is run by exactly one live node at a time, under a lease with a fencing epoch.
//!
//! - Nodes heartbeat in `nodes`; a node not seen for a lease period is gone.
//! - Which node should own a destination is rendezvous hashing over the live nodes: each
//!   node scores `hash(node, destination)` and the highest wins. Every node computes the same
//!   answer from the same list, a node joining takes about 1/n of the destinations, and a
//!   node leaving moves only its own.
//! - `balance` makes the leases follow that: a node takes the destinations it should own
//!   whose lease is free or expired (a new epoch each time a lease changes hands), renews
//!   those it holds, and hands over those the hashing now gives another live node: it stops
//!   starting attempts for them, keeps their leases while the attempts under way end and are
//!   recorded (a lease period at most), then gives them up and says so (NOTIFY), and the
//!   next owner takes them at once.
//! - The epoch fences: an outcome is recorded only while `(owner, epoch)` is still the lease
//!   (`holds`, checked in the transaction that records), so a node that lost its lease — a
//!   pause, a partition — cannot write for that destination any more.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::model::{Micros, micros};

/// A lease this node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub epoch: i64,
    pub expires_at: Micros,
}

/// What one `balance` round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Balance {
    /// Every destination this node holds now, with its epoch.
    pub held: HashMap<String, Held>,
    /// Taken this round (free, expired, or given up by another node).
    pub taken: Vec<String>,
    /// Given up this round (the hashing names another live node).
    pub released: Vec<String>,
    /// Held, but being handed over to the node the hashing names (in `held` too).
    pub handing_over: HashSet<String>,
}

/// A 64-bit FNV-1a hash of the node and the destination: stable across processes and
/// versions, which the standard library's hasher is not.
fn score(node: &str, destination: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes().chain([0xff]).chain(destination.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // A final mix, so nodes whose names differ in the last byte spread well.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// The live node that should own `destination` (none when no node is live).
pub fn owner<'a>(destination: &str, live: &'a [String]) -> Option<&'a str> {
    live.iter()
        .max_by_key(|n| (score(n, destination), n.as_str()))
        .map(String::as_str)
}

/// Records that `node` is alive at `now`.
pub async fn heartbeat(
    c: &tokio_postgres::Client,
    node: &str,
    now: Micros,
) -> Result<(), tokio_postgres::Error> {
    c.execute(
        "INSERT INTO nodes (id, started_at, seen_at) VALUES ($1, $2, $2)
         ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
        &[&node, &now],
    )
    .await
    .map(drop)
}

/// The nodes seen within `lease` of `now`, sorted.
pub async fn live_nodes(
    c: &tokio_postgres::Client,
    now: Micros,
    lease: Duration,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let since = now.saturating_sub(micros(lease));
    let rows = c
        .query(
            "SELECT id FROM nodes WHERE seen_at >= $1 ORDER BY id",
            &[&since],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// One round for `node`: heartbeat, then take, renew and give up leases of `destinations`
/// so that it holds exactly those the hashing gives it (and can take: one still leased to a
/// live node that has not given it up yet waits for the next round).
///
/// A lease the hashing now gives another node is handed over in two steps: the first round
/// keeps (renews) it and reports it in `handing_over`, so the node stops starting attempts
/// for it; a later round gives it up once its destination is in `ready` (the attempts that
/// were under way have ended and been recorded, or the hand-over has waited long enough).
/// An attempt under way is then not cut off by the move and made a second time by the
/// next owner.
pub async fn balance(
    c: &tokio_postgres::Client,
    node: &str,
    destinations: &[String],
    ready: &HashSet<String>,
    now: Micros,
    lease: Duration,
) -> Result<Balance, tokio_postgres::Error> {
    heartbeat(c, node, now).await?;
    let live = live_nodes(c, now, lease).await?;
    let until = now.saturating_add(micros(lease));
    let before: HashSet<String> = c
        .query(
            "SELECT destination FROM destination_leases WHERE owner = $1",
            &[&node],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (mine, theirs): (Vec<&String>, Vec<&String>) = destinations
        .iter()
        .partition(|d| owner(d, &live) == Some(node));
    let mut mine: Vec<&str> = mine.into_iter().map(String::as_str).collect();
    // Held here, but another live node should run them: given up when ready, else kept
    // while their attempts end.
    let (give_up, keep): (Vec<&str>, Vec<&str>) = theirs
        .into_iter()
        .map(String::as_str)
        .filter(|d| before.contains(*d))
        .partition(|d| ready.contains(*d));
    let released: Vec<String> = c
        .query(
            "DELETE FROM destination_leases
             WHERE owner = $1 AND destination = ANY($2::text[])
             RETURNING destination",
            &[&node, &give_up],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    mine.extend(keep.iter().copied());
    // Taken or renewed: free, expired, or already ours (renewal keeps the epoch; a lease
    // changing hands gets the next epoch). Locked in destination order, as the writer's
    // outcome statement locks them, so the two cannot deadlock.
    let rows = c
        .query(
            "INSERT INTO destination_leases AS l (destination, owner, epoch, expires_at)
             SELECT d, $1, 1, $3 FROM unnest($2::text[]) AS x(d) ORDER BY d
             ON CONFLICT (destination) DO UPDATE
                SET owner = excluded.owner,
                    epoch = CASE WHEN l.owner = excluded.owner THEN l.epoch ELSE l.epoch + 1 END,
                    expires_at = excluded.expires_at
                WHERE l.owner = excluded.owner OR l.expires_at < $4
             RETURNING destination, epoch",
            &[&node, &mine, &until, &now],
        )
        .await?;
    let mut out = Balance {
        released,
        ..Balance::default()
    };
    for r in rows {
        let d: String = r.get(0);
        let epoch: i64 = r.get(1);
        if !before.contains(&d) {
            out.taken.push(d.clone());
        }
        if keep.contains(&d.as_str()) {
            out.handing_over.insert(d.clone());
        }
        out.held.insert(
            d,
            Held {
                epoch,
                expires_at: until,
            },
        );
    }
    Ok(out)
}

/// Whether `node` still holds `destination` under `epoch` at `now`: what a transaction that
/// records outcomes checks (with `FOR SHARE`, so a takeover waits for it to commit) before
/// writing anything for that destination.
pub async fn holds(
    c: &impl tokio_postgres::GenericClient,
    destination: &str,
    node: &str,
    epoch: i64,
    now: Micros,
) -> Result<bool, tokio_postgres::Error> {
    let row = c
        .query_opt(
            "SELECT 1 FROM destination_leases
             WHERE destination = $1 AND owner = $2 AND epoch = $3 AND expires_at >= $4
             FOR SHARE",
            &[&destination, &node, &epoch, &now],
        )
        .await?;
    Ok(row.is_some())
}

/// Leaves the cluster (at shutdown): gives up every lease `node` holds and its heartbeat, so
/// the others take its destinations at their next round instead of after the lease period.
/// Answers how many leases it gave up.
pub async fn release_all(
    c: &tokio_postgres::Client,
    node: &str,
) -> Result<u64, tokio_postgres::Error> {
    let n = c
        .execute("DELETE FROM destination_leases WHERE owner = $1", &[&node])
        .await?;
    c.execute("DELETE FROM nodes WHERE id = $1", &[&node])
        .await?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rendezvous hashing spreads destinations about evenly and, when a node joins, moves
    /// only destinations to the newcomer.
    #[test]
    fn rendezvous_spreads_and_moves_little() {
        let nodes: Vec<String> = ["node-a", "node-b", "node-c"].map(String::from).to_vec();
        let dests: Vec<String> = (0..3000).map(|i| format!("sub-{i}")).collect();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for d in &dests {
            if let Some(o) = owner(d, &nodes) {
                *counts.entry(o).or_default() += 1;
            }
        }
        for n in &nodes {
            let c = counts.get(n.as_str()).copied().unwrap_or(0);
            assert!((800..=1200).contains(&c), "{n}: {c} of 3000");
        }
        let mut four = nodes.clone();
        four.push("node-d".into());
        for d in &dests {
            let (before, after) = (owner(d, &nodes), owner(d, &four));
            assert!(
                before == after || after == Some("node-d"),
                "{d}: {before:?} -> {after:?}"
            );
        }
        assert_eq!(owner("x", &[]), None);
    }
}

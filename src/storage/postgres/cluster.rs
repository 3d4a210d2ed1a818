//! A node's part in the cluster: which destinations it runs, and how their work reaches it.
//!
//! - `Leases` is this node's view of the leases it holds (destination → epoch). The
//!   scheduler loads only their deliveries, the router hands jobs only to their tasks, a
//!   destination task starts attempts only while its lease is held, and the writer records
//!   outcomes only under the epoch held (checked again in the recording transaction).
//! - `run_leases` heartbeats and balances every third of the lease period (see
//!   `leases::balance`); a node that cannot reach the database for a whole lease period
//!   drops every lease it had, since another node may hold them by then.
//! - `run_feed` is how work reaches the scheduler: NOTIFY for deliveries made on other
//!   nodes (fast path), a scan of the held destinations' due deliveries every
//!   `scan_interval` and on every lease taken (correctness path: a lost notification costs
//!   latency, nothing else), and subscription changes made on other nodes (reload).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Shared, leases};
use crate::model::{Micros, micros};
use crate::scheduler::driver::Msg;
use crate::storage::writer::Due;

/// A lease this node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    epoch: i64,
    /// Being handed over since then: the hashing gives the destination to another node, so
    /// no attempt starts here any more, and the lease is kept (renewed) only until the
    /// attempts already under way have ended and their outcomes are recorded.
    handing_over: Option<crate::clock::Instant>,
}

/// The leases this node holds, by destination, with their epochs.
#[derive(Debug, Default)]
pub struct Leases {
    held: RwLock<HashMap<String, Lease>>,
}

impl Leases {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Lease>> {
        self.held.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Lease>> {
        self.held.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this node runs `destination`: holds its lease and is not handing it over.
    /// New work for it comes here; otherwise it goes to the next owner.
    pub fn holds(&self, destination: &str) -> bool {
        self.running(destination).is_some()
    }

    /// The epoch of a lease this node runs the destination under (`None` while handing
    /// it over): attempts start only under it.
    pub fn running(&self, destination: &str) -> Option<i64> {
        self.read()
            .get(destination)
            .filter(|l| l.handing_over.is_none())
            .map(|l| l.epoch)
    }

    /// The epoch of a lease held, handed over or not: outcomes are recorded under it.
    pub fn epoch(&self, destination: &str) -> Option<i64> {
        self.read().get(destination).map(|l| l.epoch)
    }

    /// The destinations this node runs.
    pub fn held_ids(&self) -> Vec<String> {
        self.read()
            .iter()
            .filter(|(_, l)| l.handing_over.is_none())
            .map(|(d, _)| d.clone())
            .collect()
    }

    /// Leases held, those being handed over included.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Leases being handed over, with since when.
    fn handing_over(&self) -> Vec<(String, crate::clock::Instant)> {
        self.read()
            .iter()
            .filter_map(|(d, l)| l.handing_over.map(|t| (d.clone(), t)))
            .collect()
    }

    /// A recording transaction found the lease gone: the destination stops here at once.
    pub fn lost(&self, destination: &str) {
        if self.write().remove(destination).is_some() {
            tracing::warn!(destination, "lease lost to another node");
        }
    }

    /// Puts a balance round's result in force: the leases held with their epochs, and which
    /// of them are being handed over. Answers what was gained and what was lost.
    fn replace(
        &self,
        now: HashMap<String, i64>,
        handing_over: &HashSet<String>,
    ) -> (Vec<String>, Vec<String>) {
        let mut held = self.write();
        // Gained: taken (or taken again under a new epoch), or run here again after a
        // hand-over that stopped (the hashing gives it back): new work for it was announced
        // to another node meanwhile, and the scan on gain finds it.
        let gained = now
            .iter()
            .filter(|(d, e)| match held.get(*d) {
                Some(l) => {
                    l.epoch != **e || (l.handing_over.is_some() && !handing_over.contains(*d))
                }
                None => true,
            })
            .map(|(d, _)| d.clone())
            .collect();
        let lost = held
            .keys()
            .filter(|d| !now.contains_key(*d))
            .cloned()
            .collect();
        let started = crate::clock::Instant::now();
        let next = now
            .into_iter()
            .map(|(d, epoch)| {
                let handing_over = handing_over
                    .contains(&d)
                    .then(|| held.get(&d).and_then(|l| l.handing_over).unwrap_or(started));
                (
                    d,
                    Lease {
                        epoch,
                        handing_over,
                    },
                )
            })
            .collect();
        *held = next;
        (gained, lost)
    }
}

/// What the lease and feed loops need from the rest of the daemon.
pub struct Node {
    pub shared: Shared,
    pub lease: Duration,
    pub scan_interval: Duration,
    /// How far ahead scans read due deliveries (the scheduler's horizon).
    pub horizon: Duration,
    pub scheduler: mpsc::UnboundedSender<Msg>,
    /// The destinations there are: subscriptions in force (callback hosts with work are
    /// found in the database).
    pub destinations: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    /// Reloads the subscriptions from the database (another node changed them).
    pub refresh: Box<dyn Fn() -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>,
    /// Re-reads this node's config file (another node was asked to reload).
    pub reload: Box<dyn Fn() -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>,
    /// Whether a destination has attempts under way or outcomes not yet recorded here.
    pub busy: Box<dyn Fn(&str) -> bool + Send + Sync>,
    /// Wakes the lease loop for a round now (another node gave leases up).
    pub rebalance: tokio::sync::Notify,
}

/// The callback hosts with scheduled deliveries: destinations while they have work. Served
/// by the partial index of the same predicate (migration 0002), whatever the collation.
pub const CALLBACK_DESTINATIONS: &str = "SELECT DISTINCT subscription FROM deliveries
     WHERE next_attempt_at IS NOT NULL AND subscription LIKE 'callback:%'";

/// Rows one scan reads at most.
const SCAN_LIMIT: i64 = 10_000;

/// Heartbeats and balances leases until `stop`; then gives every lease up, so the other
/// nodes take this node's destinations at their next round.
pub async fn run_leases(node: Arc<Node>, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    let every = (node.lease / 3).max(Duration::from_millis(100));
    let mut last_ok: Option<crate::clock::Instant> = None;
    loop {
        match balance_once(&node).await {
            Ok(()) => last_ok = Some(crate::clock::Instant::now()),
            Err(e) => {
                node.shared.metrics.cluster_db_errors.inc();
                tracing::warn!(error = %e, "cannot renew destination leases");
                // Another node may hold them once they expire: stop running them first.
                if last_ok.is_none_or(|t| t.elapsed() >= node.lease.mul_f64(0.9)) {
                    let (_, lost) = node.shared.leases.replace(HashMap::new(), &HashSet::new());
                    if !lost.is_empty() {
                        tracing::warn!(
                            leases = lost.len(),
                            "database unreachable for a lease period: gave up every lease"
                        );
                        node.shared
                            .metrics
                            .cluster_lease_changes
                            .inc_by(lost.len() as u64);
                    }
                    node.shared.metrics.cluster_leases_held.set(0);
                    node.shared.metrics.cluster_leases_handing_over.set(0);
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = node.rebalance.notified() => {}
            () = &mut stop => break,
        }
    }
    node.shared.leases.replace(HashMap::new(), &HashSet::new());
    let released = async {
        let c = node.shared.pool.get().await.map_err(|e| e.to_string())?;
        leases::release_all(&c, &node.shared.node)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(5), released).await {
        Ok(Ok(n)) => tracing::info!(leases = n, "left the cluster"),
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot give up leases; they expire instead"),
        Err(_) => tracing::warn!("giving up leases timed out; they expire instead"),
    }
}

async fn balance_once(node: &Node) -> Result<(), String> {
    let c = node.shared.pool.get().await.map_err(|e| e.to_string())?;
    let mut destinations = (node.destinations)();
    // Callback hosts are destinations while they have work.
    let callbacks = c
        .query(CALLBACK_DESTINATIONS, &[])
        .await
        .map_err(|e| e.to_string())?;
    destinations.extend(callbacks.iter().map(|r| r.get::<_, String>(0)));
    destinations.sort();
    destinations.dedup();
    // Leases being handed over are given up once their attempts have ended (and were
    // recorded), or after a lease period at most: an attempt still under way then is cut
    // off, and the next owner makes it again.
    let ready: HashSet<String> = node
        .shared
        .leases
        .handing_over()
        .into_iter()
        .filter(|(d, since)| !(node.busy)(d) || since.elapsed() >= node.lease)
        .map(|(d, _)| d)
        .collect();
    let now = crate::clock::now_micros();
    let b = leases::balance(
        &c,
        &node.shared.node,
        &destinations,
        &ready,
        now,
        node.lease,
    )
    .await
    .map_err(|e| e.to_string())?;
    if !b.released.is_empty() {
        // The nodes that should run them take them now, not at their next round.
        if let Err(e) = c
            .execute(
                "SELECT pg_notify($1, $2)",
                &[&super::notify::LEASES, &&*node.shared.node],
            )
            .await
        {
            tracing::warn!(error = %e, "cannot announce leases given up; they are taken at the next round");
        }
    }
    let held: HashMap<String, i64> = b.held.into_iter().map(|(d, h)| (d, h.epoch)).collect();
    let (gained, lost) = node.shared.leases.replace(held, &b.handing_over);
    let m = &node.shared.metrics;
    m.cluster_leases_held
        .set(i64::try_from(node.shared.leases.len()).unwrap_or(i64::MAX));
    m.cluster_leases_handing_over
        .set(i64::try_from(b.handing_over.len()).unwrap_or(i64::MAX));
    if !gained.is_empty() || !lost.is_empty() {
        m.cluster_lease_changes
            .inc_by((gained.len() + lost.len()) as u64);
        tracing::info!(
            taken = gained.len(),
            gone = lost.len(),
            held = node.shared.leases.len(),
            handing_over = b.handing_over.len(),
            "destination leases changed"
        );
    }
    if !gained.is_empty() {
        drop(c);
        scan(node, &gained, Scan::Periodic).await?;
    }
    Ok(())
}

/// Why a scan runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Periodic, or a lease taken: the correctness path.
    Periodic,
    /// A notification of new work made on some node.
    Notified,
    /// A notification of an operator's retry: its deliveries go now.
    Operator,
}

/// Reads the due deliveries of `destinations` (those still held) and hands them to the
/// scheduler, which keeps each once.
async fn scan(node: &Node, destinations: &[String], why: Scan) -> Result<usize, String> {
    let held: Vec<&str> = destinations
        .iter()
        .map(String::as_str)
        .filter(|d| node.shared.leases.holds(d))
        .collect();
    if held.is_empty() {
        return Ok(0);
    }
    let c = node.shared.pool.get().await.map_err(|e| e.to_string())?;
    let now = crate::clock::now_micros();
    let until = now.saturating_add(micros(node.horizon));
    let rows = super::notify::due(&**c, &held, until, SCAN_LIMIT)
        .await
        .map_err(|e| e.to_string())?;
    let n = rows.len();
    let mut names = HashMap::new();
    let mut due = Vec::with_capacity(n);
    for r in rows {
        if why == Scan::Notified {
            notify_lag(node, r.at, now);
        }
        let sub = crate::model::intern(&mut names, r.destination);
        due.push(Due {
            at: r.at,
            delivery: r.delivery,
            subscription: sub,
            event: None,
            attempts: 0,
            priority: super::reads::priority(r.priority),
            operator: why == Scan::Operator && r.at <= now,
        });
    }
    if !due.is_empty() {
        let _ = node.scheduler.send(Msg::Due(due));
    }
    Ok(n)
}

/// How long a delivery made on another node at `at` took to reach its owner.
fn notify_lag(node: &Node, at: Micros, now: Micros) {
    if at <= now {
        let lag = Duration::from_micros(u64::try_from(now - at).unwrap_or(0));
        node.shared
            .metrics
            .cluster_notify_lag
            .observe(lag.as_secs_f64());
    }
}

/// Adds the deliveries a work notification names to `out`, and how long they took to get here.
fn handed(
    node: &Node,
    w: super::notify::Work,
    now: Micros,
    names: &mut HashMap<String, Arc<str>>,
    out: &mut Vec<Due>,
) {
    notify_lag(node, w.at, now);
    let sub = crate::model::intern(names, w.destination);
    out.extend(w.deliveries.into_iter().map(|(delivery, priority)| Due {
        at: w.at,
        delivery,
        subscription: sub.clone(),
        event: None,
        attempts: 0,
        priority: super::reads::priority(priority),
        operator: false,
    }));
}

/// Feeds the scheduler from notifications and periodic scans, and reloads subscriptions
/// changed elsewhere, until `stop`.
pub async fn run_feed(node: Arc<Node>, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    let mut heard: Option<mpsc::UnboundedReceiver<super::notify::Heard>> = None;
    let mut next_scan = tokio::time::Instant::now();
    let mut next_listen = tokio::time::Instant::now();
    let mut next_refresh = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if heard.is_none() && tokio::time::Instant::now() >= next_listen {
            match super::notify::listen(&node.shared.url).await {
                Ok(rx) => {
                    heard = Some(rx);
                    // What was announced while nobody listened is found by a scan.
                    next_scan = tokio::time::Instant::now();
                }
                Err(e) => {
                    node.shared.metrics.cluster_db_errors.inc();
                    tracing::warn!(error = %e, "cannot listen for notifications; scans only");
                    next_listen = tokio::time::Instant::now() + Duration::from_secs(1);
                }
            }
        }
        if tokio::time::Instant::now() >= next_scan {
            let held = node.shared.leases.held_ids();
            if let Err(e) = scan(&node, &held, Scan::Periodic).await {
                node.shared.metrics.cluster_db_errors.inc();
                tracing::warn!(error = %e, "cannot scan due deliveries");
            }
            next_scan = tokio::time::Instant::now() + node.scan_interval;
        }
        if tokio::time::Instant::now() >= next_refresh {
            (node.refresh)().await;
            next_refresh = tokio::time::Instant::now() + Duration::from_secs(10);
        }
        let wake = next_scan.min(next_refresh).min(if heard.is_none() {
            next_listen
        } else {
            next_scan
        });
        let got = async {
            match heard.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            h = got => match h {
                Some(first) => {
                    // Notifications come in bursts: take what has arrived, then scan once.
                    let mut due: HashSet<String> = HashSet::new();
                    let mut asked: HashSet<String> = HashSet::new();
                    let mut work: Vec<Due> = Vec::new();
                    let mut names: HashMap<String, Arc<str>> = HashMap::new();
                    let mut subs = false;
                    let mut reload = false;
                    let now = crate::clock::now_micros();
                    let mut take = |h: super::notify::Heard| {
                        if h.channel == super::notify::SUBSCRIPTIONS {
                            subs = true;
                        } else if h.channel == super::notify::LEASES {
                            if h.payload != *node.shared.node {
                                node.rebalance.notify_one();
                            }
                        } else if h.channel == super::notify::RELOAD {
                            reload |= h.payload != *node.shared.node;
                        } else if let Some(d) = h.payload.strip_prefix(super::notify::OPERATOR) {
                            if node.shared.leases.holds(d) {
                                asked.insert(d.to_string());
                            }
                        } else if let Some(w) = super::notify::Work::parse(&h.payload) {
                            // New deliveries with their ids: straight to the scheduler,
                            // no read (the periodic scan is there for any that are lost).
                            if node.shared.leases.holds(&w.destination) {
                                handed(&node, w, now, &mut names, &mut work);
                            }
                        } else if node.shared.leases.holds(&h.payload) {
                            due.insert(h.payload);
                        }
                    };
                    take(first);
                    if let Some(rx) = heard.as_mut() {
                        while let Ok(h) = rx.try_recv() {
                            take(h);
                        }
                    }
                    if !work.is_empty() {
                        let _ = node.scheduler.send(Msg::Due(work));
                    }
                    if reload {
                        tracing::info!("another node reloaded its config: reloading this node's");
                        (node.reload)().await;
                    } else if subs {
                        (node.refresh)().await;
                    }
                    for (set, why) in [(due, Scan::Notified), (asked, Scan::Operator)] {
                        if set.is_empty() {
                            continue;
                        }
                        let set: Vec<String> = set.into_iter().collect();
                        if let Err(e) = scan(&node, &set, why).await {
                            node.shared.metrics.cluster_db_errors.inc();
                            tracing::warn!(error = %e, "cannot scan notified destinations");
                        }
                    }
                }
                None => {
                    tracing::warn!("notification connection lost; reconnecting");
                    heard = None;
                    next_listen = tokio::time::Instant::now() + Duration::from_millis(500);
                }
            },
            () = tokio::time::sleep_until(wake) => {}
            () = &mut stop => break,
        }
    }
}

/// Retention on the cluster: every `interval`, sweeps what is older than `retention`, on
/// one node at a time (`retention::sweep`).
pub async fn run_retention(
    shared: Shared,
    retention: Duration,
    interval: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = &mut stop => return,
        }
        let cutoff: Micros = crate::clock::now_micros().saturating_sub(micros(retention));
        loop {
            let swept = async {
                let mut c = shared.pool.get().await.map_err(|e| e.to_string())?;
                super::retention::sweep(&mut c, cutoff, 1000)
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            match swept {
                Ok(super::retention::Swept::Removed(n)) => {
                    shared
                        .metrics
                        .retention_removed
                        .with_label_values(&["events"])
                        .inc_by(n);
                    if n < 1000 {
                        shared
                            .metrics
                            .retention_last_sweep
                            .set(crate::clock::now_micros() / 1_000_000);
                        break;
                    }
                }
                Ok(super::retention::Swept::Skipped) => break,
                Ok(super::retention::Swept::NewerSchema(v)) => {
                    let found = v.map_or_else(|| "unreadable".to_string(), |v| v.to_string());
                    tracing::error!(
                        schema = %found,
                        known = super::migrate::SCHEMA_VERSION,
                        "the database's schema is not one this node knows (a newer dispatchd migrated it?): this node runs no retention; upgrade it"
                    );
                    break;
                }
                Err(e) => {
                    shared.metrics.cluster_db_errors.inc();
                    tracing::warn!(error = %e, "retention sweep failed");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    /// A lease handed over is still held for recording (its epoch) but not run (no
    /// attempts, no new work); run again, it counts as gained, so its work is scanned for.
    #[test]
    fn leases_handed_over_are_held_but_not_run() {
        let l = Leases::default();
        let (gained, lost) = l.replace(HashMap::from([("a".into(), 1)]), &set(&[]));
        assert_eq!((gained, lost), (vec!["a".to_string()], vec![]));
        assert_eq!(
            (l.running("a"), l.epoch("a"), l.holds("a")),
            (Some(1), Some(1), true)
        );

        let (gained, lost) = l.replace(HashMap::from([("a".into(), 1)]), &set(&["a"]));
        assert!(gained.is_empty() && lost.is_empty(), "{gained:?} {lost:?}");
        assert_eq!(
            (l.running("a"), l.epoch("a"), l.holds("a")),
            (None, Some(1), false)
        );
        assert!(l.held_ids().is_empty());
        assert_eq!(l.len(), 1);
        let since = l.handing_over();
        assert_eq!(since.len(), 1);
        // Still handing over a round later: since when does not move.
        l.replace(HashMap::from([("a".into(), 1)]), &set(&["a"]));
        assert_eq!(l.handing_over(), since);

        let (gained, _) = l.replace(HashMap::from([("a".into(), 1)]), &set(&[]));
        assert_eq!(gained, vec!["a".to_string()], "run again after a hand-over");
        assert_eq!(l.running("a"), Some(1));
        assert!(l.handing_over().is_empty());

        let (gained, _) = l.replace(HashMap::from([("a".into(), 2)]), &set(&[]));
        assert_eq!(gained, vec!["a".to_string()], "a new epoch");
        let (gained, lost) = l.replace(HashMap::new(), &set(&[]));
        assert_eq!((gained, lost), (vec![], vec!["a".to_string()]));
        assert_eq!(l.epoch("a"), None);
    }
}

//! Cluster mode with several dispatchd processes on one PostgreSQL database (started by the
//! harness) and real receivers: work published to any node is delivered, each destination
//! runs on one node at a time (its rate limit and FIFO order hold for the cluster), a node
//! killed with SIGKILL loses nothing and its destinations move, and a node started later
//! takes its share.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::backend::Backend;
use crate::support::config::{Config, Sub};
use crate::support::receiver::{Receiver, Reply};
use crate::support::{Daemon, WAIT, eventually};

/// A lease short enough that takeovers happen within a test's patience.
const LEASE: &str = "2s";

/// Starts `n` nodes (`node-0` …) on `backend`'s database with this config.
fn nodes(backend: &Backend, config: &str, n: usize) -> Vec<Daemon> {
    (0..n).map(|i| node(backend, config, i)).collect()
}

fn node(backend: &Backend, config: &str, i: usize) -> Daemon {
    Daemon::start(&backend.node_config(config, &format!("node-{i}")))
}

fn config(subs: impl IntoIterator<Item = Sub>) -> String {
    let mut c = Config::new()
        .private_networks()
        .set("cluster.lease", LEASE)
        .set("cluster.scan_interval", "300ms");
    for s in subs {
        c = c.subscription(s);
    }
    c.to_toml()
}

/// The leases a node holds, from its metrics.
async fn leases(d: &Daemon) -> u64 {
    let m = d.metrics().await;
    m.lines()
        .find_map(|l| l.strip_prefix("dispatchd_cluster_leases_held "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the live nodes hold `total` leases between them, each destination once;
/// answers each node's count.
async fn settled(live: &[&Daemon], total: u64) -> Vec<u64> {
    eventually("the leases to settle", || async {
        let mut counts = Vec::new();
        for d in live {
            counts.push(leases(d).await);
        }
        (counts.iter().sum::<u64>() == total).then_some(counts)
    })
    .await
}

/// Waits until every one of `names` heartbeats and `destination`'s lease is held by the
/// node the hashing names among them: membership is stable, so the lease stays there.
/// Answers the owner's index in `names`.
async fn stable_owner(backend: &Backend, names: &[&str], destination: &str) -> usize {
    let Backend::Postgres(pg) = backend else {
        panic!("cluster tests run on PostgreSQL");
    };
    let (c, conn) = match tokio_postgres::connect(&pg.url("postgres"), tokio_postgres::NoTls).await
    {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    tokio::spawn(conn);
    let mut want: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    want.sort();
    eventually("a stable owner", || async {
        let live: Vec<String> = c
            .query("SELECT id FROM nodes ORDER BY id", &[])
            .await
            .ok()?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if live != want {
            return None;
        }
        let should = dispatchd::storage::postgres::leases::owner(destination, &live)?;
        let holder: String = c
            .query_opt(
                "SELECT owner FROM destination_leases WHERE destination = $1",
                &[&destination],
            )
            .await
            .ok()??
            .get(0);
        (holder == should)
            .then(|| names.iter().position(|n| *n == holder))
            .flatten()
    })
    .await
}

fn webhook_id(r: &crate::support::receiver::Received) -> String {
    r.header("webhook-id").unwrap_or_default().to_string()
}

async fn publish_to(d: &Daemon, body: Value) -> (u16, Value) {
    d.post("/v1/events", &body).await
}

/// Events published round-robin to three nodes are each delivered to every subscription,
/// the four destinations are spread over the nodes (each held by exactly one), and the same
/// event id published to two nodes at once is stored once: one 202, one 200 duplicate,
/// one delivery per subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_everything_published_round_robin_and_store_an_id_once() {
    let backend = Backend::postgres();
    let rx = Receiver::start().await;
    let subs: Vec<Sub> = (0..4)
        .map(|i| Sub::new(&format!("s{i}"), &rx.url(&format!("/s{i}"))))
        .collect();
    let cfg = config(subs);
    let ns = nodes(&backend, &cfg, 3);
    let counts = settled(&ns.iter().collect::<Vec<_>>(), 4).await;
    assert_eq!(counts.iter().sum::<u64>(), 4, "{counts:?}");

    let mut ids = Vec::new();
    for i in 0..120 {
        let d = &ns[i % 3];
        let (s, r) = publish_to(d, json!({"type": "order.created", "data": {"n": i}})).await;
        assert_eq!(s, 202, "{r}");
        ids.push(r["id"].as_str().unwrap_or_default().to_string());
    }
    let got = rx
        .wait_until(WAIT, "every event at every subscription", |r| {
            let seen: HashSet<(String, String)> =
                r.iter().map(|x| (x.path.clone(), webhook_id(x))).collect();
            ids.iter()
                .all(|id| (0..4).all(|s| seen.contains(&(format!("/s{s}"), id.clone()))))
        })
        .await;
    assert!(got.len() >= 480, "{}", got.len());
    // Every node can read what the others stored.
    for d in &ns {
        let (s, e) = d.get(&format!("/v1/events/{}", ids[0])).await;
        assert_eq!(s, 200, "{e}");
    }

    // The same id to two nodes at once, ten times.
    for round in 0..10 {
        let id = format!("same-{round}");
        let body = json!({"id": id, "type": "order.created", "data": {"round": round}});
        let (a, b) = tokio::join!(publish_to(&ns[0], body.clone()), publish_to(&ns[1], body));
        let mut statuses = [a.0, b.0];
        statuses.sort_unstable();
        assert_eq!(statuses, [200, 202], "{a:?} {b:?}");
        let dup = if a.0 == 200 { &a.1 } else { &b.1 };
        assert_eq!(dup["duplicate"], true, "{dup}");
        let (_, ds) = ns[2].get(&format!("/v1/events/{id}/deliveries")).await;
        assert_eq!(ds["items"].as_array().map(Vec::len), Some(4), "{ds}");
    }
}

/// SIGKILL of the node that runs a busy FIFO destination, mid-delivery: another node takes
/// the destination over once the lease ends, every acknowledged event is delivered, and the
/// events reach the receiver in the order they were published (a repeat of the attempt cut
/// off by the kill is allowed: at-least-once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_owner_mid_delivery_loses_nothing_and_keeps_fifo_order() {
    let backend = Backend::postgres();
    let rx = Receiver::start().await;
    rx.set_default(Reply::Delay(Duration::from_millis(40), 200));
    let cfg = config([Sub::new("fifo", &rx.url("/f")).set("ordering", "fifo")]);
    let mut ns = nodes(&backend, &cfg, 3);
    let owner = stable_owner(&backend, &["node-0", "node-1", "node-2"], "fifo").await;
    let others: Vec<usize> = (0..3).filter(|&i| i != owner).collect();

    // Published to the nodes that will survive, in order.
    let mut ids = Vec::new();
    for n in 0..150 {
        let d = &ns[others[n % 2]];
        let (s, r) = publish_to(d, json!({"type": "t", "data": {"n": n}})).await;
        assert_eq!(s, 202, "{r}");
        ids.push(r["id"].as_str().unwrap_or_default().to_string());
    }
    rx.wait_for(20, WAIT).await;
    ns[owner].kill();
    let killed_at = tokio::time::Instant::now().into_std();
    let before = rx.received().len();
    assert!(
        before < 150,
        "everything went before the kill; the test proves nothing"
    );

    let got = rx
        .wait_until(WAIT, "every event after the takeover", |r| {
            let seen: HashSet<String> = r.iter().map(webhook_id).collect();
            ids.iter().all(|i| seen.contains(i))
        })
        .await;
    // The takeover is the longest silence at the receiver after the kill.
    let after_kill: Vec<std::time::Instant> = std::iter::once(killed_at)
        .chain(got.iter().map(|r| r.at).filter(|t| *t >= killed_at))
        .collect();
    let gap = after_kill
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
        .unwrap_or_default();
    println!("deliveries stopped for {gap:?} after the owner's SIGKILL (lease {LEASE})");

    // FIFO across the takeover: first arrivals follow publish order.
    let position: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let mut firsts = Vec::new();
    let mut seen = HashSet::new();
    for r in &got {
        let id = webhook_id(r);
        if seen.insert(id.clone())
            && let Some(p) = position.get(id.as_str())
        {
            firsts.push(*p);
        }
    }
    assert!(
        firsts.windows(2).all(|w| w[0] < w[1]),
        "out of order: {firsts:?}"
    );
    // A survivor runs the destination now.
    let survivors: Vec<&Daemon> = others.iter().map(|&i| &ns[i]).collect();
    let after = settled(&survivors, 1).await;
    assert_eq!(after.iter().sum::<u64>(), 1);
}

/// A rate limit of 50/s holds for the cluster, not per node: 150 events published to three
/// nodes reach the receiver at no more than 50 in any second (with a burst of one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_for_the_whole_cluster() {
    let backend = Backend::postgres();
    let rx = Receiver::start().await;
    let cfg = config([Sub::new("limited", &rx.url("/r"))
        .set("rate_limit", "50/s")
        .set("rate_limit_burst", 1)]);
    let ns = nodes(&backend, &cfg, 3);
    stable_owner(&backend, &["node-0", "node-1", "node-2"], "limited").await;
    let mut publishes = Vec::new();
    for i in 0..150 {
        let d = &ns[i % 3];
        publishes.push(publish_to(d, json!({"type": "t", "data": {"n": i}})));
    }
    for (s, r) in futures_util::future::join_all(publishes).await {
        assert_eq!(s, 202, "{r}");
    }
    let got = rx.wait_for(150, WAIT).await;
    let times: Vec<std::time::Instant> = got.iter().map(|r| r.at).collect();
    let busiest = times
        .iter()
        .map(|t| {
            times
                .iter()
                .filter(|u| **u >= *t && **u < *t + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    println!("busiest second: {busiest} requests");
    // 50 per second and a burst of one; three nodes each limiting alone would allow 150.
    assert!(busiest <= 52, "{busiest} requests in one second");
}

/// A node started later takes its share of the destinations (each still held once), and
/// work published to it is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_later_takes_its_share() {
    let backend = Backend::postgres();
    let rx = Receiver::start().await;
    let subs: Vec<Sub> = (0..12)
        .map(|i| Sub::new(&format!("d{i}"), &rx.url(&format!("/d{i}"))))
        .collect();
    let cfg = config(subs);
    let mut ns = nodes(&backend, &cfg, 2);
    settled(&ns.iter().collect::<Vec<_>>(), 12).await;
    ns.push(node(&backend, &cfg, 2));
    let shares = eventually("the new node's share", || async {
        let mut counts = Vec::new();
        for d in &ns {
            counts.push(leases(d).await);
        }
        (counts[2] > 0 && counts.iter().sum::<u64>() == 12).then_some(counts)
    })
    .await;
    println!("leases per node after the third joined: {shares:?}");
    let (s, r) = publish_to(&ns[2], json!({"type": "t", "data": {}})).await;
    assert_eq!(s, 202, "{r}");
    let id = r["id"].as_str().unwrap_or_default().to_string();
    rx.wait_until(WAIT, "the event at all twelve", |r| {
        r.iter().filter(|x| webhook_id(x) == id).count() >= 12
    })
    .await;
}

/// A gauge of a node's metrics (0 when absent).
async fn gauge(d: &Daemon, name: &str) -> u64 {
    let m = d.metrics().await;
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A destination that moves to a node joining the cluster is handed over without cutting
/// off the attempt under way: the old owner stops starting attempts, keeps the lease until
/// that attempt has ended and been recorded, then gives it up, and the new owner takes it
/// at once and goes on. Each event reaches the endpoint once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moving_destination_finishes_its_attempt_before_the_new_owner_starts() {
    use dispatchd::storage::postgres::leases::owner;
    let backend = Backend::postgres();
    let rx = Receiver::start().await;
    let (two, three): (Vec<String>, Vec<String>) = (
        ["node-0", "node-1"].map(String::from).to_vec(),
        ["node-0", "node-1", "node-2"].map(String::from).to_vec(),
    );
    // A destination the hashing gives node-2 once it joins.
    let dest = (0..1000)
        .map(|i| format!("m{i}"))
        .find(|d| owner(d, &three) == Some("node-2"))
        .unwrap_or_default();
    let first_owner = match owner(&dest, &two) {
        Some("node-0") => 0,
        _ => 1,
    };
    let cfg = config([Sub::new(&dest, &rx.url("/m")).set("timeout", "20s")]);
    let mut ns = nodes(&backend, &cfg, 2);
    settled(&ns.iter().collect::<Vec<_>>(), 1).await;
    assert_eq!(leases(&ns[first_owner]).await, 1);

    // The first event's attempt hangs at the endpoint until the gate opens.
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    rx.script([Reply::Gate(gate_rx, 200)]);
    let (s, r) = publish_to(&ns[0], json!({"type": "t", "data": {"n": 1}})).await;
    assert_eq!(s, 202, "{r}");
    let first = r["id"].as_str().unwrap_or_default().to_string();
    rx.wait_for(1, WAIT).await;

    // node-2 joins: the owner hands the destination over, but holds it while the attempt
    // is under way.
    ns.push(node(&backend, &cfg, 2));
    eventually("the owner to start handing over", || async {
        (gauge(&ns[first_owner], "dispatchd_cluster_leases_handing_over").await == 1).then_some(())
    })
    .await;
    assert_eq!(leases(&ns[first_owner]).await, 1, "held while handed over");
    assert_eq!(
        leases(&ns[2]).await,
        0,
        "taken while the attempt is under way"
    );
    let (s, r) = publish_to(&ns[1], json!({"type": "t", "data": {"n": 2}})).await;
    assert_eq!(s, 202, "{r}");
    let second = r["id"].as_str().unwrap_or_default().to_string();

    // The attempt ends: the lease moves, and node-2 delivers the second event.
    let _ = gate.send(true);
    let got = rx
        .wait_until(WAIT, "the second event", |r| {
            r.iter().any(|x| webhook_id(x) == second)
        })
        .await;
    settled(&ns.iter().collect::<Vec<_>>(), 1).await;
    assert_eq!(leases(&ns[2]).await, 1, "node-2 runs the destination");
    let (_, d) = ns[2].get(&format!("/v1/events/{first}/deliveries")).await;
    assert_eq!(d["items"][0]["status"], "succeeded", "{d}");
    assert_eq!(d["items"][0]["attempts"], 1, "{d}");
    let times = |id: &str| got.iter().filter(|x| webhook_id(x) == id).count();
    assert_eq!(times(&first), 1, "the first event was sent again");
    assert_eq!(times(&second), 1);
}

/// While the database is away a node says so: `/readyz` answers 503, a publish answers 503
/// `storage_unavailable` and stores nothing. When the database is back the node recovers by
/// itself: ready again, publishes accepted, and the deliveries of events acknowledged before
/// the outage, and after it, are made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_rides_out_a_database_outage() {
    let backend = Backend::postgres();
    let Backend::Postgres(pg) = &backend else {
        unreachable!()
    };
    let rx = Receiver::start().await;
    let cfg = config([Sub::new("s", &rx.url("/s"))]);
    let d = node(&backend, &cfg, 0);
    stable_owner(&backend, &["node-0"], "s").await;
    let (s, before) = publish_to(&d, json!({"type": "t", "data": {"n": "before"}})).await;
    assert_eq!(s, 202, "{before}");
    rx.wait_for(1, WAIT).await;

    pg.pause();
    let (s, r) = publish_to(&d, json!({"id": "during", "type": "t", "data": {}})).await;
    assert_eq!(s, 503, "{r}");
    assert_eq!(r["error"]["code"], "storage_unavailable", "{r}");
    let (s, r) = d.get("/readyz").await;
    assert_eq!(s, 503, "{r}");
    let (s, _) = d.get("/healthz").await;
    assert_eq!(s, 200, "alive, only not ready");

    pg.resume();
    eventually("ready again", || async {
        (d.get("/readyz").await.0 == 200).then_some(())
    })
    .await;
    let (s, r) = d.get("/v1/events/during").await;
    assert_eq!(s, 404, "the refused publish stored nothing: {r}");
    let (s, after) = publish_to(&d, json!({"type": "t", "data": {"n": "after"}})).await;
    assert_eq!(s, 202, "{after}");
    let id = after["id"].as_str().unwrap_or_default().to_string();
    rx.wait_until(WAIT, "the event published after the outage", |r| {
        r.iter().any(|x| webhook_id(x) == id)
    })
    .await;
    let m = d.metrics().await;
    let errors: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("dispatchd_cluster_database_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(errors > 0.0, "the outage was counted");
}

/// The embedded backend's tools say plainly that they are not for a PostgreSQL deployment:
/// `backup` (and its API route) and `verify-db`, each naming PostgreSQL's own tools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_only_tools_say_so_on_postgres() {
    let backend = Backend::postgres();
    let d = node(&backend, &config([]), 0);
    let (s, r) = d.get("/v1/admin/backup").await;
    assert_eq!(s, 409, "{r}");
    assert_eq!(r["error"]["code"], "not_supported_on_postgres", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("pg_dump"),
        "{r}"
    );

    let url = format!("http://{}", d.addr);
    let out = tokio::task::spawn_blocking(move || {
        let tmp = tempfile::tempdir().unwrap();
        let mut cmd = crate::support::bin();
        cmd.args(["backup", "--url", &url, "--output"])
            .arg(tmp.path().join("copy.redb"));
        let backup = crate::support::run_bounded(cmd, WAIT);
        let mut cmd = crate::support::bin();
        cmd.args(["verify-db", "postgres://dispatchd@127.0.0.1/dispatchd"]);
        (backup, crate::support::run_bounded(cmd, WAIT))
    })
    .await
    .unwrap();
    let (backup, verify) = out;
    assert!(!backup.status.success());
    let err = String::from_utf8_lossy(&backup.stderr);
    assert!(
        err.contains("PostgreSQL") && err.contains("pg_dump"),
        "{err}"
    );
    assert_eq!(verify.status.code(), Some(2));
    let err = String::from_utf8_lossy(&verify.stderr);
    assert!(err.contains("redb") && err.contains("pg_dump"), "{err}");
}

/// A reload asked of one node reloads every node (each from its own copy of the file): a
/// subscription added to the file on both is in force on both, and events published to
/// either reach it, whichever node runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_on_one_node_reloads_them_all() {
    let backend = Backend::postgres();
    let rx = Receiver::start().await;
    let before = config([Sub::new("a", &rx.url("/a"))]);
    let ns = nodes(&backend, &before, 2);
    stable_owner(&backend, &["node-0", "node-1"], "a").await;
    let after = config([Sub::new("a", &rx.url("/a")), Sub::new("b", &rx.url("/b"))]);
    for (i, d) in ns.iter().enumerate() {
        let text = backend.node_config(&after, &format!("node-{i}"));
        std::fs::write(d.dir.join("dispatchd.toml"), text).unwrap();
    }
    let (s, r) = ns[0].post("/v1/admin/reload", &json!({})).await;
    assert_eq!(s, 200, "{r}");
    eventually("node-1 has reloaded", || async {
        let (_, l) = ns[1].get("/v1/subscriptions").await;
        let ids: Vec<&str> = l["items"]
            .as_array()?
            .iter()
            .filter_map(|s| s["id"].as_str())
            .collect();
        ids.contains(&"b").then_some(())
    })
    .await;
    stable_owner(&backend, &["node-0", "node-1"], "b").await;
    let mut ids = Vec::new();
    for d in &ns {
        let (s, r) = publish_to(d, json!({"type": "t", "data": {}})).await;
        assert_eq!(s, 202, "{r}");
        ids.push(r["id"].as_str().unwrap_or_default().to_string());
    }
    rx.wait_until(WAIT, "both events at /b", |r| {
        ids.iter()
            .all(|id| r.iter().any(|x| x.path == "/b" && webhook_id(x) == *id))
    })
    .await;
}

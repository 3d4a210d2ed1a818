//! Cluster mode's PostgreSQL schema against a real server: migrations apply once when nodes
//! start together, again is a no-op, and a database of a newer schema is refused.

use dispatchd::storage::postgres::migrate::{self, MigrateError, SCHEMA_VERSION};

use crate::support::postgres::Postgres;

/// What a node's backend shares, on `url`, holding no leases.
fn shared(url: &str) -> dispatchd::storage::postgres::Shared {
    use dispatchd::storage::postgres;
    let pool = match postgres::pool(url, 4) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    let metrics = match dispatchd::metrics::Metrics::new() {
        Ok(m) => std::sync::Arc::new(m),
        Err(e) => panic!("{e}"),
    };
    postgres::Shared {
        pool,
        url: std::sync::Arc::from(url),
        node: std::sync::Arc::from("test-node"),
        leases: Default::default(),
        metrics,
    }
}

/// A node's writer on `url`, holding no leases (every new delivery is announced).
fn pg_writer(url: &str) -> dispatchd::storage::writer::WriterHandle {
    use dispatchd::storage::postgres;
    dispatchd::storage::writer::WriterHandle::Postgres(postgres::writer::PgWriter::spawn(
        shared(url),
        None,
    ))
}

/// Transactions a writer's group-commit task committed.
fn commits(w: &dispatchd::storage::writer::WriterHandle) -> u64 {
    match w {
        dispatchd::storage::writer::WriterHandle::Postgres(p) => p.commits(),
        dispatchd::storage::writer::WriterHandle::Embedded(_) => 0,
    }
}

/// A pooled connection, as the writer uses.
async fn pooled(url: &str) -> deadpool_postgres::Object {
    let pool = match dispatchd::storage::postgres::pool(url, 2) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    match pool.get().await {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
        Ok(c) => c,
        Err(e) => panic!("connect {url}: {e}"),
    };
    tokio::spawn(conn);
    client
}

/// A server with database `name` migrated to this binary's schema: the server (stopped when
/// dropped), the database's URL and a connection to it.
async fn migrated(name: &str) -> (Postgres, String, tokio_postgres::Client) {
    let pg = Postgres::start();
    pg.create_db(name).await;
    let url = pg.url(name);
    let mut c = connect(&url).await;
    if let Err(e) = migrate::migrate(&mut c).await {
        panic!("{e}");
    }
    (pg, url, c)
}

/// Three nodes migrating one empty database at once: exactly one applies the schema (the
/// others wait on the advisory lock and find it done), every table is there, and migrating
/// again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_migrate_once() {
    let pg = Postgres::start();
    pg.create_db("nodes").await;
    let url = pg.url("nodes");
    let mut runs = Vec::new();
    for _ in 0..3 {
        let url = url.clone();
        runs.push(tokio::spawn(async move {
            let mut c = connect(&url).await;
            migrate::migrate(&mut c).await
        }));
    }
    let mut froms = Vec::new();
    for r in runs {
        match r.await {
            Ok(Ok(m)) => {
                assert_eq!(m.to, SCHEMA_VERSION);
                froms.push(m.from);
            }
            other => panic!("migration failed: {other:?}"),
        }
    }
    froms.sort_unstable();
    assert_eq!(
        froms,
        vec![0, SCHEMA_VERSION, SCHEMA_VERSION],
        "applied once"
    );

    let c = connect(&url).await;
    let tables: Vec<String> = match c
        .query(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = 'public' ORDER BY 1",
            &[],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(e) => panic!("{e}"),
    };
    for t in [
        "attempts",
        "batches",
        "deliveries",
        "destination_leases",
        "dispatchd_meta",
        "events",
        "nodes",
        "receipt_ids",
        "receipts",
        "subscription_state",
        "subscriptions",
    ] {
        assert!(tables.iter().any(|x| x == t), "{t} missing: {tables:?}");
    }
    let mut c = c;
    match migrate::migrate(&mut c).await {
        Ok(m) => assert_eq!((m.from, m.to), (SCHEMA_VERSION, SCHEMA_VERSION)),
        Err(e) => panic!("{e}"),
    }
}

/// A database at schema version 1, with work in it, is brought to the current version by
/// the later migrations alone, and keeps its rows; afterwards the lease rounds' question
/// (which callback hosts have work) is answered from the index migration 2 made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_schema_is_migrated_forward() {
    let pg = Postgres::start();
    pg.create_db("older").await;
    let mut c = connect(&pg.url("older")).await;
    let v1 = include_str!("../../src/storage/postgres/migrations/0001_schema.sql");
    if let Err(e) = c
        .batch_execute(&format!(
            "{v1}
             INSERT INTO dispatchd_meta (key, value) VALUES ('schema_version', '1');
             INSERT INTO events (id, event_type, data, received_at) VALUES ('e1', 't', '{{}}', 1);
             INSERT INTO deliveries (event_seq, event_id, event_type, subscription, status,
                                     next_attempt_at, created_at, updated_at, origin)
             SELECT seq, id, event_type, d, 0, 1, 1, 1, 0 FROM events,
                    unnest(ARRAY['callback:https://a.example:443', 'crm']) AS d;"
        ))
        .await
    {
        panic!("{e}");
    }
    match migrate::migrate(&mut c).await {
        Ok(m) => assert_eq!((m.from, m.to), (1, SCHEMA_VERSION)),
        Err(e) => panic!("{e}"),
    }
    let hosts: Vec<String> = match c
        .query(
            dispatchd::storage::postgres::cluster::CALLBACK_DESTINATIONS,
            &[],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(e) => panic!("{e}"),
    };
    assert_eq!(hosts, vec!["callback:https://a.example:443"]);
    // Whether the planner can use the index at all (a two-row table is read whole
    // otherwise): its predicate must be the query's.
    if let Err(e) = c.batch_execute("SET enable_seqscan = off").await {
        panic!("{e}");
    }
    let explain = format!(
        "EXPLAIN {}",
        dispatchd::storage::postgres::cluster::CALLBACK_DESTINATIONS
    );
    let plan: Vec<String> = match c.query(&explain, &[]).await {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(e) => panic!("{e}"),
    };
    assert!(
        plan.iter()
            .any(|l| l.contains("deliveries_callback_destinations")),
        "{plan:#?}"
    );
}

/// A database a newer dispatchd migrated is refused, with both versions named, and left as
/// it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    let pg = Postgres::start();
    pg.create_db("newer").await;
    let mut c = connect(&pg.url("newer")).await;
    if let Err(e) = migrate::migrate(&mut c).await {
        panic!("{e}");
    }
    let newer = SCHEMA_VERSION + 5;
    if let Err(e) = c
        .execute(
            "UPDATE dispatchd_meta SET value = $1 WHERE key = 'schema_version'",
            &[&newer.to_string()],
        )
        .await
    {
        panic!("{e}");
    }
    match migrate::migrate(&mut c).await {
        Err(e @ MigrateError::TooNew { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("schema version {newer}"))
                    && msg.contains(&SCHEMA_VERSION.to_string()),
                "{msg}"
            );
        }
        other => panic!("a newer schema was accepted: {other:?}"),
    }
    match migrate::version(&c).await {
        Ok(v) => assert_eq!(v, newer, "left as it was"),
        Err(e) => panic!("{e}"),
    }
}

fn event(id: &str, key: Option<&str>, subs: &[&str]) -> dispatchd::storage::writer::NewEvent {
    dispatchd::storage::writer::NewEvent {
        id: id.into(),
        event_type: "order.created".into(),
        data: r#"{"n":1}"#.into(),
        idempotency_key: key.map(str::to_string),
        subscriptions: subs.iter().map(|s| std::sync::Arc::from(*s)).collect(),
        ..Default::default()
    }
}

/// Takes or gives back (`call`: `pg_advisory_lock` or `pg_advisory_unlock`) the session's
/// advisory lock `key`, as another node's retention or migration would.
async fn advisory(c: &tokio_postgres::Client, call: &str, key: i64) {
    if let Err(e) = c.execute(&format!("SELECT {call}($1)"), &[&key]).await {
        panic!("{call}: {e}");
    }
}

async fn count(c: &tokio_postgres::Client, sql: &str, id: &str) -> i64 {
    match c.query_one(sql, &[&id]).await {
        Ok(r) => r.get(0),
        Err(e) => panic!("{sql}: {e}"),
    }
}

/// One node's writer commits the publishes waiting together (fewer transactions than
/// publishes, every one answered with its own seq); the same event id, or the same
/// idempotency key, published to two nodes at once is stored once, with its deliveries once,
/// and the other node answers it as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_and_idempotency_across_nodes() {
    use dispatchd::storage::writer::Published;
    let (_pg, url, c) = migrated("publish").await;
    let a = pg_writer(&url);
    let b = pg_writer(&url);

    let mut calls = Vec::new();
    for i in 0..200 {
        let a = a.clone();
        calls.push(tokio::spawn(async move {
            a.publish(vec![event(&format!("evt-{i}"), None, &["crm", "erp"])])
                .await
        }));
    }
    let mut seqs = Vec::new();
    for call in calls {
        match call.await {
            Ok(Ok(p)) => match p.as_slice() {
                [
                    Published::Created {
                        seq, deliveries, ..
                    },
                ] => {
                    assert_eq!(*deliveries, 2);
                    seqs.push(*seq);
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 200, "every publish its own seq");
    assert!(
        commits(&a) < 200,
        "{} commits for 200 publishes",
        commits(&a)
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM deliveries WHERE event_id LIKE $1",
            "evt-%"
        )
        .await,
        400
    );

    // The same id, and the same key, twice in one commit: each repeat is answered with the
    // first, which keeps its place in the order; deliveries are made once.
    let repeats = a
        .publish(vec![
            event("rep-1", None, &["crm"]),
            event("rep-1", None, &["crm", "erp"]),
            event("rep-2", Some("rep-key"), &["crm"]),
            event("rep-3", Some("rep-key"), &["erp"]),
            event("rep-4", None, &["crm"]),
        ])
        .await;
    let seqs: Vec<(bool, u64)> = match repeats.as_deref() {
        Ok(out) => out
            .iter()
            .map(|p| match p {
                Published::Created { seq, .. } => (true, *seq),
                Published::Duplicate { seq, .. } => (false, *seq),
            })
            .collect(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        seqs.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
        vec![true, false, true, false, true],
        "{seqs:?}"
    );
    assert_eq!(seqs[0].1, seqs[1].1);
    assert_eq!(seqs[2].1, seqs[3].1);
    assert!(seqs[0].1 < seqs[2].1 && seqs[2].1 < seqs[4].1, "{seqs:?}");
    for (id, deliveries) in [("rep-1", 1), ("rep-2", 1), ("rep-3", 0), ("rep-4", 1)] {
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM deliveries WHERE event_id = $1",
                id
            )
            .await,
            deliveries,
            "{id}"
        );
    }

    // The same id, and the same key under two ids, to both nodes at once.
    for round in 0..10 {
        let id = format!("same-{round}");
        let key = format!("key-{round}");
        let (ra, rb) = tokio::join!(
            a.publish(vec![event(&id, None, &["crm"])]),
            b.publish(vec![event(&id, None, &["crm"])]),
        );
        let (ka, kb) = tokio::join!(
            a.publish(vec![event(&format!("{id}-a"), Some(&key), &["crm"])]),
            b.publish(vec![event(&format!("{id}-b"), Some(&key), &["crm"])]),
        );
        for (x, y) in [(ra, rb), (ka, kb)] {
            let kinds: Vec<bool> = [x, y]
                .into_iter()
                .map(|r| match r.as_deref() {
                    Ok([Published::Created { .. }]) => true,
                    Ok([Published::Duplicate { deliveries, .. }]) => {
                        assert_eq!(*deliveries, 1);
                        false
                    }
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(
                kinds.iter().filter(|c| **c).count(),
                1,
                "stored once: {kinds:?}"
            );
        }
        assert_eq!(
            count(&c, "SELECT count(*) FROM events WHERE id = $1", &id).await,
            1
        );
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM deliveries WHERE event_id = $1",
                &id
            )
            .await,
            1
        );
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM events WHERE idempotency_key = $1",
                &key
            )
            .await,
            1
        );
    }
}

/// Leases across nodes (the clock passed in, so minutes pass in a test): two nodes share the
/// destinations between them, disjoint and about evenly; when one stops heartbeating the
/// other takes its destinations once their lease ends, each with a new epoch, and the dead
/// node's epoch no longer holds (its late writes are fenced off); a node that joins later
/// gets its share, handed over in two steps (kept while its attempts end, then given up);
/// a node that releases at shutdown hands its leases over at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_spread_move_on_death_fence_and_rebalance() {
    use std::collections::HashSet;
    use std::time::Duration;

    use dispatchd::storage::postgres::leases;
    let (_pg, _, c) = migrated("leases").await;
    let lease = Duration::from_secs(10);
    let sec = 1_000_000i64;
    let t0 = 1_700_000_000 * sec;
    let dests: Vec<String> = (0..40).map(|i| format!("sub-{i}")).collect();
    let round = |node: &'static str, now: i64, ready: HashSet<String>| {
        let (c, dests) = (&c, &dests);
        async move {
            match leases::balance(c, node, dests, &ready, now, lease).await {
                Ok(b) => b,
                Err(e) => panic!("{node}: {e}"),
            }
        }
    };
    let none = HashSet::new;
    let keys = |b: &leases::Balance| b.held.keys().cloned().collect::<HashSet<String>>();

    // A alone takes everything; B appears. A first keeps B's share while handing it over
    // (B cannot take it yet), then gives it up once ready, and B takes it.
    let a = round("node-a", t0, none()).await;
    assert_eq!(a.held.len(), 40);
    let b = round("node-b", t0 + sec, none()).await;
    assert!(b.held.is_empty(), "still A's: {:?}", b.held);
    let a1 = round("node-a", t0 + 2 * sec, none()).await;
    assert_eq!(a1.held.len(), 40, "held while handed over");
    assert!(a1.released.is_empty());
    let moving = a1.handing_over.clone();
    assert!(moving.len() >= 10, "B's share: {}", moving.len());
    for d in &moving {
        assert_eq!(
            a1.held[d].epoch, a.held[d].epoch,
            "{d}: renewed, same epoch"
        );
    }
    let b = round("node-b", t0 + 3 * sec, none()).await;
    assert!(
        b.held.is_empty(),
        "taken while A hands it over: {:?}",
        b.held
    );
    let a = round("node-a", t0 + 4 * sec, moving.clone()).await;
    assert!(a.handing_over.is_empty());
    let b = round("node-b", t0 + 5 * sec, none()).await;
    let (ka, kb) = (keys(&a), keys(&b));
    assert!(ka.is_disjoint(&kb));
    assert_eq!(ka.len() + kb.len(), 40);
    assert!(ka.len() >= 10, "{} / {}", ka.len(), kb.len());
    assert_eq!(kb, moving);
    assert_eq!(a.released.len(), kb.len());

    // B dies. Before its leases end A cannot take them; after, it takes them all.
    let a2 = round("node-a", t0 + 7 * sec, none()).await;
    assert_eq!(keys(&a2), ka, "B's leases still run");
    let after = t0 + 5 * sec + 10 * sec + sec;
    let a3 = round("node-a", after, none()).await;
    assert_eq!(a3.held.len(), 40, "{:?}", a3.held.len());
    for d in &kb {
        let old = b.held[d].epoch;
        let new = a3.held[d].epoch;
        assert_eq!(new, old + 1, "{d}: a new epoch");
        let fenced = leases::holds(&c, d, "node-b", old, after).await;
        assert!(matches!(fenced, Ok(false)), "B's epoch still holds {d}");
        let owns = leases::holds(&c, d, "node-a", new, after).await;
        assert!(matches!(owns, Ok(true)), "A does not hold {d}");
    }

    // C joins later and gets its share; then A shuts down and hands everything to C.
    let c1 = round("node-c", after + sec, none()).await;
    assert!(c1.held.is_empty());
    let a4 = round("node-a", after + 2 * sec, none()).await;
    let a5 = round("node-a", after + 3 * sec, a4.handing_over.clone()).await;
    let c2 = round("node-c", after + 4 * sec, none()).await;
    assert_eq!(keys(&a5).len() + keys(&c2).len(), 40);
    assert!(c2.held.len() >= 10, "C's share: {}", c2.held.len());
    assert_eq!(c2.taken.len(), c2.held.len());
    match leases::release_all(&c, "node-a").await {
        Ok(n) => assert_eq!(n as usize, 40 - c2.held.len()),
        Err(e) => panic!("{e}"),
    }
    // A left the cluster: C takes everything at its next round, not a lease period later.
    let c3 = round("node-c", after + 5 * sec, none()).await;
    assert_eq!(c3.held.len(), 40);
    assert_eq!(c3.taken.len(), 40 - c2.held.len());
}

/// New deliveries reach the node that listens as soon as their transaction commits (one
/// notification per destination with work, none for a publish with no deliveries), and a
/// scan of due deliveries finds them for the destinations asked about and no others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_work_is_announced_on_commit_and_found_by_a_scan() {
    use std::time::Duration;

    use dispatchd::storage::postgres::notify;
    let (_pg, url, c) = migrated("notify").await;
    let mut heard = match notify::listen(&url).await {
        Ok(rx) => rx,
        Err(e) => panic!("{e}"),
    };
    let node_b = pg_writer(&url);
    let published = node_b
        .publish(vec![
            event("n-1", None, &["crm", "erp"]),
            event("n-2", None, &["crm"]),
            event("n-3", None, &[]),
        ])
        .await;
    assert!(published.is_ok(), "{published:?}");
    let mut got = Vec::new();
    for _ in 0..2 {
        match tokio::time::timeout(Duration::from_secs(30), heard.recv()).await {
            Ok(Some(d)) => got.push(d),
            other => panic!("no notification: {other:?} (got {got:?})"),
        }
    }
    // One per destination with work, naming its new deliveries and their due time.
    let mut got: Vec<notify::Work> = got
        .into_iter()
        .map(|h| {
            assert_eq!(h.channel, notify::CHANNEL);
            notify::Work::parse(&h.payload)
                .unwrap_or_else(|| panic!("not a work payload: {}", h.payload))
        })
        .collect();
    got.sort_by(|a, b| a.destination.cmp(&b.destination));
    let names: Vec<&str> = got.iter().map(|w| w.destination.as_str()).collect();
    assert_eq!(names, vec!["crm", "erp"]);
    assert_eq!(got[0].deliveries.len(), 2, "{got:?}");
    assert_eq!(got[1].deliveries.len(), 1, "{got:?}");

    let now = dispatchd::clock::now_micros() + 1;
    let due = match notify::due(&c, &["crm"], now, 100).await {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(due.len(), 2, "{due:?}");
    assert!(due.iter().all(|d| d.destination == "crm"));
    // The scan (the correctness path) finds what the notification named.
    let mut announced: Vec<(u64, i64)> = got[0]
        .deliveries
        .iter()
        .map(|(id, _)| (*id, got[0].at))
        .collect();
    let mut scanned: Vec<(u64, i64)> = due.iter().map(|d| (d.delivery, d.at)).collect();
    announced.sort_unstable();
    scanned.sort_unstable();
    assert_eq!(announced, scanned);
    assert!(
        due.windows(2)
            .all(|w| (w[0].at, w[0].delivery) <= (w[1].at, w[1].delivery))
    );
    let none = match notify::due(&c, &["crm"], 0, 100).await {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    assert!(
        none.is_empty(),
        "nothing is due before it was made: {none:?}"
    );

    // Many deliveries for one destination in one commit: several notifications, each within
    // PostgreSQL's payload limit and naming at most `IDS_PER_PAYLOAD` deliveries, together
    // exactly the deliveries made, in id order.
    let n = 2 * notify::IDS_PER_PAYLOAD + 50;
    let many: Vec<_> = (0..n)
        .map(|i| event(&format!("bulk-{i}"), None, &["bulk"]))
        .collect();
    let published = node_b.publish(many).await;
    assert!(published.is_ok(), "{published:?}");
    let mut ids = Vec::new();
    let mut payloads = 0;
    while ids.len() < n {
        let h = match tokio::time::timeout(Duration::from_secs(30), heard.recv()).await {
            Ok(Some(h)) => h,
            other => panic!("no notification: {other:?} ({} ids so far)", ids.len()),
        };
        assert!(h.payload.len() < 8000, "{} bytes", h.payload.len());
        let w = notify::Work::parse(&h.payload)
            .unwrap_or_else(|| panic!("not a work payload: {}", h.payload));
        assert_eq!(w.destination, "bulk");
        assert!(w.deliveries.len() <= notify::IDS_PER_PAYLOAD);
        payloads += 1;
        ids.extend(w.deliveries.iter().map(|(id, _)| *id));
    }
    assert_eq!(
        payloads,
        3,
        "{n} ids in payloads of at most {}",
        notify::IDS_PER_PAYLOAD
    );
    let mut stored: Vec<u64> = match c
        .query(
            "SELECT id FROM deliveries WHERE subscription = 'bulk' ORDER BY id",
            &[],
        )
        .await
    {
        Ok(rows) => rows
            .iter()
            .map(|r| u64::try_from(r.get::<_, i64>(0)).unwrap_or(0))
            .collect(),
        Err(e) => panic!("{e}"),
    };
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in id order");
    stored.sort_unstable();
    assert_eq!(ids, stored);
}

/// Outcomes are recorded under the lease: the holder's are committed (the attempt appended,
/// the delivery moved on); once another node has taken the destination over, the old
/// holder's outcomes are refused whole and change nothing, while the new holder's go in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_lease_cannot_record_outcomes() {
    use std::time::Duration;

    use dispatchd::model::DeliveryStatus;
    use dispatchd::storage::postgres::{leases, writer};
    use dispatchd::storage::writer::{Next, Published};
    let (_pg, url, c) = migrated("fence").await;
    let w = pg_writer(&url);
    match w
        .publish(vec![event("f-1", None, &["crm"])])
        .await
        .as_deref()
    {
        Ok([Published::Created { .. }]) => {}
        other => panic!("{other:?}"),
    }
    let (delivery, _) = delivery_of(&c, "f-1").await;
    let lease = Duration::from_secs(10);
    let dests = vec!["crm".to_string()];
    let now = dispatchd::clock::now_micros();
    let ready = std::collections::HashSet::new();
    let a = match leases::balance(&c, "node-a", &dests, &ready, now, lease).await {
        Ok(b) => b.held["crm"].epoch,
        Err(e) => panic!("{e}"),
    };
    let outcome = |status: u16, next: Next| {
        attempt(
            delivery,
            "crm",
            dispatchd::clock::now_micros(),
            status,
            next,
        )
    };
    let mut ca = pooled(&url).await;
    let retry_at = now + 60_000_000;
    let r = writer::record_attempts(
        &mut ca,
        ("crm", "node-a", a),
        &[outcome(503, Next::Retry { at: retry_at })],
    )
    .await;
    assert!(matches!(r, Ok(writer::Recorded::Committed)), "{r:?}");
    let retrying = i16::from(DeliveryStatus::Retrying.code());
    assert_eq!(state(&c, delivery).await, (retrying, 1, 1));

    // Node B takes over once A's lease has ended (A stopped heartbeating).
    let later = now + 3 * 10_000_000;
    let b = match leases::balance(&c, "node-b", &dests, &ready, later, lease).await {
        Ok(b) => b.held["crm"].epoch,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(b, a + 1);
    let late = writer::record_attempts(
        &mut ca,
        ("crm", "node-a", a),
        &[outcome(200, Next::Succeeded)],
    )
    .await;
    assert!(matches!(late, Ok(writer::Recorded::Fenced)), "{late:?}");
    assert_eq!(
        state(&c, delivery).await,
        (retrying, 1, 1),
        "the fenced outcome changed nothing"
    );
    let mut cb = pooled(&url).await;
    let r = writer::record_attempts(
        &mut cb,
        ("crm", "node-b", b),
        &[outcome(200, Next::Succeeded)],
    )
    .await;
    assert!(matches!(r, Ok(writer::Recorded::Committed)), "{r:?}");
    let succeeded = i16::from(DeliveryStatus::Succeeded.code());
    assert_eq!(state(&c, delivery).await, (succeeded, 2, 2));
}

/// One group commit of outcomes may hold several runs of attempts of one destination, apart
/// (another destination's between them) and even under an epoch since replaced: each
/// destination keeps one failure streak (a success, then failures: failing since the first
/// of those), and only the outcomes under the lease's current epoch are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_outcomes_keeps_one_streak_per_destination_and_fences_by_epoch() {
    use std::time::Duration;

    use dispatchd::model::DeliveryStatus;
    use dispatchd::storage::postgres::{leases, writer};
    use dispatchd::storage::writer::Next;
    let (_pg, url, c) = migrated("streaks").await;
    let w = pg_writer(&url);
    let published = w
        .publish(vec![
            event("s-1", None, &["crm"]),
            event("s-2", None, &["crm"]),
            event("s-3", None, &["crm"]),
            event("s-4", None, &["erp"]),
        ])
        .await;
    assert!(published.is_ok(), "{published:?}");
    let ids: Vec<i64> = deliveries_of(&c, &["s-1", "s-2", "s-3", "s-4"])
        .await
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    let lease = Duration::from_secs(10);
    let dests = vec!["crm".to_string(), "erp".to_string()];
    let now = dispatchd::clock::now_micros();
    let ready = std::collections::HashSet::new();
    // node-a holds both, then node-b takes them over once node-a's leases ended.
    if let Err(e) = leases::balance(&c, "node-a", &dests, &ready, now, lease).await {
        panic!("{e}");
    }
    let later = now + 3 * 10_000_000;
    let held = match leases::balance(&c, "node-b", &dests, &ready, later, lease).await {
        Ok(b) => b.held,
        Err(e) => panic!("{e}"),
    };
    let (crm, erp) = (held["crm"].epoch, held["erp"].epoch);
    let outcome = |delivery: i64, sub: &str, at: i64, ok: bool| {
        if ok {
            attempt(delivery, sub, at, 200, Next::Succeeded)
        } else {
            let retry = Next::Retry {
                at: later + 60_000_000,
            };
            attempt(delivery, sub, at, 503, retry)
        }
    };
    let t = later;
    let first = [
        outcome(ids[0], "crm", t, true),
        outcome(ids[1], "crm", t + 1, false),
    ];
    let other = [outcome(ids[3], "erp", t + 2, true)];
    let second = [outcome(ids[2], "crm", t + 3, false)];
    // A stale run: crm under the epoch node-a held, as if node-b had it queued from before.
    let stale = [outcome(ids[3], "erp", t + 4, false)];
    let ca = pooled(&url).await;
    let mut due = Vec::new();
    let fenced = writer::record_outcomes(
        &ca,
        "node-b",
        &[
            ("crm", crm, &first[..]),
            ("erp", erp, &other[..]),
            ("crm", crm, &second[..]),
            ("erp", erp - 1, &stale[..]),
        ],
        &mut due,
    )
    .await;
    match fenced {
        Ok(f) => assert_eq!(f, vec![("erp".to_string(), erp - 1)]),
        Err(e) => panic!("{e}"),
    }
    // Both crm retries come back for the scheduler; the stale erp outcome changed nothing.
    let mut retried: Vec<u64> = due.iter().map(|d| d.delivery).collect();
    retried.sort_unstable();
    let want: Vec<u64> = [ids[1], ids[2]]
        .iter()
        .map(|i| u64::try_from(*i).unwrap_or(0))
        .collect();
    assert_eq!(retried, want);
    let (succeeded, retrying) = (
        i16::from(DeliveryStatus::Succeeded.code()),
        i16::from(DeliveryStatus::Retrying.code()),
    );
    assert_eq!(state(&c, ids[0]).await, (succeeded, 1, 1));
    assert_eq!(state(&c, ids[1]).await, (retrying, 1, 1));
    assert_eq!(state(&c, ids[2]).await, (retrying, 1, 1));
    assert_eq!(state(&c, ids[3]).await, (succeeded, 1, 1));
    let failing = |id: &'static str| {
        let c = &c;
        async move {
            match c
                .query_opt(
                    "SELECT failing_since FROM subscription_state WHERE id = $1",
                    &[&id],
                )
                .await
            {
                Ok(r) => r.and_then(|r| r.get::<_, Option<i64>>(0)),
                Err(e) => panic!("{e}"),
            }
        }
    };
    assert_eq!(
        failing("crm").await,
        Some(t + 1),
        "failing since the first failure"
    );
    assert_eq!(failing("erp").await, None);
}

/// The delivery made for event `id` (its only one), and the event's seq.
async fn delivery_of(c: &tokio_postgres::Client, id: &str) -> (i64, i64) {
    match c
        .query_one(
            "SELECT id, event_seq FROM deliveries WHERE event_id = $1",
            &[&id],
        )
        .await
    {
        Ok(r) => (r.get(0), r.get(1)),
        Err(e) => panic!("{id}: {e}"),
    }
}

/// `delivery_of` for each of these events, in order.
async fn deliveries_of(c: &tokio_postgres::Client, ids: &[&str]) -> Vec<(i64, i64)> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(delivery_of(c, id).await);
    }
    out
}

/// Deliveries whose event is gone, and attempts whose delivery is gone.
async fn orphans(c: &tokio_postgres::Client) -> (i64, i64) {
    match c
        .query_one(
            "SELECT (SELECT count(*) FROM deliveries d
                     WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.seq = d.event_seq)),
                    (SELECT count(*) FROM attempts a
                     WHERE NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.id = a.delivery))",
            &[],
        )
        .await
    {
        Ok(r) => (r.get(0), r.get(1)),
        Err(e) => panic!("{e}"),
    }
}

/// An attempt of `delivery` (for destination `sub`) answered with `status` at `started_at`,
/// and what follows it; a 5xx carries its summary, as the worker writes it.
fn attempt(
    delivery: impl TryInto<u64>,
    sub: &str,
    started_at: i64,
    status: u16,
    next: dispatchd::storage::writer::Next,
) -> dispatchd::storage::writer::AttemptRecord {
    dispatchd::storage::writer::AttemptRecord {
        delivery: delivery.try_into().unwrap_or(0),
        subscription: std::sync::Arc::from(sub),
        attempt: dispatchd::model::Attempt {
            started_at,
            duration_us: 1000,
            status_code: Some(status),
            error: None,
            response_body: String::new(),
        },
        error: (status >= 500).then(|| format!("HTTP {status}")),
        next,
    }
}

/// A delivery's status, attempt count, and attempts kept.
async fn state(c: &tokio_postgres::Client, delivery: i64) -> (i16, i32, i64) {
    match c
        .query_one(
            "SELECT status, attempts, (SELECT count(*) FROM attempts WHERE delivery = $1)
             FROM deliveries WHERE id = $1",
            &[&delivery],
        )
        .await
    {
        Ok(r) => (r.get(0), r.get(1), r.get(2)),
        Err(e) => panic!("{e}"),
    }
}

/// An inbound provider request is stored once across nodes: the same delivery id received
/// by two nodes at once, or again later, is one receipt and one event; a body's fingerprint
/// counts within its window and not after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_receipts_are_stored_once_across_nodes() {
    use dispatchd::model::Receipt;
    use dispatchd::storage::writer::{Ingested, NewReceipt};
    let (_pg, url, c) = migrated("inbound").await;
    let receipt =
        |delivery: Option<&str>, body: &str, fp: Option<(&str, i64)>, at: i64| NewReceipt {
            receipt: Receipt {
                source: "github".into(),
                method: "POST".into(),
                headers: vec![("x-github-event".into(), "push".into())],
                body: body.as_bytes().to_vec(),
                received_at: at,
                scheme: "github".into(),
                signed_timestamp: None,
                delivery_id: delivery.map(str::to_string),
                event_id: String::new(),
                event_seq: 0,
            },
            fingerprint: fp.map(|(f, nb)| (f.to_string(), nb)),
        };
    let now = dispatchd::clock::now_micros();
    let (w_a, w_b) = (pg_writer(&url), pg_writer(&url));
    for round in 0..5 {
        let did = format!("delivery-{round}");
        let (ra, rb) = tokio::join!(
            w_a.ingest(
                receipt(Some(&did), "{}", None, now),
                event(&format!("in-a-{round}"), None, &["crm"])
            ),
            w_b.ingest(
                receipt(Some(&did), "{}", None, now),
                event(&format!("in-b-{round}"), None, &["crm"])
            ),
        );
        let created = [&ra, &rb]
            .iter()
            .filter(|r| matches!(r, Ok(Ingested::Created { .. })))
            .count();
        let dups = [&ra, &rb]
            .iter()
            .filter(|r| matches!(r, Ok(Ingested::Duplicate { .. })))
            .count();
        assert_eq!((created, dups), (1, 1), "{ra:?} {rb:?}");
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM receipts WHERE delivery_id = $1",
                &did
            )
            .await,
            1
        );
    }
    assert_eq!(
        count(&c, "SELECT count(*) FROM events WHERE id LIKE $1", "in-%").await,
        5
    );

    // Fingerprints: a repeat within the window is a duplicate; one after it is new.
    let fp = "body sha256:abc";
    let first = w_a
        .ingest(
            receipt(None, "{\"a\":1}", Some((fp, now - 1_000)), now),
            event("fp-1", None, &["crm"]),
        )
        .await;
    assert!(matches!(first, Ok(Ingested::Created { .. })), "{first:?}");
    let again = w_b
        .ingest(
            receipt(None, "{\"a\":1}", Some((fp, now - 1_000)), now + 10),
            event("fp-2", None, &["crm"]),
        )
        .await;
    assert!(
        matches!(again, Ok(Ingested::Duplicate { ref event_id, .. }) if event_id == "fp-1"),
        "{again:?}"
    );
    let later = now + 86_400_000_000;
    let past_window = w_b
        .ingest(
            receipt(None, "{\"a\":1}", Some((fp, later - 1_000)), later),
            event("fp-3", None, &["crm"]),
        )
        .await;
    assert!(
        matches!(past_window, Ok(Ingested::Created { .. })),
        "{past_window:?}"
    );
    // The event points at its receipt and the receipt at its event.
    let linked = count(
        &c,
        "SELECT count(*) FROM events e JOIN receipts r ON r.id = e.receipt AND r.event_seq = e.seq WHERE e.id = $1",
        "fp-3",
    )
    .await;
    assert_eq!(linked, 1);
}

/// Operator writes keep the embedded backend's rules: a retry makes a dead delivery due now
/// with its attempts kept and refuses a succeeded one; a redrive (only dead) leaves others
/// alone; a cancel stops a live delivery and refuses a terminal one; replay makes new
/// deliveries of stored events and skips events that are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_writes_follow_the_embedded_rules() {
    use dispatchd::model::{DeliveryStatus, Origin};
    use dispatchd::storage::postgres::{leases, operator, writer};
    use dispatchd::storage::writer::{CancelOutcome, Next, RetryOutcome};
    let (_pg, url, c) = migrated("operator").await;
    let w = pg_writer(&url);
    if let Err(e) = w
        .publish(vec![
            event("o-1", None, &["crm"]),
            event("o-2", None, &["crm"]),
            event("o-3", None, &["crm"]),
        ])
        .await
    {
        panic!("{e}");
    }
    let ids: Vec<u64> = match c.query("SELECT id FROM deliveries ORDER BY id", &[]).await {
        Ok(rows) => rows
            .iter()
            .map(|r| u64::try_from(r.get::<_, i64>(0)).unwrap_or(0))
            .collect(),
        Err(e) => panic!("{e}"),
    };
    // 1 dies, 2 succeeds, 3 stays pending: recorded under a lease, as a node would.
    let now = dispatchd::clock::now_micros();
    let epoch = match leases::balance(
        &c,
        "node-a",
        &["crm".to_string()],
        &std::collections::HashSet::new(),
        now,
        std::time::Duration::from_secs(60),
    )
    .await
    {
        Ok(b) => b.held["crm"].epoch,
        Err(e) => panic!("{e}"),
    };
    let rec = |id: u64, status: u16, next: Next| attempt(id, "crm", now, status, next);
    let mut ca = pooled(&url).await;
    let r = writer::record_attempts(
        &mut ca,
        ("crm", "node-a", epoch),
        &[
            rec(ids[0], 500, Next::Dead),
            rec(ids[1], 200, Next::Succeeded),
        ],
    )
    .await;
    assert!(matches!(r, Ok(writer::Recorded::Committed)), "{r:?}");

    let mut co = connect(&url).await;
    // Redrive touches only the dead one.
    let redrive = operator::retry_deliveries(&mut co, &ids, Some(DeliveryStatus::Dead)).await;
    match redrive.as_deref() {
        Ok(
            [
                RetryOutcome::Scheduled(d),
                RetryOutcome::NotAllowed(s),
                RetryOutcome::NotAllowed(p),
            ],
        ) => {
            assert_eq!((d.status, d.attempts), (DeliveryStatus::Retrying, 1));
            assert_eq!(s.status, DeliveryStatus::Succeeded);
            assert_eq!(p.status, DeliveryStatus::Pending);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM deliveries WHERE dead_at IS NOT NULL AND event_id = $1",
            "o-1"
        )
        .await,
        0
    );
    let retry = operator::retry_deliveries(&mut co, &[ids[1], 999_999], None).await;
    assert!(
        matches!(
            retry.as_deref(),
            Ok([RetryOutcome::NotAllowed(_), RetryOutcome::NotFound])
        ),
        "{retry:?}"
    );
    let cancel =
        operator::cancel_deliveries(&mut co, &[ids[2], ids[1]], Some("by an operator")).await;
    match cancel.as_deref() {
        Ok([CancelOutcome::Cancelled(d), CancelOutcome::NotAllowed(_)]) => {
            assert_eq!(d.last_error.as_deref(), Some("by an operator"));
        }
        other => panic!("{other:?}"),
    }
    // Replay: events 1 and 3 to erp, and an event that does not exist.
    let seqs: Vec<u64> = match c
        .query(
            "SELECT seq FROM events WHERE id IN ('o-1', 'o-3') ORDER BY seq",
            &[],
        )
        .await
    {
        Ok(rows) => rows
            .iter()
            .map(|r| u64::try_from(r.get::<_, i64>(0)).unwrap_or(0))
            .collect(),
        Err(e) => panic!("{e}"),
    };
    let made = operator::create_deliveries(
        &mut co,
        &[(seqs[0], "erp"), (seqs[1], "erp"), (999_999, "erp")],
        Origin::Replay,
    )
    .await;
    assert!(matches!(made, Ok(2)), "{made:?}");
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM deliveries WHERE subscription = $1 AND origin = 1 AND status = 0",
            "erp"
        )
        .await,
        2
    );
}

/// Retention removes old events whose deliveries are all terminal, with their deliveries and
/// attempts, keeps events with live work, and runs on one node at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_sweeps_on_one_node_and_keeps_live_work() {
    use dispatchd::storage::postgres::{leases, retention, writer};
    use dispatchd::storage::writer::Next;
    let (_pg, url, mut c) = migrated("retention").await;
    let w = pg_writer(&url);
    if let Err(e) = w
        .publish(vec![
            event("r-1", None, &["crm"]),
            event("r-2", None, &["crm"]),
            event("r-3", None, &[]),
            // The newest event stays whatever its age, as on the embedded backend.
            event("r-4", None, &[]),
        ])
        .await
    {
        panic!("{e}");
    }
    let (first, _) = delivery_of(&c, "r-1").await;
    let now = dispatchd::clock::now_micros();
    let epoch = match leases::balance(
        &c,
        "node-a",
        &["crm".to_string()],
        &std::collections::HashSet::new(),
        now,
        std::time::Duration::from_secs(60),
    )
    .await
    {
        Ok(b) => b.held["crm"].epoch,
        Err(e) => panic!("{e}"),
    };
    let done = attempt(first, "crm", now, 200, Next::Succeeded);
    let mut ca = pooled(&url).await;
    let r = writer::record_attempts(&mut ca, ("crm", "node-a", epoch), &[done]).await;
    assert!(matches!(r, Ok(writer::Recorded::Committed)), "{r:?}");

    // Another node is sweeping: this one skips.
    let holder = connect(&url).await;
    advisory(&holder, "pg_advisory_lock", 0x7265_7461_696e).await;
    let cutoff = now + 3_600_000_000;
    let skipped = retention::sweep(&mut c, cutoff, 100).await;
    assert!(
        matches!(skipped, Ok(retention::Swept::Skipped)),
        "{skipped:?}"
    );
    advisory(&holder, "pg_advisory_unlock", 0x7265_7461_696e).await;
    let swept = retention::sweep(&mut c, cutoff, 100).await;
    assert!(
        matches!(swept, Ok(retention::Swept::Removed(2))),
        "{swept:?}"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM events WHERE id = $1", "r-2").await,
        1,
        "live work kept"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM events WHERE id LIKE $1", "r-%").await,
        2
    );
    let left = count(
        &c,
        "SELECT count(*) FROM attempts WHERE delivery::text = $1",
        &first.to_string(),
    )
    .await;
    assert_eq!(left, 0, "attempts went with their delivery");
    // Nothing is left pointing at what was removed.
    let orphans = orphans(&c).await;
    assert_eq!(
        orphans,
        (0, 0),
        "deliveries and attempts went with their events"
    );
}

/// A destination task's read for a run of attempts answers, with no further query, every
/// delivery it was read for (one gone: none; one asked for twice: with its event), and the
/// events of those still scheduled; the event of a delivery already done is not read at all.
/// Shown by stopping the server after the read: what the read holds still answers, anything
/// else fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_read_answers_what_it_was_read_for_without_another_query() {
    use dispatchd::model::DeliveryStatus;
    use dispatchd::storage::Store;
    use dispatchd::storage::postgres::reads::PgStore;
    let (pg, url, c) = migrated("snapshot").await;
    let w = pg_writer(&url);
    let published = w
        .publish(vec![
            event("s-1", None, &["crm"]),
            event("s-2", None, &["crm"]),
            event("s-3", None, &["crm"]),
        ])
        .await;
    assert!(published.is_ok(), "{published:?}");
    let rows = deliveries_of(&c, &["s-1", "s-2", "s-3"]).await;
    let [(d1, e1), (d2, e2), (d3, _)] = rows[..] else {
        panic!("{rows:?}")
    };
    // s-2's delivery is done: no longer scheduled.
    let done = i16::from(DeliveryStatus::Succeeded.code());
    if let Err(e) = c
        .execute(
            "UPDATE deliveries SET status = $2, next_attempt_at = NULL WHERE id = $1",
            &[&d2, &done],
        )
        .await
    {
        panic!("{e}");
    }
    let id = |d: i64| u64::try_from(d).unwrap_or(0);
    let gone = id(d3) + 1000;
    let store = match PgStore::new(shared(&url), 2) {
        Ok(s) => Store::Postgres(s),
        Err(e) => panic!("{e}"),
    };
    // d1 is asked for twice, the second time without its event (as a FIFO head is).
    let ids = [
        (id(d1), true),
        (id(d2), true),
        (gone, false),
        (id(d1), false),
    ];
    let snap = match store.snapshot_for(&ids) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    drop(c);
    drop(pg);

    assert!(snap.answers(id(d1), true) && snap.answers(id(d2), true));
    assert!(snap.answers(gone, false) && !snap.answers(gone, true));
    assert!(!snap.answers(id(d3), false), "not read for");
    match snap.delivery(id(d1)) {
        Ok(Some(d)) => assert!(d.next_attempt_at.is_some(), "{d:?}"),
        other => panic!("{other:?}"),
    }
    match snap.event_by_seq(u64::try_from(e1).unwrap_or(0)) {
        Ok(Some(e)) => assert_eq!(e.id, "s-1"),
        other => panic!("{other:?}"),
    }
    match snap.delivery(id(d2)) {
        Ok(Some(d)) => assert_eq!(d.status, DeliveryStatus::Succeeded),
        other => panic!("{other:?}"),
    }
    assert!(matches!(snap.delivery(gone), Ok(None)));
    // Neither was read: asking goes to the server, which is gone.
    assert!(snap.event_by_seq(u64::try_from(e2).unwrap_or(0)).is_err());
    assert!(snap.delivery(id(d3)).is_err());
}

/// Retention against an operator, with retention's own two steps: while a sweep holds the
/// expired events locked, a replay of one and a retry of its delivery wait, and find it
/// gone once the sweep commits (no delivery or attempt is left pointing at a removed
/// event: no foreign key would refuse one). Live work that reached another expired event
/// between the two steps keeps that event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_meeting_retention_wait_and_live_work_keeps_its_event() {
    use dispatchd::model::{DeliveryStatus, Origin};
    use dispatchd::storage::postgres::{operator, retention};
    use dispatchd::storage::writer::RetryOutcome;
    let (_pg, url, c) = migrated("operator_race").await;
    let w = pg_writer(&url);
    for id in ["q-0", "q-1", "q-2"] {
        let published = w.publish(vec![event(id, None, &["crm"])]).await;
        assert!(published.is_ok(), "{published:?}");
    }
    let rows = deliveries_of(&c, &["q-0", "q-1"]).await;
    let [(_, seq0), (d1, seq1)] = rows[..] else {
        panic!("{rows:?}")
    };
    // Both delivered; q-2, the newest, stays whatever happens.
    let done = i16::from(DeliveryStatus::Succeeded.code());
    if let Err(e) = c
        .execute(
            "UPDATE deliveries SET status = $1, next_attempt_at = NULL
             WHERE event_id IN ('q-0', 'q-1')",
            &[&done],
        )
        .await
    {
        panic!("{e}");
    }
    let cutoff = dispatchd::clock::now_micros() + 3_600_000_000;
    let mut sweeper = connect(&url).await;
    let tx = match sweeper.transaction().await {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    match retention::expired(&tx, cutoff, 100).await {
        Ok(doomed) => assert_eq!(doomed, vec![seq0, seq1]),
        Err(e) => panic!("{e}"),
    }
    // Live work reaches q-0 by a path that takes no lock.
    if let Err(e) = c
        .execute(
            "INSERT INTO deliveries (event_seq, event_id, event_type, subscription, status,
                                     next_attempt_at, created_at, updated_at, origin)
             SELECT seq, id, event_type, 'erp', 0, $2, $2, $2, 1 FROM events WHERE seq = $1",
            &[&seq0, &dispatchd::clock::now_micros()],
        )
        .await
    {
        panic!("{e}");
    }
    // A replay of q-1 and a retry of its delivery, each on a connection of its own.
    let mut replayer = connect(&url).await;
    let mut retrier = connect(&url).await;
    let mut pids = Vec::new();
    for client in [&replayer, &retrier] {
        match client.query_one("SELECT pg_backend_pid()", &[]).await {
            Ok(r) => pids.push(r.get::<_, i32>(0)),
            Err(e) => panic!("{e}"),
        }
    }
    let id = |v: i64| u64::try_from(v).unwrap_or(0);
    let replay = tokio::spawn(async move {
        operator::create_deliveries(&mut replayer, &[(id(seq1), "erp")], Origin::Replay).await
    });
    let retry =
        tokio::spawn(
            async move { operator::retry_deliveries(&mut retrier, &[id(d1)], None).await },
        );
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting = match c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE pid = ANY($1) AND wait_event_type = 'Lock'",
                &[&pids],
            )
            .await
        {
            Ok(r) => r.get::<_, i64>(0),
            Err(e) => panic!("{e}"),
        };
        if waiting == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline && !replay.is_finished() && !retry.is_finished(),
            "the replay and the retry did not both wait for the sweep"
        );
        tokio::task::yield_now().await;
    }
    match retention::remove_locked(&tx, &[seq0, seq1], cutoff).await {
        Ok(n) => assert_eq!(n, 1, "q-1 only: q-0 has live work"),
        Err(e) => panic!("{e}"),
    }
    if let Err(e) = tx.commit().await {
        panic!("{e}");
    }
    match replay.await {
        Ok(Ok(made)) => assert_eq!(made, 0, "nothing made for a removed event"),
        other => panic!("{other:?}"),
    }
    match retry.await {
        Ok(Ok(out)) => assert!(matches!(out[..], [RetryOutcome::NotFound]), "{out:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        count(&c, "SELECT count(*) FROM events WHERE id LIKE $1", "q-%").await,
        2,
        "q-0 and q-2 stay"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM deliveries WHERE event_id = $1",
            "q-0"
        )
        .await,
        2
    );
    let orphans = orphans(&c).await;
    assert_eq!(orphans, (0, 0));
}

/// A node whose database was migrated further by a newer release runs no retention (what
/// goes with an event may have changed); once the schema is one it knows, it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_is_left_to_the_release_that_migrated_the_schema() {
    use dispatchd::model::DeliveryStatus;
    use dispatchd::storage::postgres::retention;
    let (_pg, url, mut c) = migrated("retention_newer").await;
    let w = pg_writer(&url);
    for id in ["n-1", "n-2"] {
        let published = w.publish(vec![event(id, None, &["crm"])]).await;
        assert!(published.is_ok(), "{published:?}");
    }
    let done = i16::from(DeliveryStatus::Succeeded.code());
    if let Err(e) = c
        .execute(
            "UPDATE deliveries SET status = $1, next_attempt_at = NULL",
            &[&done],
        )
        .await
    {
        panic!("{e}");
    }
    let set_version =
        |v: i64| format!("UPDATE dispatchd_meta SET value = '{v}' WHERE key = 'schema_version'");
    let newer = SCHEMA_VERSION + 1;
    if let Err(e) = c.execute(&set_version(newer), &[]).await {
        panic!("{e}");
    }
    let cutoff = dispatchd::clock::now_micros() + 3_600_000_000;
    let swept = retention::sweep(&mut c, cutoff, 100).await;
    assert!(
        matches!(swept, Ok(retention::Swept::NewerSchema(Some(v))) if v == newer),
        "{swept:?}"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM events WHERE id LIKE $1", "n-%").await,
        2,
        "nothing removed"
    );
    // A version that cannot be read counts as newer.
    if let Err(e) = c
        .execute(
            "UPDATE dispatchd_meta SET value = 'x' WHERE key = 'schema_version'",
            &[],
        )
        .await
    {
        panic!("{e}");
    }
    let swept = retention::sweep(&mut c, cutoff, 100).await;
    assert!(
        matches!(swept, Ok(retention::Swept::NewerSchema(None))),
        "{swept:?}"
    );
    // A migration under way (its lock held): the sweep waits for the next round.
    if let Err(e) = c.execute(&set_version(SCHEMA_VERSION), &[]).await {
        panic!("{e}");
    }
    let migrating = connect(&url).await;
    advisory(&migrating, "pg_advisory_lock", 0x6469_7370_6174_6368).await;
    let swept = retention::sweep(&mut c, cutoff, 100).await;
    assert!(matches!(swept, Ok(retention::Swept::Skipped)), "{swept:?}");
    advisory(&migrating, "pg_advisory_unlock", 0x6469_7370_6174_6368).await;
    // Its own schema again: n-1 goes (n-2, the newest event, always stays).
    let swept = retention::sweep(&mut c, cutoff, 100).await;
    assert!(
        matches!(swept, Ok(retention::Swept::Removed(1))),
        "{swept:?}"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM events WHERE id LIKE $1", "n-%").await,
        1
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM events WHERE id = $1", "n-2").await,
        1
    );
}

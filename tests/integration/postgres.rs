//! Cluster mode's PostgreSQL schema against a real server: migrations apply once when nodes
//! start together, again is a no-op, and a database of a newer schema is refused.

use dispatchd::storage::postgres::migrate::{self, MigrateError, SCHEMA_VERSION};

use crate::support::postgres::Postgres;

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
        Ok(c) => c,
        Err(e) => panic!("connect {url}: {e}"),
    };
    tokio::spawn(conn);
    client
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
    use dispatchd::storage::postgres::writer;
    use dispatchd::storage::writer::Published;
    let pg = Postgres::start();
    pg.create_db("publish").await;
    let url = pg.url("publish");
    let mut c = connect(&url).await;
    if let Err(e) = migrate::migrate(&mut c).await {
        panic!("{e}");
    }
    let a = writer::spawn(connect(&url).await);
    let b = writer::spawn(connect(&url).await);

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
        a.commits() < 200,
        "{} commits for 200 publishes",
        a.commits()
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

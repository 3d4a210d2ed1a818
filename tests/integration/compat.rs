//! Backward compatibility: a database file written by schema version 1 (checked in at
//! tests/data/schema-v1.redb) still verifies, opens (upgraded to version 2 in place) and
//! reads back exactly. A change to a
//! table's key or value layout fails here before it can reach an operator's disk.

use std::process::Command;

use redb::{ReadableDatabase, TableHandle};
use serde_json::{Value, json};

use crate::support::Daemon;

const CONFIG: &str = r#"
[delivery]
allow_private_networks = true

[[subscriptions]]
id = "crm"
url = "http://127.0.0.1:9/hook"
event_types = ["order.*"]
secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]

[[sources]]
id = "github"
scheme = "github"
secrets = ["It's a Secret to Everybody"]
"#;

fn fixture() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = match tempfile::tempdir() {
        Ok(t) => t,
        Err(e) => panic!("tempdir: {e}"),
    };
    let data = tmp.path().join("data");
    if let Err(e) = std::fs::create_dir_all(&data) {
        panic!("mkdir: {e}");
    }
    let file = data.join("dispatchd.redb");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/schema-v1.redb");
    if let Err(e) = std::fs::copy(src, &file) {
        panic!("copy fixture: {e}");
    }
    (tmp, file)
}

/// Runs `dispatchd verify-db` on a file that must pass; its standard output.
fn verify_db(file: &std::path::Path) -> String {
    let out = match Command::new(env!("CARGO_BIN_EXE_dispatchd"))
        .arg("verify-db")
        .arg(file)
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!("verify-db: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "verify-db failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn schema_v1_file_verifies() {
    let (_tmp, file) = fixture();
    let stdout = verify_db(&file);
    assert!(stdout.contains("schema version 1, ok"), "{stdout}");
    assert!(
        stdout.contains("upgrades it to schema version 3"),
        "{stdout}"
    );
    for (table, n) in [
        ("events", 5),
        ("deliveries", 3),
        ("attempts", 3),
        ("receipts", 1),
    ] {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(table))
            .unwrap_or("");
        assert_eq!(
            line.split_whitespace().nth(1),
            Some(n.to_string().as_str()),
            "{table}: {stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_v1_file_reads_back() {
    let (tmp, file) = fixture();
    let d = Daemon::start_in(tmp.path(), CONFIG);

    let (status, ev) = d.get("/v1/events/evt_compat_2").await;
    assert_eq!(status, 200, "{ev}");
    assert_eq!(ev["seq"], 2);
    assert_eq!(ev["type"], "order.created");
    assert_eq!(ev["source"], "shop");
    assert_eq!(ev["data"], json!({"n": 2}));
    assert_eq!(ev["idempotency_key"], "key-2");

    let (_, dl) = d.get("/v1/events/evt_compat_1/deliveries").await;
    let first = &dl["items"][0];
    assert_eq!(first["subscription"], "crm", "{dl}");
    assert_eq!(first["status"], "succeeded", "{dl}");
    assert_eq!(first["attempts"], 1, "{dl}");
    let (_, attempts) = d
        .get(&format!(
            "/v1/deliveries/{}/attempts",
            first["id"].as_str().unwrap_or("")
        ))
        .await;
    assert_eq!(attempts["items"][0]["status_code"], 200, "{attempts}");

    // The idempotency index still answers for old keys.
    let (status, dup) = d
        .send(
            d.http
                .post(d.url("/v1/events"))
                .header("content-type", "application/json")
                .header("idempotency-key", "key-3")
                .body(r#"{"type":"order.created","data":{}}"#),
        )
        .await;
    assert_eq!(status, 200, "{dup}");
    assert_eq!(dup["seq"], 3);

    let (status, receipt) = d.get("/v1/receipts/1").await;
    assert_eq!(status, 200, "{receipt}");
    assert_eq!(receipt["source"], "github", "{receipt}");

    let (status, sub) = d.get("/v1/subscriptions/api-sub").await;
    assert_eq!(status, 200, "{sub}");
    assert_eq!(sub["source"], "api", "{sub}");

    // The lists that version 1 answered from the two dropped indexes answer from the one
    // left: by subscription (every status) and by status (every subscription).
    let (_, all) = d.get("/v1/deliveries").await;
    let (_, by_sub) = d.get("/v1/deliveries?subscription=crm").await;
    assert_eq!(by_sub["items"], all["items"], "{by_sub}\n{all}");
    let (_, succeeded) = d.get("/v1/deliveries?status=succeeded").await;
    let want: Vec<&Value> = all["items"]
        .as_array()
        .map(|a| a.iter().filter(|d| d["status"] == "succeeded").collect())
        .unwrap_or_default();
    assert!(!want.is_empty(), "{all}");
    assert_eq!(
        succeeded["items"]
            .as_array()
            .map(|a| a.iter().collect::<Vec<_>>()),
        Some(want),
        "{succeeded}"
    );

    // New events continue the old numbering.
    let next = d.publish("order.created", json!({"n": 6})).await;
    assert_eq!(next["seq"], 6, "{next}");

    let mut d = d;
    let status = d.terminate();
    assert_eq!(status.code(), Some(0), "{status:?}\n{}", d.logs());
    drop(d);

    // The daemon upgraded the file: version 3, and the dropped tables are gone.
    let stdout = verify_db(&file);
    assert!(stdout.contains("schema version 3, ok"), "{stdout}");
    let db = match redb::Database::open(&file) {
        Ok(db) => db,
        Err(e) => panic!("open {}: {e}", file.display()),
    };
    let r = match db.begin_read() {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    let tables: Vec<String> = match r.list_tables() {
        Ok(t) => t.map(|t| t.name().to_string()).collect(),
        Err(e) => panic!("{e}"),
    };
    for gone in ["deliveries_by_subscription", "deliveries_by_status"] {
        assert!(
            !tables.iter().any(|t| t == gone),
            "{gone} is still there: {tables:?}"
        );
    }
    assert!(
        tables
            .iter()
            .any(|t| t == "deliveries_by_subscription_status"),
        "{tables:?}"
    );
}

//! Backward compatibility: a database file written by schema version 1 (checked in at
//! tests/data/schema-v1.redb) still verifies, opens and reads back exactly. A change to a
//! table's key or value layout fails here before it can reach an operator's disk.

use std::process::Command;

use serde_json::json;

use crate::support::Daemon;

const CONFIG: &str = r#"
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

#[test]
fn schema_v1_file_verifies() {
    let (_tmp, file) = fixture();
    let out = match Command::new(env!("CARGO_BIN_EXE_dispatchd"))
        .arg("verify-db")
        .arg(&file)
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!("verify-db: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "verify-db failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("schema version 1, ok"), "{stdout}");
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
    let (tmp, _file) = fixture();
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

    // New events continue the old numbering.
    let next = d.publish("order.created", json!({"n": 6})).await;
    assert_eq!(next["seq"], 6, "{next}");
}

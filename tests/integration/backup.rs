//! `dispatchd backup` and `dispatchd verify-db`: a consistent copy taken from a running daemon
//! while it keeps ingesting, checked, and good enough to start a daemon from.

use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::Daemon;
use crate::support::receiver::Receiver;
use crate::support::{bin, run_bounded as run};

const ADMIN: &str = "admin-token-0123456789abcdef";
const PUBLISH: &str = "publish-token-0123456789abcd";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const WAIT: Duration = Duration::from_secs(60);

fn config(hook: &str) -> String {
    format!(
        "[auth]\ntokens = [ {{ token = \"{ADMIN}\", scopes = [\"admin\"] }}, {{ token = \"{PUBLISH}\", scopes = [\"publish\"] }} ]\n\n[delivery]\nallow_private_networks = true\n\n[[subscriptions]]\nid = \"crm\"\nurl = \"{hook}\"\nsecrets = [\"{SECRET}\"]\n"
    )
}

async fn publish(d: &Daemon, body: Value) -> (u16, Value) {
    d.send(
        d.http
            .post(d.url("/v1/events"))
            .bearer_auth(PUBLISH)
            .header("content-type", "application/json")
            .body(body.to_string()),
    )
    .await
}

async fn admin_get(d: &Daemon, path: &str) -> (u16, Value) {
    d.send(d.http.get(d.url(path)).bearer_auth(ADMIN)).await
}

async fn cli(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut cmd = bin();
        cmd.args(args);
        run(cmd, WAIT)
    })
    .await
    .unwrap_or_else(|e| panic!("the command's task failed: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The count `verify-db` printed for a table.
fn rows(stdout: &str, table: &str) -> Option<u64> {
    stdout.lines().find_map(|l| {
        let mut parts = l.split_whitespace();
        (parts.next() == Some(table))
            .then(|| parts.next()?.parse().ok())
            .flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_while_ingesting_restores_every_event() {
    let rx = Receiver::start().await;
    let d = Daemon::start(&config(&rx.url("/hook")));
    let mut events = Vec::new();
    for i in 0..40 {
        let (status, body) = publish(
            &d,
            json!({"type": "order.created", "data": {"n": i, "pad": "x".repeat(i * 50)}}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        events.push((body["id"].as_str().unwrap().to_string(), i));
    }
    rx.wait_for(40, WAIT).await;
    // Every delivery recorded as succeeded before the copy is taken.
    for (id, _) in &events {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (_, b) = admin_get(&d, &format!("/v1/events/{id}/deliveries")).await;
            if b["items"][0]["status"] == "succeeded" {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{id}: {b}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Ingest goes on while the copy is made and streamed.
    let tmp = tempfile::tempdir().unwrap();
    let out_file = tmp.path().join("copy.redb");
    let publisher = {
        let url = d.url("/v1/events");
        let http = d.http.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..30 {
                let r = http
                    .post(&url)
                    .bearer_auth(PUBLISH)
                    .header("content-type", "application/json")
                    .body(json!({"type": "during.backup", "data": {"n": i}}).to_string())
                    .send()
                    .await;
                statuses.push(r.map(|r| r.status().as_u16()).unwrap_or(0));
            }
            statuses
        })
    };
    let out = cli(vec![
        "backup".into(),
        "--url".into(),
        format!("http://{}", d.addr),
        "--token".into(),
        ADMIN.into(),
        "--output".into(),
        out_file.display().to_string(),
    ])
    .await;
    assert!(
        out.status.success(),
        "backup failed: {}\n{}",
        text(&out.stderr),
        d.logs()
    );
    assert!(
        text(&out.stdout).contains("checked"),
        "{}",
        text(&out.stdout)
    );
    let statuses = publisher.await.unwrap();
    assert!(statuses.iter().all(|&s| s == 202), "{statuses:?}");
    assert!(out_file.exists());
    assert!(!tmp.path().join("copy.redb.partial").exists());
    // The snapshot file next to the database is gone once streamed.
    let leftovers: Vec<_> = std::fs::read_dir(d.dir.join("data"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".backup-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // verify-db: schema, every record, every index; counts per table.
    let out = cli(vec!["verify-db".into(), out_file.display().to_string()]).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("schema version 3, ok"), "{stdout}");
    let copied = rows(&stdout, "events").unwrap_or(0);
    assert!((40..=70).contains(&copied), "{stdout}");
    assert_eq!(rows(&stdout, "event_ids"), Some(copied), "{stdout}");
    assert!(rows(&stdout, "attempts").unwrap_or(0) >= 40, "{stdout}");

    // A daemon started from the copy serves every event acknowledged before the backup.
    let restored_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(restored_dir.path().join("data")).unwrap();
    std::fs::copy(&out_file, restored_dir.path().join("data/dispatchd.redb")).unwrap();
    let r = Daemon::start_in(restored_dir.path(), &config(&rx.url("/hook")));
    for (id, i) in &events {
        let (status, body) = admin_get(&r, &format!("/v1/events/{id}")).await;
        assert_eq!(status, 200, "{id}: {body}\n{}", r.logs());
        assert_eq!(body["data"]["n"], json!(i), "{body}");
        assert_eq!(body["data"]["pad"], json!("x".repeat(i * 50)));
        let (_, ds) = admin_get(&r, &format!("/v1/events/{id}/deliveries")).await;
        assert_eq!(ds["items"][0]["status"], "succeeded", "{ds}");
    }
    // Numbering resumes after the copied log.
    let (status, body) = publish(&r, json!({"type": "after.restore", "data": {}})).await;
    assert_eq!(status, 202);
    assert_eq!(body["seq"], json!(copied + 1), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_needs_an_admin_token_and_verify_db_refuses_bad_files() {
    let rx = Receiver::start().await;
    let d = Daemon::start(&config(&rx.url("/hook")));
    let tmp = tempfile::tempdir().unwrap();
    let out_file = tmp.path().join("copy.redb");
    let out = cli(vec![
        "backup".into(),
        "--url".into(),
        format!("http://{}", d.addr),
        "--token".into(),
        PUBLISH.into(),
        "--output".into(),
        out_file.display().to_string(),
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("forbidden"),
        "{}",
        text(&out.stderr)
    );
    assert!(!out_file.exists());
    assert!(!tmp.path().join("copy.redb.partial").exists());

    // Not a database.
    let junk = tmp.path().join("junk.redb");
    std::fs::write(&junk, b"not a database").unwrap();
    let out = cli(vec!["verify-db".into(), junk.display().to_string()]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));

    // The live file of a running daemon is refused with a pointer to `backup`.
    let live = d.dir.join("data/dispatchd.redb");
    let out = cli(vec!["verify-db".into(), live.display().to_string()]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("dispatchd backup"),
        "{}",
        text(&out.stderr)
    );
}

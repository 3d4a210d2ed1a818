//! Retention: with a tiny `storage.retention`, events whose deliveries are all terminal go with
//! everything hanging off them; an event with a delivery still retrying stays.

use crate::support::backend::Backend;
use crate::support::eventually;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use crate::support::receiver::{Receiver, Reply};
use crate::support::{Daemon, wait_delivery};
use crate::support::{bin, run_bounded as run};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const WAIT: Duration = Duration::from_secs(60);
const GITHUB_SECRET: &str = "retention-github-secret";

fn config(ok_hook: &str, failing_hook: &str) -> String {
    format!(
        r#"[storage]
retention = "1s"
sweep_interval = "200ms"

[delivery]
allow_private_networks = true

[[subscriptions]]
id = "ok"
url = "{ok_hook}"
event_types = ["done.*"]
secrets = ["{SECRET}"]

[[subscriptions]]
id = "stuck"
url = "{failing_hook}"
event_types = ["stuck.*"]
secrets = ["{SECRET}"]
retry = {{ max_attempts = 10, initial = "1h", max = "1h" }}

[[sources]]
id = "gh"
scheme = "github"
secrets = ["{GITHUB_SECRET}"]
"#
    )
}

/// Posts a signed GitHub webhook; returns the receipt id and event id.
async fn inbound(d: &Daemon, delivery: &str) -> (String, String) {
    let body = json!({"action": "opened", "n": delivery}).to_string();
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(GITHUB_SECRET.as_bytes()) else {
        panic!("HMAC takes keys of any length");
    };
    mac.update(body.as_bytes());
    let sig: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (status, r) = d
        .send(
            d.http
                .post(d.url("/v1/ingest/gh"))
                .header("content-type", "application/json")
                .header("X-GitHub-Event", "issues")
                .header("X-GitHub-Delivery", delivery)
                .header("X-Hub-Signature-256", format!("sha256={sig}"))
                .body(body),
        )
        .await;
    assert_eq!(status, 202, "{r}\n{}", d.logs());
    let field = |k: &str| match r[k].as_str() {
        Some(v) => v.to_string(),
        None => panic!("no {k} in {r}"),
    };
    (field("receipt_id"), field("event_id"))
}

/// A sample's value in the Prometheus text, e.g. `dispatchd_table_rows{table="events"}`.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

async fn terminal_events_expire_and_live_ones_stay(b: Backend) {
    let ok = Receiver::start().await;
    let failing = Receiver::start().await;
    failing.set_default(Reply::Status(500));
    let d = b.start(&config(&ok.url("/ok"), &failing.url("/fail")));

    // Inbound webhooks no subscription wants: no deliveries, so nothing keeps the first (the
    // second holds the newest receipt id, kept so numbering resumes after a restart).
    let (receipt, inbound_event) = inbound(&d, "delivery-1").await;
    let (status, _) = d.get(&format!("/v1/receipts/{receipt}")).await;
    assert_eq!(status, 200);
    let (last_receipt, _) = inbound(&d, "delivery-2").await;
    let stuck = d.publish("stuck.order", json!({"n": "stuck"})).await;
    let stuck_id = stuck["id"].as_str().unwrap().to_string();
    let mut done = Vec::new();
    for i in 0..5 {
        let ev = d.publish("done.order", json!({"n": i})).await;
        done.push(ev["id"].as_str().unwrap().to_string());
    }
    let mut done_deliveries = Vec::new();
    for id in &done {
        let dl = wait_delivery(&d, id, "succeeded").await;
        done_deliveries.push(dl["id"].as_str().unwrap().to_string());
    }
    let stuck_delivery = wait_delivery(&d, &stuck_id, "retrying").await;
    // The newest event is kept whatever its age: numbering resumes from it after a restart.
    let newest = d.publish("done.last", json!({"n": "last"})).await;
    let newest_id = newest["id"].as_str().unwrap().to_string();
    wait_delivery(&d, &newest_id, "succeeded").await;

    // Within a few sweeps every terminal event is gone, with its deliveries and attempts.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut left = 0;
        for id in &done {
            let (status, _) = d.get(&format!("/v1/events/{id}")).await;
            if status != 404 {
                left += 1;
            }
        }
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} terminal events still there\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = d.get(&format!("/v1/events/{inbound_event}")).await;
    assert_eq!(status, 404, "the inbound event stayed");
    let (status, _) = d.get(&format!("/v1/receipts/{receipt}")).await;
    assert_eq!(status, 404, "the receipt stayed");
    let (status, _) = d.get(&format!("/v1/receipts/{last_receipt}")).await;
    assert_eq!(status, 200, "the newest receipt must stay");
    for dl in &done_deliveries {
        let (status, body) = d.get(&format!("/v1/deliveries/{dl}")).await;
        assert_eq!(status, 404, "delivery {dl}: {body}");
        let (status, _) = d.get(&format!("/v1/deliveries/{dl}/attempts")).await;
        assert_eq!(status, 404, "attempts of {dl}");
    }

    // The event whose delivery is still retrying stays, delivery and attempt history intact.
    let (status, body) = d.get(&format!("/v1/events/{stuck_id}")).await;
    assert_eq!(status, 200, "{body}");
    let (_, ds) = d.get(&format!("/v1/events/{stuck_id}/deliveries")).await;
    assert_eq!(ds["items"][0]["status"], "retrying", "{ds}");
    assert_eq!(ds["items"][0]["id"], stuck_delivery["id"]);
    let stuck_delivery_id = stuck_delivery["id"].as_str().unwrap();
    let (status, attempts) = d
        .get(&format!("/v1/deliveries/{stuck_delivery_id}/attempts"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        attempts["items"].as_array().map(Vec::len),
        Some(1),
        "{attempts}"
    );
    let (status, _) = d.get(&format!("/v1/events/{newest_id}")).await;
    assert_eq!(status, 200, "the newest event must stay");
    if b.is_postgres() {
        // Row counts and file size are the embedded file's; the sweep's own figures are not.
        let m = eventually("the sweep counted", || async {
            let m = d.metrics().await;
            // The five done events and the first inbound one at least (the second inbound
            // event may go too: PostgreSQL keeps the newest receipt without its event).
            (sample(&m, "dispatchd_retention_removed_total{table=\"events\"}") >= Some(6.0))
                .then_some(m)
        })
        .await;
        assert!(
            sample(&m, "dispatchd_retention_last_sweep_timestamp_seconds").unwrap_or(0.0) > 1.7e9
        );
        return;
    }

    // Metrics: what went, what is left, and when the sweep ran.
    let deadline = tokio::time::Instant::now() + WAIT;
    let m = loop {
        let m = d.metrics().await;
        if sample(&m, "dispatchd_table_rows{table=\"events\"}") == Some(3.0)
            && sample(&m, "dispatchd_table_rows{table=\"receipts\"}") == Some(1.0)
        {
            break m;
        }
        assert!(tokio::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        sample(&m, "dispatchd_retention_removed_total{table=\"events\"}"),
        Some(6.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "dispatchd_retention_removed_total{table=\"receipts\"}"),
        Some(1.0)
    );
    // The kept receipt's two index rows (its delivery id and its body's fingerprint): the
    // removed receipt's went with it.
    assert_eq!(
        sample(&m, "dispatchd_table_rows{table=\"receipt_ids\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &m,
            "dispatchd_retention_removed_total{table=\"deliveries\"}"
        ),
        Some(5.0)
    );
    assert!(sample(&m, "dispatchd_retention_removed_total{table=\"attempts\"}") >= Some(5.0));
    assert_eq!(
        sample(&m, "dispatchd_table_rows{table=\"deliveries\"}"),
        Some(2.0)
    );
    assert!(sample(&m, "dispatchd_database_file_bytes").unwrap_or(0.0) > 0.0);
    assert!(sample(&m, "dispatchd_retention_last_sweep_timestamp_seconds").unwrap_or(0.0) > 1.7e9);

    // Nothing dangles: a copy of what is left checks clean, index by index.
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("after-sweep.redb");
    let url = format!("http://{}", d.addr);
    let copy_arg = copy.display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = bin();
        cmd.args(["backup", "--url", &url, "--output", &copy_arg]);
        run(cmd, WAIT)
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copy_arg = copy.display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = bin();
        cmd.args(["verify-db", &copy_arg]);
        run(cmd, WAIT)
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains(", ok"), "{stdout}");
}

crate::both!(terminal_events_expire_and_live_ones_stay,);

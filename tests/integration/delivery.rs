//! The delivery engine end to end: a real receiver on 127.0.0.1.

use crate::support::backend::Backend;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use crate::support::config::{Config, SECRET, Sub};
use crate::support::receiver::{Receiver, Reply};
use crate::support::{Daemon, eventually, verify_signature, wait_delivery};

const SECRET2: &str = "whsec_c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24=";
const WAIT: Duration = Duration::from_secs(30);

/// A subscription with fast retries (5 attempts, 20-100 ms apart) and `extra` settings.
fn sub(id: &str, url: &str, extra: &str) -> String {
    Sub::new(id, url)
        .retry(5, "20ms", "100ms")
        .with_toml(extra)
        .to_toml()
}

/// A daemon config that may deliver to loopback, with these subscriptions.
fn config(subs: &str) -> String {
    format!("{}\n{subs}", Config::new().private_networks().to_toml())
}

/// Waits for the first attempt of the event's delivery and checks the guard refused it
/// before any request left.
async fn assert_refused_without_a_request(d: &Daemon, rx: &Receiver, event_id: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let dl = loop {
        let (_, body) = d.get(&format!("/v1/events/{event_id}/deliveries")).await;
        let first = body["items"][0].clone();
        if first["attempts"].as_u64().unwrap_or(0) >= 1 {
            break first;
        }
        assert!(tokio::time::Instant::now() < deadline, "no attempt: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        dl["last_error"]
            .as_str()
            .unwrap_or("")
            .starts_with("refused_address"),
        "{dl}"
    );
    assert!(rx.received().is_empty());
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap_or_default().to_string()
}

#[allow(clippy::disallowed_methods)] // the test's own clock, outside the daemon
async fn delivers_a_signed_standard_webhook(b: Backend) {
    let rx = Receiver::start().await;
    let d = b.start(&config(&sub(
        "crm",
        &rx.url("/hook"),
        "headers = { \"X-Api-Key\" = \"k-123\" }",
    )));
    let ev = d.publish("order.created", json!({"total": 42})).await;
    assert_eq!(ev["deliveries"], 1);
    let got = rx.wait_for(1, WAIT).await;
    let r = &got[0];
    assert_eq!(r.path, "/hook");
    assert_eq!(r.header("webhook-id"), Some(id_of(&ev).as_str()));
    assert_eq!(r.header("x-api-key"), Some("k-123"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(
        r.header("user-agent")
            .is_some_and(|u| u.starts_with("dispatchd/"))
    );
    let ts = r.header("webhook-timestamp").unwrap_or_default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    assert!(
        (ts.parse::<i64>().unwrap_or(0) - now).abs() < 60,
        "timestamp {ts}"
    );
    let sig = r.header("webhook-signature").unwrap_or_default();
    assert!(
        verify_signature(SECRET, &id_of(&ev), ts, &r.body, sig),
        "bad signature {sig}"
    );
    let body = r.json();
    assert_eq!(body["id"], ev["id"]);
    assert_eq!(body["type"], "order.created");
    assert_eq!(body["data"], json!({"total": 42}));
    assert!(body["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    let dl = wait_delivery(&d, &id_of(&ev), "succeeded").await;
    assert_eq!(dl["attempts"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_sends_one_signature_per_secret() {
    let rx = Receiver::start().await;
    let cfg = config(
        &Sub::new("r", &rx.url("/"))
            .set("secrets", vec![SECRET, SECRET2])
            .to_toml(),
    );
    let d = Daemon::start(&cfg);
    let ev = d.publish("a", json!(1)).await;
    let got = rx.wait_for(1, WAIT).await;
    let sig = got[0].header("webhook-signature").unwrap_or_default();
    let ts = got[0].header("webhook-timestamp").unwrap_or_default();
    assert_eq!(sig.split(' ').count(), 2, "{sig}");
    assert!(verify_signature(SECRET, &id_of(&ev), ts, &got[0].body, sig));
    assert!(verify_signature(
        SECRET2,
        &id_of(&ev),
        ts,
        &got[0].body,
        sig
    ));
}

async fn retries_until_the_receiver_recovers(b: Backend) {
    let rx = Receiver::start().await;
    rx.script([Reply::Status(500), Reply::Status(503)]);
    let d = b.start(&config(&sub("s", &rx.url("/"), "")));
    let ev = d.publish("a.b", json!({})).await;
    let got = rx.wait_for(3, WAIT).await;
    let ids: Vec<_> = got.iter().map(|r| r.header("webhook-id")).collect();
    assert!(
        ids.iter().all(|i| *i == Some(id_of(&ev).as_str())),
        "{ids:?}"
    );
    let dl = wait_delivery(&d, &id_of(&ev), "succeeded").await;
    assert_eq!(dl["attempts"], 3);
    let (_, attempts) = d
        .get(&format!(
            "/v1/deliveries/{}/attempts",
            dl["id"].as_str().unwrap_or("")
        ))
        .await;
    let codes: Vec<_> = attempts["items"]
        .as_array()
        .map(|a| a.iter().map(|x| x["status_code"].clone()).collect())
        .unwrap_or_default();
    assert_eq!(codes, vec![json!(500), json!(503), json!(200)]);
}

async fn dead_letters_after_max_attempts(b: Backend) {
    let rx = Receiver::start().await;
    rx.set_default(Reply::Status(500));
    let d = b.start(&config(&sub(
        "s",
        &rx.url("/"),
        "breaker = { failure_threshold = 100 }",
    )));
    let ev = d.publish("a", json!({})).await;
    let dl = wait_delivery(&d, &id_of(&ev), "dead").await;
    assert_eq!(dl["attempts"], 5);
    assert_eq!(dl["last_error"], "HTTP 500");
    assert_eq!(rx.received().len(), 5);
}

async fn wildcards_fan_out_to_matching_subscriptions_only(b: Backend) {
    let rx = Receiver::start().await;
    let subs = [
        sub("orders", &rx.url("/orders"), "event_types = [\"order.*\"]"),
        sub("paid", &rx.url("/paid"), "event_types = [\"invoice.paid\"]"),
        sub("all", &rx.url("/all"), "event_types = [\"*\"]"),
    ]
    .join("\n");
    let d = b.start(&config(&subs));
    let a = d.publish("order.created", json!({})).await;
    assert_eq!(a["deliveries"], 2);
    let b = d.publish("invoice.paid", json!({})).await;
    assert_eq!(b["deliveries"], 2);
    let c = d.publish("invoice.created", json!({})).await;
    assert_eq!(c["deliveries"], 1);
    let got = rx.wait_for(5, WAIT).await;
    let mut pairs: Vec<(String, String)> = got
        .iter()
        .map(|r| {
            (
                r.path.clone(),
                r.header("webhook-id").unwrap_or("").to_string(),
            )
        })
        .collect();
    pairs.sort();
    let mut want = vec![
        ("/orders".to_string(), id_of(&a)),
        ("/all".to_string(), id_of(&a)),
        ("/paid".to_string(), id_of(&b)),
        ("/all".to_string(), id_of(&b)),
        ("/all".to_string(), id_of(&c)),
    ];
    want.sort();
    assert_eq!(pairs, want);
}

async fn honours_retry_after_on_429(b: Backend) {
    let rx = Receiver::start().await;
    rx.script([Reply::WithHeaders(429, vec![("retry-after", "1".into())])]);
    let d = b.start(&config(&sub("s", &rx.url("/"), "")));
    let ev = d.publish("a", json!({})).await;
    let got = rx.wait_for(2, WAIT).await;
    let gap = got[1].at.duration_since(got[0].at);
    assert!(gap >= Duration::from_millis(900), "retried after {gap:?}");
    wait_delivery(&d, &id_of(&ev), "succeeded").await;
}

async fn gone_disables_the_subscription(b: Backend) {
    let rx = Receiver::start().await;
    rx.script([Reply::Status(410)]);
    let d = b.start(&config(&sub("s", &rx.url("/"), "")));
    let ev = d.publish("a", json!({})).await;
    let dl = wait_delivery(&d, &id_of(&ev), "dead").await;
    assert_eq!(dl["attempts"], 1);
    // The subscription is off: new events no longer fan out to it.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let next = d.publish("a", json!({})).await;
        if next["deliveries"] == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscription still enabled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Counted once the change is in force: whoever sees the count sees the change, not the
    // other way round (in cluster mode the change's notification may apply it on this node
    // before the destination task that asked for it hears back).
    eventually("the gone disable to be counted", || async {
        let body = d.metrics().await;
        body.contains("dispatchd_subscriptions_disabled_total{reason=\"gone\"} 1")
            .then_some(())
    })
    .await;
}

async fn a_timeout_is_retried(b: Backend) {
    let rx = Receiver::start().await;
    rx.script([Reply::Hang]);
    let d = b.start(&config(&sub("s", &rx.url("/"), "timeout = \"300ms\"")));
    let ev = d.publish("a", json!({})).await;
    let dl = wait_delivery(&d, &id_of(&ev), "succeeded").await;
    assert_eq!(dl["attempts"], 2);
    let (_, attempts) = d
        .get(&format!(
            "/v1/deliveries/{}/attempts",
            dl["id"].as_str().unwrap_or("")
        ))
        .await;
    assert_eq!(attempts["items"][0]["error"], "timeout");
    assert_eq!(attempts["items"][1]["status_code"], 200);
}

async fn fifo_keeps_event_order_under_retries(b: Backend) {
    let rx = Receiver::start().await;
    rx.script([Reply::Status(500), Reply::Status(500)]);
    let d = b.start(&config(&sub("f", &rx.url("/"), "ordering = \"fifo\"")));
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(id_of(&d.publish("a", json!({"i": i})).await));
    }
    let order = rx.wait_for_successes(5, WAIT).await;
    let got = rx.received();
    assert_eq!(order, ids);
    // Nothing behind the head was sent while it was failing.
    assert_eq!(got[0].header("webhook-id"), Some(ids[0].as_str()));
    assert_eq!(got[1].header("webhook-id"), Some(ids[0].as_str()));
    assert_eq!(got[2].header("webhook-id"), Some(ids[0].as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_address_literals_are_refused_at_creation_unless_allowed() {
    let rx = Receiver::start().await;
    // In the file: the daemon does not start, and says where.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("dispatchd.toml");
    let text = sub("s", &rx.url("/"), "");
    std::fs::write(&file, &text).unwrap();
    let url_line = text
        .lines()
        .position(|l| l.starts_with("url ="))
        .map_or(0, |i| i + 1);
    let mut cmd = crate::support::bin();
    cmd.arg("check-config").arg(&file);
    let out = crate::support::run_bounded(cmd, WAIT);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("dispatchd.toml:{url_line}: subscriptions[0].url")),
        "{err}"
    );
    assert!(err.contains("allow_private_networks"), "{err}");
    // Over the API: a 400, nothing stored.
    let d = Daemon::start("");
    let (status, body) = d
        .post(
            "/v1/subscriptions",
            &json!({"id": "s", "url": rx.url("/"), "secrets": [SECRET]}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("url"),
        "{body}"
    );
    let (_, list) = d.get("/v1/subscriptions").await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "{list}");
}

async fn breaker_opens_defers_probes_and_closes(b: Backend) {
    let rx = Receiver::start().await;
    rx.set_default(Reply::Status(503));
    let cfg = config(
        &Sub::new("b", &rx.url("/"))
            .set("max_in_flight", 1)
            .retry(50, "10ms", "20ms")
            .set("breaker.failure_threshold", 3)
            .set("breaker.cooldown", "700ms")
            .to_toml(),
    );
    let d = b.start(&cfg);
    let ev = d.publish("a", json!({})).await;
    // Three failures trip the breaker; the fourth request is the half-open probe.
    let got = rx.wait_for(4, WAIT).await;
    let gap = got[3].at.duration_since(got[2].at);
    assert!(
        gap >= Duration::from_millis(600),
        "probe came after {gap:?}"
    );
    rx.set_default(Reply::Status(200));
    wait_delivery(&d, &id_of(&ev), "succeeded").await;
    // Closed again: the next event goes straight through.
    let n = rx.received().len();
    let ev2 = d.publish("a", json!({})).await;
    wait_delivery(&d, &id_of(&ev2), "succeeded").await;
    assert_eq!(rx.received().len(), n + 1);
    let text = d.metrics().await;
    assert!(
        text.contains("dispatchd_breaker_trips_total{subscription=\"b\"}"),
        "{text}"
    );
}

async fn max_in_flight_bounds_the_requests_an_endpoint_sees_at_once(b: Backend) {
    let rx = Receiver::start().await;
    rx.set_default(Reply::Delay(Duration::from_millis(150), 200));
    let d = b.start(&config(&sub("s", &rx.url("/"), "max_in_flight = 3")));
    // Twelve deliveries due at once, from one batch.
    let events: Vec<Value> = (0..12)
        .map(|i| json!({"type": "t", "data": {"i": i}}))
        .collect();
    let (status, _) = d
        .post("/v1/events/batch", &json!({ "events": events }))
        .await;
    assert_eq!(status, 202);
    let got = rx.wait_for(12, WAIT).await;
    let ids: std::collections::HashSet<&str> =
        got.iter().filter_map(|r| r.header("webhook-id")).collect();
    assert_eq!(ids.len(), 12, "one request per delivery");
    // Never more than three at once, and three whenever twelve were waiting.
    assert_eq!(rx.most_concurrent(), 3);
}

async fn crash_mid_delivery_loses_nothing(b: Backend) {
    let rx = Receiver::start().await;
    // Slow enough that the backlog outlives the crash: 4 in flight, 100 ms each.
    rx.set_default(Reply::Delay(Duration::from_millis(100), 200));
    let cfg = config(&sub("s", &rx.url("/"), "max_in_flight = 4"));
    let mut d = b.start(&cfg);
    let tmp = d.keep_dir();
    let dir = d.dir.clone();
    // Publishers keep going while the daemon is killed; only acknowledged ids count.
    let url = d.url("/v1/events");
    let http = d.http.clone();
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut publishers = Vec::new();
    for p in 0..4 {
        let (url, http, acked) = (url.clone(), http.clone(), acked.clone());
        publishers.push(tokio::spawn(async move {
            for i in 0..100 {
                let body = json!({"type": "burst", "data": {"p": p, "i": i}}).to_string();
                let resp = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                let Ok(resp) = resp else { break };
                if resp.status().as_u16() != 202 {
                    break;
                }
                let bytes = resp.bytes().await.unwrap_or_default();
                let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                if let Ok(mut a) = acked.lock() {
                    a.push(id_of(&v));
                }
            }
        }));
    }
    rx.wait_for(20, WAIT).await;
    d.kill();
    for p in publishers {
        let _ = p.await;
    }
    let ids = acked.lock().map(|a| a.clone()).unwrap_or_default();
    let before: std::collections::HashSet<String> = rx
        .received()
        .iter()
        .filter_map(|x| x.header("webhook-id").map(str::to_owned))
        .collect();
    assert!(ids.len() >= 20, "only {} acknowledged", ids.len());
    assert!(
        ids.iter().any(|i| !before.contains(i)),
        "everything was delivered before the crash; the test proves nothing"
    );
    let d2 = b.start_in(&dir, &cfg);
    rx.wait_until(
        Duration::from_secs(60),
        "every acknowledged event id",
        |r| {
            let seen: std::collections::HashSet<_> =
                r.iter().filter_map(|x| x.header("webhook-id")).collect();
            ids.iter().all(|i| seen.contains(i.as_str()))
        },
    )
    .await;
    drop(d2);
    drop(tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolving_to_private_addresses_are_refused() {
    let rx = Receiver::start().await;
    let url = format!("http://localhost:{}/", rx.addr.port());
    let d = Daemon::start(&sub("s", &url, ""));
    let ev = d.publish("a", json!({})).await;
    assert_refused_without_a_request(&d, &rx, &id_of(&ev)).await;
}

async fn sigterm_lets_the_attempt_in_flight_finish_and_records_it(b: Backend) {
    let rx = Receiver::start().await;
    rx.set_default(Reply::Delay(Duration::from_millis(700), 200));
    let cfg = config(&sub("s", &rx.url("/"), ""));
    let mut d = b.start(&cfg);
    let tmp = d.keep_dir();
    let dir = d.dir.clone();
    let ev = d.publish("a", json!({})).await;
    rx.wait_for(1, WAIT).await;
    // The receiver is still holding the request when the daemon is asked to stop.
    let status = d.terminate();
    assert!(status.success(), "exit: {status:?}\n{}", d.logs());
    let d2 = b.start_in(&dir, &cfg);
    let dl = wait_delivery(&d2, &id_of(&ev), "succeeded").await;
    assert_eq!(
        dl["attempts"], 1,
        "the attempt was not recorded before exit: {dl}"
    );
    assert_eq!(rx.received().len(), 1, "the drained attempt was repeated");
    drop(d2);
    drop(tmp);
}

/// A config subscription that always fails, for the auto-disable tests: `auto_disable_after`
/// is 2s, retries come every 20-40 ms and the breaker never opens. `rev` goes into a header,
/// so a reload with another `rev` changes the subscription (and restarts its task).
fn failing_config(url: &str, rev: u32) -> String {
    Config::new()
        .private_networks()
        .set("delivery.auto_disable_after", "2s")
        .subscription(
            Sub::new("flaky", url)
                .set("headers.X-Rev", rev.to_string())
                .retry(100_000, "20ms", "40ms")
                .set("breaker.failure_threshold", 100_000)
                .set("breaker.min_requests", 100_000),
        )
        .to_toml()
}

fn auto_disabled(v: &Value) -> bool {
    v["enabled"] == false && v["state_reason"] == "auto_disabled"
}

/// The failing clock is stored with the attempts: a daemon restarted, and a subscription
/// changed by reload (which gives it a new destination task), after every attempt or two
/// still disables a subscription whose every attempt fails, `auto_disable_after` after its
/// first failure (give or take a restart).
async fn auto_disable_counts_across_restarts_and_subscription_changes(b: Backend) {
    const PERIOD: Duration = Duration::from_secs(2);
    let rx = Receiver::start().await;
    rx.set_default(Reply::Status(500));
    let mut rev = 0;
    let mut d = b.start(&failing_config(&rx.url("/"), rev));
    let tmp = d.keep_dir();
    d.publish("a", json!({})).await;
    let first = rx.wait_for(1, WAIT).await[0].at;
    let started = tokio::time::Instant::now();
    let (mut restarts, mut reloads) = (0, 0);
    loop {
        let seen = rx.received().len();
        let sub = eventually("another attempt or the disable", || async {
            let (_, sub) = d.get("/v1/subscriptions/flaky").await;
            (auto_disabled(&sub) || rx.received().len() > seen).then_some(sub)
        })
        .await;
        if auto_disabled(&sub) {
            break;
        }
        assert!(
            started.elapsed() < PERIOD * 5,
            "not disabled {:?} after the first failure ({restarts} restarts, {reloads} reloads): {sub}",
            started.elapsed()
        );
        rev += 1;
        let cfg = failing_config(&rx.url("/"), rev);
        if rev % 2 == 0 {
            d.terminate();
            d = b.start_in(&d.dir.clone(), &cfg);
            restarts += 1;
        } else {
            std::fs::write(d.dir.join("dispatchd.toml"), cfg).unwrap();
            let (status, r) = d.send(d.http.post(d.url("/v1/admin/reload"))).await;
            assert_eq!((status, &r["changed"]), (200, &json!(["flaky"])), "{r}");
            reloads += 1;
        }
    }
    assert!(
        restarts >= 2 && reloads >= 2,
        "disabled before restarts and reloads could matter ({restarts}, {reloads})"
    );
    let attempts = rx.received();
    let last = attempts.last().map_or(first, |r| r.at);
    assert!(
        last.duration_since(first) < PERIOD * 3,
        "attempts went on for {:?} ({} of them)",
        last.duration_since(first),
        attempts.len()
    );
    // Disabled for good: a restart keeps it so, and new events no longer fan out to it.
    d.terminate();
    let d = b.start_in(&d.dir.clone(), &failing_config(&rx.url("/"), rev));
    let (_, sub) = d.get("/v1/subscriptions/flaky").await;
    assert!(auto_disabled(&sub), "{sub}");
    let next = d.publish("a", json!({})).await;
    assert_eq!(next["deliveries"], 0, "{next}");
    drop(d);
    drop(tmp);
}

/// A subscription deleted while failing leaves no clock behind: created again under the
/// same id after the auto-disable period, it is not disabled by its first failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_created_again_starts_a_new_failing_clock() {
    const PERIOD: Duration = Duration::from_secs(2);
    let rx = Receiver::start().await;
    rx.set_default(Reply::Status(500));
    let d =
        Daemon::start("[delivery]\nallow_private_networks = true\nauto_disable_after = \"2s\"\n");
    let spec = json!({
        "id": "api",
        "url": rx.url("/"),
        "secrets": [SECRET],
        "retry": {"max_attempts": 100000, "initial": "20ms", "max": "40ms"},
        "breaker": {"failure_threshold": 100000, "min_requests": 100000},
    });
    let (status, body) = d.post("/v1/subscriptions", &spec).await;
    assert_eq!(status, 201, "{body}");
    d.publish("a", json!({})).await;
    // Failing for a while (so a clock is kept whichever way it is kept), then deleted.
    let got = rx
        .wait_until(WAIT, "attempts over 700 ms", |r| {
            r.len() >= 2 && r[r.len() - 1].at.duration_since(r[0].at) >= Duration::from_millis(700)
        })
        .await;
    let first = tokio::time::Instant::from_std(got[0].at);
    let (status, body) = d.send(d.http.delete(d.url("/v1/subscriptions/api"))).await;
    assert_eq!(status, 200, "{body}");
    // Past the period counted from the first subscription's first failure.
    tokio::time::sleep_until(first + PERIOD + Duration::from_millis(300)).await;
    let (status, body) = d.post("/v1/subscriptions", &spec).await;
    assert_eq!(status, 201, "{body}");
    let seen = rx.received().len();
    d.publish("a", json!({})).await;
    let sub = eventually("three attempts of the new subscription", || async {
        let (_, sub) = d.get("/v1/subscriptions/api").await;
        (auto_disabled(&sub) || rx.received().len() >= seen + 3).then_some(sub)
    })
    .await;
    assert!(
        !auto_disabled(&sub),
        "disabled by the deleted subscription's clock: {sub}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_failing_for_the_auto_disable_period_is_disabled() {
    let rx = Receiver::start().await;
    rx.set_default(Reply::Status(500));
    let cfg = Config::new()
        .private_networks()
        .set("delivery.auto_disable_after", "300ms")
        .subscription(
            Sub::new("flaky", &rx.url("/"))
                .retry(1000, "20ms", "50ms")
                .set("breaker.failure_threshold", 1000),
        )
        .to_toml();
    let d = Daemon::start(&cfg);
    d.publish("a", json!({})).await;
    eventually("the subscription to be auto-disabled", || async {
        let text = d.metrics().await;
        text.contains("dispatchd_subscriptions_disabled_total{reason=\"auto_disabled\"} 1")
            .then_some(())
    })
    .await;
    // Disabled: new events no longer fan out to it.
    let next = d.publish("a", json!({})).await;
    assert_eq!(next["deliveries"], 0, "{next}");
    // The failures span at least the auto-disable period.
    let got = rx.received();
    let span = got[got.len() - 1].at.duration_since(got[0].at);
    assert!(
        span >= Duration::from_millis(250),
        "disabled after {span:?}"
    );
}

/// A `whsk_` key signs `v1a,` with Ed25519: the subscriptions API shows its public key, and
/// the signature verifies with that key in an independent Ed25519 implementation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ed25519_signatures_verify_with_the_public_key_the_api_shows() {
    use base64::engine::general_purpose::STANDARD;
    let rx = Receiver::start().await;
    let seed = [7u8; 32];
    let secret = format!("whsk_{}", STANDARD.encode(seed));
    let cfg = config(
        &Sub::new("ed", &rx.url("/"))
            .set("secrets", vec![secret.as_str()])
            .to_toml(),
    );
    let d = Daemon::start(&cfg);
    let (status, subs) = d.get("/v1/subscriptions").await;
    assert_eq!(status, 200, "{subs}");
    assert!(!subs.to_string().contains(&secret), "the secret was listed");
    let Some(pk) = subs["items"][0]["secrets"][0]["public_key"].as_str() else {
        panic!("no public key shown: {subs}");
    };
    let Some(b64) = pk.strip_prefix("whpk_") else {
        panic!("public key without whpk_: {pk}");
    };
    let bytes: [u8; 32] = match STANDARD.decode(b64).map(<[u8; 32]>::try_from) {
        Ok(Ok(b)) => b,
        other => panic!("public key is not 32 base64 bytes: {other:?}"),
    };
    let vk = match ed25519_dalek::VerifyingKey::from_bytes(&bytes) {
        Ok(k) => k,
        Err(e) => panic!("not an Ed25519 public key: {e}"),
    };
    assert_eq!(
        vk,
        ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key(),
        "the public key shown is not the one of the secret"
    );

    let ev = d.publish("a", json!({"n": 1})).await;
    let got = rx.wait_for(1, WAIT).await;
    let sig = got[0].header("webhook-signature").unwrap_or_default();
    let ts = got[0].header("webhook-timestamp").unwrap_or_default();
    let Some(sig_b64) = sig.strip_prefix("v1a,") else {
        panic!("not a v1a signature: {sig}");
    };
    let sig_bytes: [u8; 64] = match STANDARD.decode(sig_b64).map(<[u8; 64]>::try_from) {
        Ok(Ok(b)) => b,
        other => panic!("signature is not 64 base64 bytes: {other:?}"),
    };
    let signature = ed25519_dalek::Signature::from_bytes(&sig_bytes);
    let mut content = format!("{}.{ts}.", id_of(&ev)).into_bytes();
    content.extend_from_slice(&got[0].body);
    assert!(
        vk.verify_strict(&content, &signature).is_ok(),
        "the v1a signature does not verify"
    );
    content.push(b' ');
    assert!(
        vk.verify_strict(&content, &signature).is_err(),
        "a changed body still verifies"
    );
}

/// While its attempt is under way a delivery shows as `in_flight`, and `status=in_flight`
/// lists it; once the outcome is recorded it is neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_under_way_shows_as_in_flight() {
    let rx = Receiver::start().await;
    rx.script([Reply::Hang]);
    let d = Daemon::start(&config(&sub("s", &rx.url("/"), "timeout = \"2s\"")));
    let ev = d.publish("a", json!({})).await;
    rx.wait_for(1, WAIT).await;
    let (_, list) = d
        .get(&format!("/v1/events/{}/deliveries", id_of(&ev)))
        .await;
    let id = list["items"][0]["id"].as_str().unwrap_or("").to_string();
    assert_eq!(list["items"][0]["status"], "in_flight", "{list}");
    let (_, one) = d.get(&format!("/v1/deliveries/{id}")).await;
    assert_eq!(one["status"], "in_flight", "{one}");
    let (status, live) = d.get("/v1/deliveries?status=in_flight").await;
    assert_eq!(status, 200, "{live}");
    assert_eq!(live["items"].as_array().map(Vec::len), Some(1), "{live}");
    assert_eq!(live["items"][0]["id"], id.as_str());
    let (_, other) = d
        .get("/v1/deliveries?status=in_flight&subscription=nope")
        .await;
    assert_eq!(other["items"], json!([]), "{other}");

    wait_delivery(&d, &id_of(&ev), "succeeded").await;
    let (_, live) = d.get("/v1/deliveries?status=in_flight").await;
    assert_eq!(live["items"], json!([]), "{live}");
}

/// FIFO order holds across a restart: a newer delivery that is due does not overtake an
/// older one waiting for its retry, though it reaches the destination task first.
async fn fifo_order_holds_across_a_restart(b: Backend) {
    let rx = Receiver::start().await;
    rx.script([Reply::Status(500)]);
    let cfg = config(
        &Sub::new("f", &rx.url("/"))
            .set("ordering", "fifo")
            .retry(5, "10s", "10s")
            .to_toml(),
    );
    let mut d = b.start(&cfg);
    let tmp = d.keep_dir();
    let dir = d.dir.clone();
    let first = id_of(&d.publish("a", json!({"n": 1})).await);
    rx.wait_for(1, WAIT).await;
    wait_delivery(&d, &first, "retrying").await;
    let second = id_of(&d.publish("a", json!({"n": 2})).await);
    let status = d.terminate();
    assert!(status.success(), "{status:?}\n{}", d.logs());
    let old = d.logs();
    drop(d);

    let d = b.start_in(&dir, &cfg);
    let order = rx.wait_for_successes(2, WAIT).await;
    assert_eq!(
        order,
        vec![first.clone(), second.clone()],
        "first {first}, second {second}\nbefore the restart:\n{old}\nafter:\n{}",
        d.logs()
    );
    drop(tmp);
}

/// `dispatchd_scheduled_deliveries` counts the deliveries waiting in the durable schedule
/// (counted off the scheduler's own task, every 5 s).
async fn the_schedule_gauge_counts_deliveries_waiting_to_retry(b: Backend) {
    let rx = Receiver::start().await;
    rx.script([Reply::Status(500), Reply::Status(500), Reply::Status(500)]);
    let s = Sub::new("s", &rx.url("/")).retry(5, "1h", "2h").to_toml();
    let d = b.start(&config(&s));
    for _ in 0..3 {
        d.publish("a.b", json!({})).await;
    }
    rx.wait_for(3, WAIT).await;
    eventually("three deliveries in the schedule gauge", || async {
        let text = d.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix("dispatchd_scheduled_deliveries "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|n| *n == 3.0)
    })
    .await;
}

crate::both!(
    the_schedule_gauge_counts_deliveries_waiting_to_retry,
    delivers_a_signed_standard_webhook,
    retries_until_the_receiver_recovers,
    dead_letters_after_max_attempts,
    wildcards_fan_out_to_matching_subscriptions_only,
    honours_retry_after_on_429,
    gone_disables_the_subscription,
    a_timeout_is_retried,
    fifo_keeps_event_order_under_retries,
    breaker_opens_defers_probes_and_closes,
    max_in_flight_bounds_the_requests_an_endpoint_sees_at_once,
    crash_mid_delivery_loses_nothing,
    sigterm_lets_the_attempt_in_flight_finish_and_records_it,
    auto_disable_counts_across_restarts_and_subscription_changes,
    fifo_order_holds_across_a_restart,
);

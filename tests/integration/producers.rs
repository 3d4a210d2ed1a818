//! What producers rely on: the single `secret` shorthand, the rate limiter's burst and its
//! counter, the breaker's half-open probes.

use crate::support::backend::Backend;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::config::Sub;
use crate::support::receiver::{Receiver, Reply};
use crate::support::{Daemon, eventually, verify_signature};

const WAIT: Duration = Duration::from_secs(30);
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A daemon that may deliver to loopback, with `extra` appended to its config.
fn daemon(extra: &str) -> Daemon {
    daemon_on(&Backend::Redb, extra)
}

/// `daemon` on backend `b`.
fn daemon_on(b: &Backend, extra: &str) -> Daemon {
    b.start(&format!(
        "[delivery]\nallow_private_networks = true\n\n{extra}"
    ))
}

/// The value of a counter with this label set in the Prometheus text, 0 when absent.
fn counter(metrics: &str, name: &str, labels: &str) -> u64 {
    let prefix = format!("{name}{{{labels}}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `POST /v1/subscriptions` takes `"secret"` as shorthand for `"secrets": [..]`: deliveries
/// are signed with it. Both at once is a 400, and nothing is created.
#[tokio::test]
async fn a_single_secret_is_shorthand_for_a_list_of_one() {
    let rx = Receiver::start().await;
    let d = daemon("");
    let (s, body) = d
        .post(
            "/v1/subscriptions",
            &json!({"id": "one", "url": rx.url("/hook"), "secret": SECRET}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    assert!(body.get("secret").is_none_or(Value::is_null), "{body}");
    let (s, body) = d
        .post(
            "/v1/subscriptions",
            &json!({"id": "two", "url": rx.url("/hook"), "secret": SECRET, "secrets": [SECRET]}),
        )
        .await;
    assert_eq!(s, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not both")),
        "{body}"
    );
    let (s, _) = d.get("/v1/subscriptions/two").await;
    assert_eq!(s, 404, "nothing created");

    d.publish("a.b", json!({"n": 1})).await;
    let got = rx.wait_for(1, WAIT).await;
    let r = &got[0];
    let (id, ts, sig) = (
        r.header("webhook-id").unwrap_or_default(),
        r.header("webhook-timestamp").unwrap_or_default(),
        r.header("webhook-signature").unwrap_or_default(),
    );
    assert!(verify_signature(SECRET, id, ts, &r.body, sig), "{sig}");
}

/// A rate limit with a burst lets that many through at once; the rest wait for tokens at
/// the rate, and each delivery that waited is counted once in
/// `dispatchd_rate_limited_total`.
#[tokio::test]
async fn the_rate_limiter_lets_its_burst_through_and_counts_who_waits() {
    let rx = Receiver::start().await;
    let d = daemon(
        &Sub::new("paced", &rx.url("/hook"))
            .set("rate_limit", "4/s")
            .set("rate_limit_burst", 3)
            .to_toml(),
    );
    let items: Vec<Value> = (0..7)
        .map(|n| json!({"type": "t", "data": {"n": n}}))
        .collect();
    let (s, body) = d.post("/v1/events/batch", &json!({"events": items})).await;
    assert_eq!(s, 202, "{body}");
    let got = rx.wait_for(7, WAIT).await;
    let first = got[0].at;
    let spread: Vec<Duration> = got.iter().map(|r| r.at - first).collect();
    // Three at once; the four others one token (250 ms) apart: the last at least ~1 s later.
    assert!(spread[2] < Duration::from_millis(200), "{spread:?}");
    assert!(spread[6] >= Duration::from_millis(900), "{spread:?}");
    let m = d.metrics().await;
    assert_eq!(
        counter(&m, "dispatchd_rate_limited_total", "subscription=\"paced\""),
        4,
        "{m}"
    );
}

/// The burst and the half-open probes are checked like every other setting: a burst needs a
/// rate, probes are 1..=1024.
#[tokio::test]
async fn burst_and_probes_are_validated() {
    let d = daemon("");
    for (spec, field) in [
        (json!({"rate_limit_burst": 5}), "rate_limit_burst"),
        (
            json!({"rate_limit": "1/s", "rate_limit_burst": 0}),
            "rate_limit_burst",
        ),
        (
            json!({"breaker": {"half_open_probes": 0}}),
            "breaker.half_open_probes",
        ),
    ] {
        let mut body = json!({"id": "v", "url": "http://127.0.0.1:9/h"});
        if let (Some(b), Some(extra)) = (body.as_object_mut(), spec.as_object()) {
            b.extend(extra.clone());
        }
        let (s, answer) = d.post("/v1/subscriptions", &body).await;
        assert_eq!(s, 400, "{spec}: {answer}");
        assert!(answer.to_string().contains(field), "{spec}: {answer}");
    }
    let ok = json!({"id": "v", "url": "http://127.0.0.1:9/h", "rate_limit": "1/s",
        "rate_limit_burst": 10, "breaker": {"half_open_probes": 3}});
    let (s, answer) = d.post("/v1/subscriptions", &ok).await;
    assert_eq!(s, 201, "{answer}");
    let (_, shown) = d.get("/v1/subscriptions/v").await;
    assert_eq!(shown["rate_limit_burst"], 10, "{shown}");
    assert_eq!(shown["breaker"]["half_open_probes"], 3, "{shown}");
}

/// A subscription to `url` with fast retries: `attempts` in all, 10-20 ms apart.
fn sub(id: &str, url: &str, attempts: u32, extra: &str) -> String {
    Sub::new(id, url)
        .retry(i64::from(attempts), "10ms", "20ms")
        .with_toml(extra)
        .to_toml()
}

/// The value of a gauge or counter with this label set, 0 when absent.
async fn metric(d: &Daemon, name: &str, labels: &str) -> u64 {
    counter(&d.metrics().await, name, labels)
}

/// With one attempt at a time, a high-priority event published behind 500 low ones waiting
/// for the same destination goes next: only the attempt already under way is ahead of it.
async fn a_high_priority_event_overtakes_a_backlog_of_low_ones(b: Backend) {
    let rx = Receiver::start().await;
    let (open, gate) = tokio::sync::watch::channel(false);
    rx.script([Reply::Gate(gate, 200)]);
    let d = daemon_on(&b, &sub("p", &rx.url("/h"), 3, "max_in_flight = 1"));
    let (s, body) = d
        .post(
            "/v1/events",
            &json!({"type": "t", "data": {"n": "first"}, "priority": "low"}),
        )
        .await;
    assert_eq!(s, 202, "{body}");
    rx.wait_for(1, WAIT).await;
    for b in 0..5 {
        let items: Vec<Value> = (0..100)
            .map(|i| json!({"type": "t", "data": {"n": b * 100 + i}, "priority": "low"}))
            .collect();
        let (s, body) = d.post("/v1/events/batch", &json!({"events": items})).await;
        assert_eq!(s, 202, "{body}");
    }
    let depth = "subscription=\"p\"";
    eventually("500 low deliveries queued", || async {
        (metric(&d, "dispatchd_destination_queue_depth", depth).await >= 500).then_some(())
    })
    .await;
    let (s, body) = d
        .post(
            "/v1/events",
            &json!({"type": "t", "data": {"n": "urgent"}, "priority": "high"}),
        )
        .await;
    assert_eq!(s, 202, "{body}");
    eventually("the high one queued", || async {
        (metric(&d, "dispatchd_destination_queue_depth", depth).await >= 501).then_some(())
    })
    .await;
    let _ = open.send(true);
    let got = rx.wait_for(3, WAIT).await;
    assert_eq!(got[0].json()["data"]["n"], "first");
    assert_eq!(got[1].json()["data"]["n"], "urgent", "{:?}", got[1].json());
    let all = rx.wait_for(502, WAIT).await;
    assert_eq!(all.len(), 502);
    let m = d.metrics().await;
    assert_eq!(
        counter(
            &m,
            "dispatchd_attempts_by_priority_total",
            "priority=\"high\""
        ),
        1
    );
    assert_eq!(
        counter(
            &m,
            "dispatchd_attempts_by_priority_total",
            "priority=\"low\""
        ),
        501
    );
    // Lists filter by priority.
    let (_, high) = d.get("/v1/events?priority=high").await;
    assert_eq!(high["items"].as_array().map(Vec::len), Some(1), "{high}");
    assert_eq!(high["items"][0]["priority"], "high");
    let (_, dl) = d.get("/v1/deliveries?priority=high").await;
    assert_eq!(dl["items"].as_array().map(Vec::len), Some(1), "{dl}");
    let (s, bad) = d.get("/v1/events?priority=urgent").await;
    assert_eq!(s, 400, "{bad}");
}

/// A batch answers its id; its status counts its events' deliveries as they move from
/// pending to succeeded and dead, says when all are terminal, and reads the same after a
/// restart.
async fn batch_status_follows_its_deliveries_across_a_restart(b: Backend) {
    let good = Receiver::start().await;
    let bad = Receiver::start().await;
    bad.set_default(Reply::Status(500));
    let (open, gate) = tokio::sync::watch::channel(false);
    good.set_default(Reply::Gate(gate, 200));
    let cfg = daemon_config(
        &[
            sub("ok", &good.url("/"), 3, ""),
            sub("ko", &bad.url("/"), 1, ""),
        ]
        .concat(),
    );
    let mut d = b.start(&cfg);
    let tmp = d.keep_dir();
    let items: Vec<Value> = (0..3)
        .map(|n| json!({"type": "t", "data": {"n": n}}))
        .collect();
    let (s, body) = d.post("/v1/events/batch", &json!({"events": items})).await;
    assert_eq!(s, 202, "{body}");
    let id = body["batch_id"].as_str().unwrap_or_default().to_string();
    assert!(id.starts_with("bat_"), "{body}");
    let path = format!("/v1/batches/{id}");
    let (s, early) = d.get(&path).await;
    assert_eq!(s, 200, "{early}");
    assert_eq!(early["events"], 3);
    assert_eq!(early["total_deliveries"], 6);
    assert_eq!(early["done"], false, "{early}");
    // The dead ones end while the good receiver holds its answers.
    let dead = eventually("the failing deliveries dead", || async {
        let (_, b) = d.get(&path).await;
        (b["deliveries"]["dead"] == 3).then_some(b)
    })
    .await;
    assert_eq!(dead["done"], false, "{dead}");
    assert_eq!(dead["deliveries"]["succeeded"], 0, "{dead}");
    let _ = open.send(true);
    let done = eventually("every delivery terminal", || async {
        let (_, b) = d.get(&path).await;
        (b["done"] == true).then_some(b)
    })
    .await;
    assert_eq!(done["deliveries"]["succeeded"], 3, "{done}");
    assert_eq!(done["deliveries"]["dead"], 3, "{done}");
    // Each event says so too, and names its batch.
    let first = body["items"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (_, ev) = d.get(&format!("/v1/events/{first}")).await;
    assert_eq!(ev["batch_id"], id.as_str(), "{ev}");
    assert_eq!(ev["deliveries"]["succeeded"], 1, "{ev}");
    assert_eq!(ev["deliveries"]["dead"], 1, "{ev}");
    let status = d.terminate();
    assert_eq!(status.code(), Some(0));
    let dir = match &tmp {
        Some(t) => t.path().to_path_buf(),
        None => panic!("no data dir"),
    };
    let d2 = b.start_in(&dir, &cfg);
    let (s, again) = d2.get(&path).await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(again, done, "after a restart");
    let (s, missing) = d2.get("/v1/batches/bat_nope").await;
    assert_eq!(s, 404, "{missing}");
}

/// Cancelling an event cancels each of its deliveries still to be attempted, answers how
/// many, and leaves the finished ones alone; its attempts list every attempt of every
/// delivery, newest first, in pages.
async fn an_event_is_cancelled_whole_and_its_attempts_are_listed_newest_first(b: Backend) {
    let ok = Receiver::start().await;
    let flaky = Receiver::start().await;
    flaky.script([Reply::Status(500), Reply::Status(500)]);
    let slow = Receiver::start().await;
    let (_open, gate) = tokio::sync::watch::channel(false);
    slow.set_default(Reply::Gate(gate, 200));
    let cfg = daemon_config(
        &[
            sub("ok", &ok.url("/"), 3, ""),
            sub("flaky", &flaky.url("/"), 5, ""),
            Sub::new("later", &slow.url("/"))
                .set("timeout", "1s")
                .retry(3, "1h", "1h")
                .to_toml(),
        ]
        .concat(),
    );
    let d = b.start(&cfg);
    let e = d.publish("t", json!({})).await;
    let id = e["id"].as_str().unwrap_or_default().to_string();
    // ok: 1 attempt; flaky: 500, 500, 200; later: times out once and waits an hour.
    ok.wait_for(1, WAIT).await;
    flaky.wait_for(3, WAIT).await;
    let attempts = eventually("five attempts recorded", || async {
        let (_, a) = d.get(&format!("/v1/events/{id}/attempts")).await;
        (a["items"].as_array().map(Vec::len) == Some(5)).then_some(a)
    })
    .await;
    let items = attempts["items"].as_array().cloned().unwrap_or_default();
    let times: Vec<&str> = items
        .iter()
        .filter_map(|a| a["started_at"].as_str())
        .collect();
    let mut sorted = times.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(times, sorted, "newest first");
    let flaky_attempts: Vec<u64> = items
        .iter()
        .filter(|a| a["subscription"] == "flaky")
        .filter_map(|a| a["n"].as_u64())
        .collect();
    assert_eq!(flaky_attempts, vec![3, 2, 1]);
    // Two pages of two, then one.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    for page in 0.. {
        let (s, p) = d
            .get(&format!("/v1/events/{id}/attempts?limit=2{cursor}"))
            .await;
        assert_eq!(s, 200, "{p}");
        seen.extend(p["items"].as_array().cloned().unwrap_or_default());
        match p["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => {
                assert_eq!(page, 2);
                break;
            }
        }
    }
    assert_eq!(seen, items);
    let (s, bad) = d.get(&format!("/v1/events/{id}/attempts?cursor=x")).await;
    assert_eq!(s, 400, "{bad}");

    let (s, c) = d.post(&format!("/v1/events/{id}/cancel"), &json!({})).await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["deliveries"], 1, "only the one still waiting: {c}");
    let (_, ev) = d.get(&format!("/v1/events/{id}")).await;
    assert_eq!(ev["deliveries"]["cancelled"], 1, "{ev}");
    assert_eq!(ev["deliveries"]["succeeded"], 2, "{ev}");
    let (s, c) = d.post(&format!("/v1/events/{id}/cancel"), &json!({})).await;
    assert_eq!((s, c["deliveries"].as_u64()), (200, Some(0)), "{c}");
    let (s, nf) = d.post("/v1/events/nope/cancel", &json!({})).await;
    assert_eq!(s, 404, "{nf}");
    // The event's deliveries come in pages too.
    let (_, p1) = d.get(&format!("/v1/events/{id}/deliveries?limit=2")).await;
    assert_eq!(p1["items"].as_array().map(Vec::len), Some(2), "{p1}");
    let c = p1["next_cursor"].as_str().unwrap_or_default();
    let (_, p2) = d
        .get(&format!("/v1/events/{id}/deliveries?limit=2&cursor={c}"))
        .await;
    assert_eq!(p2["items"].as_array().map(Vec::len), Some(1), "{p2}");
    assert!(p2["next_cursor"].is_null(), "{p2}");
    // And a delivery's attempts.
    let flaky_delivery = items
        .iter()
        .find(|a| a["subscription"] == "flaky")
        .and_then(|a| a["delivery_id"].as_str())
        .unwrap_or_default()
        .to_string();
    let (_, a1) = d
        .get(&format!("/v1/deliveries/{flaky_delivery}/attempts?limit=2"))
        .await;
    assert_eq!(a1["items"].as_array().map(Vec::len), Some(2), "{a1}");
    assert_eq!(a1["next_cursor"], "2", "{a1}");
    let (_, a2) = d
        .get(&format!(
            "/v1/deliveries/{flaky_delivery}/attempts?cursor=2"
        ))
        .await;
    assert_eq!(a2["items"][0]["n"], 3, "{a2}");
}

/// `/livez` answers like `/healthz`.
#[tokio::test]
async fn livez_answers_like_healthz() {
    let d = daemon("");
    let (s, body) = d.get("/livez").await;
    assert_eq!((s, body), (200, json!({"status": "ok"})));
}

/// A daemon config that may deliver to loopback, with `rest` appended.
fn daemon_config(rest: &str) -> String {
    format!("[delivery]\nallow_private_networks = true\n\n{rest}")
}

const ADMIN: &str = "admin-token-producers-0001";
const KEY_SECRET: &str = "change-me-to-64-hex-characters-0123456789abcdef0123456789abcdef";

/// `v1=<hex HMAC-SHA256(secret, "{ts}.{body}")>`, as a producer signs.
fn producer_signature(secret: &str, ts: i64, body: &str) -> String {
    use hmac::Mac;
    let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    mac.update(format!("{ts}.{body}").as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("v1={hex}")
}

#[allow(clippy::disallowed_methods)] // the producer's clock, outside the daemon
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The README's curl/openssl example, aimed at `base`.
fn readme_example(base: &str) -> String {
    let readme = include_str!("../../README.md");
    let after = readme
        .split("<!-- signed-request example")
        .nth(1)
        .and_then(|r| r.split("```sh\n").nth(1))
        .and_then(|r| r.split("```").next())
        .unwrap_or_else(|| panic!("the README has no signed-request example"));
    after.replace("http://127.0.0.1:8080", base)
}

/// A producer's signed request is accepted with its key's scopes; the README's curl/openssl
/// example is one. The same request again (a replay), a tampered body, a stale or future
/// timestamp and an unknown key are refused with 401 and store nothing; the key's scope
/// bounds what it may do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_producer_requests_are_verified_and_never_replayed() {
    let d = Daemon::start(&format!(
        "[auth]\ntokens = [ {{ token = \"{ADMIN}\", scopes = [\"admin\"] }} ]\n\
         keys = [ {{ id = \"billing\", secret = \"{KEY_SECRET}\", scopes = [\"publish\"] }} ]\n"
    ));
    let base = d.url("");
    let base = base.trim_end_matches('/').to_string();
    // The README's example, run as written.
    let mut sh = std::process::Command::new("bash");
    sh.arg("-c").arg(readme_example(&base));
    let out = crate::support::run_bounded(sh, Duration::from_secs(30));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(
        (answer["id"].as_str(), answer["duplicate"].as_bool()),
        (Some("order-1001"), Some(false)),
        "{answer} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let events = || async {
        let (s, list) = d
            .send(d.http.get(d.url("/v1/events")).bearer_auth(ADMIN))
            .await;
        assert_eq!(s, 200, "{list}");
        list["items"].as_array().map_or(0, Vec::len)
    };
    let send = |ts: i64, key: &'static str, sig: String, body: String, path: &'static str| {
        d.http
            .post(d.url(path))
            .header("content-type", "application/json")
            .header("dispatchd-key-id", key)
            .header("dispatchd-timestamp", ts.to_string())
            .header("dispatchd-signature", sig)
            .body(body)
    };
    let body = r#"{"type":"invoice.paid","data":{"n":1}}"#.to_string();
    let now = unix_now();
    let sig = producer_signature(KEY_SECRET, now, &body);
    let (s, first) = d
        .send(send(
            now,
            "billing",
            sig.clone(),
            body.clone(),
            "/v1/events",
        ))
        .await;
    assert_eq!(s, 202, "{first}");
    assert_eq!(events().await, 2);

    let refused = [
        (
            "replay",
            send(now, "billing", sig.clone(), body.clone(), "/v1/events"),
        ),
        (
            "tampered body",
            send(
                now,
                "billing",
                sig.clone(),
                body.replace("1}", "2}"),
                "/v1/events",
            ),
        ),
        ("unknown key", {
            let s2 = producer_signature(KEY_SECRET, now, &body);
            send(now, "nobody", s2, body.clone(), "/v1/events")
        }),
        ("stale", {
            let old = now - 3600;
            send(
                old,
                "billing",
                producer_signature(KEY_SECRET, old, &body),
                body.clone(),
                "/v1/events",
            )
        }),
        ("future", {
            let late = now + 3600;
            send(
                late,
                "billing",
                producer_signature(KEY_SECRET, late, &body),
                body.clone(),
                "/v1/events",
            )
        }),
        ("wrong secret", {
            let other = "another-secret-of-enough-length-0123456789abcdef";
            send(
                now,
                "billing",
                producer_signature(other, now, &body),
                body.clone(),
                "/v1/events",
            )
        }),
    ];
    for (what, req) in refused {
        let (s, e) = d.send(req).await;
        assert_eq!(s, 401, "{what}: {e}");
        assert_eq!(e["error"]["code"], "unauthorized", "{what}: {e}");
    }
    assert_eq!(events().await, 2, "nothing stored by a refused request");
    // A publish key may not administer.
    let ts = unix_now();
    let (s, e) = d
        .send(
            d.http
                .get(d.url("/v1/deliveries"))
                .header("dispatchd-key-id", "billing")
                .header("dispatchd-timestamp", ts.to_string())
                .header(
                    "dispatchd-signature",
                    producer_signature(KEY_SECRET, ts, ""),
                ),
        )
        .await;
    assert_eq!(s, 403, "{e}");
    // Batches are signed over their whole body.
    let batch = r#"{"events":[{"type":"a","data":{}},{"type":"b","data":{}}]}"#.to_string();
    let (s, b) = d
        .send(send(
            ts,
            "billing",
            producer_signature(KEY_SECRET, ts, &batch),
            batch,
            "/v1/events/batch",
        ))
        .await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(events().await, 4);
}

const SECRET2: &str = "whsec_c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24=";

/// A callback is a delivery of its own: it reaches its URL with its headers, signed with its
/// own secret, under its host's destination, and is inspectable. One that is off, not on the
/// allow-list, or a loopback address while private networks are not allowed is refused with
/// 400 naming why, and nothing is stored.
async fn a_callback_is_delivered_signed_with_its_own_secret_and_refused_where_it_may_not_go(
    b: Backend,
) {
    let rx = Receiver::start().await;
    let d = daemon_on(&b, "[delivery.callbacks]\nenabled = true\n");
    let url = rx.url("/cb?run=1");
    let (s, e) = d
        .post(
            "/v1/events",
            &json!({"type": "order.done", "data": {"n": 7},
                    "callback": {"url": url, "headers": {"X-Tenant": "7"}, "secret": SECRET2}}),
        )
        .await;
    assert_eq!(s, 202, "{e}");
    assert_eq!(e["deliveries"], 1, "{e}");
    let got = rx.wait_for(1, WAIT).await;
    let r = &got[0];
    assert_eq!(r.path, "/cb");
    assert_eq!(r.header("x-tenant"), Some("7"));
    let (id, ts, sig) = (
        r.header("webhook-id").unwrap_or_default(),
        r.header("webhook-timestamp").unwrap_or_default(),
        r.header("webhook-signature").unwrap_or_default(),
    );
    assert!(verify_signature(SECRET2, id, ts, &r.body, sig), "{sig}");
    assert!(!verify_signature(SECRET, id, ts, &r.body, sig));
    assert_eq!(r.json()["data"]["n"], 7);
    let event_id = e["id"].as_str().unwrap_or_default().to_string();
    let ev = eventually("the callback delivery succeeded", || async {
        let (_, ev) = d.get(&format!("/v1/events/{event_id}")).await;
        (ev["deliveries"]["succeeded"] == 1).then_some(ev)
    })
    .await;
    assert_eq!(ev["callback"]["headers"], json!(["X-Tenant"]), "{ev}");
    assert_eq!(ev["callback"]["secret"], true, "{ev}");
    assert!(
        !ev.to_string().contains(SECRET2),
        "the secret is never shown: {ev}"
    );
    let host = format!("callback:http://127.0.0.1:{}", rx.addr.port());
    let (_, dl) = d
        .get(&format!(
            "/v1/deliveries?subscription={}",
            host.replace(':', "%3A").replace('/', "%2F")
        ))
        .await;
    assert_eq!(dl["items"].as_array().map(Vec::len), Some(1), "{dl}");
    assert_eq!(dl["items"][0]["status"], "succeeded", "{dl}");
    // Replayable: the event again to its callback, by event or by the callback's host.
    for body in [
        json!({"event_id": event_id}),
        json!({"event_id": event_id, "subscription": host}),
    ] {
        let (s, r) = d.post("/v1/replay", &body).await;
        assert_eq!((s, r["deliveries"].as_u64()), (200, Some(1)), "{body}: {r}");
    }
    let again = rx.wait_for(3, WAIT).await;
    assert!(again.iter().all(|r| r.path == "/cb"), "{again:?}");

    // Refusals store nothing.
    let guarded = b.start(
        "[delivery.callbacks]\nenabled = true\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n",
    );
    let listed = b.start(
        "[delivery]\nallow_private_networks = true\n[delivery.callbacks]\nenabled = true\n\
         allow = [\"hooks.example.com\"]\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n",
    );
    let off = daemon_on(&b, "");
    for (who, why) in [
        (&guarded, "forbidden"),
        (&listed, "allow-list"),
        (&off, "off"),
    ] {
        // On PostgreSQL these daemons share the first one's database: count, don't expect 0.
        let (_, before) = who.get("/v1/events").await;
        let (s, e) = who
            .post(
                "/v1/events",
                &json!({"type": "t", "data": {}, "callback": {"url": rx.url("/cb")}}),
            )
            .await;
        assert_eq!(s, 400, "{e}");
        assert_eq!(e["error"]["code"], "invalid_callback", "{e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(why)),
            "{why}: {e}"
        );
        let (_, list) = who.get("/v1/events").await;
        assert_eq!(
            list["items"].as_array().map(Vec::len),
            before["items"].as_array().map(Vec::len),
            "{list}"
        );
    }
}

/// An operator's redrive or retry acts now: with the destination's breaker open for an
/// hour, the delivery goes at once as a probe, and a success closes the breaker.
async fn an_operator_action_sends_a_probe_through_an_open_breaker(b: Backend) {
    let rx = Receiver::start().await;
    rx.script([Reply::Status(500), Reply::Status(500)]);
    let d = daemon_on(
        &b,
        &Sub::new("b", &rx.url("/"))
            .set("retry.max_attempts", 1)
            .set("breaker.failure_threshold", 1)
            .set("breaker.cooldown", "1h")
            .to_toml(),
    );
    d.publish("t", json!({"n": 1})).await;
    let dead = eventually("the first delivery dead", || async {
        let (_, l) = d.get("/v1/dead-letters").await;
        (l["items"].as_array().map(Vec::len) == Some(1)).then_some(l)
    })
    .await;
    let breaker = "subscription=\"b\"";
    assert_eq!(
        metric(&d, "dispatchd_breaker_state", breaker).await,
        1,
        "open"
    );
    // Retry: one probe goes now; it fails, so the breaker opens again.
    let delivery = dead["items"][0]["delivery"]["id"]
        .as_str()
        .or(dead["items"][0]["id"].as_str())
        .unwrap_or_default()
        .to_string();
    let (s, r) = d
        .post(&format!("/v1/deliveries/{delivery}/retry"), &json!({}))
        .await;
    assert_eq!(s, 200, "{r}");
    rx.wait_for(2, WAIT).await;
    eventually("the probe recorded", || async {
        let (_, l) = d.get("/v1/dead-letters").await;
        (l["items"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await;
    // Redrive: the next probe succeeds and closes the breaker.
    let (s, r) = d.post("/v1/dead-letters/redrive", &json!({})).await;
    assert_eq!(s, 200, "{r}");
    let got = rx.wait_for(3, WAIT).await;
    assert_eq!(got[2].answered, 200);
    eventually("the breaker closed", || async {
        (metric(&d, "dispatchd_breaker_state", breaker).await == 0).then_some(())
    })
    .await;
}

crate::both!(
    a_high_priority_event_overtakes_a_backlog_of_low_ones,
    batch_status_follows_its_deliveries_across_a_restart,
    an_event_is_cancelled_whole_and_its_attempts_are_listed_newest_first,
    a_callback_is_delivered_signed_with_its_own_secret_and_refused_where_it_may_not_go,
    an_operator_action_sends_a_probe_through_an_open_breaker,
);

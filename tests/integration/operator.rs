//! The operator surface against the real daemon: the delivery list and its pagination, retry
//! and cancel, replay, the dead-letter queue and redrive, subscriptions over the API (pause,
//! resume, rotation, payload filters), config reload (HTTP and SIGHUP), the OpenAPI document,
//! auth scopes on every operator route, and the `dispatchd` operator commands.

use crate::support::backend::Backend;
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::cli::{cli, stderr};
use crate::support::config::Sub;
use crate::support::receiver::{Receiver, Reply};
use crate::support::{self, Daemon, eventually, verify_signature};

const WAIT: Duration = Duration::from_secs(30);
pub(crate) const ADMIN: &str = "admin-token-operator-0001";
pub(crate) const PUBLISH: &str = "publish-token-operator-01";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SECRET2: &str = "whsec_c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24=";

// ---------------------------------------------------------------------------------------------
// helpers

/// A daemon config with both token scopes, private destinations allowed and `extra` appended.
pub(crate) fn config(delivery: &str, subs: &str) -> String {
    format!(
        "[auth]\ntokens = [\n  {{ token = \"{ADMIN}\", scopes = [\"admin\"] }},\n  {{ token = \"{PUBLISH}\", scopes = [\"publish\"] }},\n]\n\n[delivery]\nallow_private_networks = true\n{delivery}\n\n{subs}"
    )
}

/// A subscription with fast retries (3 attempts) and a breaker that never opens here.
fn sub(id: &str, url: &str, extra: &str) -> String {
    sub_n(id, url, 3, extra)
}

/// A subscription that gives up after `attempts`.
pub(crate) fn sub_n(id: &str, url: &str, attempts: u32, extra: &str) -> String {
    Sub::new(id, url)
        .retry(i64::from(attempts), "10ms", "20ms")
        .set("breaker.failure_threshold", 10_000)
        .set("breaker.min_requests", 10_000)
        .with_toml(extra)
        .to_toml()
}

async fn get(d: &Daemon, path: &str) -> (u16, Value) {
    d.with_token(ADMIN).get(path).await
}

async fn post(d: &Daemon, path: &str, body: Value) -> (u16, Value) {
    d.with_token(ADMIN).post(path, &body).await
}

async fn post_empty(d: &Daemon, path: &str) -> (u16, Value) {
    d.with_token(ADMIN).post_empty(path).await
}

async fn put(d: &Daemon, path: &str, body: Value) -> (u16, Value) {
    d.with_token(ADMIN).put(path, &body).await
}

async fn delete(d: &Daemon, path: &str) -> (u16, Value) {
    d.with_token(ADMIN).delete(path).await
}

/// Publishes one event with the publish token; returns the answer (asserting 202).
pub(crate) async fn publish(d: &Daemon, event_type: &str, data: Value) -> Value {
    let body = json!({"type": event_type, "data": data});
    let (s, body) = d.with_token(PUBLISH).post("/v1/events", &body).await;
    assert_eq!(s, 202, "publish failed: {body}");
    body
}

#[track_caller]
fn ok(got: (u16, Value), what: &str) -> Value {
    assert_eq!(got.0, 200, "{what}: {}", got.1);
    got.1
}

#[track_caller]
fn assert_error(got: &(u16, Value), status: u16, code: &str, what: &str) {
    assert_eq!(got.0, status, "{what}: {}", got.1);
    assert_eq!(got.1["error"]["code"], code, "{what}: {}", got.1);
}

pub(crate) fn str_of(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

pub(crate) fn items(v: &Value) -> Vec<Value> {
    v["items"].as_array().cloned().unwrap_or_default()
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Every delivery matching a query, following cursors.
pub(crate) async fn all_deliveries(d: &Daemon, query: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/deliveries?{query}&limit=1000&cursor={c}"),
            None => format!("/v1/deliveries?{query}&limit=1000"),
        };
        let page = ok(get(d, &path).await, &path);
        out.extend(items(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

/// Waits until exactly `n` deliveries match a query.
pub(crate) async fn wait_count(d: &Daemon, query: &str, n: usize) -> Vec<Value> {
    eventually(&format!("{n} deliveries for {query}"), || async {
        let got = all_deliveries(d, query).await;
        (got.len() == n).then_some(got)
    })
    .await
}

fn ids_received(rx: &Receiver) -> Vec<String> {
    rx.received()
        .iter()
        .filter_map(|r| r.header("webhook-id").map(str::to_string))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// auth, OpenAPI

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operator_route_needs_an_admin_token() {
    let rx = Receiver::start().await;
    let d = Daemon::start(&config("", &sub("crm", &rx.url("/"), "")));
    let routes: Vec<(&str, &str, Option<Value>)> = vec![
        ("GET", "/v1/events", None),
        ("GET", "/v1/events/e1", None),
        ("GET", "/v1/events/e1/deliveries", None),
        ("GET", "/v1/deliveries", None),
        ("GET", "/v1/deliveries/1", None),
        ("GET", "/v1/deliveries/1/attempts", None),
        ("POST", "/v1/deliveries/1/retry", None),
        ("POST", "/v1/deliveries/1/cancel", None),
        ("POST", "/v1/replay", Some(json!({"event_id": "e1"}))),
        ("GET", "/v1/dead-letters", None),
        ("POST", "/v1/dead-letters/redrive", Some(json!({}))),
        ("GET", "/v1/subscriptions", None),
        (
            "POST",
            "/v1/subscriptions",
            Some(json!({"id": "x", "url": rx.url("/x")})),
        ),
        ("GET", "/v1/subscriptions/crm", None),
        (
            "PUT",
            "/v1/subscriptions/crm",
            Some(json!({"url": rx.url("/")})),
        ),
        ("DELETE", "/v1/subscriptions/crm", None),
        ("POST", "/v1/subscriptions/crm/pause", None),
        ("POST", "/v1/subscriptions/crm/resume", None),
        ("POST", "/v1/subscriptions/crm/rotate", Some(json!({}))),
        ("POST", "/v1/admin/reload", None),
    ];
    for (method, path, body) in &routes {
        let m = match reqwest::Method::from_bytes(method.as_bytes()) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        let build = |token: Option<&str>| {
            let mut r = d.http.request(m.clone(), d.url(path));
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            if let Some(b) = body {
                r = r
                    .header("content-type", "application/json")
                    .body(b.to_string());
            }
            r
        };
        let none = d.send(build(None)).await;
        assert_error(
            &none,
            401,
            "unauthorized",
            &format!("{method} {path} without a token"),
        );
        let wrong = d.send(build(Some("not-a-token-at-all-000"))).await;
        assert_error(
            &wrong,
            401,
            "unauthorized",
            &format!("{method} {path} bad token"),
        );
        let publish = d.send(build(Some(PUBLISH))).await;
        assert_error(
            &publish,
            403,
            "forbidden",
            &format!("{method} {path} publish token"),
        );
        let admin = d.send(build(Some(ADMIN))).await;
        assert!(
            admin.0 != 401 && admin.0 != 403,
            "{method} {path} with the admin token: {} {}",
            admin.0,
            admin.1
        );
    }
    // The publish token does publish; the OpenAPI document is open.
    publish(&d, "order.created", json!({})).await;
    let (s, doc) = d.get("/v1/openapi.json").await;
    assert_eq!(s, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    for p in [
        "/v1/replay",
        "/v1/dead-letters/redrive",
        "/v1/subscriptions/{id}/rotate",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} missing from the document");
    }
    // A wrong method names the allowed ones.
    let (s, body) = d
        .send(d.http.delete(d.url("/v1/replay")).bearer_auth(ADMIN))
        .await;
    assert_eq!(s, 405, "{body}");
}

// ---------------------------------------------------------------------------------------------
// the delivery list

async fn delivery_list_filters_by_status_subscription_type_and_time(b: Backend) {
    let good = Receiver::start().await;
    let bad = Receiver::start().await;
    bad.set_default(Reply::Status(500));
    let subs = [
        sub("ok", &good.url("/"), ""),
        sub_n("bad", &bad.url("/"), 1, "event_types = [\"order.*\"]"),
    ]
    .concat();
    let d = b.start(&config("", &subs));
    // Batch A: two orders. Batch B: one order, two signups.
    publish(&d, "order.created", json!({"n": 1})).await;
    publish(&d, "order.created", json!({"n": 2})).await;
    let a = wait_count(&d, "", 4).await;
    let a_ids: BTreeSet<String> = a.iter().map(|x| str_of(x, "id")).collect();
    publish(&d, "order.created", json!({"n": 3})).await;
    publish(&d, "user.signup", json!({"n": 4})).await;
    publish(&d, "user.signup", json!({"n": 5})).await;
    wait_count(&d, "status=succeeded", 5).await;
    wait_count(&d, "status=dead", 3).await;

    let all = all_deliveries(&d, "").await;
    assert_eq!(all.len(), 8);
    let ids: Vec<u64> = all
        .iter()
        .filter_map(|x| str_of(x, "id").parse().ok())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "not in id order: {ids:?}"
    );

    let cases = [
        ("subscription=ok", 5),
        ("subscription=bad", 3),
        ("subscription=nope", 0),
        ("status=dead&subscription=bad", 3),
        ("status=dead&subscription=ok", 0),
        ("status=succeeded&subscription=ok", 5),
        ("event_type=user.signup", 2),
        ("event_type=order.created", 6),
        ("event_type=order.created&status=succeeded", 3),
        ("event_type=order.created&subscription=bad&status=dead", 3),
        ("event_type=user.signup&subscription=bad", 0),
        ("status=pending", 0),
    ];
    for (q, n) in cases {
        let got = all_deliveries(&d, q).await;
        assert_eq!(got.len(), n, "{q}: {got:?}");
        for x in &got {
            for part in q.split('&') {
                let (k, v) = part.split_once('=').unwrap_or_default();
                match k {
                    "status" | "subscription" => assert_eq!(x[k], v, "{q}: {x}"),
                    _ => {}
                }
            }
        }
    }
    // Time: everything created before batch B's first delivery is batch A, and the rest is B.
    let b_first = all
        .iter()
        .find(|x| !a_ids.contains(&str_of(x, "id")))
        .map(|x| str_of(x, "created_at"))
        .unwrap_or_default();
    let before: BTreeSet<String> = all_deliveries(&d, &format!("until={}", enc(&b_first)))
        .await
        .iter()
        .map(|x| str_of(x, "id"))
        .collect();
    assert_eq!(before, a_ids);
    let since = all_deliveries(&d, &format!("since={}", enc(&b_first))).await;
    assert_eq!(since.len(), 4);
    assert!(since.iter().all(|x| !a_ids.contains(&str_of(x, "id"))));
    let window = all_deliveries(
        &d,
        &format!(
            "since={}&until={}&subscription=bad",
            enc(&b_first),
            enc(&b_first)
        ),
    )
    .await;
    assert!(window.is_empty());
    let dead_b = all_deliveries(&d, &format!("since={}&status=dead", enc(&b_first))).await;
    assert_eq!(dead_b.len(), 1);

    // Small pages walk the same rows.
    let mut walked = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = ok(
            get(&d, &format!("/v1/deliveries?limit=3&cursor={cursor}")).await,
            "page",
        );
        assert!(items(&page).len() <= 3);
        walked.extend(items(&page).iter().map(|x| str_of(x, "id")));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    assert_eq!(
        walked,
        all.iter().map(|x| str_of(x, "id")).collect::<Vec<_>>()
    );

    for (q, what) in [
        ("status=bogus", "unknown status"),
        ("limit=0", "limit 0"),
        ("limit=1001", "limit over 1000"),
        ("colour=red", "unknown parameter"),
        ("cursor=abc", "foreign cursor"),
        ("since=yesterday", "bad time"),
    ] {
        let got = get(&d, &format!("/v1/deliveries?{q}")).await;
        assert_error(&got, 400, "invalid_query", what);
    }
}

async fn pagination_returns_every_row_exactly_once_while_events_arrive(b: Backend) {
    let rx = Receiver::start().await;
    let d = Arc::new(b.start(&config("", &sub("s", &rx.url("/"), ""))));
    let batch: Vec<Value> = (0..100)
        .map(|i| json!({"type": "order.created", "data": {"i": i}}))
        .collect();
    let (s, body) = d
        .send(
            d.http
                .post(d.url("/v1/events/batch"))
                .bearer_auth(PUBLISH)
                .header("content-type", "application/json")
                .body(json!({"events": batch}).to_string()),
        )
        .await;
    assert_eq!(s, 202, "{body}");
    for i in 100..130 {
        publish(&d, "user.signup", json!({"i": i})).await;
    }
    let before: BTreeSet<u64> = all_deliveries(&d, "subscription=s")
        .await
        .iter()
        .filter_map(|x| str_of(x, "id").parse().ok())
        .collect();
    assert_eq!(before.len(), 130);

    // A publisher adds events while the pages are read; each page waits for one more event
    // to be committed, so new rows really arrive between every two pages. It may publish
    // three events per page read, no more: fewer than a page holds, so every walk ends
    // however fast the database commits.
    let published = Arc::new(AtomicUsize::new(0));
    let permits = Arc::new(tokio::sync::Semaphore::new(3));
    let publisher = {
        let (d, published, permits) = (d.clone(), published.clone(), permits.clone());
        tokio::spawn(async move {
            // Closed once the walks are over.
            while let Ok(p) = permits.acquire().await {
                p.forget();
                publish(&d, "order.created", json!({"late": true})).await;
                published.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    for query in ["subscription=s", "", "event_type=order.created"] {
        let mut seen: Vec<u64> = Vec::new();
        let mut cursor = String::new();
        let mut pages = 0;
        loop {
            let at = published.load(Ordering::Relaxed);
            eventually("the publisher to commit another event", || async {
                (published.load(Ordering::Relaxed) > at).then_some(())
            })
            .await;
            let page = ok(
                get(
                    &d,
                    &format!("/v1/deliveries?{query}&limit=7&cursor={cursor}"),
                )
                .await,
                "page",
            );
            pages += 1;
            permits.add_permits(3);
            seen.extend(
                items(&page)
                    .iter()
                    .filter_map(|x| str_of(x, "id").parse::<u64>().ok()),
            );
            match page["next_cursor"].as_str() {
                Some(c) => cursor = c.to_string(),
                None => break,
            }
            assert!(pages < 10_000, "the walk does not end");
        }
        let unique: HashSet<u64> = seen.iter().copied().collect();
        assert_eq!(unique.len(), seen.len(), "{query}: a row came twice");
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "{query}: out of order"
        );
        let want: BTreeSet<u64> = if query.starts_with("event_type") {
            // The 30 signups are not order.created.
            let signups: BTreeSet<u64> = all_deliveries(&d, "event_type=user.signup")
                .await
                .iter()
                .filter_map(|x| str_of(x, "id").parse().ok())
                .collect();
            before.difference(&signups).copied().collect()
        } else {
            before.clone()
        };
        let missing: Vec<_> = want.iter().filter(|id| !unique.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "{query}: rows never returned: {missing:?}"
        );
        assert!(pages > 15, "{query}: only {pages} pages");
    }
    permits.close();
    if let Err(e) = publisher.await {
        panic!("publisher: {e}");
    }
    assert!(published.load(Ordering::Relaxed) > 40);
}

// ---------------------------------------------------------------------------------------------
// retry, cancel

async fn retry_and_cancel_single_deliveries(b: Backend) {
    let flaky = Receiver::start().await;
    flaky.set_default(Reply::Status(500));
    let slow = Receiver::start().await;
    // 429 with Retry-After: the next attempt is an hour away, so the delivery sits retrying.
    slow.set_default(Reply::WithHeaders(
        429,
        vec![("retry-after", "3600".into())],
    ));
    let subs = format!(
        "{}{}",
        sub_n("flaky", &flaky.url("/"), 1, "event_types = [\"f\"]"),
        sub("slow", &slow.url("/"), "event_types = [\"s\"]")
    );
    let d = b.start(&config("", &subs));

    let ev = publish(&d, "f", json!({})).await;
    let dead = wait_count(&d, "subscription=flaky&status=dead", 1).await;
    let id = str_of(&dead[0], "id");
    assert_eq!(dead[0]["attempts"], 1);
    assert_eq!(dead[0]["event_id"], ev["id"]);
    flaky.set_default(Reply::Status(200));
    let r = ok(
        post_empty(&d, &format!("/v1/deliveries/{id}/retry")).await,
        "retry",
    );
    assert_eq!(r["status"], "retrying");
    assert_eq!(r["attempts"], 1);
    assert!(r["next_attempt_at"].is_string());
    let done = wait_count(&d, "subscription=flaky&status=succeeded", 1).await;
    assert_eq!(done[0]["attempts"], 2);
    assert!(all_deliveries(&d, "status=dead").await.is_empty());
    let dl = ok(get(&d, "/v1/dead-letters").await, "dead letters");
    assert!(
        items(&dl).is_empty(),
        "retried delivery still a dead letter: {dl}"
    );
    let attempts = ok(
        get(&d, &format!("/v1/deliveries/{id}/attempts")).await,
        "attempts",
    );
    let codes: Vec<Value> = items(&attempts)
        .iter()
        .map(|a| a["status_code"].clone())
        .collect();
    assert_eq!(codes, vec![json!(500), json!(200)]);
    let again = post_empty(&d, &format!("/v1/deliveries/{id}/retry")).await;
    assert_error(&again, 409, "conflict", "retry of a succeeded delivery");

    publish(&d, "s", json!({})).await;
    let waiting = eventually("the slow delivery to be retrying", || async {
        let got = all_deliveries(&d, "subscription=slow&status=retrying").await;
        got.first().filter(|x| x["attempts"] == 1).cloned()
    })
    .await;
    let sid = str_of(&waiting, "id");
    let c = ok(
        post_empty(&d, &format!("/v1/deliveries/{sid}/cancel")).await,
        "cancel",
    );
    assert_eq!(c["status"], "cancelled");
    assert_eq!(c["next_attempt_at"], Value::Null);
    assert_eq!(c["last_error"], "cancelled by an operator");
    let shown = ok(get(&d, &format!("/v1/deliveries/{sid}")).await, "show");
    assert_eq!(shown["status"], "cancelled");
    let twice = post_empty(&d, &format!("/v1/deliveries/{sid}/cancel")).await;
    assert_error(&twice, 409, "conflict", "cancel of a cancelled delivery");
    // A cancelled delivery can be retried: it is attempted again at once.
    slow.set_default(Reply::Status(204));
    let r = ok(
        post_empty(&d, &format!("/v1/deliveries/{sid}/retry")).await,
        "retry cancelled",
    );
    assert_eq!(r["status"], "retrying");
    let done = wait_count(&d, "subscription=slow&status=succeeded", 1).await;
    assert_eq!(done[0]["attempts"], 2);
    assert_eq!(slow.received().len(), 2);

    for path in [
        "/v1/deliveries/999999/retry",
        "/v1/deliveries/abc/retry",
        "/v1/deliveries/999999/cancel",
    ] {
        assert_error(&post_empty(&d, path).await, 404, "not_found", path);
    }
}

// ---------------------------------------------------------------------------------------------
// dead letters

async fn redrive_delivers_dead_letters_once_the_receiver_recovers(b: Backend) {
    let down = Receiver::start().await;
    down.set_default(Reply::Status(503));
    let other = Receiver::start().await;
    let subs = format!(
        "{}{}",
        sub_n("down", &down.url("/"), 2, ""),
        sub("other", &other.url("/"), "event_types = [\"never.*\"]")
    );
    let d = b.start(&config("", &subs));
    let mut events = BTreeSet::new();
    for i in 0..5 {
        let ev = publish(&d, "order.created", json!({"i": i})).await;
        events.insert(str_of(&ev, "id"));
    }
    let dead = eventually("five dead letters", || async {
        let page = ok(get(&d, "/v1/dead-letters").await, "dead letters");
        (items(&page).len() == 5).then_some(page)
    })
    .await;
    for x in items(&dead) {
        assert_eq!(x["status"], "dead");
        assert_eq!(x["attempts"], 2);
        assert_eq!(x["last_error"], "HTTP 503");
        assert!(x["dead_at"].is_string());
    }
    assert_eq!(down.received().len(), 10);
    // Filters and paging of the queue.
    let mine = ok(
        get(&d, "/v1/dead-letters?subscription=down&limit=2").await,
        "page",
    );
    assert_eq!(items(&mine).len(), 2);
    assert!(mine["next_cursor"].is_string());
    let theirs = ok(
        get(&d, "/v1/dead-letters?subscription=other").await,
        "other",
    );
    assert!(items(&theirs).is_empty());
    let future = ok(get(&d, "/v1/dead-letters?since=4000000000").await, "future");
    assert!(items(&future).is_empty());
    let earliest = items(&dead)
        .iter()
        .map(|x| str_of(x, "dead_at"))
        .min()
        .unwrap_or_default();
    let since = ok(
        get(&d, &format!("/v1/dead-letters?since={}", enc(&earliest))).await,
        "since",
    );
    assert_eq!(items(&since).len(), 5);

    // Nothing of another subscription's to redrive.
    let none = ok(
        post(
            &d,
            "/v1/dead-letters/redrive",
            json!({"subscription": "other"}),
        )
        .await,
        "redrive other",
    );
    assert_eq!(none["deliveries"], 0);

    down.set_default(Reply::Status(200));
    let r = ok(
        post(
            &d,
            "/v1/dead-letters/redrive",
            json!({"subscription": "down", "since": earliest}),
        )
        .await,
        "redrive",
    );
    assert_eq!(r["deliveries"], 5);
    let delivered: BTreeSet<String> = down.wait_for_successes(5, WAIT).await.into_iter().collect();
    assert_eq!(delivered, events);
    let done = wait_count(&d, "subscription=down&status=succeeded", 5).await;
    assert!(done.iter().all(|x| x["attempts"] == 3), "{done:?}");
    let empty = ok(get(&d, "/v1/dead-letters").await, "after");
    assert!(items(&empty).is_empty());
    // An empty body means all; nothing is left.
    let again = ok(post_empty(&d, "/v1/dead-letters/redrive").await, "again");
    assert_eq!(again["deliveries"], 0);
    assert_error(
        &post(&d, "/v1/dead-letters/redrive", json!({"since": "soon"})).await,
        400,
        "invalid_body",
        "bad since",
    );
    assert_error(
        &post(&d, "/v1/dead-letters/redrive", json!({"everything": true})).await,
        400,
        "invalid_body",
        "unknown field",
    );
}

// ---------------------------------------------------------------------------------------------
// replay

async fn replay_by_time_range_makes_exactly_the_expected_deliveries(b: Backend) {
    let ra = Receiver::start().await;
    let rb = Receiver::start().await;
    let rc = Receiver::start().await;
    let subs = [
        sub("orders", &ra.url("/"), "event_types = [\"order.*\"]"),
        sub(
            "big",
            &rb.url("/"),
            "filter = { field = \"total\", gt = 100 }",
        ),
        sub("off", &rc.url("/"), "enabled = false"),
    ]
    .concat();
    let d = b.start(&config("replay_max_events = 5", &subs));
    let mut ev = Vec::new();
    for (t, total) in [
        ("order.created", 500),
        ("user.signup", 1),
        ("order.created", 5),
        ("order.paid", 200),
        ("user.signup", 300),
        ("misc", 0),
        ("order.created", 1000),
    ] {
        ev.push(str_of(&publish(&d, t, json!({"total": total})).await, "id"));
    }
    // Fan-out at publish: e1 orders+big, e3 orders, e4 orders+big, e5 big, e7 orders+big.
    wait_count(&d, "status=succeeded", 8).await;
    assert!(rc.received().is_empty());
    let received_at = |i: usize| {
        let d = &d;
        let id = ev[i].clone();
        async move {
            str_of(
                &ok(get(d, &format!("/v1/events/{id}")).await, "event"),
                "received_at",
            )
        }
    };
    let since = received_at(2).await;
    let until = received_at(6).await;
    let r = ok(
        post(&d, "/v1/replay", json!({"since": since, "until": until})).await,
        "replay",
    );
    assert_eq!(r["events"], 4, "{r}");
    assert_eq!(r["deliveries"], 4, "{r}");
    let replayed: BTreeSet<(String, String)> = all_deliveries(&d, "")
        .await
        .iter()
        .filter(|x| x["origin"] == "replay")
        .map(|x| (str_of(x, "event_id"), str_of(x, "subscription")))
        .collect();
    let want: BTreeSet<(String, String)> = [(2, "orders"), (3, "orders"), (3, "big"), (4, "big")]
        .iter()
        .map(|(i, s)| (ev[*i].clone(), s.to_string()))
        .collect();
    assert_eq!(replayed, want);
    // They are delivered; the originals are untouched (immutable history).
    wait_count(&d, "status=succeeded", 12).await;
    let to_a = ids_received(&ra);
    assert_eq!(to_a.iter().filter(|i| **i == ev[2]).count(), 2);
    assert_eq!(to_a.iter().filter(|i| **i == ev[3]).count(), 2);
    assert_eq!(to_a.len(), 6);
    assert_eq!(ids_received(&rb).len(), 6);
    assert!(rc.received().is_empty());
    let originals = all_deliveries(&d, "")
        .await
        .iter()
        .filter(|x| x["origin"] == "publish")
        .filter(|x| x["attempts"] == 1)
        .count();
    assert_eq!(originals, 8);

    // Narrowed to a subscription and a type pattern; by seq; by event id.
    let r = ok(
        post(
            &d,
            "/v1/replay",
            json!({"since": since, "until": until, "subscription": "orders", "event_types": ["order.p*"]}),
        )
        .await,
        "narrow",
    );
    assert_eq!(r["deliveries"], 1);
    let r = ok(
        post(&d, "/v1/replay", json!({"from_seq": 1, "to_seq": 2})).await,
        "seq",
    );
    assert_eq!(r["deliveries"], 2);
    let r = ok(
        post(&d, "/v1/replay", json!({"event_id": ev[4]})).await,
        "one",
    );
    assert_eq!(r["deliveries"], 1);

    // Refusals, which change nothing.
    let before = all_deliveries(&d, "").await.len();
    for (body, status, code) in [
        (json!({"from_seq": 1, "to_seq": 7}), 400, "range_too_large"),
        (
            json!({"since": "0", "until": "4000000000"}),
            400,
            "range_too_large",
        ),
        (
            json!({"since": until, "until": since}),
            400,
            "invalid_replay",
        ),
        (json!({"since": since}), 400, "invalid_replay"),
        (
            json!({"event_id": ev[0], "from_seq": 1, "to_seq": 1}),
            400,
            "invalid_replay",
        ),
        (json!({}), 400, "invalid_replay"),
        (json!({"event_id": "nope"}), 404, "not_found"),
        (
            json!({"event_id": ev[0], "subscription": "nope"}),
            404,
            "not_found",
        ),
        (
            json!({"event_id": ev[0], "subscription": "off"}),
            409,
            "conflict",
        ),
        (
            json!({"event_id": ev[0], "colour": "red"}),
            400,
            "invalid_body",
        ),
    ] {
        let got = post(&d, "/v1/replay", body.clone()).await;
        assert_error(&got, status, code, &body.to_string());
        if code == "range_too_large" {
            let m = got.1["error"]["message"].as_str().unwrap_or_default();
            assert!(m.contains("replay_max_events"), "{m}");
        }
    }
    assert_eq!(all_deliveries(&d, "").await.len(), before);
}

// ---------------------------------------------------------------------------------------------
// subscriptions

async fn subscriptions_over_the_api(b: Backend) {
    let r1 = Receiver::start().await;
    let r2 = Receiver::start().await;
    let r3 = Receiver::start().await;
    let text = config("", &sub("cfg", &r1.url("/"), "event_types = [\"cfg.*\"]"));
    let mut d = b.start(&text);

    let (s, raw) = d
        .send(d.http.get(d.url("/v1/subscriptions")).bearer_auth(ADMIN))
        .await;
    assert_eq!(s, 200);
    let list = items(&raw);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["source"], "config");
    assert_eq!(
        list[0]["secrets"],
        json!([{"last4": "LaSw", "expires_at": null, "public_key": null}])
    );
    assert!(!raw.to_string().contains(SECRET), "a secret was listed");

    let (s, created) = post(
        &d,
        "/v1/subscriptions",
        json!({"id": "api", "url": r2.url("/hook"), "event_types": ["order.*"], "headers": {"X-Key": "k-1"}}),
    )
    .await;
    assert_eq!(s, 201, "{created}");
    assert_eq!(created["source"], "api");
    assert_eq!(created["headers"], json!(["X-Key"]));
    let secret = str_of(&created, "secret");
    assert!(secret.starts_with("whsec_"), "{created}");
    let listed = ok(get(&d, "/v1/subscriptions").await, "list");
    assert_eq!(items(&listed).len(), 2);
    assert!(
        !listed.to_string().contains(&secret),
        "a generated secret was listed"
    );
    let one = ok(get(&d, "/v1/subscriptions/api").await, "show");
    assert!(one["secret"].is_null() && !one.to_string().contains(&secret));
    assert!(!one.to_string().contains("k-1"), "a header value was shown");

    let ev = publish(&d, "order.created", json!({"n": 1})).await;
    assert_eq!(ev["deliveries"], 1);
    let got = r2.wait_for(1, WAIT).await;
    let sig = got[0].header("webhook-signature").unwrap_or_default();
    let ts = got[0].header("webhook-timestamp").unwrap_or_default();
    assert!(
        verify_signature(&secret, &str_of(&ev, "id"), ts, &got[0].body, sig),
        "{sig}"
    );
    assert_eq!(got[0].header("x-key"), Some("k-1"));
    assert_eq!(got[0].path, "/hook");

    // Refusals.
    let dup = post(
        &d,
        "/v1/subscriptions",
        json!({"id": "api", "url": r2.url("/")}),
    )
    .await;
    assert_error(&dup, 409, "conflict", "duplicate id");
    let taken = post(
        &d,
        "/v1/subscriptions",
        json!({"id": "cfg", "url": r2.url("/")}),
    )
    .await;
    assert_error(&taken, 409, "conflict", "config id");
    let bad_url = post(
        &d,
        "/v1/subscriptions",
        json!({"id": "b", "url": "ftp://x"}),
    )
    .await;
    assert_error(&bad_url, 400, "invalid_subscription", "bad url");
    assert!(
        bad_url.1["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("url")
    );
    let bad_filter = post(
        &d,
        "/v1/subscriptions",
        json!({"id": "b", "url": r2.url("/"), "filter": {"any": [{"field": "total", "gte": "lots"}]}}),
    )
    .await;
    assert_error(&bad_filter, 400, "invalid_subscription", "bad filter");
    let m = bad_filter.1["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        m.contains("filter.any[0].gte") && m.contains("number"),
        "{m}"
    );
    let unknown = post(
        &d,
        "/v1/subscriptions",
        json!({"id": "b", "url": r2.url("/"), "colour": 1}),
    )
    .await;
    assert_error(&unknown, 400, "invalid_subscription", "unknown field");
    let bad_secret = post(
        &d,
        "/v1/subscriptions",
        json!({"id": "b", "url": r2.url("/"), "secrets": ["whsec_!!"]}),
    )
    .await;
    assert_error(&bad_secret, 400, "invalid_subscription", "bad secret");
    let (s, _) = d
        .send(
            d.http
                .post(d.url("/v1/subscriptions"))
                .bearer_auth(ADMIN)
                .body("{}"),
        )
        .await;
    assert_eq!(s, 415);
    assert_eq!(
        items(&ok(get(&d, "/v1/subscriptions").await, "list")).len(),
        2
    );

    // Config subscriptions are read-only here.
    for got in [
        put(&d, "/v1/subscriptions/cfg", json!({"url": r3.url("/")})).await,
        delete(&d, "/v1/subscriptions/cfg").await,
        post(&d, "/v1/subscriptions/cfg/rotate", json!({})).await,
    ] {
        assert_error(&got, 409, "conflict", "change to a config subscription");
    }

    // Replacing the definition keeps the secret.
    let updated = ok(
        put(
            &d,
            "/v1/subscriptions/api",
            json!({"url": r3.url("/new"), "event_types": ["*"]}),
        )
        .await,
        "put",
    );
    assert_eq!(updated["url"], r3.url("/new"));
    assert_error(
        &put(
            &d,
            "/v1/subscriptions/api",
            json!({"id": "other", "url": r3.url("/")}),
        )
        .await,
        400,
        "invalid_subscription",
        "id change",
    );
    assert_error(
        &put(&d, "/v1/subscriptions/nope", json!({"url": r3.url("/")})).await,
        404,
        "not_found",
        "unknown id",
    );
    let ev2 = publish(&d, "user.signup", json!({})).await;
    assert_eq!(ev2["deliveries"], 1);
    let got = r3.wait_for(1, WAIT).await;
    let sig = got[0].header("webhook-signature").unwrap_or_default();
    let ts = got[0].header("webhook-timestamp").unwrap_or_default();
    assert!(verify_signature(
        &secret,
        &str_of(&ev2, "id"),
        ts,
        &got[0].body,
        sig
    ));
    assert_eq!(r2.received().len(), 1);

    // Stored: a restart keeps it.
    let keep = d.keep_dir();
    d.terminate();
    let d = b.start_in(&d.dir, &text);
    let _keep = keep;
    let after = ok(get(&d, "/v1/subscriptions/api").await, "after restart");
    assert_eq!(after["url"], r3.url("/new"));
    let ev3 = publish(&d, "user.signup", json!({})).await;
    assert_eq!(ev3["deliveries"], 1);
    r3.wait_for(2, WAIT).await;

    // Deleting cancels what it still had to deliver.
    ok(post_empty(&d, "/v1/subscriptions/api/pause").await, "pause");
    let held = publish(&d, "user.signup", json!({})).await;
    let pending = wait_count(&d, "subscription=api&status=pending", 1).await;
    assert_eq!(pending[0]["event_id"], held["id"]);
    let del = ok(delete(&d, "/v1/subscriptions/api").await, "delete");
    assert_eq!(del["cancelled_deliveries"], 1);
    let gone = get(&d, "/v1/subscriptions/api").await;
    assert_error(&gone, 404, "not_found", "deleted");
    assert_error(
        &delete(&d, "/v1/subscriptions/api").await,
        404,
        "not_found",
        "twice",
    );
    let cancelled = wait_count(&d, "subscription=api&status=cancelled", 1).await;
    assert!(str_of(&cancelled[0], "last_error").contains("deleted"));
    let ev4 = publish(&d, "user.signup", json!({})).await;
    assert_eq!(ev4["deliveries"], 0);
}

async fn pause_holds_deliveries_across_restarts_and_resume_sends_them(b: Backend) {
    let rp = Receiver::start().await;
    let rq = Receiver::start().await;
    let text = config(
        "",
        &format!(
            "{}{}",
            sub("p", &rp.url("/"), ""),
            sub("q", &rq.url("/"), "")
        ),
    );
    let mut d = b.start(&text);

    // An attempt in flight when the pause comes finishes and is recorded.
    rp.script([Reply::Delay(Duration::from_millis(800), 200)]);
    let first = publish(&d, "a", json!({})).await;
    rp.wait_for(1, WAIT).await;
    let paused = ok(post_empty(&d, "/v1/subscriptions/p/pause").await, "pause");
    assert_eq!(paused["paused"], true);
    assert_eq!(paused["state_reason"], "paused");
    let done = wait_count(&d, "subscription=p&status=succeeded", 1).await;
    assert_eq!(done[0]["event_id"], first["id"]);
    assert_eq!(done[0]["attempts"], 1);

    let mut held = BTreeSet::new();
    for i in 0..3 {
        let ev = publish(&d, "a", json!({"i": i})).await;
        assert_eq!(
            ev["deliveries"], 2,
            "a paused subscription still gets its deliveries"
        );
        held.insert(str_of(&ev, "id"));
    }
    rq.wait_for(4, WAIT).await;
    let pending = wait_count(&d, "subscription=p&status=pending", 3).await;
    assert!(pending.iter().all(|x| x["attempts"] == 0));
    assert_eq!(rp.received().len(), 1);

    let keep = d.keep_dir();
    d.terminate();
    let d = b.start_in(&d.dir, &text);
    let _keep = keep;
    let shown = ok(get(&d, "/v1/subscriptions/p").await, "after restart");
    assert_eq!(shown["paused"], true, "{shown}");
    let ev = publish(&d, "a", json!({"i": 3})).await;
    held.insert(str_of(&ev, "id"));
    rq.wait_for(5, WAIT).await;
    wait_count(&d, "subscription=p&status=pending", 4).await;
    assert_eq!(rp.received().len(), 1);

    let resumed = ok(post_empty(&d, "/v1/subscriptions/p/resume").await, "resume");
    assert_eq!(resumed["paused"], false);
    assert_eq!(resumed["enabled"], true);
    wait_count(&d, "subscription=p&status=succeeded", 5).await;
    let got: BTreeSet<String> = ids_received(&rp).into_iter().skip(1).collect();
    assert_eq!(got, held);
    assert_eq!(rp.received().len(), 5, "each held delivery is sent once");
    assert_error(
        &post_empty(&d, "/v1/subscriptions/nope/pause").await,
        404,
        "not_found",
        "unknown",
    );
}

async fn rotation_signs_with_both_secrets_until_the_grace_period_ends(b: Backend) {
    let rx = Receiver::start().await;
    let d = b.start(&config("", ""));
    let (s, c) = post(
        &d,
        "/v1/subscriptions",
        json!({"id": "r", "url": rx.url("/"), "secrets": [SECRET]}),
    )
    .await;
    assert_eq!(s, 201, "{c}");
    assert!(c["secret"].is_null(), "a given secret is not echoed");
    let r = ok(
        post(
            &d,
            "/v1/subscriptions/r/rotate",
            json!({"secret": SECRET2, "grace": "2s"}),
        )
        .await,
        "rotate",
    );
    assert_eq!(r["secret"], SECRET2);
    let secrets = r["subscription"]["secrets"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(secrets.len(), 2, "{r}");
    assert!(secrets[0]["expires_at"].is_null());
    assert!(secrets[1]["expires_at"].is_string());

    let ev = publish(&d, "a", json!({})).await;
    let got = rx.wait_for(1, WAIT).await;
    let sig = got[0].header("webhook-signature").unwrap_or_default();
    let ts = got[0].header("webhook-timestamp").unwrap_or_default();
    assert_eq!(sig.split(' ').count(), 2, "{sig}");
    assert!(verify_signature(
        SECRET,
        &str_of(&ev, "id"),
        ts,
        &got[0].body,
        sig
    ));
    assert!(verify_signature(
        SECRET2,
        &str_of(&ev, "id"),
        ts,
        &got[0].body,
        sig
    ));

    eventually("the old secret to expire", || async {
        let s = ok(get(&d, "/v1/subscriptions/r").await, "show");
        (s["secrets"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await;
    let ev = publish(&d, "a", json!({})).await;
    let got = rx.wait_for(2, WAIT).await;
    let sig = got[1].header("webhook-signature").unwrap_or_default();
    let ts = got[1].header("webhook-timestamp").unwrap_or_default();
    assert_eq!(sig.split(' ').count(), 1, "{sig}");
    assert!(verify_signature(
        SECRET2,
        &str_of(&ev, "id"),
        ts,
        &got[1].body,
        sig
    ));
    assert!(!verify_signature(
        SECRET,
        &str_of(&ev, "id"),
        ts,
        &got[1].body,
        sig
    ));

    let generated = ok(
        post_empty(&d, "/v1/subscriptions/r/rotate").await,
        "generated",
    );
    assert!(str_of(&generated, "secret").starts_with("whsec_"));
    assert_error(
        &post(&d, "/v1/subscriptions/r/rotate", json!({"secret": "nope"})).await,
        400,
        "invalid_subscription",
        "bad secret",
    );
    assert_error(
        &post(
            &d,
            "/v1/subscriptions/r/rotate",
            json!({"grace": "a while"}),
        )
        .await,
        400,
        "invalid_body",
        "bad grace",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_filters_decide_fan_out() {
    let rx = Receiver::start().await;
    let d = Daemon::start(&config(
        "",
        &sub(
            "f",
            &rx.url("/"),
            "filter = { all = [ { field = \"total\", gte = 100 }, { field = \"country\", in = [\"DE\", \"FR\"] } ] }",
        ),
    ));
    let shown = ok(get(&d, "/v1/subscriptions/f").await, "show");
    assert_eq!(
        shown["filter"]["all"][0],
        json!({"field": "total", "gte": 100})
    );
    let yes = publish(&d, "order.created", json!({"total": 150, "country": "DE"})).await;
    assert_eq!(yes["deliveries"], 1);
    for data in [
        json!({"total": 50, "country": "DE"}),
        json!({"total": 150, "country": "US"}),
        json!({"total": "150", "country": "FR"}),
        json!([1, 2]),
    ] {
        let no = publish(&d, "order.created", data.clone()).await;
        assert_eq!(no["deliveries"], 0, "{data}");
    }
    let got = rx.wait_for(1, WAIT).await;
    assert_eq!(got[0].header("webhook-id"), yes["id"].as_str());

    // A filter that cannot parse is refused at config load with its position.
    let dir = match tempfile::tempdir() {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    let file = dir.path().join("bad.toml");
    let bad = format!(
        "[[subscriptions]]\nid = \"f\"\nurl = \"http://127.0.0.1:9/\"\nsecrets = [\"{SECRET}\"]\nfilter = {{ all = [ {{ field = \"total\", gte = 100 }}, {{ field = \"total\", lt = \"x\" }} ] }}\n"
    );
    if let Err(e) = std::fs::write(&file, bad) {
        panic!("{e}");
    }
    let out = cli(&["check-config", &file.display().to_string()]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("subscriptions[0].filter.all[1].lt"), "{err}");
    assert!(err.contains("must be a number"), "{err}");
    assert!(err.contains("bad.toml:1"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// reload

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_a_valid_config_and_refuses_an_invalid_one() {
    let ra = Receiver::start().await;
    let ra2 = Receiver::start().await;
    let ra3 = Receiver::start().await;
    let rb = Receiver::start().await;
    let d = Daemon::start(&config("", &sub("a", &ra.url("/"), "")));
    let file = d.dir.join("dispatchd.toml");
    let write = |text: String| {
        if let Err(e) = std::fs::write(&file, text) {
            panic!("write config: {e}");
        }
    };

    // An inbound webhook with a signature nobody could have made: 404 while the source is
    // unknown, 401 once a reload brought it in.
    let ingest = || async {
        d.send(
            d.http
                .post(d.url("/v1/ingest/gh"))
                .header("X-Hub-Signature-256", format!("sha256={}", "0".repeat(64)))
                .header("X-GitHub-Event", "ping")
                .header("X-GitHub-Delivery", "d-1")
                .body("{}"),
        )
        .await
        .0
    };
    assert_eq!(ingest().await, 404);

    // Valid: a changes its URL, b appears, and a source.
    write(config(
        "",
        &format!(
            "{}{}[[sources]]\nid = \"gh\"\nscheme = \"github\"\nsecrets = [\"gh-secret-000001\"]\n",
            sub("a", &ra2.url("/"), ""),
            sub("b", &rb.url("/"), "")
        ),
    ));
    let r = ok(post_empty(&d, "/v1/admin/reload").await, "reload");
    assert_eq!(r["added"], json!(["b"]));
    assert_eq!(r["changed"], json!(["a"]));
    assert_eq!(r["subscriptions"], 2);
    assert_eq!(r["sources"], 1);
    assert_eq!(ingest().await, 401);
    let ev = publish(&d, "x", json!({})).await;
    assert_eq!(ev["deliveries"], 2);
    ra2.wait_for(1, WAIT).await;
    rb.wait_for(1, WAIT).await;
    assert!(ra.received().is_empty());

    // Invalid (syntax, then semantics): 400 with every problem, the old config stays.
    write(config(
        "",
        &format!("{}[[subscriptions]\n", sub("a", &ra3.url("/"), "")),
    ));
    let bad = post_empty(&d, "/v1/admin/reload").await;
    assert_error(&bad, 400, "invalid_config", "syntax error");
    assert!(
        bad.1["error"]["errors"]
            .as_array()
            .is_some_and(|e| !e.is_empty()),
        "{}",
        bad.1
    );
    write(config(
        "",
        &sub(
            "a",
            &ra3.url("/"),
            "filter = { field = \"x\", gte = \"y\" }",
        ),
    ));
    let bad = post_empty(&d, "/v1/admin/reload").await;
    assert_error(&bad, 400, "invalid_config", "bad filter");
    let m = bad.1["error"]["message"].as_str().unwrap_or_default();
    assert!(m.contains("subscriptions[0].filter.gte"), "{m}");
    let subs = ok(get(&d, "/v1/subscriptions").await, "list");
    let ids: Vec<String> = items(&subs).iter().map(|s| str_of(s, "id")).collect();
    assert_eq!(ids, vec!["a", "b"]);
    let ev = publish(&d, "x", json!({})).await;
    assert_eq!(ev["deliveries"], 2);
    ra2.wait_for(2, WAIT).await;
    assert!(ra3.received().is_empty());

    // An attempt in flight during a reload that changes its subscription finishes on the old
    // definition and is not repeated on the new one.
    ra2.script([Reply::Delay(Duration::from_millis(800), 200)]);
    let slow = publish(&d, "x", json!({"slow": true})).await;
    ra2.wait_for(3, WAIT).await;
    write(config(
        "",
        &format!(
            "{}{}",
            sub("a", &ra3.url("/"), ""),
            sub("b", &rb.url("/"), "")
        ),
    ));
    let r = ok(post_empty(&d, "/v1/admin/reload").await, "reload in flight");
    assert_eq!(r["changed"], json!(["a"]));
    let done = eventually("the in-flight delivery to succeed", || async {
        let all = all_deliveries(&d, "subscription=a&status=succeeded").await;
        all.into_iter().find(|x| x["event_id"] == slow["id"])
    })
    .await;
    assert_eq!(done["attempts"], 1);
    let next = publish(&d, "x", json!({})).await;
    ra3.wait_for(1, WAIT).await;
    assert_eq!(ids_received(&ra3), vec![str_of(&next, "id")]);

    assert_eq!(ingest().await, 404, "the source left with the reload");

    // SIGHUP: the same, without HTTP.
    write(config("", &sub("a", &ra3.url("/"), "")));
    support::signal(d.pid(), "HUP");
    eventually("SIGHUP to remove b", || async {
        let subs = ok(get(&d, "/v1/subscriptions").await, "list");
        (items(&subs).len() == 1).then_some(())
    })
    .await;
    write("[[subscriptions]]\nid = 1\n".into());
    support::signal(d.pid(), "HUP");
    eventually("the refused reload to be logged", || async {
        d.logs().contains("reload refused").then_some(())
    })
    .await;
    let subs = ok(get(&d, "/v1/subscriptions").await, "list");
    assert_eq!(items(&subs).len(), 1);
    let ev = publish(&d, "x", json!({})).await;
    assert_eq!(ev["deliveries"], 1);
    ra3.wait_for(2, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_token_changes_at_once_over_http_and_sighup() {
    const NEW_ADMIN: &str = "admin-token-after-reload-1";
    const THIRD: &str = "admin-token-after-sighup-2";
    let d = Daemon::start(&config("", ""));
    let file = d.dir.join("dispatchd.toml");
    let status_with = |token: &'static str| {
        let d = &d;
        async move {
            d.send(d.http.get(d.url("/v1/subscriptions")).bearer_auth(token))
                .await
                .0
        }
    };
    let publish_with = |token: &'static str| {
        let d = &d;
        async move {
            d.send(
                d.http
                    .post(d.url("/v1/events"))
                    .bearer_auth(token)
                    .header("content-type", "application/json")
                    .body(r#"{"type":"a","data":{}}"#),
            )
            .await
        }
    };
    assert_eq!(status_with(PUBLISH).await, 403);
    assert_eq!(status_with(NEW_ADMIN).await, 401);

    // Over HTTP: the publish token goes, a new admin token comes, retention changes (which
    // only a restart applies, and the answer says so).
    let text = format!(
        "[auth]\ntokens = [\n  {{ token = \"{ADMIN}\", scopes = [\"admin\"] }},\n  {{ token = \"{NEW_ADMIN}\", scopes = [\"admin\"] }},\n]\n\n[storage]\nretention = \"3d\"\n\n[delivery]\nallow_private_networks = true\n"
    );
    std::fs::write(&file, text).unwrap();
    let r = ok(post_empty(&d, "/v1/admin/reload").await, "reload");
    assert_eq!(r["tokens"], 2, "{r}");
    assert_eq!(r["restart_needed"], json!(["storage.retention"]), "{r}");
    assert_eq!(status_with(NEW_ADMIN).await, 200);
    let published = publish_with(PUBLISH).await;
    assert_eq!(
        published.0, 401,
        "a removed token is refused: {}",
        published.1
    );
    // Still not in force, so still named: the answer compares with the start, not with the
    // last reload.
    let r = ok(post_empty(&d, "/v1/admin/reload").await, "reload");
    assert_eq!(r["restart_needed"], json!(["storage.retention"]), "{r}");

    // SIGHUP: the old admin token goes, the new one may only publish now, a third comes.
    let text = format!(
        "[auth]\ntokens = [\n  {{ token = \"{NEW_ADMIN}\", scopes = [\"publish\"] }},\n  {{ token = \"{THIRD}\", scopes = [\"admin\"] }},\n]\n\n[delivery]\nallow_private_networks = true\n"
    );
    std::fs::write(&file, text).unwrap();
    support::signal(d.pid(), "HUP");
    eventually("SIGHUP to remove the old admin token", || async {
        (status_with(ADMIN).await == 401).then_some(())
    })
    .await;
    assert_eq!(status_with(THIRD).await, 200);
    assert_eq!(
        status_with(NEW_ADMIN).await,
        403,
        "its scope is publish now"
    );
    let published = publish_with(NEW_ADMIN).await;
    assert_eq!(published.0, 202, "{}", published.1);
}

crate::both!(
    delivery_list_filters_by_status_subscription_type_and_time,
    pagination_returns_every_row_exactly_once_while_events_arrive,
    retry_and_cancel_single_deliveries,
    redrive_delivers_dead_letters_once_the_receiver_recovers,
    replay_by_time_range_makes_exactly_the_expected_deliveries,
    subscriptions_over_the_api,
    pause_holds_deliveries_across_restarts_and_resume_sends_them,
    rotation_signs_with_both_secrets_until_the_grace_period_ends,
);

//! Publishing and reading events: the durable event log and its ingest API.

use crate::support::backend::Backend;
use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{self, Daemon};

/// Upper bound on any single wait in these tests (task joins, process exits, signals).
const WAIT: Duration = Duration::from_secs(120);

const PUBLISH_TOKEN: &str = "publish-token-aaaaaaaa";
const ADMIN_TOKEN: &str = "admin-token-bbbbbbbbbbb";

const AUTH_CONFIG: &str = r#"
[auth]
tokens = [
  { token = "publish-token-aaaaaaaa", scopes = ["publish"] },
  { token = "admin-token-bbbbbbbbbbb", scopes = ["admin"] },
]
"#;

// ---------------------------------------------------------------------------------------------
// helpers

/// Percent-encodes a query or path component.
fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[track_caller]
fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    match v[key].as_str() {
        Some(s) => s,
        None => panic!("no string {key:?} in {v}"),
    }
}

#[track_caller]
fn u64_of(v: &Value, key: &str) -> u64 {
    match v[key].as_u64() {
        Some(n) => n,
        None => panic!("no number {key:?} in {v}"),
    }
}

/// Asserts a 4xx answer with the `{"error": {"code", "message"}}` body.
#[track_caller]
fn assert_error(what: &str, got: &(u16, Value), status: u16, code: &str) {
    let (s, body) = got;
    assert_eq!(*s, status, "{what}: wrong status; body {body}");
    assert_eq!(
        body["error"]["code"], code,
        "{what}: wrong code; body {body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: no error message; body {body}"
    );
}

/// A request with an optional bearer token.
async fn get_as(d: &Daemon, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = d.http.get(d.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    d.send(req).await
}

async fn post_as(d: &Daemon, path: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
    let mut req = d
        .http
        .post(d.url(path))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    d.send(req).await
}

/// One page of `GET /v1/events?{query}`: its items and next cursor.
async fn list_page(d: &Daemon, token: Option<&str>, query: &str) -> (Vec<Value>, Option<String>) {
    let (status, body) = get_as(d, &format!("/v1/events?{query}"), token).await;
    assert_eq!(status, 200, "list ?{query}: {body}");
    let Some(items) = body["items"].as_array() else {
        panic!("list ?{query}: no items array in {body}");
    };
    let next = match &body["next_cursor"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => panic!("list ?{query}: next_cursor is {other}"),
    };
    (items.clone(), next)
}

/// Every event matching `query`, following cursors to the end.
async fn list_all_as(d: &Daemon, token: Option<&str>, query: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let mut q = String::from("limit=1000");
        if !query.is_empty() {
            q.push('&');
            q.push_str(query);
        }
        if let Some(c) = &cursor {
            q.push_str("&cursor=");
            q.push_str(&enc(c));
        }
        let (items, next) = list_page(d, token, &q).await;
        out.extend(items);
        match next {
            None => return out,
            Some(c) => cursor = Some(c),
        }
    }
    panic!("the event list did not end after 10000 pages");
}

async fn list_all(d: &Daemon, query: &str) -> Vec<Value> {
    list_all_as(d, None, query).await
}

fn ids(items: &[Value]) -> Vec<String> {
    items.iter().map(|e| str_of(e, "id").to_string()).collect()
}

fn seqs(items: &[Value]) -> Vec<u64> {
    items.iter().map(|e| u64_of(e, "seq")).collect()
}

#[track_caller]
fn assert_strictly_increasing(what: &str, v: &[u64]) {
    assert!(
        v.windows(2).all(|w| w[0] < w[1]),
        "{what}: not strictly increasing: {v:?}"
    );
}

async fn metrics_text(d: &Daemon) -> String {
    let resp = match d.http.get(d.url("/metrics")).send().await {
        Ok(r) => r,
        Err(e) => panic!("GET /metrics: {e}"),
    };
    assert_eq!(resp.status().as_u16(), 200, "GET /metrics");
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("text/plain"), "metrics content-type {ct:?}");
    match resp.text().await {
        Ok(t) => t,
        Err(e) => panic!("GET /metrics body: {e}"),
    }
}

/// The value of one exact series (`name` or `name{labels}`) in Prometheus text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Posts one event from a plain client; Ok(id) on 202, Err(description) otherwise.
async fn publish_with(http: &reqwest::Client, url: &str, body: &Value) -> Result<String, String> {
    let resp = http
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| format!("request error: {e}"))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| format!("status {status}, body error: {e}"))?;
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if status == 202 && v["duplicate"] == json!(false) {
        match v["id"].as_str() {
            Some(id) => Ok(id.to_string()),
            None => Err(format!("202 without an id: {v}")),
        }
    } else {
        Err(format!("status {status}: {v}"))
    }
}

/// Checks that every id is readable and returns the ids that are not.
async fn missing_ids(d: &Daemon, all: &[String]) -> Vec<String> {
    let mut tasks = Vec::new();
    for chunk in all.chunks(all.len().div_ceil(16).max(1)) {
        let chunk = chunk.to_vec();
        let http = d.http.clone();
        let base = d.url("/v1/events/");
        tasks.push(tokio::spawn(async move {
            let mut missing = Vec::new();
            for id in chunk {
                let ok = match http.get(format!("{base}{}", enc(&id))).send().await {
                    Ok(r) if r.status().as_u16() == 200 => match r.bytes().await {
                        Ok(b) => serde_json::from_slice::<Value>(&b)
                            .is_ok_and(|v| v["id"].as_str() == Some(id.as_str())),
                        Err(_) => false,
                    },
                    _ => false,
                };
                if !ok {
                    missing.push(id);
                }
            }
            missing
        }));
    }
    let mut missing = Vec::new();
    for t in tasks {
        match tokio::time::timeout(WAIT, t).await {
            Ok(Ok(m)) => missing.extend(m),
            Ok(Err(e)) => panic!("read-back task failed: {e}"),
            Err(_) => panic!("read-back task did not finish in {WAIT:?}"),
        }
    }
    missing
}

// ---------------------------------------------------------------------------------------------
// publish and read back

async fn publish_then_read_back(b: Backend) {
    let d = b.start("");
    let r = d.publish("order.created", json!({"n": 1})).await;
    let id = r["id"].as_str().unwrap_or_default().to_string();
    assert!(id.starts_with("evt_"), "{r}");
    let (status, ev) = d.get(&format!("/v1/events/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(ev["type"], "order.created");
    assert_eq!(ev["data"], json!({"n": 1}));
}

async fn publish_keeps_fields_and_given_id(b: Backend) {
    let d = b.start("");
    let data = json!({"order": {"id": 42, "lines": [1, 2.5, "x", null, true]}, "note": "é✓"});
    let (status, r) = d
        .post(
            "/v1/events",
            &json!({"id": "ord-42", "type": "order.paid", "source": "shop", "data": data}),
        )
        .await;
    assert_eq!(status, 202, "{r}");
    assert_eq!(r["id"], "ord-42", "a given id is kept: {r}");
    assert_eq!(r["duplicate"], false, "{r}");
    let seq = u64_of(&r, "seq");

    let (status, ev) = d.get("/v1/events/ord-42").await;
    assert_eq!(status, 200, "{ev}");
    assert_eq!(ev["id"], "ord-42", "{ev}");
    assert_eq!(ev["type"], "order.paid", "{ev}");
    assert_eq!(ev["source"], "shop", "{ev}");
    assert_eq!(ev["data"], data, "{ev}");
    assert_eq!(u64_of(&ev, "seq"), seq, "{ev}");
    assert!(
        ev["received_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.contains('T')),
        "received_at is RFC 3339: {ev}"
    );

    // Without an id, one is generated; without a source, none is shown; scalar data is fine.
    let (status, r2) = d
        .post("/v1/events", &json!({"type": "ping", "data": null}))
        .await;
    assert_eq!(status, 202, "{r2}");
    let id2 = str_of(&r2, "id");
    assert!(id2.starts_with("evt_") && id2.len() > 4, "{r2}");
    assert!(u64_of(&r2, "seq") > seq, "seqs increase: {r} then {r2}");
    let (status, ev2) = d.get(&format!("/v1/events/{}", enc(id2))).await;
    assert_eq!(status, 200, "{ev2}");
    assert_eq!(ev2["type"], "ping", "{ev2}");
    assert_eq!(ev2["source"], Value::Null, "{ev2}");
    assert_eq!(ev2["data"], Value::Null, "{ev2}");
    assert_eq!(list_all(&d, "").await.len(), 2);
}

// ---------------------------------------------------------------------------------------------
// duplicates

async fn duplicate_id_returns_the_original(b: Backend) {
    let d = b.start("");
    let (s1, r1) = d
        .post(
            "/v1/events",
            &json!({"id": "dup-1", "type": "a.b", "data": {"v": "original"}}),
        )
        .await;
    assert_eq!(s1, 202, "{r1}");
    let (s2, r2) = d
        .post(
            "/v1/events",
            &json!({"id": "dup-1", "type": "other.type", "source": "x", "data": {"v": "changed"}}),
        )
        .await;
    assert_eq!(s2, 200, "a repeat is 200: {r2}");
    assert_eq!(r2["duplicate"], true, "{r2}");
    assert_eq!(r2["id"], "dup-1", "{r2}");
    assert_eq!(r2["seq"], r1["seq"], "same seq: {r1} vs {r2}");
    assert_eq!(r2["event"]["id"], "dup-1", "{r2}");
    assert_eq!(r2["event"]["type"], "a.b", "the original event: {r2}");
    assert_eq!(r2["event"]["data"], json!({"v": "original"}), "{r2}");
    assert_eq!(r2["event"]["seq"], r1["seq"], "{r2}");

    let (status, ev) = d.get("/v1/events/dup-1").await;
    assert_eq!(status, 200, "{ev}");
    assert_eq!(
        ev["data"],
        json!({"v": "original"}),
        "stored data unchanged: {ev}"
    );
    assert_eq!(ev["type"], "a.b", "{ev}");
    let all = list_all(&d, "").await;
    assert_eq!(ids(&all), vec!["dup-1"], "only one event stored: {all:?}");
}

async fn duplicate_idempotency_key_returns_the_original(b: Backend) {
    let d = b.start("");
    let send = |key: &'static str, body: Value| {
        d.send(
            d.http
                .post(d.url("/v1/events"))
                .header("content-type", "application/json")
                .header("Idempotency-Key", key)
                .body(body.to_string()),
        )
    };
    let (s1, r1) = send(
        "key-0001",
        json!({"type": "order.created", "data": {"n": 1}}),
    )
    .await;
    assert_eq!(s1, 202, "{r1}");
    let id1 = str_of(&r1, "id").to_string();
    assert!(id1.starts_with("evt_"), "{r1}");

    let (s2, r2) = send(
        "key-0001",
        json!({"type": "order.updated", "data": {"n": 2}}),
    )
    .await;
    assert_eq!(s2, 200, "{r2}");
    assert_eq!(r2["duplicate"], true, "{r2}");
    assert_eq!(r2["id"], id1.as_str(), "the original id: {r2}");
    assert_eq!(r2["seq"], r1["seq"], "{r2}");
    assert_eq!(r2["event"]["data"], json!({"n": 1}), "original data: {r2}");
    assert_eq!(r2["event"]["type"], "order.created", "{r2}");
    assert_eq!(r2["event"]["idempotency_key"], "key-0001", "{r2}");

    // A repeat key wins over a new explicit id too.
    let (s3, r3) = send(
        "key-0001",
        json!({"id": "fresh-id", "type": "order.created", "data": {"n": 3}}),
    )
    .await;
    assert_eq!(s3, 200, "{r3}");
    assert_eq!(r3["id"], id1.as_str(), "{r3}");
    let (s, body) = d.get("/v1/events/fresh-id").await;
    assert_eq!(s, 404, "the repeat stored nothing under its own id: {body}");

    let all = list_all(&d, "").await;
    assert_eq!(ids(&all), vec![id1.clone()], "one event: {all:?}");

    // Another key is another event.
    let (s4, r4) = send(
        "key-0002",
        json!({"type": "order.created", "data": {"n": 1}}),
    )
    .await;
    assert_eq!(s4, 202, "{r4}");
    assert_ne!(r4["id"], id1.as_str(), "{r4}");
    assert_eq!(list_all(&d, "").await.len(), 2);
}

async fn duplicates_inside_one_batch(b: Backend) {
    let d = b.start("");
    let (status, r) = d
        .post(
            "/v1/events/batch",
            &json!({"events": [
                {"id": "b-1", "type": "t", "data": {"v": 1}},
                {"id": "b-2", "type": "t", "data": {"v": 2}},
                {"id": "b-1", "type": "t", "data": {"v": "again"}},
                {"type": "t", "data": {"v": 3}, "idempotency_key": "ik-1"},
                {"type": "t", "data": {"v": 4}, "idempotency_key": "ik-1"},
            ]}),
        )
        .await;
    assert_eq!(status, 202, "{r}");
    let Some(items) = r["items"].as_array() else {
        panic!("no items: {r}");
    };
    assert_eq!(items.len(), 5, "{r}");
    let dup: Vec<_> = items.iter().map(|i| i["duplicate"].clone()).collect();
    assert_eq!(
        dup,
        vec![
            json!(false),
            json!(false),
            json!(true),
            json!(false),
            json!(true)
        ],
        "{r}"
    );
    assert_eq!(items[2]["seq"], items[0]["seq"], "{r}");
    assert_eq!(items[2]["id"], "b-1", "{r}");
    assert_eq!(items[2]["event"]["data"], json!({"v": 1}), "{r}");
    assert_eq!(items[4]["seq"], items[3]["seq"], "{r}");
    assert_eq!(items[4]["id"], items[3]["id"], "{r}");
    assert_eq!(items[4]["event"]["data"], json!({"v": 3}), "{r}");

    let all = list_all(&d, "").await;
    assert_eq!(all.len(), 3, "three distinct events: {all:?}");
    let stored_ids: HashSet<_> = ids(&all).into_iter().collect();
    assert_eq!(stored_ids.len(), 3, "{all:?}");

    // A batch made only of repeats stores nothing and is 200.
    let (status, r) = d
        .post(
            "/v1/events/batch",
            &json!({"events": [
                {"id": "b-2", "type": "t", "data": 0},
                {"id": "b-1", "type": "t", "data": 0},
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["items"][0]["duplicate"], true, "{r}");
    assert_eq!(r["items"][1]["duplicate"], true, "{r}");
    assert_eq!(list_all(&d, "").await.len(), 3);

    // And a single publish of an id first seen in a batch is a repeat too.
    let (status, r) = d
        .post("/v1/events", &json!({"id": "b-2", "type": "t", "data": 9}))
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["event"]["data"], json!({"v": 2}), "{r}");
}

// ---------------------------------------------------------------------------------------------
// batches

async fn batch_publishes_in_order(b: Backend) {
    let d = b.start("[server]\nmax_batch = 5\n");
    d.publish("before", json!(0)).await;
    let events: Vec<Value> = (0..5)
        .map(|i| json!({"id": format!("batch-{i}"), "type": format!("t{i}"), "source": "src", "data": {"i": i}}))
        .collect();
    let (status, r) = d
        .post("/v1/events/batch", &json!({ "events": events }))
        .await;
    assert_eq!(status, 202, "{r}");
    let Some(items) = r["items"].as_array() else {
        panic!("no items: {r}");
    };
    assert_eq!(items.len(), 5, "one result per event: {r}");
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["id"], format!("batch-{i}"), "result {i} in order: {r}");
        assert_eq!(item["duplicate"], false, "{r}");
    }
    let s = seqs(items);
    assert_strictly_increasing("batch seqs", &s);
    for (i, item) in items.iter().enumerate() {
        let (status, ev) = d.get(&format!("/v1/events/batch-{i}")).await;
        assert_eq!(status, 200, "{ev}");
        assert_eq!(ev["type"], format!("t{i}"), "{ev}");
        assert_eq!(ev["data"], json!({"i": i}), "{ev}");
        assert_eq!(ev["seq"], item["seq"], "{ev}");
    }
    let all = list_all(&d, "").await;
    assert_eq!(all.len(), 6, "{all:?}");
    assert_eq!(seqs(&all[1..]), s, "the list shows the batch in seq order");
}

async fn batch_with_an_invalid_item_stores_nothing(b: Backend) {
    let d = b.start("[server]\nmax_batch = 5\n");
    d.publish("before", json!(0)).await;
    let good = |i: usize| json!({"id": format!("good-{i}"), "type": "ok", "data": i});
    let bad_items = [
        json!({"type": "has space", "data": 1}),
        json!({"id": "", "type": "ok", "data": 1}),
        json!({"id": "x".repeat(200), "type": "ok", "data": 1}),
        json!({"type": "ok", "source": "bad source", "data": 1}),
    ];
    for bad in &bad_items {
        for pos in [0usize, 2, 4] {
            let mut events: Vec<Value> = (0..5).map(good).collect();
            events[pos] = bad.clone();
            let got = d
                .post("/v1/events/batch", &json!({ "events": events }))
                .await;
            assert_error(
                &format!("bad item {bad} at {pos}"),
                &got,
                400,
                "invalid_event",
            );
            let msg = got.1["error"]["message"].as_str().unwrap_or("");
            assert!(
                msg.contains(&format!("events[{pos}]")),
                "the message names events[{pos}]: {}",
                got.1
            );
        }
    }
    // Items of the wrong shape are refused as a whole as well.
    for bad in [
        json!({"data": 1}),
        json!({"type": "ok"}),
        json!({"type": "ok", "data": 1, "extra": true}),
        json!({"type": 7, "data": 1}),
    ] {
        let events = vec![good(0), good(1), bad.clone()];
        let got = d
            .post("/v1/events/batch", &json!({ "events": events }))
            .await;
        assert_error(
            &format!("item of the wrong shape {bad}"),
            &got,
            400,
            "invalid_body",
        );
    }

    let all = list_all(&d, "").await;
    assert_eq!(all.len(), 1, "nothing from the refused batches: {all:?}");
    for i in 0..5 {
        let (status, body) = d.get(&format!("/v1/events/good-{i}")).await;
        assert_eq!(status, 404, "good-{i} was not stored: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn batch_shape_error_names_the_item() {
    let d = Daemon::start("");
    for (pos, bad) in [
        (2usize, json!({"data": 1})),
        (1, json!({"type": "ok"})),
        (0, json!({"type": "ok", "data": 1, "extra": true})),
    ] {
        let mut events: Vec<Value> = (0..3).map(|i| json!({"type": "ok", "data": i})).collect();
        events[pos] = bad;
        let got = d
            .post("/v1/events/batch", &json!({ "events": events }))
            .await;
        assert_eq!(got.0, 400, "{}", got.1);
        let msg = got.1["error"]["message"].as_str().unwrap_or("");
        assert!(
            msg.contains(&format!("events[{pos}]")),
            "the message should name events[{pos}]: {}",
            got.1
        );
    }
    assert!(list_all(&d, "").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_oversized_batches_are_refused() {
    let d = Daemon::start("[server]\nmax_batch = 3\n");
    d.publish("before", json!(0)).await;
    let got = d.post("/v1/events/batch", &json!({"events": []})).await;
    assert_error("empty batch", &got, 400, "invalid_batch");
    let four: Vec<Value> = (0..4).map(|i| json!({"type": "t", "data": i})).collect();
    let got = d.post("/v1/events/batch", &json!({ "events": four })).await;
    assert_error("4 events over max_batch 3", &got, 400, "invalid_batch");
    let got = d.post("/v1/events/batch", &json!({})).await;
    assert_error("no events member", &got, 400, "invalid_body");
    let got = d
        .post("/v1/events/batch", &json!({"events": {"type": "t"}}))
        .await;
    assert_error("events not an array", &got, 400, "invalid_body");
    let got = d
        .post("/v1/events/batch", &json!([{"type": "t", "data": 1}]))
        .await;
    assert_error("a bare array", &got, 400, "invalid_body");
    // Arrays with the fields in order, for the batch or for an item, are not objects.
    let got = d
        .post("/v1/events/batch", &json!([[{"type": "t", "data": 1}]]))
        .await;
    assert_error("the batch as an array", &got, 400, "invalid_body");
    let got = d
        .post(
            "/v1/events/batch",
            &json!({"events": [[null, "t", null, 1, null]]}),
        )
        .await;
    assert_error("an item as an array", &got, 400, "invalid_body");
    assert_eq!(list_all(&d, "").await.len(), 1, "nothing stored");

    // Exactly max_batch is fine.
    let three: Vec<Value> = (0..3).map(|i| json!({"type": "t", "data": i})).collect();
    let (status, r) = d
        .post("/v1/events/batch", &json!({ "events": three }))
        .await;
    assert_eq!(status, 202, "{r}");
    assert_eq!(list_all(&d, "").await.len(), 4);
}

// ---------------------------------------------------------------------------------------------
// bad input

async fn bad_input_gets_a_json_4xx_and_changes_nothing(b: Backend) {
    let d = b.start("[server]\nmax_body = \"2KiB\"\n");
    d.publish("seed", json!({"n": 1})).await;
    let before = list_all(&d, "").await;
    let stored_before = metric(&metrics_text(&d).await, "dispatchd_events_stored_total");
    assert_eq!(stored_before, Some(1.0));

    let raw = |ct: Option<&str>, body: String| {
        let mut req = d.http.post(d.url("/v1/events")).body(body);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        d.send(req)
    };
    let json_ct = Some("application/json");

    let got = raw(json_ct, r#"{"type": "a", "data": "#.into()).await;
    assert_error("truncated JSON", &got, 400, "malformed_json");
    let got = raw(json_ct, "{type: a}".into()).await;
    assert_error("not JSON", &got, 400, "malformed_json");
    let got = raw(json_ct, String::new()).await;
    assert_error("empty body", &got, 400, "malformed_json");
    let got = raw(json_ct, r#"{"type":"a","data":1} trailing"#.into()).await;
    assert_error("trailing garbage", &got, 400, "malformed_json");
    let got = raw(json_ct, "[1, 2]".into()).await;
    assert_error("an array", &got, 400, "invalid_body");
    // An array with the fields in order is not an event either.
    let got = raw(json_ct, r#"[null, "a", null, 1]"#.into()).await;
    assert_error("an array in field order", &got, 400, "invalid_body");
    let got = raw(json_ct, r#"{"data": {"x": 1}}"#.into()).await;
    assert_error("missing type", &got, 400, "invalid_body");
    let got = raw(json_ct, r#"{"type": "a"}"#.into()).await;
    assert_error("missing data", &got, 400, "invalid_body");
    let got = raw(
        json_ct,
        r#"{"type": "a", "data": 1, "colour": "red"}"#.into(),
    )
    .await;
    assert_error("unknown field", &got, 400, "invalid_body");
    let got = raw(json_ct, r#"{"type": 5, "data": 1}"#.into()).await;
    assert_error("type not a string", &got, 400, "invalid_body");
    let got = raw(json_ct, r#"{"type": "", "data": 1}"#.into()).await;
    assert_error("empty type", &got, 400, "invalid_event");
    let got = raw(json_ct, r#"{"type": "a b", "data": 1}"#.into()).await;
    assert_error("type with a space", &got, 400, "invalid_event");

    let valid = json!({"type": "a", "data": 1}).to_string();
    let got = raw(Some("text/plain"), valid.clone()).await;
    assert_error("text/plain", &got, 415, "unsupported_media_type");
    let got = raw(None, valid.clone()).await;
    assert_error("no content type", &got, 415, "unsupported_media_type");
    let got = raw(Some("application/jsonx"), valid.clone()).await;
    assert_error("application/jsonx", &got, 415, "unsupported_media_type");
    let got = d
        .send(
            d.http
                .post(d.url("/v1/events/batch"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(json!({"events": [{"type": "a", "data": 1}]}).to_string()),
        )
        .await;
    assert_error(
        "form content type on batch",
        &got,
        415,
        "unsupported_media_type",
    );

    let got = d
        .send(
            d.http
                .post(d.url("/v1/events"))
                .header("content-type", "application/json")
                .header("Idempotency-Key", "has space")
                .body(valid.clone()),
        )
        .await;
    assert_error("Idempotency-Key with a space", &got, 400, "invalid_event");

    // 3 KiB against a 2 KiB limit, on a fresh connection as the server may close this one.
    let big = json!({"type": "big", "data": "x".repeat(3 * 1024)}).to_string();
    let fresh = support::client();
    let got = d
        .send(
            fresh
                .post(d.url("/v1/events"))
                .header("content-type", "application/json")
                .body(big.clone()),
        )
        .await;
    assert_error("3 KiB body", &got, 413, "payload_too_large");
    let big_batch = json!({"events": [{"type": "big", "data": "x".repeat(3 * 1024)}]}).to_string();
    let got = d
        .send(
            support::client()
                .post(d.url("/v1/events/batch"))
                .header("content-type", "application/json")
                .body(big_batch),
        )
        .await;
    assert_error("3 KiB batch", &got, 413, "payload_too_large");

    let got = d.get("/v1/nope").await;
    assert_error("unknown route", &got, 404, "not_found");
    let got = d.post("/v2/events", &json!({"type": "a", "data": 1})).await;
    assert_error("unknown version", &got, 404, "not_found");
    let got = d.get("/v1/events/e1/nope").await;
    assert_error("unknown sub-route", &got, 404, "not_found");
    let got = d.get("/v1/events/no-such-event").await;
    assert_error("unknown event", &got, 404, "not_found");

    for (method, path, allow) in [
        (Method::DELETE, "/v1/events", vec!["GET", "POST"]),
        (Method::PUT, "/v1/events", vec!["GET", "POST"]),
        (Method::GET, "/v1/events/batch", vec!["POST"]),
        (Method::POST, "/v1/events/some-id", vec!["GET"]),
        (Method::POST, "/healthz", vec!["GET"]),
    ] {
        let resp = match d
            .http
            .request(method.clone(), d.url(path))
            .header("content-type", "application/json")
            .body(valid.clone())
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status().as_u16();
        let allow_header = resp
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body: Value = match resp.bytes().await {
            Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
            Err(e) => panic!("{method} {path} body: {e}"),
        };
        assert_error(
            &format!("{method} {path}"),
            &(status, body.clone()),
            405,
            "method_not_allowed",
        );
        let Some(h) = allow_header else {
            panic!("{method} {path}: 405 without Allow; body {body}");
        };
        let mut got: Vec<&str> = h.split(',').map(str::trim).collect();
        got.sort_unstable();
        assert_eq!(got, allow, "{method} {path}: Allow {h:?}");
    }

    for q in [
        "limit=0",
        "limit=1001",
        "limit=-1",
        "limit=ten",
        "cursor=abc",
        "cursor=-5",
        "since=yesterday",
        "since=2026-13-45T00:00:00Z",
        "until=not-a-time",
        "colour=red",
    ] {
        let got = d.get(&format!("/v1/events?{q}")).await;
        assert_error(&format!("?{q}"), &got, 400, "invalid_query");
    }

    let after = list_all(&d, "").await;
    assert_eq!(after, before, "bad input changed the event list");
    assert_eq!(
        metric(&metrics_text(&d).await, "dispatchd_events_stored_total"),
        Some(1.0),
        "bad input stored an event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_the_limit_is_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let d = Daemon::start("[server]\nmax_body = \"2KiB\"\n");
    let body = json!({"type": "big", "data": "y".repeat(3 * 1024)}).to_string();
    let mut req = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        d.addr
    )
    .into_bytes();
    for chunk in body.as_bytes().chunks(512) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let mut stream = match tokio::net::TcpStream::connect(d.addr).await {
        Ok(s) => s,
        Err(e) => panic!("connect: {e}"),
    };
    if let Err(e) = stream.write_all(&req).await {
        panic!("write: {e}");
    }
    let mut resp = Vec::new();
    match tokio::time::timeout(WAIT, stream.read_to_end(&mut resp)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if !resp.is_empty() => eprintln!("read ended with {e} after a response"),
        Ok(Err(e)) => panic!("read: {e}"),
        Err(_) => panic!("no answer in {WAIT:?}"),
    }
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 413"), "response: {text}");
    assert!(text.contains("payload_too_large"), "response: {text}");
    assert!(list_all(&d, "").await.is_empty(), "nothing stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn ids_with_reserved_characters_can_be_read_back() {
    let d = Daemon::start("");
    for id in ["inv#42", "a/b", "what?", "50%", "x%2Fy"] {
        let (status, r) = d
            .post("/v1/events", &json!({"id": id, "type": "t", "data": 1}))
            .await;
        if status == 400 {
            // Refusing such ids up front would be fine too.
            continue;
        }
        assert_eq!(status, 202, "{id}: {r}");
        let (status, ev) = d.get(&format!("/v1/events/{}", enc(id))).await;
        assert_eq!(status, 200, "published {id:?} cannot be read back: {ev}");
        assert_eq!(ev["id"], id, "{ev}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn event_with_id_batch_can_be_read_back() {
    let d = Daemon::start("");
    let (status, r) = d
        .post(
            "/v1/events",
            &json!({"id": "batch", "type": "t", "data": 1}),
        )
        .await;
    if status == 400 {
        return; // reserving the id is a fine fix too
    }
    assert_eq!(status, 202, "{r}");
    let (status, ev) = d.get("/v1/events/batch").await;
    assert_eq!(status, 200, "event \"batch\" cannot be read back: {ev}");
}

// ---------------------------------------------------------------------------------------------
// listing

async fn list_filters_by_type_and_source(b: Backend) {
    let d = b.start("");
    let specs = [
        ("a", Some("s1")),
        ("b", Some("s1")),
        ("a", Some("s2")),
        ("a", None),
        ("b", Some("s2")),
        ("a", Some("s1")),
    ];
    let mut published = Vec::new();
    for (i, (t, s)) in specs.iter().enumerate() {
        let mut body = json!({"id": format!("f-{i}"), "type": t, "data": i});
        if let Some(s) = s {
            body["source"] = json!(s);
        }
        let (status, r) = d.post("/v1/events", &body).await;
        assert_eq!(status, 202, "{r}");
        published.push((format!("f-{i}"), *t, *s));
    }
    let expect = |f: &dyn Fn(&str, Option<&str>) -> bool| -> Vec<String> {
        published
            .iter()
            .filter(|(_, t, s)| f(t, *s))
            .map(|(id, ..)| id.clone())
            .collect()
    };
    for (query, want) in [
        ("type=a", expect(&|t, _| t == "a")),
        ("type=b", expect(&|t, _| t == "b")),
        ("source=s1", expect(&|_, s| s == Some("s1"))),
        ("source=s2", expect(&|_, s| s == Some("s2"))),
        (
            "type=a&source=s1",
            expect(&|t, s| t == "a" && s == Some("s1")),
        ),
        (
            "type=b&source=s2",
            expect(&|t, s| t == "b" && s == Some("s2")),
        ),
        ("type=c", vec![]),
        ("source=nope", vec![]),
        ("", expect(&|_, _| true)),
    ] {
        let got = list_all(&d, query).await;
        assert_eq!(ids(&got), want, "?{query}");
        assert_strictly_increasing(query, &seqs(&got));
    }
    // Paging through a filtered list returns each match once.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    for _ in 0..20 {
        let (items, next) = list_page(&d, None, &format!("type=a&limit=2&cursor={cursor}")).await;
        assert!(items.len() <= 2, "{items:?}");
        seen.extend(ids(&items));
        match next {
            Some(c) => cursor = enc(&c),
            None => break,
        }
    }
    assert_eq!(seen, expect(&|t, _| t == "a"), "paged type=a");
}

async fn list_since_is_inclusive_and_until_exclusive(b: Backend) {
    let d = b.start("");
    let mut evs = Vec::new();
    for i in 0..5 {
        let (status, r) = d
            .post(
                "/v1/events",
                &json!({"id": format!("time-{i}"), "type": "t", "data": i}),
            )
            .await;
        assert_eq!(status, 202, "{r}");
        let (status, ev) = d.get(&format!("/v1/events/time-{i}")).await;
        assert_eq!(status, 200, "{ev}");
        evs.push(ev);
    }
    let times: Vec<String> = evs
        .iter()
        .map(|e| str_of(e, "received_at").to_string())
        .collect();
    // RFC 3339 text in UTC with a fixed width sorts like the instants it names.
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "received_at never decreases with seq: {times:?}"
    );
    let mid = &times[2];
    let want_since: Vec<String> = (0..5)
        .filter(|&i| times[i].as_str() >= mid.as_str())
        .map(|i| format!("time-{i}"))
        .collect();
    let want_until: Vec<String> = (0..5)
        .filter(|&i| times[i].as_str() < mid.as_str())
        .map(|i| format!("time-{i}"))
        .collect();
    assert!(want_since.contains(&"time-2".to_string()));
    assert!(!want_until.contains(&"time-2".to_string()));

    let got = list_all(&d, &format!("since={}", enc(mid))).await;
    assert_eq!(
        ids(&got),
        want_since,
        "since={mid} (inclusive); times {times:?}"
    );
    let got = list_all(&d, &format!("until={}", enc(mid))).await;
    assert_eq!(
        ids(&got),
        want_until,
        "until={mid} (exclusive); times {times:?}"
    );
    let got = list_all(
        &d,
        &format!("since={}&until={}", enc(&times[1]), enc(&times[3])),
    )
    .await;
    let want: Vec<String> = (0..5)
        .filter(|&i| times[i] >= times[1] && times[i] < times[3])
        .map(|i| format!("time-{i}"))
        .collect();
    assert_eq!(ids(&got), want, "since {} until {}", times[1], times[3]);
    let got = list_all(&d, &format!("since={}&type=t", enc(mid))).await;
    assert_eq!(ids(&got), want_since, "since with a type filter");
    let got = list_all(&d, &format!("since={}&until={}", enc(mid), enc(mid))).await;
    assert!(got.is_empty(), "an empty window: {got:?}");

    // Unix seconds: everything is after the epoch, nothing before it.
    assert_eq!(list_all(&d, "since=0").await.len(), 5);
    assert!(list_all(&d, "until=0").await.is_empty());
    assert!(list_all(&d, "since=2999-01-01T00:00:00Z").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn list_since_accepts_rfc3339_offsets() {
    let d = Daemon::start("");
    d.publish("t", json!(1)).await;
    // 2000-01-01T02:00:00+02:00 is 2000-01-01T00:00:00Z.
    let (status, body) = d
        .get(&format!(
            "/v1/events?since={}",
            enc("2000-01-01T02:00:00+02:00")
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["items"].as_array().map(Vec::len), Some(1), "{body}");
}

async fn pagination_returns_everything_once_while_publishing(b: Backend) {
    let d = b.start("");
    let mut expected = Vec::new();
    for i in 0..25 {
        let (status, r) = d
            .post(
                "/v1/events",
                &json!({"id": format!("p-{i:03}"), "type": "t", "data": i}),
            )
            .await;
        assert_eq!(status, 202, "{r}");
        expected.push(format!("p-{i:03}"));
    }
    let mut seen: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    let mut extra = 0;
    loop {
        pages += 1;
        assert!(pages < 100, "pagination does not end");
        let mut q = String::from("limit=7");
        if let Some(c) = &cursor {
            q.push_str("&cursor=");
            q.push_str(&enc(c));
        }
        let (items, next) = list_page(&d, None, &q).await;
        assert!(items.len() <= 7, "page over the limit: {}", items.len());
        seen.extend(items);
        // New events between the first pages: they must show up later, once.
        if pages <= 3 {
            for _ in 0..2 {
                let id = format!("p-new-{extra}");
                extra += 1;
                let (status, r) = d
                    .post("/v1/events", &json!({"id": id, "type": "t", "data": -1}))
                    .await;
                assert_eq!(status, 202, "{r}");
                expected.push(id);
            }
        }
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let got = ids(&seen);
    assert_strictly_increasing("paged seqs", &seqs(&seen));
    assert_eq!(got, expected, "every event exactly once, in seq order");
    assert!(pages >= 5, "31 events in pages of 7: {pages} pages");
    // The last page's cursor says the end: a fresh full listing agrees.
    assert_eq!(ids(&list_all(&d, "").await), expected);
}

// ---------------------------------------------------------------------------------------------
// auth

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_scopes_are_enforced() {
    let d = Daemon::start(AUTH_CONFIG);
    let ev = json!({"type": "t", "data": 1});

    // No token.
    let got = post_as(&d, "/v1/events", None, &ev).await;
    assert_error("publish without a token", &got, 401, "unauthorized");
    let got = post_as(&d, "/v1/events/batch", None, &json!({"events": [ev]})).await;
    assert_error("batch without a token", &got, 401, "unauthorized");
    let got = get_as(&d, "/v1/events", None).await;
    assert_error("list without a token", &got, 401, "unauthorized");

    // Wrong tokens.
    for bad in [
        "publish-token-aaaaaaab",
        "publish-token-aaaaaaa",
        "publish-token-aaaaaaaaa",
        "",
    ] {
        let got = post_as(&d, "/v1/events", Some(bad), &ev).await;
        assert_error(
            &format!("publish with token {bad:?}"),
            &got,
            401,
            "unauthorized",
        );
        let got = get_as(&d, "/v1/events", Some(bad)).await;
        assert_error(
            &format!("list with token {bad:?}"),
            &got,
            401,
            "unauthorized",
        );
    }
    let got = d
        .send(
            d.http
                .get(d.url("/v1/events"))
                .header("authorization", format!("Basic {ADMIN_TOKEN}")),
        )
        .await;
    assert_error("Basic scheme", &got, 401, "unauthorized");

    // Publish scope.
    let (status, r) = post_as(
        &d,
        "/v1/events",
        Some(PUBLISH_TOKEN),
        &json!({"id": "auth-1", "type": "t", "data": 1}),
    )
    .await;
    assert_eq!(status, 202, "{r}");
    let (status, r) = post_as(
        &d,
        "/v1/events/batch",
        Some(PUBLISH_TOKEN),
        &json!({"events": [{"id": "auth-2", "type": "t", "data": 2}]}),
    )
    .await;
    assert_eq!(status, 202, "{r}");
    let got = get_as(&d, "/v1/events", Some(PUBLISH_TOKEN)).await;
    assert_error("list with the publish token", &got, 403, "forbidden");
    let got = get_as(&d, "/v1/events/auth-1", Some(PUBLISH_TOKEN)).await;
    assert_error("get with the publish token", &got, 403, "forbidden");

    // Admin scope does both.
    let (status, r) = post_as(
        &d,
        "/v1/events",
        Some(ADMIN_TOKEN),
        &json!({"id": "auth-3", "type": "t", "data": 3}),
    )
    .await;
    assert_eq!(status, 202, "{r}");
    let (status, ev1) = get_as(&d, "/v1/events/auth-1", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{ev1}");
    assert_eq!(ev1["data"], 1, "{ev1}");
    let all = list_all_as(&d, Some(ADMIN_TOKEN), "").await;
    assert_eq!(
        ids(&all),
        vec!["auth-1", "auth-2", "auth-3"],
        "refused requests stored nothing"
    );

    // Health and metrics stay open.
    for path in ["/healthz", "/readyz"] {
        let (status, body) = d.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let text = metrics_text(&d).await;
    assert!(text.contains("dispatchd_events_stored_total"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// health and metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let d = Daemon::start("");
    let (status, body) = d.get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"status": "ok"}));
    let (status, body) = d.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"status": "ready"}));

    let text = metrics_text(&d).await;
    assert_eq!(
        metric(&text, "dispatchd_events_stored_total"),
        Some(0.0),
        "{text}"
    );

    const N: usize = 7;
    for i in 0..N {
        let (status, r) = d
            .post(
                "/v1/events",
                &json!({"id": format!("m-{i}"), "type": "t", "data": i}),
            )
            .await;
        assert_eq!(status, 202, "{r}");
    }
    let (status, r) = d
        .post("/v1/events", &json!({"id": "m-0", "type": "t", "data": 0}))
        .await;
    assert_eq!(status, 200, "a duplicate: {r}");
    let (status, r) = d
        .post(
            "/v1/events/batch",
            &json!({"events": [{"type": "t", "data": 1}, {"type": "t", "data": 2}]}),
        )
        .await;
    assert_eq!(status, 202, "{r}");

    let text = metrics_text(&d).await;
    let stored = metric(&text, "dispatchd_events_stored_total");
    assert_eq!(
        stored,
        Some((N + 2) as f64),
        "duplicates are not stored:\n{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"dispatchd_http_requests_total{route="events",status="202"}"#
        ),
        Some(N as f64),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"dispatchd_http_requests_total{route="events",status="200"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"dispatchd_http_requests_total{route="events_batch",status="202"}"#
        ),
        Some(1.0),
        "{text}"
    );
    let count = metric(&text, "dispatchd_writer_batch_size_count");
    let sum = metric(&text, "dispatchd_writer_batch_size_sum");
    assert!(
        count.is_some_and(|c| c >= 1.0),
        "writer_batch_size_count: {count:?}\n{text}"
    );
    // Every publish request is one writer command: N + duplicate + batch.
    assert!(
        sum.is_some_and(|s| s >= (N + 2) as f64),
        "writer_batch_size_sum: {sum:?}\n{text}"
    );
    assert!(
        text.contains(r#"dispatchd_writer_batch_size_bucket{le="1"}"#),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// durability

enum StreamEnd {
    /// The worker ran out of work: the daemon was still up.
    Exhausted,
    /// A request failed (the daemon went away).
    Failed,
}

/// Publishes from `workers` tasks until a request fails or `per_worker` are done; acknowledged
/// ids go to `acked`, and `enough` is notified once `threshold` were acknowledged.
fn spawn_stream(
    d: &Daemon,
    prefix: &'static str,
    workers: usize,
    per_worker: usize,
    threshold: usize,
    acked: Arc<Mutex<Vec<String>>>,
    enough: Arc<tokio::sync::Notify>,
) -> Vec<tokio::task::JoinHandle<(StreamEnd, Vec<String>)>> {
    let count = Arc::new(AtomicUsize::new(0));
    (0..workers)
        .map(|w| {
            let http = d.http.clone();
            let url = d.url("/v1/events");
            let (acked, enough, count) = (acked.clone(), enough.clone(), count.clone());
            tokio::spawn(async move {
                let mut unexpected = Vec::new();
                for i in 0..per_worker {
                    let id = format!("{prefix}-{w}-{i}");
                    let body = json!({"id": id, "type": "stream", "data": {"w": w, "i": i}});
                    match publish_with(&http, &url, &body).await {
                        Ok(got) => {
                            if got != id {
                                unexpected.push(format!("{id} acknowledged as {got}"));
                            }
                            if let Ok(mut a) = acked.lock() {
                                a.push(id);
                            }
                            if count.fetch_add(1, Ordering::SeqCst) + 1 == threshold {
                                enough.notify_one();
                            }
                        }
                        Err(e) if e.starts_with("request error") => {
                            return (StreamEnd::Failed, unexpected);
                        }
                        Err(e) => unexpected.push(format!("{id}: {e}")),
                    }
                }
                (StreamEnd::Exhausted, unexpected)
            })
        })
        .collect()
}

/// A publishing stream ([`spawn_stream`]) that has had `threshold` events acknowledged.
struct Stream {
    tasks: Vec<tokio::task::JoinHandle<(StreamEnd, Vec<String>)>>,
    acked: Arc<Mutex<Vec<String>>>,
}

impl Stream {
    /// Starts `workers` publishing tasks and waits until `threshold` events are acknowledged.
    async fn until_acked(
        d: &Daemon,
        prefix: &'static str,
        workers: usize,
        threshold: usize,
    ) -> Stream {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let enough = Arc::new(tokio::sync::Notify::new());
        let tasks = spawn_stream(
            d,
            prefix,
            workers,
            100_000,
            threshold,
            acked.clone(),
            enough.clone(),
        );
        if tokio::time::timeout(WAIT, enough.notified()).await.is_err() {
            panic!(
                "the stream did not get {threshold} acknowledgements\n{}",
                d.logs()
            );
        }
        Stream { tasks, acked }
    }

    /// Waits for every task: how many ended on a failed request, the unexpected answers, and
    /// the acknowledged ids.
    async fn finish(self) -> (usize, Vec<String>, Vec<String>) {
        let (failed, unexpected) = join_stream(self.tasks).await;
        let acked = match self.acked.lock() {
            Ok(a) => a.clone(),
            Err(e) => panic!("lock: {e}"),
        };
        (failed, unexpected, acked)
    }
}

/// Publishes a burst from 32 tasks; returns the acknowledged ids and asserts there was no other
/// outcome.
async fn burst(d: &Daemon, prefix: &str, per_task: usize) -> Vec<String> {
    let mut tasks = Vec::new();
    for w in 0..32 {
        let http = d.http.clone();
        let url = d.url("/v1/events");
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut other = Vec::new();
            for i in 0..per_task {
                let id = format!("{prefix}-{w}-{i}");
                let body = json!({"id": id, "type": "burst", "data": {"w": w, "i": i}});
                match publish_with(&http, &url, &body).await {
                    Ok(got) if got == id => acked.push(id),
                    Ok(got) => other.push(format!("{id} acknowledged as {got}")),
                    Err(e) => other.push(format!("{id}: {e}")),
                }
            }
            (acked, other)
        }));
    }
    let mut acked = Vec::new();
    let mut other = Vec::new();
    for t in tasks {
        match tokio::time::timeout(WAIT, t).await {
            Ok(Ok((a, o))) => {
                acked.extend(a);
                other.extend(o);
            }
            Ok(Err(e)) => panic!("burst task failed: {e}"),
            Err(_) => panic!("burst task did not finish in {WAIT:?}"),
        }
    }
    assert!(
        other.is_empty(),
        "{} publishes were not 202 (first: {:?})\n{}",
        other.len(),
        other.iter().take(5).collect::<Vec<_>>(),
        d.logs()
    );
    assert_eq!(acked.len(), 32 * per_task);
    acked
}

async fn join_stream(
    tasks: Vec<tokio::task::JoinHandle<(StreamEnd, Vec<String>)>>,
) -> (usize, Vec<String>) {
    let mut failed = 0;
    let mut unexpected = Vec::new();
    for t in tasks {
        match tokio::time::timeout(WAIT, t).await {
            Ok(Ok((end, u))) => {
                if let StreamEnd::Failed = end {
                    failed += 1;
                }
                unexpected.extend(u);
            }
            Ok(Err(e)) => panic!("stream task failed: {e}"),
            Err(_) => panic!("stream task did not finish in {WAIT:?}"),
        }
    }
    (failed, unexpected)
}

async fn acknowledged_events_survive_sigkill(b: Backend) {
    survive_sigkill(&b, "", "").await;
}

const NO_JOURNAL: &str = "[storage]\njournal_size = 0\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_sigkill_without_the_journal() {
    survive_sigkill(&Backend::Redb, NO_JOURNAL, NO_JOURNAL).await;
}

/// A crash with the journal on, then a start with it off: the journal is still replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_left_by_a_crash_is_replayed_when_the_journal_is_turned_off() {
    survive_sigkill(&Backend::Redb, "", NO_JOURNAL).await;
}

/// Publishes, kills the daemon (started with config `first`) with SIGKILL mid-stream, starts
/// it again with config `restart` and finds every acknowledged event.
async fn survive_sigkill(b: &Backend, first: &str, restart: &str) {
    let mut d = b.start(first);
    let Some(tmp) = d.keep_dir() else {
        panic!("the daemon has no temp dir");
    };
    let dir = tmp.path().to_path_buf();

    let mut acked = burst(&d, "burst", 63).await;

    // A further stream, killed while it is still publishing.
    let stream = Stream::until_acked(&d, "stream", 8, 200).await;
    d.kill();
    let (failed, unexpected, streamed) = stream.finish().await;
    assert!(unexpected.is_empty(), "unexpected answers: {unexpected:?}");
    assert!(failed > 0, "the kill did not interrupt the stream");
    assert!(streamed.len() >= 200, "{}", streamed.len());
    acked.extend(streamed);
    drop(d);

    let d = b.start_in(&dir, restart);
    let missing = missing_ids(&d, &acked).await;
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged events lost after SIGKILL, e.g. {:?}\n{}",
        missing.len(),
        acked.len(),
        missing.iter().take(10).collect::<Vec<_>>(),
        d.logs()
    );
    let all = list_all(&d, "").await;
    assert!(
        all.len() >= acked.len(),
        "list has {} events, {} were acknowledged",
        all.len(),
        acked.len()
    );
    let s = seqs(&all);
    assert_strictly_increasing("seqs after restart", &s);
    let max_seq = s.last().copied().unwrap_or(0);

    // The id index survived, and numbering resumes after the last stored event.
    let first = &acked[0];
    let (status, r) = d
        .post(
            "/v1/events",
            &json!({"id": first, "type": "burst", "data": 0}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["duplicate"], true, "{r}");
    let r = d.publish("after.restart", json!(1)).await;
    assert!(u64_of(&r, "seq") > max_seq, "{r} after max seq {max_seq}");
    drop(tmp);
}

async fn sigterm_drains_exits_zero_and_restart_keeps_everything(b: Backend) {
    let mut d = b.start("");
    let Some(tmp) = d.keep_dir() else {
        panic!("the daemon has no temp dir");
    };
    let dir = tmp.path().to_path_buf();

    let mut acked = burst(&d, "term", 10).await;
    let (status, r) = d
        .send(
            d.http
                .post(d.url("/v1/events"))
                .header("content-type", "application/json")
                .header("Idempotency-Key", "term-key")
                .body(json!({"type": "keyed", "data": {"k": 1}}).to_string()),
        )
        .await;
    assert_eq!(status, 202, "{r}");
    let keyed_id = str_of(&r, "id").to_string();
    let keyed_seq = u64_of(&r, "seq");
    acked.push(keyed_id.clone());

    // SIGTERM while publishes are in flight.
    let stream = Stream::until_acked(&d, "tstream", 4, 50).await;
    let status = d.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM exit: {status:?}\n{}",
        d.logs()
    );
    let (failed, unexpected, streamed) = stream.finish().await;
    // Requests that raced the shutdown may be refused with 503; nothing else is acceptable.
    let bad: Vec<_> = unexpected
        .iter()
        .filter(|u| !u.contains("status 503"))
        .collect();
    assert!(bad.is_empty(), "unexpected answers: {bad:?}");
    assert!(failed > 0, "the stream outlived the daemon");
    acked.extend(streamed);
    drop(d);

    let d = b.start_in(&dir, "");
    let missing = missing_ids(&d, &acked).await;
    assert!(
        missing.is_empty(),
        "{} acknowledged events lost after SIGTERM, e.g. {:?}",
        missing.len(),
        missing.iter().take(10).collect::<Vec<_>>()
    );
    let all = list_all(&d, "").await;
    assert_eq!(
        all.len(),
        acked.len(),
        "a clean stop stores exactly what was acknowledged"
    );
    let (status, r) = d
        .send(
            d.http
                .post(d.url("/v1/events"))
                .header("content-type", "application/json")
                .header("Idempotency-Key", "term-key")
                .body(json!({"type": "keyed", "data": {"k": 2}}).to_string()),
        )
        .await;
    assert_eq!(status, 200, "the idempotency key survived: {r}");
    assert_eq!(r["id"], keyed_id.as_str(), "{r}");
    assert_eq!(u64_of(&r, "seq"), keyed_seq, "{r}");
    assert_eq!(r["event"]["data"], json!({"k": 1}), "{r}");
    drop(tmp);
}

// ---------------------------------------------------------------------------------------------
// schema

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_schema_version_refuses_to_start() {
    let mut d = Daemon::start("");
    let Some(tmp) = d.keep_dir() else {
        panic!("the daemon has no temp dir");
    };
    let dir = tmp.path().to_path_buf();
    d.publish("t", json!(1)).await;
    let status = d.terminate();
    assert_eq!(status.code(), Some(0), "{status:?}\n{}", d.logs());
    drop(d);

    let db_path = dir.join("data").join("dispatchd.redb");
    {
        let db = match redb::Database::open(&db_path) {
            Ok(db) => db,
            Err(e) => panic!("open {}: {e}", db_path.display()),
        };
        if let Err(e) = dispatchd::storage::schema::force_schema_version(&db, 99) {
            panic!("force_schema_version: {e}");
        }
    }

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dispatchd"));
    cmd.arg("serve")
        .arg("--config")
        .arg(dir.join("dispatchd.toml"))
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env_remove("DISPATCHD_LISTEN")
        .env_remove("DISPATCHD_DATA_DIR");
    let out = crate::support::run_bounded(cmd, WAIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "a schema 99 file must not start: {:?}\n{stderr}",
        out.status
    );
    assert!(stderr.contains("schema version 99"), "stderr: {stderr}");
    assert!(!stderr.contains("listening on"), "stderr: {stderr}");

    // The refused start left the version alone.
    match dispatchd::storage::Store::open(&db_path, 1 << 20, 1 << 20) {
        Err(dispatchd::storage::StoreError::SchemaTooNew(99, _)) => {}
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("the schema 99 file opened"),
    }
    drop(tmp);
}

crate::both!(
    acknowledged_events_survive_sigkill,
    publish_then_read_back,
    publish_keeps_fields_and_given_id,
    duplicate_id_returns_the_original,
    duplicate_idempotency_key_returns_the_original,
    duplicates_inside_one_batch,
    batch_publishes_in_order,
    batch_with_an_invalid_item_stores_nothing,
    bad_input_gets_a_json_4xx_and_changes_nothing,
    list_filters_by_type_and_source,
    list_since_is_inclusive_and_until_exclusive,
    pagination_returns_everything_once_while_publishing,
    sigterm_drains_exits_zero_and_restart_keeps_everything,
);

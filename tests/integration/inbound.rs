//! Inbound provider webhooks over real HTTP: every verification scheme (valid, tampered body,
//! wrong secret, stale timestamp, missing header, duplicate delivery id, secret rotation),
//! published test vectors, immutable receipts, fan-out, refusals that store nothing, metrics.
//!
//! Requests are signed here with the `hmac` and `sha2` crates, independently of the daemon's
//! `ring`-based verification.

use crate::support::backend::Backend;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::support::Daemon;
use crate::support::receiver::Receiver;

const WAIT: Duration = Duration::from_secs(30);

/// GitHub's documented example for X-Hub-Signature-256.
const GITHUB_DOC_SECRET: &str = "It's a Secret to Everybody";
const GITHUB_DOC_PAYLOAD: &str = "Hello, World!";
const GITHUB_DOC_SIGNATURE: &str =
    "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

/// The Standard Webhooks specification's example message.
const SW_DOC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SW_DOC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const SW_DOC_TIMESTAMP: &str = "1614265330";
const SW_DOC_PAYLOAD: &str = r#"{"test": 2432232314}"#;
const SW_DOC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

/// Every source has two secrets (old and new: rotation); requests are also signed with a third
/// one nobody configured.
const OLD: &str = "old-secret-0001";
const NEW: &str = "new-secret-0002";
const WRONG: &str = "wrong-secret-03";
/// Standard Webhooks secrets are base64 keys behind `whsec_`: these decode to OLD/NEW/WRONG.
const SW_OLD: &str = "whsec_b2xkLXNlY3JldC0wMDAx";
const SW_NEW: &str = "whsec_bmV3LXNlY3JldC0wMDAy";

fn config(extra: &str) -> String {
    format!(
        r#"
[delivery]
allow_private_networks = true

[[sources]]
id = "gh"
scheme = "github"
secrets = ["{OLD}", "{NEW}"]

[[sources]]
id = "gh-doc"
scheme = "github"
secrets = ["{GITHUB_DOC_SECRET}"]

[[sources]]
id = "stripe"
scheme = "stripe"
secrets = ["{OLD}", "{NEW}"]
tolerance = "5m"

[[sources]]
id = "sw"
scheme = "standard-webhooks"
secrets = ["{SW_OLD}", "{SW_NEW}"]

[[sources]]
id = "sw-doc"
scheme = "standard-webhooks"
secrets = ["{SW_DOC_SECRET}"]
tolerance = "100years"

[[sources]]
id = "hmac-hex"
scheme = "hmac-sha256"
secrets = ["{OLD}", "{NEW}"]
signature_header = "X-Signature"
encoding = "hex"
signature_prefix = "sha256="
event_type = "json:type"
type_prefix = "shop."
delivery_id = "header:X-Request-Id"

[[sources]]
id = "hmac-ts"
scheme = "hmac-sha256"
secrets = ["{OLD}", "{NEW}"]
signature_header = "X-Signature"
encoding = "base64"
timestamp_header = "X-Timestamp"
event_type = "header:X-Event"
delivery_id = "json:meta.id"
tolerance = "2m"

[[sources]]
id = "small"
scheme = "github"
secrets = ["{NEW}"]
max_body = 64
{extra}"#
    )
}

#[allow(clippy::disallowed_methods)] // the test's own clock, outside the daemon
fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(key) else {
        panic!("hmac key");
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The key bytes behind a test secret name, as each scheme uses them.
fn key(secret: &str) -> &[u8] {
    secret.as_bytes()
}

/// Request headers as (name, value) pairs.
type Headers = Vec<(String, String)>;

/// How one scheme is exercised by the shared checks.
struct Scheme {
    source: &'static str,
    /// The request headers for `body` signed with `secret` at unix time `ts`, carrying the
    /// provider delivery id `id` where the scheme puts it in a header.
    sign: fn(secret: &str, ts: i64, id: &str, body: &[u8]) -> Headers,
    /// A body of this provider carrying the delivery id `id` where the scheme puts it in JSON.
    body: fn(id: &str, n: u32) -> Vec<u8>,
    /// The header whose absence must be refused.
    required_header: &'static str,
    /// Whether a timestamp is signed (so a stale one is refused).
    signs_time: bool,
    /// The event type the standard body becomes.
    event_type: &'static str,
}

fn h(name: &str, value: impl Into<String>) -> (String, String) {
    (name.to_string(), value.into())
}

const GITHUB: Scheme = Scheme {
    source: "gh",
    sign: |secret, _ts, id, body| {
        vec![
            h(
                "X-Hub-Signature-256",
                format!("sha256={}", hex(&mac(key(secret), &[body]))),
            ),
            h("X-GitHub-Event", "push"),
            h("X-GitHub-Delivery", id),
        ]
    },
    body: |_id, n| format!(r#"{{"ref": "refs/heads/main", "n": {n}}}"#).into_bytes(),
    required_header: "X-Hub-Signature-256",
    signs_time: false,
    event_type: "github.push",
};

const STRIPE: Scheme = Scheme {
    source: "stripe",
    sign: |secret, ts, _id, body| {
        let t = ts.to_string();
        let sig = hex(&mac(key(secret), &[t.as_bytes(), b".", body]));
        vec![h("Stripe-Signature", format!("t={t},v1={sig}"))]
    },
    body: |id, n| {
        json!({"id": id, "object": "event", "type": "invoice.paid", "data": {"n": n}})
            .to_string()
            .into_bytes()
    },
    required_header: "Stripe-Signature",
    signs_time: true,
    event_type: "invoice.paid",
};

const STANDARD: Scheme = Scheme {
    source: "sw",
    sign: |secret, ts, id, body| {
        let t = ts.to_string();
        let sig = B64.encode(mac(
            key(secret),
            &[id.as_bytes(), b".", t.as_bytes(), b".", body],
        ));
        vec![
            h("webhook-id", id),
            h("webhook-timestamp", t),
            h("webhook-signature", format!("v1,{sig}")),
        ]
    },
    body: |_id, n| {
        json!({"type": "user.created", "timestamp": "2026-01-01T00:00:00Z", "data": {"n": n}})
            .to_string()
            .into_bytes()
    },
    required_header: "webhook-signature",
    signs_time: true,
    event_type: "user.created",
};

const HMAC_HEX: Scheme = Scheme {
    source: "hmac-hex",
    sign: |secret, _ts, id, body| {
        vec![
            h(
                "X-Signature",
                format!("sha256={}", hex(&mac(key(secret), &[body]))),
            ),
            h("X-Request-Id", id),
        ]
    },
    body: |_id, n| {
        json!({"type": "order.paid", "n": n})
            .to_string()
            .into_bytes()
    },
    required_header: "X-Signature",
    signs_time: false,
    event_type: "shop.order.paid",
};

const HMAC_TS: Scheme = Scheme {
    source: "hmac-ts",
    sign: |secret, ts, _id, body| {
        let t = ts.to_string();
        vec![
            h(
                "X-Signature",
                B64.encode(mac(key(secret), &[t.as_bytes(), b".", body])),
            ),
            h("X-Timestamp", t),
            h("X-Event", "thing.happened"),
        ]
    },
    body: |id, n| json!({"meta": {"id": id}, "n": n}).to_string().into_bytes(),
    required_header: "X-Timestamp",
    signs_time: true,
    event_type: "thing.happened",
};

/// Posts raw bytes to a source with the given headers.
async fn ingest(
    d: &Daemon,
    source: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> (u16, Value) {
    let mut req = d
        .http
        .post(d.url(&format!("/v1/ingest/{source}")))
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    d.send(req).await
}

#[track_caller]
fn assert_refused(what: &str, got: &(u16, Value), status: u16, code: &str) {
    let (s, body) = got;
    assert_eq!(*s, status, "{what}: wrong status; body {body}");
    assert_eq!(body["error"]["code"], code, "{what}: body {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: no message in {body}"
    );
}

/// The value of `dispatchd_inbound_receipts_total` for a source and result (0 when absent).
async fn receipts_metric(d: &Daemon, source: &str, result: &str) -> u64 {
    let text = d.metrics().await;
    let (s, r) = (
        format!("source=\"{source}\""),
        format!("result=\"{result}\""),
    );
    text.lines()
        .filter(|l| l.starts_with("dispatchd_inbound_receipts_total{"))
        .filter(|l| l.contains(&s) && l.contains(&r))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// The events stored from a source.
async fn events_of(d: &Daemon, source: &str) -> Vec<Value> {
    let (s, body) = d
        .get(&format!("/v1/events?source={source}&limit=1000"))
        .await;
    assert_eq!(s, 200, "{body}");
    body["items"].as_array().cloned().unwrap_or_default()
}

#[track_caller]
fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    match v[key].as_str() {
        Some(s) => s,
        None => panic!("no string {key:?} in {v}"),
    }
}

/// The shared checks, run for every scheme.
async fn exercise(d: &Daemon, s: &Scheme) {
    let src = s.source;
    let t = now();
    // Signs `body` and sends `sent` (the same body unless it is a tampering test).
    let post = |secret: &'static str, ts: i64, id: String, body: Vec<u8>, sent: Option<Vec<u8>>| {
        let headers = (s.sign)(secret, ts, &id, &body);
        async move { ingest(d, src, &headers, sent.unwrap_or(body)).await }
    };

    // Valid, signed with the newest secret.
    let (status, accepted) = post(
        NEW,
        t,
        format!("{src}-1"),
        (s.body)(&format!("{src}-1"), 1),
        None,
    )
    .await;
    assert_eq!(status, 202, "{src}: valid request refused: {accepted}");
    assert_eq!(accepted["duplicate"], false, "{accepted}");
    let receipt_id = str_of(&accepted, "receipt_id").to_string();
    let event_id = str_of(&accepted, "event_id").to_string();
    assert!(accepted["seq"].as_u64().is_some(), "{accepted}");

    // The same provider delivery id again (a provider retry, re-signed a second later):
    // acknowledged, not stored twice.
    let (status, dup) = post(
        NEW,
        t + 1,
        format!("{src}-1"),
        (s.body)(&format!("{src}-1"), 1),
        None,
    )
    .await;
    assert_eq!(status, 200, "{src}: duplicate: {dup}");
    assert_eq!(dup["duplicate"], true, "{dup}");
    assert_eq!(dup["receipt_id"], receipt_id.as_str(), "{dup}");
    assert_eq!(dup["event_id"], event_id.as_str(), "{dup}");

    // Rotation: the older configured secret still verifies.
    let (status, rotated) = post(
        OLD,
        t,
        format!("{src}-2"),
        (s.body)(&format!("{src}-2"), 2),
        None,
    )
    .await;
    assert_eq!(status, 202, "{src}: old secret refused: {rotated}");
    assert_ne!(rotated["receipt_id"], receipt_id.as_str());

    // Tampered body: signed over one body, another sent.
    let got = post(
        NEW,
        t,
        format!("{src}-3"),
        (s.body)(&format!("{src}-3"), 3),
        Some((s.body)(&format!("{src}-3"), 4)),
    )
    .await;
    assert_refused(&format!("{src}: tampered"), &got, 401, "bad_signature");

    // A secret nobody configured.
    let got = post(
        WRONG,
        t,
        format!("{src}-4"),
        (s.body)(&format!("{src}-4"), 4),
        None,
    )
    .await;
    assert_refused(&format!("{src}: wrong secret"), &got, 401, "bad_signature");

    // Stale (and future) timestamps, correctly signed.
    if s.signs_time {
        for ts in [t - 3600, t + 3600] {
            let got = post(
                NEW,
                ts,
                format!("{src}-5"),
                (s.body)(&format!("{src}-5"), 5),
                None,
            )
            .await;
            assert_refused(
                &format!("{src}: timestamp {ts}"),
                &got,
                401,
                "stale_timestamp",
            );
        }
    }

    // A required header missing.
    let body = (s.body)(&format!("{src}-6"), 6);
    let headers: Vec<_> = (s.sign)(NEW, t, &format!("{src}-6"), &body)
        .into_iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case(s.required_header))
        .collect();
    let got = ingest(d, src, &headers, body).await;
    assert_refused(
        &format!("{src}: missing header"),
        &got,
        401,
        "missing_header",
    );

    // Exactly the two accepted requests were stored, each with its receipt.
    let events = events_of(d, src).await;
    assert_eq!(events.len(), 2, "{src}: {events:?}");
    for e in &events {
        assert_eq!(e["type"], s.event_type, "{e}");
        assert_eq!(e["source"], src, "{e}");
        assert!(e["receipt_id"].is_string(), "{e}");
    }
    assert_eq!(events[0]["id"], event_id.as_str());
    assert_eq!(events[0]["receipt_id"], receipt_id.as_str());

    assert_eq!(receipts_metric(d, src, "accepted").await, 2, "{src}");
    assert_eq!(receipts_metric(d, src, "duplicate").await, 1, "{src}");
    assert_eq!(receipts_metric(d, src, "bad_signature").await, 2, "{src}");
    assert_eq!(receipts_metric(d, src, "missing_header").await, 1, "{src}");
    let stale = if s.signs_time { 2 } else { 0 };
    assert_eq!(
        receipts_metric(d, src, "stale_timestamp").await,
        stale,
        "{src}"
    );
}

async fn inbound_github_scheme(b: Backend) {
    let d = b.start(&config(""));
    exercise(&d, &GITHUB).await;
}

async fn inbound_stripe_scheme(b: Backend) {
    let d = b.start(&config(""));
    exercise(&d, &STRIPE).await;
    // Stripe sends one v1 per active secret during its own rotation: any match is enough.
    let t = now().to_string();
    let body = (STRIPE.body)("evt_multi", 9);
    let sig = |k: &str| hex(&mac(k.as_bytes(), &[t.as_bytes(), b".", &body]));
    let header = format!("t={t},v1={},v1={}", sig(WRONG), sig(OLD));
    let (status, v) = ingest(&d, "stripe", &[h("Stripe-Signature", header)], body).await;
    assert_eq!(status, 202, "{v}");
    // A JSON body becomes the event's data as it was sent.
    let (_, event) = d
        .get(&format!("/v1/events/{}", str_of(&v, "event_id")))
        .await;
    assert_eq!(event["data"]["data"], json!({"n": 9}), "{event}");
    assert_eq!(event["data"]["id"], "evt_multi", "{event}");
}

#[tokio::test]
async fn inbound_standard_webhooks_scheme() {
    let d = Daemon::start(&config(""));
    exercise(&d, &STANDARD).await;
    // Several signatures in one header (the sender's own rotation): any match is enough.
    let t = now().to_string();
    let body = (STANDARD.body)("msg_multi", 9);
    let sig = |k: &str| {
        B64.encode(mac(
            k.as_bytes(),
            &[b"msg_multi.", t.as_bytes(), b".", &body],
        ))
    };
    let headers = [
        h("webhook-id", "msg_multi"),
        h("webhook-timestamp", t.clone()),
        h(
            "webhook-signature",
            format!("v1,{} v1,{}", sig(WRONG), sig(NEW)),
        ),
    ];
    let (status, v) = ingest(&d, "sw", &headers, body).await;
    assert_eq!(status, 202, "{v}");
}

#[tokio::test]
async fn inbound_standard_webhooks_published_vector() {
    let d = Daemon::start(&config(""));
    let headers = [
        h("webhook-id", SW_DOC_ID),
        h("webhook-timestamp", SW_DOC_TIMESTAMP),
        h("webhook-signature", SW_DOC_SIGNATURE),
    ];
    // No "type" member in the example payload: verified, but it cannot become an event.
    let (status, v) = ingest(&d, "sw-doc", &headers, SW_DOC_PAYLOAD.into()).await;
    assert_refused("sw vector", &(status, v), 400, "missing_event_type");
    assert_eq!(receipts_metric(&d, "sw-doc", "missing_event_type").await, 1);
    assert!(events_of(&d, "sw-doc").await.is_empty());
    // One changed byte of the signature.
    let bad = SW_DOC_SIGNATURE.replace("g0hM", "g0hN");
    let headers = [
        h("webhook-id", SW_DOC_ID),
        h("webhook-timestamp", SW_DOC_TIMESTAMP),
        h("webhook-signature", bad),
    ];
    let got = ingest(&d, "sw-doc", &headers, SW_DOC_PAYLOAD.into()).await;
    assert_refused("sw vector, altered", &got, 401, "bad_signature");
}

#[tokio::test]
async fn inbound_generic_hmac_hex_scheme() {
    let d = Daemon::start(&config(""));
    exercise(&d, &HMAC_HEX).await;
}

#[tokio::test]
async fn inbound_generic_hmac_base64_with_timestamp() {
    let d = Daemon::start(&config(""));
    exercise(&d, &HMAC_TS).await;
    // The timestamp is signed: moving it breaks the signature rather than passing as stale.
    let t = now();
    let body = (HMAC_TS.body)("moved", 1);
    let mut headers = (HMAC_TS.sign)(NEW, t, "moved", &body);
    for (k, v) in &mut headers {
        if k == "X-Timestamp" {
            *v = (t - 1).to_string();
        }
    }
    let got = ingest(&d, "hmac-ts", &headers, body).await;
    assert_refused("moved timestamp", &got, 401, "bad_signature");
}

async fn inbound_github_published_vector_fans_out_with_a_readable_receipt(b: Backend) {
    let rx = Receiver::start().await;
    let cfg = config(&format!(
        r#"
[[subscriptions]]
id = "ci"
url = "{}"
event_types = ["github.*"]
secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
"#,
        rx.url("/hook")
    ));
    let d = b.start(&cfg);
    let mut headers = github_doc_headers();
    headers.push(h("User-Agent", "GitHub-Hookshot/044aadd"));
    // A credential that has no business here: never kept.
    headers.push(h("Authorization", "Bearer not-for-receipts"));
    let mut req = d
        .http
        .post(d.url("/v1/ingest/gh-doc"))
        .header("content-type", "text/plain")
        .body(GITHUB_DOC_PAYLOAD);
    for (k, v) in &headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let (status, accepted) = d.send(req).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["deliveries"], 1, "{accepted}");
    let event_id = str_of(&accepted, "event_id").to_string();
    let receipt_id = str_of(&accepted, "receipt_id").to_string();

    // Delivered like a published event; a non-JSON body is the data as a JSON string.
    let got = rx.wait_for(1, WAIT).await;
    let delivered = got[0].json();
    assert_eq!(delivered["type"], "github.ping", "{delivered}");
    assert_eq!(delivered["id"], event_id.as_str(), "{delivered}");
    assert_eq!(delivered["data"], GITHUB_DOC_PAYLOAD, "{delivered}");
    assert_eq!(got[0].header("webhook-id"), Some(event_id.as_str()));

    // The receipt: raw request, verification, the event it became.
    let (status, r) = d.get(&format!("/v1/receipts/{receipt_id}")).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["id"], receipt_id.as_str());
    assert_eq!(r["source"], "gh-doc");
    assert_eq!(r["method"], "POST");
    assert_eq!(r["body"], GITHUB_DOC_PAYLOAD);
    assert_eq!(r["body_encoding"], "utf-8");
    assert_eq!(r["body_size"], GITHUB_DOC_PAYLOAD.len());
    assert_eq!(r["event_id"], event_id.as_str());
    assert_eq!(r["delivery_id"], "72d3162e-cc78-11e3-81ab-4c9367dc0958");
    assert_eq!(r["verification"]["scheme"], "github");
    assert_eq!(r["verification"]["result"], "verified");
    assert!(
        r["received_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{r}"
    );
    let headers = r["headers"].as_array().cloned().unwrap_or_default();
    let header = |name: &str| {
        headers
            .iter()
            .find(|h| h["name"] == name)
            .and_then(|h| h["value"].as_str())
            .map(str::to_string)
    };
    assert_eq!(
        header("x-hub-signature-256").as_deref(),
        Some(GITHUB_DOC_SIGNATURE)
    );
    assert_eq!(header("x-github-event").as_deref(), Some("ping"));
    assert_eq!(header("authorization"), None, "{r}");

    // The event points back at its receipt.
    let (_, event) = d.get(&format!("/v1/events/{event_id}")).await;
    assert_eq!(event["receipt_id"], receipt_id.as_str(), "{event}");

    // Neither the secret nor the credential reaches the log or the receipt.
    let text = r.to_string();
    assert!(!text.contains(GITHUB_DOC_SECRET) && !text.contains("not-for-receipts"));
    assert!(!d.logs().contains(GITHUB_DOC_SECRET));

    // A redelivery by the provider is acknowledged and delivered no second time.
    let mut req = d
        .http
        .post(d.url("/v1/ingest/gh-doc"))
        .body(GITHUB_DOC_PAYLOAD);
    for (k, v) in &github_doc_headers() {
        req = req.header(k.as_str(), v.as_str());
    }
    let (status, dup) = d.send(req).await;
    assert_eq!(status, 200, "{dup}");
    assert_eq!(dup["duplicate"], true);
    assert_eq!(dup["receipt_id"], receipt_id.as_str());
    // Nothing new was stored, so there is nothing to deliver a second time.
    let (_, events) = d.get("/v1/events?source=gh-doc").await;
    assert_eq!(
        events["items"].as_array().map(Vec::len),
        Some(1),
        "{events}"
    );
    let (_, dl) = d.get(&format!("/v1/events/{event_id}/deliveries")).await;
    assert_eq!(dl["items"].as_array().map(Vec::len), Some(1), "{dl}");
    assert_eq!(rx.received().len(), 1);
    assert_eq!(receipts_metric(&d, "gh-doc", "accepted").await, 1);
    assert_eq!(receipts_metric(&d, "gh-doc", "duplicate").await, 1);
}

/// The headers of GitHub's example delivery.
fn github_doc_headers() -> Headers {
    vec![
        h("X-Hub-Signature-256", GITHUB_DOC_SIGNATURE),
        h("X-GitHub-Event", "ping"),
        h("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
    ]
}

async fn inbound_refusals_store_nothing(b: Backend) {
    let d = b.start(&config(""));
    // Unknown source.
    let got = ingest(&d, "nope", &[], b"{}".to_vec()).await;
    assert_refused("unknown source", &got, 404, "not_found");
    // Over the source's own limit (64 bytes), before any verification.
    let big = vec![b'x'; 65];
    let headers = (GITHUB.sign)(NEW, 0, "big", &big);
    let got = ingest(&d, "small", &headers, big).await;
    assert_refused("over max_body", &got, 413, "payload_too_large");
    assert_eq!(receipts_metric(&d, "small", "payload_too_large").await, 1);
    // Malformed signature header.
    let got = ingest(
        &d,
        "gh",
        &[
            h("X-Hub-Signature-256", "sha1=abcd"),
            h("X-GitHub-Event", "push"),
        ],
        b"{}".to_vec(),
    )
    .await;
    assert_refused("malformed", &got, 401, "malformed_header");
    assert_eq!(receipts_metric(&d, "gh", "malformed_header").await, 1);
    // Verified, but without the provider delivery id the source de-duplicates by.
    let body = b"{}".to_vec();
    let headers: Vec<_> = (GITHUB.sign)(NEW, 0, "x", &body)
        .into_iter()
        .filter(|(k, _)| k != "X-GitHub-Delivery")
        .collect();
    let got = ingest(&d, "gh", &headers, body).await;
    assert_refused("no delivery id", &got, 400, "missing_delivery_id");
    // GET on the ingest route is not allowed.
    let (status, _) = d.get("/v1/ingest/gh").await;
    assert_eq!(status, 405);
    // Unknown receipts.
    let (status, _) = d.get("/v1/receipts/999").await;
    assert_eq!(status, 404);
    let (status, _) = d.get("/v1/receipts/abc").await;
    assert_eq!(status, 404);

    // Verified, but its data nests deeper than events may (100 levels): a 400 naming the
    // limit, whether serde_json's own limit would catch it or not.
    for levels in [101, 100_000] {
        let body = ("[".repeat(levels) + &"]".repeat(levels)).into_bytes();
        let headers = (GITHUB.sign)(NEW, 0, &format!("deep-{levels}"), &body);
        let got = ingest(&d, "gh", &headers, body).await;
        assert_refused("deep data", &got, 400, "invalid_event");
        assert!(got.1.to_string().contains("100 levels"), "{}", got.1);
    }
    assert_eq!(receipts_metric(&d, "gh", "invalid_event").await, 2);

    let (_, all) = d.get("/v1/events").await;
    assert_eq!(all["items"], json!([]), "{all}");
}

#[tokio::test]
async fn inbound_needs_no_token_but_receipts_need_admin() {
    let cfg = config(
        r#"
[auth]
tokens = [
  { token = "publish-token-aaaaaaaa", scopes = ["publish"] },
  { token = "admin-token-bbbbbbbbbbb", scopes = ["admin"] },
]
"#,
    );
    let d = Daemon::start(&cfg);
    let body = (GITHUB.body)("", 1);
    let headers = (GITHUB.sign)(NEW, 0, "tok-1", &body);
    let (status, v) = ingest(&d, "gh", &headers, body).await;
    assert_eq!(status, 202, "{v}");
    let path = format!("/v1/receipts/{}", str_of(&v, "receipt_id"));
    let (status, _) = d.get(&path).await;
    assert_eq!(status, 401);
    let (status, _) = d
        .send(
            d.http
                .get(d.url(&path))
                .bearer_auth("publish-token-aaaaaaaa"),
        )
        .await;
    assert_eq!(status, 403);
    let (status, r) = d
        .send(
            d.http
                .get(d.url(&path))
                .bearer_auth("admin-token-bbbbbbbbbbb"),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["delivery_id"], "tok-1");
}

#[tokio::test]
async fn inbound_binary_body_is_kept_exactly() {
    let d = Daemon::start(&config(""));
    let body = vec![0xff, 0x00, b'{', 0x80];
    let headers = (GITHUB.sign)(NEW, 0, "bin-1", &body);
    let (status, v) = ingest(&d, "gh", &headers, body.clone()).await;
    assert_eq!(status, 202, "{v}");
    let (_, r) = d
        .get(&format!("/v1/receipts/{}", str_of(&v, "receipt_id")))
        .await;
    assert_eq!(r["body_encoding"], "base64", "{r}");
    assert_eq!(r["body"], B64.encode(&body), "{r}");
    let (_, e) = d
        .get(&format!("/v1/events/{}", str_of(&v, "event_id")))
        .await;
    assert_eq!(e["data"], "\u{fffd}\u{0}{\u{fffd}", "{e}");
}

#[tokio::test]
async fn inbound_rate_limit_answers_429() {
    let d = Daemon::start(&config(
        r#"
[[sources]]
id = "limited"
scheme = "github"
secrets = ["new-secret-0002"]
rate_limit = "1/h"
"#,
    ));
    let body = (GITHUB.body)("", 1);
    let (status, v) = ingest(
        &d,
        "limited",
        &(GITHUB.sign)(NEW, 0, "r-1", &body),
        body.clone(),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let got = ingest(&d, "limited", &(GITHUB.sign)(NEW, 0, "r-2", &body), body).await;
    assert_refused("rate limited", &got, 429, "rate_limited");
    assert_eq!(receipts_metric(&d, "limited", "rate_limited").await, 1);
}

#[test]
fn inbound_bad_sources_are_refused_at_config_load() {
    let Ok(tmp) = tempfile::tempdir() else {
        panic!("tempdir");
    };
    let file = tmp.path().join("bad.toml");
    let text = "[[sources]]\nid = \"ok\"\nscheme = \"github\"\nsecrets = [\"s\"]\n\n\
                [[sources]]\nid = \"sw\"\nscheme = \"standard-webhooks\"\n\
                secrets = [\"whsec_%%%not-base64%%%\"]\nevent_type = \"body:type\"\n\n\
                [[sources]]\nid = \"generic\"\nscheme = \"hmac-sha256\"\nsecrets = [\"k\"]\n";
    if let Err(e) = std::fs::write(&file, text) {
        panic!("write: {e}");
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dispatchd"));
    cmd.arg("check-config").arg(&file);
    let out = crate::support::run_bounded(cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    let name = file.display().to_string();
    for want in [
        // A key's own line when it is written, else its table's.
        format!("{name}:9: sources[1].secrets[0]"),
        format!("{name}:10: sources[1].event_type"),
        format!("{name}:12: sources[2].signature_header"),
        format!("{name}:12: sources[2].event_type"),
    ] {
        assert!(stderr.contains(&want), "{want:?} not in:\n{stderr}");
    }
    assert!(
        !stderr.contains("not-base64%%%"),
        "a secret was printed:\n{stderr}"
    );
    assert!(!stderr.contains("sources[0]"), "{stderr}");
}

/// Sends `body` signed by GitHub's scheme under `delivery` to `source`.
async fn github(d: &Daemon, source: &str, delivery: &str, body: &[u8]) -> (u16, Value) {
    let headers = (GITHUB.sign)(NEW, 0, delivery, body);
    ingest(d, source, &headers, body.to_vec()).await
}

/// GitHub signs only the body: the same signed body sent again under a new delivery id, or
/// claiming another event type, is a replay, answered as a duplicate and stored nowhere.
/// With `dedup = "delivery-id"` the source trusts the delivery id alone.
async fn a_signed_github_body_replayed_under_a_new_delivery_id_is_a_duplicate(b: Backend) {
    let cfg = config(&format!(
        "[[sources]]\nid = \"gh-by-id\"\nscheme = \"github\"\nsecrets = [\"{NEW}\"]\ndedup = \"delivery-id\"\n"
    ));
    let d = b.start(&cfg);
    let body = (GITHUB.body)("", 7);
    let first = github(&d, "gh", "delivery-1", &body).await;
    assert_eq!(first.0, 202, "{}", first.1);
    let replayed = github(&d, "gh", "delivery-2", &body).await;
    assert_eq!(replayed.0, 200, "{}", replayed.1);
    assert_eq!(replayed.1["duplicate"], true, "{}", replayed.1);
    assert_eq!(
        replayed.1["event_id"], first.1["event_id"],
        "{}",
        replayed.1
    );
    // Another event type in the unsigned header changes nothing either.
    let relabelled: Vec<_> = (GITHUB.sign)(NEW, 0, "delivery-3", &body)
        .into_iter()
        .map(|(k, v)| {
            if k == "X-GitHub-Event" {
                (k, "deployment".to_string())
            } else {
                (k, v)
            }
        })
        .collect();
    let relabelled = ingest(&d, "gh", &relabelled, body.clone()).await;
    assert_eq!(relabelled.1["duplicate"], true, "{}", relabelled.1);
    let (_, all) = d.get("/v1/events?source=gh").await;
    assert_eq!(all["items"].as_array().map(Vec::len), Some(1), "{all}");
    // A different body is a new event.
    let other = (GITHUB.body)("", 8);
    let got = github(&d, "gh", "delivery-4", &other).await;
    assert_eq!(got.0, 202, "{}", got.1);
    // Opted out: only the delivery id counts.
    let a = github(&d, "gh-by-id", "delivery-1", &body).await;
    let b = github(&d, "gh-by-id", "delivery-2", &body).await;
    assert_eq!((a.0, b.0), (202, 202), "{} {}", a.1, b.1);
}

/// Sends `body` signed by the HMAC (hex, no timestamp) scheme under request id `id`.
async fn hmac_hex(d: &Daemon, id: &str, body: &[u8]) -> (u16, Value) {
    let headers = (HMAC_HEX.sign)(NEW, 0, id, body);
    ingest(d, HMAC_HEX.source, &headers, body.to_vec()).await
}

/// Fingerprints are kept in the database (a restart does not forget them), are on by default
/// for `hmac-sha256` without a timestamp, and stop counting once their window has passed.
async fn body_fingerprints_survive_a_restart_and_count_for_their_window_only(b: Backend) {
    let cfg = config(&format!(
        "[[sources]]\nid = \"gh-short\"\nscheme = \"github\"\nsecrets = [\"{NEW}\"]\ndedup_window = \"2s\"\n"
    ));
    let mut d = b.start(&cfg);
    let tmp = d.keep_dir();
    let dup = |r: &(u16, Value)| r.0 == 200 && r.1["duplicate"] == true;
    let body = (GITHUB.body)("", 1);
    let shop = (HMAC_HEX.body)("", 1);
    assert_eq!(github(&d, "gh", "delivery-1", &body).await.0, 202);
    let first = hmac_hex(&d, "request-1", &shop).await;
    assert_eq!(first.0, 202, "{}", first.1);
    let replayed = hmac_hex(&d, "request-2", &shop).await;
    assert!(dup(&replayed), "{}", replayed.1);

    d.terminate();
    let d = b.start_in(&d.dir.clone(), &cfg);
    let replayed = github(&d, "gh", "delivery-2", &body).await;
    assert!(dup(&replayed), "after a restart: {}", replayed.1);
    let replayed = hmac_hex(&d, "request-3", &shop).await;
    assert!(dup(&replayed), "after a restart: {}", replayed.1);
    for (source, n) in [("gh", 1), ("hmac-hex", 1)] {
        let (_, all) = d.get(&format!("/v1/events?source={source}")).await;
        assert_eq!(all["items"].as_array().map(Vec::len), Some(n), "{all}");
    }

    // A 2s window: a replay within it is a duplicate, one after it a new event (whose
    // fingerprint then counts afresh).
    let started = tokio::time::Instant::now();
    assert_eq!(github(&d, "gh-short", "short-0", &body).await.0, 202);
    let mut n = 0;
    let accepted = loop {
        n += 1;
        let r = github(&d, "gh-short", &format!("short-{n}"), &body).await;
        if r.0 == 202 {
            break started.elapsed();
        }
        assert!(dup(&r), "{}", r.1);
        assert!(started.elapsed() < WAIT, "still a duplicate after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(accepted >= Duration::from_secs(2), "new after {accepted:?}");
    let again = github(&d, "gh-short", "short-last", &body).await;
    assert!(dup(&again), "{}", again.1);
    let (_, all) = d.get("/v1/events?source=gh-short").await;
    assert_eq!(all["items"].as_array().map(Vec::len), Some(2), "{all}");
    drop(d);
    drop(tmp);
}

crate::both!(
    inbound_github_scheme,
    inbound_stripe_scheme,
    inbound_refusals_store_nothing,
    a_signed_github_body_replayed_under_a_new_delivery_id_is_a_duplicate,
    body_fingerprints_survive_a_restart_and_count_for_their_window_only,
    inbound_github_published_vector_fans_out_with_a_readable_receipt,
);

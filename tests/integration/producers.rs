//! What producers rely on: the single `secret` shorthand, the rate limiter's burst and its
//! counter, the breaker's half-open probes.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::receiver::Receiver;
use crate::support::{Daemon, verify_signature};

const WAIT: Duration = Duration::from_secs(30);
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A daemon that may deliver to loopback, with `extra` appended to its config.
fn daemon(extra: &str) -> Daemon {
    Daemon::start(&format!(
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
    let d = daemon(&format!(
        "[[subscriptions]]\nid = \"paced\"\nurl = \"{}\"\nsecrets = [\"{SECRET}\"]\nrate_limit = \"4/s\"\nrate_limit_burst = 3\n",
        rx.url("/hook")
    ));
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
}

//! Regression tests for what a hostile client or a careless operator could break: huge
//! durations, unparsable URLs and secrets, framing headers, credentials in URLs, deep data.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Daemon, bin, run_bounded, wait_delivery};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn check_config(dir: &Path, text: &str) -> Output {
    let file = dir.join("dispatchd.toml");
    if let Err(e) = std::fs::write(&file, text) {
        panic!("write config: {e}");
    }
    let mut cmd = bin();
    cmd.arg("check-config").arg(&file);
    run_bounded(cmd, Duration::from_secs(60))
}

/// check-config refuses `text`; answers its stderr, which must name `needle`.
fn refused(text: &str, needle: &str) -> String {
    let tmp = match tempfile::tempdir() {
        Ok(t) => t,
        Err(e) => panic!("tempdir: {e}"),
    };
    let out = check_config(tmp.path(), text);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "accepted:\n{text}");
    assert!(err.contains(needle), "{needle:?} not in:\n{err}");
    assert!(err.contains("dispatchd.toml:"), "no file:line in:\n{err}");
    err
}

fn sub_toml(url: &str, extra: &str) -> String {
    format!(
        "[[subscriptions]]\nid = \"s\"\nurl = {}\nsecrets = [\"{SECRET}\"]\n{extra}\n",
        toml::Value::String(url.into())
    )
}

fn sub_json(url: &str) -> Value {
    json!({"id": "s", "url": url, "secrets": [SECRET]})
}

fn assert_error(got: &(u16, Value), status: u16, code: &str, what: &str) {
    assert_eq!(got.0, status, "{what}: {}", got.1);
    assert_eq!(got.1["error"]["code"], code, "{what}: {}", got.1);
}

#[test]
fn huge_durations_are_refused_by_check_config() {
    let err = refused(
        &sub_toml(
            "https://example.com/h",
            "retry = { initial = \"99999999999d\", max = \"99999999999d\" }",
        ),
        "subscriptions[0].retry.initial",
    );
    assert!(err.contains("3650d"), "{err}");
    let err = refused(
        "[storage]\nretention = \"9999999999999d\"\n",
        "storage.retention",
    );
    assert!(err.contains("3650d"), "{err}");
}

/// Every duration setting of the file, one past its bound: each is refused with its key.
#[test]
fn every_duration_in_the_file_is_bounded() {
    let source = "[[sources]]\nid = \"gh\"\nscheme = \"github\"\nsecrets = [\"a-github-secret\"]\n";
    let cases = [
        (
            "[server]\nshutdown_timeout = \"3651d\"\n".to_string(),
            "server.shutdown_timeout",
        ),
        (
            "[server]\nheader_read_timeout = \"3651d\"\n".into(),
            "server.header_read_timeout",
        ),
        (
            "[server]\nbody_read_timeout = \"3651d\"\n".into(),
            "server.body_read_timeout",
        ),
        (
            "[server]\nresponse_write_timeout = \"3651d\"\n".into(),
            "server.response_write_timeout",
        ),
        (
            "[storage]\nsweep_interval = \"3651d\"\n".into(),
            "storage.sweep_interval",
        ),
        (
            "[delivery]\ntimeout = \"3651d\"\n".into(),
            "delivery.timeout",
        ),
        (
            "[delivery]\nscheduler_horizon = \"3651d\"\n".into(),
            "delivery.scheduler_horizon",
        ),
        (
            "[delivery]\nauto_disable_after = \"3651d\"\n".into(),
            "delivery.auto_disable_after",
        ),
        (
            sub_toml("https://example.com/h", "timeout = \"3651d\""),
            "subscriptions[0].timeout",
        ),
        (
            sub_toml(
                "https://example.com/h",
                "retry = { initial = \"1s\", max = \"3651d\" }",
            ),
            "subscriptions[0].retry.max",
        ),
        (
            sub_toml("https://example.com/h", "breaker = { window = \"3651d\" }"),
            "subscriptions[0].breaker.window",
        ),
        (
            sub_toml(
                "https://example.com/h",
                "breaker = { cooldown = \"3651d\" }",
            ),
            "subscriptions[0].breaker.cooldown",
        ),
        (
            format!("{source}dedup_window = \"3651d\"\n"),
            "sources[0].dedup_window",
        ),
        (
            format!("{source}tolerance = \"36526d\"\n"),
            "sources[0].tolerance",
        ),
    ];
    for (text, key) in &cases {
        let err = refused(text, key);
        assert!(
            err.contains("3650d") || err.contains("100years"),
            "{key}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_durations_are_refused_by_the_api_and_every_list_still_answers() {
    let d = Daemon::start("[delivery]\nallow_private_networks = true\n");
    let mut huge = sub_json("http://127.0.0.1:9/");
    huge["retry"] = json!({"initial": "99999999999d", "max": "99999999999d"});
    let got = d.post("/v1/subscriptions", &huge).await;
    assert_error(&got, 400, "invalid_subscription", "huge backoff");
    assert!(got.1.to_string().contains("3650d"), "{}", got.1);
    for (field, value) in [
        ("timeout", json!("3651d")),
        ("breaker", json!({"cooldown": "3651d"})),
        ("breaker", json!({"window": "3651d"})),
    ] {
        let mut s = sub_json("http://127.0.0.1:9/");
        s[field] = value;
        let got = d.post("/v1/subscriptions", &s).await;
        assert_error(&got, 400, "invalid_subscription", field);
        assert!(got.1.to_string().contains(field), "{}", got.1);
    }

    let got = d
        .post("/v1/subscriptions", &sub_json("http://127.0.0.1:9/"))
        .await;
    assert_eq!(got.0, 201, "{}", got.1);
    let got = d
        .post(
            "/v1/subscriptions/s/rotate",
            &json!({"grace": "9999999999999d"}),
        )
        .await;
    assert_error(&got, 400, "invalid_body", "huge grace");
    let got = d
        .post("/v1/subscriptions/s/rotate", &json!({"grace": "3650d"}))
        .await;
    assert_eq!(got.0, 200, "the longest grace is accepted: {}", got.1);
    for path in ["/v1/subscriptions", "/v1/subscriptions/s", "/v1/deliveries"] {
        let (status, body) = d.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
}

/// A rate so slow that the wait for a token passes every bound: the destination task added
/// that wait (Duration::MAX) to the clock and panicked, stranding its deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_too_slow_to_wait_for_is_refused() {
    let tiny = format!("0.{}1/s", "0".repeat(30));
    let err = refused(
        &sub_toml("https://example.com/h", &format!("rate_limit = \"{tiny}\"")),
        "subscriptions[0].rate_limit",
    );
    assert!(err.contains("3650d"), "{err}");
    let d = Daemon::start("");
    let mut s = sub_json("https://example.com/h");
    s["rate_limit"] = Value::from(tiny);
    let got = d.post("/v1/subscriptions", &s).await;
    assert_error(&got, 400, "invalid_subscription", "slow rate");
    assert!(got.1.to_string().contains("rate_limit"), "{}", got.1);
    s["rate_limit"] = Value::from("1/h");
    let got = d.post("/v1/subscriptions", &s).await;
    assert_eq!(got.0, 201, "{}", got.1);
}

const BAD_URLS: &[&str] = &[
    "http://host:99999/",
    "http://[",
    "http://a b/x",
    "http://%zz/",
    "ftp://example.com/",
    "http:///path",
];

#[test]
fn unparsable_urls_are_refused_by_check_config() {
    for url in BAD_URLS {
        refused(&sub_toml(url, ""), "subscriptions[0].url");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_urls_framing_headers_and_private_literals_are_refused_by_the_api() {
    let d = Daemon::start("");
    for url in BAD_URLS {
        let got = d.post("/v1/subscriptions", &sub_json(url)).await;
        assert_error(&got, 400, "invalid_subscription", url);
        assert!(got.1.to_string().contains("url"), "{url}: {}", got.1);
    }
    for name in [
        "Transfer-Encoding",
        "connection",
        "TE",
        "Upgrade",
        "Keep-Alive",
        "Proxy-Authorization",
        "proxy-connection",
        "Host",
        "Content-Length",
    ] {
        let mut s = sub_json("https://example.com/h");
        s["headers"] = json!({ name: "x" });
        let got = d.post("/v1/subscriptions", &s).await;
        assert_error(&got, 400, "invalid_subscription", name);
    }
    for url in [
        "http://127.0.0.1:9/",
        "http://10.1.2.3/",
        "http://[::1]/",
        "http://169.254.169.254/",
    ] {
        let got = d.post("/v1/subscriptions", &sub_json(url)).await;
        assert_error(&got, 400, "invalid_subscription", url);
        assert!(
            got.1.to_string().contains("allow_private_networks"),
            "{url}: {}",
            got.1
        );
    }
    let (_, list) = d.get("/v1/subscriptions").await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "{list}");
}

#[test]
fn framing_headers_and_bad_secrets_fail_check_config() {
    refused(
        &sub_toml(
            "https://example.com/h",
            "headers = { \"Transfer-Encoding\" = \"chunked\" }",
        ),
        "subscriptions[0].headers",
    );
    refused(
        &sub_toml(
            "https://example.com/h",
            "headers = { \"Proxy-Authorization\" = \"x\" }",
        ),
        "subscriptions[0].headers",
    );
    // A whsec_ prefix with something that is not base64 behind it.
    let text = "[[subscriptions]]\nid = \"s\"\nurl = \"https://example.com/h\"\nsecrets = [\"whsec_%%%not-base64%%%\"]\n";
    refused(text, "subscriptions[0].secrets");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_a_url_appear_in_no_log_error_or_answer() {
    // Nothing listens on port 9 of loopback: every attempt fails with a connection error
    // whose text, unredacted, would carry the URL.
    let url = "http://operator:hunter2-pass@127.0.0.1:9/hook?token=tok-s3cr3t-value&x=1";
    let d = Daemon::start(&format!(
        "[delivery]\nallow_private_networks = true\n\n{}",
        sub_toml(url, "retry = { max_attempts = 1 }")
    ));
    let ev = d.publish("a", json!({})).await;
    let id = ev["id"].as_str().unwrap_or_default().to_string();
    let dl = wait_delivery(&d, &id, "dead").await;
    let last_error = dl["last_error"].as_str().unwrap_or_default();
    assert!(last_error.starts_with("connect"), "{dl}");
    let (_, subs) = d.get("/v1/subscriptions").await;
    assert_eq!(
        subs["items"][0]["url"],
        "http://operator:***@127.0.0.1:9/hook?token=***&x=***"
    );
    let (_, one) = d.get("/v1/subscriptions/s").await;
    let (_, attempts) = d
        .get(&format!("/v1/deliveries/{}/attempts", dl["id"]))
        .await;
    for (what, text) in [
        ("last_error", dl.to_string()),
        ("attempts", attempts.to_string()),
        ("subscriptions", subs.to_string()),
        ("subscription", one.to_string()),
        ("log", d.logs()),
    ] {
        assert!(!text.contains("hunter2"), "password in {what}: {text}");
        assert!(!text.contains("tok-s3cr3t"), "token in {what}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_data_is_refused_and_nothing_is_stored() {
    let d = Daemon::start("");
    let deep = "[".repeat(100_000) + &"]".repeat(100_000);
    let body = format!(r#"{{"type":"a","data":{deep}}}"#);
    let got = d
        .send(
            d.http
                .post(d.url("/v1/events"))
                .header("content-type", "application/json")
                .body(body),
        )
        .await;
    assert_error(&got, 400, "invalid_event", "deep data");
    assert!(got.1.to_string().contains("100 levels"), "{}", got.1);
    let batch =
        format!(r#"{{"events":[{{"type":"a","data":{{}}}},{{"type":"a","data":{deep}}}]}}"#);
    let got = d
        .send(
            d.http
                .post(d.url("/v1/events/batch"))
                .header("content-type", "application/json")
                .body(batch),
        )
        .await;
    assert_error(&got, 400, "invalid_event", "deep batch item");
    let (_, events) = d.get("/v1/events").await;
    assert_eq!(
        events["items"].as_array().map(Vec::len),
        Some(0),
        "{events}"
    );
    // The deepest data allowed is accepted.
    let ok = "[".repeat(100) + &"]".repeat(100);
    d.publish("a", serde_json::from_str(&ok).unwrap_or(Value::Null))
        .await;
}

/// Opens a connection that sends a request head announcing a body, a few bytes of it, and
/// then nothing; answers the stream, to be read later.
async fn slow_body(addr: std::net::SocketAddr, path: &str) -> Option<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 4096\r\n\r\n{{\"type\":"
    );
    s.write_all(head.as_bytes()).await.ok()?;
    Some(s)
}

/// 300 clients that send their headers and then trickle nothing of the body, on an
/// unauthenticated inbound route and on publish, against a daemon limited to 256 open files:
/// each is answered 408 within the body deadline, and meanwhile publishes and /readyz from a
/// well-behaved client keep answering. Without the deadline and the connection cap, the
/// daemon runs out of descriptors and every new connection stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_body_clients_do_not_starve_publishes_or_health_checks() {
    use tokio::io::AsyncReadExt;
    let d = Daemon::start_with_open_files(
        "[server]\nbody_read_timeout = \"1s\"\n\n[[sources]]\nid = \"gh\"\nscheme = \"github\"\nsecrets = [\"a-github-secret\"]\n",
        256,
    );
    let mut slow = Vec::new();
    for i in 0..300 {
        let path = if i % 2 == 0 {
            "/v1/ingest/gh"
        } else {
            "/v1/events"
        };
        if let Some(s) = slow_body(d.addr, path).await {
            slow.push(s);
        }
    }
    assert_eq!(
        slow.len(),
        300,
        "every slow client could connect (the backlog holds them)"
    );
    // Well-behaved traffic while the slow clients hold their connections.
    let started = tokio::time::Instant::now();
    for i in 0..20 {
        let client = crate::support::client();
        let ok = tokio::time::timeout(Duration::from_secs(20), async {
            let r = client.get(d.url("/readyz")).send().await.ok()?;
            let ready = r.status().as_u16();
            let p = client
                .post(d.url("/v1/events"))
                .header("content-type", "application/json")
                .body(format!(r#"{{"type":"ok","data":{{"i":{i}}}}}"#))
                .send()
                .await
                .ok()?;
            Some((ready, p.status().as_u16()))
        })
        .await;
        assert_eq!(
            ok,
            Ok(Some((200, 202))),
            "request {i} of the well-behaved client\n{}",
            d.logs()
        );
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    // Every slow client was answered 408 and its connection closed.
    let mut timed_out = 0;
    for mut s in slow {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf);
        if matches!(read, Ok(Ok(_))) && text.starts_with("HTTP/1.1 408") {
            assert!(text.contains(r#""code":"request_timeout""#), "{text}");
            timed_out += 1;
        }
    }
    assert_eq!(timed_out, 300);
    let (_, events) = d.get("/v1/events?limit=100").await;
    assert_eq!(
        events["items"].as_array().map(Vec::len),
        Some(20),
        "{events}"
    );
}

/// The subscriptions API shows a URL's password and query values masked, in every answer;
/// sending the definition back as it was shown keeps the stored URL, whose password and query
/// still reach the receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masked_url_sent_back_keeps_its_password() {
    use base64::Engine;
    let rx = crate::support::receiver::Receiver::start().await;
    let d = Daemon::start("[delivery]\nallow_private_networks = true\n");
    let url = format!(
        "http://hook-user:s3cret-pw@{}/in?token=tok-v4lue&x=1",
        rx.addr
    );
    let got = d.post("/v1/subscriptions", &sub_json(&url)).await;
    assert_eq!(got.0, 201, "{}", got.1);
    let (_, shown) = d.get("/v1/subscriptions/s").await;
    let masked = format!("http://hook-user:***@{}/in?token=***&x=***", rx.addr);
    assert_eq!(shown["url"], masked.as_str(), "{shown}");
    assert_eq!(
        got.1["url"],
        masked.as_str(),
        "the created answer: {}",
        got.1
    );
    let put = d
        .send(
            d.http
                .put(d.url("/v1/subscriptions/s"))
                .header("content-type", "application/json")
                .body(json!({"url": masked, "event_types": ["*"]}).to_string()),
        )
        .await;
    assert_eq!(put.0, 200, "{}", put.1);
    assert_eq!(
        put.1["url"],
        masked.as_str(),
        "the updated answer: {}",
        put.1
    );
    d.publish("a", json!({})).await;
    let received = rx.wait_for(1, Duration::from_secs(30)).await;
    let basic = base64::engine::general_purpose::STANDARD.encode("hook-user:s3cret-pw");
    assert_eq!(
        received[0].header("authorization"),
        Some(format!("Basic {basic}").as_str())
    );
    assert_eq!(received[0].query.as_deref(), Some("token=tok-v4lue&x=1"));
    assert!(!d.logs().contains("s3cret-pw") && !d.logs().contains("tok-v4lue"));
}

/// Rewrites the stored definition of API subscription `id` in the stopped daemon's database,
/// as an older version that accepted it would have stored it.
fn store_url(dir: &Path, id: &str, url: &str) {
    use dispatchd::storage::schema::SubscriptionRecord;
    use dispatchd::storage::schema::{SUBSCRIPTIONS, decode, encode};
    use redb::ReadableDatabase;
    let path = dir.join("data").join("dispatchd.redb");
    if let Err(e) = dispatchd::storage::journal::recover(&path) {
        panic!("replay the journal of {}: {e}", path.display());
    }
    let db = match redb::Database::open(&path) {
        Ok(db) => db,
        Err(e) => panic!("open {}: {e}", path.display()),
    };
    let read = || -> Result<Option<Vec<u8>>, Box<dyn std::error::Error>> {
        let r = db.begin_read()?;
        let t = r.open_table(SUBSCRIPTIONS)?;
        Ok(t.get(id)?.map(|v| v.value().to_vec()))
    };
    let bytes = match read() {
        Ok(Some(b)) => b,
        other => panic!("read subscription {id}: {other:?}"),
    };
    let mut rec: SubscriptionRecord = match decode(&bytes, "subscription") {
        Ok(r) => r,
        Err(e) => panic!("decode: {e}"),
    };
    let mut spec: Value = serde_json::from_str(&rec.spec).unwrap_or(Value::Null);
    spec["url"] = Value::from(url);
    rec.spec = spec.to_string();
    let write = || -> Result<(), Box<dyn std::error::Error>> {
        let w = db.begin_write()?;
        w.open_table(SUBSCRIPTIONS)?
            .insert(id, encode(&rec)?.as_slice())?;
        w.commit()?;
        Ok(())
    };
    if let Err(e) = write() {
        panic!("write subscription {id}: {e}");
    }
}

/// A stored API subscription that no longer validates (its URL, accepted by an older
/// version, is refused now) is not skipped: it is shown with the reason, and its deliveries
/// go dead with that reason instead of waiting pending, unattempted, for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_subscription_that_no_longer_validates_sends_its_deliveries_to_dead() {
    let text = "[delivery]\nallow_private_networks = true\n";
    let mut d = Daemon::start(text);
    let got = d
        .post("/v1/subscriptions", &sub_json("http://127.0.0.1:9/x"))
        .await;
    assert_eq!(got.0, 201, "{}", got.1);
    let paused = d
        .send(d.http.post(d.url("/v1/subscriptions/s/pause")))
        .await;
    assert_eq!(paused.0, 200, "{}", paused.1);
    let ev = d.publish("a", json!({})).await;
    let id = ev["id"].as_str().unwrap_or_default().to_string();
    let held = wait_delivery(&d, &id, "pending").await;
    assert_eq!(held["attempts"], 0, "{held}");

    let keep = d.keep_dir();
    let status = d.terminate();
    assert!(status.success(), "{status:?}\n{}", d.logs());
    store_url(&d.dir, "s", "http://a b/x");
    let d = Daemon::start_in(&d.dir, text);
    let _keep = keep;

    let (status, shown) = d.get("/v1/subscriptions/s").await;
    assert_eq!(
        status, 200,
        "the stored subscription is still there: {shown}"
    );
    let why = shown["unusable"].as_str().unwrap_or_default();
    assert!(why.contains("url"), "{shown}");
    let resumed = d
        .send(d.http.post(d.url("/v1/subscriptions/s/resume")))
        .await;
    assert_eq!(resumed.0, 200, "{}", resumed.1);
    let dead = wait_delivery(&d, &id, "dead").await;
    let last_error = dead["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.starts_with("unusable_destination") && last_error.contains("url"),
        "{dead}"
    );
    assert!(
        d.logs().contains("stored subscription unusable"),
        "{}",
        d.logs()
    );
}

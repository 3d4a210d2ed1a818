//! Regression tests for what a hostile client or a careless operator could break: huge
//! durations, unparsable URLs and secrets, framing headers, credentials in URLs, deep data.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Daemon, bin, run_bounded};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_durations_are_refused_by_the_api_and_every_list_still_answers() {
    let d = Daemon::start("[delivery]\nallow_private_networks = true\n");
    let mut huge = sub_json("http://127.0.0.1:9/");
    huge["retry"] = json!({"initial": "99999999999d", "max": "99999999999d"});
    let got = d.post("/v1/subscriptions", &huge).await;
    assert_error(&got, 400, "invalid_subscription", "huge backoff");
    assert!(got.1.to_string().contains("3650d"), "{}", got.1);

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

//! Publishing and reading events.

use serde_json::json;

use crate::support::Daemon;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_then_read_back() {
    let d = Daemon::start("");
    let r = d.publish("order.created", json!({"n": 1})).await;
    let id = r["id"].as_str().unwrap_or_default().to_string();
    assert!(id.starts_with("evt_"), "{r}");
    let (status, ev) = d.get(&format!("/v1/events/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(ev["type"], "order.created");
    assert_eq!(ev["data"], json!({"n": 1}));
}

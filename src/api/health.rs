//! Health, readiness and metrics: open routes an orchestrator and Prometheus poll.

use std::time::Duration;

use hyper::StatusCode;
use hyper::header::{CONTENT_TYPE, HeaderValue};

use super::{ApiState, Resp, json};

/// `/healthz` and `/livez`: the process answers.
pub fn alive() -> Resp {
    json(StatusCode::OK, br#"{"status":"ok"}"#.to_vec())
}

pub async fn readyz(st: &ApiState) -> Resp {
    if st.is_draining() {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"status":"draining"}"#.to_vec(),
        );
    }
    // After a failed commit, readiness proves the database writable again before saying yes.
    let writable = st.writer.healthy()
        || matches!(
            tokio::time::timeout(Duration::from_secs(2), st.writer.probe()).await,
            Ok(Ok(()))
        );
    if writable && st.store.readable() {
        json(StatusCode::OK, br#"{"status":"ready"}"#.to_vec())
    } else {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"status":"storage_unavailable"}"#.to_vec(),
        )
    }
}

pub fn metrics(st: &ApiState) -> Resp {
    let mut r = json(StatusCode::OK, st.metrics.render());
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

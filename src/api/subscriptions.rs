//! Subscriptions over the API: list, show, create, replace, delete, pause and resume, secret
//! rotation. The subscriptions' owner (`subscriptions::Control`) does the work; these parse,
//! call and render its answers as `SubscriptionView`s.

use std::time::Duration;

use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::dto::ListResponse;
use super::error::ApiError;
use super::{ApiState, Resp, json_of, optional_json, parse_json, read_body, require_json};
use crate::model::rfc3339;
use crate::subscriptions::ControlError;
use crate::wire::SubscriptionView;

/// How long rotated-out secrets keep signing unless the request says otherwise.
const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::NotFound(_) => ApiError::not_found(e.to_string()),
            ControlError::Conflict(m) => ApiError::conflict(m),
            ControlError::Invalid(errs) => {
                ApiError::bad_request("invalid_subscription", errs.join("; "))
            }
            ControlError::Write(w) => w.into(),
            ControlError::Store(s) => s.into(),
        }
    }
}

pub fn list(st: &ApiState) -> Result<Resp, ApiError> {
    let all = st.control.describe_all()?;
    let items: Vec<_> = all.iter().map(SubscriptionView::new).collect();
    json_of(
        StatusCode::OK,
        &ListResponse {
            items,
            next_cursor: None,
        },
    )
}

pub fn get(st: &ApiState, id: &str) -> Result<Resp, ApiError> {
    let d = st.control.describe(id)?;
    json_of(StatusCode::OK, &SubscriptionView::new(&d))
}

/// A created subscription; `secret` only when the daemon generated it.
#[derive(Debug, Serialize)]
struct Created<'a> {
    #[serde(flatten)]
    subscription: SubscriptionView<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

async fn json_body(st: &ApiState, req: super::Req) -> Result<Value, ApiError> {
    require_json(&req)?;
    let body = read_body(st, req, st.max_body).await?;
    parse_json(&body)
}

pub async fn create(st: &ApiState, req: super::Req) -> Result<Resp, ApiError> {
    let body = json_body(st, req).await?;
    let (d, secret) = st.control.create(body).await?;
    json_of(
        StatusCode::CREATED,
        &Created {
            subscription: SubscriptionView::new(&d),
            secret,
        },
    )
}

pub async fn update(st: &ApiState, req: super::Req, id: &str) -> Result<Resp, ApiError> {
    let body = json_body(st, req).await?;
    let d = st.control.update(id, body).await?;
    json_of(StatusCode::OK, &SubscriptionView::new(&d))
}

pub async fn delete(st: &ApiState, id: &str) -> Result<Resp, ApiError> {
    let cancelled = st.control.delete(id).await?;
    json_of(
        StatusCode::OK,
        &serde_json::json!({"id": id, "deleted": true, "cancelled_deliveries": cancelled}),
    )
}

pub async fn pause(st: &ApiState, id: &str, paused: bool) -> Result<Resp, ApiError> {
    let d = st.control.set_paused(id, paused).await?;
    json_of(StatusCode::OK, &SubscriptionView::new(&d))
}

/// `POST /v1/subscriptions/{id}/rotate` body, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// The new secret; generated when absent.
    pub secret: Option<String>,
    /// How long the current secrets keep signing ("24h" by default).
    pub grace: Option<String>,
}

pub async fn rotate(st: &ApiState, req: super::Req, id: &str) -> Result<Resp, ApiError> {
    let r: RotateRequest = optional_json(st, req).await?;
    let grace = match r.grace.as_deref() {
        None => DEFAULT_GRACE,
        Some(g) => crate::model::parse_duration(g)
            .map_err(|e| ApiError::bad_request("invalid_body", format!("grace: {e}")))?,
    };
    let (d, secret, until) = st.control.rotate(id, r.secret, grace).await?;
    json_of(
        StatusCode::OK,
        &serde_json::json!({
            "subscription": SubscriptionView::new(&d),
            "secret": secret,
            "previous_secrets_expire_at": rfc3339(until),
        }),
    )
}

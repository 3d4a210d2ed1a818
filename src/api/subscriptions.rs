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
use crate::subscriptions::{ControlError, Described, SubscriptionSource, TypePattern};

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

/// One signing secret as shown: never the secret, only its last four characters.
#[derive(Debug, Serialize)]
pub struct SecretView {
    pub last4: String,
    /// Set on a rotated-out secret: when it stops signing.
    pub expires_at: Option<String>,
    /// `whpk_<base64>` for an Ed25519 (`whsk_`) key, which signs `v1a,`: what receivers
    /// verify with. `null` for an HMAC (`whsec_`) secret.
    pub public_key: Option<String>,
}

/// Retry settings as shown.
#[derive(Debug, Serialize)]
pub struct RetryView {
    pub max_attempts: u32,
    pub initial: String,
    pub max: String,
    pub multiplier: f64,
}

/// A subscription's circuit breaker settings as the API shows them.
#[derive(Debug, Serialize)]
pub struct BreakerView {
    pub failure_threshold: u32,
    pub failure_rate: f64,
    pub min_requests: u32,
    pub window: String,
    pub cooldown: String,
    pub half_open_probes: u32,
}

/// A subscription as the API shows it.
#[derive(Debug, Serialize)]
pub struct SubscriptionView<'a> {
    pub id: &'a str,
    /// `config` (read-only here) or `api`.
    pub source: &'static str,
    /// The password and query values masked (`user:***@host/h?token=***`).
    pub url: String,
    pub event_types: Vec<&'a str>,
    pub filter: Option<&'a Value>,
    pub enabled: bool,
    pub paused: bool,
    /// Why it was last switched (`paused`, `resumed`, `gone`, `auto_disabled`).
    pub state_reason: Option<&'a str>,
    pub state_changed_at: Option<String>,
    /// Names only: header values may be credentials.
    pub headers: Vec<&'a str>,
    pub secrets: Vec<SecretView>,
    pub timeout: String,
    pub rate_limit: Option<f64>,
    pub rate_limit_burst: Option<u32>,
    pub max_in_flight: u32,
    pub ordering: crate::subscriptions::Ordering,
    pub retry: RetryView,
    pub breaker: BreakerView,
    pub final_status_codes: &'a [u16],
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    /// Why a stored definition that no longer validates cannot be used (its deliveries go
    /// dead); change it with `PUT` or delete it.
    pub unusable: Option<&'a str>,
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl<'a> SubscriptionView<'a> {
    pub fn new(d: &'a Described) -> Self {
        let s = &d.sub;
        Self {
            id: &s.id,
            source: match s.source {
                SubscriptionSource::Config => "config",
                SubscriptionSource::Api => "api",
                SubscriptionSource::Callback => "callback",
            },
            url: crate::redact::url_str(&s.url),
            event_types: s.event_types.iter().map(TypePattern::as_str).collect(),
            filter: s.filter.as_ref().map(|f| f.as_json()),
            enabled: s.enabled,
            paused: s.paused,
            state_reason: d.state.as_ref().and_then(|st| st.reason.as_deref()),
            state_changed_at: d.state.as_ref().map(|st| rfc3339(st.changed_at)),
            headers: s.headers.keys().map(String::as_str).collect(),
            secrets: d
                .secrets
                .iter()
                .map(|x| SecretView {
                    last4: x.last4.clone(),
                    expires_at: x.expires_at.map(rfc3339),
                    public_key: x.public_key.clone(),
                })
                .collect(),
            timeout: human(s.timeout),
            rate_limit: s.rate_limit,
            rate_limit_burst: s.rate_limit_burst,
            max_in_flight: s.max_in_flight,
            ordering: s.ordering,
            retry: RetryView {
                max_attempts: s.retry.max_attempts,
                initial: human(s.retry.initial),
                max: human(s.retry.max),
                multiplier: s.retry.multiplier,
            },
            breaker: BreakerView {
                failure_threshold: s.breaker.failure_threshold,
                failure_rate: s.breaker.failure_rate,
                min_requests: s.breaker.min_requests,
                window: human(s.breaker.window),
                cooldown: human(s.breaker.cooldown),
                half_open_probes: s.breaker.half_open_probes,
            },
            final_status_codes: &s.final_status_codes,
            created_at: d.created_at.map(rfc3339),
            updated_at: d.updated_at.map(rfc3339),
            unusable: s.unusable.as_deref(),
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

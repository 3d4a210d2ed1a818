//! The operator routes: the delivery list, retry and cancel, replay, the dead-letter queue and
//! its redrive, subscriptions over the API, config reload and the OpenAPI document. Their
//! wire types live here too. Every route needs the `admin` scope except the OpenAPI document.
//!
//! **Invariant:** handlers change state only through writer commands (`retry_deliveries`,
//! `cancel_deliveries`, `create_deliveries`, ...) or `Control`; they never touch the database
//! or the destination tasks directly.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::dto::{DeliveryView, ListResponse};
use super::error::ApiError;
use super::{
    ApiState, Resp, check_params, invalid_query, json, json_of, paging, parse_json, priority_param,
    query, read_body, require_json, time_param,
};
use crate::config::Scope;
use crate::model::{DeliveryId, DeliveryStatus, Event, Origin, Seq, parse_time, rfc3339};
use crate::storage::inspect::{DeadFilter, DeliveryFilter};
use crate::storage::writer::{CancelOutcome, RetryOutcome};
use crate::subscriptions::{ControlError, Described, ReloadError};
use crate::subscriptions::{SubscriptionSource, TypePattern};

/// The OpenAPI 3 document of the whole API, served at `GET /v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// Deliveries a replay or redrive hands the writer per command: big operations commit in
/// bounded pieces so they never hold up ingest for long.
const WRITE_CHUNK: usize = 500;
/// Events a replay reads per chunk (their data can be large).
const READ_CHUNK: usize = 200;
/// How long rotated-out secrets keep signing unless the request says otherwise.
const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

/// The operator routes, with path parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRoute<'a> {
    Deliveries,
    DeliveryRetry(&'a str),
    DeliveryCancel(&'a str),
    Replay,
    DeadLetters,
    DeadLettersRedrive,
    Subscriptions,
    Subscription(&'a str),
    SubscriptionPause(&'a str),
    SubscriptionResume(&'a str),
    SubscriptionRotate(&'a str),
    Reload,
    OpenApi,
}

impl<'a> AdminRoute<'a> {
    /// One instance of every route (see `routes::table`).
    pub const ALL: &'static [AdminRoute<'static>] = &[
        AdminRoute::Deliveries,
        AdminRoute::DeliveryRetry("1"),
        AdminRoute::DeliveryCancel("1"),
        AdminRoute::Replay,
        AdminRoute::DeadLetters,
        AdminRoute::DeadLettersRedrive,
        AdminRoute::Subscriptions,
        AdminRoute::Subscription("s"),
        AdminRoute::SubscriptionPause("s"),
        AdminRoute::SubscriptionResume("s"),
        AdminRoute::SubscriptionRotate("s"),
        AdminRoute::Reload,
        AdminRoute::OpenApi,
    ];

    /// Matches a request path.
    pub fn parse(path: &'a str) -> Option<Self> {
        let path = path.strip_suffix('/').unwrap_or(path);
        let segs: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
        let r = match segs.as_slice() {
            ["v1", "deliveries"] => AdminRoute::Deliveries,
            ["v1", "deliveries", id, "retry"] if !id.is_empty() => AdminRoute::DeliveryRetry(id),
            ["v1", "deliveries", id, "cancel"] if !id.is_empty() => AdminRoute::DeliveryCancel(id),
            ["v1", "replay"] => AdminRoute::Replay,
            ["v1", "dead-letters"] => AdminRoute::DeadLetters,
            ["v1", "dead-letters", "redrive"] => AdminRoute::DeadLettersRedrive,
            ["v1", "subscriptions"] => AdminRoute::Subscriptions,
            ["v1", "subscriptions", id] if !id.is_empty() => AdminRoute::Subscription(id),
            ["v1", "subscriptions", id, "pause"] if !id.is_empty() => {
                AdminRoute::SubscriptionPause(id)
            }
            ["v1", "subscriptions", id, "resume"] if !id.is_empty() => {
                AdminRoute::SubscriptionResume(id)
            }
            ["v1", "subscriptions", id, "rotate"] if !id.is_empty() => {
                AdminRoute::SubscriptionRotate(id)
            }
            ["v1", "admin", "reload"] => AdminRoute::Reload,
            ["v1", "openapi.json"] => AdminRoute::OpenApi,
            _ => return None,
        };
        Some(r)
    }

    /// The label used in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            AdminRoute::Deliveries => "deliveries",
            AdminRoute::DeliveryRetry(_) => "delivery_retry",
            AdminRoute::DeliveryCancel(_) => "delivery_cancel",
            AdminRoute::Replay => "replay",
            AdminRoute::DeadLetters => "dead_letters",
            AdminRoute::DeadLettersRedrive => "dead_letters_redrive",
            AdminRoute::Subscriptions => "subscriptions",
            AdminRoute::Subscription(_) => "subscription",
            AdminRoute::SubscriptionPause(_) => "subscription_pause",
            AdminRoute::SubscriptionResume(_) => "subscription_resume",
            AdminRoute::SubscriptionRotate(_) => "subscription_rotate",
            AdminRoute::Reload => "admin_reload",
            AdminRoute::OpenApi => "openapi",
        }
    }

    /// The path template as the OpenAPI document writes it.
    pub fn template(self) -> &'static str {
        match self {
            AdminRoute::Deliveries => "/v1/deliveries",
            AdminRoute::DeliveryRetry(_) => "/v1/deliveries/{id}/retry",
            AdminRoute::DeliveryCancel(_) => "/v1/deliveries/{id}/cancel",
            AdminRoute::Replay => "/v1/replay",
            AdminRoute::DeadLetters => "/v1/dead-letters",
            AdminRoute::DeadLettersRedrive => "/v1/dead-letters/redrive",
            AdminRoute::Subscriptions => "/v1/subscriptions",
            AdminRoute::Subscription(_) => "/v1/subscriptions/{id}",
            AdminRoute::SubscriptionPause(_) => "/v1/subscriptions/{id}/pause",
            AdminRoute::SubscriptionResume(_) => "/v1/subscriptions/{id}/resume",
            AdminRoute::SubscriptionRotate(_) => "/v1/subscriptions/{id}/rotate",
            AdminRoute::Reload => "/v1/admin/reload",
            AdminRoute::OpenApi => "/v1/openapi.json",
        }
    }

    /// The methods this route answers.
    pub fn methods(self) -> &'static [Method] {
        match self {
            AdminRoute::Deliveries | AdminRoute::DeadLetters | AdminRoute::OpenApi => {
                &[Method::GET]
            }
            AdminRoute::Subscriptions => &[Method::GET, Method::POST],
            AdminRoute::Subscription(_) => &[Method::GET, Method::PUT, Method::DELETE],
            AdminRoute::DeliveryRetry(_)
            | AdminRoute::DeliveryCancel(_)
            | AdminRoute::Replay
            | AdminRoute::DeadLettersRedrive
            | AdminRoute::SubscriptionPause(_)
            | AdminRoute::SubscriptionResume(_)
            | AdminRoute::SubscriptionRotate(_)
            | AdminRoute::Reload => &[Method::POST],
        }
    }
}

/// Routes an operator request; returns the route label for metrics with the outcome.
pub async fn dispatch(
    st: &ApiState,
    route: AdminRoute<'_>,
    req: super::Req,
) -> (&'static str, Result<Resp, ApiError>) {
    let method = req.method().clone();
    if !route.methods().contains(&method) {
        let resp = super::method_not_allowed(&method, req.uri().path(), route.methods());
        return (route.name(), Ok(resp));
    }
    if route != AdminRoute::OpenApi
        && let Err(e) = st.authorize(&req, Scope::Admin)
    {
        return (route.name(), Err(e));
    }
    let result = match (route, method) {
        (AdminRoute::Deliveries, _) => list_deliveries(st, &req),
        (AdminRoute::DeliveryRetry(id), _) => retry(st, id).await,
        (AdminRoute::DeliveryCancel(id), _) => cancel(st, id).await,
        (AdminRoute::Replay, _) => replay(st, req).await,
        (AdminRoute::DeadLetters, _) => list_dead_letters(st, &req),
        (AdminRoute::DeadLettersRedrive, _) => redrive(st, req).await,
        (AdminRoute::Subscriptions, Method::POST) => create_subscription(st, req).await,
        (AdminRoute::Subscriptions, _) => list_subscriptions(st),
        (AdminRoute::Subscription(id), Method::PUT) => update_subscription(st, req, id).await,
        (AdminRoute::Subscription(id), Method::DELETE) => delete_subscription(st, id).await,
        (AdminRoute::Subscription(id), _) => get_subscription(st, id),
        (AdminRoute::SubscriptionPause(id), _) => pause(st, id, true).await,
        (AdminRoute::SubscriptionResume(id), _) => pause(st, id, false).await,
        (AdminRoute::SubscriptionRotate(id), _) => rotate(st, req, id).await,
        (AdminRoute::Reload, _) => reload(st).await,
        (AdminRoute::OpenApi, _) => Ok(json(StatusCode::OK, OPENAPI.as_bytes().to_vec())),
    };
    (route.name(), result)
}

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

/// `status=in_flight`: not on disk, so the attempts under way right now, read and filtered
/// here, in id order after `after`.
fn attempts_under_way(
    st: &ApiState,
    f: &DeliveryFilter,
    mut after: Option<DeliveryId>,
    limit: usize,
) -> Result<crate::storage::Page<(DeliveryId, crate::model::Delivery)>, ApiError> {
    let mut items = Vec::new();
    loop {
        let ids = st.attempting.after(after, 256);
        let Some(&last) = ids.last() else {
            return Ok(crate::storage::Page { items, next: None });
        };
        after = Some(last);
        for (id, d) in st.store.deliveries(&ids)? {
            let wanted = !d.status.is_terminal()
                && f.subscription.as_ref().is_none_or(|s| *s == d.subscription)
                && f.since.is_none_or(|t| d.created_at >= t)
                && f.until.is_none_or(|t| d.created_at < t)
                && match &f.event_type {
                    None => true,
                    Some(t) => st
                        .store
                        .event_by_seq(d.event_seq)?
                        .is_some_and(|e| e.event_type == *t),
                };
            if wanted && st.attempting.contains(id) {
                items.push((id, d));
                if items.len() == limit {
                    return Ok(crate::storage::Page {
                        items,
                        next: Some(id),
                    });
                }
            }
        }
    }
}

fn delivery_id(id: &str) -> Result<DeliveryId, ApiError> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("no delivery with id {id:?}")))
}

/// Reads an optional JSON body: empty means `{}`.
async fn optional_json<T: for<'de> Deserialize<'de> + Default>(
    st: &ApiState,
    req: super::Req,
) -> Result<T, ApiError> {
    let has_type = req.headers().contains_key(hyper::header::CONTENT_TYPE);
    if has_type {
        require_json(&req)?;
    }
    let body = read_body(st, req, st.max_body).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    if !has_type {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "a request body needs content-type: application/json",
        ));
    }
    parse_json(&body)
}

// ---------------------------------------------------------------------------------------------
// deliveries

fn list_deliveries(st: &ApiState, req: &super::Req) -> Result<Resp, ApiError> {
    let q = query(req);
    check_params(
        &q,
        &[
            "status",
            "subscription",
            "event_type",
            "since",
            "until",
            "limit",
            "cursor",
            "priority",
        ],
    )?;
    let (limit, cursor) = paging(&q)?;
    let status = match q.get("status") {
        None => None,
        Some(s) => Some(DeliveryStatus::parse(s).ok_or_else(|| {
            invalid_query(format!(
                "status must be one of {}",
                DeliveryStatus::ALL.map(DeliveryStatus::as_str).join(", ")
            ))
        })?),
    };
    let filter = DeliveryFilter {
        status,
        subscription: q.get("subscription").cloned(),
        event_type: q.get("event_type").cloned(),
        since: time_param(&q, "since")?,
        until: time_param(&q, "until")?,
        priority: priority_param(&q)?,
    };
    let page = if filter.status == Some(DeliveryStatus::InFlight) {
        attempts_under_way(st, &filter, cursor, limit)?
    } else {
        st.store.list_deliveries(&filter, cursor, limit)?
    };
    let items: Vec<_> = page
        .items
        .iter()
        .map(|(id, d)| st.delivery_view(*id, d))
        .collect();
    json_of(
        StatusCode::OK,
        &ListResponse {
            items,
            next_cursor: page.next.map(|n| n.to_string()),
        },
    )
}

async fn retry(st: &ApiState, id: &str) -> Result<Resp, ApiError> {
    let did = delivery_id(id)?;
    let Some(current) = st.store.delivery(did)? else {
        return Err(ApiError::not_found(format!("no delivery with id {id:?}")));
    };
    if st.registry.get(&current.subscription).is_none() {
        return Err(ApiError::conflict(format!(
            "subscription {:?} of delivery {did} no longer exists; nothing would attempt it",
            current.subscription
        )));
    }
    let outcome = st.writer.retry_deliveries(vec![did], None).await?;
    match outcome.into_iter().next() {
        Some(RetryOutcome::Scheduled(d)) => {
            tracing::info!(delivery = did, "delivery retried by an operator");
            json_of(StatusCode::OK, &DeliveryView::new(did, &d))
        }
        Some(RetryOutcome::NotAllowed(d)) => Err(ApiError::conflict(format!(
            "delivery {did} is {}; only a delivery not yet succeeded can be retried",
            d.status.as_str()
        ))),
        _ => Err(ApiError::not_found(format!("no delivery with id {id:?}"))),
    }
}

async fn cancel(st: &ApiState, id: &str) -> Result<Resp, ApiError> {
    let did = delivery_id(id)?;
    let outcome = st
        .writer
        .cancel_deliveries(vec![did], Some("cancelled by an operator".into()))
        .await?;
    match outcome.into_iter().next() {
        Some(CancelOutcome::Cancelled(d)) => {
            tracing::info!(delivery = did, "delivery cancelled by an operator");
            json_of(StatusCode::OK, &DeliveryView::new(did, &d))
        }
        Some(CancelOutcome::NotAllowed(d)) => Err(ApiError::conflict(format!(
            "delivery {did} is already {}; only pending or retrying deliveries can be cancelled",
            d.status.as_str()
        ))),
        _ => Err(ApiError::not_found(format!("no delivery with id {id:?}"))),
    }
}

// ---------------------------------------------------------------------------------------------
// replay

/// `POST /v1/replay` body: one selector (an event id, a time range or a seq range), optionally
/// narrowed to one subscription and to event type patterns.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    pub event_id: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub from_seq: Option<u64>,
    pub to_seq: Option<u64>,
    pub subscription: Option<String>,
    pub event_types: Option<Vec<String>>,
}

/// `{"deliveries": n}`: how many deliveries an operation made or moved.
#[derive(Debug, Serialize)]
pub struct CountResponse {
    pub deliveries: u64,
    /// Events a replay looked at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<u64>,
}

fn invalid_replay(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_replay", msg)
}

/// The events a replay covers, as a seq range `[from, to)`, or one event.
enum Selection {
    One(Seq, Box<Event>),
    Range(Seq, Seq),
}

fn replay_selection(st: &ApiState, r: &ReplayRequest) -> Result<Selection, ApiError> {
    let cap = st.control.config().replay_max_events;
    let too_many = |n: u64| {
        ApiError::bad_request(
            "range_too_large",
            format!(
                "the range covers {n} events, more than the limit of {cap} \
                 ([delivery] replay_max_events); replay it in smaller ranges"
            ),
        )
    };
    match (&r.event_id, (&r.since, &r.until), (r.from_seq, r.to_seq)) {
        (Some(id), (None, None), (None, None)) => match st.store.event_by_id(id)? {
            Some((seq, e)) => Ok(Selection::One(seq, Box::new(e))),
            None => Err(ApiError::not_found(format!("no event with id {id:?}"))),
        },
        (None, (Some(since), Some(until)), (None, None)) => {
            let parse = |name: &str, v: &str| {
                parse_time(v).ok_or_else(|| {
                    invalid_replay(format!(
                        "{name} must be an RFC 3339 time like 2026-01-02T03:04:05Z or unix seconds"
                    ))
                })
            };
            let (since, until) = (parse("since", since)?, parse("until", until)?);
            if until <= since {
                return Err(invalid_replay("until must be after since"));
            }
            let (from, to) = st.store.seq_range_for_time(since, until)?;
            if to - from > cap {
                return Err(too_many(to - from));
            }
            Ok(Selection::Range(from, to))
        }
        (None, (None, None), (Some(from), Some(to))) => {
            if to < from {
                return Err(invalid_replay("to_seq must not be below from_seq"));
            }
            let n = to - from + 1;
            if n > cap {
                return Err(too_many(n));
            }
            Ok(Selection::Range(from, to.saturating_add(1)))
        }
        _ => Err(invalid_replay(
            "give exactly one of: event_id; since and until; from_seq and to_seq",
        )),
    }
}

async fn replay(st: &ApiState, req: super::Req) -> Result<Resp, ApiError> {
    require_json(&req)?;
    let body = read_body(st, req, st.max_body).await?;
    let r: ReplayRequest = parse_json(&body)?;
    let patterns: Option<Vec<TypePattern>> = r
        .event_types
        .as_ref()
        .map(|ps| ps.iter().map(TypePattern::new).collect());
    if patterns.as_ref().is_some_and(Vec::is_empty) {
        return Err(invalid_replay("event_types, when given, needs a pattern"));
    }
    let subs = st.registry.snapshot();
    let targets: Vec<_> = match &r.subscription {
        Some(id) => {
            let Some(s) = subs.iter().find(|s| &s.id == id) else {
                return Err(ApiError::not_found(format!(
                    "no subscription with id {id:?}"
                )));
            };
            if !s.enabled {
                return Err(ApiError::conflict(format!(
                    "subscription {id:?} is disabled; resume it before replaying to it"
                )));
            }
            vec![s.clone()]
        }
        None => subs.iter().filter(|s| s.enabled).cloned().collect(),
    };
    let selection = replay_selection(st, &r)?;
    let names: Vec<Arc<str>> = targets.iter().map(|s| Arc::from(s.id.as_str())).collect();
    let mut pending: Vec<(Seq, Arc<str>)> = Vec::new();
    let mut made = 0u64;
    let mut events = 0u64;
    let mut fan_out = |seq: Seq, e: &Event, pending: &mut Vec<(Seq, Arc<str>)>| {
        events += 1;
        if patterns
            .as_ref()
            .is_some_and(|ps| !ps.iter().any(|p| p.matches(&e.event_type)))
        {
            return;
        }
        let mut data: Option<Value> = None;
        for (s, name) in targets.iter().zip(&names) {
            if !s.wants(&e.event_type) {
                continue;
            }
            if s.filter.is_some() {
                let d = data
                    .get_or_insert_with(|| serde_json::from_str(&e.data).unwrap_or(Value::Null));
                if !s.wants_data(d) {
                    continue;
                }
            }
            pending.push((seq, name.clone()));
        }
    };
    match selection {
        Selection::One(seq, e) => fan_out(seq, &e, &mut pending),
        Selection::Range(from, to) => {
            let mut at = from;
            while at < to {
                let chunk = st.store.events_in_range(at, to, READ_CHUNK)?;
                let Some(&(last, _)) = chunk.last() else {
                    break;
                };
                for (seq, e) in &chunk {
                    fan_out(*seq, e, &mut pending);
                }
                while pending.len() >= WRITE_CHUNK {
                    let rest = pending.split_off(WRITE_CHUNK);
                    let batch = std::mem::replace(&mut pending, rest);
                    made += u64::from(st.writer.create_deliveries(batch, Origin::Replay).await?);
                }
                at = last + 1;
            }
        }
    }
    while !pending.is_empty() {
        let rest = pending.split_off(pending.len().min(WRITE_CHUNK));
        let batch = std::mem::replace(&mut pending, rest);
        made += u64::from(st.writer.create_deliveries(batch, Origin::Replay).await?);
    }
    tracing::info!(deliveries = made, events, "replay made new deliveries");
    json_of(
        StatusCode::OK,
        &CountResponse {
            deliveries: made,
            events: Some(events),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// dead letters

/// A dead letter: the delivery and when it was dead-lettered.
#[derive(Debug, Serialize)]
pub struct DeadLetterView<'a> {
    #[serde(flatten)]
    pub delivery: DeliveryView<'a>,
    pub dead_at: String,
}

fn list_dead_letters(st: &ApiState, req: &super::Req) -> Result<Resp, ApiError> {
    let q = query(req);
    check_params(&q, &["subscription", "since", "limit", "cursor"])?;
    let (limit, cursor) = paging(&q)?;
    let filter = DeadFilter {
        subscription: q.get("subscription").cloned(),
        since: time_param(&q, "since")?,
    };
    let page = st.store.list_dead_letters(&filter, cursor, limit)?;
    let items: Vec<_> = page
        .items
        .iter()
        .map(|d| DeadLetterView {
            delivery: DeliveryView::new(d.id, &d.delivery),
            dead_at: rfc3339(d.dead_at),
        })
        .collect();
    json_of(
        StatusCode::OK,
        &ListResponse {
            items,
            next_cursor: page.next.map(|n| n.to_string()),
        },
    )
}

/// `POST /v1/dead-letters/redrive` body: `{}` for all, or narrowed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedriveRequest {
    pub subscription: Option<String>,
    pub since: Option<String>,
}

async fn redrive(st: &ApiState, req: super::Req) -> Result<Resp, ApiError> {
    let r: RedriveRequest = optional_json(st, req).await?;
    let since = match &r.since {
        None => None,
        Some(s) => Some(parse_time(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_body",
                "since must be an RFC 3339 time like 2026-01-02T03:04:05Z or unix seconds",
            )
        })?),
    };
    let filter = DeadFilter {
        subscription: r.subscription,
        since,
    };
    // Bounded batches: each is one writer command; the cursor only moves forward, so a
    // delivery that dies again during the redrive is not picked up twice.
    // Dead letters of subscriptions no longer in force stay dead: nothing would attempt them.
    let in_force: HashSet<String> = st
        .registry
        .snapshot()
        .iter()
        .map(|s| s.id.clone())
        .collect();
    let mut cursor = None;
    let mut moved = 0u64;
    loop {
        let page = st.store.list_dead_letters(&filter, cursor, WRITE_CHUNK)?;
        let ids: Vec<DeliveryId> = page
            .items
            .iter()
            .filter(|d| in_force.contains(&d.delivery.subscription))
            .map(|d| d.id)
            .collect();
        if !ids.is_empty() {
            let out = st
                .writer
                .retry_deliveries(ids, Some(DeliveryStatus::Dead))
                .await?;
            moved += out
                .iter()
                .filter(|o| matches!(o, RetryOutcome::Scheduled(_)))
                .count() as u64;
        }
        match page.next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    tracing::info!(
        deliveries = moved,
        subscription = filter.subscription.as_deref().unwrap_or("*"),
        "dead letters redriven"
    );
    json_of(
        StatusCode::OK,
        &CountResponse {
            deliveries: moved,
            events: None,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// subscriptions

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

fn list_subscriptions(st: &ApiState) -> Result<Resp, ApiError> {
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

fn get_subscription(st: &ApiState, id: &str) -> Result<Resp, ApiError> {
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

async fn create_subscription(st: &ApiState, req: super::Req) -> Result<Resp, ApiError> {
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

async fn update_subscription(st: &ApiState, req: super::Req, id: &str) -> Result<Resp, ApiError> {
    let body = json_body(st, req).await?;
    let d = st.control.update(id, body).await?;
    json_of(StatusCode::OK, &SubscriptionView::new(&d))
}

async fn delete_subscription(st: &ApiState, id: &str) -> Result<Resp, ApiError> {
    let cancelled = st.control.delete(id).await?;
    json_of(
        StatusCode::OK,
        &serde_json::json!({"id": id, "deleted": true, "cancelled_deliveries": cancelled}),
    )
}

async fn pause(st: &ApiState, id: &str, paused: bool) -> Result<Resp, ApiError> {
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

async fn rotate(st: &ApiState, req: super::Req, id: &str) -> Result<Resp, ApiError> {
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

// ---------------------------------------------------------------------------------------------
// reload

async fn reload(st: &ApiState) -> Result<Resp, ApiError> {
    match st
        .control
        .reload(&st.sources, &st.auth, st.tls.as_deref())
        .await
    {
        Ok(summary) => json_of(StatusCode::OK, &summary),
        Err(ReloadError::Invalid(errs)) => {
            tracing::error!(errors = %errs, "reload refused: the new configuration is invalid; the old one stays in force");
            let list: Vec<String> = errs.0.iter().map(ToString::to_string).collect();
            json_of(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": {
                    "code": "invalid_config",
                    "message": format!("the configuration file is invalid; nothing changed: {}", list.join("; ")),
                    "errors": list,
                }}),
            )
        }
        Err(ReloadError::NoFile) => Err(ApiError::conflict(ReloadError::NoFile.to_string())),
        Err(ReloadError::Control(e)) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::routes::{Route, table};
    use super::*;

    /// Numbers every `Route` variant. The match has no wildcard: a new route does not compile
    /// here until it is numbered, and the test below then wants it in `Route::ALL`.
    fn route_ordinal(r: Route<'_>) -> usize {
        match r {
            Route::Healthz => 0,
            Route::Readyz => 1,
            Route::Metrics => 2,
            Route::Events => 3,
            Route::EventsBatch => 4,
            Route::Event(_) => 5,
            Route::EventDeliveries(_) => 6,
            Route::Delivery(_) => 7,
            Route::DeliveryAttempts(_) => 8,
            Route::Ingest(_) => 9,
            Route::Receipt(_) => 10,
            Route::AdminBackup => 11,
            Route::Livez => 12,
            Route::EventAttempts(_) => 13,
            Route::EventCancel(_) => 14,
            Route::Batch(_) => 15,
        }
    }
    const ROUTE_VARIANTS: usize = 16;

    fn admin_ordinal(r: AdminRoute<'_>) -> usize {
        match r {
            AdminRoute::Deliveries => 0,
            AdminRoute::DeliveryRetry(_) => 1,
            AdminRoute::DeliveryCancel(_) => 2,
            AdminRoute::Replay => 3,
            AdminRoute::DeadLetters => 4,
            AdminRoute::DeadLettersRedrive => 5,
            AdminRoute::Subscriptions => 6,
            AdminRoute::Subscription(_) => 7,
            AdminRoute::SubscriptionPause(_) => 8,
            AdminRoute::SubscriptionResume(_) => 9,
            AdminRoute::SubscriptionRotate(_) => 10,
            AdminRoute::Reload => 11,
            AdminRoute::OpenApi => 12,
        }
    }
    const ADMIN_VARIANTS: usize = 13;

    #[test]
    fn route_lists_hold_every_variant() {
        let mut core: Vec<usize> = Route::ALL.iter().map(|r| route_ordinal(*r)).collect();
        core.sort_unstable();
        core.dedup();
        assert_eq!(core, (0..ROUTE_VARIANTS).collect::<Vec<_>>(), "Route::ALL");
        let mut admin: Vec<usize> = AdminRoute::ALL.iter().map(|r| admin_ordinal(*r)).collect();
        admin.sort_unstable();
        admin.dedup();
        assert_eq!(
            admin,
            (0..ADMIN_VARIANTS).collect::<Vec<_>>(),
            "AdminRoute::ALL"
        );
    }

    #[test]
    fn openapi_documents_every_route_and_nothing_else() {
        let doc: Value = match serde_json::from_str(OPENAPI) {
            Ok(d) => d,
            Err(e) => panic!("docs/openapi.json is not JSON: {e}"),
        };
        let Some(paths) = doc["paths"].as_object() else {
            panic!("no paths in docs/openapi.json");
        };
        let routes = table();
        let mut missing = Vec::new();
        for (method, template) in &routes {
            let m = method.as_str().to_ascii_lowercase();
            if paths.get(*template).and_then(|p| p.get(&m)).is_none() {
                missing.push(format!("{method} {template}"));
            }
        }
        assert!(
            missing.is_empty(),
            "docs/openapi.json lacks routes the API answers: {missing:?}"
        );
        let mut extra = Vec::new();
        for (template, ops) in paths {
            for m in ops
                .as_object()
                .map(|o| o.keys().collect())
                .unwrap_or(Vec::new())
            {
                let known = routes
                    .iter()
                    .any(|(rm, rt)| rt == template && rm.as_str().eq_ignore_ascii_case(m));
                if !known {
                    extra.push(format!("{m} {template}"));
                }
            }
        }
        assert!(
            extra.is_empty(),
            "docs/openapi.json documents routes the API does not answer: {extra:?}"
        );
    }

    #[test]
    fn openapi_references_resolve() {
        fn walk(v: &Value, refs: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(r)) = m.get("$ref") {
                        refs.push(r.clone());
                    }
                    m.values().for_each(|c| walk(c, refs));
                }
                Value::Array(a) => a.iter().for_each(|c| walk(c, refs)),
                _ => {}
            }
        }
        let doc: Value = serde_json::from_str(OPENAPI).unwrap_or(Value::Null);
        let mut refs = Vec::new();
        walk(&doc, &mut refs);
        assert!(!refs.is_empty());
        for r in refs {
            let Some(pointer) = r.strip_prefix('#') else {
                panic!("external reference {r}");
            };
            assert!(doc.pointer(pointer).is_some(), "dangling reference {r}");
        }
    }

    #[test]
    fn admin_route_table() {
        assert_eq!(
            AdminRoute::parse("/v1/deliveries"),
            Some(AdminRoute::Deliveries)
        );
        assert_eq!(
            AdminRoute::parse("/v1/deliveries/7/retry"),
            Some(AdminRoute::DeliveryRetry("7"))
        );
        assert_eq!(
            AdminRoute::parse("/v1/subscriptions/crm/"),
            Some(AdminRoute::Subscription("crm"))
        );
        assert_eq!(AdminRoute::parse("/v1/deliveries/7"), None);
        assert_eq!(AdminRoute::parse("/v1/subscriptions//pause"), None);
        assert_eq!(AdminRoute::parse("/v1/replay/x"), None);
        // Every listed route parses back from its template.
        for r in AdminRoute::ALL {
            let id = match r {
                AdminRoute::Subscription(_)
                | AdminRoute::SubscriptionPause(_)
                | AdminRoute::SubscriptionResume(_)
                | AdminRoute::SubscriptionRotate(_) => "s",
                _ => "1",
            };
            let concrete = r.template().replace("{id}", id);
            assert_eq!(AdminRoute::parse(&concrete), Some(*r), "{concrete}");
        }
    }
}

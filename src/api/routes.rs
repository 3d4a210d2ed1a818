//! The route table and the request handlers.

use std::time::Duration;

use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, StatusCode};

use super::dto::*;
use super::error::ApiError;
use super::{
    ApiState, Resp, check_data_depth, invalid_query, json, json_of, paging, parse_json, query,
    read_body, require_json, time_param,
};
use crate::config::Scope;
use crate::model::Priority;
use crate::storage::EventFilter;
use crate::storage::writer::{NewEvent, Published};

/// The routes the API knows, with path parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    Healthz,
    /// `GET /livez`: `/healthz` under the name orchestrators expect.
    Livez,
    Readyz,
    Metrics,
    Events,
    EventsBatch,
    Event(&'a str),
    EventDeliveries(&'a str),
    /// `GET /v1/events/{id}/attempts`: every attempt of every delivery, newest first.
    EventAttempts(&'a str),
    /// `POST /v1/events/{id}/cancel`: cancels its deliveries not yet terminal.
    EventCancel(&'a str),
    /// `GET /v1/batches/{id}`: a batch's delivery counts.
    Batch(&'a str),
    Delivery(&'a str),
    DeliveryAttempts(&'a str),
    /// `POST /v1/ingest/{source}`: an inbound provider webhook.
    Ingest(&'a str),
    Receipt(&'a str),
    /// `GET /v1/admin/backup`: a consistent copy of the database.
    AdminBackup,
}

impl<'a> Route<'a> {
    /// Matches a request path.
    pub fn parse(path: &'a str) -> Option<Self> {
        let path = path.strip_suffix('/').unwrap_or(path);
        let mut segs = path.strip_prefix('/')?.split('/');
        let r = match (
            segs.next(),
            segs.next(),
            segs.next(),
            segs.next(),
            segs.next(),
        ) {
            (Some("healthz"), None, ..) => Route::Healthz,
            (Some("livez"), None, ..) => Route::Livez,
            (Some("readyz"), None, ..) => Route::Readyz,
            (Some("metrics"), None, ..) => Route::Metrics,
            (Some("v1"), Some("events"), None, ..) => Route::Events,
            (Some("v1"), Some("events"), Some("batch"), None, _) => Route::EventsBatch,
            (Some("v1"), Some("events"), Some(id), None, _) if !id.is_empty() => Route::Event(id),
            (Some("v1"), Some("events"), Some(id), Some("deliveries"), None) if !id.is_empty() => {
                Route::EventDeliveries(id)
            }
            (Some("v1"), Some("events"), Some(id), Some("attempts"), None) if !id.is_empty() => {
                Route::EventAttempts(id)
            }
            (Some("v1"), Some("events"), Some(id), Some("cancel"), None) if !id.is_empty() => {
                Route::EventCancel(id)
            }
            (Some("v1"), Some("batches"), Some(id), None, _) if !id.is_empty() => Route::Batch(id),
            (Some("v1"), Some("deliveries"), Some(id), None, _) if !id.is_empty() => {
                Route::Delivery(id)
            }
            (Some("v1"), Some("deliveries"), Some(id), Some("attempts"), None)
                if !id.is_empty() =>
            {
                Route::DeliveryAttempts(id)
            }
            (Some("v1"), Some("ingest"), Some(source), None, _) if !source.is_empty() => {
                Route::Ingest(source)
            }
            (Some("v1"), Some("receipts"), Some(id), None, _) if !id.is_empty() => {
                Route::Receipt(id)
            }
            (Some("v1"), Some("admin"), Some("backup"), None, _) => Route::AdminBackup,
            _ => return None,
        };
        Some(r)
    }

    /// The label used in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Route::Healthz => "healthz",
            Route::Livez => "livez",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
            Route::Events => "events",
            Route::EventsBatch => "events_batch",
            Route::Event(_) => "event",
            Route::EventDeliveries(_) => "event_deliveries",
            Route::EventAttempts(_) => "event_attempts",
            Route::EventCancel(_) => "event_cancel",
            Route::Batch(_) => "batch",
            Route::Delivery(_) => "delivery",
            Route::DeliveryAttempts(_) => "delivery_attempts",
            Route::Ingest(_) => "ingest",
            Route::Receipt(_) => "receipt",
            Route::AdminBackup => "admin_backup",
        }
    }

    /// The methods this route answers.
    pub fn methods(self) -> &'static [Method] {
        match self {
            Route::Events => &[Method::GET, Method::POST],
            Route::EventsBatch | Route::EventCancel(_) => &[Method::POST],
            Route::Ingest(_) => &[Method::POST],
            _ => &[Method::GET],
        }
    }
}

impl Route<'static> {
    /// One instance of every route, for `table` (the OpenAPI test compares it with the
    /// document). `template` matches every variant without a wildcard, so a new route does
    /// not compile until it has a template; list it here too.
    pub const ALL: &'static [Route<'static>] = &[
        Route::Healthz,
        Route::Livez,
        Route::Readyz,
        Route::Metrics,
        Route::Events,
        Route::EventsBatch,
        Route::Event("e"),
        Route::EventDeliveries("e"),
        Route::EventAttempts("e"),
        Route::EventCancel("e"),
        Route::Batch("b"),
        Route::Delivery("1"),
        Route::DeliveryAttempts("1"),
        Route::Ingest("s"),
        Route::Receipt("1"),
        Route::AdminBackup,
    ];
}

impl Route<'_> {
    /// The path template as the OpenAPI document writes it.
    pub fn template(self) -> &'static str {
        match self {
            Route::Healthz => "/healthz",
            Route::Livez => "/livez",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
            Route::Events => "/v1/events",
            Route::EventsBatch => "/v1/events/batch",
            Route::Event(_) => "/v1/events/{id}",
            Route::EventDeliveries(_) => "/v1/events/{id}/deliveries",
            Route::EventAttempts(_) => "/v1/events/{id}/attempts",
            Route::EventCancel(_) => "/v1/events/{id}/cancel",
            Route::Batch(_) => "/v1/batches/{id}",
            Route::Delivery(_) => "/v1/deliveries/{id}",
            Route::DeliveryAttempts(_) => "/v1/deliveries/{id}/attempts",
            Route::Ingest(_) => "/v1/ingest/{source}",
            Route::Receipt(_) => "/v1/receipts/{id}",
            Route::AdminBackup => "/v1/admin/backup",
        }
    }
}

/// Every (method, path template) the API answers: this table and the operator routes.
pub fn table() -> Vec<(Method, &'static str)> {
    let core = Route::ALL
        .iter()
        .flat_map(|r| r.methods().iter().map(move |m| (m.clone(), r.template())));
    let admin = super::admin::AdminRoute::ALL
        .iter()
        .flat_map(|r| r.methods().iter().map(move |m| (m.clone(), r.template())));
    core.chain(admin).collect()
}

/// The route label `dispatch` gives a request for `path` (for a handler that never returned).
pub fn label(path: &str) -> &'static str {
    match super::admin::AdminRoute::parse(path) {
        Some(r) => r.name(),
        None => Route::parse(path).map_or("unknown", Route::name),
    }
}

/// Routes a request; returns the route label for metrics with the outcome.
pub async fn dispatch(st: &ApiState, req: super::Req) -> (&'static str, Result<Resp, ApiError>) {
    let path = req.uri().path().to_owned();
    if let Some(r) = super::admin::AdminRoute::parse(&path) {
        return super::admin::dispatch(st, r, req).await;
    }
    let Some(route) = Route::parse(&path) else {
        return (
            "unknown",
            Err(ApiError::not_found(format!("no route for {path}"))),
        );
    };
    let method = req.method().clone();
    if !route.methods().contains(&method) {
        let resp = super::method_not_allowed(&method, &path, route.methods());
        return (route.name(), Ok(resp));
    }
    let result = match (route, method) {
        (Route::Healthz | Route::Livez, _) => {
            Ok(json(StatusCode::OK, br#"{"status":"ok"}"#.to_vec()))
        }
        (Route::Readyz, _) => Ok(readyz(st).await),
        (Route::Metrics, _) => Ok(metrics(st)),
        (Route::Events, Method::POST) => publish(st, req).await,
        (Route::Events, _) => list_events(st, &req),
        (Route::EventsBatch, _) => publish_batch(st, req).await,
        (Route::Event(id), _) => get_event(st, &req, id),
        (Route::EventDeliveries(id), _) => event_deliveries(st, &req, id),
        (Route::EventAttempts(id), _) => event_attempts(st, &req, id),
        (Route::EventCancel(id), _) => cancel_event(st, &req, id).await,
        (Route::Batch(id), _) => get_batch(st, &req, id),
        (Route::Delivery(id), _) => get_delivery(st, &req, id),
        (Route::DeliveryAttempts(id), _) => delivery_attempts(st, &req, id),
        (Route::Ingest(source), _) => super::inbound::ingest(st, req, source).await,
        (Route::Receipt(id), _) => super::inbound::get_receipt(st, &req, id),
        (Route::AdminBackup, _) => super::backup::backup(st, &req).await,
    };
    (route.name(), result)
}

async fn readyz(st: &ApiState) -> Resp {
    if st.is_draining() {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"status":"draining"}"#.to_vec(),
        );
    }
    // After a failed commit, readiness proves the database writable again before saying yes.
    let writable = st.writer.health.ok()
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

fn metrics(st: &ApiState) -> Resp {
    let mut r = json(StatusCode::OK, st.metrics.render());
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// Ids, event types and keys: printable, no spaces, bounded.
fn check_token_text(what: &str, s: &str, max: usize) -> Result<(), ApiError> {
    if s.is_empty() || s.len() > max || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::bad_request(
            "invalid_event",
            format!("{what} must be 1-{max} printable ASCII characters without spaces"),
        ));
    }
    Ok(())
}

/// Event ids appear in URL paths, so they are limited to characters that need no escaping
/// there; `batch` is the name of a route.
fn check_event_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "batch"
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_event",
            "id must be 1-128 characters of A-Z a-z 0-9 - . _ ~ : (and not \"batch\")",
        ))
    }
}

fn new_event(
    st: &ApiState,
    p: PublishRequest<'_>,
    header_key: Option<String>,
) -> Result<NewEvent, ApiError> {
    check_token_text("type", &p.event_type, 128)?;
    if let Some(id) = &p.id {
        check_event_id(id)?;
    }
    if let Some(s) = &p.source {
        check_token_text("source", s, 256)?;
    }
    let idempotency_key = header_key.or(p.idempotency_key);
    if let Some(k) = &idempotency_key {
        check_token_text("idempotency key", k, 255)?;
    }
    check_data_depth(p.data.get())?;
    let priority = match p.priority.as_deref() {
        None => Priority::Normal,
        Some(v) => Priority::parse(v).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_event",
                format!("priority {v:?} is not one of high, normal, low"),
            )
        })?,
    };
    let mut subscriptions = st.registry.matching_event(&p.event_type, p.data.get());
    let callback = match p.callback {
        None => None,
        Some(req) => {
            let (cb, destination) =
                crate::callbacks::accept(req, &st.callbacks, st.allow_private_networks).map_err(
                    |why| ApiError::bad_request("invalid_callback", format!("callback: {why}")),
                )?;
            subscriptions.push(destination);
            Some(cb)
        }
    };
    Ok(NewEvent {
        id: p.id.unwrap_or_else(crate::model::new_event_id),
        event_type: p.event_type,
        source: p.source,
        data: p.data.get().to_owned(),
        idempotency_key,
        subscriptions,
        priority,
        callback,
    })
}

fn publish_response(p: &Published) -> Result<(StatusCode, Vec<u8>), ApiError> {
    let (status, body) = match p {
        Published::Created {
            seq,
            id,
            deliveries,
        } => (
            StatusCode::ACCEPTED,
            serde_json::to_vec(&PublishResponse {
                id,
                seq: *seq,
                deliveries: *deliveries,
                duplicate: false,
                event: None,
            }),
        ),
        Published::Duplicate {
            seq,
            event,
            deliveries,
        } => (
            StatusCode::OK,
            serde_json::to_vec(&PublishResponse {
                id: &event.id,
                seq: *seq,
                deliveries: *deliveries,
                duplicate: true,
                event: Some(EventView::new(*seq, event).map_err(ApiError::internal)?),
            }),
        ),
    };
    Ok((status, body.map_err(ApiError::internal)?))
}

async fn publish(st: &ApiState, req: super::Req) -> Result<Resp, ApiError> {
    st.authorize(&req, Scope::Publish)?;
    require_json(&req)?;
    let key = match req.headers().get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    ApiError::bad_request("invalid_event", "Idempotency-Key must be ASCII")
                })?
                .to_owned(),
        ),
    };
    let body = read_body(st, req, st.max_body).await?;
    let p: PublishRequest = parse_json(&body)?;
    let ev = new_event(st, p, key)?;
    let mut results = st.writer.publish(vec![ev]).await?;
    let Some(published) = results.pop() else {
        return Err(ApiError::internal("writer returned no result"));
    };
    st.metrics
        .events_received
        .with_label_values(&["events"])
        .inc();
    let (status, body) = publish_response(&published)?;
    Ok(json(status, body))
}

async fn publish_batch(st: &ApiState, req: super::Req) -> Result<Resp, ApiError> {
    st.authorize(&req, Scope::Publish)?;
    require_json(&req)?;
    let body = read_body(st, req, st.max_body).await?;
    // The path names the item at fault: `events[3]: missing field `type``.
    let super::dto::ObjectOnly::<BatchRequest>(b) =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&body))
            .map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let msg = if path == "." {
                    inner.to_string()
                } else {
                    format!("{path}: {inner}")
                };
                match inner.classify() {
                    serde_json::error::Category::Data => ApiError::bad_request("invalid_body", msg),
                    _ => ApiError::bad_request("malformed_json", msg),
                }
            })?;
    if b.events.is_empty() || b.events.len() > st.max_batch {
        return Err(ApiError::bad_request(
            "invalid_batch",
            format!(
                "a batch holds 1 to {} events, got {}",
                st.max_batch,
                b.events.len()
            ),
        ));
    }
    let mut events = Vec::with_capacity(b.events.len());
    for (i, super::dto::ObjectOnly(p)) in b.events.into_iter().enumerate() {
        events.push(new_event(st, p, None).map_err(|mut e| {
            e.message = format!("events[{i}]: {}", e.message);
            e
        })?);
    }
    let n = events.len() as u64;
    let batch_id = crate::model::new_batch_id();
    let results = st.writer.publish_batch(events, batch_id.clone()).await?;
    st.metrics
        .events_received
        .with_label_values(&["events_batch"])
        .inc_by(n);
    let mut out = Vec::with_capacity(results.len());
    let mut any_created = false;
    for p in &results {
        any_created |= matches!(p, Published::Created { .. });
        let (_, body) = publish_response(p)?;
        out.push(
            serde_json::value::RawValue::from_string(
                String::from_utf8(body).map_err(ApiError::internal)?,
            )
            .map_err(ApiError::internal)?,
        );
    }
    let status = if any_created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    json_of(
        status,
        &serde_json::json!({ "batch_id": batch_id, "items": out }),
    )
}

fn list_events(st: &ApiState, req: &super::Req) -> Result<Resp, ApiError> {
    st.authorize(req, Scope::Admin)?;
    let q = query(req);
    for k in q.keys() {
        if !matches!(
            k.as_str(),
            "type" | "source" | "since" | "until" | "limit" | "cursor" | "priority"
        ) {
            return Err(invalid_query(format!("unknown parameter {k:?}")));
        }
    }
    let (limit, cursor) = paging(&q)?;
    let filter = EventFilter {
        event_type: q.get("type").cloned(),
        source: q.get("source").cloned(),
        since: time_param(&q, "since")?,
        until: time_param(&q, "until")?,
        priority: super::priority_param(&q)?,
    };
    let page = st.store.list_events(&filter, cursor, limit)?;
    let items = page
        .items
        .iter()
        .map(|(seq, e)| EventView::new(*seq, e))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::internal)?;
    json_of(
        StatusCode::OK,
        &ListResponse {
            items,
            next_cursor: page.next.map(|n| n.to_string()),
        },
    )
}

fn get_event(st: &ApiState, req: &super::Req, id: &str) -> Result<Resp, ApiError> {
    st.authorize(req, Scope::Admin)?;
    let Some((seq, e)) = st.store.event_by_id(id)? else {
        return Err(ApiError::not_found(format!("no event with id {id:?}")));
    };
    let mut view = EventView::new(seq, &e).map_err(ApiError::internal)?;
    view.deliveries = Some(st.status_counts(&st.store.delivery_statuses(&[seq])?));
    json_of(StatusCode::OK, &view)
}

/// The seq of an event by id, or 404.
fn event_seq(st: &ApiState, id: &str) -> Result<crate::model::Seq, ApiError> {
    match st.store.event_by_id(id)? {
        Some((seq, _)) => Ok(seq),
        None => Err(ApiError::not_found(format!("no event with id {id:?}"))),
    }
}

fn event_attempts(st: &ApiState, req: &super::Req, id: &str) -> Result<Resp, ApiError> {
    st.authorize(req, Scope::Admin)?;
    let q = query(req);
    super::check_params(&q, &["limit", "cursor"])?;
    let limit = super::limit_param(&q)?;
    let cursor = match q.get("cursor") {
        None => None,
        Some(c) => Some(parse_attempt_cursor(c).ok_or_else(|| invalid_query("invalid cursor"))?),
    };
    let seq = event_seq(st, id)?;
    let (items, next) = st.store.event_attempts(seq, cursor, limit)?;
    let views: Vec<_> = items
        .iter()
        .map(|a| EventAttemptView {
            delivery_id: a.delivery.to_string(),
            subscription: &a.subscription,
            attempt: AttemptView::new(a.n, &a.attempt),
        })
        .collect();
    json_of(
        StatusCode::OK,
        &ListResponse {
            items: views,
            next_cursor: next.map(|c| format!("{}.{}.{}", c.started_at, c.delivery, c.n)),
        },
    )
}

fn parse_attempt_cursor(c: &str) -> Option<crate::storage::inspect::AttemptCursor> {
    let mut parts = c.split('.');
    let cursor = crate::storage::inspect::AttemptCursor {
        started_at: parts.next()?.parse().ok()?,
        delivery: parts.next()?.parse().ok()?,
        n: parts.next()?.parse().ok()?,
    };
    parts.next().is_none().then_some(cursor)
}

async fn cancel_event(st: &ApiState, req: &super::Req, id: &str) -> Result<Resp, ApiError> {
    st.authorize(req, Scope::Publish)?;
    let seq = event_seq(st, id)?;
    let live: Vec<_> = st
        .store
        .delivery_statuses(&[seq])?
        .into_iter()
        .filter(|(_, s)| !s.is_terminal())
        .map(|(d, _)| d)
        .collect();
    let cancelled = if live.is_empty() {
        0
    } else {
        st.writer
            .cancel_deliveries(live, Some(format!("event {id:?} was cancelled")))
            .await?
            .iter()
            .filter(|o| matches!(o, crate::storage::writer::CancelOutcome::Cancelled(_)))
            .count()
    };
    json_of(
        StatusCode::OK,
        &serde_json::json!({ "deliveries": cancelled }),
    )
}

fn get_batch(st: &ApiState, req: &super::Req, id: &str) -> Result<Resp, ApiError> {
    st.authorize(req, Scope::Publish)?;
    let Some(b) = st.store.batch(id)? else {
        return Err(ApiError::not_found(format!("no batch with id {id:?}")));
    };
    let counts = st.status_counts(&st.store.delivery_statuses(&b.seqs)?);
    json_of(
        StatusCode::OK,
        &BatchView {
            id,
            created_at: crate::model::rfc3339(b.created_at),
            events: b.seqs.len(),
            total_deliveries: counts.total(),
            done: counts.all_terminal(),
            deliveries: counts,
        },
    )
}

fn event_deliveries(st: &ApiState, req: &super::Req, id: &str) -> Result<Resp, ApiError> {
    st.authorize(req, Scope::Admin)?;
    let q = query(req);
    super::check_params(&q, &["limit", "cursor"])?;
    let (limit, cursor) = paging(&q)?;
    let seq = event_seq(st, id)?;
    let ids: Vec<_> = st
        .store
        .event_delivery_ids(seq)?
        .into_iter()
        .filter(|d| cursor.is_none_or(|c| *d > c))
        .take(limit.saturating_add(1))
        .collect();
    let more = ids.len() > limit;
    let ds = st.store.deliveries(&ids[..ids.len().min(limit)])?;
    let items: Vec<_> = ds.iter().map(|(id, d)| st.delivery_view(*id, d)).collect();
    let next_cursor = if more {
        ds.last().map(|(id, _)| id.to_string())
    } else {
        None
    };
    json_of(StatusCode::OK, &ListResponse { items, next_cursor })
}

fn delivery_id(id: &str) -> Result<u64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("no delivery with id {id:?}")))
}

fn get_delivery(st: &ApiState, req: &super::Req, id: &str) -> Result<Resp, ApiError> {
    st.authorize(req, Scope::Admin)?;
    let did = delivery_id(id)?;
    let Some(d) = st.store.delivery(did)? else {
        return Err(ApiError::not_found(format!("no delivery with id {id:?}")));
    };
    json_of(StatusCode::OK, &st.delivery_view(did, &d))
}

fn delivery_attempts(st: &ApiState, req: &super::Req, id: &str) -> Result<Resp, ApiError> {
    st.authorize(req, Scope::Admin)?;
    let did = delivery_id(id)?;
    if st.store.delivery(did)?.is_none() {
        return Err(ApiError::not_found(format!("no delivery with id {id:?}")));
    }
    let q = query(req);
    super::check_params(&q, &["limit", "cursor"])?;
    let (limit, cursor) = paging(&q)?;
    let attempts: Vec<_> = st
        .store
        .attempts(did)?
        .into_iter()
        .filter(|(n, _)| cursor.is_none_or(|c| u64::from(*n) > c))
        .take(limit.saturating_add(1))
        .collect();
    let more = attempts.len() > limit;
    let items: Vec<_> = attempts
        .iter()
        .take(limit)
        .map(|(n, a)| AttemptView::new(*n, a))
        .collect();
    let next_cursor = if more {
        items.last().map(|a| a.n.to_string())
    } else {
        None
    };
    json_of(StatusCode::OK, &ListResponse { items, next_cursor })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_routes() {
        assert_eq!(
            Route::parse("/v1/ingest/github"),
            Some(Route::Ingest("github"))
        );
        assert_eq!(Route::parse("/v1/ingest/"), None);
        assert_eq!(Route::parse("/v1/ingest/a/b"), None);
        assert_eq!(Route::parse("/v1/receipts/7"), Some(Route::Receipt("7")));
        assert_eq!(Route::Ingest("x").methods(), &[Method::POST]);
        assert_eq!(Route::Receipt("7").methods(), &[Method::GET]);
    }

    #[test]
    fn route_table() {
        assert_eq!(Route::parse("/v1/events"), Some(Route::Events));
        assert_eq!(Route::parse("/v1/events/"), Some(Route::Events));
        assert_eq!(Route::parse("/v1/events/batch"), Some(Route::EventsBatch));
        assert_eq!(Route::parse("/v1/events/e1"), Some(Route::Event("e1")));
        assert_eq!(
            Route::parse("/v1/events/e1/deliveries"),
            Some(Route::EventDeliveries("e1"))
        );
        assert_eq!(Route::parse("/v1/events/e1/x"), None);
        assert_eq!(Route::parse("/v1/nope"), None);
        assert_eq!(Route::parse("/healthz"), Some(Route::Healthz));
        assert_eq!(Route::parse(""), None);
    }
}

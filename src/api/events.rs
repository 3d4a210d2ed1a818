//! Events: publishing one or a batch, the event list, one event with its delivery counts,
//! its deliveries and attempts, cancelling it, and a batch's status. Each handler parses the
//! request, calls the writer, the store or `operations`, and renders the answer.

use hyper::StatusCode;

use super::dto::*;
use super::error::ApiError;
use super::{
    ApiState, Resp, check_data_depth, invalid_query, json, json_of, paging, parse_json, query,
    read_body, require_json, time_param,
};
use crate::model::Priority;
use crate::operations;
use crate::storage::EventFilter;
use crate::storage::writer::{NewEvent, Published};

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
                id: id.into(),
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
                id: event.id.as_str().into(),
                seq: *seq,
                deliveries: *deliveries,
                duplicate: true,
                event: Some(EventView::new(*seq, event).map_err(ApiError::internal)?),
            }),
        ),
    };
    Ok((status, body.map_err(ApiError::internal)?))
}

pub async fn publish(st: &ApiState, req: super::Req) -> Result<Resp, ApiError> {
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

pub async fn publish_batch(st: &ApiState, req: super::Req) -> Result<Resp, ApiError> {
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

pub fn list(st: &ApiState, req: &super::Req) -> Result<Resp, ApiError> {
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
    super::json_page(items, page.next)
}

pub fn get(st: &ApiState, id: &str) -> Result<Resp, ApiError> {
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

pub fn deliveries(st: &ApiState, req: &super::Req, id: &str) -> Result<Resp, ApiError> {
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

pub fn attempts(st: &ApiState, req: &super::Req, id: &str) -> Result<Resp, ApiError> {
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
            subscription: a.subscription.as_str().into(),
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

pub async fn cancel(st: &ApiState, id: &str) -> Result<Resp, ApiError> {
    let seq = event_seq(st, id)?;
    let reason = format!("event {id:?} was cancelled");
    let cancelled = operations::cancel_event(&st.store, &st.writer, seq, reason).await?;
    json_of(
        StatusCode::OK,
        &serde_json::json!({ "deliveries": cancelled }),
    )
}

pub fn batch(st: &ApiState, id: &str) -> Result<Resp, ApiError> {
    let Some(b) = st.store.batch(id)? else {
        return Err(ApiError::not_found(format!("no batch with id {id:?}")));
    };
    let counts = st.status_counts(&st.store.delivery_statuses(&b.seqs)?);
    json_of(
        StatusCode::OK,
        &BatchView {
            id: id.into(),
            created_at: crate::model::rfc3339(b.created_at),
            events: b.seqs.len(),
            total_deliveries: counts.total(),
            done: counts.all_terminal(),
            deliveries: counts,
        },
    )
}

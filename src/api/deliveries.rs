//! Deliveries: the filtered list (and the attempts under way), one delivery, its attempts,
//! and an operator's retry and cancel.

use hyper::StatusCode;

use super::dto::{AttemptView, DeliveryView, ListResponse};
use super::error::ApiError;
use super::{
    ApiState, Resp, check_params, invalid_query, json_of, paging, priority_param, query, time_param,
};
use crate::model::{DeliveryId, DeliveryStatus};
use crate::operations;
use crate::storage::inspect::DeliveryFilter;
use crate::storage::writer::{CancelOutcome, RetryOutcome};

fn delivery_id(id: &str) -> Result<u64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("no delivery with id {id:?}")))
}

pub fn get(st: &ApiState, id: &str) -> Result<Resp, ApiError> {
    let did = delivery_id(id)?;
    let Some(d) = st.store.delivery(did)? else {
        return Err(ApiError::not_found(format!("no delivery with id {id:?}")));
    };
    json_of(StatusCode::OK, &st.delivery_view(did, &d))
}

pub fn attempts(st: &ApiState, req: &super::Req, id: &str) -> Result<Resp, ApiError> {
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

pub fn list(st: &ApiState, req: &super::Req) -> Result<Resp, ApiError> {
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
        operations::attempts_under_way(&st.store, &st.attempting, &filter, cursor, limit)?
    } else {
        st.store.list_deliveries(&filter, cursor, limit)?
    };
    let items: Vec<_> = page
        .items
        .iter()
        .map(|(id, d)| st.delivery_view(*id, d))
        .collect();
    super::json_page(items, page.next)
}

pub async fn retry(st: &ApiState, id: &str) -> Result<Resp, ApiError> {
    let did = delivery_id(id)?;
    let Some(current) = st.store.delivery(did)? else {
        return Err(ApiError::not_found(format!("no delivery with id {id:?}")));
    };
    if st.registry.get(&current.subscription).is_none()
        && !crate::callbacks::is_callback(&current.subscription)
    {
        return Err(ApiError::conflict(format!(
            "subscription {:?} of delivery {did} no longer exists; nothing would attempt it",
            current.subscription
        )));
    }
    let outcome = st.writer.retry_deliveries(vec![did], None).await?;
    let done = outcome.into_iter().next().and_then(|o| match o {
        RetryOutcome::Scheduled(d) => Some(Ok(d)),
        RetryOutcome::NotAllowed(d) => Some(Err(d)),
        RetryOutcome::NotFound => None,
    });
    answer(did, done, "retried", |status| {
        format!("delivery {did} is {status}; only a delivery not yet succeeded can be retried")
    })
}

pub async fn cancel(st: &ApiState, id: &str) -> Result<Resp, ApiError> {
    let did = delivery_id(id)?;
    let outcome = st
        .writer
        .cancel_deliveries(vec![did], Some("cancelled by an operator".into()))
        .await?;
    let done = outcome.into_iter().next().and_then(|o| match o {
        CancelOutcome::Cancelled(d) => Some(Ok(d)),
        CancelOutcome::NotAllowed(d) => Some(Err(d)),
        CancelOutcome::NotFound => None,
    });
    answer(did, done, "cancelled", |status| {
        format!(
            "delivery {did} is already {status}; only pending or retrying deliveries can be cancelled"
        )
    })
}

/// What an operator's action on one delivery did: the delivery as it is now; 409 with
/// `refused(status)` when its status did not allow it; 404 when there is no such delivery.
fn answer(
    did: DeliveryId,
    done: Option<Result<crate::model::Delivery, crate::model::Delivery>>,
    verb: &str,
    refused: impl Fn(&str) -> String,
) -> Result<Resp, ApiError> {
    match done {
        Some(Ok(d)) => {
            tracing::info!(delivery = did, "delivery {verb} by an operator");
            json_of(StatusCode::OK, &DeliveryView::new(did, &d))
        }
        Some(Err(d)) => Err(ApiError::conflict(refused(d.status.as_str()))),
        None => Err(ApiError::not_found(format!("no delivery with id {did}"))),
    }
}

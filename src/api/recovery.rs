//! Recovery: replaying stored events to subscriptions, the dead-letter queue and its
//! redrive. The work itself is `operations`; these parse, call and render.

use std::collections::HashSet;

use hyper::StatusCode;
use serde::{Deserialize, Serialize};

use super::dto::DeliveryView;
use super::error::ApiError;
use super::{
    ApiState, Resp, check_params, json_of, optional_json, paging, parse_json, query, read_body,
    require_json, time_param,
};
use crate::model::{parse_time, rfc3339};
use crate::operations;
use crate::storage::inspect::DeadFilter;
use crate::subscriptions::TypePattern;
use crate::wire::DeadLetterView;

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

fn replay_selection(st: &ApiState, r: &ReplayRequest) -> Result<operations::Selection, ApiError> {
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
            Some((seq, e)) => Ok(operations::Selection::One(seq, Box::new(e))),
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
            Ok(operations::Selection::Range(from, to))
        }
        (None, (None, None), (Some(from), Some(to))) => {
            if to < from {
                return Err(invalid_replay("to_seq must not be below from_seq"));
            }
            let n = to - from + 1;
            if n > cap {
                return Err(too_many(n));
            }
            Ok(operations::Selection::Range(from, to.saturating_add(1)))
        }
        _ => Err(invalid_replay(
            "give exactly one of: event_id; since and until; from_seq and to_seq",
        )),
    }
}

pub async fn replay(st: &ApiState, req: super::Req) -> Result<Resp, ApiError> {
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
    // A callback host's destination (`callback:…`) replays events' own callbacks.
    let callbacks = r
        .subscription
        .as_deref()
        .is_none_or(crate::callbacks::is_callback);
    let targets: Vec<_> = match &r.subscription {
        Some(id) if crate::callbacks::is_callback(id) => Vec::new(),
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
    let done = operations::replay(
        &st.store,
        &st.writer,
        operations::Targets {
            subscriptions: &targets,
            callbacks,
            callback_host: r
                .subscription
                .as_deref()
                .filter(|s| crate::callbacks::is_callback(s)),
        },
        patterns.as_deref(),
        selection,
    )
    .await?;
    json_of(
        StatusCode::OK,
        &CountResponse {
            deliveries: done.deliveries,
            events: Some(done.events),
        },
    )
}

pub fn dead_letters(st: &ApiState, req: &super::Req) -> Result<Resp, ApiError> {
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
    super::json_page(items, page.next)
}

/// `POST /v1/dead-letters/redrive` body: `{}` for all, or narrowed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedriveRequest {
    pub subscription: Option<String>,
    pub since: Option<String>,
}

pub async fn redrive(st: &ApiState, req: super::Req) -> Result<Resp, ApiError> {
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
    // Dead letters of subscriptions no longer in force stay dead: nothing would attempt
    // them. A callback host's destination is started when its work comes due.
    let in_force: HashSet<String> = st
        .registry
        .snapshot()
        .iter()
        .map(|s| s.id.clone())
        .collect();
    let moved = operations::redrive(&st.store, &st.writer, &filter, |s| {
        in_force.contains(s) || crate::callbacks::is_callback(s)
    })
    .await?;
    json_of(
        StatusCode::OK,
        &CountResponse {
            deliveries: moved,
            events: None,
        },
    )
}

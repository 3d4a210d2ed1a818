//! Inbound provider webhooks over HTTP. `POST /v1/ingest/{source}` verifies a request by its
//! source's signature scheme (no bearer token) and stores it as an immutable receipt together
//! with the canonical event and its deliveries, in one commit. `GET /v1/receipts/{id}` shows a
//! receipt for audits.
//!
//! **Invariant:** a refused request (unknown source, over-size, rate-limited, bad signature,
//! unusable content) stores nothing; a 2xx is sent only after the commit that stored it.

use crate::clock::Instant;

use base64::Engine;
use hyper::StatusCode;
use hyper::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use serde::Serialize;

use super::error::ApiError;
use super::{ApiState, Resp, error_response, json_of, read_body};
use crate::ingest::schemes;
use crate::model::{Receipt, now_micros, rfc3339};
use crate::storage::writer::{Ingested, NewEvent, NewReceipt};

/// Headers never kept in a receipt: credentials, and hop-by-hop headers that describe the
/// connection rather than the request.
const DROPPED_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// `POST /v1/ingest/{source}`.
pub async fn ingest(st: &ApiState, req: super::Req, source: &str) -> Result<Resp, ApiError> {
    // Unknown sources are not counted: their ids come from the client and would let anyone
    // create metric series.
    let Some(entry) = st.sources.get(source) else {
        return Err(ApiError::not_found(format!("no inbound source {source:?}")));
    };
    let src = &entry.source;
    let count = |result: &str| {
        st.metrics
            .receipts
            .with_label_values(&[src.id.as_str(), result])
            .inc();
    };
    if let Err(wait) = entry.admit(Instant::now()) {
        count("rate_limited");
        let mut resp = error_response(&ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("source {:?} is over its rate limit; retry later", src.id),
        ));
        let secs = wait
            .as_secs()
            .saturating_add(u64::from(wait.subsec_nanos() > 0))
            .max(1);
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs.min(86_400)));
        return Ok(resp);
    }

    let received_at = now_micros();
    let method = req.method().to_string();
    let headers = req.headers().clone();
    let body = match read_body(st, req, src.max_body).await {
        Ok(b) => b,
        Err(e) => {
            if e.status == StatusCode::PAYLOAD_TOO_LARGE {
                count("payload_too_large");
            }
            return Err(e);
        }
    };

    // Verification sees the raw bytes and the headers that are text; others cannot be
    // signature headers of any scheme.
    let pairs: Vec<(&str, &str)> = headers
        .iter()
        .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v)))
        .collect();
    let request = schemes::Request {
        headers: &pairs,
        body: &body,
    };
    let verified = match src.verify(received_at.div_euclid(1_000_000), &request) {
        Ok(v) => v,
        Err(rejection) => {
            count(rejection.code());
            tracing::info!(source = %src.id, reason = rejection.code(), "inbound webhook refused");
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                rejection.code(),
                rejection.to_string(),
            ));
        }
    };
    let inbound = src.interpret(&request).map_err(|u| {
        count(u.code());
        ApiError::bad_request(u.code(), u.to_string())
    })?;

    let event = NewEvent {
        id: crate::model::new_event_id(),
        subscriptions: st
            .registry
            .matching_event(&inbound.event_type, &inbound.data),
        event_type: inbound.event_type,
        source: Some(src.id.clone()),
        data: inbound.data,
        idempotency_key: None,
        priority: src.priority,
        callback: None,
    };
    let receipt = NewReceipt {
        receipt: crate::model::Receipt {
            source: src.id.clone(),
            method,
            headers: kept_headers(&headers),
            body: body.to_vec(),
            received_at,
            scheme: src.scheme_name().to_string(),
            signed_timestamp: verified.timestamp,
            delivery_id: inbound.delivery_id,
            // Filled in by the writer once the event is stored.
            event_id: String::new(),
            event_seq: 0,
        },
        fingerprint: src.fingerprint_window.map(|w| {
            (
                crate::model::body_fingerprint(&body),
                received_at.saturating_sub(crate::model::micros(w)),
            )
        }),
    };
    let ingested = st
        .writer
        .ingest(receipt, event)
        .await
        .inspect_err(|_| count("error"))?;
    match ingested {
        Ingested::Created {
            receipt_id,
            seq,
            event_id,
            deliveries,
        } => {
            count("accepted");
            st.metrics
                .events_received
                .with_label_values(&["ingest"])
                .inc();
            json_of(
                StatusCode::ACCEPTED,
                &IngestResponse {
                    receipt_id: receipt_id.to_string(),
                    event_id: &event_id,
                    seq: Some(seq),
                    deliveries: Some(deliveries),
                    duplicate: false,
                },
            )
        }
        Ingested::Duplicate {
            receipt_id,
            event_id,
        } => {
            count("duplicate");
            json_of(
                StatusCode::OK,
                &IngestResponse {
                    receipt_id: receipt_id.to_string(),
                    event_id: &event_id,
                    seq: None,
                    deliveries: None,
                    duplicate: true,
                },
            )
        }
    }
}

/// `GET /v1/receipts/{id}` (admin).
pub fn get_receipt(st: &ApiState, id: &str) -> Result<Resp, ApiError> {
    let not_found = || ApiError::not_found(format!("no receipt with id {id:?}"));
    let rid: u64 = id.parse().map_err(|_| not_found())?;
    let Some(r) = st.store.receipt(rid)? else {
        return Err(not_found());
    };
    json_of(StatusCode::OK, &ReceiptView::new(rid, &r))
}

/// The request headers a receipt keeps, in arrival order.
fn kept_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(k, _)| !DROPPED_HEADERS.contains(&k.as_str()))
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// The answer to an inbound webhook.
#[derive(Debug, Serialize)]
struct IngestResponse<'a> {
    receipt_id: String,
    event_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deliveries: Option<u32>,
    duplicate: bool,
}

/// A receipt as the API shows it.
#[derive(Debug, Serialize)]
struct ReceiptView<'a> {
    id: String,
    source: &'a str,
    method: &'a str,
    received_at: String,
    headers: Vec<HeaderView<'a>>,
    /// The body as text when it is UTF-8, else base64 (standard alphabet, padded).
    body: String,
    body_encoding: &'static str,
    body_size: usize,
    verification: VerificationView<'a>,
    delivery_id: Option<&'a str>,
    event_id: &'a str,
    event_seq: u64,
}

#[derive(Debug, Serialize)]
struct HeaderView<'a> {
    name: &'a str,
    value: &'a str,
}

#[derive(Debug, Serialize)]
struct VerificationView<'a> {
    scheme: &'a str,
    /// Only verified requests are stored.
    result: &'static str,
    signed_timestamp: Option<i64>,
}

impl<'a> ReceiptView<'a> {
    fn new(id: u64, r: &'a Receipt) -> Self {
        let (body, body_encoding) = match std::str::from_utf8(&r.body) {
            Ok(text) => (text.to_string(), "utf-8"),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(&r.body),
                "base64",
            ),
        };
        Self {
            id: id.to_string(),
            source: &r.source,
            method: &r.method,
            received_at: rfc3339(r.received_at),
            headers: r
                .headers
                .iter()
                .map(|(name, value)| HeaderView { name, value })
                .collect(),
            body,
            body_encoding,
            body_size: r.body.len(),
            verification: VerificationView {
                scheme: &r.scheme,
                result: "verified",
                signed_timestamp: r.signed_timestamp,
            },
            delivery_id: r.delivery_id.as_deref(),
            event_id: &r.event_id,
            event_seq: r.event_seq,
        }
    }
}

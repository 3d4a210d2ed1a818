//! One delivery attempt: build the Standard Webhooks request, send it, classify the answer,
//! decide what happens next and record it through the writer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::value::RawValue;

use super::client::{self, Class, ErrorKind};
use crate::metrics::Metrics;
use crate::model::{Attempt, Delivery, Event, Micros, Subscription, now_micros, rfc3339};
use crate::retry::{RetryDecision, RetryPolicy, parse_retry_after};
use crate::scheduler::driver::Job;
use crate::signing::{SigningKey, signature_header};
use crate::storage::writer::{AttemptRecord, Next, WriterHandle};

/// What one destination's attempts share.
pub struct Destination {
    pub sub: Arc<Subscription>,
    pub sub_id: Arc<str>,
    pub url: reqwest::Url,
    /// Set when the URL's host is an address literal the guard refuses.
    pub refused: Option<String>,
    pub keys: Vec<SigningKey>,
    pub policy: RetryPolicy,
    pub client: reqwest::Client,
    pub writer: WriterHandle,
    pub metrics: Arc<Metrics>,
    /// This destination's series of the hottest metrics, looked up once.
    pub series: Series,
    pub max_response_body: usize,
}

/// A destination's own metric series: looked up by label once, not on every attempt.
pub struct Series {
    pub successes: prometheus::IntCounter,
    pub attempt_seconds: prometheus::Histogram,
    pub queue_depth: prometheus::IntGauge,
    pub in_flight: prometheus::IntGauge,
    pub breaker_state: prometheus::IntGauge,
}

impl Series {
    pub fn new(m: &Metrics, sub_id: &str) -> Self {
        Self {
            successes: m.attempts.with_label_values(&[sub_id, "success"]),
            attempt_seconds: m.attempt_seconds.with_label_values(&[sub_id]),
            queue_depth: m.queue_depth.with_label_values(&[sub_id]),
            in_flight: m.in_flight.with_label_values(&[sub_id]),
            breaker_state: m.breaker_state.with_label_values(&[sub_id]),
        }
    }
}

/// How the endpoint behaved, for the circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// It answered (2xx, or a 4xx that is the request's fault).
    Up,
    /// Timeout, connection failure, 429 or 5xx.
    Down,
}

/// The end of one attempt, reported to the destination task.
#[derive(Debug)]
pub struct Finished {
    pub job: Job,
    pub health: Health,
    pub next: Next,
    pub gone: bool,
    /// False when the writer could not record it: the job must be tried again.
    pub recorded: bool,
}

/// The outbound body: `{"id","type","timestamp","data"}`.
#[derive(Serialize)]
struct Payload<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    timestamp: String,
    data: &'a RawValue,
}

/// Renders the outbound body of an event.
pub fn payload(event: &Event) -> Result<Vec<u8>, serde_json::Error> {
    let data: &RawValue = serde_json::from_str(&event.data)?;
    serde_json::to_vec(&Payload {
        id: &event.id,
        event_type: &event.event_type,
        timestamp: rfc3339(event.received_at),
        data,
    })
}

fn micros(d: Duration) -> Micros {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Runs one attempt of `delivery` to the destination and records its outcome.
pub async fn run(
    dest: Arc<Destination>,
    job: Job,
    delivery: Delivery,
    event: Arc<Event>,
) -> Finished {
    let started_at = now_micros();
    let t0 = Instant::now();
    let n = delivery.attempts + 1;
    let sub = &dest.sub;

    let result = match (&dest.refused, payload(&event)) {
        (Some(why), _) => Err((ErrorKind::RefusedAddress, why.clone())),
        (None, Err(e)) => Err((ErrorKind::Request, format!("cannot render payload: {e}"))),
        (None, Ok(body)) => {
            let ts = started_at / 1_000_000;
            let mut req = dest
                .client
                .post(dest.url.clone())
                .header("webhook-id", event.id.as_str())
                .header("webhook-timestamp", ts.to_string())
                .header(
                    "webhook-signature",
                    signature_header(&dest.keys, &event.id, ts, &body),
                )
                .header(reqwest::header::CONTENT_TYPE, "application/json");
            for (k, v) in &sub.headers {
                req = req.header(k.as_str(), v.as_str());
            }
            client::send(req.body(body), sub.timeout, dest.max_response_body).await
        }
    };
    let elapsed = t0.elapsed();
    let unit: f64 = rand::random();
    let now = now_micros();
    let retry_or_dead = |retry_after: Option<Duration>| match dest.policy.next(n, retry_after, unit)
    {
        RetryDecision::Retry(d) => Next::Retry {
            at: now.saturating_add(micros(d)),
        },
        RetryDecision::GiveUp => Next::Dead,
    };

    let (attempt, error, health, next, gone, outcome) = match result {
        Ok(resp) => {
            let class = client::classify(resp.status, &sub.final_status_codes);
            let retry_after = resp
                .retry_after
                .as_deref()
                .and_then(|v| parse_retry_after(v, u64::try_from(now / 1_000_000).unwrap_or(0)));
            let (health, next, gone, error, outcome) = match class {
                Class::Success => (Health::Up, Next::Succeeded, false, None, "success"),
                Class::Gone => (
                    Health::Up,
                    Next::Dead,
                    true,
                    Some("HTTP 410 Gone: the subscription was disabled".to_string()),
                    "gone",
                ),
                Class::Final => (
                    Health::Up,
                    Next::Dead,
                    false,
                    Some(format!("HTTP {} (configured final)", resp.status)),
                    "final",
                ),
                Class::Retry { endpoint_failure } => (
                    if endpoint_failure {
                        Health::Down
                    } else {
                        Health::Up
                    },
                    retry_or_dead(retry_after),
                    false,
                    Some(format!("HTTP {}", resp.status)),
                    "http_error",
                ),
            };
            let attempt = Attempt {
                started_at,
                duration_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                status_code: Some(resp.status),
                error: None,
                response_body: String::from_utf8_lossy(&resp.body).into_owned(),
            };
            (attempt, error, health, next, gone, outcome)
        }
        Err((kind, msg)) => {
            let attempt = Attempt {
                started_at,
                duration_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                status_code: None,
                error: Some(kind.as_str().to_string()),
                response_body: String::new(),
            };
            let next = retry_or_dead(None);
            (
                attempt,
                Some(format!("{}: {msg}", kind.as_str())),
                Health::Down,
                next,
                false,
                kind.as_str(),
            )
        }
    };

    let m = &dest.metrics;
    if outcome == "success" {
        dest.series.successes.inc();
    } else {
        m.attempts.with_label_values(&[&dest.sub_id, outcome]).inc();
    }
    dest.series.attempt_seconds.observe(elapsed.as_secs_f64());
    if next == Next::Dead {
        m.dead.with_label_values(&[&dest.sub_id]).inc();
        tracing::warn!(delivery = job.delivery, subscription = %dest.sub_id, attempts = n, error = error.as_deref().unwrap_or(""), "delivery dead-lettered");
    }
    let recorded = dest
        .writer
        .record_attempts(vec![AttemptRecord {
            delivery: job.delivery,
            subscription: dest.sub_id.clone(),
            attempt,
            error,
            next,
        }])
        .await;
    if let Err(e) = &recorded {
        tracing::error!(delivery = job.delivery, error = %e, "cannot record attempt; it will be repeated");
    }
    Finished {
        job,
        health,
        next,
        gone,
        recorded: recorded.is_ok(),
    }
}

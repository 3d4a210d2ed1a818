//! One delivery attempt: build the Standard Webhooks request, send it, classify the answer,
//! decide what happens next and record it through the writer.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};

use super::client::{self, Class, ErrorKind};
use crate::metrics::Metrics;
use crate::model::{Attempt, Event, Micros, micros, rfc3339};
use crate::retry::{RetryDecision, RetryPolicy, parse_retry_after};
use crate::scheduler::driver::Job;
use crate::signing::{self, SigningKey, signature_header};
use crate::storage::writer::{AttemptRecord, Next, WriterHandle};
use crate::subscriptions::{Subscription, SubscriptionSource};

const WEBHOOK_ID: HeaderName = HeaderName::from_static(signing::STANDARD_ID_HEADER);
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static(signing::STANDARD_TIMESTAMP_HEADER);
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static(signing::STANDARD_SIGNATURE_HEADER);

/// `content-type` and a subscription's own headers (which config validation has checked).
pub fn fixed_headers(sub: &Subscription) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::with_capacity(sub.headers.len() + 4);
    map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (k, v) in &sub.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|e| format!("invalid header name {k:?}: {e}"))?;
        let value =
            HeaderValue::from_str(v).map_err(|e| format!("invalid value of header {k:?}: {e}"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// What one destination's attempts share.
pub struct Destination {
    pub sub: Arc<Subscription>,
    pub sub_id: Arc<str>,
    /// Where requests go; or why none may be sent: the URL's host is an address literal the
    /// guard refuses (`RefusedAddress`), or the destination cannot be used at all (`Unusable`).
    pub target: Result<reqwest::Url, (ErrorKind, String)>,
    pub keys: Vec<SigningKey>,
    /// The headers every request of this destination carries besides the three signed
    /// ones: `content-type` and the subscription's own, parsed once.
    pub headers: HeaderMap,
    pub policy: RetryPolicy,
    pub client: reqwest::Client,
    pub writer: WriterHandle,
    pub metrics: Arc<Metrics>,
    /// This destination's series of the hottest metrics, looked up once.
    pub series: Series,
    pub max_response_body: usize,
    /// For a callback host, whose URLs come with each event: may they be private?
    pub allow_private_networks: bool,
    /// Stamps attempts and decides due times.
    pub clock: crate::clock::Clock,
}

/// A destination's own metric series: looked up by label once, not on every attempt.
pub struct Series {
    pub successes: prometheus::IntCounter,
    pub attempt_seconds: prometheus::Histogram,
    pub queue_depth: prometheus::IntGauge,
    pub in_flight: prometheus::IntGauge,
    pub breaker_state: prometheus::IntGauge,
    pub rate_limited: prometheus::IntCounter,
    /// Attempts started, by priority rank (high, normal, low).
    pub by_priority: [prometheus::IntCounter; 3],
}

impl Series {
    pub fn new(m: &Metrics, sub_id: &str) -> Self {
        Self {
            successes: m.attempts.with_label_values(&[sub_id, "success"]),
            attempt_seconds: m.attempt_seconds.with_label_values(&[sub_id]),
            queue_depth: m.queue_depth.with_label_values(&[sub_id]),
            in_flight: m.in_flight.with_label_values(&[sub_id]),
            breaker_state: m.breaker_state.with_label_values(&[sub_id]),
            rate_limited: m.rate_limited.with_label_values(&[sub_id]),
            by_priority: crate::model::Priority::ALL
                .map(|p| m.attempts_by_priority.with_label_values(&[p.as_str()])),
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

/// The end of one attempt's request, reported to the destination task, which records it.
#[derive(Debug)]
pub struct Outcome {
    pub job: Job,
    pub health: Health,
    pub record: AttemptRecord,
    pub gone: bool,
}

/// An attempt whose outcome went to the writer.
#[derive(Debug)]
pub struct Finished {
    pub job: Job,
    pub next: Next,
    pub gone: bool,
}

/// What became of a run of outcomes handed to the writer in one command.
#[derive(Debug)]
pub struct Recorded {
    pub finished: Vec<Finished>,
    /// False when the writer could not record them: their jobs must be tried again.
    pub ok: bool,
}

/// Renders the outbound body of an event: `{"id","type","timestamp","data"}`, with `data`
/// copied verbatim (it is the producer's JSON text, validated when the event was taken in).
pub fn payload(event: &Event) -> Result<Vec<u8>, serde_json::Error> {
    let timestamp = rfc3339(event.received_at);
    let mut out = Vec::with_capacity(
        event.id.len() + event.event_type.len() + timestamp.len() + event.data.len() + 48,
    );
    out.extend_from_slice(br#"{"id":"#);
    serde_json::to_writer(&mut out, &event.id)?;
    out.extend_from_slice(br#","type":"#);
    serde_json::to_writer(&mut out, &event.event_type)?;
    out.extend_from_slice(br#","timestamp":"#);
    serde_json::to_writer(&mut out, &timestamp)?;
    out.extend_from_slice(br#","data":"#);
    out.extend_from_slice(event.data.as_bytes());
    out.push(b'}');
    Ok(out)
}

/// Sends attempt number `n` of a job to the destination and classifies the answer; the
/// destination task records the outcome (see [`record`]).
pub async fn run(dest: Arc<Destination>, job: Job, n: u32, event: Arc<Event>) -> Outcome {
    let started_at = dest.clock.now_micros();
    let t0 = dest.clock.now();
    let sub = &dest.sub;

    let callback = match sub.source {
        SubscriptionSource::Callback => Some(callback_target(&dest, &event)),
        _ => None,
    };
    let target = match &callback {
        Some(Ok((url, _, _))) => Ok(url),
        Some(Err(e)) => Err(e.clone()),
        None => dest.target.as_ref().map_err(Clone::clone),
    };
    let result = match (target, payload(&event)) {
        (Err((kind, why)), _) => Err((kind, why)),
        (Ok(_), Err(e)) => Err((ErrorKind::Request, format!("cannot render payload: {e}"))),
        (Ok(url), Ok(body)) => {
            let ts = started_at / 1_000_000;
            let signed = match &callback {
                Some(Ok((_, headers, key))) => {
                    let keys = key.as_ref().map_or(&dest.keys[..], std::slice::from_ref);
                    sign(headers.clone(), keys, &event.id, ts, &body)
                }
                _ => sign(dest.headers.clone(), &dest.keys, &event.id, ts, &body),
            };
            match signed {
                Ok(headers) => {
                    let req = dest.client.post(url.clone()).headers(headers).body(body);
                    client::send(req, sub.timeout, dest.max_response_body).await
                }
                Err(why) => Err((ErrorKind::Request, why)),
            }
        }
    };
    outcome(&dest, job, n, started_at, t0.elapsed(), result)
}

/// `headers` plus the Standard Webhooks id, timestamp and signatures.
fn sign(
    mut headers: HeaderMap,
    keys: &[SigningKey],
    id: &str,
    ts: i64,
    body: &[u8],
) -> Result<HeaderMap, String> {
    let id_value = HeaderValue::from_str(id)
        .map_err(|e| format!("event id {id:?} cannot be a header: {e}"))?;
    let signatures = HeaderValue::try_from(signature_header(keys, id, ts, body))
        .map_err(|e| format!("cannot build the signature header: {e}"))?;
    headers.insert(WEBHOOK_ID, id_value);
    headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(ts));
    headers.insert(WEBHOOK_SIGNATURE, signatures);
    Ok(headers)
}

/// Where a callback host's delivery goes and how it is signed: the URL, headers and secret
/// its event names (the destination's default secret when it names none). Checked when the
/// event was published; what fails here (a stored event an older version accepted) cannot
/// become usable by waiting.
/// `None` for the key: the destination's own (the default secret).
type CallbackTarget = (reqwest::Url, HeaderMap, Option<SigningKey>);

fn callback_target(
    dest: &Destination,
    event: &Event,
) -> Result<CallbackTarget, (ErrorKind, String)> {
    let unusable = |why: String| (ErrorKind::Unusable, why);
    let Some(cb) = &event.callback else {
        return Err(unusable("the event names no callback".into()));
    };
    let url = crate::subscriptions::spec::parse_destination(&cb.url).map_err(unusable)?;
    super::ssrf::check_url_host(&url, dest.allow_private_networks)
        .map_err(|e| (ErrorKind::RefusedAddress, e.to_string()))?;
    let mut headers = HeaderMap::with_capacity(cb.headers.len() + 4);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (k, v) in &cb.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|e| unusable(format!("invalid header name {k:?}: {e}")))?;
        let value = HeaderValue::from_str(v)
            .map_err(|e| unusable(format!("invalid value of header {k:?}: {e}")))?;
        headers.append(name, value);
    }
    let key = match &cb.secret {
        Some(s) => Some(signing::parse_secret(s).map_err(|e| unusable(format!("secret: {e}")))?),
        None if dest.keys.is_empty() => {
            return Err(unusable(
                "no secret to sign with: the callback names none and [delivery.callbacks] has no secret".into(),
            ));
        }
        None => None,
    };
    Ok((url, headers, key))
}

/// Classifies what attempt `n` of a job got (an answer, or why there was none), counts it,
/// and decides what happens next.
pub fn outcome(
    dest: &Destination,
    job: Job,
    n: u32,
    started_at: Micros,
    elapsed: Duration,
    result: Result<client::Response, (ErrorKind, String)>,
) -> Outcome {
    let sub = &dest.sub;
    let unit: f64 = rand::random();
    let now = dest.clock.now_micros();
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
                    Some(if sub.source == SubscriptionSource::Callback {
                        "HTTP 410 Gone".to_string()
                    } else {
                        "HTTP 410 Gone: the subscription was disabled".to_string()
                    }),
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
            // An unusable destination will not become usable by waiting.
            let next = if kind == ErrorKind::Unusable {
                Next::Dead
            } else {
                retry_or_dead(None)
            };
            // Our own failure says nothing about the endpoint.
            let health = if matches!(kind, ErrorKind::Internal | ErrorKind::Unusable) {
                Health::Up
            } else {
                Health::Down
            };
            (
                attempt,
                Some(format!("{}: {msg}", kind.as_str())),
                health,
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
    let record = AttemptRecord {
        delivery: job.delivery,
        subscription: dest.sub_id.clone(),
        attempt,
        error,
        next,
    };
    Outcome {
        job,
        health,
        record,
        gone,
    }
}

/// Records a run of outcomes through the writer, in one command and one commit; `awaited`:
/// the destination starts nothing until it is recorded (FIFO).
pub async fn record(writer: WriterHandle, outcomes: Vec<Outcome>, awaited: bool) -> Recorded {
    let mut records = Vec::with_capacity(outcomes.len());
    let mut finished = Vec::with_capacity(outcomes.len());
    for mut o in outcomes {
        // A job that has to go again reads its event back from disk; meanwhile the outcome
        // holds no copy of it.
        o.job.event = None;
        finished.push(Finished {
            job: o.job,
            next: o.record.next,
            gone: o.gone,
        });
        records.push(o.record);
    }
    let result = writer.record_outcomes(records, awaited).await;
    if let Err(e) = &result {
        tracing::error!(attempts = finished.len(), error = %e, "cannot record attempts; they will be repeated");
    }
    Recorded {
        finished,
        ok: result.is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_the_event_as_json_with_data_verbatim() {
        let event = Event {
            id: "evt_1".into(),
            event_type: "order.\"created\"".into(),
            source: None,
            data: r#"{ "b": [1, 2.50],  "a": "\u00e9" }"#.into(),
            received_at: 1_700_000_000_123_456,
            idempotency_key: None,
            receipt: None,
            priority: Default::default(),
            batch: None,
            callback: None,
        };
        let body = match payload(&event) {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        };
        let text = String::from_utf8_lossy(&body);
        // The data member keeps the producer's spacing and escapes, byte for byte.
        assert!(
            text.ends_with(r#","data":{ "b": [1, 2.50],  "a": "\u00e9" }}"#),
            "{text}"
        );
        let v: serde_json::Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => panic!("not JSON: {e}: {text}"),
        };
        assert_eq!(v["id"], "evt_1");
        assert_eq!(v["type"], "order.\"created\"");
        assert_eq!(v["timestamp"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(v["data"]["a"], "é");
        assert_eq!(v.as_object().map(|o| o.len()), Some(4));
    }
}

//! The API's answers as types: what the daemon renders (borrowing from its records, so a
//! list costs no copies) and what the operator client deserializes (owning, as
//! `View<'static>`), one definition for both sides of the wire. Field names and shapes are
//! the API's contract (`docs/openapi.json`).

use std::borrow::Cow;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::model::{Attempt, Delivery, DeliveryId, Event, Seq, rfc3339};
use crate::subscriptions::{Described, SubscriptionSource};

/// The answer to one published event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishResponse<'a> {
    pub id: Cow<'a, str>,
    pub seq: Seq,
    pub deliveries: u32,
    pub duplicate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<EventView<'a>>,
}

/// An event as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventView<'a> {
    pub id: Cow<'a, str>,
    pub seq: Seq,
    #[serde(rename = "type")]
    pub event_type: Cow<'a, str>,
    pub source: Option<Cow<'a, str>>,
    pub data: Cow<'a, RawValue>,
    pub received_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<Cow<'a, str>>,
    pub receipt_id: Option<String>,
    pub priority: Cow<'a, str>,
    /// The `POST /v1/events/batch` that stored it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<Cow<'a, str>>,
    /// The producer's callback: the URL masked, header names only, never the secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback: Option<CallbackView<'a>>,
    /// Its deliveries by status (`GET /v1/events/{id}` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<StatusCounts>,
}

/// What the API shows of an event's callback.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallbackView<'a> {
    pub url: String,
    pub headers: Vec<Cow<'a, str>>,
    pub secret: bool,
}

/// Deliveries by status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCounts {
    pub pending: u64,
    pub in_flight: u64,
    pub retrying: u64,
    pub succeeded: u64,
    pub dead: u64,
    pub cancelled: u64,
}

impl StatusCounts {
    pub fn add(&mut self, status: crate::model::DeliveryStatus) {
        use crate::model::DeliveryStatus as S;
        let c = match status {
            S::Pending => &mut self.pending,
            S::InFlight => &mut self.in_flight,
            S::Retrying => &mut self.retrying,
            S::Succeeded => &mut self.succeeded,
            S::Dead => &mut self.dead,
            S::Cancelled => &mut self.cancelled,
        };
        *c += 1;
    }

    pub fn total(&self) -> u64 {
        self.pending + self.in_flight + self.retrying + self.succeeded + self.dead + self.cancelled
    }

    /// Every delivery is succeeded, dead or cancelled.
    pub fn all_terminal(&self) -> bool {
        self.pending + self.in_flight + self.retrying == 0
    }
}

/// `GET /v1/batches/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchView<'a> {
    pub id: Cow<'a, str>,
    pub created_at: String,
    /// Events it holds (new or duplicate).
    pub events: usize,
    /// Their deliveries by status, and how many in all.
    pub deliveries: StatusCounts,
    pub total_deliveries: u64,
    /// Every delivery is terminal.
    pub done: bool,
}

/// One attempt of one of an event's deliveries (`GET /v1/events/{id}/attempts`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventAttemptView<'a> {
    pub delivery_id: String,
    pub subscription: Cow<'a, str>,
    #[serde(flatten)]
    pub attempt: AttemptView<'a>,
}

impl<'a> EventView<'a> {
    /// Borrows an event; the stored data is valid JSON by construction.
    pub fn new(seq: Seq, e: &'a Event) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: Cow::Borrowed(&e.id),
            seq,
            event_type: Cow::Borrowed(&e.event_type),
            source: e.source.as_deref().map(Cow::Borrowed),
            data: Cow::Borrowed(serde_json::from_str::<&RawValue>(&e.data)?),
            received_at: rfc3339(e.received_at),
            idempotency_key: e.idempotency_key.as_deref().map(Cow::Borrowed),
            receipt_id: e.receipt.map(|r| r.to_string()),
            priority: Cow::Borrowed(e.priority.as_str()),
            batch_id: e.batch.as_deref().map(Cow::Borrowed),
            callback: e.callback.as_ref().map(|c| CallbackView {
                url: crate::redact::url_str(&c.url),
                headers: c
                    .headers
                    .keys()
                    .map(|h| Cow::Borrowed(h.as_str()))
                    .collect(),
                secret: c.secret.is_some(),
            }),
            deliveries: None,
        })
    }
}

/// A delivery as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryView<'a> {
    pub id: String,
    pub event_id: Cow<'a, str>,
    pub event_seq: Seq,
    pub subscription: Cow<'a, str>,
    pub status: Cow<'a, str>,
    pub attempts: u32,
    pub next_attempt_at: Option<String>,
    pub last_error: Option<Cow<'a, str>>,
    pub created_at: String,
    pub updated_at: String,
    /// Why it exists: `publish`, `replay` or `redrive`.
    pub origin: Cow<'a, str>,
    pub priority: Cow<'a, str>,
}

impl<'a> DeliveryView<'a> {
    pub fn new(id: DeliveryId, d: &'a Delivery) -> Self {
        Self {
            id: id.to_string(),
            event_id: Cow::Borrowed(&d.event_id),
            event_seq: d.event_seq,
            subscription: Cow::Borrowed(&d.subscription),
            status: Cow::Borrowed(d.status.as_str()),
            attempts: d.attempts,
            next_attempt_at: d.next_attempt_at.map(rfc3339),
            last_error: d.last_error.as_deref().map(Cow::Borrowed),
            created_at: rfc3339(d.created_at),
            updated_at: rfc3339(d.updated_at),
            origin: Cow::Borrowed(match d.origin {
                crate::model::Origin::Publish => "publish",
                crate::model::Origin::Replay => "replay",
                crate::model::Origin::Redrive => "redrive",
            }),
            priority: Cow::Borrowed(d.priority.as_str()),
        }
    }
}

/// One attempt as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttemptView<'a> {
    pub n: u32,
    pub started_at: String,
    pub duration_ms: f64,
    pub status_code: Option<u16>,
    pub error: Option<Cow<'a, str>>,
    pub response_body: Cow<'a, str>,
}

impl<'a> AttemptView<'a> {
    pub fn new(n: u32, a: &'a Attempt) -> Self {
        Self {
            n,
            started_at: rfc3339(a.started_at),
            duration_ms: a.duration_us as f64 / 1000.0,
            status_code: a.status_code,
            error: a.error.as_deref().map(Cow::Borrowed),
            response_body: Cow::Borrowed(&a.response_body),
        }
    }
}

/// A page of a list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// One signing secret as shown: never the secret, only its last four characters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SecretView {
    pub last4: String,
    /// Set on a rotated-out secret: when it stops signing.
    pub expires_at: Option<String>,
    /// `whpk_<base64>` for an Ed25519 (`whsk_`) key, which signs `v1a,`: what receivers
    /// verify with. `null` for an HMAC (`whsec_`) secret.
    pub public_key: Option<String>,
}

/// Retry settings as shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetryView {
    pub max_attempts: u32,
    pub initial: String,
    pub max: String,
    pub multiplier: f64,
}

/// A subscription's circuit breaker settings as the API shows them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BreakerView {
    pub failure_threshold: u32,
    pub failure_rate: f64,
    pub min_requests: u32,
    pub window: String,
    pub cooldown: String,
    pub half_open_probes: u32,
}

/// A subscription as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscriptionView<'a> {
    pub id: Cow<'a, str>,
    /// `config` (read-only here) or `api`.
    pub source: Cow<'a, str>,
    /// The password and query values masked (`user:***@host/h?token=***`).
    pub url: String,
    pub event_types: Vec<Cow<'a, str>>,
    pub filter: Option<Cow<'a, Value>>,
    pub enabled: bool,
    pub paused: bool,
    /// Why it was last switched (`paused`, `resumed`, `gone`, `auto_disabled`).
    pub state_reason: Option<Cow<'a, str>>,
    pub state_changed_at: Option<String>,
    /// Names only: header values may be credentials.
    pub headers: Vec<Cow<'a, str>>,
    pub secrets: Vec<SecretView>,
    pub timeout: String,
    pub rate_limit: Option<f64>,
    pub rate_limit_burst: Option<u32>,
    pub max_in_flight: u32,
    pub ordering: crate::subscriptions::Ordering,
    pub retry: RetryView,
    pub breaker: BreakerView,
    pub final_status_codes: Cow<'a, [u16]>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    /// Why a stored definition that no longer validates cannot be used (its deliveries go
    /// dead); change it with `PUT` or delete it.
    pub unusable: Option<Cow<'a, str>>,
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl<'a> SubscriptionView<'a> {
    pub fn new(d: &'a Described) -> Self {
        let s = &d.sub;
        Self {
            id: Cow::Borrowed(&s.id),
            source: Cow::Borrowed(match s.source {
                SubscriptionSource::Config => "config",
                SubscriptionSource::Api => "api",
                SubscriptionSource::Callback => "callback",
            }),
            url: crate::redact::url_str(&s.url),
            event_types: s
                .event_types
                .iter()
                .map(|p| Cow::Borrowed(p.as_str()))
                .collect(),
            filter: s.filter.as_ref().map(|f| Cow::Borrowed(f.as_json())),
            enabled: s.enabled,
            paused: s.paused,
            state_reason: d
                .state
                .as_ref()
                .and_then(|st| st.reason.as_deref())
                .map(Cow::Borrowed),
            state_changed_at: d.state.as_ref().map(|st| rfc3339(st.changed_at)),
            headers: s
                .headers
                .keys()
                .map(|h| Cow::Borrowed(h.as_str()))
                .collect(),
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
            final_status_codes: Cow::Borrowed(&s.final_status_codes),
            created_at: d.created_at.map(rfc3339),
            updated_at: d.updated_at.map(rfc3339),
            unusable: s.unusable.as_deref().map(Cow::Borrowed),
        }
    }
}

/// A dead letter: the delivery and when it was dead-lettered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetterView<'a> {
    #[serde(flatten)]
    pub delivery: DeliveryView<'a>,
    pub dead_at: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the daemon renders (borrowed) the client reads back (owned) with every field.
    #[test]
    fn views_read_back_as_they_were_written() {
        let d = Delivery {
            event_seq: 3,
            event_id: "evt_1".into(),
            subscription: "crm".into(),
            status: crate::model::DeliveryStatus::Retrying,
            attempts: 2,
            next_attempt_at: Some(1_700_000_000_000_000),
            last_error: Some("HTTP 503".into()),
            created_at: 1,
            updated_at: 2,
            origin: crate::model::Origin::Replay,
            priority: crate::model::Priority::High,
        };
        let page = Page {
            items: vec![DeliveryView::new(7, &d)],
            next_cursor: Some("7".into()),
        };
        let text = serde_json::to_string(&page).unwrap();
        let back: Page<DeliveryView<'static>> = serde_json::from_str(&text).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), text);
        let v = &back.items[0];
        assert_eq!(
            (v.id.as_str(), &*v.status, &*v.priority),
            ("7", "retrying", "high")
        );
        assert_eq!(v.last_error.as_deref(), Some("HTTP 503"));

        let e = Event {
            id: "evt_1".into(),
            event_type: "t".into(),
            source: None,
            data: r#"{"a":[1,2]}"#.into(),
            received_at: 5,
            idempotency_key: None,
            receipt: None,
            priority: crate::model::Priority::Low,
            batch: Some("bat_1".into()),
            callback: None,
        };
        let text = serde_json::to_string(&EventView::new(3, &e).unwrap()).unwrap();
        let back: EventView<'static> = serde_json::from_str(&text).unwrap();
        assert_eq!(back.data.get(), r#"{"a":[1,2]}"#, "the data verbatim");
        assert_eq!(back.batch_id.as_deref(), Some("bat_1"));
        assert_eq!(serde_json::to_string(&back).unwrap(), text);
    }
}

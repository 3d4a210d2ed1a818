//! Wire types: request bodies as clients send them and responses as they receive them.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::model::{Attempt, Delivery, DeliveryId, Event, Seq, rfc3339};

/// `POST /v1/events` body, and one item of a batch.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest<'a> {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(borrow)]
    pub data: &'a RawValue,
    /// Batch items carry their key here; single publishes may use the header instead.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// `high`, `normal` (the default) or `low`.
    #[serde(default)]
    pub priority: Option<String>,
    /// Where this one event goes besides the subscriptions.
    #[serde(default)]
    pub callback: Option<crate::callbacks::CallbackRequest>,
}

/// `POST /v1/events/batch` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest<'a> {
    #[serde(borrow)]
    pub events: Vec<ObjectOnly<PublishRequest<'a>>>,
}

/// A `T` read only from a JSON object: serde's derive also reads a struct from an array of
/// its fields in order, which the API refuses (`invalid type: sequence, expected a JSON
/// object`). Every request body and every batch item is read through it.
#[derive(Debug)]
pub struct ObjectOnly<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Objects<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Objects<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Objects(std::marker::PhantomData))
            .map(ObjectOnly)
    }
}

/// The answer to one published event.
#[derive(Debug, Serialize)]
pub struct PublishResponse<'a> {
    pub id: &'a str,
    pub seq: Seq,
    pub deliveries: u32,
    pub duplicate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<EventView<'a>>,
}

/// An event as the API shows it.
#[derive(Debug, Serialize)]
pub struct EventView<'a> {
    pub id: &'a str,
    pub seq: Seq,
    #[serde(rename = "type")]
    pub event_type: &'a str,
    pub source: Option<&'a str>,
    pub data: &'a RawValue,
    pub received_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<&'a str>,
    pub receipt_id: Option<String>,
    pub priority: &'static str,
    /// The `POST /v1/events/batch` that stored it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<&'a str>,
    /// The producer's callback: the URL masked, header names only, never the secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback: Option<CallbackView<'a>>,
    /// Its deliveries by status (`GET /v1/events/{id}` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<StatusCounts>,
}

/// What the API shows of an event's callback.
#[derive(Debug, Serialize)]
pub struct CallbackView<'a> {
    pub url: String,
    pub headers: Vec<&'a str>,
    pub secret: bool,
}

/// Deliveries by status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
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
#[derive(Debug, Serialize)]
pub struct BatchView<'a> {
    pub id: &'a str,
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
#[derive(Debug, Serialize)]
pub struct EventAttemptView<'a> {
    pub delivery_id: String,
    pub subscription: &'a str,
    #[serde(flatten)]
    pub attempt: AttemptView<'a>,
}

impl<'a> EventView<'a> {
    /// Borrows an event; the stored data is valid JSON by construction.
    pub fn new(seq: Seq, e: &'a Event) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: &e.id,
            seq,
            event_type: &e.event_type,
            source: e.source.as_deref(),
            data: serde_json::from_str(&e.data)?,
            received_at: rfc3339(e.received_at),
            idempotency_key: e.idempotency_key.as_deref(),
            receipt_id: e.receipt.map(|r| r.to_string()),
            priority: e.priority.as_str(),
            batch_id: e.batch.as_deref(),
            callback: e.callback.as_ref().map(|c| CallbackView {
                url: crate::redact::url_str(&c.url),
                headers: c.headers.keys().map(String::as_str).collect(),
                secret: c.secret.is_some(),
            }),
            deliveries: None,
        })
    }
}

/// A delivery as the API shows it.
#[derive(Debug, Serialize)]
pub struct DeliveryView<'a> {
    pub id: String,
    pub event_id: &'a str,
    pub event_seq: Seq,
    pub subscription: &'a str,
    pub status: &'static str,
    pub attempts: u32,
    pub next_attempt_at: Option<String>,
    pub last_error: Option<&'a str>,
    pub created_at: String,
    pub updated_at: String,
    /// Why it exists: `publish`, `replay` or `redrive`.
    pub origin: &'static str,
    pub priority: &'static str,
}

impl<'a> DeliveryView<'a> {
    pub fn new(id: DeliveryId, d: &'a Delivery) -> Self {
        Self {
            id: id.to_string(),
            event_id: &d.event_id,
            event_seq: d.event_seq,
            subscription: &d.subscription,
            status: d.status.as_str(),
            attempts: d.attempts,
            next_attempt_at: d.next_attempt_at.map(rfc3339),
            last_error: d.last_error.as_deref(),
            created_at: rfc3339(d.created_at),
            updated_at: rfc3339(d.updated_at),
            origin: match d.origin {
                crate::model::Origin::Publish => "publish",
                crate::model::Origin::Replay => "replay",
                crate::model::Origin::Redrive => "redrive",
            },
            priority: d.priority.as_str(),
        }
    }
}

/// One attempt as the API shows it.
#[derive(Debug, Serialize)]
pub struct AttemptView<'a> {
    pub n: u32,
    pub started_at: String,
    pub duration_ms: f64,
    pub status_code: Option<u16>,
    pub error: Option<&'a str>,
    pub response_body: &'a str,
}

impl<'a> AttemptView<'a> {
    pub fn new(n: u32, a: &'a Attempt) -> Self {
        Self {
            n,
            started_at: rfc3339(a.started_at),
            duration_ms: a.duration_us as f64 / 1000.0,
            status_code: a.status_code,
            error: a.error.as_deref(),
            response_body: &a.response_body,
        }
    }
}

/// A page of a list.
#[derive(Debug, Serialize)]
pub struct ListResponse<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

//! Wire types: request bodies as clients send them and responses as they receive them.

use serde::Deserialize;
use serde_json::value::RawValue;

pub use crate::wire::{
    AttemptView, BatchView, CallbackView, DeliveryView, EventAttemptView, EventView,
    Page as ListResponse, PublishResponse, StatusCounts,
};

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

//! The subscriptions: what they are, which are in force, and every change to that set.
//!
//! - `spec`: a subscription's definition, from its raw form (a config `[[subscriptions]]`
//!   table or an API body) to the validated `Subscription`.
//! - `live`: the set in force, swapped whole; readers (fan-out, the API) take a snapshot.
//! - `control`: the one owner of that set. Every change arrives as a request to it: API
//!   create/update/delete, pause/resume, secret rotation and expiry, reload, and a
//!   destination's disable (410 Gone, auto-disable). It merges the config file's
//!   subscriptions, those stored by the API and their run-time state (at start too), swaps
//!   the set, and starts, replaces or stops destination tasks to match.
//!
//! How an API subscription is stored (`SubscriptionRecord`) belongs to storage's schema.

pub mod control;
pub mod live;
pub mod spec;

pub use control::{Control, ControlError, Described, ReloadError, ReloadSummary, SecretInfo};
pub use live::Registry;
pub use spec::{
    BreakerSettings, Ordering, RetrySettings, Subscription, SubscriptionSet, SubscriptionSource,
    TypePattern,
};

//! The subscriptions in force, swapped whole on reload or API change; readers take a snapshot.

use std::sync::Arc;

use crate::subscriptions::{Subscription, SubscriptionSet};

/// Shared, swappable set of subscriptions. Readers clone an `Arc` and never hold the lock.
#[derive(Default)]
pub struct Registry {
    subscriptions: crate::swap::Swap<Vec<Arc<Subscription>>>,
}

impl Registry {
    pub fn new(subs: Vec<Arc<Subscription>>) -> Self {
        Self {
            subscriptions: crate::swap::Swap::new(subs),
        }
    }

    /// The current set.
    pub fn snapshot(&self) -> SubscriptionSet {
        self.subscriptions.get()
    }

    /// Replaces the whole set.
    pub fn replace(&self, subs: Vec<Arc<Subscription>>) {
        self.subscriptions.set(subs);
    }

    /// One subscription by id.
    pub fn get(&self, id: &str) -> Option<Arc<Subscription>> {
        self.snapshot().iter().find(|s| s.id == id).cloned()
    }

    /// The ids of the enabled subscriptions that want an event type.
    pub fn matching(&self, event_type: &str) -> Vec<Arc<str>> {
        self.snapshot()
            .iter()
            .filter(|s| s.wants(event_type))
            .map(|s| Arc::from(s.id.as_str()))
            .collect()
    }

    /// The ids of the enabled subscriptions that want an event of this type with this data
    /// (JSON text): see `fan_out`.
    pub fn matching_event(&self, event_type: &str, data: &str) -> Vec<Arc<str>> {
        let snap = self.snapshot();
        fan_out(snap.iter(), event_type, data)
            .into_iter()
            .map(|s| Arc::from(s.id.as_str()))
            .collect()
    }
}

/// The subscriptions of `set` an event goes to: type patterns, then payload filters (the
/// data parsed once, and only when a subscription that wants the type has a filter; data
/// that does not parse passes no filter). The one fan-out rule, for publishes, inbound
/// events and replays alike.
pub fn fan_out<'a>(
    set: impl IntoIterator<Item = &'a Arc<Subscription>>,
    event_type: &str,
    data: &str,
) -> Vec<&'a Arc<Subscription>> {
    let wanted: Vec<&Arc<Subscription>> = set.into_iter().filter(|s| s.wants(event_type)).collect();
    let parsed = if wanted.iter().any(|s| s.filter.is_some()) {
        serde_json::from_str::<serde_json::Value>(data).ok()
    } else {
        None
    };
    wanted
        .into_iter()
        .filter(|s| s.filter.is_none() || parsed.as_ref().is_some_and(|d| s.wants_data(d)))
        .collect()
}

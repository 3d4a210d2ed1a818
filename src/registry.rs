//! The subscriptions in force, swapped whole on reload or API change; readers take a snapshot.

use std::sync::{Arc, RwLock};

use crate::model::{Subscription, SubscriptionSet};

/// Shared, swappable set of subscriptions. Readers clone an `Arc` and never hold the lock.
#[derive(Default)]
pub struct Registry {
    subscriptions: RwLock<SubscriptionSet>,
}

impl Registry {
    pub fn new(subs: Vec<Arc<Subscription>>) -> Self {
        Self {
            subscriptions: RwLock::new(Arc::new(subs)),
        }
    }

    /// The current set.
    pub fn snapshot(&self) -> SubscriptionSet {
        match self.subscriptions.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the whole set.
    pub fn replace(&self, subs: Vec<Arc<Subscription>>) {
        let new = Arc::new(subs);
        match self.subscriptions.write() {
            Ok(mut g) => *g = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    /// Switches a subscription on or off (410 Gone, auto-disable, pause).
    pub fn set_enabled(&self, id: &str, enabled: bool) {
        let mut g = match self.subscriptions.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let subs = g
            .iter()
            .map(|s| {
                if s.id == id && s.enabled != enabled {
                    Arc::new(Subscription {
                        enabled,
                        ..(**s).clone()
                    })
                } else {
                    s.clone()
                }
            })
            .collect();
        *g = Arc::new(subs);
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
}

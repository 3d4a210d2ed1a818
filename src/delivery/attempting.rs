//! The deliveries whose attempt is under way right now.
//!
//! `in_flight` is the one delivery state that is not written to disk: persisting it would
//! cost a commit before every attempt, and after a crash it would be wrong anyway (the
//! attempt died with the process, and the delivery is attempted again from its stored
//! state). Destination tasks add a delivery when its attempt starts and remove it when the
//! outcome is recorded; the API shows such a delivery as `in_flight` and lists them for
//! `status=in_flight`.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};

use crate::model::DeliveryId;

#[derive(Debug, Default)]
pub struct Attempting(Mutex<BTreeSet<DeliveryId>>);

impl Attempting {
    fn set(&self) -> MutexGuard<'_, BTreeSet<DeliveryId>> {
        // A set of ids stays consistent whatever panicked while holding it.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn start(&self, id: DeliveryId) {
        self.set().insert(id);
    }

    pub fn end(&self, id: DeliveryId) {
        self.set().remove(&id);
    }

    pub fn contains(&self, id: DeliveryId) -> bool {
        self.set().contains(&id)
    }

    /// The ids under way after `after`, in order, at most `limit`.
    pub fn after(&self, after: Option<DeliveryId>, limit: usize) -> Vec<DeliveryId> {
        let set = self.set();
        match after {
            Some(a) => set
                .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                .take(limit)
                .copied()
                .collect(),
            None => set.iter().take(limit).copied().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_through_the_attempts_under_way() {
        let a = Attempting::default();
        for id in [5, 1, 9, 3] {
            a.start(id);
        }
        a.end(9);
        assert!(a.contains(3) && !a.contains(9));
        assert_eq!(a.after(None, 2), vec![1, 3]);
        assert_eq!(a.after(Some(3), 10), vec![5]);
        assert_eq!(a.after(Some(5), 10), Vec::<DeliveryId>::new());
    }
}

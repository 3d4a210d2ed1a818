//! A value read often and replaced whole (the subscriptions, sources, tokens, certificate and
//! configuration in force): readers take an `Arc` snapshot and never hold the lock while they
//! use it; a writer puts a new value in. A panic while the lock was held cannot poison it for
//! good: the value inside is always a complete one.

use std::sync::{Arc, RwLock};

#[derive(Debug, Default)]
pub struct Swap<T> {
    current: RwLock<Arc<T>>,
}

impl<T> Swap<T> {
    pub fn new(value: T) -> Self {
        Self::from_arc(Arc::new(value))
    }

    pub fn from_arc(value: Arc<T>) -> Self {
        Self {
            current: RwLock::new(value),
        }
    }

    /// The value in force.
    pub fn get(&self) -> Arc<T> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Puts `value` in force.
    pub fn set(&self, value: T) {
        self.set_arc(Arc::new(value));
    }

    pub fn set_arc(&self, value: Arc<T>) {
        match self.current.write() {
            Ok(mut g) => *g = value,
            Err(p) => *p.into_inner() = value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_keep_their_snapshot_across_a_swap() {
        let s = Swap::new(vec![1]);
        let before = s.get();
        s.set(vec![2]);
        assert_eq!(*before, vec![1]);
        assert_eq!(*s.get(), vec![2]);
    }
}

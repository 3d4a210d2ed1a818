//! The daemon's one clock. Intervals (timeouts, rate limits, breaker cooldowns, timers) are
//! measured with tokio's `Instant`, so tests can pause and advance time; stored times are
//! wall-clock microseconds since the Unix epoch. Nothing else in the daemon reads a clock
//! (`clippy.toml` bans `std::time::Instant::now` and `SystemTime::now` elsewhere).
//!
//! The delivery loop — writer, scheduler, destination tasks and attempts — reads both
//! through a `Clock` it is given. The daemon gives them the system's. A test gives them one
//! whose wall clock follows tokio's paused clock from a fixed start, so backoff, breaker
//! cooldowns, rate limits and auto-disable run in milliseconds of test time: stored times
//! and intervals move together when the test advances time, on every thread (the writer's
//! included).

use std::sync::Arc;

/// Microseconds since the Unix epoch (`model::Micros`; spelled here so the clock depends
/// on nothing).
type Micros = i64;

pub use tokio::time::Instant;

/// The monotonic clock: paused and advanced by tokio's test utilities.
pub fn now() -> Instant {
    Instant::now()
}

/// The wall clock in microseconds since the Unix epoch (0 before it).
#[allow(clippy::disallowed_methods)]
pub fn now_micros() -> Micros {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// The clock a component reads: the system's, or one that follows a tokio runtime's clock.
#[derive(Clone, Default)]
pub struct Clock {
    follow: Option<Arc<Follow>>,
}

/// A wall clock that reads `wall` at `at` of a runtime's clock, and moves with it.
struct Follow {
    wall: Micros,
    at: Instant,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.follow {
            None => f.write_str("Clock(system)"),
            Some(x) => write!(f, "Clock(following the runtime from {})", x.wall),
        }
    }
}

impl Clock {
    /// The system's clocks.
    pub fn system() -> Self {
        Self::default()
    }

    /// A wall clock reading `wall` now and moving with the current tokio runtime's clock
    /// (paused in tests), read the same from any thread. Call it inside the runtime.
    pub fn following_runtime(wall: Micros) -> Option<Self> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        Some(Self {
            follow: Some(Arc::new(Follow {
                wall,
                at: Instant::now(),
                runtime,
            })),
        })
    }

    /// The monotonic clock.
    pub fn now(&self) -> Instant {
        match &self.follow {
            None => Instant::now(),
            Some(f) => {
                // Off the runtime's threads (the writer's), tokio reads the system clock
                // unless it is told which runtime's clock to read.
                let _in = f.runtime.enter();
                Instant::now()
            }
        }
    }

    /// The wall clock in microseconds since the Unix epoch.
    pub fn now_micros(&self) -> Micros {
        match &self.follow {
            None => now_micros(),
            Some(f) => f.wall.saturating_add(
                i64::try_from(self.now().saturating_duration_since(f.at).as_micros())
                    .unwrap_or(i64::MAX),
            ),
        }
    }
}

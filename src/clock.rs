//! The daemon's one clock. Intervals (timeouts, rate limits, breaker cooldowns, timers) are
//! measured with tokio's `Instant`, so tests can pause and advance time; stored times are
//! wall-clock microseconds since the Unix epoch. Nothing else in the daemon reads a clock
//! (`clippy.toml` bans `std::time::Instant::now` and `SystemTime::now` elsewhere).

use crate::model::Micros;

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

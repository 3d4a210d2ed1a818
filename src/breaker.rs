//! Per-destination circuit breaker: owns the closed/open/half-open state machine and the
//! windowed failure statistics that trip it.
//!
//! Outcomes reported while Open, or while HalfOpen with no probe admitted, come from requests
//! admitted before the breaker opened; they say nothing about recovery and are ignored. Every
//! admitted request must report an outcome, or a half-open breaker waits on its probe forever.

use std::time::Duration;

use crate::clock::Instant;

/// Buckets in the failure-rate window; the rate covers between 9/10 and all of `window`.
const BUCKETS: usize = 10;

/// When a breaker trips and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that trip the breaker; 0 disables this rule.
    pub failure_threshold: u32,
    /// Failure fraction over the window (0..1) that trips the breaker; NaN disables this rule.
    pub failure_rate: f64,
    /// Outcomes the window must hold before the rate rule applies.
    pub min_requests: u32,
    /// Span of the failure-rate window.
    pub window: Duration,
    /// Time spent Open before a probe is allowed.
    pub cooldown: Duration,
    /// Probes HalfOpen lets through at once (at least 1). The first success closes the
    /// breaker; a failure opens it again.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            failure_rate: 0.5,
            min_requests: 20,
            window: Duration::from_secs(30),
            cooldown: Duration::from_secs(30),
            half_open_probes: 1,
        }
    }
}

/// Externally visible breaker state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// Requests are refused until the cooldown ends.
    Open,
    /// Probe requests (`half_open_probes` at a time) may test the destination.
    HalfOpen,
}

/// Stored state; Open past its cooldown is reported as HalfOpen without being rewritten.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed,
    /// `until` is None when the cooldown overflows `Instant`: the breaker never half-opens.
    Open {
        until: Option<Instant>,
    },
    /// `probing` counts the admitted probes in flight.
    HalfOpen {
        probing: u32,
    },
}

/// Outcome counts for one time slice; `epoch` is the slice index since the window origin.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    epoch: u64,
    successes: u32,
    failures: u32,
}

/// A circuit breaker for one destination, driven by caller-supplied instants.
#[derive(Debug, Clone)]
pub struct Breaker {
    cfg: BreakerConfig,
    phase: Phase,
    consecutive_failures: u32,
    /// Origin of bucket epochs, fixed by the first outcome recorded after a reset.
    origin: Option<Instant>,
    /// Ring indexed by `epoch % BUCKETS`; a bucket with a stale epoch counts as empty.
    buckets: [Bucket; BUCKETS],
    trips: u64,
}

impl Breaker {
    /// Creates a closed breaker.
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            phase: Phase::Closed,
            consecutive_failures: 0,
            origin: None,
            buckets: [Bucket::default(); BUCKETS],
            trips: 0,
        }
    }

    /// The state at `now`; Open turns into HalfOpen once the cooldown has passed.
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.phase_at(now) {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// May a request start now? Closed: yes. Open: no. HalfOpen: up to `half_open_probes`
    /// probes at a time (false once that many are in flight, until an outcome is recorded).
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        match self.phase_at(now) {
            Phase::Closed => true,
            Phase::Open { .. } => false,
            Phase::HalfOpen { probing } if probing >= self.cfg.half_open_probes.max(1) => false,
            Phase::HalfOpen { probing } => {
                self.phase = Phase::HalfOpen {
                    probing: probing + 1,
                };
                true
            }
        }
    }

    /// Ends an Open breaker's cooldown now, so a probe may go at once: an operator's action
    /// (retry, redrive, resume) asks for an attempt now; the cooldown is for automatic
    /// traffic. No effect unless Open.
    pub fn probe_now(&mut self, now: Instant) {
        if let Phase::Open { .. } = self.phase_at(now) {
            self.phase = Phase::HalfOpen { probing: 0 };
        }
    }

    /// Records a success: resets the failure streak, and a successful probe closes the breaker.
    pub fn on_success(&mut self, now: Instant) {
        match self.phase_at(now) {
            Phase::Closed => {
                self.consecutive_failures = 0;
                self.record(now, false);
            }
            Phase::HalfOpen { probing } if probing > 0 => {
                self.phase = Phase::Closed;
                self.reset_counters();
            }
            Phase::Open { .. } | Phase::HalfOpen { .. } => {}
        }
    }

    /// Records a failure: may trip a closed breaker; a failed probe reopens it with a new cooldown.
    pub fn on_failure(&mut self, now: Instant) {
        match self.phase_at(now) {
            Phase::Closed => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                let epoch = self.record(now, true);
                if self.should_trip(epoch) {
                    self.open(now);
                }
            }
            Phase::HalfOpen { probing } if probing > 0 => self.open(now),
            Phase::Open { .. } | Phase::HalfOpen { .. } => {}
        }
    }

    /// When an Open breaker will allow a probe (for deferring work), None unless Open.
    pub fn retry_at(&self, now: Instant) -> Option<Instant> {
        match self.phase_at(now) {
            Phase::Open { until } => until,
            _ => None,
        }
    }

    /// How many times the breaker has opened, counting reopenings after failed probes.
    pub fn trips(&self) -> u64 {
        self.trips
    }

    fn phase_at(&self, now: Instant) -> Phase {
        match self.phase {
            Phase::Open { until: Some(until) } if now >= until => Phase::HalfOpen { probing: 0 },
            phase => phase,
        }
    }

    fn open(&mut self, now: Instant) {
        self.phase = Phase::Open {
            until: now.checked_add(self.cfg.cooldown),
        };
        self.trips = self.trips.saturating_add(1);
    }

    fn reset_counters(&mut self) {
        self.consecutive_failures = 0;
        self.origin = None;
        self.buckets = [Bucket::default(); BUCKETS];
    }

    /// Counts an outcome in the window and returns the epoch it belongs to.
    fn record(&mut self, now: Instant, failed: bool) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        // A zero window still gets 1 ns buckets, so division is always defined.
        let width = (self.cfg.window.as_nanos() / BUCKETS as u128).max(1);
        let since = now.saturating_duration_since(origin).as_nanos() / width;
        let epoch = u64::try_from(since).unwrap_or(u64::MAX);
        let bucket = &mut self.buckets[(epoch % BUCKETS as u64) as usize];
        if bucket.epoch > epoch {
            // The slot already holds a slice a full window newer: this outcome has aged out.
            return epoch;
        }
        if bucket.epoch < epoch {
            *bucket = Bucket {
                epoch,
                ..Bucket::default()
            };
        }
        if failed {
            bucket.failures = bucket.failures.saturating_add(1);
        } else {
            bucket.successes = bucket.successes.saturating_add(1);
        }
        epoch
    }

    fn should_trip(&self, epoch: u64) -> bool {
        let threshold = self.cfg.failure_threshold;
        if threshold > 0 && self.consecutive_failures >= threshold {
            return true;
        }
        let (mut total, mut failures) = (0u64, 0u64);
        for b in self
            .buckets
            .iter()
            .filter(|b| b.epoch <= epoch && epoch - b.epoch < BUCKETS as u64)
        {
            total += u64::from(b.successes) + u64::from(b.failures);
            failures += u64::from(b.failures);
        }
        total > 0
            && total >= u64::from(self.cfg.min_requests)
            && failures as f64 / total as f64 >= self.cfg.failure_rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    /// Test clock: offsets from one base instant.
    struct Clock(Instant);

    impl Clock {
        fn new() -> Self {
            Self(Instant::now())
        }

        fn at(&self, offset: Duration) -> Instant {
            self.0 + offset
        }
    }

    fn streak_only() -> BreakerConfig {
        BreakerConfig {
            failure_rate: f64::NAN,
            ..BreakerConfig::default()
        }
    }

    fn rate_only() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 0,
            ..BreakerConfig::default()
        }
    }

    #[test]
    fn defaults() {
        let c = BreakerConfig::default();
        assert_eq!(c.failure_threshold, 5);
        assert_eq!(c.failure_rate, 0.5);
        assert_eq!(c.min_requests, 20);
        assert_eq!(c.window, 30 * SEC);
        assert_eq!(c.cooldown, 30 * SEC);
    }

    #[test]
    fn closed_admits_and_stays_closed_on_success() {
        let clock = Clock::new();
        let mut b = Breaker::new(BreakerConfig::default());
        for i in 0..100 {
            let now = clock.at(i * MS);
            assert!(b.try_acquire(now));
            b.on_success(now);
        }
        assert_eq!(b.state(clock.at(SEC)), BreakerState::Closed);
        assert_eq!(b.retry_at(clock.at(SEC)), None);
        assert_eq!(b.trips(), 0);
    }

    #[test]
    fn consecutive_failures_trip() {
        let clock = Clock::new();
        let t = clock.at(SEC);
        let mut b = Breaker::new(streak_only());
        for _ in 0..4 {
            b.on_failure(t);
        }
        assert_eq!(b.state(t), BreakerState::Closed);
        b.on_failure(t);
        assert_eq!(b.state(t), BreakerState::Open);
        assert_eq!(b.trips(), 1);
        assert!(!b.try_acquire(t));
        assert_eq!(b.retry_at(t), Some(t + 30 * SEC));
    }

    #[test]
    fn success_breaks_the_streak() {
        let clock = Clock::new();
        let t = clock.at(SEC);
        let mut b = Breaker::new(streak_only());
        for _ in 0..4 {
            b.on_failure(t);
        }
        b.on_success(t);
        for _ in 0..4 {
            b.on_failure(t);
        }
        assert_eq!(b.state(t), BreakerState::Closed);
        b.on_failure(t);
        assert_eq!(b.state(t), BreakerState::Open);
    }

    #[test]
    fn threshold_of_one_trips_on_first_failure() {
        let clock = Clock::new();
        let mut b = Breaker::new(BreakerConfig {
            failure_threshold: 1,
            ..streak_only()
        });
        b.on_failure(clock.at(MS));
        assert_eq!(b.state(clock.at(MS)), BreakerState::Open);
    }

    #[test]
    fn failure_rate_trips_once_min_requests_reached() {
        let clock = Clock::new();
        let mut b = Breaker::new(rate_only());
        for i in 0..19u32 {
            let now = clock.at(Duration::from_millis(u64::from(i) * 100));
            if i % 2 == 0 {
                b.on_success(now)
            } else {
                b.on_failure(now)
            }
            assert_eq!(b.state(now), BreakerState::Closed, "outcome {i}");
        }
        // 20th outcome: 10 failures of 20 reaches the 0.5 rate.
        let now = clock.at(2 * SEC);
        b.on_failure(now);
        assert_eq!(b.state(now), BreakerState::Open);
        assert_eq!(b.trips(), 1);
    }

    #[test]
    fn failure_rate_below_threshold_never_trips() {
        let clock = Clock::new();
        let mut b = Breaker::new(rate_only());
        for i in 0..1_000u64 {
            let now = clock.at(Duration::from_millis(i * 10));
            if i % 3 == 0 {
                b.on_failure(now)
            } else {
                b.on_success(now)
            }
        }
        assert_eq!(b.state(clock.at(10 * SEC)), BreakerState::Closed);
    }

    #[test]
    fn old_outcomes_leave_the_window() {
        let clock = Clock::new();
        let mut b = Breaker::new(rate_only());
        for _ in 0..19 {
            b.on_failure(clock.at(SEC));
        }
        // A full window later the 19 failures no longer count, so one more is 1 of 1 < 20 outcomes.
        let later = clock.at(SEC + 31 * SEC);
        b.on_failure(later);
        assert_eq!(b.state(later), BreakerState::Closed);
        // Within the window they do count.
        let mut b = Breaker::new(rate_only());
        for _ in 0..19 {
            b.on_failure(clock.at(SEC));
        }
        let soon = clock.at(SEC + 20 * SEC);
        b.on_failure(soon);
        assert_eq!(b.state(soon), BreakerState::Open);
    }

    #[test]
    fn open_becomes_half_open_after_cooldown() {
        let clock = Clock::new();
        let t = clock.at(SEC);
        let mut b = Breaker::new(BreakerConfig {
            failure_threshold: 1,
            ..BreakerConfig::default()
        });
        b.on_failure(t);
        let reopen = t + 30 * SEC;
        assert_eq!(b.state(reopen - MS), BreakerState::Open);
        assert_eq!(b.retry_at(reopen - MS), Some(reopen));
        assert!(!b.try_acquire(reopen - MS));
        assert_eq!(b.state(reopen), BreakerState::HalfOpen);
        assert_eq!(b.retry_at(reopen), None);
    }

    #[test]
    fn half_open_admits_exactly_one_probe() {
        let clock = Clock::new();
        let mut b = Breaker::new(BreakerConfig {
            failure_threshold: 1,
            ..BreakerConfig::default()
        });
        b.on_failure(clock.at(Duration::ZERO));
        let t = clock.at(30 * SEC);
        assert!(b.try_acquire(t));
        assert!(!b.try_acquire(t));
        assert!(!b.try_acquire(t + 10 * SEC));
        assert_eq!(b.state(t), BreakerState::HalfOpen);
        assert_eq!(b.retry_at(t), None);
    }

    #[test]
    fn probe_success_closes_and_resets_counters() {
        let clock = Clock::new();
        let mut b = Breaker::new(streak_only());
        for _ in 0..5 {
            b.on_failure(clock.at(Duration::ZERO));
        }
        let t = clock.at(30 * SEC);
        assert!(b.try_acquire(t));
        b.on_success(t);
        assert_eq!(b.state(t), BreakerState::Closed);
        assert!(b.try_acquire(t));
        assert!(b.try_acquire(t));
        for _ in 0..4 {
            b.on_failure(t);
        }
        assert_eq!(b.state(t), BreakerState::Closed);
        b.on_failure(t);
        assert_eq!(b.state(t), BreakerState::Open);
        assert_eq!(b.trips(), 2);
    }

    #[test]
    fn probe_success_clears_the_rate_window() {
        let clock = Clock::new();
        let cfg = BreakerConfig {
            min_requests: 4,
            ..rate_only()
        };
        let mut b = Breaker::new(cfg);
        for _ in 0..4 {
            b.on_failure(clock.at(Duration::ZERO));
        }
        assert_eq!(b.trips(), 1);
        let t = clock.at(30 * SEC);
        assert!(b.try_acquire(t));
        b.on_success(t);
        // Old failures are gone: 1 failure of 4 outcomes stays below 0.5.
        b.on_success(t);
        b.on_success(t);
        b.on_failure(t);
        assert_eq!(b.state(t), BreakerState::Closed);
    }

    #[test]
    fn probe_failure_reopens_with_new_cooldown() {
        let clock = Clock::new();
        let mut b = Breaker::new(BreakerConfig {
            failure_threshold: 1,
            ..BreakerConfig::default()
        });
        b.on_failure(clock.at(Duration::ZERO));
        let probe = clock.at(40 * SEC);
        assert!(b.try_acquire(probe));
        let failed = probe + 2 * SEC;
        b.on_failure(failed);
        assert_eq!(b.state(failed), BreakerState::Open);
        assert_eq!(b.retry_at(failed), Some(failed + 30 * SEC));
        assert_eq!(b.trips(), 2);
        assert!(!b.try_acquire(failed + 29 * SEC));
        assert!(b.try_acquire(failed + 30 * SEC));
    }

    #[test]
    fn stragglers_while_open_are_ignored() {
        let clock = Clock::new();
        let mut b = Breaker::new(BreakerConfig {
            failure_threshold: 1,
            ..BreakerConfig::default()
        });
        let t = clock.at(Duration::ZERO);
        b.on_failure(t);
        b.on_success(t + SEC);
        b.on_failure(t + 2 * SEC);
        assert_eq!(b.state(t + 2 * SEC), BreakerState::Open);
        assert_eq!(b.retry_at(t + 2 * SEC), Some(t + 30 * SEC));
        assert_eq!(b.trips(), 1);

        // Half-open but no probe admitted yet: outcomes are still stragglers.
        let h = t + 31 * SEC;
        b.on_success(h);
        assert_eq!(b.state(h), BreakerState::HalfOpen);
        b.on_failure(h);
        assert_eq!(b.state(h), BreakerState::HalfOpen);
        assert_eq!(b.trips(), 1);
        assert!(b.try_acquire(h));
    }

    #[test]
    fn cooldown_overflow_stays_open() {
        let clock = Clock::new();
        let cfg = BreakerConfig {
            failure_threshold: 1,
            cooldown: Duration::MAX,
            ..BreakerConfig::default()
        };
        let mut b = Breaker::new(cfg);
        b.on_failure(clock.at(Duration::ZERO));
        let far = clock.at(Duration::from_secs(100 * 365 * 86_400));
        assert_eq!(b.state(far), BreakerState::Open);
        assert!(!b.try_acquire(far));
        assert_eq!(b.retry_at(far), None);
    }

    #[test]
    fn zero_window_and_cooldown_do_not_panic() {
        let clock = Clock::new();
        let cfg = BreakerConfig {
            failure_threshold: 0,
            min_requests: 0,
            window: Duration::ZERO,
            cooldown: Duration::ZERO,
            ..BreakerConfig::default()
        };
        let mut b = Breaker::new(cfg);
        let t = clock.at(SEC);
        b.on_failure(t);
        assert_eq!(b.state(t), BreakerState::HalfOpen);
        assert!(b.try_acquire(t));
        b.on_success(t);
        assert_eq!(b.state(t), BreakerState::Closed);
    }

    #[test]
    fn instants_out_of_order_do_not_panic() {
        let clock = Clock::new();
        let mut b = Breaker::new(rate_only());
        b.on_success(clock.at(100 * SEC));
        b.on_failure(clock.at(SEC));
        b.on_failure(clock.at(Duration::ZERO));
        assert_eq!(b.state(clock.at(Duration::ZERO)), BreakerState::Closed);
    }

    /// Half-open lets `half_open_probes` through at once; the first success closes.
    #[test]
    fn half_open_admits_the_configured_probes() {
        let clock = Clock::new();
        let mut b = Breaker::new(BreakerConfig {
            failure_threshold: 1,
            half_open_probes: 3,
            ..BreakerConfig::default()
        });
        b.on_failure(clock.at(Duration::ZERO));
        let t = clock.at(30 * SEC);
        assert!(b.try_acquire(t) && b.try_acquire(t) && b.try_acquire(t));
        assert!(!b.try_acquire(t), "a fourth probe");
        b.on_success(t + MS);
        assert_eq!(b.state(t + MS), BreakerState::Closed);
        // The other probes' outcomes count as closed-state outcomes now.
        b.on_success(t + 2 * MS);
        assert_eq!(b.state(t + 2 * MS), BreakerState::Closed);
    }

    /// An operator's action ends the cooldown: a probe may go at once; it alone.
    #[test]
    fn probe_now_lets_one_probe_go_during_the_cooldown() {
        let clock = Clock::new();
        let mut b = Breaker::new(BreakerConfig {
            failure_threshold: 1,
            ..BreakerConfig::default()
        });
        let t = clock.at(SEC);
        b.on_failure(t);
        assert!(!b.try_acquire(t + SEC));
        b.probe_now(t + SEC);
        assert_eq!(b.state(t + SEC), BreakerState::HalfOpen);
        assert!(b.try_acquire(t + SEC));
        assert!(!b.try_acquire(t + SEC));
        b.on_failure(t + 2 * SEC);
        assert_eq!(
            b.retry_at(t + 2 * SEC),
            Some(t + 32 * SEC),
            "a new cooldown"
        );
        // Closed: no effect.
        let mut c = Breaker::new(BreakerConfig::default());
        c.probe_now(t);
        assert_eq!(c.state(t), BreakerState::Closed);
    }

    /// Random operation sequences: at most `half_open_probes` probes per half-open episode,
    /// consistent views.
    #[test]
    fn random_sequences_keep_invariants() {
        let clock = Clock::new();
        for seed in 1..=50u64 {
            let mut step = crate::testrng::xorshift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let cfg = BreakerConfig {
                failure_threshold: (step() % 6) as u32,
                min_requests: (step() % 10) as u32,
                failure_rate: (step() % 100) as f64 / 100.0,
                window: Duration::from_millis(step() % 5_000),
                cooldown: Duration::from_millis(step() % 5_000),
                half_open_probes: 1 + (step() % 3) as u32,
            };
            let mut b = Breaker::new(cfg);
            let mut now = clock.at(Duration::ZERO);
            let mut probes_out = 0;
            let mut trips = 0;
            for _ in 0..2_000 {
                now += Duration::from_millis(step() % 300);
                let before = b.state(now);
                match step() % 3 {
                    0 => {
                        let granted = b.try_acquire(now);
                        match before {
                            BreakerState::Closed => assert!(granted),
                            BreakerState::Open => assert!(!granted),
                            BreakerState::HalfOpen => {
                                if granted {
                                    probes_out += 1;
                                }
                                assert!(
                                    probes_out <= cfg.half_open_probes,
                                    "seed {seed}: more probes admitted than configured"
                                );
                            }
                        }
                    }
                    1 => {
                        b.on_success(now);
                        probes_out = 0;
                    }
                    _ => {
                        b.on_failure(now);
                        probes_out = 0;
                    }
                }
                let state = b.state(now);
                if state != BreakerState::HalfOpen {
                    probes_out = 0;
                }
                assert_eq!(
                    state == BreakerState::Open,
                    b.retry_at(now).is_some(),
                    "seed {seed}"
                );
                if let Some(at) = b.retry_at(now) {
                    assert!(at > now && at <= now + cfg.cooldown, "seed {seed}");
                }
                assert!(b.trips() >= trips, "seed {seed}");
                if b.trips() > trips {
                    assert_eq!(b.trips(), trips + 1);
                    assert_ne!(
                        before,
                        BreakerState::Open,
                        "seed {seed}: open breaker re-tripped"
                    );
                }
                trips = b.trips();
            }
        }
    }
}

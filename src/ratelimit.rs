//! Token-bucket rate limiting: owns per-destination admission pacing and rate-string parsing.

use std::time::Duration;

use crate::clock::Instant;

/// Slack absorbing float rounding, so waiting exactly the advertised time always succeeds.
const EPSILON: f64 = 1e-9;

/// A token bucket refilled continuously at `rate` tokens per second up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    /// Latest instant seen; earlier instants neither refill nor move it back.
    last: Instant,
}

impl TokenBucket {
    /// Creates a full bucket; a NaN or non-positive rate never refills, a burst below 1 acts as 1.
    pub fn new(rate_per_sec: f64, burst: f64, now: Instant) -> Self {
        let rate = if rate_per_sec > 0.0 {
            rate_per_sec
        } else {
            0.0
        };
        // A bucket that cannot hold one whole token could never admit anything.
        let burst = if burst >= 1.0 { burst } else { 1.0 };
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Take one token if available; else Err(wait) with how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens + EPSILON >= 1.0 {
            self.tokens = (self.tokens - 1.0).max(0.0);
            return Ok(());
        }
        // Rounded up to whole nanoseconds so the wait is never short; a zero rate gives +inf.
        let nanos = ((1.0 - self.tokens) / self.rate * 1e9).ceil();
        if nanos.is_finite() && nanos < u64::MAX as f64 {
            Err(Duration::from_nanos(nanos as u64))
        } else {
            Err(Duration::MAX)
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        // Checked apart because inf * 0 s would be NaN.
        self.tokens = if self.rate.is_infinite() {
            self.burst
        } else {
            (self.tokens + elapsed.as_secs_f64() * self.rate).min(self.burst)
        };
    }
}

/// Parses "N/s", "N/m" or "N/h" (N a positive integer or decimal) into events per second.
///
/// Other forms such as "10/1s" are rejected; the error names the part that was wrong.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let Some((count, unit)) = s.split_once('/') else {
        return Err(format!("invalid rate {s:?}: expected N/s, N/m or N/h"));
    };
    let (count, unit) = (count.trim(), unit.trim());
    let digits = count.bytes().filter(u8::is_ascii_digit).count();
    let dots = count.bytes().filter(|&b| b == b'.').count();
    if digits == 0 || dots > 1 || digits + dots != count.len() {
        return Err(format!(
            "invalid rate {s:?}: count {count:?} is not a positive integer or decimal"
        ));
    }
    let per_secs = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "invalid rate {s:?}: unknown unit {unit:?}, expected s, m or h"
            ));
        }
    };
    let n: f64 = count
        .parse()
        .map_err(|e| format!("invalid rate {s:?}: count {count:?}: {e}"))?;
    if n == 0.0 {
        return Err(format!(
            "invalid rate {s:?}: count must be greater than zero"
        ));
    }
    let rate = n / per_secs;
    if !rate.is_finite() || rate <= 0.0 {
        return Err(format!(
            "invalid rate {s:?}: count {count:?} is out of range"
        ));
    }
    // The wait for a token is a duration like any other: at most `MAX_DURATION`.
    if 1.0 / rate > crate::model::MAX_DURATION.as_secs_f64() {
        return Err(format!(
            "invalid rate {s:?}: slower than one per 3650d (10 years)"
        ));
    }
    Ok(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn starts_full_then_paces() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5.0, t0);
        for _ in 0..5 {
            assert_eq!(b.try_take(t0), Ok(()));
        }
        assert_eq!(b.try_take(t0), Err(100 * MS));
        assert_eq!(b.try_take(t0 + 40 * MS), Err(60 * MS));
        assert_eq!(b.try_take(t0 + 100 * MS), Ok(()));
        assert_eq!(b.try_take(t0 + 100 * MS), Err(100 * MS));
    }

    #[test]
    fn refill_caps_at_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, 3.0, t0);
        for _ in 0..3 {
            assert_eq!(b.try_take(t0), Ok(()));
        }
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(b.try_take(later), Ok(()));
        }
        assert!(b.try_take(later).is_err());
    }

    #[test]
    fn fractional_burst_and_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0.5, 2.5, t0);
        assert_eq!(b.try_take(t0), Ok(()));
        assert_eq!(b.try_take(t0), Ok(()));
        // 0.5 token left, 0.5 more needed at 0.5/s.
        assert_eq!(b.try_take(t0), Err(Duration::from_secs(1)));
        assert_eq!(b.try_take(t0 + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn degenerate_parameters() {
        let t0 = Instant::now();
        for rate in [0.0, -1.0, f64::NAN, f64::NEG_INFINITY] {
            let mut b = TokenBucket::new(rate, 1.0, t0);
            assert_eq!(b.try_take(t0), Ok(()), "rate {rate}");
            assert_eq!(
                b.try_take(t0 + Duration::from_secs(1 << 40)),
                Err(Duration::MAX),
                "rate {rate}"
            );
        }
        for burst in [0.0, 0.5, -3.0, f64::NAN] {
            let mut b = TokenBucket::new(1.0, burst, t0);
            assert_eq!(b.try_take(t0), Ok(()), "burst {burst}");
            assert_eq!(b.try_take(t0), Err(Duration::from_secs(1)), "burst {burst}");
        }
        let mut unlimited = TokenBucket::new(f64::INFINITY, 1.0, t0);
        for _ in 0..100 {
            assert_eq!(unlimited.try_take(t0), Ok(()));
        }
        let mut tiny = TokenBucket::new(1e-300, 1.0, t0);
        assert_eq!(tiny.try_take(t0), Ok(()));
        assert_eq!(tiny.try_take(t0), Err(Duration::MAX));
    }

    #[test]
    fn earlier_instants_do_not_refill_or_rewind() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(10);
        let mut b = TokenBucket::new(1.0, 1.0, t1);
        assert_eq!(b.try_take(t1), Ok(()));
        assert_eq!(b.try_take(t0), Err(Duration::from_secs(1)));
        assert_eq!(b.try_take(t1 + Duration::from_secs(1)), Ok(()));
    }

    /// Waiting the advertised time always succeeds, and admissions never beat the rate.
    #[test]
    fn advertised_wait_is_sufficient_and_rate_holds() {
        let t0 = Instant::now();
        let mut next = crate::testrng::xorshift(0x853C_49E6_748F_EA9B);
        for _ in 0..200 {
            let rate = [0.3, 1.0, 7.0, 1_000.0, 3e6][(next() % 5) as usize];
            let burst = 1.0 + (next() % 20) as f64 / 4.0;
            let mut b = TokenBucket::new(rate, burst, t0);
            let mut now = t0;
            let mut admitted = 0u64;
            for _ in 0..300 {
                match b.try_take(now) {
                    Ok(()) => admitted += 1,
                    Err(wait) => {
                        assert!(wait > Duration::ZERO);
                        let mut probe = b.clone();
                        assert_eq!(
                            probe.try_take(now + wait),
                            Ok(()),
                            "rate {rate} burst {burst}"
                        );
                        if next().is_multiple_of(2) {
                            now += wait;
                        }
                    }
                }
                now += Duration::from_nanos(next() % 2_000_000);
                let allowed = burst + (now - t0).as_secs_f64() * rate + 1e-6;
                assert!(admitted as f64 <= allowed, "rate {rate} burst {burst}");
            }
        }
    }

    #[test]
    fn parses_rates() {
        assert_eq!(parse_rate("50/s"), Ok(50.0));
        assert_eq!(parse_rate("120/m"), Ok(2.0));
        assert_eq!(parse_rate("3600/h"), Ok(1.0));
        assert_eq!(parse_rate("0.5/s"), Ok(0.5));
        assert_eq!(parse_rate(".5/s"), Ok(0.5));
        assert_eq!(parse_rate("3./s"), Ok(3.0));
        assert_eq!(parse_rate(" 30 / m "), Ok(0.5));
        assert_eq!(parse_rate("007/s"), Ok(7.0));
    }

    #[test]
    fn rejects_malformed_rates_with_reasons() {
        let err = |s| parse_rate(s).err().unwrap_or_default();
        assert!(err("50").contains("expected N/s"));
        assert!(err("").contains("expected N/s"));
        for bad_count in [
            "/s", "abc/s", "-1/s", "+1/s", "1e3/s", "1.2.3/s", "./s", "inf/s", "NaN/s", "1 0/s",
        ] {
            assert!(
                err(bad_count).contains("not a positive integer or decimal"),
                "{bad_count:?}"
            );
        }
        for bad_unit in ["10/1s", "10/", "10/sec", "10/S", "10/d", "10/s/s"] {
            assert!(err(bad_unit).contains("unknown unit"), "{bad_unit:?}");
        }
        assert!(err("0/s").contains("greater than zero"));
        assert!(err("0.000/h").contains("greater than zero"));
        let huge = format!("{}/s", "9".repeat(400));
        assert!(err(&huge).contains("out of range"));
        // Positive but so slow that the wait for a token would pass any bound.
        let tiny = format!("0.{}1/s", "0".repeat(300));
        assert!(err(&tiny).contains("slower than one per 3650d"), "{tiny}");
        assert!(err("0.0000001/h").contains("slower than one per 3650d"));
        assert_eq!(parse_rate("1/h"), Ok(1.0 / 3600.0));
    }
}

//! Retry policy: owns exponential backoff with full jitter, the retry/give-up decision and
//! parsing of HTTP `Retry-After` values.

use std::time::Duration;

/// The longest Retry-After honoured when the policy's own ceiling is lower.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);

/// How failed deliveries are retried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts (including the first) after which delivery gives up.
    pub max_attempts: u32,
    /// Backoff ceiling after the first failure.
    pub initial: Duration,
    /// Upper bound on any delay, including a server's `Retry-After`.
    pub max: Duration,
    /// Growth factor of the ceiling per further failure; NaN or negative acts as 1.
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            initial: Duration::from_secs(5),
            max: Duration::from_secs(3600),
            multiplier: 2.0,
        }
    }
}

/// Outcome of consulting the policy after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again after this delay.
    Retry(Duration),
    /// Stop: the attempt budget is spent.
    GiveUp,
}

impl RetryPolicy {
    /// Delay before attempt `attempt + 1`, after `attempt` (>=1) failed attempts: full jitter, uniform in [0, min(max, initial * multiplier^(attempt-1))]; `unit` in [0,1) is the random draw, passed in.
    pub fn backoff(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        // A NaN or out-of-range draw is clamped so it can never exceed the ceiling.
        let unit = if unit.is_nan() {
            0.0
        } else {
            unit.clamp(0.0, 1.0)
        };
        Duration::try_from_secs_f64(ceiling.as_secs_f64() * unit)
            .map_or(ceiling, |d| d.min(ceiling))
    }

    /// What to do after failed attempt number `attempt`: Retry after a delay (the larger of the
    /// jittered backoff and the server's Retry-After), or GiveUp when attempt >= max_attempts.
    /// Retry-After is honoured up to the larger of `max` and `RETRY_AFTER_CAP`, so a small
    /// backoff ceiling does not override a server asking for a minute, and a hostile server
    /// cannot park a delivery for days.
    pub fn next(&self, attempt: u32, retry_after: Option<Duration>, unit: f64) -> RetryDecision {
        if attempt >= self.max_attempts {
            return RetryDecision::GiveUp;
        }
        let server = retry_after.map_or(Duration::ZERO, |d| d.min(self.max.max(RETRY_AFTER_CAP)));
        RetryDecision::Retry(self.backoff(attempt, unit).max(server))
    }

    /// `min(max, initial * multiplier^(attempt-1))`, saturating instead of overflowing.
    fn ceiling(&self, attempt: u32) -> Duration {
        // Checked first: 0 * inf would be NaN for a zero initial delay.
        if self.initial.is_zero() {
            return Duration::ZERO;
        }
        let multiplier = if self.multiplier.is_nan() || self.multiplier < 0.0 {
            1.0
        } else {
            self.multiplier
        };
        // Exponents past i32::MAX change nothing: powi already saturates to inf or 0 long before.
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.initial.as_secs_f64() * multiplier.powi(exponent);
        // `secs` is finite and >= 0, or +inf; only the latter fails conversion.
        Duration::try_from_secs_f64(secs).map_or(self.max, |d| d.min(self.max))
    }
}

/// Parse an HTTP Retry-After value: delta-seconds, or an HTTP-date (IMF-fixdate, e.g. "Wed, 21 Oct 2015 07:28:00 GMT") relative to `now_unix_secs`. None when unparseable.
///
/// A date in the past yields zero. The obsolete RFC 850 and asctime date forms are not accepted.
pub fn parse_retry_after(value: &str, now_unix_secs: u64) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits, so parsing fails only on overflow: saturate, the server asked for "very long".
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = u64::try_from(parse_imf_fixdate(value)?).unwrap_or(0);
    Some(Duration::from_secs(at.saturating_sub(now_unix_secs)))
}

/// Unix seconds of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), validated field by field.
///
/// The day name must be a valid one but is not cross-checked against the date.
fn parse_imf_fixdate(s: &str) -> Option<i64> {
    const DAYS: [&[u8]; 7] = [b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun"];
    const MONTHS: [&[u8]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let b = s.as_bytes();
    let shape_ok = b.len() == 29
        && &b[3..5] == b", "
        && b[7] == b' '
        && b[11] == b' '
        && b[16] == b' '
        && b[19] == b':'
        && b[22] == b':'
        && &b[25..] == b" GMT";
    if !shape_ok || !DAYS.contains(&&b[0..3]) {
        return None;
    }
    let month = MONTHS.iter().position(|m| *m == &b[8..11])? as i64 + 1;
    let day = digits(&b[5..7])?;
    let year = digits(&b[12..16])?;
    let (hour, minute, second) = (
        digits(&b[17..19])?,
        digits(&b[20..22])?,
        digits(&b[23..25])?,
    );
    // Second 60 is a leap second in the grammar; it simply counts into the next minute.
    if day < 1 || day > days_in_month(year, month) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second)
}

/// Decimal value of a run of ASCII digits; None if any byte is not a digit.
fn digits(b: &[u8]) -> Option<i64> {
    b.iter().try_fold(0i64, |acc, &c| {
        c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
    })
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 in the proleptic Gregorian calendar (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    // Years start in March so the leap day falls at the end of the counted year.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn policy() -> RetryPolicy {
        RetryPolicy::default()
    }

    #[test]
    fn defaults() {
        let p = policy();
        assert_eq!(p.max_attempts, 10);
        assert_eq!(p.initial, 5 * SEC);
        assert_eq!(p.max, 3600 * SEC);
        assert_eq!(p.multiplier, 2.0);
    }

    #[test]
    fn backoff_ceiling_grows_then_caps() {
        let p = policy();
        let ceiling = |attempt| p.backoff(attempt, 1.0);
        assert_eq!(ceiling(1), 5 * SEC);
        assert_eq!(ceiling(2), 10 * SEC);
        assert_eq!(ceiling(3), 20 * SEC);
        assert_eq!(ceiling(10), 2_560 * SEC);
        assert_eq!(ceiling(11), p.max);
        // The largest draw stays just under the ceiling.
        let near = p.backoff(2, 0.999_999_999);
        assert!(near < 10 * SEC && near > 10 * SEC - Duration::from_micros(1));
        assert_eq!(p.backoff(3, 0.5), 10 * SEC);
        assert_eq!(p.backoff(3, 0.0), Duration::ZERO);
    }

    #[test]
    fn backoff_attempt_zero_behaves_like_one() {
        let p = policy();
        assert_eq!(p.backoff(0, 0.5), p.backoff(1, 0.5));
    }

    #[test]
    fn backoff_survives_overflow_and_bad_inputs() {
        let p = policy();
        for attempt in [64, 1_024, 1_100, 100_000, u32::MAX] {
            assert_eq!(p.backoff(attempt, 1.0), p.max, "attempt {attempt}");
            assert_eq!(p.backoff(attempt, 0.5), p.max / 2, "attempt {attempt}");
        }
        assert_eq!(p.backoff(3, f64::NAN), Duration::ZERO);
        assert_eq!(p.backoff(3, -1.0), Duration::ZERO);
        assert_eq!(p.backoff(3, 7.0), 20 * SEC);
        assert_eq!(p.backoff(3, f64::INFINITY), 20 * SEC);

        let nan = RetryPolicy {
            multiplier: f64::NAN,
            ..p
        };
        assert_eq!(nan.backoff(9, 1.0), 5 * SEC);
        let negative = RetryPolicy {
            multiplier: -3.0,
            ..p
        };
        assert_eq!(negative.backoff(4, 1.0), 5 * SEC);
        let infinite = RetryPolicy {
            multiplier: f64::INFINITY,
            ..p
        };
        assert_eq!(infinite.backoff(1, 1.0), 5 * SEC);
        assert_eq!(infinite.backoff(2, 1.0), p.max);
        let zero_initial = RetryPolicy {
            initial: Duration::ZERO,
            multiplier: f64::INFINITY,
            ..p
        };
        assert_eq!(zero_initial.backoff(5, 1.0), Duration::ZERO);
        let huge = RetryPolicy {
            initial: Duration::MAX,
            max: Duration::MAX,
            ..p
        };
        assert_eq!(huge.backoff(u32::MAX, 1.0), Duration::MAX);
        let small_max = RetryPolicy { max: SEC, ..p };
        assert_eq!(small_max.backoff(1, 1.0), SEC);
    }

    #[test]
    fn backoff_is_monotone_in_unit_and_bounded() {
        let p = policy();
        let mut next = crate::testrng::xorshift(0x2545_F491_4F6C_DD1D);
        for _ in 0..2_000 {
            let state = next();
            let attempt = (state % 40) as u32 + 1;
            let unit = (state >> 11) as f64 / (1u64 << 53) as f64;
            let ceiling = p.backoff(attempt, 1.0);
            let d = p.backoff(attempt, unit);
            assert!(d <= ceiling && d <= p.max);
            assert!(p.backoff(attempt, unit / 2.0) <= d);
        }
    }

    #[test]
    fn next_gives_up_at_budget() {
        let p = RetryPolicy {
            max_attempts: 3,
            ..policy()
        };
        assert!(matches!(p.next(1, None, 0.5), RetryDecision::Retry(_)));
        assert!(matches!(p.next(2, None, 0.5), RetryDecision::Retry(_)));
        assert_eq!(p.next(3, None, 0.5), RetryDecision::GiveUp);
        assert_eq!(p.next(u32::MAX, Some(SEC), 0.5), RetryDecision::GiveUp);
        let never = RetryPolicy {
            max_attempts: 0,
            ..policy()
        };
        assert_eq!(never.next(0, None, 0.5), RetryDecision::GiveUp);
    }

    #[test]
    fn next_takes_larger_of_backoff_and_capped_retry_after() {
        let p = policy();
        assert_eq!(
            p.next(1, None, 0.5),
            RetryDecision::Retry(2_500 * Duration::from_millis(1))
        );
        assert_eq!(
            p.next(1, Some(60 * SEC), 0.5),
            RetryDecision::Retry(60 * SEC)
        );
        assert_eq!(p.next(3, Some(SEC), 0.5), RetryDecision::Retry(10 * SEC));
        assert_eq!(
            p.next(1, Some(Duration::MAX), 0.0),
            RetryDecision::Retry(p.max)
        );
    }

    #[test]
    fn retry_after_delta_seconds() {
        assert_eq!(parse_retry_after("120", 0), Some(120 * SEC));
        assert_eq!(parse_retry_after("  0 ", 0), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("99999999999999999999999", 0),
            Some(Duration::from_secs(u64::MAX))
        );
        for bad in ["", " ", "-5", "+5", "1.5", "12a", "0x10", "１２"] {
            assert_eq!(parse_retry_after(bad, 0), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_http_date() {
        let now = 1_445_412_480; // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now),
            Some(90 * SEC)
        );
        assert_eq!(
            parse_retry_after("Thu, 22 Oct 2015 07:28:00 GMT", now),
            Some(86_400 * SEC)
        );
        assert_eq!(
            parse_retry_after("Tue, 20 Oct 2015 07:28:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784_111_777),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("Mon, 01 Jan 1900 00:00:00 GMT", 0),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after(" Wed, 21 Oct 2015 07:28:10 GMT\t", now),
            Some(10 * SEC)
        );
    }

    #[test]
    fn known_timestamps() {
        let at = |s| parse_imf_fixdate(s);
        assert_eq!(at("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(at("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(at("Tue, 29 Feb 2000 12:00:00 GMT"), Some(951_825_600));
        assert_eq!(at("Thu, 29 Feb 2024 23:59:60 GMT"), Some(1_709_251_200));
        assert_eq!(at("Fri, 31 Dec 9999 23:59:59 GMT"), Some(253_402_300_799));
        assert_eq!(at("Wed, 31 Dec 1969 23:59:59 GMT"), Some(-1));
    }

    #[test]
    fn rejects_malformed_dates() {
        for bad in [
            "Wed, 21 Oct 2015 07:28:00 UTC",
            "Wed, 21 Oct 2015 07:28:00 gmt",
            "wed, 21 Oct 2015 07:28:00 GMT",
            "Wed, 21 oct 2015 07:28:00 GMT",
            "Xyz, 21 Oct 2015 07:28:00 GMT",
            "Wed, 21 Foo 2015 07:28:00 GMT",
            "Wed, 1 Oct 2015 07:28:00 GMT",
            "Wed 21 Oct 2015 07:28:00 GMT ",
            "Wed, 21 Oct 2015 07:28:00 GMT x",
            "Wed, 21-Oct-2015 07:28:00 GMT",
            "Wednesday, 21-Oct-15 07:28:00 GMT",
            "Wed Oct 21 07:28:00 2015",
            "Wed, 00 Oct 2015 07:28:00 GMT",
            "Wed, 32 Oct 2015 07:28:00 GMT",
            "Wed, 31 Nov 2015 07:28:00 GMT",
            "Sun, 29 Feb 2015 07:28:00 GMT",
            "Thu, 29 Feb 1900 07:28:00 GMT",
            "Wed, 21 Oct 2015 24:00:00 GMT",
            "Wed, 21 Oct 2015 07:60:00 GMT",
            "Wed, 21 Oct 2015 07:28:61 GMT",
            "Wed, 21 Oct 2015 07:2a:00 GMT",
            "Wed, 21 Oct 20-5 07:28:00 GMT",
            "Wed, 21 Oct 2015 07:28:00 GMT\u{e9}",
            "Wé, 21 Oct 2015 07:28:00 GMT",
        ] {
            assert_eq!(parse_imf_fixdate(bad), None, "{bad:?}");
            assert_eq!(parse_retry_after(bad, 0), None, "{bad:?}");
        }
    }

    #[test]
    fn days_from_civil_matches_day_counting() {
        let mut days = 0;
        for year in 1970..2200 {
            for month in 1..=12 {
                for day in 1..=days_in_month(year, month) {
                    assert_eq!(
                        days_from_civil(year, month, day),
                        days,
                        "{year}-{month}-{day}"
                    );
                    days += 1;
                }
            }
        }
    }
}

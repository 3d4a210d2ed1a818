//! Domain types shared by every layer: events, deliveries, attempts, subscriptions. No I/O.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Microseconds since the Unix epoch: the one time representation stored on disk.
pub type Micros = i64;

/// Sequence number of an event in the append-only log (dense, starts at 1).
pub type Seq = u64;

/// Identifier of a delivery (one event to one subscription), monotonic.
pub type DeliveryId = u64;

/// Ids of subscriptions, sources: short, URL-safe.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The wall clock in microseconds since the Unix epoch (see `clock`).
pub use crate::clock::now_micros;

/// One shared copy of each destination name in a batch of jobs: `names` holds those seen.
pub fn intern(
    names: &mut std::collections::HashMap<String, std::sync::Arc<str>>,
    name: String,
) -> std::sync::Arc<str> {
    names
        .entry(name)
        .or_insert_with_key(|n| std::sync::Arc::from(n.as_str()))
        .clone()
}

/// A duration in microseconds, saturating (durations are bounded far below that).
pub fn micros(d: Duration) -> Micros {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// The key under which an inbound request's signed body is remembered for replay detection,
/// beside provider delivery ids in the same index: `body sha256:` and the body's hex digest.
/// The space keeps the two apart: a delivery id never holds one, so no request can name a
/// fingerprint as its delivery id (and so make a body it cannot sign look already seen).
pub fn body_fingerprint(body: &[u8]) -> String {
    use std::fmt::Write;
    const PREFIX: &str = "body sha256:";
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    let mut out = String::with_capacity(PREFIX.len() + 64);
    out.push_str(PREFIX);
    for b in digest.as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A new event id, `evt_` and a UUIDv7 (time-ordered, so ids minted together sit together
/// in the id index). The 74 random bits come from the thread's generator: `Uuid::now_v7`
/// asks the kernel for them on every call, one system call per event.
pub fn new_event_id() -> String {
    new_id("evt")
}

/// A fresh batch id: `bat_` and a UUIDv7, like event ids.
pub fn new_batch_id() -> String {
    new_id("bat")
}

fn new_id(prefix: &str) -> String {
    let millis = u64::try_from(now_micros() / 1000).unwrap_or(0);
    let random: [u8; 10] = rand::random();
    let id = uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid();
    format!("{prefix}_{}", id.simple())
}

/// The last instant RFC 3339 can write: 9999-12-31T23:59:59.999999Z.
pub const MAX_RFC3339_MICROS: Micros = 253_402_300_799_999_999;

/// Formats a stored time as RFC 3339 (UTC, microsecond precision). Total: a time before the
/// epoch shows as the epoch and one past year 9999 as its last instant, so no stored value
/// (whatever wrote it) can make a response fail.
pub fn rfc3339(micros: Micros) -> String {
    let clamped = u64::try_from(micros.clamp(0, MAX_RFC3339_MICROS)).unwrap_or(0);
    let t = std::time::UNIX_EPOCH + Duration::from_micros(clamped);
    humantime::format_rfc3339_micros(t).to_string()
}

/// Deepest nesting of arrays and objects that event data may have: inside serde_json's own
/// limit (127) with room for the envelope a delivery wraps around it, so every stored event
/// can be parsed again (payload filters, inspection, receivers).
pub const MAX_DATA_DEPTH: usize = 100;

/// Whether JSON text nests arrays and objects deeper than `max`. A byte scan (strings
/// skipped) that allocates nothing, for text already known to be valid JSON.
pub fn nested_deeper_than(json: &str, max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// The longest duration any setting or request may hold: 3650 days. Every stored time is
/// `now` plus at most a few of these, far inside what `rfc3339` can write.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

/// The widest timestamp tolerance of an inbound source: 100 years. A tolerance is only ever
/// compared with, never added to a stored time, and published test vectors are years old.
pub const MAX_TOLERANCE: Duration = Duration::from_secs(3_155_760_000);

/// Parses a duration the humantime way ("30s", "2h 5m", "7d"), refusing one longer than
/// `MAX_DURATION`. The one parser for durations in the config file and in API requests.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_duration_within(s, MAX_DURATION, "3650d (10 years)")
}

/// `parse_duration` with another limit, named in the error as `limit`.
pub fn parse_duration_within(s: &str, max: Duration, limit: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))?;
    if d > max {
        return Err(format!(
            "duration {s:?} is longer than the limit of {limit}"
        ));
    }
    Ok(d)
}

/// Parses an RFC 3339 UTC time (`2026-01-02T03:04:05Z`, fractions allowed) or unix seconds.
pub fn parse_time(s: &str) -> Option<Micros> {
    if let Ok(secs) = s.parse::<i64>() {
        return secs.checked_mul(1_000_000);
    }
    // humantime knows only `Z`; a numeric offset (`+02:00`) is applied here.
    let (base, offset_secs) = match s
        .len()
        .checked_sub(6)
        .and_then(|i| s.get(i..).map(|t| (i, t)))
    {
        Some((i, tail))
            if (tail.starts_with('+') || tail.starts_with('-')) && tail.as_bytes()[3] == b':' =>
        {
            let h: i64 = tail.get(1..3)?.parse().ok()?;
            let m: i64 = tail.get(4..6)?.parse().ok()?;
            let sign = if tail.starts_with('-') { -1 } else { 1 };
            (format!("{}Z", s.get(..i)?), sign * (h * 3600 + m * 60))
        }
        _ => (s.to_string(), 0),
    };
    let t = humantime::parse_rfc3339_weak(&base).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_micros())
        .ok()?
        .checked_sub(offset_secs.checked_mul(1_000_000)?)
}

/// An event as stored in the log. Immutable once written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub event_type: String,
    pub source: Option<String>,
    /// The `data` member exactly as the producer sent it (valid JSON text).
    pub data: String,
    pub received_at: Micros,
    pub idempotency_key: Option<String>,
    /// Set when the event came from an inbound provider webhook.
    pub receipt: Option<u64>,
    // Fields below were added in record version 2; a version-1 record reads them as
    // zero (see `storage::schema::decode`): normal priority, no batch, no callback.
    pub priority: Priority,
    /// The `POST /v1/events/batch` that stored it.
    pub batch: Option<String>,
    /// Where the producer asked for this one event to go, beside the subscriptions.
    pub callback: Option<Callback>,
}

/// How urgent an event is. Within each destination, due deliveries go out highest priority
/// first (FIFO subscriptions keep event order). Stored as its variant index: `Normal` is 0,
/// what records written before priorities existed read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    #[default]
    Normal,
    High,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Self::High, Self::Normal, Self::Low];

    /// The name used on the wire and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// Sorting key: lower goes first.
    pub fn rank(self) -> u8 {
        match self {
            Self::High => 0,
            Self::Normal => 1,
            Self::Low => 2,
        }
    }
}

/// A per-event destination named by the producer: delivered like a subscription's, signed
/// with `secret` (or `[delivery.callbacks] secret`), under the destination task of its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Callback {
    pub url: String,
    pub headers: std::collections::BTreeMap<String, String>,
    /// `whsec_`/`whsk_`; None signs with the configured default.
    pub secret: Option<String>,
}

/// A provider's webhook request as received and verified, kept for audits. Immutable once
/// written; stored in the same transaction as the event it became.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    /// The configured source id the request was posted to.
    pub source: String,
    pub method: String,
    /// Request headers in arrival order, less credentials (authorization, cookies) and
    /// hop-by-hop headers; non-UTF-8 bytes in values are replaced.
    pub headers: Vec<(String, String)>,
    /// The body bytes exactly as they were verified.
    pub body: Vec<u8>,
    pub received_at: Micros,
    /// The scheme that verified the signature (`github`, `stripe`, ...). Only verified
    /// requests are stored, so a receipt's verification result is always "verified".
    pub scheme: String,
    /// The signed timestamp, for schemes that sign one (unix seconds).
    pub signed_timestamp: Option<i64>,
    /// The provider's delivery id, the de-duplication key within the source.
    pub delivery_id: Option<String>,
    pub event_id: String,
    pub event_seq: Seq,
}

/// Where a delivery is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum DeliveryStatus {
    Pending = 0,
    InFlight = 1,
    Succeeded = 2,
    Retrying = 3,
    Dead = 4,
    Cancelled = 5,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 6] = [
        Self::Pending,
        Self::InFlight,
        Self::Succeeded,
        Self::Retrying,
        Self::Dead,
        Self::Cancelled,
    ];

    /// The name used on the wire and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::InFlight => "in_flight",
            Self::Succeeded => "succeeded",
            Self::Retrying => "retrying",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Terminal deliveries are never attempted again unless an operator acts.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Dead | Self::Cancelled)
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(c: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.code() == c)
    }
}

/// Why a delivery exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    Publish,
    Replay,
    Redrive,
}

/// One event going to one subscription. Mutable state, rewritten by the writer only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub event_seq: Seq,
    pub event_id: String,
    pub subscription: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub next_attempt_at: Option<Micros>,
    pub last_error: Option<String>,
    pub created_at: Micros,
    pub updated_at: Micros,
    pub origin: Origin,
    // Added in record version 2 (a version-1 record reads `Normal`): the event's priority,
    // kept here so the scheduler can order due deliveries without reading events.
    pub priority: Priority,
}

/// How an attempt ended, as recorded in the append-only attempt history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub started_at: Micros,
    pub duration_us: u64,
    /// HTTP status when a response arrived.
    pub status_code: Option<u16>,
    /// Error class when no usable response arrived (`timeout`, `connect`, `refused_address`, ...).
    pub error: Option<String>,
    /// The first bytes of the response body (truncated).
    pub response_body: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_is_total_and_clamps_to_what_it_can_write() {
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59.999999Z");
        assert_eq!(rfc3339(MAX_RFC3339_MICROS), "9999-12-31T23:59:59.999999Z");
        assert_eq!(rfc3339(i64::MIN), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(-1), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(1_000_000), "1970-01-01T00:00:01.000000Z");
    }

    #[test]
    fn nesting_depth_counts_containers_outside_strings() {
        assert!(!nested_deeper_than("{}", 1));
        assert!(nested_deeper_than("[[]]", 1));
        assert!(!nested_deeper_than(r#"{"a":"[[[[\"[[["}"#, 1));
        assert!(!nested_deeper_than(r#"[{"a":[1]},{"b":[2]}]"#, 3));
        assert!(nested_deeper_than(r#"[{"a":[[1]]}]"#, 3));
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert!(nested_deeper_than(&deep, MAX_DATA_DEPTH));
        let ok = "[".repeat(MAX_DATA_DEPTH) + &"]".repeat(MAX_DATA_DEPTH);
        assert!(!nested_deeper_than(&ok, MAX_DATA_DEPTH));
        assert!(serde_json::from_str::<serde_json::Value>(&ok).is_ok());
        let envelope = format!(r#"{{"data":{ok}}}"#);
        assert!(serde_json::from_str::<serde_json::Value>(&envelope).is_ok());
    }

    #[test]
    fn durations_are_bounded() {
        assert_eq!(parse_duration("3650d"), Ok(MAX_DURATION));
        assert!(parse_duration("3651d").unwrap_err().contains("3650d"));
        assert!(parse_duration("9999999999999d").is_err());
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("invalid duration")
        );
    }

    #[test]
    fn event_ids_are_distinct_uuid_v7_of_the_current_millisecond() {
        let before = now_micros() / 1000;
        let ids: Vec<String> = (0..10_000).map(|_| new_event_id()).collect();
        let after = now_micros() / 1000;
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        for id in &ids {
            let Some(hex) = id.strip_prefix("evt_") else {
                panic!("{id}: no evt_ prefix");
            };
            let u = match uuid::Uuid::parse_str(hex) {
                Ok(u) => u,
                Err(e) => panic!("{id}: {e}"),
            };
            assert_eq!(u.get_version_num(), 7, "{id}");
            assert_eq!(u.get_variant(), uuid::Variant::RFC4122, "{id}");
            let Some((secs, nanos)) = u.get_timestamp().map(|t| t.to_unix()) else {
                panic!("{id}: no timestamp");
            };
            let ms = i64::try_from(secs * 1000).unwrap_or(0) + i64::from(nanos / 1_000_000);
            assert!(
                (before..=after).contains(&ms),
                "{id}: {ms} not in {before}..={after}"
            );
        }
    }

    #[test]
    fn status_codes_round_trip() {
        for st in DeliveryStatus::ALL {
            assert_eq!(DeliveryStatus::from_code(st.code()), Some(st));
            assert_eq!(DeliveryStatus::parse(st.as_str()), Some(st));
        }
        assert_eq!(DeliveryStatus::from_code(200), None);
    }

    #[test]
    fn time_parsing() {
        assert_eq!(parse_time("10"), Some(10_000_000));
        let m = parse_time("2026-01-02T03:04:05Z").unwrap_or_default();
        assert_eq!(rfc3339(m), "2026-01-02T03:04:05.000000Z");
        assert_eq!(parse_time("yesterday"), None);
        assert_eq!(parse_time("2026-01-02T05:04:05+02:00"), Some(m));
        assert_eq!(parse_time("2026-01-02T02:04:05-01:00"), Some(m));
        assert_eq!(parse_time("2026-01-02T02:04:05-01:xx"), None);
    }
}

//! Inbound sources: a config `[[sources]]` table turned into a ready verifier, how a verified
//! request becomes a canonical event (type, provider delivery id, data), and the set of
//! sources in force.
//!
//! Invariants:
//! - A `Source` exists only if its config was valid: every secret decoded, every field
//!   resolvable. Bad sources are refused at config load, never at request time.
//! - Secrets are private to this module and never printed (`Debug` redacts them).
//! - Pure: no I/O, no clock. Times and instants are parameters.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::Instant;

use serde::Deserialize;
use serde_json::Value;

use super::schemes::{self, Encoding, HmacSpec, Rejection, Request, Scheme, Verified};
use crate::model::{MAX_DATA_DEPTH, nested_deeper_than};
use crate::ratelimit::{TokenBucket, parse_rate};
use crate::signing::STANDARD_ID_HEADER;
use crate::units::{ByteSize, HumanDuration, Tolerance};

/// How long a fingerprint counts when a source does not say.
const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Timestamp tolerance when a source does not set one.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);
/// Longest event type, prefix included (the same bound as published events).
const MAX_TYPE_LEN: usize = 128;
/// Longest type prefix.
const MAX_PREFIX_LEN: usize = 64;
/// Longest provider delivery id kept as a de-duplication key.
const MAX_DELIVERY_ID_LEN: usize = 255;

/// Where a value comes from in an inbound request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// A request header, matched case-insensitively.
    Header(String),
    /// A member of the JSON body, by dotted path (`data.object.type`).
    Json(Vec<String>),
}

impl Field {
    /// Parses `header:NAME` or `json:FIELD[.FIELD...]`.
    pub fn parse(s: &str) -> Result<Field, String> {
        match s.split_once(':') {
            Some(("header", name)) if valid_header_name(name) => Ok(Field::Header(name.into())),
            Some(("header", name)) => Err(format!("{name:?} is not a valid header name")),
            Some(("json", path)) => {
                let parts: Vec<String> = path.split('.').map(str::to_string).collect();
                if parts.iter().any(String::is_empty) {
                    Err(format!(
                        "{path:?} is not a dotted JSON field path like type or data.object.id"
                    ))
                } else {
                    Ok(Field::Json(parts))
                }
            }
            _ => Err(format!(
                "{s:?} must be header:NAME or json:FIELD (a dotted path)"
            )),
        }
    }

    /// Where the value is looked for, for error messages.
    fn describe(&self) -> String {
        match self {
            Field::Header(name) => format!("header {name}"),
            Field::Json(path) => format!("JSON field {}", path.join(".")),
        }
    }

    /// The value: a header's text, or a JSON string (or integer, for ids) member.
    fn extract(&self, req: &Request<'_>, json: Option<&Value>, numbers: bool) -> Option<String> {
        match self {
            Field::Header(name) => req.header(name).map(str::to_string),
            Field::Json(path) => {
                let mut v = json?;
                for key in path {
                    v = v.get(key)?;
                }
                match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) if numbers && (n.is_u64() || n.is_i64()) => {
                        Some(n.to_string())
                    }
                    _ => None,
                }
            }
        }
    }
}

/// A `[[sources]]` table as written. Unknown keys are errors.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub id: String,
    pub scheme: String,
    #[serde(default)]
    pub secrets: Vec<String>,
    pub tolerance: Option<Tolerance>,
    /// Where the event type comes from: `header:NAME` or `json:FIELD` (dotted path).
    pub event_type: Option<String>,
    /// Prefix prepended to the provider's event type, e.g. `github.`.
    pub type_prefix: Option<String>,
    /// Where the provider's delivery id comes from: `header:NAME` or `json:FIELD`.
    pub delivery_id: Option<String>,
    pub max_body: Option<ByteSize>,
    pub rate_limit: Option<String>,
    /// For `hmac-sha256`: the signature header, its encoding and prefix, the timestamp header.
    pub signature_header: Option<String>,
    pub encoding: Option<String>,
    pub signature_prefix: Option<String>,
    pub timestamp_header: Option<String>,
    /// Replay detection beside the delivery id: "fingerprint" (the default where the
    /// signature covers no timestamp) or "delivery-id" (the delivery id only).
    pub dedup: Option<String>,
    /// How long a fingerprint counts (default 24h).
    pub dedup_window: Option<HumanDuration>,
    /// The priority of the events it makes: "high", "normal" (the default) or "low".
    pub priority: Option<String>,
}

/// A configured inbound source, ready to verify requests.
pub struct Source {
    pub id: String,
    pub scheme: Scheme,
    /// Decoded HMAC keys; all are tried (rotation).
    secrets: Vec<Vec<u8>>,
    pub tolerance: Duration,
    pub event_type: Field,
    pub type_prefix: String,
    /// `None`: requests are not de-duplicated.
    pub delivery_id: Option<Field>,
    pub max_body: u64,
    /// Requests per second, `None` for unlimited.
    pub rate_limit: Option<f64>,
    /// How long a request whose body was seen before counts as a replay (`None`: only the
    /// delivery id is checked). On by default where the signature covers no timestamp, so a
    /// signed body sent again under a new delivery id or event header is caught.
    pub fingerprint_window: Option<Duration>,
    /// The priority of the events it makes.
    pub priority: crate::model::Priority,
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Source")
            .field("id", &self.id)
            .field("scheme", &self.scheme)
            .field(
                "secrets",
                &format_args!("[{} redacted]", self.secrets.len()),
            )
            .field("tolerance", &self.tolerance)
            .field("event_type", &self.event_type)
            .field("type_prefix", &self.type_prefix)
            .field("delivery_id", &self.delivery_id)
            .field("max_body", &self.max_body)
            .field("rate_limit", &self.rate_limit)
            .field("fingerprint_window", &self.fingerprint_window)
            .field("priority", &self.priority)
            .finish()
    }
}

/// A verified request that cannot become an event; answered 400, nothing stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("the event type ({0}) is missing or not a string")]
    MissingEventType(String),
    #[error(
        "the event type {0:?} must be 1-128 printable ASCII characters without spaces, prefix included"
    )]
    InvalidEventType(String),
    #[error("the provider delivery id ({0}) is missing or not a string")]
    MissingDeliveryId(String),
    #[error("the provider delivery id must be 1-255 printable ASCII characters without spaces")]
    InvalidDeliveryId,
    #[error(
        "data is nested deeper than {} levels of arrays and objects",
        crate::model::MAX_DATA_DEPTH
    )]
    TooDeep,
}

impl Unusable {
    /// Stable machine-readable code for metrics and API responses.
    pub fn code(&self) -> &'static str {
        match self {
            Unusable::MissingEventType(_) => "missing_event_type",
            Unusable::InvalidEventType(_) => "invalid_event_type",
            Unusable::MissingDeliveryId(_) => "missing_delivery_id",
            Unusable::InvalidDeliveryId => "invalid_delivery_id",
            // The code publish answers for the same data.
            Unusable::TooDeep => "invalid_event",
        }
    }
}

/// What a verified request becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub event_type: String,
    pub delivery_id: Option<String>,
    /// The event's `data` as JSON text: the body itself when it is JSON, else the body as a
    /// JSON string (invalid UTF-8 replaced; the exact bytes stay in the receipt).
    pub data: String,
}

impl Source {
    /// Validates a `[[sources]]` table; `default_max_body` is `server.max_body`. Errors are
    /// (field, message) pairs and never contain a secret.
    pub fn from_raw(
        raw: &RawSource,
        default_max_body: u64,
    ) -> Result<Source, Vec<(String, String)>> {
        let mut errs: Vec<(String, String)> = Vec::new();
        let mut e = |field: &str, msg: String| errs.push((field.to_string(), msg));
        let hmac_only = [
            ("signature_header", raw.signature_header.is_some()),
            ("encoding", raw.encoding.is_some()),
            ("signature_prefix", raw.signature_prefix.is_some()),
            ("timestamp_header", raw.timestamp_header.is_some()),
        ];
        let scheme = match raw.scheme.as_str() {
            "standard-webhooks" => Some(Scheme::StandardWebhooks),
            "github" => Some(Scheme::Github),
            "stripe" => Some(Scheme::Stripe),
            "hmac-sha256" => hmac_spec(raw, &mut e).map(Scheme::HmacSha256),
            other => {
                e(
                    "scheme",
                    format!(
                        "unknown scheme {other:?} (expected standard-webhooks, github, stripe or hmac-sha256)"
                    ),
                );
                None
            }
        };
        if !matches!(scheme, Some(Scheme::HmacSha256(_)) | None) {
            for (field, set) in hmac_only {
                if set {
                    e(
                        field,
                        format!(
                            "only applies to scheme \"hmac-sha256\", not {:?}",
                            raw.scheme
                        ),
                    );
                }
            }
        }

        let mut secrets = Vec::new();
        if raw.secrets.is_empty() {
            e("secrets", "needs at least one secret".into());
        }
        if let Some(scheme) = &scheme {
            for (i, s) in raw.secrets.iter().enumerate() {
                // The error names the position only: the secret itself must not reach a log.
                match schemes::decode_secret(scheme, s) {
                    Ok(k) => secrets.push(k),
                    Err(err) => e(&format!("secrets[{i}]"), err.to_string()),
                }
            }
        }

        let tolerance = raw.tolerance.map_or(DEFAULT_TOLERANCE, |d| d.0);
        let (default_type, default_prefix, default_id) = match &scheme {
            Some(Scheme::Github) => (
                Some(Field::Header("X-GitHub-Event".into())),
                "github.",
                Some(Field::Header(schemes::GITHUB_DELIVERY_HEADER.into())),
            ),
            Some(Scheme::Stripe) => (
                Some(Field::Json(vec!["type".into()])),
                "",
                Some(Field::Json(vec!["id".into()])),
            ),
            Some(Scheme::StandardWebhooks) => (
                Some(Field::Json(vec!["type".into()])),
                "",
                Some(Field::Header(STANDARD_ID_HEADER.into())),
            ),
            Some(Scheme::HmacSha256(_)) | None => (None, "", None),
        };
        let event_type = match raw.event_type.as_deref().map(Field::parse) {
            Some(Ok(f)) => Some(f),
            Some(Err(m)) => {
                e("event_type", m);
                None
            }
            None if raw.scheme == "hmac-sha256" => {
                e(
                    "event_type",
                    "is required for hmac-sha256 sources: header:NAME or json:FIELD".into(),
                );
                None
            }
            None => default_type,
        };
        let delivery_id = match raw.delivery_id.as_deref().map(Field::parse) {
            Some(Ok(f)) => Some(f),
            Some(Err(m)) => {
                e("delivery_id", m);
                None
            }
            None => default_id,
        };
        let type_prefix = raw
            .type_prefix
            .clone()
            .unwrap_or_else(|| default_prefix.to_string());
        if type_prefix.len() > MAX_PREFIX_LEN || !type_prefix.bytes().all(|b| b.is_ascii_graphic())
        {
            e(
                "type_prefix",
                format!(
                    "must be at most {MAX_PREFIX_LEN} printable ASCII characters without spaces"
                ),
            );
        }
        let max_body = raw.max_body.map_or(default_max_body, |b| b.0);
        if max_body == 0 {
            e("max_body", "must be more than zero".into());
        }
        let rate_limit = match raw.rate_limit.as_deref().map(parse_rate) {
            None => None,
            Some(Ok(r)) => Some(r),
            Some(Err(m)) => {
                e("rate_limit", m);
                None
            }
        };
        let untimed = match &scheme {
            Some(Scheme::Github) => true,
            Some(Scheme::HmacSha256(spec)) => spec.timestamp_header.is_none(),
            _ => false,
        };
        let window = raw.dedup_window.map_or(DEFAULT_DEDUP_WINDOW, |d| d.0);
        if window.is_zero() {
            e("dedup_window", "must be more than zero".into());
        }
        let fingerprint_window = match raw.dedup.as_deref() {
            None if untimed => Some(window),
            None | Some("delivery-id") => None,
            Some("fingerprint") => Some(window),
            Some(other) => {
                e(
                    "dedup",
                    format!("unknown {other:?} (expected \"fingerprint\" or \"delivery-id\")"),
                );
                None
            }
        };
        let priority = match raw.priority.as_deref() {
            None => crate::model::Priority::Normal,
            Some(p) => crate::model::Priority::parse(p).unwrap_or_else(|| {
                e(
                    "priority",
                    format!("unknown {p:?} (expected \"high\", \"normal\" or \"low\")"),
                );
                crate::model::Priority::Normal
            }),
        };
        match (scheme, event_type) {
            (Some(scheme), Some(event_type)) if errs.is_empty() => Ok(Source {
                id: raw.id.clone(),
                scheme,
                secrets,
                tolerance,
                event_type,
                type_prefix,
                delivery_id,
                max_body,
                rate_limit,
                fingerprint_window,
                priority,
            }),
            _ => Err(errs),
        }
    }

    /// The scheme's name as written in the config.
    pub fn scheme_name(&self) -> &'static str {
        match self.scheme {
            Scheme::StandardWebhooks => "standard-webhooks",
            Scheme::Github => "github",
            Scheme::Stripe => "stripe",
            Scheme::HmacSha256(_) => "hmac-sha256",
        }
    }

    /// Checks the signature (and timestamp) of a request against every configured secret.
    pub fn verify(&self, now_unix: i64, req: &Request<'_>) -> Result<Verified, Rejection> {
        schemes::verify(&self.scheme, &self.secrets, self.tolerance, now_unix, req)
    }

    /// Turns a verified request into the parts of its event.
    pub fn interpret(&self, req: &Request<'_>) -> Result<Inbound, Unusable> {
        let text = std::str::from_utf8(req.body).ok();
        // serde_json accepts only UTF-8 input, so a parsed body is also valid text.
        let json: Option<Value> = text.and_then(|t| serde_json::from_str(t).ok());
        // Data may nest at most MAX_DATA_DEPTH levels. Scanned whether or not serde_json
        // parsed the body: past its own limit (128) it gives up, and such a body must be
        // refused, not kept as a string.
        if text.is_some_and(|t| nested_deeper_than(t, MAX_DATA_DEPTH)) {
            return Err(Unusable::TooDeep);
        }
        let raw_type = self
            .event_type
            .extract(req, json.as_ref(), false)
            .ok_or_else(|| Unusable::MissingEventType(self.event_type.describe()))?;
        let event_type = format!("{}{raw_type}", self.type_prefix);
        if raw_type.is_empty() || !token_text(&event_type, MAX_TYPE_LEN) {
            return Err(Unusable::InvalidEventType(event_type));
        }
        let delivery_id = match &self.delivery_id {
            None => None,
            Some(f) => {
                let id = f
                    .extract(req, json.as_ref(), true)
                    .ok_or_else(|| Unusable::MissingDeliveryId(f.describe()))?;
                if !token_text(&id, MAX_DELIVERY_ID_LEN) {
                    return Err(Unusable::InvalidDeliveryId);
                }
                Some(id)
            }
        };
        let data = match (json.is_some(), text) {
            (true, Some(t)) => t
                .trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r'))
                .to_string(),
            _ => Value::String(String::from_utf8_lossy(req.body).into_owned()).to_string(),
        };
        Ok(Inbound {
            event_type,
            delivery_id,
            data,
        })
    }
}

/// The `hmac-sha256` settings of a source.
fn hmac_spec(raw: &RawSource, e: &mut impl FnMut(&str, String)) -> Option<HmacSpec> {
    let header = match raw.signature_header.as_deref() {
        Some(h) if valid_header_name(h) => Some(h.to_string()),
        Some(h) => {
            e(
                "signature_header",
                format!("{h:?} is not a valid header name"),
            );
            None
        }
        None => {
            e(
                "signature_header",
                "is required for hmac-sha256 sources".into(),
            );
            None
        }
    };
    let encoding = match raw.encoding.as_deref() {
        None | Some("hex") => Some(Encoding::Hex),
        Some("base64") => Some(Encoding::Base64),
        Some(other) => {
            e(
                "encoding",
                format!("unknown encoding {other:?} (expected hex or base64)"),
            );
            None
        }
    };
    let prefix = match raw.signature_prefix.as_deref() {
        Some(p) if p.is_empty() || !p.is_ascii() => {
            e(
                "signature_prefix",
                "must be non-empty ASCII, e.g. \"sha256=\"".into(),
            );
            None
        }
        p => p.map(str::to_string),
    };
    let timestamp_header = match raw.timestamp_header.as_deref() {
        Some(h) if !valid_header_name(h) => {
            e(
                "timestamp_header",
                format!("{h:?} is not a valid header name"),
            );
            None
        }
        h => h.map(str::to_string),
    };
    Some(HmacSpec {
        header: header?,
        encoding: encoding?,
        prefix,
        timestamp_header,
    })
}

/// An HTTP header name: 1-128 token characters.
fn valid_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// 1-`max` printable ASCII characters, no spaces.
fn token_text(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic())
}

/// A source in force with its admission limiter.
pub struct Entry {
    pub source: Arc<Source>,
    bucket: Option<Mutex<TokenBucket>>,
}

impl Entry {
    /// Takes a slot of the source's rate limit; `Err(wait)` when it is exhausted.
    pub fn admit(&self, now: Instant) -> Result<(), Duration> {
        match &self.bucket {
            None => Ok(()),
            Some(b) => match b.lock() {
                Ok(mut g) => g.try_take(now),
                Err(poisoned) => poisoned.into_inner().try_take(now),
            },
        }
    }
}

/// The sources in force by id: replaced whole on reload; readers take a snapshot.
#[derive(Default)]
pub struct Sources {
    by_id: crate::swap::Swap<HashMap<String, Arc<Entry>>>,
}

impl Sources {
    pub fn new(sources: &[Arc<Source>], now: Instant) -> Self {
        let s = Self::default();
        s.replace(sources, now);
        s
    }

    /// Replaces the whole set; rate limiters start full again.
    pub fn replace(&self, sources: &[Arc<Source>], now: Instant) {
        let map = sources
            .iter()
            .map(|s| {
                let bucket = s
                    .rate_limit
                    .map(|r| Mutex::new(TokenBucket::new(r, r.max(1.0), now)));
                let entry = Entry {
                    source: s.clone(),
                    bucket,
                };
                (s.id.clone(), Arc::new(entry))
            })
            .collect();
        self.by_id.set(map);
    }

    /// The source with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.by_id.get().get(id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(scheme: &str) -> RawSource {
        RawSource {
            id: "s".into(),
            scheme: scheme.into(),
            secrets: vec!["secret".into()],
            tolerance: None,
            event_type: None,
            type_prefix: None,
            delivery_id: None,
            max_body: None,
            rate_limit: None,
            signature_header: None,
            encoding: None,
            signature_prefix: None,
            timestamp_header: None,
            dedup: None,
            dedup_window: None,
            priority: None,
        }
    }

    #[test]
    fn no_delivery_id_can_name_a_body_fingerprint() {
        // Both live in one index: a request whose unsigned delivery id header named another
        // body's fingerprint would make that body count as seen.
        let fp = crate::model::body_fingerprint(b"{}");
        assert!(!token_text(&fp, MAX_DELIVERY_ID_LEN), "{fp}");
        let headers = [
            ("x-github-event", "push"),
            ("x-github-delivery", fp.as_str()),
        ];
        let got = build(&raw("github")).interpret(&req(&headers, b"{}"));
        assert_eq!(
            got.map_err(|e| e.code()).map(|i| i.delivery_id),
            Err("invalid_delivery_id")
        );
    }

    #[test]
    fn fingerprints_are_on_where_the_signature_covers_no_timestamp() {
        assert!(build(&raw("github")).fingerprint_window.is_some());
        assert!(build(&raw("stripe")).fingerprint_window.is_none());
        let mut r = raw("github");
        r.dedup = Some("delivery-id".into());
        assert!(build(&r).fingerprint_window.is_none());
        let mut r = raw("stripe");
        r.dedup = Some("fingerprint".into());
        r.dedup_window = Some(HumanDuration(Duration::from_secs(60)));
        assert_eq!(build(&r).fingerprint_window, Some(Duration::from_secs(60)));
        let mut r = raw("github");
        r.dedup = Some("sometimes".into());
        assert!(Source::from_raw(&r, 1 << 20).is_err());
    }

    fn build(r: &RawSource) -> Source {
        match Source::from_raw(r, 1 << 20) {
            Ok(s) => s,
            Err(e) => panic!("{e:?}"),
        }
    }

    fn errors(r: &RawSource) -> Vec<(String, String)> {
        match Source::from_raw(r, 1 << 20) {
            Ok(s) => panic!("expected errors, got {s:?}"),
            Err(e) => e,
        }
    }

    fn req<'a>(headers: &'a [(&'a str, &'a str)], body: &'a [u8]) -> Request<'a> {
        Request { headers, body }
    }

    #[test]
    fn scheme_defaults() {
        let g = build(&raw("github"));
        assert_eq!(g.event_type, Field::Header("X-GitHub-Event".into()));
        assert_eq!(g.type_prefix, "github.");
        assert_eq!(
            g.delivery_id,
            Some(Field::Header("X-GitHub-Delivery".into()))
        );
        assert_eq!(g.max_body, 1 << 20);
        assert_eq!(g.tolerance, DEFAULT_TOLERANCE);
        let s = build(&raw("stripe"));
        assert_eq!(s.event_type, Field::Json(vec!["type".into()]));
        assert_eq!(s.delivery_id, Some(Field::Json(vec!["id".into()])));
        let mut sw = raw("standard-webhooks");
        sw.secrets = vec!["whsec_c2VjcmV0".into()];
        let sw = build(&sw);
        assert_eq!(sw.delivery_id, Some(Field::Header("webhook-id".into())));
    }

    #[test]
    fn bad_tables_name_every_field_and_no_secret() {
        let mut r = raw("standard-webhooks");
        r.secrets = vec!["whsec_not*base64".into(), "".into()];
        r.event_type = Some("body:type".into());
        r.delivery_id = Some("json:a..b".into());
        r.type_prefix = Some("has space".into());
        r.rate_limit = Some("fast".into());
        r.encoding = Some("hex".into());
        r.max_body = Some(ByteSize(0));
        let errs = errors(&r);
        let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
        for f in [
            "secrets[0]",
            "secrets[1]",
            "event_type",
            "delivery_id",
            "type_prefix",
            "rate_limit",
            "encoding",
            "max_body",
        ] {
            assert!(fields.contains(&f), "{f} not in {errs:?}");
        }
        assert!(!format!("{errs:?}").contains("not*base64"), "{errs:?}");

        let errs = errors(&raw("gitlab"));
        assert_eq!(errs[0].0, "scheme");
        let mut empty = raw("github");
        empty.secrets.clear();
        assert_eq!(errors(&empty)[0].0, "secrets");
    }

    #[test]
    fn hmac_requires_header_and_event_type() {
        let errs = errors(&raw("hmac-sha256"));
        let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
        assert!(fields.contains(&"signature_header"), "{errs:?}");
        assert!(fields.contains(&"event_type"), "{errs:?}");
        let mut r = raw("hmac-sha256");
        r.signature_header = Some("X-Signature".into());
        r.encoding = Some("base64".into());
        r.signature_prefix = Some("v1=".into());
        r.timestamp_header = Some("X-Timestamp".into());
        r.event_type = Some("header:X-Topic".into());
        let s = build(&r);
        assert_eq!(
            s.scheme,
            Scheme::HmacSha256(HmacSpec {
                header: "X-Signature".into(),
                encoding: Encoding::Base64,
                prefix: Some("v1=".into()),
                timestamp_header: Some("X-Timestamp".into()),
            })
        );
        assert_eq!(s.delivery_id, None);
        r.encoding = Some("hexadecimal".into());
        assert_eq!(errors(&r)[0].0, "encoding");
    }

    #[test]
    fn debug_redacts_secrets() {
        let mut r = raw("github");
        r.secrets = vec!["super-secret-value".into()];
        let out = format!("{:?}", build(&r));
        assert!(!out.contains("super-secret-value"), "{out}");
        assert!(out.contains("redacted"), "{out}");
    }

    #[test]
    fn interpret_json_body() {
        let s = build(&raw("stripe"));
        let body = br#" {"id": "evt_1", "type": "invoice.paid", "data": {"n": 1}} "#;
        let got = s.interpret(&req(&[], body)).unwrap();
        assert_eq!(got.event_type, "invoice.paid");
        assert_eq!(got.delivery_id.as_deref(), Some("evt_1"));
        assert_eq!(
            got.data,
            r#"{"id": "evt_1", "type": "invoice.paid", "data": {"n": 1}}"#
        );
        assert_eq!(
            s.interpret(&req(&[], br#"{"id": "evt_1"}"#)),
            Err(Unusable::MissingEventType("JSON field type".into()))
        );
        assert_eq!(
            s.interpret(&req(&[], br#"{"type": "a b", "id": "x"}"#)),
            Err(Unusable::InvalidEventType("a b".into()))
        );
        assert_eq!(
            s.interpret(&req(&[], br#"{"type": "t"}"#))
                .map_err(|e| e.code()),
            Err("missing_delivery_id")
        );
        // Integer ids are accepted as de-duplication keys; integer types are not types.
        let n = s
            .interpret(&req(&[], br#"{"type": "t", "id": 42}"#))
            .unwrap();
        assert_eq!(n.delivery_id.as_deref(), Some("42"));
        assert!(s.interpret(&req(&[], br#"{"type": 7, "id": 42}"#)).is_err());
    }

    #[test]
    fn interpret_headers_prefix_and_raw_body() {
        let s = build(&raw("github"));
        let headers = [("x-github-event", "push"), ("x-github-delivery", "d-1")];
        let got = s.interpret(&req(&headers, b"payload=%7B%7D")).unwrap();
        assert_eq!(got.event_type, "github.push");
        assert_eq!(got.delivery_id.as_deref(), Some("d-1"));
        assert_eq!(got.data, r#""payload=%7B%7D""#);
        let bin = s.interpret(&req(&headers, &[0xff, b'{'])).unwrap();
        assert_eq!(bin.data, "\"\u{fffd}{\"");
        assert_eq!(
            s.interpret(&req(&[("x-github-delivery", "d")], b"{}"))
                .map_err(|e| e.code()),
            Err("missing_event_type")
        );
        assert_eq!(
            s.interpret(&req(&[("x-github-event", "")], b"{}"))
                .map_err(|e| e.code()),
            Err("invalid_event_type")
        );
    }

    #[test]
    fn interpret_refuses_data_nested_too_deep() {
        let s = build(&raw("github"));
        let headers = [("x-github-event", "push"), ("x-github-delivery", "d-1")];
        let nested = |n: usize| "[".repeat(n) + &"]".repeat(n);
        // Within serde_json's limit, and far past it (where it gives up parsing).
        for n in [MAX_DATA_DEPTH + 1, 100_000] {
            let got = s.interpret(&req(&headers, nested(n).as_bytes()));
            assert_eq!(got, Err(Unusable::TooDeep), "{n} levels");
        }
        let ok = nested(MAX_DATA_DEPTH);
        let got = s.interpret(&req(&headers, ok.as_bytes())).map(|i| i.data);
        assert_eq!(got, Ok(ok));
    }

    #[test]
    fn dotted_json_paths() {
        let mut r = raw("hmac-sha256");
        r.signature_header = Some("X-Sig".into());
        r.event_type = Some("json:meta.kind".into());
        r.delivery_id = Some("header:X-Id".into());
        let s = build(&r);
        let got = s
            .interpret(&req(&[("X-Id", "1")], br#"{"meta": {"kind": "k"}}"#))
            .unwrap();
        assert_eq!(got.event_type, "k");
        assert_eq!(
            Field::parse("json:"),
            Err("\"\" is not a dotted JSON field path like type or data.object.id".into())
        );
        assert!(Field::parse("header:bad name").is_err());
        assert!(Field::parse("type").is_err());
    }

    #[test]
    fn rate_limit_admits_a_burst_then_refuses() {
        let mut r = raw("github");
        r.rate_limit = Some("2/s".into());
        let t0 = Instant::now();
        let set = Sources::new(&[Arc::new(build(&r))], t0);
        let e = set.get("s").unwrap();
        assert!(e.admit(t0).is_ok());
        assert!(e.admit(t0).is_ok());
        assert!(e.admit(t0).is_err());
        assert!(e.admit(t0 + Duration::from_secs(1)).is_ok());
        assert!(set.get("other").is_none());
    }
}

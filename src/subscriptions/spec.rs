//! A subscription's definition: the validated `Subscription` the daemon runs on, the raw
//! form it is read from (a config `[[subscriptions]]` table or an API body, one schema for
//! both), and the checks between them. Pure: no I/O, no clock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::valid_id;
use crate::units::HumanDuration;

/// Ordering guarantee of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    #[default]
    Unordered,
    Fifo,
}

/// An event type pattern: `*` matches any run of characters, everything else literally.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypePattern(String);

impl TypePattern {
    pub fn new(p: impl Into<String>) -> Self {
        Self(p.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Glob match with `*` as the only metacharacter.
    pub fn matches(&self, event_type: &str) -> bool {
        glob_match(self.0.as_bytes(), event_type.as_bytes())
    }
}

fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    // Iterative matcher with single backtrack point: linear in practice, no recursion.
    let (mut p, mut i) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if p < pat.len() && pat[p] == s[i] {
            p += 1;
            i += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// Retry policy settings of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetrySettings {
    pub max_attempts: u32,
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
}

/// Circuit breaker settings of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BreakerSettings {
    pub failure_threshold: u32,
    pub failure_rate: f64,
    pub min_requests: u32,
    pub window: Duration,
    pub cooldown: Duration,
    /// Probes let through at once while half-open.
    #[serde(default = "one")]
    pub half_open_probes: u32,
}

fn one() -> u32 {
    1
}

/// Where a subscription was defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubscriptionSource {
    Config,
    Api,
    /// Stands for a callback host's destination (see `callbacks`): not a subscription.
    Callback,
}

/// A validated subscription: where events of which types go and how. Its `Debug` output
/// hides the secrets, header values and the URL's password and query values (they may carry
/// credentials).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    pub id: String,
    pub url: String,
    pub event_types: Vec<TypePattern>,
    /// `whsec_…` / `whsk_…` secrets; all of them sign (rotation).
    pub secrets: Vec<String>,
    pub headers: BTreeMap<String, String>,
    pub timeout: Duration,
    /// Requests per second, `None` for unlimited.
    pub rate_limit: Option<f64>,
    /// Requests the rate limiter lets through at once after a quiet spell; `None`: one
    /// second's worth of the rate (at least 1).
    #[serde(default)]
    pub rate_limit_burst: Option<u32>,
    pub max_in_flight: u32,
    pub ordering: Ordering,
    pub retry: RetrySettings,
    pub breaker: BreakerSettings,
    /// HTTP statuses that end a delivery at once instead of retrying.
    pub final_status_codes: Vec<u16>,
    pub enabled: bool,
    pub source: SubscriptionSource,
    /// Optional condition on the event's data, checked at fan-out after the type patterns.
    #[serde(default)]
    pub filter: Option<crate::filter::Filter>,
    /// Paused by an operator: its deliveries are still made and kept, none is attempted.
    #[serde(default)]
    pub paused: bool,
    /// Set on what stands in for a stored definition that no longer validates (one written
    /// by an older version): why it cannot be used. It matches no event, and every delivery
    /// it still has goes `dead` with this reason when due, instead of waiting for ever.
    #[serde(default)]
    pub unusable: Option<String>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .field("url", &crate::redact::url_str(&self.url))
            .field("event_types", &self.event_types)
            .field("secrets", &format_args!("<{} hidden>", self.secrets.len()))
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("rate_limit", &self.rate_limit)
            .field("rate_limit_burst", &self.rate_limit_burst)
            .field("max_in_flight", &self.max_in_flight)
            .field("ordering", &self.ordering)
            .field("retry", &self.retry)
            .field("breaker", &self.breaker)
            .field("final_status_codes", &self.final_status_codes)
            .field("enabled", &self.enabled)
            .field("source", &self.source)
            .field("filter", &self.filter)
            .field("paused", &self.paused)
            .field("unusable", &self.unusable)
            .finish()
    }
}

impl Subscription {
    /// Whether an event of this type goes to this subscription.
    pub fn wants(&self, event_type: &str) -> bool {
        self.enabled
            && self.unusable.is_none()
            && self.event_types.iter().any(|p| p.matches(event_type))
    }

    /// Whether an event's data passes the payload filter (always, without one).
    pub fn wants_data(&self, data: &serde_json::Value) -> bool {
        self.filter.as_ref().is_none_or(|f| f.matches(data))
    }
}

/// The subscriptions in force: replaced whole on reload, read without locks held across awaits.
pub type SubscriptionSet = Arc<Vec<Arc<Subscription>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSubscription {
    pub id: String,
    pub url: String,
    #[serde(default = "default_event_types")]
    pub event_types: Vec<String>,
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub timeout: Option<HumanDuration>,
    pub rate_limit: Option<String>,
    pub rate_limit_burst: Option<u32>,
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    #[serde(default)]
    pub ordering: Ordering,
    #[serde(default)]
    pub retry: RawRetry,
    #[serde(default)]
    pub breaker: RawBreaker,
    #[serde(default)]
    pub final_status_codes: Vec<u16>,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Payload filter on the event's data (see `filter`): a TOML table or JSON object.
    #[serde(default)]
    pub filter: Option<serde_json::Value>,
}

fn default_event_types() -> Vec<String> {
    vec!["*".into()]
}

fn default_max_in_flight() -> u32 {
    8
}

fn yes() -> bool {
    true
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRetry {
    pub max_attempts: Option<u32>,
    pub initial: Option<HumanDuration>,
    pub max: Option<HumanDuration>,
    pub multiplier: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBreaker {
    pub failure_threshold: Option<u32>,
    pub failure_rate: Option<f64>,
    pub min_requests: Option<u32>,
    pub window: Option<HumanDuration>,
    pub cooldown: Option<HumanDuration>,
    pub half_open_probes: Option<u32>,
}

/// Delivery defaults a subscription inherits when it does not set its own.
#[derive(Debug, Clone, Copy)]
pub struct SubscriptionDefaults {
    pub timeout: Duration,
    pub max_attempts: u32,
}

/// Validates an API definition: a JSON object of the same schema as a config
/// `[[subscriptions]]` table, without its `secrets`, which are given apart (an API
/// subscription's secrets are stored apart, with their expiry). Errors read `field: problem`.
pub fn from_json(
    spec: &serde_json::Map<String, serde_json::Value>,
    secrets: &[String],
    defaults: &SubscriptionDefaults,
    source: SubscriptionSource,
) -> Result<Subscription, Vec<String>> {
    let mut obj = spec.clone();
    obj.insert("secrets".into(), serde_json::Value::from(secrets.to_vec()));
    let raw: RawSubscription = serde_path_to_error::deserialize(serde_json::Value::Object(obj))
        .map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            vec![if path == "." {
                inner.to_string()
            } else {
                format!("{path}: {inner}")
            }]
        })?;
    subscription_from_raw(&raw, defaults, source)
        .map_err(|es| es.into_iter().map(|(f, m)| format!("{f}: {m}")).collect())
}

/// What is wrong with a set of custom request headers (a subscription's or a callback's):
/// reserved names, names that are not tokens, values a header cannot hold.
pub fn header_problems(headers: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for name in headers.keys() {
        let lower = name.to_ascii_lowercase();
        if lower.starts_with("webhook-")
            || lower.starts_with("proxy-")
            || RESERVED_HEADERS.contains(&lower.as_str())
            || name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            out.push(format!("header {name:?} cannot be set"));
        }
    }
    for (name, value) in headers {
        if reqwest::header::HeaderValue::from_str(value).is_err() {
            out.push(format!(
                "the value of header {name:?} has characters a header cannot hold"
            ));
        }
    }
    out
}

/// Headers a subscription may not set: the request's own framing and routing (hop-by-hop
/// headers, `host`, `content-length`), and what the signer sets. `proxy-*` and `webhook-*`
/// are refused by prefix.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
    "te",
    "trailer",
    "upgrade",
    "keep-alive",
];

/// Parses a destination URL fully: `http` or `https`, a host, a valid port. What passes here
/// can be requested, so no delivery waits on a URL that can never be sent.
pub fn parse_destination(text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text)
        .map_err(|e| format!("{:?} is not a valid URL: {e}", crate::redact::url_str(text)))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{:?} is not an http:// or https:// URL",
            crate::redact::url_str(text)
        ));
    }
    // `http:///x` parses (as host `x`), but is surely a mistake.
    let written_host = text
        .split_once("://")
        .is_some_and(|(_, rest)| !rest.is_empty() && !rest.starts_with('/'));
    if !written_host || url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{:?} has no host", crate::redact::url_str(text)));
    }
    Ok(url)
}

/// Refuses a destination whose host is an address literal in a forbidden range (loopback,
/// private, link-local, metadata), unless private networks are allowed. Names can only be
/// judged once resolved: the address guard does that at every attempt.
pub fn refuse_forbidden_destination(text: &str, allow_private: bool) -> Result<(), String> {
    let url = parse_destination(text)?;
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => std::net::IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => std::net::IpAddr::V6(ip),
        _ => return Ok(()),
    };
    match crate::delivery::ssrf::forbidden_reason(ip) {
        Some(reason) if !allow_private => Err(format!(
            "{ip} is in a forbidden range ({reason}); set delivery.allow_private_networks = true to deliver there"
        )),
        _ => Ok(()),
    }
}

/// Validates one subscription (from the file or the API); errors are (field, message) pairs.
pub fn subscription_from_raw(
    s: &RawSubscription,
    defaults: &SubscriptionDefaults,
    source: SubscriptionSource,
) -> Result<Subscription, Vec<(String, String)>> {
    let mut errs: Vec<(String, String)> = Vec::new();
    let mut e = |field: &str, msg: String| errs.push((field.to_string(), msg));
    if !valid_id(&s.id) {
        e("id", "must be 1-64 characters of A-Z a-z 0-9 _ . -".into());
    }
    if let Err(m) = parse_destination(&s.url) {
        e("url", m);
    }
    if s.event_types.is_empty() {
        e("event_types", "needs at least one pattern".into());
    }
    for p in &s.event_types {
        if p.is_empty() || p.len() > 128 || p.chars().any(char::is_whitespace) {
            e("event_types", format!("invalid pattern {p:?}"));
        }
    }
    if s.secrets.is_empty() {
        e(
            "secrets",
            "needs at least one whsec_ or whsk_ secret".into(),
        );
    }
    // The same check the signer makes, so a secret that passes here can sign.
    for sec in &s.secrets {
        if let Err(err) = crate::signing::parse_secret(sec) {
            e("secrets", err.to_string());
        }
    }
    for m in header_problems(&s.headers) {
        e("headers", m);
    }
    let rate_limit = match s.rate_limit.as_deref() {
        None => None,
        Some(r) => match crate::ratelimit::parse_rate(r) {
            Ok(v) => Some(v),
            Err(m) => {
                e("rate_limit", m);
                None
            }
        },
    };
    match (s.rate_limit_burst, &s.rate_limit) {
        (Some(_), None) => e("rate_limit_burst", "needs a rate_limit".into()),
        (Some(b), Some(_)) if b == 0 || b > 100_000 => {
            e("rate_limit_burst", "must be between 1 and 100000".into());
        }
        _ => {}
    }
    if s.max_in_flight == 0 || s.max_in_flight > 1024 {
        e("max_in_flight", "must be between 1 and 1024".into());
    }
    let retry = retry_settings(&s.retry, defaults);
    if retry.max_attempts == 0 {
        e("retry.max_attempts", "must be at least 1".into());
    }
    if retry.initial > retry.max {
        e("retry.initial", "must not exceed retry.max".into());
    }
    if !(retry.multiplier.is_finite() && retry.multiplier >= 1.0) {
        e("retry.multiplier", "must be a number >= 1".into());
    }
    let breaker = breaker_settings(&s.breaker);
    if breaker.failure_threshold == 0 {
        e("breaker.failure_threshold", "must be at least 1".into());
    }
    if breaker.half_open_probes == 0 || breaker.half_open_probes > 1024 {
        e(
            "breaker.half_open_probes",
            "must be between 1 and 1024".into(),
        );
    }
    if !(breaker.failure_rate > 0.0 && breaker.failure_rate <= 1.0) {
        e("breaker.failure_rate", "must be in (0, 1]".into());
    }
    for code in &s.final_status_codes {
        if !(400..500).contains(code) || *code == 429 {
            e(
                "final_status_codes",
                format!("{code} cannot be final: only 4xx other than 429"),
            );
        }
    }
    let timeout = s.timeout.map_or(defaults.timeout, |d| d.0);
    if timeout.is_zero() {
        e("timeout", "must be more than zero".into());
    }
    let filter = match &s.filter {
        None => None,
        Some(v) => match crate::filter::Filter::parse(v, "filter") {
            Ok(f) => Some(f),
            Err(fe) => {
                e(&fe.path, fe.message);
                None
            }
        },
    };
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Subscription {
        id: s.id.clone(),
        url: s.url.clone(),
        event_types: s.event_types.iter().map(TypePattern::new).collect(),
        secrets: s.secrets.clone(),
        headers: s.headers.clone(),
        timeout,
        rate_limit,
        rate_limit_burst: s.rate_limit_burst,
        max_in_flight: s.max_in_flight,
        ordering: s.ordering,
        retry,
        breaker,
        final_status_codes: s.final_status_codes.clone(),
        enabled: s.enabled,
        source,
        filter,
        paused: false,
        unusable: None,
    })
}

/// A subscription's retry settings, the defaults filled in.
fn retry_settings(r: &RawRetry, defaults: &SubscriptionDefaults) -> RetrySettings {
    RetrySettings {
        max_attempts: r.max_attempts.unwrap_or(defaults.max_attempts),
        initial: r.initial.map_or(Duration::from_secs(5), |d| d.0),
        max: r.max.map_or(Duration::from_secs(3600), |d| d.0),
        multiplier: r.multiplier.unwrap_or(2.0),
    }
}

/// A subscription's circuit breaker settings, the defaults filled in.
fn breaker_settings(b: &RawBreaker) -> BreakerSettings {
    BreakerSettings {
        failure_threshold: b.failure_threshold.unwrap_or(5),
        failure_rate: b.failure_rate.unwrap_or(0.5),
        min_requests: b.min_requests.unwrap_or(20),
        window: b.window.map_or(Duration::from_secs(30), |d| d.0),
        cooldown: b.cooldown.map_or(Duration::from_secs(30), |d| d.0),
        half_open_probes: b.half_open_probes.unwrap_or(1),
    }
}

/// What stands in for a stored definition that no longer validates (written by an older
/// version, say): it keeps the id and URL as stored, matches no event, and carries `why`, so
/// its destination task sends the deliveries it still has to `dead` with the reason.
pub fn unusable_subscription(
    id: &str,
    url: &str,
    why: String,
    defaults: &SubscriptionDefaults,
    source: SubscriptionSource,
) -> Subscription {
    Subscription {
        id: id.to_string(),
        url: url.to_string(),
        event_types: Vec::new(),
        secrets: Vec::new(),
        headers: BTreeMap::new(),
        timeout: defaults.timeout,
        rate_limit: None,
        rate_limit_burst: None,
        max_in_flight: default_max_in_flight(),
        ordering: Ordering::default(),
        retry: retry_settings(&RawRetry::default(), defaults),
        breaker: breaker_settings(&RawBreaker::default()),
        final_status_codes: Vec::new(),
        enabled: true,
        source,
        filter: None,
        paused: false,
        unusable: Some(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns() {
        let cases = [
            ("*", "anything.at.all", true),
            ("*", "", true),
            ("order.*", "order.created", true),
            ("order.*", "order.", true),
            ("order.*", "order", false),
            ("order.*", "orders.created", false),
            ("invoice.paid", "invoice.paid", true),
            ("invoice.paid", "invoice.paid2", false),
            ("*.paid", "invoice.paid", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("**", "x", true),
        ];
        for (p, s, want) in cases {
            assert_eq!(TypePattern::new(p).matches(s), want, "{p} vs {s}");
        }
    }
}

//! Per-event callback URLs: a producer names where one event goes, beside the subscriptions
//! (`"callback": {"url", "headers"?, "secret"?}` on a publish). Off unless
//! `[delivery.callbacks] enabled = true`; optionally limited to an allow-list of hosts or URL
//! prefixes.
//!
//! A callback is a delivery like any other. Its deliveries belong to a destination named for
//! the callback's host (`callback:{host}:{port}`), which gets a destination task of its own on
//! first use: rate limit, in-flight limit, circuit breaker and retries hold per host. The
//! task reads the URL, headers and secret of each delivery from its event.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::model::Callback;
use crate::subscriptions::spec::{self, SubscriptionDefaults};
use crate::subscriptions::{Subscription, SubscriptionSource};

/// The prefix of a callback destination's id (subscription ids cannot hold `:`).
pub const PREFIX: &str = "callback:";

/// `[delivery.callbacks]`, validated. Read at start: a reload that changes it reports it as
/// needing a restart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallbackSettings {
    pub enabled: bool,
    /// Hosts (`hooks.example.com`) or URL prefixes (`https://hooks.example.com/in/`); empty:
    /// any host the address guard allows.
    pub allow: Vec<String>,
    /// Signs callbacks that name no secret of their own.
    pub secret: Option<String>,
    /// Per callback host.
    pub max_in_flight: u32,
    pub rate_limit: Option<f64>,
}

/// The longest host name a callback URL may have (DNS's limit).
const MAX_HOST: usize = 253;

/// A callback as the producer sent it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackRequest {
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub secret: Option<String>,
}

/// Checks a producer's callback: callbacks are on, the URL parses and is allowed (the
/// allow-list, and the address guard for a literal address), the headers and the secret are
/// usable, and something will sign it. Answers the callback to store and the id of the
/// destination its delivery belongs to; `Err` says why it is refused.
pub fn accept(
    req: CallbackRequest,
    settings: &CallbackSettings,
    allow_private: bool,
) -> Result<(Callback, Arc<str>), String> {
    if !settings.enabled {
        return Err(
            "callbacks are off on this server ([delivery.callbacks] enabled = false)".into(),
        );
    }
    let url = spec::parse_destination(&req.url)?;
    // The host names a destination (and its notifications between nodes): keep it to what
    // DNS allows.
    if url.host_str().is_some_and(|h| h.len() > MAX_HOST) {
        return Err(format!(
            "url: the host name is longer than {MAX_HOST} characters, the most DNS allows"
        ));
    }
    if !settings.allow.is_empty() && !settings.allow.iter().any(|a| allowed(a, &url)) {
        return Err(format!(
            "{} is not on the callback allow-list",
            crate::redact::url_str(&req.url)
        ));
    }
    spec::refuse_forbidden_destination(&req.url, allow_private)?;
    if let Some(p) = spec::header_problems(&req.headers).into_iter().next() {
        return Err(format!("headers: {p}"));
    }
    match &req.secret {
        Some(s) => {
            crate::signing::parse_secret(s).map_err(|e| format!("secret: {e}"))?;
        }
        None if settings.secret.is_none() => {
            return Err(
                "secret: give one (whsec_ or whsk_); this server has no default callback secret"
                    .into(),
            );
        }
        None => {}
    }
    let id = destination_id(&url);
    Ok((
        Callback {
            url: req.url,
            headers: req.headers,
            secret: req.secret,
        },
        id,
    ))
}

/// An allow-list entry: a URL prefix (with `://`) matches the URL's text; a host matches the
/// URL's host exactly (case-insensitively).
fn allowed(entry: &str, url: &reqwest::Url) -> bool {
    if entry.contains("://") {
        url.as_str().starts_with(entry)
    } else {
        url.host_str()
            .is_some_and(|h| h.eq_ignore_ascii_case(entry.trim_end_matches('.')))
    }
}

/// The destination a callback URL's deliveries belong to: one per scheme, host and port.
pub fn destination_id(url: &reqwest::Url) -> Arc<str> {
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let port = url.port_or_known_default().unwrap_or(0);
    Arc::from(format!("{PREFIX}{}://{host}:{port}", url.scheme()))
}

/// Whether a destination id names a callback host.
pub fn is_callback(id: &str) -> bool {
    id.starts_with(PREFIX)
}

/// What stands for a callback host's destination task: its URL is the host's root (checked
/// by the address guard like a subscription's), it signs with the default secret, retries
/// with the default policy, and matches no event.
pub fn destination(
    id: &str,
    settings: &CallbackSettings,
    defaults: &SubscriptionDefaults,
) -> Subscription {
    let root = id.strip_prefix(PREFIX).unwrap_or(id);
    let mut sub = spec::unusable_subscription(
        id,
        &format!("{root}/"),
        String::new(),
        defaults,
        SubscriptionSource::Callback,
    );
    sub.unusable = None;
    sub.secrets = settings.secret.iter().cloned().collect();
    sub.max_in_flight = settings.max_in_flight.max(1);
    sub.rate_limit = settings.rate_limit;
    sub.timeout = defaults.timeout;
    sub.retry.max_attempts = defaults.max_attempts;
    sub
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn on(allow: &[&str]) -> CallbackSettings {
        CallbackSettings {
            enabled: true,
            allow: allow.iter().map(|s| s.to_string()).collect(),
            secret: Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
            max_in_flight: 8,
            rate_limit: None,
        }
    }

    fn req(url: &str) -> CallbackRequest {
        CallbackRequest {
            url: url.into(),
            headers: BTreeMap::new(),
            secret: None,
        }
    }

    #[test]
    fn refusals_name_why() {
        let off = CallbackSettings::default();
        let e = accept(req("https://a.example/h"), &off, false).unwrap_err();
        assert!(e.contains("off"), "{e}");
        let s = on(&["hooks.example.com", "https://other.example/in/"]);
        for (url, why) in [
            ("https://evil.example/h", "allow-list"),
            ("https://other.example/out/x", "allow-list"),
            ("ftp://hooks.example.com/", "http"),
            ("http://[", "valid URL"),
        ] {
            let e = accept(req(url), &s, false).unwrap_err();
            assert!(e.contains(why), "{url}: {e}");
        }
        let e = accept(req("http://127.0.0.1:9/h"), &on(&[]), false).unwrap_err();
        assert!(e.contains("forbidden"), "{e}");
        assert!(accept(req("http://127.0.0.1:9/h"), &on(&[]), true).is_ok());
        let mut r = req("https://hooks.example.com/h");
        r.headers.insert("Host".into(), "x".into());
        assert!(accept(r, &s, false).unwrap_err().contains("headers"));
        let mut r = req("https://hooks.example.com/h");
        r.secret = Some("whsec_!!".into());
        assert!(accept(r, &s, false).unwrap_err().contains("secret"));
        let mut none = on(&[]);
        none.secret = None;
        let e = accept(req("https://hooks.example.com/h"), &none, false).unwrap_err();
        assert!(e.contains("no default"), "{e}");
        // A host longer than DNS allows (labels of 63, 254 characters in all) is refused;
        // one of 253 is taken.
        let label = "a".repeat(63);
        let long = format!(
            "https://{label}.{label}.{label}.{}.example/h",
            "b".repeat(54)
        );
        let e = accept(req(&long), &on(&[]), false).unwrap_err();
        assert!(e.contains("longer than 253"), "{e}");
        let most = format!(
            "https://{label}.{label}.{label}.{}.example/h",
            "b".repeat(53)
        );
        assert!(accept(req(&most), &on(&[]), false).is_ok(), "{most}");
    }

    #[test]
    fn accepted_callbacks_share_a_destination_per_host() {
        let s = on(&["HOOKS.example.com", "https://other.example/in/"]);
        let (cb, id) = match accept(req("https://hooks.example.com/a?x=1"), &s, false) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(cb.url, "https://hooks.example.com/a?x=1");
        assert_eq!(&*id, "callback:https://hooks.example.com:443");
        let Ok((_, id2)) = accept(req("https://Hooks.Example.com:443/b"), &s, false) else {
            panic!("refused");
        };
        assert_eq!(id, id2);
        assert!(accept(req("https://other.example/in/x"), &s, false).is_ok());
        assert!(is_callback(&id) && !is_callback("crm"));
        let sub = destination(
            &id,
            &s,
            &SubscriptionDefaults {
                timeout: Duration::from_secs(30),
                max_attempts: 10,
            },
        );
        assert_eq!(sub.url, "https://hooks.example.com:443/");
        assert_eq!(sub.source, SubscriptionSource::Callback);
        assert!(sub.unusable.is_none() && sub.event_types.is_empty());
        assert_eq!(sub.secrets.len(), 1);
    }
}

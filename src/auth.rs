//! Who may call the API: bearer tokens, and producers that sign their requests with an HMAC
//! key (`[auth] keys`), each with `publish` and `admin` scopes. Every comparison is constant
//! time. The API maps a refusal to 401/403; a config reload swaps the credentials in force.
//!
//! A signed request carries `dispatchd-key-id`, `dispatchd-timestamp` (Unix seconds) and
//! `dispatchd-signature: v1=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`. It is refused
//! when its timestamp is further than the tolerance from this clock, and when its signature
//! was already accepted within that window (a replay): signatures are remembered in memory
//! until their timestamp leaves the window, so a replay after a restart is caught only by the
//! event's own idempotency (its id, `Idempotency-Key`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use ring::hmac;

use crate::config::{ProducerKey, Scope, Token};
use crate::swap::Swap;

/// The headers of a signed request.
pub const KEY_ID_HEADER: &str = "dispatchd-key-id";
pub const TIMESTAMP_HEADER: &str = "dispatchd-timestamp";
pub const SIGNATURE_HEADER: &str = "dispatchd-signature";

/// Signatures remembered against replays at most; past this (after dropping those whose
/// window ended) a signed request is refused rather than risk accepting a replay.
const MAX_REMEMBERED: usize = 500_000;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer` header and no signature.
    Missing,
    /// A token that is not (or no longer) configured.
    Invalid,
    /// A valid token or key without the scope the route needs.
    Lacks(Scope),
    /// A signed request that does not verify: unknown key, malformed headers, or a
    /// signature that does not match the body.
    BadSignature,
    /// A signed request whose timestamp is outside the tolerance.
    Stale,
    /// A signature already accepted within the tolerance window.
    Replayed,
    /// Too many signatures to remember within the window: refused, not risked.
    Busy,
}

/// The signature headers of a request, as sent.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    pub key_id: &'a [u8],
    pub timestamp: &'a [u8],
    pub signature: &'a [u8],
}

/// The configured credentials. Tokens are kept only as HMAC tags under a per-process random
/// key: checking a presented token is one constant-time tag comparison per configured token,
/// whatever the lengths involved. A reload swaps them whole: a removed token or key is
/// refused from the next request on.
pub struct Auth {
    key: hmac::Key,
    creds: Swap<Creds>,
    seen: Mutex<Seen>,
}

struct Creds {
    tokens: Vec<(hmac::Tag, Vec<Scope>)>,
    keys: HashMap<String, (hmac::Key, Vec<Scope>)>,
    tolerance: Duration,
}

/// Signatures accepted within the tolerance window, with when each may be forgotten.
#[derive(Default)]
struct Seen {
    set: HashMap<[u8; 32], i64>,
    order: VecDeque<(i64, [u8; 32])>,
}

impl Seen {
    fn forget_until(&mut self, now: i64) {
        while let Some(&(until, sig)) = self.order.front() {
            if until >= now {
                break;
            }
            self.order.pop_front();
            if self.set.get(&sig) == Some(&until) {
                self.set.remove(&sig);
            }
        }
    }
}

impl Auth {
    pub fn new(
        tokens: &[Token],
        keys: &[ProducerKey],
        tolerance: Duration,
    ) -> Result<Self, ring::error::Unspecified> {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)?;
        let creds = Swap::new(creds(&key, tokens, keys, tolerance));
        Ok(Self {
            key,
            creds,
            seen: Mutex::default(),
        })
    }

    /// Puts a new set of tokens and keys in force (config reload).
    pub fn replace(&self, tokens: &[Token], keys: &[ProducerKey], tolerance: Duration) {
        self.creds.set(creds(&self.key, tokens, keys, tolerance));
    }

    /// With no tokens and no keys configured the API is open.
    pub fn is_open(&self) -> bool {
        let c = self.creds.get();
        c.tokens.is_empty() && c.keys.is_empty()
    }

    /// Checks an `Authorization` header value for a scope: 401 without a valid token, 403
    /// with a valid token that lacks the scope. `admin` includes `publish`.
    pub fn check(&self, header: Option<&[u8]>, need: Scope) -> Result<(), Denied> {
        let creds = self.creds.get();
        if creds.tokens.is_empty() && creds.keys.is_empty() {
            return Ok(());
        }
        let Some(presented) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return Err(Denied::Missing);
        };
        let mut scopes: Option<&[Scope]> = None;
        for (tag, s) in &creds.tokens {
            if hmac::verify(&self.key, presented, tag.as_ref()).is_ok() {
                scopes = Some(s);
            }
        }
        match scopes {
            None => Err(Denied::Invalid),
            Some(s) => allowed(s, need),
        }
    }

    /// Verifies a signed request: the key exists, the timestamp is within the tolerance of
    /// `now` (Unix seconds), one `v1=` signature matches `"{timestamp}.{body}"`, and that
    /// signature was not accepted before within the window. Answers the key's scopes (with
    /// no credentials configured at all the API is open: every scope). An accepted signature
    /// is remembered, so the same request sent again is refused.
    pub fn verify_signed(
        &self,
        signed: Signed<'_>,
        body: &[u8],
        now: i64,
    ) -> Result<Vec<Scope>, Denied> {
        let creds = self.creds.get();
        if creds.tokens.is_empty() && creds.keys.is_empty() {
            return Ok(vec![Scope::Admin]);
        }
        let Some((key, scopes)) = std::str::from_utf8(signed.key_id)
            .ok()
            .and_then(|id| creds.keys.get(id))
        else {
            return Err(Denied::BadSignature);
        };
        let ts = parse_timestamp(signed.timestamp).ok_or(Denied::BadSignature)?;
        let tolerance = i64::try_from(creds.tolerance.as_secs()).unwrap_or(i64::MAX);
        if now.abs_diff(ts) > tolerance.unsigned_abs() {
            return Err(Denied::Stale);
        }
        let mut message = Vec::with_capacity(signed.timestamp.len() + 1 + body.len());
        message.extend_from_slice(signed.timestamp);
        message.push(b'.');
        message.extend_from_slice(body);
        let matched = signatures(signed.signature)
            .find(|tag| hmac::verify(key, &message, tag).is_ok())
            .ok_or(Denied::BadSignature)?;
        self.remember(matched, ts.saturating_add(tolerance), now)?;
        Ok(scopes.clone())
    }

    fn remember(&self, sig: [u8; 32], until: i64, now: i64) -> Result<(), Denied> {
        let mut seen = match self.seen.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        seen.forget_until(now);
        if seen.set.contains_key(&sig) {
            return Err(Denied::Replayed);
        }
        if seen.set.len() >= MAX_REMEMBERED {
            return Err(Denied::Busy);
        }
        seen.set.insert(sig, until);
        seen.order.push_back((until, sig));
        Ok(())
    }
}

/// Whether these scopes grant `need` (`admin` includes `publish`).
pub fn allowed(scopes: &[Scope], need: Scope) -> Result<(), Denied> {
    if scopes.contains(&Scope::Admin) || scopes.contains(&need) {
        Ok(())
    } else {
        Err(Denied::Lacks(need))
    }
}

/// Unix seconds: ASCII digits only, at most 12 of them.
fn parse_timestamp(b: &[u8]) -> Option<i64> {
    if b.is_empty() || b.len() > 12 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// The `v1=<hex>` entries of a signature header (space or comma separated), decoded.
fn signatures(header: &[u8]) -> impl Iterator<Item = [u8; 32]> + '_ {
    header
        .split(|&b| b == b' ' || b == b',')
        .filter_map(|part| part.strip_prefix(b"v1="))
        .filter_map(|hex| {
            let mut out = [0u8; 32];
            if hex.len() != 64 {
                return None;
            }
            for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
                let hi = (pair[0] as char).to_digit(16)?;
                let lo = (pair[1] as char).to_digit(16)?;
                *o = u8::try_from(hi * 16 + lo).ok()?;
            }
            Some(out)
        })
}

fn creds(key: &hmac::Key, tokens: &[Token], keys: &[ProducerKey], tolerance: Duration) -> Creds {
    Creds {
        tokens: tokens
            .iter()
            .map(|t| (hmac::sign(key, t.token.as_bytes()), t.scopes.clone()))
            .collect(),
        keys: keys
            .iter()
            .map(|k| {
                let hk = hmac::Key::new(hmac::HMAC_SHA256, k.secret.as_bytes());
                (k.id.clone(), (hk, k.scopes.clone()))
            })
            .collect(),
        tolerance,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        let tokens = vec![
            Token {
                token: "publish-token-0123456789".into(),
                scopes: vec![Scope::Publish],
            },
            Token {
                token: "admin-token-0123456789ab".into(),
                scopes: vec![Scope::Admin],
            },
        ];
        match Auth::new(&tokens, &[], Duration::from_secs(300)) {
            Ok(a) => a,
            Err(_) => panic!("rng"),
        }
    }

    #[test]
    fn scopes() {
        let a = auth();
        let p = Some(&b"Bearer publish-token-0123456789"[..]);
        let ad = Some(&b"Bearer admin-token-0123456789ab"[..]);
        assert!(a.check(p, Scope::Publish).is_ok());
        assert_eq!(a.check(p, Scope::Admin), Err(Denied::Lacks(Scope::Admin)));
        assert!(a.check(ad, Scope::Admin).is_ok());
        assert!(a.check(ad, Scope::Publish).is_ok());
        let bad = Some(&b"Bearer publish-token-012345678"[..]);
        assert_eq!(a.check(bad, Scope::Publish), Err(Denied::Invalid));
        assert_eq!(a.check(None, Scope::Publish), Err(Denied::Missing));
        let basic = Some(&b"Basic publish-token-0123456789"[..]);
        assert_eq!(a.check(basic, Scope::Publish), Err(Denied::Missing));
    }

    #[test]
    fn open_without_tokens() {
        let a = match Auth::new(&[], &[], Duration::from_secs(300)) {
            Ok(a) => a,
            Err(_) => panic!("rng"),
        };
        assert!(a.check(None, Scope::Admin).is_ok());
    }

    #[test]
    fn replaced_tokens_take_effect_at_once() {
        let a = auth();
        let p = Some(&b"Bearer publish-token-0123456789"[..]);
        let new = Some(&b"Bearer another-token-0123456789"[..]);
        a.replace(
            &[Token {
                token: "another-token-0123456789".into(),
                scopes: vec![Scope::Publish],
            }],
            &[],
            Duration::from_secs(300),
        );
        assert_eq!(a.check(p, Scope::Publish), Err(Denied::Invalid));
        assert!(a.check(new, Scope::Publish).is_ok());
        a.replace(&[], &[], Duration::from_secs(300));
        assert!(a.check(None, Scope::Admin).is_ok(), "no tokens: open");
    }

    fn signer() -> (Auth, &'static str) {
        let secret = "0123456789abcdef0123456789abcdef";
        let keys = [ProducerKey {
            id: "billing".into(),
            secret: secret.into(),
            scopes: vec![Scope::Publish],
        }];
        match Auth::new(&[], &keys, Duration::from_secs(300)) {
            Ok(a) => (a, secret),
            Err(_) => panic!("rng"),
        }
    }

    fn sign(secret: &str, ts: &str, body: &[u8]) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
        let mut msg = format!("{ts}.").into_bytes();
        msg.extend_from_slice(body);
        let tag = hmac::sign(&key, &msg);
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("v1={hex}")
    }

    /// A signed request verifies once, with its key's scopes; the same signature again is a
    /// replay; a changed body, another key id, a stale or future timestamp and a malformed
    /// header are refused.
    #[test]
    fn signed_requests() {
        let (a, secret) = signer();
        let now = 1_700_000_000;
        let ts = now.to_string();
        let body = br#"{"type":"a","data":{}}"#;
        let sig = sign(secret, &ts, body);
        let req = |id: &'static str, ts: &str, sig: &str, body: &[u8], _need: Scope| {
            let signed = Signed {
                key_id: id.as_bytes(),
                timestamp: ts.as_bytes(),
                signature: sig.as_bytes(),
            };
            a.verify_signed(signed, body, now).map(|_| ())
        };
        let first = Signed {
            key_id: b"billing",
            timestamp: ts.as_bytes(),
            signature: sig.as_bytes(),
        };
        let scopes = a.verify_signed(first, body, now);
        assert_eq!(scopes, Ok(vec![Scope::Publish]));
        assert_eq!(
            allowed(&[Scope::Publish], Scope::Admin),
            Err(Denied::Lacks(Scope::Admin))
        );
        assert_eq!(
            req("billing", &ts, &sig, body, Scope::Publish),
            Err(Denied::Replayed)
        );
        let other = br#"{"type":"b","data":{}}"#;
        assert_eq!(
            req("billing", &ts, &sig, other, Scope::Publish),
            Err(Denied::BadSignature)
        );
        assert_eq!(
            req("nobody", &ts, &sig, body, Scope::Publish),
            Err(Denied::BadSignature)
        );
        for t in [now - 301, now + 301] {
            let t = t.to_string();
            let s = sign(secret, &t, body);
            assert_eq!(
                req("billing", &t, &s, body, Scope::Publish),
                Err(Denied::Stale)
            );
        }
        let edge = (now - 300).to_string();
        let s = sign(secret, &edge, body);
        assert_eq!(req("billing", &edge, &s, body, Scope::Publish), Ok(()));
        for bad in ["", "v1=zz", "v2=00", &sig[..sig.len() - 1]] {
            let fresh = (now - 1).to_string();
            assert_eq!(
                req("billing", &fresh, bad, body, Scope::Publish),
                Err(Denied::BadSignature),
                "{bad:?}"
            );
        }
        assert_eq!(
            req("billing", "17e8", &sig, body, Scope::Publish),
            Err(Denied::BadSignature)
        );
        // Among several signatures one that matches is enough.
        let t = (now - 2).to_string();
        let both = format!("v1={} {}", "0".repeat(64), sign(secret, &t, body));
        assert_eq!(req("billing", &t, &both, body, Scope::Publish), Ok(()));
        // A bearer token is no way in when only keys are configured.
        assert_eq!(
            a.check(
                Some(&b"Bearer 0123456789abcdef0123456789abcdef"[..]),
                Scope::Publish
            ),
            Err(Denied::Invalid)
        );
        assert_eq!(a.check(None, Scope::Publish), Err(Denied::Missing));
    }

    /// Signatures are forgotten once their timestamp leaves the window, not before.
    #[test]
    fn replay_memory_ends_with_the_window() {
        let (a, secret) = signer();
        let ts = 1_700_000_000i64;
        let t = ts.to_string();
        let body = b"{}";
        let sig = sign(secret, &t, body);
        let signed = Signed {
            key_id: b"billing",
            timestamp: t.as_bytes(),
            signature: sig.as_bytes(),
        };
        assert_eq!(a.verify_signed(signed, body, ts).map(|_| ()), Ok(()));
        assert_eq!(
            a.verify_signed(signed, body, ts + 300).map(|_| ()),
            Err(Denied::Replayed)
        );
        assert_eq!(
            a.verify_signed(signed, body, ts + 301).map(|_| ()),
            Err(Denied::Stale)
        );
        let guard = a
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        assert_eq!(guard.set.len(), 1);
        drop(guard);
        let later = (ts + 400).to_string();
        let s2 = sign(secret, &later, body);
        let signed2 = Signed {
            key_id: b"billing",
            timestamp: later.as_bytes(),
            signature: s2.as_bytes(),
        };
        assert_eq!(a.verify_signed(signed2, body, ts + 400).map(|_| ()), Ok(()));
        let guard = a
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        assert_eq!(guard.set.len(), 1, "the first signature was forgotten");
    }
}

//! Inbound webhook signature verification for Standard Webhooks, GitHub, Stripe and generic HMAC-SHA256 senders.
//!
//! Invariants:
//! - Pure: no I/O and no clock; the current time arrives as `now_unix`.
//! - Header parsers are total: they return `Err(Rejection)` on any input and never panic (fuzz targets call them).
//! - Every configured secret is tried (rotation); any secret matching any presented signature is success.
//! - Tags are compared in constant time; empty secrets are skipped, because an empty HMAC key is public.
//! - The signature is checked before the timestamp tolerance, so `stale_timestamp` is only ever reported for
//!   requests that really were signed with one of our secrets (a replay or a skewed clock, not a forgery).

use std::time::Duration;

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use ring::hmac;

use crate::signing::{STANDARD_ID_HEADER, STANDARD_SIGNATURE_HEADER, STANDARD_TIMESTAMP_HEADER};

/// GitHub signature header.
pub const GITHUB_SIGNATURE_HEADER: &str = "X-Hub-Signature-256";
/// GitHub delivery id header (optional; reported in [`Verified::delivery_id`]).
pub const GITHUB_DELIVERY_HEADER: &str = "X-GitHub-Delivery";
/// Stripe signature header.
pub const STRIPE_SIGNATURE_HEADER: &str = "Stripe-Signature";
/// Prefix of Standard Webhooks secrets.
pub const STANDARD_SECRET_PREFIX: &str = "whsec_";

/// Most signature entries examined in one header; bounds work on hostile input.
pub const MAX_SIGNATURES: usize = 32;
/// Longest accepted decimal timestamp (i64::MAX has 19 digits).
const MAX_TIMESTAMP_DIGITS: usize = 19;
/// HMAC-SHA256 output length.
const TAG_LEN: usize = 32;

/// Base64 (standard alphabet) decoder that accepts input with or without `=` padding.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// How a generic HMAC signature is encoded in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Lower- or upper-case hexadecimal.
    Hex,
    /// Standard-alphabet base64, padding optional.
    Base64,
}

/// Configuration of a generic HMAC-SHA256 sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HmacSpec {
    /// Header carrying the signature.
    pub header: String,
    /// Encoding of the signature bytes.
    pub encoding: Encoding,
    /// Required prefix before the encoded signature, e.g. `sha256=` (matched ASCII case-insensitively).
    pub prefix: Option<String>,
    /// When set, this header carries a unix timestamp, the signed content is `"{timestamp}.{body}"`, and tolerance applies.
    pub timestamp_header: Option<String>,
}

/// A provider signature scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheme {
    /// Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
    StandardWebhooks,
    /// GitHub (`X-Hub-Signature-256: sha256=<hex>` over the raw body).
    Github,
    /// Stripe (`Stripe-Signature: t=<unix>,v1=<hex>...` over `"{t}.{body}"`).
    Stripe,
    /// Any sender using HMAC-SHA256 as described by the spec.
    HmacSha256(HmacSpec),
}

/// The parts of an inbound HTTP request that verification needs.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Header name/value pairs; names are matched ASCII case-insensitively and the first match wins.
    pub headers: &'a [(&'a str, &'a str)],
    /// The raw, unmodified request body.
    pub body: &'a [u8],
}

impl<'a> Request<'a> {
    /// Returns the first header value whose name matches `name` case-insensitively.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The signed timestamp, for schemes that sign one.
    pub timestamp: Option<i64>,
    /// The sender's delivery id (`webhook-id` or `X-GitHub-Delivery`), usable for de-duplication.
    pub delivery_id: Option<String>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// A required header is absent.
    #[error("missing header {0}")]
    MissingHeader(String),
    /// A header is present but cannot be parsed.
    #[error("malformed header: {0}")]
    MalformedHeader(String),
    /// No presented signature matches any configured secret.
    #[error("signature does not match")]
    BadSignature,
    /// The signature is valid but the timestamp is outside the tolerance window (past or future).
    #[error("timestamp outside tolerance")]
    StaleTimestamp,
}

impl Rejection {
    /// Stable machine-readable code for metrics and API responses.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::MissingHeader(_) => "missing_header",
            Rejection::MalformedHeader(_) => "malformed_header",
            Rejection::BadSignature => "bad_signature",
            Rejection::StaleTimestamp => "stale_timestamp",
        }
    }
}

/// Errors from [`decode_secret`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// The secret (after any `whsec_` prefix) is empty.
    #[error("secret is empty")]
    Empty,
    /// A Standard Webhooks secret is not valid base64.
    #[error("standard-webhooks secret is not valid base64: {0}")]
    BadBase64(String),
}

/// Turns a configured secret string into HMAC key bytes for `scheme`.
///
/// Standard Webhooks secrets are `whsec_<base64>` (prefix optional, surrounding whitespace ignored) and the key
/// is the decoded bytes; every other scheme uses the string's bytes exactly as given.
pub fn decode_secret(scheme: &Scheme, s: &str) -> Result<Vec<u8>, SecretError> {
    let bytes = match scheme {
        Scheme::StandardWebhooks => {
            let t = s.trim();
            let b64 = t.strip_prefix(STANDARD_SECRET_PREFIX).unwrap_or(t);
            if b64.is_empty() {
                return Err(SecretError::Empty);
            }
            // The decoder's message names a byte offset, never the secret itself.
            B64.decode(b64)
                .map_err(|e| SecretError::BadBase64(e.to_string()))?
        }
        Scheme::Github | Scheme::Stripe | Scheme::HmacSha256(_) => s.as_bytes().to_vec(),
    };
    if bytes.is_empty() {
        return Err(SecretError::Empty);
    }
    Ok(bytes)
}

/// A parsed `Stripe-Signature` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeHeader<'a> {
    /// The `t=` value as a number.
    pub timestamp: i64,
    /// The `t=` value exactly as sent; this text, not a re-rendering, is what Stripe signs.
    pub timestamp_text: &'a str,
    /// Decoded `v1=` signatures (undecodable ones are dropped).
    pub v1: Vec<Vec<u8>>,
}

/// Parses a unix timestamp in seconds: 1 to 19 ASCII digits, no sign, no whitespace.
pub fn parse_timestamp(s: &str) -> Result<i64, Rejection> {
    // `i64::from_str` alone would accept a leading `+`; senders never emit one, so it is refused as malformed.
    if s.is_empty() || s.len() > MAX_TIMESTAMP_DIGITS || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Rejection::MalformedHeader(
            "timestamp is not a non-negative decimal integer".into(),
        ));
    }
    s.parse::<i64>()
        .map_err(|_| Rejection::MalformedHeader("timestamp out of range".into()))
}

/// Parses a `webhook-signature` value into its decoded `v1` signatures.
///
/// Entries are whitespace-separated `version,base64`. Other versions (e.g. asymmetric `v1a`) and undecodable
/// entries are skipped as the spec asks; an error is returned only when no usable `v1` entry remains.
pub fn parse_standard_signatures(s: &str) -> Result<Vec<Vec<u8>>, Rejection> {
    let mut out = Vec::new();
    for (i, entry) in s.split_ascii_whitespace().enumerate() {
        if i >= MAX_SIGNATURES {
            return Err(Rejection::MalformedHeader(format!(
                "{STANDARD_SIGNATURE_HEADER} has more than {MAX_SIGNATURES} entries"
            )));
        }
        // Empty signatures can never match, so they count as unusable.
        if let Some(("v1", b64)) = entry.split_once(',') {
            match B64.decode(b64) {
                Ok(sig) if !sig.is_empty() => out.push(sig),
                _ => {}
            }
        }
    }
    if out.is_empty() {
        return Err(Rejection::MalformedHeader(format!(
            "{STANDARD_SIGNATURE_HEADER} has no usable v1 entries"
        )));
    }
    Ok(out)
}

/// Parses an `X-Hub-Signature-256` value (`sha256=<64 hex digits>`) into the 32-byte tag.
pub fn parse_github_header(s: &str) -> Result<[u8; TAG_LEN], Rejection> {
    let malformed = || {
        Rejection::MalformedHeader(format!(
            "{GITHUB_SIGNATURE_HEADER} must be sha256= followed by 64 hex digits"
        ))
    };
    let hex = strip_prefix_ignore_case(s, "sha256=").ok_or_else(malformed)?;
    let bytes = decode_hex(hex).ok_or_else(malformed)?;
    bytes.try_into().map_err(|_| malformed())
}

/// Parses a `Stripe-Signature` value: comma-separated `key=value` items with exactly one `t` and at least one `v1`.
///
/// Unknown keys (e.g. `v0`) and items without `=` are ignored, as Stripe's own libraries do; `v1` values that are
/// not hex are dropped. A repeated `t` is refused because it would be ambiguous which one was signed.
pub fn parse_stripe_header(s: &str) -> Result<StripeHeader<'_>, Rejection> {
    let mut timestamp: Option<(i64, &str)> = None;
    let mut v1 = Vec::new();
    for (i, item) in s.split(',').enumerate() {
        if i >= MAX_SIGNATURES {
            return Err(Rejection::MalformedHeader(format!(
                "{STRIPE_SIGNATURE_HEADER} has more than {MAX_SIGNATURES} items"
            )));
        }
        let Some((key, value)) = item
            .trim_matches(|c: char| c.is_ascii_whitespace())
            .split_once('=')
        else {
            continue;
        };
        match key {
            "t" => {
                if timestamp.is_some() {
                    return Err(Rejection::MalformedHeader(format!(
                        "{STRIPE_SIGNATURE_HEADER} has more than one t="
                    )));
                }
                timestamp = Some((parse_timestamp(value)?, value));
            }
            "v1" => {
                if let Some(sig) = decode_hex(value) {
                    v1.push(sig);
                }
            }
            _ => {}
        }
    }
    let Some((timestamp, timestamp_text)) = timestamp else {
        return Err(Rejection::MalformedHeader(format!(
            "{STRIPE_SIGNATURE_HEADER} has no t="
        )));
    };
    if v1.is_empty() {
        return Err(Rejection::MalformedHeader(format!(
            "{STRIPE_SIGNATURE_HEADER} has no usable v1="
        )));
    }
    Ok(StripeHeader {
        timestamp,
        timestamp_text,
        v1,
    })
}

/// Parses a generic HMAC signature header according to `spec` (prefix, then hex or base64).
pub fn parse_hmac_header(spec: &HmacSpec, s: &str) -> Result<Vec<u8>, Rejection> {
    let encoded = match &spec.prefix {
        Some(prefix) => strip_prefix_ignore_case(s, prefix).ok_or_else(|| {
            Rejection::MalformedHeader(format!("{} lacks prefix {prefix}", spec.header))
        })?,
        None => s,
    };
    let decoded = match spec.encoding {
        Encoding::Hex => decode_hex(encoded),
        Encoding::Base64 => B64.decode(encoded).ok(),
    };
    match decoded {
        Some(sig) if !sig.is_empty() => Ok(sig),
        _ => Err(Rejection::MalformedHeader(format!(
            "{} is not valid {}",
            spec.header,
            match spec.encoding {
                Encoding::Hex => "hex",
                Encoding::Base64 => "base64",
            }
        ))),
    }
}

/// Verifies `req` under `scheme` against any of `secrets`, with `tolerance` around `now_unix` for signed timestamps.
pub fn verify(
    scheme: &Scheme,
    secrets: &[Vec<u8>],
    tolerance: Duration,
    now_unix: i64,
    req: &Request<'_>,
) -> Result<Verified, Rejection> {
    match scheme {
        Scheme::StandardWebhooks => {
            let id = required(req, STANDARD_ID_HEADER)?;
            let ts_text = required(req, STANDARD_TIMESTAMP_HEADER)?;
            let sig_text = required(req, STANDARD_SIGNATURE_HEADER)?;
            if id.is_empty() {
                return Err(Rejection::MalformedHeader(format!(
                    "{STANDARD_ID_HEADER} is empty"
                )));
            }
            let ts = parse_timestamp(ts_text)?;
            let sigs = parse_standard_signatures(sig_text)?;
            // The timestamp is signed as the exact header text, so a sender's formatting is honoured.
            let content = [id.as_bytes(), b".", ts_text.as_bytes(), b".", req.body];
            check_any(secrets, &content, &sigs)?;
            check_tolerance(ts, now_unix, tolerance)?;
            Ok(Verified {
                timestamp: Some(ts),
                delivery_id: Some(id.to_string()),
            })
        }
        Scheme::Github => {
            let tag = parse_github_header(required(req, GITHUB_SIGNATURE_HEADER)?)?;
            // GitHub signs only the body: there is no timestamp, so no replay window can be enforced here.
            check_any(secrets, &[req.body], &[tag])?;
            Ok(Verified {
                timestamp: None,
                delivery_id: req.header(GITHUB_DELIVERY_HEADER).map(str::to_string),
            })
        }
        Scheme::Stripe => {
            let header = parse_stripe_header(required(req, STRIPE_SIGNATURE_HEADER)?)?;
            let content = [header.timestamp_text.as_bytes(), b".", req.body];
            check_any(secrets, &content, &header.v1)?;
            check_tolerance(header.timestamp, now_unix, tolerance)?;
            Ok(Verified {
                timestamp: Some(header.timestamp),
                delivery_id: None,
            })
        }
        Scheme::HmacSha256(spec) => {
            let sig = parse_hmac_header(spec, required(req, &spec.header)?)?;
            match &spec.timestamp_header {
                Some(ts_header) => {
                    let ts_text = required(req, ts_header)?;
                    let ts = parse_timestamp(ts_text)?;
                    let content = [ts_text.as_bytes(), b".", req.body];
                    check_any(secrets, &content, &[sig])?;
                    check_tolerance(ts, now_unix, tolerance)?;
                    Ok(Verified {
                        timestamp: Some(ts),
                        delivery_id: None,
                    })
                }
                None => {
                    check_any(secrets, &[req.body], &[sig])?;
                    Ok(Verified {
                        timestamp: None,
                        delivery_id: None,
                    })
                }
            }
        }
    }
}

/// Returns the header's value or `MissingHeader` naming it.
fn required<'a>(req: &Request<'a>, name: &str) -> Result<&'a str, Rejection> {
    req.header(name)
        .ok_or_else(|| Rejection::MissingHeader(name.to_string()))
}

/// Refuses timestamps more than `tolerance` (whole seconds) away from `now_unix`, in either direction.
fn check_tolerance(ts: i64, now_unix: i64, tolerance: Duration) -> Result<(), Rejection> {
    // abs_diff cannot overflow, even for i64::MIN against i64::MAX.
    if now_unix.abs_diff(ts) > tolerance.as_secs() {
        Err(Rejection::StaleTimestamp)
    } else {
        Ok(())
    }
}

/// Succeeds if HMAC-SHA256 of the concatenated `content` under any non-empty secret equals any candidate.
fn check_any<S: AsRef<[u8]>>(
    secrets: &[Vec<u8>],
    content: &[&[u8]],
    candidates: &[S],
) -> Result<(), Rejection> {
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let mut ctx = hmac::Context::with_key(&key);
        for part in content {
            ctx.update(part);
        }
        let tag = ctx.sign();
        // One tag per secret, compared against every candidate: cost is O(secrets) HMACs, not O(secrets x entries).
        if candidates.iter().any(|c| ct_eq(tag.as_ref(), c.as_ref())) {
            return Ok(());
        }
    }
    Err(Rejection::BadSignature)
}

/// Constant-time equality for equal-length slices; different lengths return false at once (length is public).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// Strips `prefix` from `s` comparing ASCII case-insensitively; `None` if absent.
fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    // `get` returns None rather than panicking when the cut would split a multi-byte character.
    let head = s.get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix) {
        s.get(prefix.len()..)
    } else {
        None
    }
}

/// Decodes hexadecimal (either case); `None` on odd length, non-hex characters or empty input.
fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let pairs = s.as_bytes().chunks_exact(2);
    if s.is_empty() || !pairs.remainder().is_empty() {
        return None;
    }
    pairs
        .map(|pair| Some(hex_val(pair[0])? << 4 | hex_val(pair[1])?))
        .collect()
}

/// Value of one hex digit.
fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
// Tests may unwrap: a panic is exactly how a failing test should report.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    // `::hmac` is the independent RustCrypto crate, not ring's `hmac` module brought in by `super::*`.
    use ::hmac::{Hmac, Mac};
    use sha2::Sha256;

    use crate::testrng::Rng;

    const NOW: i64 = 1_700_000_000;
    const TOL: Duration = Duration::from_secs(300);
    const BODY: &[u8] = br#"{"type":"ping","n":1}"#;

    /// `n` characters drawn from `alphabet`.
    fn string_over(rng: &mut Rng, alphabet: &[u8], n: usize) -> String {
        let v: Vec<u8> = (0..n)
            .map(|_| alphabet[rng.index(alphabet.len())])
            .collect();
        String::from_utf8_lossy(&v).into_owned()
    }

    /// Reference HMAC-SHA256 via the independent `hmac` + `sha2` crates.
    fn mac(secret: &[u8], content: &[u8]) -> Vec<u8> {
        let mut m = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        m.update(content);
        m.finalize().into_bytes().to_vec()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn req<'a>(headers: &'a [(&'a str, &'a str)], body: &'a [u8]) -> Request<'a> {
        Request { headers, body }
    }

    // ---------- Standard Webhooks ----------

    const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn sw_key() -> Vec<u8> {
        decode_secret(&Scheme::StandardWebhooks, SW_SECRET).unwrap()
    }

    fn sw_sig(secret: &[u8], id: &str, ts: &str, body: &[u8]) -> String {
        let mut content = format!("{id}.{ts}.").into_bytes();
        content.extend_from_slice(body);
        format!("v1,{}", b64(&mac(secret, &content)))
    }

    fn sw_verify(
        secrets: &[Vec<u8>],
        id: &str,
        ts: &str,
        sig: &str,
        body: &[u8],
    ) -> Result<Verified, Rejection> {
        let headers = [
            ("Webhook-Id", id),
            ("webhook-timestamp", ts),
            ("WEBHOOK-SIGNATURE", sig),
        ];
        verify(
            &Scheme::StandardWebhooks,
            secrets,
            TOL,
            NOW,
            &req(&headers, body),
        )
    }

    #[test]
    fn standard_spec_vector() {
        let key = sw_key();
        let body = br#"{"test": 2432232314}"#;
        let sig = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert_eq!(
            sw_sig(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", body),
            sig
        );
        let headers = [
            ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
            ("webhook-timestamp", "1614265330"),
            ("webhook-signature", sig),
        ];
        let v = verify(
            &Scheme::StandardWebhooks,
            &[key],
            TOL,
            1614265330 + 10,
            &req(&headers, body),
        )
        .unwrap();
        assert_eq!(v.timestamp, Some(1614265330));
        assert_eq!(
            v.delivery_id.as_deref(),
            Some("msg_p5jXN8AQM9LWM0D4loKWxJek")
        );
    }

    #[test]
    fn standard_valid() {
        let k = sw_key();
        let ts = NOW.to_string();
        let sig = sw_sig(&k, "msg_1", &ts, BODY);
        let v = sw_verify(&[k], "msg_1", &ts, &sig, BODY).unwrap();
        assert_eq!(
            v,
            Verified {
                timestamp: Some(NOW),
                delivery_id: Some("msg_1".into())
            }
        );
    }

    #[test]
    fn standard_tampered_body_id_and_timestamp() {
        let k = sw_key();
        let ts = NOW.to_string();
        let sig = sw_sig(&k, "msg_1", &ts, BODY);
        let ks = [k];
        assert_eq!(
            sw_verify(&ks, "msg_1", &ts, &sig, b"{\"type\":\"ping\",\"n\":2}"),
            Err(Rejection::BadSignature)
        );
        assert_eq!(
            sw_verify(&ks, "msg_2", &ts, &sig, BODY),
            Err(Rejection::BadSignature)
        );
        assert_eq!(
            sw_verify(&ks, "msg_1", &(NOW + 1).to_string(), &sig, BODY),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn standard_wrong_secret() {
        let ts = NOW.to_string();
        let sig = sw_sig(b"some-other-secret-bytes", "msg_1", &ts, BODY);
        assert_eq!(
            sw_verify(&[sw_key()], "msg_1", &ts, &sig, BODY),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn standard_stale_and_future() {
        let k = sw_key();
        for ts in [NOW - 301, NOW + 301, 0, i64::MAX] {
            let t = ts.to_string();
            let sig = sw_sig(&k, "m", &t, BODY);
            let r = sw_verify(std::slice::from_ref(&k), "m", &t, &sig, BODY);
            assert_eq!(r, Err(Rejection::StaleTimestamp), "{ts}");
        }
        // Edges of the window are inside.
        for ts in [NOW - 300, NOW + 300] {
            let t = ts.to_string();
            let sig = sw_sig(&k, "m", &t, BODY);
            sw_verify(std::slice::from_ref(&k), "m", &t, &sig, BODY).unwrap();
        }
    }

    #[test]
    fn standard_stale_forgery_reports_bad_signature() {
        // A forged request with an old timestamp must not be told its timestamp was the only problem.
        let t = (NOW - 10_000).to_string();
        let sig = sw_sig(b"wrong", "m", &t, BODY);
        assert_eq!(
            sw_verify(&[sw_key()], "m", &t, &sig, BODY),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn standard_missing_headers() {
        let k = sw_key();
        let ts = NOW.to_string();
        let sig = sw_sig(&k, "m", &ts, BODY);
        let all = [
            ("webhook-id", "m"),
            ("webhook-timestamp", ts.as_str()),
            ("webhook-signature", sig.as_str()),
        ];
        for skip in 0..3 {
            let headers: Vec<(&str, &str)> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, h)| *h)
                .collect();
            let r = verify(
                &Scheme::StandardWebhooks,
                std::slice::from_ref(&k),
                TOL,
                NOW,
                &req(&headers, BODY),
            );
            assert_eq!(r, Err(Rejection::MissingHeader(all[skip].0.into())));
            assert_eq!(r.unwrap_err().code(), "missing_header");
        }
    }

    #[test]
    fn standard_malformed_headers() {
        let k = sw_key();
        let ts = NOW.to_string();
        let sig = sw_sig(&k, "m", &ts, BODY);
        let ks = [k];
        for bad_ts in [
            "",
            "abc",
            "-5",
            "+1700000000",
            "1.5",
            " 1700000000",
            "99999999999999999999",
        ] {
            let r = sw_verify(&ks, "m", bad_ts, &sig, BODY);
            assert!(
                matches!(r, Err(Rejection::MalformedHeader(_))),
                "{bad_ts:?}: {r:?}"
            );
        }
        for bad_sig in ["", "v1", "v1,", "v1,!!!", "v2,abcd", "sha256=abc"] {
            let r = sw_verify(&ks, "m", &ts, bad_sig, BODY);
            assert!(
                matches!(r, Err(Rejection::MalformedHeader(_))),
                "{bad_sig:?}: {r:?}"
            );
            assert_eq!(r.unwrap_err().code(), "malformed_header");
        }
        let r = sw_verify(&ks, "", &ts, &sig, BODY);
        assert!(matches!(r, Err(Rejection::MalformedHeader(_))));
    }

    #[test]
    fn standard_rotation_and_multiple_entries() {
        let old = b"old-secret-bytes-0123".to_vec();
        let new = sw_key();
        let ts = NOW.to_string();
        // Sender signs with the new key only; we hold both.
        let sig = sw_sig(&new, "m", &ts, BODY);
        sw_verify(&[old.clone(), new.clone()], "m", &ts, &sig, BODY).unwrap();
        // Sender presents several entries (its own rotation), plus an asymmetric one we ignore.
        let header = format!(
            "v1a,AAAA {} {}",
            sw_sig(b"unrelated", "m", &ts, BODY),
            sw_sig(&old, "m", &ts, BODY)
        );
        sw_verify(&[new.clone(), old], "m", &ts, &header, BODY).unwrap();
        assert_eq!(
            sw_verify(&[new], "m", &ts, &header, BODY),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn standard_too_many_entries() {
        let many = vec!["v1,AAAA"; MAX_SIGNATURES + 1].join(" ");
        assert!(matches!(
            parse_standard_signatures(&many),
            Err(Rejection::MalformedHeader(_))
        ));
        let ok = vec!["v1,AAAA"; MAX_SIGNATURES].join(" ");
        assert_eq!(
            parse_standard_signatures(&ok).unwrap().len(),
            MAX_SIGNATURES
        );
    }

    #[test]
    fn standard_signature_parsing() {
        let got =
            parse_standard_signatures("  v1,AQI=\tv1a,AAAA v1,AwQ v1,*** junk v1,BQY= ").unwrap();
        assert_eq!(got, vec![vec![1, 2], vec![3, 4], vec![5, 6]]);
    }

    #[test]
    fn standard_random_matches_reference() {
        let mut rng = Rng(7);
        for _ in 0..200 {
            let secret_len = 1 + rng.index(64);
            let secret = rng.bytes(secret_len);
            let id = format!("msg_{}", rng.next());
            let ts = (NOW + rng.index(600) as i64 - 300).to_string();
            let body_len = rng.index(500);
            let body = rng.bytes(body_len);
            let sig = sw_sig(&secret, &id, &ts, &body);
            sw_verify(&[secret], &id, &ts, &sig, &body).unwrap();
        }
    }

    #[test]
    fn decode_secret_standard() {
        assert_eq!(sw_key().len(), 24);
        let unprefixed = decode_secret(
            &Scheme::StandardWebhooks,
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n",
        )
        .unwrap();
        assert_eq!(unprefixed, sw_key());
        assert_eq!(
            decode_secret(&Scheme::StandardWebhooks, "whsec_"),
            Err(SecretError::Empty)
        );
        assert!(matches!(
            decode_secret(&Scheme::StandardWebhooks, "whsec_***"),
            Err(SecretError::BadBase64(_))
        ));
    }

    #[test]
    fn decode_secret_raw_schemes() {
        let spec = HmacSpec {
            header: "X-Sig".into(),
            encoding: Encoding::Hex,
            prefix: None,
            timestamp_header: None,
        };
        for scheme in [Scheme::Github, Scheme::Stripe, Scheme::HmacSha256(spec)] {
            assert_eq!(
                decode_secret(&scheme, "whsec_ raw bytes ").unwrap(),
                b"whsec_ raw bytes ".to_vec()
            );
            assert_eq!(decode_secret(&scheme, ""), Err(SecretError::Empty));
        }
    }

    // ---------- GitHub ----------

    fn gh_verify(secrets: &[Vec<u8>], sig: &str, body: &[u8]) -> Result<Verified, Rejection> {
        let headers = [
            ("x-hub-signature-256", sig),
            ("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
        ];
        verify(&Scheme::Github, secrets, TOL, NOW, &req(&headers, body))
    }

    #[test]
    fn github_published_vector() {
        let secret = decode_secret(&Scheme::Github, "It's a Secret to Everybody").unwrap();
        let expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(
            format!("sha256={}", hex(&mac(&secret, b"Hello, World!"))),
            expected
        );
        let v = gh_verify(std::slice::from_ref(&secret), expected, b"Hello, World!").unwrap();
        assert_eq!(v.timestamp, None);
        assert_eq!(
            v.delivery_id.as_deref(),
            Some("72d3162e-cc78-11e3-81ab-4c9367dc0958")
        );
        // Upper-case hex and prefix are accepted too.
        gh_verify(&[secret], &expected.to_ascii_uppercase(), b"Hello, World!").unwrap();
    }

    #[test]
    fn github_tampered_and_wrong_secret() {
        let secret = b"It's a Secret to Everybody".to_vec();
        let sig = format!("sha256={}", hex(&mac(&secret, BODY)));
        assert_eq!(
            gh_verify(std::slice::from_ref(&secret), &sig, b"{}"),
            Err(Rejection::BadSignature)
        );
        assert_eq!(
            gh_verify(&[b"nope".to_vec()], &sig, BODY),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn github_has_no_timestamp_window() {
        let secret = b"s3cret".to_vec();
        let sig = format!("sha256={}", hex(&mac(&secret, BODY)));
        let headers = [("X-Hub-Signature-256", sig.as_str())];
        for now in [0, NOW, i64::MAX, i64::MIN] {
            verify(
                &Scheme::Github,
                std::slice::from_ref(&secret),
                TOL,
                now,
                &req(&headers, BODY),
            )
            .unwrap();
        }
    }

    #[test]
    fn github_missing_and_malformed() {
        let r = verify(&Scheme::Github, &[b"k".to_vec()], TOL, NOW, &req(&[], BODY));
        assert_eq!(
            r,
            Err(Rejection::MissingHeader(GITHUB_SIGNATURE_HEADER.into()))
        );
        let good_hex = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        for bad in [
            "",
            "sha256=",
            good_hex,
            &format!("sha1={good_hex}"),
            &format!("sha256={}", &good_hex[..62]),
            &format!("sha256={good_hex}00"),
            &format!("sha256={}zz", &good_hex[..62]),
            &format!("sha256= {good_hex}"),
            "sha25",
            "shä256=00",
        ] {
            let r = gh_verify(&[b"k".to_vec()], bad, BODY);
            assert!(
                matches!(r, Err(Rejection::MalformedHeader(_))),
                "{bad:?}: {r:?}"
            );
        }
    }

    #[test]
    fn github_rotation() {
        let old = b"old".to_vec();
        let new = b"new".to_vec();
        let sig = format!("sha256={}", hex(&mac(&new, BODY)));
        gh_verify(&[old.clone(), new], &sig, BODY).unwrap();
        assert_eq!(gh_verify(&[old], &sig, BODY), Err(Rejection::BadSignature));
    }

    #[test]
    fn github_delivery_header_optional() {
        let secret = b"k".to_vec();
        let sig = format!("sha256={}", hex(&mac(&secret, BODY)));
        let headers = [("X-Hub-Signature-256", sig.as_str())];
        let v = verify(&Scheme::Github, &[secret], TOL, NOW, &req(&headers, BODY)).unwrap();
        assert_eq!(v.delivery_id, None);
    }

    // ---------- Stripe ----------

    fn stripe_sig(secret: &[u8], t: &str, body: &[u8]) -> String {
        let mut content = format!("{t}.").into_bytes();
        content.extend_from_slice(body);
        hex(&mac(secret, &content))
    }

    fn stripe_verify(
        secrets: &[Vec<u8>],
        header: &str,
        body: &[u8],
    ) -> Result<Verified, Rejection> {
        let headers = [("stripe-signature", header)];
        verify(&Scheme::Stripe, secrets, TOL, NOW, &req(&headers, body))
    }

    const STRIPE_SECRET: &[u8] = b"whsec_test_secret";

    #[test]
    fn stripe_valid() {
        let t = NOW.to_string();
        let header = format!(
            "t={t},v1={},v0=deadbeef",
            stripe_sig(STRIPE_SECRET, &t, BODY)
        );
        let v = stripe_verify(&[STRIPE_SECRET.to_vec()], &header, BODY).unwrap();
        assert_eq!(
            v,
            Verified {
                timestamp: Some(NOW),
                delivery_id: None
            }
        );
    }

    #[test]
    fn stripe_tampered_and_wrong_secret() {
        let t = NOW.to_string();
        let header = format!("t={t},v1={}", stripe_sig(STRIPE_SECRET, &t, BODY));
        assert_eq!(
            stripe_verify(&[STRIPE_SECRET.to_vec()], &header, b"{}"),
            Err(Rejection::BadSignature)
        );
        assert_eq!(
            stripe_verify(&[b"other".to_vec()], &header, BODY),
            Err(Rejection::BadSignature)
        );
        // Changing t invalidates the signature.
        let moved = header.replacen(&t, &(NOW - 1).to_string(), 1);
        assert_eq!(
            stripe_verify(&[STRIPE_SECRET.to_vec()], &moved, BODY),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn stripe_stale_and_future() {
        for ts in [NOW - 301, NOW + 301, 1] {
            let t = ts.to_string();
            let header = format!("t={t},v1={}", stripe_sig(STRIPE_SECRET, &t, BODY));
            assert_eq!(
                stripe_verify(&[STRIPE_SECRET.to_vec()], &header, BODY),
                Err(Rejection::StaleTimestamp),
                "{ts}"
            );
        }
        let t = (NOW + 300).to_string();
        let header = format!("t={t},v1={}", stripe_sig(STRIPE_SECRET, &t, BODY));
        stripe_verify(&[STRIPE_SECRET.to_vec()], &header, BODY).unwrap();
        assert_eq!(Rejection::StaleTimestamp.code(), "stale_timestamp");
    }

    #[test]
    fn stripe_zero_tolerance_means_exact_second() {
        let t = NOW.to_string();
        let header = format!("t={t},v1={}", stripe_sig(STRIPE_SECRET, &t, BODY));
        let headers = [("Stripe-Signature", header.as_str())];
        let s = [STRIPE_SECRET.to_vec()];
        verify(
            &Scheme::Stripe,
            &s,
            Duration::ZERO,
            NOW,
            &req(&headers, BODY),
        )
        .unwrap();
        assert_eq!(
            verify(
                &Scheme::Stripe,
                &s,
                Duration::ZERO,
                NOW + 1,
                &req(&headers, BODY)
            ),
            Err(Rejection::StaleTimestamp)
        );
    }

    #[test]
    fn stripe_missing_and_malformed() {
        let r = verify(
            &Scheme::Stripe,
            &[b"k".to_vec()],
            TOL,
            NOW,
            &req(&[("X-Other", "1")], BODY),
        );
        assert_eq!(
            r,
            Err(Rejection::MissingHeader(STRIPE_SIGNATURE_HEADER.into()))
        );
        for bad in [
            "",
            "t=",
            "v1=abcd",
            "t=1700000000",
            "t=1700000000,v1=xyz",
            "t=1700000000,v0=abcd",
            "t=abc,v1=abcd",
            "t=1,t=2,v1=abcd",
            "t=-1,v1=abcd",
        ] {
            let r = stripe_verify(&[b"k".to_vec()], bad, BODY);
            assert!(
                matches!(r, Err(Rejection::MalformedHeader(_))),
                "{bad:?}: {r:?}"
            );
        }
    }

    #[test]
    fn stripe_header_parsing() {
        let h = parse_stripe_header(" t=12 , v1=0102,junk,v0=zz,v1=ff, v1=nothex ,x=y=z").unwrap();
        assert_eq!(h.timestamp, 12);
        assert_eq!(h.timestamp_text, "12");
        assert_eq!(h.v1, vec![vec![1, 2], vec![0xff]]);
    }

    #[test]
    fn stripe_rotation_and_multiple_v1() {
        let t = NOW.to_string();
        let old = b"old-secret".to_vec();
        let new = b"new-secret".to_vec();
        // Stripe sends one v1 per active endpoint secret during its own rotation.
        let header = format!(
            "t={t},v1={},v1={}",
            stripe_sig(b"unrelated", &t, BODY),
            stripe_sig(&new, &t, BODY)
        );
        stripe_verify(&[old.clone(), new], &header, BODY).unwrap();
        assert_eq!(
            stripe_verify(&[old], &header, BODY),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn stripe_signs_timestamp_text_verbatim() {
        // Leading zeros are signed as sent, not re-rendered.
        let t = format!("0{NOW}");
        let header = format!("t={t},v1={}", stripe_sig(STRIPE_SECRET, &t, BODY));
        let v = stripe_verify(&[STRIPE_SECRET.to_vec()], &header, BODY).unwrap();
        assert_eq!(v.timestamp, Some(NOW));
    }

    // ---------- Generic HMAC-SHA256 ----------

    fn spec(encoding: Encoding, prefix: Option<&str>, ts: Option<&str>) -> Scheme {
        Scheme::HmacSha256(HmacSpec {
            header: "X-Signature".into(),
            encoding,
            prefix: prefix.map(str::to_string),
            timestamp_header: ts.map(str::to_string),
        })
    }

    #[test]
    fn generic_hex_with_prefix_no_timestamp() {
        let scheme = spec(Encoding::Hex, Some("sha256="), None);
        let secret = b"shopify-like".to_vec();
        let sig = format!("sha256={}", hex(&mac(&secret, BODY)));
        let headers = [("x-signature", sig.as_str())];
        let v = verify(
            &scheme,
            std::slice::from_ref(&secret),
            TOL,
            NOW,
            &req(&headers, BODY),
        )
        .unwrap();
        assert_eq!(
            v,
            Verified {
                timestamp: None,
                delivery_id: None
            }
        );
        // Tampered body, wrong secret.
        assert_eq!(
            verify(
                &scheme,
                std::slice::from_ref(&secret),
                TOL,
                NOW,
                &req(&headers, b"x")
            ),
            Err(Rejection::BadSignature)
        );
        assert_eq!(
            verify(
                &scheme,
                &[b"other".to_vec()],
                TOL,
                NOW,
                &req(&headers, BODY)
            ),
            Err(Rejection::BadSignature)
        );
        // No timestamp header configured: time is irrelevant.
        verify(
            &scheme,
            std::slice::from_ref(&secret),
            TOL,
            0,
            &req(&headers, BODY),
        )
        .unwrap();
        // Prefix missing.
        let bare = hex(&mac(&secret, BODY));
        let headers = [("X-Signature", bare.as_str())];
        assert!(matches!(
            verify(&scheme, &[secret], TOL, NOW, &req(&headers, BODY)),
            Err(Rejection::MalformedHeader(_))
        ));
    }

    #[test]
    fn generic_base64_with_timestamp() {
        let scheme = spec(Encoding::Base64, None, Some("X-Timestamp"));
        let secret = b"generic-secret".to_vec();
        let sign = |ts: i64, body: &[u8], key: &[u8]| {
            let mut c = format!("{ts}.").into_bytes();
            c.extend_from_slice(body);
            b64(&mac(key, &c))
        };
        let run = |ts: i64, sig: &str, body: &[u8], secrets: &[Vec<u8>]| {
            let t = ts.to_string();
            let headers = [("X-Signature", sig), ("X-Timestamp", t.as_str())];
            verify(&scheme, secrets, TOL, NOW, &req(&headers, body))
        };
        let s = std::slice::from_ref(&secret);
        // Valid.
        let v = run(NOW, &sign(NOW, BODY, &secret), BODY, s).unwrap();
        assert_eq!(v.timestamp, Some(NOW));
        // Tampered body.
        assert_eq!(
            run(NOW, &sign(NOW, BODY, &secret), b"{}", s),
            Err(Rejection::BadSignature)
        );
        // Wrong secret.
        assert_eq!(
            run(NOW, &sign(NOW, BODY, b"zzz"), BODY, s),
            Err(Rejection::BadSignature)
        );
        // Stale and future.
        assert_eq!(
            run(NOW - 1000, &sign(NOW - 1000, BODY, &secret), BODY, s),
            Err(Rejection::StaleTimestamp)
        );
        assert_eq!(
            run(NOW + 1000, &sign(NOW + 1000, BODY, &secret), BODY, s),
            Err(Rejection::StaleTimestamp)
        );
        // Timestamp is covered by the signature.
        assert_eq!(
            run(NOW + 1, &sign(NOW, BODY, &secret), BODY, s),
            Err(Rejection::BadSignature)
        );
        // Rotation.
        run(
            NOW,
            &sign(NOW, BODY, &secret),
            BODY,
            &[b"old".to_vec(), secret.clone()],
        )
        .unwrap();
        // Unpadded base64 accepted.
        let unpadded = sign(NOW, BODY, &secret).trim_end_matches('=').to_string();
        run(NOW, &unpadded, BODY, s).unwrap();
    }

    #[test]
    fn generic_missing_and_malformed() {
        let scheme = spec(Encoding::Hex, None, Some("X-Timestamp"));
        let secret = vec![b"k".to_vec()];
        let sig = "00".repeat(32);
        let r = verify(
            &scheme,
            &secret,
            TOL,
            NOW,
            &req(&[("X-Timestamp", "1")], BODY),
        );
        assert_eq!(r, Err(Rejection::MissingHeader("X-Signature".into())));
        let r = verify(
            &scheme,
            &secret,
            TOL,
            NOW,
            &req(&[("X-Signature", &sig)], BODY),
        );
        assert_eq!(r, Err(Rejection::MissingHeader("X-Timestamp".into())));
        for (s, t) in [
            ("zz", "1"),
            ("", "1"),
            ("abc", "1"),
            (sig.as_str(), "x"),
            (sig.as_str(), ""),
        ] {
            let headers = [("X-Signature", s), ("X-Timestamp", t)];
            let r = verify(&scheme, &secret, TOL, NOW, &req(&headers, BODY));
            assert!(
                matches!(r, Err(Rejection::MalformedHeader(_))),
                "{s:?} {t:?}: {r:?}"
            );
        }
        let b64_scheme = spec(Encoding::Base64, Some("v1="), None);
        for s in ["v1=", "v1=@@@", "nope"] {
            let r = verify(
                &b64_scheme,
                &secret,
                TOL,
                NOW,
                &req(&[("X-Signature", s)], BODY),
            );
            assert!(
                matches!(r, Err(Rejection::MalformedHeader(_))),
                "{s:?}: {r:?}"
            );
        }
    }

    // ---------- Cross-cutting ----------

    #[test]
    fn no_secrets_or_empty_secret_never_matches() {
        // HMAC with an empty key is computable by anyone, so empty secrets must be ignored.
        let sig = format!("sha256={}", hex(&mac(b"", BODY)));
        assert_eq!(gh_verify(&[], &sig, BODY), Err(Rejection::BadSignature));
        assert_eq!(
            gh_verify(&[Vec::new()], &sig, BODY),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn codes_are_stable() {
        assert_eq!(
            Rejection::MissingHeader("x".into()).code(),
            "missing_header"
        );
        assert_eq!(
            Rejection::MalformedHeader("x".into()).code(),
            "malformed_header"
        );
        assert_eq!(Rejection::BadSignature.code(), "bad_signature");
        assert_eq!(Rejection::StaleTimestamp.code(), "stale_timestamp");
    }

    #[test]
    fn header_lookup_is_case_insensitive_first_wins() {
        let headers = [("A", "1"), ("b", "2"), ("a", "3")];
        let r = req(&headers, b"");
        assert_eq!(r.header("a"), Some("1"));
        assert_eq!(r.header("B"), Some("2"));
        assert_eq!(r.header("c"), None);
    }

    #[test]
    fn tolerance_extremes_do_not_overflow() {
        assert_eq!(
            check_tolerance(i64::MIN, i64::MAX, TOL),
            Err(Rejection::StaleTimestamp)
        );
        assert_eq!(
            check_tolerance(i64::MAX, i64::MIN, TOL),
            Err(Rejection::StaleTimestamp)
        );
        check_tolerance(i64::MAX, i64::MIN, Duration::MAX).unwrap();
        check_tolerance(5, 5, Duration::ZERO).unwrap();
    }

    #[test]
    fn ct_eq_and_hex_helpers() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(ct_eq(b"", b""));
        assert_eq!(decode_hex("00ffA0"), Some(vec![0, 255, 160]));
        assert_eq!(decode_hex(""), None);
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("0g"), None);
        assert_eq!(strip_prefix_ignore_case("SHA256=ab", "sha256="), Some("ab"));
        assert_eq!(strip_prefix_ignore_case("é", "x"), None); // would split a UTF-8 character
        assert_eq!(strip_prefix_ignore_case("ab", "abc"), None);
    }

    #[test]
    fn parse_timestamp_bounds() {
        assert_eq!(parse_timestamp("0"), Ok(0));
        assert_eq!(parse_timestamp("9223372036854775807"), Ok(i64::MAX));
        assert!(parse_timestamp("9223372036854775808").is_err());
        assert!(parse_timestamp("00000000000000000001").is_err()); // 20 digits
        assert!(parse_timestamp("١٢٣").is_err()); // non-ASCII digits
    }

    #[test]
    fn parsers_and_verify_never_panic_on_random_input() {
        let mut rng = Rng(0xDEAD_BEEF_CAFE_F00D);
        let alphabets: [&[u8]; 4] = [
            b"tv01=,. -",
            b"v1a,=+/ABCDEFabcdef0123456789 \t",
            b"sha256=SHA0123456789abcdefABCDEFxyz",
            "t=v1,é\u{0}\u{7f}ï=".as_bytes(),
        ];
        let hmac_schemes = [
            spec(Encoding::Hex, Some("sha256="), Some("X-Ts")),
            spec(Encoding::Base64, Some("é"), None),
        ];
        let secrets = [b"k".to_vec(), Vec::new()];
        for i in 0..4000 {
            let len = rng.index(120);
            let s = if i % 3 == 0 {
                String::from_utf8_lossy(&rng.bytes(len)).into_owned()
            } else {
                let a = alphabets[rng.index(alphabets.len())];
                string_over(&mut rng, a, len)
            };
            let _ = parse_standard_signatures(&s);
            let _ = parse_github_header(&s);
            let _ = parse_stripe_header(&s);
            let _ = parse_timestamp(&s);
            for h in &hmac_schemes {
                if let Scheme::HmacSha256(spec) = h {
                    let _ = parse_hmac_header(spec, &s);
                }
            }
            let _ = decode_secret(&Scheme::StandardWebhooks, &s);
            let headers = [
                ("webhook-id", s.as_str()),
                ("webhook-timestamp", s.as_str()),
                ("webhook-signature", s.as_str()),
                ("X-Hub-Signature-256", s.as_str()),
                ("Stripe-Signature", s.as_str()),
                ("X-Signature", s.as_str()),
                ("X-Ts", s.as_str()),
            ];
            let now = rng.next() as i64;
            let tol = Duration::from_secs(rng.next());
            let r = req(&headers, s.as_bytes());
            for scheme in [Scheme::StandardWebhooks, Scheme::Github, Scheme::Stripe]
                .iter()
                .chain(hmac_schemes.iter())
            {
                let _ = verify(scheme, &secrets, tol, now, &r);
            }
        }
    }

    #[test]
    fn odd_inputs_do_not_panic() {
        let long = "v1=".repeat(10_000);
        let commas = ",".repeat(10_000);
        let spaces = " ".repeat(10_000);
        let odd = [
            "",
            "=",
            ",",
            "t",
            "t=",
            "=v1",
            "\u{0}",
            "v1,",
            ",v1",
            "sha256=\u{1F600}",
            "t=\u{1F600},v1=\u{1F600}",
            long.as_str(),
            commas.as_str(),
            spaces.as_str(),
        ];
        for s in odd {
            let _ = parse_standard_signatures(s);
            let _ = parse_github_header(s);
            let _ = parse_stripe_header(s);
            let _ = parse_timestamp(s);
        }
    }
}

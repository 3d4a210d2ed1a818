//! The fuzz targets' bodies as plain functions: each feeds arbitrary bytes to one parser of
//! untrusted input (the inbound signature headers of `dispatchd::ingest::schemes`, the
//! config parser, the publish body decoder, the stored record decoder) and checks what it
//! promises on success. A panic is a finding. The libFuzzer binaries in `fuzz_targets/` only call these,
//! so the same checks build and run on stable Rust (`cargo test` here) without libFuzzer.

use std::time::Duration;

use dispatchd::ingest::schemes::{
    self, Encoding, HmacSpec, MAX_SIGNATURES, Request, Scheme, parse_github_header,
    parse_hmac_header, parse_standard_signatures, parse_stripe_header,
};

/// Header parsers take text: non-UTF-8 input never reaches them (hyper hands over only
/// visible-ASCII header values), so it is skipped rather than converted.
fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// `Stripe-Signature: t=…,v1=…`.
pub fn stripe_header(data: &[u8]) {
    let Some(s) = text(data) else { return };
    if let Ok(h) = parse_stripe_header(s) {
        assert!(!h.v1.is_empty(), "accepted without a v1 signature: {s:?}");
        assert!(h.v1.len() <= MAX_SIGNATURES, "unbounded signatures: {s:?}");
        assert!(h.v1.iter().all(|sig| !sig.is_empty()), "empty v1: {s:?}");
        assert!(h.timestamp >= 0, "negative timestamp: {s:?}");
        // The signed text is a piece of the input, and it means the number reported.
        assert!(
            s.contains(h.timestamp_text),
            "t= text not from input: {s:?}"
        );
        assert_eq!(
            h.timestamp_text.parse::<i64>().ok(),
            Some(h.timestamp),
            "{s:?}"
        );
    }
}

/// `webhook-signature: v1,<base64> v1,<base64> …`.
pub fn standard_signatures(data: &[u8]) {
    let Some(s) = text(data) else { return };
    if let Ok(sigs) = parse_standard_signatures(s) {
        assert!(!sigs.is_empty(), "accepted with no signature: {s:?}");
        assert!(sigs.len() <= MAX_SIGNATURES, "unbounded signatures: {s:?}");
        assert!(
            sigs.iter().all(|sig| !sig.is_empty()),
            "empty signature: {s:?}"
        );
    }
}

/// `X-Hub-Signature-256: sha256=<64 hex>`.
pub fn github_header(data: &[u8]) {
    let Some(s) = text(data) else { return };
    if let Ok(tag) = parse_github_header(s) {
        // Exactly `sha256=` (any case) and the tag's 64 hex digits (any case).
        assert_eq!(s.len(), 7 + 64, "{s:?}");
        assert!(s[..7].eq_ignore_ascii_case("sha256="), "{s:?}");
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, s[7..].to_ascii_lowercase(), "{s:?}");
    }
}

/// The generic `hmac-sha256` header. The first byte picks the source's settings (encoding,
/// prefix); the rest is the header value.
pub fn hmac_header(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Some(s) = text(rest) else { return };
    let spec = hmac_spec(pick);
    if let Ok(sig) = parse_hmac_header(&spec, s) {
        assert!(!sig.is_empty(), "empty signature accepted: {s:?}");
        if let Some(p) = &spec.prefix {
            assert!(
                s.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p)),
                "prefix {p:?} not checked: {s:?}"
            );
        }
        if spec.encoding == Encoding::Hex {
            let body = spec.prefix.as_ref().map_or(s, |p| &s[p.len()..]);
            assert_eq!(body.len(), sig.len() * 2, "{s:?}");
        }
    }
}

fn hmac_spec(pick: u8) -> HmacSpec {
    HmacSpec {
        header: "X-Signature".into(),
        encoding: if pick & 1 == 0 {
            Encoding::Hex
        } else {
            Encoding::Base64
        },
        prefix: match (pick >> 1) & 3 {
            0 => None,
            1 => Some("sha256=".into()),
            2 => Some("v1=".into()),
            _ => Some("é".into()),
        },
        timestamp_header: (pick & 8 != 0).then(|| "X-Timestamp".into()),
    }
}

/// Whole-request verification under every scheme: input split on `\n` into the values of the
/// headers each scheme reads, the remainder being the body. Only totality is checked: no
/// panic, and no forged request passes (the secrets are not in the input's reach).
pub fn verify_request(data: &[u8]) {
    let mut parts = data.splitn(6, |&b| b == b'\n');
    let mut next = || parts.next().and_then(text).unwrap_or("");
    let (a, b, c, d, e) = (next(), next(), next(), next(), next());
    let body = data.splitn(6, |&b| b == b'\n').nth(5).unwrap_or_default();
    let headers = [
        ("webhook-id", a),
        ("webhook-timestamp", b),
        ("webhook-signature", c),
        ("X-Hub-Signature-256", c),
        ("Stripe-Signature", d),
        ("X-Signature", e),
        ("X-Timestamp", b),
    ];
    let req = Request {
        headers: &headers,
        body,
    };
    let secrets = [b"fuzz-secret-1".to_vec(), Vec::new()];
    let now = i64::from_le_bytes(
        data.get(..8)
            .and_then(|s| s.try_into().ok())
            .unwrap_or_default(),
    );
    let schemes = [
        Scheme::StandardWebhooks,
        Scheme::Github,
        Scheme::Stripe,
        Scheme::HmacSha256(hmac_spec(data.first().copied().unwrap_or(0))),
    ];
    for scheme in &schemes {
        let r = schemes::verify(scheme, &secrets, Duration::from_secs(300), now, &req);
        assert!(r.is_err(), "a request without our secret verified: {r:?}");
    }
}

/// The configuration parser and validator on arbitrary text: an error or a config, never a
/// panic; every error names its key or is a parse error with a line.
pub fn config_parser(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let path = std::path::Path::new("fuzz.toml");
    let result = dispatchd::config::parse_str(text, Some(path)).and_then(|raw| {
        dispatchd::config::validate(raw, text, Some(path), &Default::default())
    });
    if let Err(errors) = result {
        assert!(!errors.0.is_empty(), "an error without a problem: {text:?}");
    }
}

/// The publish body decoder (single and batch), as the API runs it on request bodies.
pub fn event_json(data: &[u8]) {
    use dispatchd::api::dto::{BatchRequest, PublishRequest};
    if let Ok(p) = serde_json::from_slice::<PublishRequest>(data) {
        // `data` is kept as the producer's text and later embedded in outbound bodies as a
        // raw value: it must be one JSON value on its own. (Numbers beyond f64 are valid JSON
        // text, so this checks syntax, not serde_json::Value.)
        assert!(
            serde_json::from_str::<&serde_json::value::RawValue>(p.data.get()).is_ok(),
            "data is not a JSON value: {:?}",
            p.data.get()
        );
    }
    let _ = serde_json::from_slice::<BatchRequest>(data);
}

/// The stored record decoder on arbitrary bytes (a damaged file): an error, never a panic;
/// a record that decodes encodes back to the same record.
pub fn stored_record(data: &[u8]) {
    use dispatchd::model::{Attempt, Delivery, Event, Receipt};
    use dispatchd::storage::schema::{decode, encode};
    fn round_trip<T>(data: &[u8])
    where
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        if let Ok(v) = decode::<T>(data, "fuzz") {
            let again = encode(&v).and_then(|bytes| decode::<T>(&bytes, "fuzz"));
            assert!(matches!(&again, Ok(w) if *w == v), "{v:?} does not round-trip");
        }
    }
    round_trip::<Event>(data);
    round_trip::<Delivery>(data);
    round_trip::<Attempt>(data);
    round_trip::<Receipt>(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds like the ones a fuzzing run starts from, plus edge cases.
    const SEEDS: &[&[u8]] = &[
        b"",
        b"t=1700000000,v1=00ff",
        b"t=1,t=2,v1=00",
        b" t=12 , v1=0102,junk,v0=zz,v1=ff",
        b"v1,AAAA v1,+/8= v1a,xyz",
        b"sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        b"SHA256=757107EA0EB2509FC211221CCE984B8A37570B6D7586C22C46F4379C8B043E17",
        b"\x03sha256=00ff",
        b"\x01AAAA",
        b"\x07\xc3\xa9AAAA",
        b"msg_1\n1700000000\nv1,AAAA\nt=1700000000,v1=00\n00ff\n{}",
        "é=v1,t=\u{0}".as_bytes(),
        b"\xff\xfe",
    ];

    fn all(data: &[u8]) {
        stripe_header(data);
        standard_signatures(data);
        github_header(data);
        hmac_header(data);
        verify_request(data);
        config_parser(data);
        event_json(data);
        stored_record(data);
    }

    #[test]
    fn seeds_hold() {
        for s in SEEDS {
            all(s);
        }
    }

    #[test]
    fn pseudo_random_inputs_hold() {
        // xorshift: deterministic, no dependency; mutates the seeds like a tiny fuzzer.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"tv01=,. \nsha256SHAabcdefABCDEF+/xyz\xc3\xa9";
        for i in 0..20_000 {
            let mut data = SEEDS[i % SEEDS.len()].to_vec();
            for _ in 0..(rnd() % 8) {
                let c = alphabet[(rnd() % alphabet.len() as u64) as usize];
                match rnd() % 3 {
                    0 if !data.is_empty() => {
                        let at = (rnd() % data.len() as u64) as usize;
                        data[at] = c;
                    }
                    1 if !data.is_empty() => {
                        data.remove((rnd() % data.len() as u64) as usize);
                    }
                    _ => {
                        let at = (rnd() % (data.len() as u64 + 1)) as usize;
                        data.insert(at, c);
                    }
                }
            }
            all(&data);
        }
    }
}

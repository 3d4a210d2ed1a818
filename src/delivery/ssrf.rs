//! SSRF guard for outbound deliveries: which IP addresses are forbidden, a DNS resolver that drops them, and a URL host check.
//!
//! Invariants:
//! - [`is_forbidden`] is pure and total: every `IpAddr` gets an answer, and IPv6 forms that embed an IPv4
//!   address (IPv4-mapped, NAT64, 6to4) are judged by the IPv4 rules applied to the embedded address.
//! - IPv6 is default-deny outside global unicast `2000::/3` (plus the NAT64/mapped forms above), so address
//!   blocks IANA assigns in future outside that range stay forbidden until someone looks at them.
//! - reqwest never calls a resolver for IP-literal hosts, so every delivery URL must also pass
//!   [`check_url_host`]; the two together cover both ways a destination can be named.
//! - DNS rebinding cannot slip between check and connect: reqwest connects to exactly the addresses this
//!   resolver returns, with no second lookup.
//! - The guard only holds for direct connections. Through an HTTP proxy the resolver sees the proxy's name and
//!   the proxy reaches the destination unchecked, so delivery clients must be built with `.no_proxy()`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Why a destination was refused.
#[derive(Debug, thiserror::Error)]
pub enum SsrfError {
    /// Every address the name resolved to is forbidden.
    #[error(
        "destination {host} resolves only to forbidden addresses ({detail}); private destinations are not allowed"
    )]
    OnlyForbidden {
        /// The name that was resolved.
        host: String,
        /// The refused addresses with the rule each one hit.
        detail: String,
    },
    /// The lookup succeeded but returned no addresses at all.
    #[error("destination {host} did not resolve to any address")]
    NoAddresses {
        /// The name that was resolved.
        host: String,
    },
    /// The DNS lookup itself failed.
    #[error("DNS lookup for destination {host} failed: {source}")]
    Lookup {
        /// The name that was resolved.
        host: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
    /// The URL's host is an IP literal in a forbidden range.
    #[error(
        "destination {host} is a forbidden address ({reason}); private destinations are not allowed"
    )]
    ForbiddenAddress {
        /// The host as written in the URL.
        host: String,
        /// The rule the address hit.
        reason: &'static str,
    },
    /// The URL's host is `localhost` or a `.localhost` name, which always means loopback (RFC 6761).
    #[error("destination {host} is a localhost name; private destinations are not allowed")]
    Localhost {
        /// The host as written in the URL.
        host: String,
    },
    /// The URL has no host at all.
    #[error("destination URL has no host")]
    NoHost,
}

/// An IPv4 rule: network, prefix length, reason. Order matters only for which reason is reported.
const V4_RULES: &[(Ipv4Addr, u8, &str)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8, "\"this network\" 0.0.0.0/8"),
    (Ipv4Addr::new(10, 0, 0, 0), 8, "private 10.0.0.0/8"),
    (
        Ipv4Addr::new(100, 64, 0, 0),
        10,
        "carrier-grade NAT 100.64.0.0/10",
    ),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback 127.0.0.0/8"),
    // Listed before link-local so the more specific reason is reported.
    (
        Ipv4Addr::new(169, 254, 169, 254),
        32,
        "cloud metadata endpoint",
    ),
    (
        Ipv4Addr::new(169, 254, 0, 0),
        16,
        "link-local 169.254.0.0/16",
    ),
    // Azure's platform endpoint (DHCP, DNS, health and the WireServer agent channel) is reachable
    // from every Azure VM and must never be a webhook destination.
    (
        Ipv4Addr::new(168, 63, 129, 16),
        32,
        "Azure platform endpoint",
    ),
    (Ipv4Addr::new(172, 16, 0, 0), 12, "private 172.16.0.0/12"),
    (
        Ipv4Addr::new(192, 0, 0, 0),
        24,
        "IETF protocol assignments 192.0.0.0/24",
    ),
    (
        Ipv4Addr::new(192, 0, 2, 0),
        24,
        "documentation 192.0.2.0/24",
    ),
    (
        Ipv4Addr::new(192, 88, 99, 0),
        24,
        "deprecated 6to4 relay anycast 192.88.99.0/24",
    ),
    (Ipv4Addr::new(192, 168, 0, 0), 16, "private 192.168.0.0/16"),
    (
        Ipv4Addr::new(198, 18, 0, 0),
        15,
        "benchmarking 198.18.0.0/15",
    ),
    (
        Ipv4Addr::new(198, 51, 100, 0),
        24,
        "documentation 198.51.100.0/24",
    ),
    (
        Ipv4Addr::new(203, 0, 113, 0),
        24,
        "documentation 203.0.113.0/24",
    ),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast 224.0.0.0/4"),
    // Listed before the reserved /4 that contains it so the more specific reason is reported.
    (Ipv4Addr::new(255, 255, 255, 255), 32, "broadcast"),
    (Ipv4Addr::new(240, 0, 0, 0), 4, "reserved 240.0.0.0/4"),
];

/// An IPv6 rule for addresses that do not embed IPv4 and lie inside or near global unicast.
const V6_RULES: &[(Ipv6Addr, u8, &str)] = &[
    (
        Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0),
        48,
        "local-use NAT64 64:ff9b:1::/48",
    ),
    (
        Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0),
        64,
        "discard-only 100::/64",
    ),
    // Teredo (2001::/32), benchmarking (2001:2::/48), ORCHID and friends; Teredo can tunnel to any IPv4.
    (
        Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0),
        23,
        "IETF protocol assignments 2001::/23",
    ),
    (
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0),
        32,
        "documentation 2001:db8::/32",
    ),
    (
        Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0),
        20,
        "documentation 3fff::/20",
    ),
    // Listed before unique-local so the more specific reason is reported.
    (
        Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
        128,
        "cloud metadata endpoint",
    ),
    (
        Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0),
        7,
        "unique-local fc00::/7",
    ),
    (
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
        "link-local fe80::/10",
    ),
    (
        Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0),
        10,
        "site-local fec0::/10",
    ),
    (
        Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
        8,
        "multicast ff00::/8",
    ),
];

/// Returns true when `ip` lies in `net/len` (len 0 matches everything; the shift saturates instead of overflowing).
fn v4_in(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = u32::MAX
        .checked_shl(32u32.saturating_sub(len.into()))
        .unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

/// Returns true when `ip` lies in `net/len` (len 0 matches everything; the shift saturates instead of overflowing).
fn v6_in(ip: Ipv6Addr, net: Ipv6Addr, len: u8) -> bool {
    let mask = u128::MAX
        .checked_shl(128u32.saturating_sub(len.into()))
        .unwrap_or(0);
    u128::from(ip) & mask == u128::from(net) & mask
}

/// Reason an IPv4 address is forbidden, if it is.
fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    V4_RULES
        .iter()
        .find(|(net, len, _)| v4_in(ip, *net, *len))
        .map(|(_, _, reason)| *reason)
}

/// Extracts the IPv4 address carried in the low 32 bits of an IPv6 address.
fn low_v4(ip: Ipv6Addr) -> Ipv4Addr {
    // Truncation is the point: the embedded address is the low 32 bits.
    Ipv4Addr::from(u128::from(ip) as u32)
}

/// Reason an IPv6 address is forbidden, if it is.
fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    let bits = u128::from(ip);
    // IPv4-mapped ::ffff:a.b.c.d — a dual-stack socket connects to a.b.c.d itself.
    if v6_in(ip, Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96) {
        return v4_reason(low_v4(ip));
    }
    // NAT64 well-known prefix 64:ff9b::a.b.c.d — the NAT64 gateway connects to a.b.c.d on our behalf.
    if v6_in(ip, Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96) {
        return v4_reason(low_v4(ip));
    }
    // 6to4 2002:AABB:CCDD::/48 embeds AA.BB.CC.DD in bits 16..48; a 6to4 relay would forward to it.
    if v6_in(ip, Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16) {
        // Truncation is the point: the shift leaves the embedded address in the low 32 bits.
        return v4_reason(Ipv4Addr::from((bits >> 80) as u32));
    }
    if ip.is_unspecified() {
        return Some("unspecified ::");
    }
    if ip.is_loopback() {
        return Some("loopback ::1");
    }
    // IPv4-compatible ::a.b.c.d is deprecated (RFC 4291) and never a legitimate destination; the whole
    // block is refused, which is a superset of applying the IPv4 rules to the embedded address.
    if v6_in(ip, Ipv6Addr::UNSPECIFIED, 96) {
        return Some("deprecated IPv4-compatible ::/96");
    }
    // IPv4-translated ::ffff:0:a.b.c.d (SIIT) is for translators, not hosts.
    if v6_in(ip, Ipv6Addr::new(0, 0, 0, 0, 0xffff, 0, 0, 0), 96) {
        return Some("IPv4-translated ::ffff:0:0:0/96");
    }
    if let Some((_, _, reason)) = V6_RULES.iter().find(|(net, len, _)| v6_in(ip, *net, *len)) {
        return Some(reason);
    }
    // Default-deny: only global unicast is a plausible webhook destination.
    if !v6_in(ip, Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0), 3) {
        return Some("not IPv6 global unicast 2000::/3");
    }
    None
}

/// Returns the rule that forbids `ip` as a delivery destination, or `None` if it is allowed.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6),
    }
}

/// Returns true if `ip` must never be a delivery destination (unless private destinations are allowed).
pub fn is_forbidden(ip: IpAddr) -> bool {
    forbidden_reason(ip).is_some()
}

/// Returns true for `localhost`, `localhost.` and any `*.localhost` name (RFC 6761 reserves them for loopback).
fn is_localhost_name(host: &str) -> bool {
    let h = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    h == "localhost" || h.ends_with(".localhost")
}

/// Refuses a URL whose host is a forbidden IP literal or a localhost name, unless `allow_private`.
///
/// reqwest resolves names through [`GuardedResolver`] but connects to IP literals directly, so this check
/// is what covers `http://127.0.0.1/` and `http://[::1]/`.
pub fn check_url_host(url: &reqwest::Url, allow_private: bool) -> Result<(), SsrfError> {
    let host = url.host_str().ok_or(SsrfError::NoHost)?;
    if allow_private {
        return Ok(());
    }
    // The url crate already canonicalises special-scheme IPv4 hosts (e.g. `0x7f.1` becomes `127.0.0.1`)
    // and brackets IPv6 hosts, so parsing the text form sees every literal reqwest would connect to.
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return match forbidden_reason(ip) {
            Some(reason) => Err(SsrfError::ForbiddenAddress {
                host: host.to_string(),
                reason,
            }),
            None => Ok(()),
        };
    }
    if is_localhost_name(host) {
        return Err(SsrfError::Localhost {
            host: host.to_string(),
        });
    }
    Ok(())
}

/// Most refused addresses listed in an error message; the rest are counted.
const MAX_LISTED: usize = 4;

/// Keeps the allowed addresses of a lookup result, or explains why none are left.
///
/// Pure so it can be tested without DNS; [`GuardedResolver`] is a thin async wrapper around it.
pub fn filter_addrs(
    host: &str,
    addrs: impl IntoIterator<Item = SocketAddr>,
    allow_private: bool,
) -> Result<Vec<SocketAddr>, SsrfError> {
    let mut kept = Vec::new();
    let mut refused: Vec<(IpAddr, &'static str)> = Vec::new();
    for addr in addrs {
        match forbidden_reason(addr.ip()) {
            Some(reason) if !allow_private => refused.push((addr.ip(), reason)),
            _ => kept.push(addr),
        }
    }
    if !kept.is_empty() {
        return Ok(kept);
    }
    if refused.is_empty() {
        return Err(SsrfError::NoAddresses {
            host: host.to_string(),
        });
    }
    let mut detail = refused
        .iter()
        .take(MAX_LISTED)
        .map(|(ip, reason)| format!("{ip}: {reason}"))
        .collect::<Vec<_>>()
        .join(", ");
    if refused.len() > MAX_LISTED {
        detail.push_str(&format!(", and {} more", refused.len() - MAX_LISTED));
    }
    Err(SsrfError::OnlyForbidden {
        host: host.to_string(),
        detail,
    })
}

/// Resolves `host` with the system resolver and applies [`filter_addrs`]; ports in the result are 0.
pub async fn resolve_guarded(
    host: &str,
    allow_private: bool,
) -> Result<Vec<SocketAddr>, SsrfError> {
    let addrs = tokio::net::lookup_host((host, 0))
        .await
        .map_err(|source| SsrfError::Lookup {
            host: host.to_string(),
            source,
        })?;
    filter_addrs(host, addrs, allow_private)
}

/// A reqwest DNS resolver that never hands out forbidden addresses (unless `allow_private`).
#[derive(Debug, Clone, Copy, Default)]
pub struct GuardedResolver {
    allow_private: bool,
}

impl GuardedResolver {
    /// Creates a resolver; `allow_private = true` disables filtering (for tests and trusted networks).
    pub fn new(allow_private: bool) -> Self {
        Self { allow_private }
    }

    /// Whether private destinations are allowed.
    pub fn allow_private(&self) -> bool {
        self.allow_private
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        // Owned copy: the returned future must be 'static and outlive `name`.
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = resolve_guarded(&host, allow_private).await?;
            // Port 0 is replaced by reqwest with the URL's port or the scheme default.
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
// Tests may unwrap: a panic is exactly how a failing test should report.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use reqwest::dns::Resolve;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forbidden_table() {
        let cases: &[(&str, &str)] = &[
            // IPv4
            ("0.0.0.0", "this network"),
            ("0.1.2.3", "this network"),
            ("10.0.0.1", "private 10."),
            ("10.255.255.255", "private 10."),
            ("100.64.0.1", "carrier-grade"),
            ("100.127.255.255", "carrier-grade"),
            ("100.100.100.200", "carrier-grade"), // Alibaba metadata lives here
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("169.254.169.254", "cloud metadata"),
            ("169.254.0.1", "link-local"),
            ("168.63.129.16", "Azure"),
            ("172.16.0.1", "private 172.16"),
            ("172.31.255.255", "private 172.16"),
            ("192.0.0.8", "IETF"),
            ("192.0.2.1", "documentation"),
            ("192.88.99.1", "6to4 relay"),
            ("192.168.1.1", "private 192.168"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.9", "documentation"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.255", "broadcast"),
            // IPv6 native
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fe80::1", "link-local"),
            ("febf:ffff::1", "link-local"),
            ("fec0::1", "site-local"),
            ("fc00::1", "unique-local"),
            ("fdff:ffff::1", "unique-local"),
            ("fd00:ec2::254", "cloud metadata"),
            ("ff02::1", "multicast"),
            ("ff0e::1", "multicast"),
            ("2001:db8::1", "documentation"),
            ("3fff::1", "documentation"),
            ("2001::1", "IETF"),   // Teredo
            ("2001:2::1", "IETF"), // benchmarking
            ("100::1", "discard"),
            ("64:ff9b:1::1", "local-use NAT64"),
            ("4000::1", "global unicast"),
            ("5f00::1", "global unicast"),
            ("::ffff:0:8.8.8.8", "IPv4-translated"),
            // IPv4-compatible: whole block refused, including public embedded addresses.
            ("::8.8.8.8", "IPv4-compatible"),
            ("::127.0.0.1", "IPv4-compatible"),
            // IPv4-mapped forms follow the IPv4 rules.
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.1.2.3", "private 10."),
            ("::ffff:169.254.169.254", "cloud metadata"),
            ("::ffff:0.0.0.0", "this network"),
            ("::ffff:100.64.1.1", "carrier-grade"),
            ("::ffff:255.255.255.255", "broadcast"),
            // NAT64 forms follow the IPv4 rules.
            ("64:ff9b::127.0.0.1", "loopback"),
            ("64:ff9b::a9fe:a9fe", "cloud metadata"),
            ("64:ff9b::192.168.0.1", "private 192.168"),
            // 6to4 forms follow the IPv4 rules on the embedded address.
            ("2002:7f00:1::1", "loopback"),
            ("2002:a00:1::", "private 10."),
            ("2002:a9fe:a9fe::1", "cloud metadata"),
        ];
        for (addr, want) in cases {
            let got = forbidden_reason(ip(addr));
            assert!(
                got.is_some_and(|r| r.contains(want)),
                "{addr}: expected reason containing {want:?}, got {got:?}"
            );
            assert!(is_forbidden(ip(addr)), "{addr}");
        }
    }

    #[test]
    fn allowed_table() {
        let cases = [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.216.34",
            "9.255.255.255",   // just below 10/8
            "11.0.0.0",        // just above 10/8
            "100.63.255.255",  // just below CGNAT
            "100.128.0.0",     // just above CGNAT
            "126.255.255.255", // just below loopback
            "128.0.0.0",       // just above loopback
            "169.253.255.255", // just below link-local
            "169.255.0.0",     // just above link-local
            "172.15.255.255",  // just below 172.16/12
            "172.32.0.0",      // just above 172.16/12
            "192.167.255.255", // just below 192.168/16
            "192.169.0.0",     // just above 192.168/16
            "198.17.255.255",  // just below benchmarking
            "198.20.0.0",      // just above benchmarking
            "223.255.255.255", // just below multicast
            "192.0.1.1",
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
            "2001:200::1",  // just past 2001::/23
            "2001:db9::1",  // just past documentation
            "3ffe:ffff::1", // below 3fff::/20
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:808:808::1",
        ];
        for addr in cases {
            assert_eq!(forbidden_reason(ip(addr)), None, "{addr}");
            assert!(!is_forbidden(ip(addr)), "{addr}");
        }
    }

    #[test]
    fn every_v4_rule_applies_to_mapped_and_nat64_forms() {
        for (net, _, _) in V4_RULES {
            let v4 = *net;
            let expected = forbidden_reason(IpAddr::V4(v4));
            assert!(expected.is_some(), "{v4}");
            let mapped = IpAddr::V6(v4.to_ipv6_mapped());
            assert_eq!(forbidden_reason(mapped), expected, "{mapped}");
            let nat64 = IpAddr::V6(Ipv6Addr::from(
                u128::from(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0))
                    | u128::from(u32::from(v4)),
            ));
            assert_eq!(forbidden_reason(nat64), expected, "{nat64}");
            let compat = IpAddr::V6(v4.to_ipv6_compatible());
            assert!(is_forbidden(compat), "{compat}");
        }
    }

    #[test]
    fn prefix_helpers_handle_extremes() {
        assert!(v4_in(Ipv4Addr::new(1, 2, 3, 4), Ipv4Addr::UNSPECIFIED, 0));
        assert!(v4_in(
            Ipv4Addr::new(1, 2, 3, 4),
            Ipv4Addr::new(1, 2, 3, 4),
            32
        ));
        assert!(!v4_in(
            Ipv4Addr::new(1, 2, 3, 5),
            Ipv4Addr::new(1, 2, 3, 4),
            32
        ));
        assert!(v6_in(Ipv6Addr::LOCALHOST, Ipv6Addr::UNSPECIFIED, 0));
        assert!(v6_in(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, 128));
        assert!(!v6_in(Ipv6Addr::UNSPECIFIED, Ipv6Addr::LOCALHOST, 128));
    }

    fn url(s: &str) -> reqwest::Url {
        reqwest::Url::parse(s).unwrap()
    }

    #[test]
    fn url_host_literals() {
        let refused = [
            "http://127.0.0.1/",
            "http://127.0.0.1:8080/hook",
            "https://10.0.0.5/x",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[fd00:ec2::254]/latest/meta-data",
            "http://169.254.169.254/latest/meta-data",
            "http://0.0.0.0/",
            "http://0x7f.1/",       // url canonicalises to 127.0.0.1
            "http://2130706433/",   // decimal form of 127.0.0.1
            "http://017700000001/", // octal form of 127.0.0.1
        ];
        for u in refused {
            let err = check_url_host(&url(u), false).unwrap_err();
            assert!(
                matches!(err, SsrfError::ForbiddenAddress { .. }),
                "{u}: {err}"
            );
            check_url_host(&url(u), true).unwrap();
        }
    }

    #[test]
    fn url_host_localhost_names() {
        for u in [
            "http://localhost/",
            "http://LOCALHOST:3000/",
            "http://localhost./",
            "http://api.localhost/",
        ] {
            let err = check_url_host(&url(u), false).unwrap_err();
            assert!(matches!(err, SsrfError::Localhost { .. }), "{u}: {err}");
            check_url_host(&url(u), true).unwrap();
        }
    }

    #[test]
    fn url_host_public_allowed() {
        for u in [
            "https://example.com/hook",
            "https://8.8.8.8/",
            "https://[2606:4700:4700::1111]/",
            "https://localhost.example.com/", // only the suffix form is special
            "https://mylocalhost/",
        ] {
            check_url_host(&url(u), false).unwrap();
        }
    }

    #[test]
    fn url_without_host() {
        let u = url("data:text/plain,hi");
        assert!(matches!(check_url_host(&u, false), Err(SsrfError::NoHost)));
        assert!(matches!(check_url_host(&u, true), Err(SsrfError::NoHost)));
    }

    #[test]
    fn forbidden_literal_error_message() {
        let msg = check_url_host(&url("http://169.254.169.254/"), false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("169.254.169.254"), "{msg}");
        assert!(msg.contains("cloud metadata"), "{msg}");
    }

    fn sa(s: &str) -> SocketAddr {
        SocketAddr::new(ip(s), 0)
    }

    #[test]
    fn filter_keeps_only_allowed() {
        let got = filter_addrs("h", [sa("10.0.0.1"), sa("8.8.8.8"), sa("::1")], false).unwrap();
        assert_eq!(got, vec![sa("8.8.8.8")]);
        let all = filter_addrs("h", [sa("10.0.0.1"), sa("8.8.8.8"), sa("::1")], true).unwrap();
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn filter_all_forbidden_explains() {
        let err = filter_addrs("evil.example", [sa("127.0.0.1"), sa("::1")], false).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("destination evil.example resolves only to forbidden addresses"),
            "{msg}"
        );
        assert!(msg.contains("127.0.0.1: loopback"), "{msg}");
        assert!(msg.contains("::1: loopback"), "{msg}");
    }

    #[test]
    fn filter_truncates_long_lists() {
        let addrs: Vec<SocketAddr> = (1..=10).map(|i| sa(&format!("10.0.0.{i}"))).collect();
        let msg = filter_addrs("h", addrs, false).unwrap_err().to_string();
        assert!(msg.contains("and 6 more"), "{msg}");
        assert!(!msg.contains("10.0.0.5"), "{msg}");
    }

    #[test]
    fn filter_empty_lookup() {
        let err = filter_addrs("h", std::iter::empty(), false).unwrap_err();
        assert!(matches!(err, SsrfError::NoAddresses { .. }));
        let err = filter_addrs("h", std::iter::empty(), true).unwrap_err();
        assert!(matches!(err, SsrfError::NoAddresses { .. }));
    }

    #[tokio::test]
    async fn resolver_refuses_localhost_by_default() {
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let err = match GuardedResolver::new(false).resolve(name).await {
            Ok(addrs) => panic!("expected refusal, got {:?}", addrs.collect::<Vec<_>>()),
            Err(e) => e,
        };
        let msg = err.to_string();
        assert!(
            msg.contains("destination localhost resolves only to forbidden addresses"),
            "{msg}"
        );
        assert!(err.downcast_ref::<SsrfError>().is_some());
    }

    #[tokio::test]
    async fn resolver_allows_localhost_when_private_allowed() {
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let addrs: Vec<SocketAddr> = GuardedResolver::new(true)
            .resolve(name)
            .await
            .unwrap()
            .collect();
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }

    #[tokio::test]
    async fn resolve_guarded_lookup_failure_is_reported() {
        // `.invalid` is guaranteed never to resolve (RFC 6761).
        let err = resolve_guarded("no-such-host.invalid", true)
            .await
            .unwrap_err();
        assert!(matches!(err, SsrfError::Lookup { .. }), "{err}");
    }

    #[test]
    fn resolver_default_is_guarded() {
        assert!(!GuardedResolver::default().allow_private());
        assert!(GuardedResolver::new(true).allow_private());
    }
}

//! Running it for real: `dispatchd.toml.example` (parses, documents every option, states the
//! code's defaults), the systemd unit (`systemd-analyze verify` where it exists), and the
//! notify protocol a `Type=notify` unit relies on.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dispatchd::config::{
    self, Config, Overrides, RawAuth, RawConfig, RawDelivery, RawLog, RawServer, RawStorage,
};
use dispatchd::subscriptions::spec::{RawBreaker, RawRetry};

use crate::support::{Daemon, bin, run_bounded as run};

const EXAMPLE: &str = include_str!("../../dispatchd.toml.example");
const UNIT: &str = include_str!("../../systemd/dispatchd.service");
const WAIT: Duration = Duration::from_secs(60);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The example with its commented-out settings switched on: a line `#key = value` (no space
/// after `#`) is an example setting, `# text` an explanation.
fn uncommented(example: &str) -> String {
    example
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| !c.is_whitespace()) => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn parse(text: &str) -> RawConfig {
    match config::parse_str(text, Some(Path::new("example.toml"))) {
        Ok(r) => r,
        Err(e) => panic!("the example does not parse: {e}"),
    }
}

fn validated(text: &str) -> Config {
    let raw = parse(text);
    match config::validate(
        raw,
        text,
        Some(Path::new("example.toml")),
        &Overrides::default(),
    ) {
        Ok(c) => c,
        Err(e) => panic!("the example does not validate: {e}"),
    }
}

/// Field names of a struct, from its pretty Debug form (fields sit at four spaces).
fn fields(pretty_debug: &str) -> Vec<String> {
    pretty_debug
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("    ")?;
            if rest.starts_with(' ') {
                return None;
            }
            let (name, _) = rest.split_once(':')?;
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                .then(|| name.to_string())
        })
        .collect()
}

/// Keys written (or written as examples) per table header of the example. `[[x]]` and `[x]`
/// both count as `x`; a sub-table `[x.y]` also counts `y` as a key of `x`.
fn keys_by_table(example: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut table = String::new();
    for line in uncommented(example).lines() {
        let l = line.trim();
        if l.starts_with('[') {
            table = l.trim_matches(|c| c == '[' || c == ']').to_string();
            if let Some((parent, child)) = table.split_once('.') {
                out.entry(parent.to_string())
                    .or_default()
                    .insert(child.to_string());
            }
            out.entry(table.clone()).or_default();
            continue;
        }
        if l.starts_with('#') || l.is_empty() {
            continue;
        }
        if let Some((k, _)) = l.split_once('=') {
            let k = k.trim();
            if !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                out.entry(table.clone()).or_default().insert(k.to_string());
            }
        }
    }
    out
}

#[test]
fn example_config_parses_and_states_the_defaults() {
    let c = validated(EXAMPLE);
    assert!(c.subscriptions.is_empty() && c.sources.is_empty() && c.tokens.is_empty());
    let example = parse(EXAMPLE);
    let defaults = RawConfig::default();
    // Every value the example writes equals the built-in default.
    assert_eq!(
        format!("{:?}", example.server),
        format!("{:?}", defaults.server)
    );
    assert_eq!(
        format!("{:?}", example.storage),
        format!("{:?}", defaults.storage)
    );
    assert_eq!(
        format!("{:?}", example.delivery),
        format!("{:?}", defaults.delivery)
    );
    assert_eq!(format!("{:?}", example.log), format!("{:?}", defaults.log));
    assert_eq!(
        format!("{:?}", example.auth),
        format!("{:?}", defaults.auth)
    );
    // And the example is a file the CLI accepts.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dispatchd.toml");
    std::fs::write(&file, EXAMPLE).unwrap();
    let mut cmd = bin();
    cmd.arg("check-config").arg(&file);
    let out = run(cmd, WAIT);
    assert!(
        out.status.success(),
        "check-config refused the example: {}",
        text(&out.stderr)
    );
}

#[test]
fn example_config_documents_every_option() {
    let keys = keys_by_table(EXAMPLE);
    let all = uncommented(EXAMPLE);
    let switched_on = parse(&all);
    let sub = match switched_on.subscriptions.first() {
        Some(s) => format!("{:#?}", s.get_ref()),
        None => panic!("the example has no [[subscriptions]] example"),
    };
    let source = match switched_on.sources.first() {
        Some(s) => format!("{:#?}", s.get_ref()),
        None => panic!("the example has no [[sources]] example"),
    };
    let sections = [
        ("server", format!("{:#?}", RawServer::default())),
        ("storage", format!("{:#?}", RawStorage::default())),
        ("auth", format!("{:#?}", RawAuth::default())),
        ("delivery", format!("{:#?}", RawDelivery::default())),
        ("log", format!("{:#?}", RawLog::default())),
        ("subscriptions", sub),
        ("subscriptions.retry", format!("{:#?}", RawRetry::default())),
        (
            "subscriptions.breaker",
            format!("{:#?}", RawBreaker::default()),
        ),
        ("sources", source),
    ];
    let mut missing = Vec::new();
    for (table, debug) in &sections {
        let names = fields(debug);
        assert!(!names.is_empty(), "no fields found for {table}");
        let written = keys.get(*table).cloned().unwrap_or_default();
        for f in names {
            if !written.contains(&f) {
                missing.push(format!("{table}.{f}"));
            }
        }
    }
    // The top level: every section of RawConfig has its table.
    for f in fields(&format!("{:#?}", RawConfig::default())) {
        if !keys.contains_key(&f) {
            missing.push(f);
        }
    }
    assert!(
        missing.is_empty(),
        "dispatchd.toml.example does not document: {missing:?}"
    );
}

#[test]
fn example_subscriptions_and_sources_are_valid_and_state_the_defaults() {
    // The example's certificate and key paths, pointed at a pair made here.
    let tls = match tempfile::tempdir() {
        Ok(t) => t,
        Err(e) => panic!("tempdir: {e}"),
    };
    let (_, cert, key) = crate::tls::issue();
    let mut all = uncommented(EXAMPLE);
    for (example_path, pem) in [
        ("/etc/dispatchd/tls/cert.pem", cert),
        ("/etc/dispatchd/tls/key.pem", key),
    ] {
        assert!(
            all.contains(example_path),
            "the example names {example_path}"
        );
        let file = tls
            .path()
            .join(example_path.rsplit('/').next().unwrap_or("pem"));
        if let Err(e) = std::fs::write(&file, pem) {
            panic!("write {}: {e}", file.display());
        }
        all = all.replace(example_path, &file.display().to_string());
    }
    let c = validated(&all);
    assert!(c.tls.is_some());
    assert_eq!(c.subscriptions.len(), 1);
    assert!(c.sources.len() >= 3, "{:?}", c.sources);
    assert_eq!(c.tokens.len(), 2);

    // The example subscription spells out the defaults of what it does not customise.
    let minimal = validated(
        "[[subscriptions]]\nid = \"crm\"\nurl = \"https://crm.example.com/hooks\"\nsecrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n",
    );
    let (ex, min) = (&c.subscriptions[0], &minimal.subscriptions[0]);
    assert_eq!(ex.timeout, min.timeout);
    assert_eq!(ex.max_in_flight, min.max_in_flight);
    assert_eq!(ex.ordering, min.ordering);
    assert_eq!(ex.retry, min.retry);
    assert_eq!(ex.breaker, min.breaker);
    assert_eq!(ex.final_status_codes, min.final_status_codes);
    assert_eq!(ex.enabled, min.enabled);

    // So does the github source, and the stripe one.
    let minimal = validated(
        "[[sources]]\nid = \"github\"\nscheme = \"github\"\nsecrets = [\"s\"]\n\n[[sources]]\nid = \"stripe\"\nscheme = \"stripe\"\nsecrets = [\"whsec_x\"]\n",
    );
    for min in &minimal.sources {
        let Some(ex) = c.sources.iter().find(|s| s.id == min.id) else {
            panic!("the example has no {} source", min.id);
        };
        assert_eq!(ex.tolerance, min.tolerance, "{}", ex.id);
        assert_eq!(ex.event_type, min.event_type, "{}", ex.id);
        assert_eq!(ex.type_prefix, min.type_prefix, "{}", ex.id);
        assert_eq!(ex.delivery_id, min.delivery_id, "{}", ex.id);
        assert_eq!(ex.max_body, min.max_body, "{}", ex.id);
    }
}

#[test]
fn the_example_switch_convention_is_what_the_tests_assume() {
    // `uncommented` turns "#key = v" on and leaves "# text" alone.
    assert_eq!(uncommented("#a = 1\n# b = 2\n#\n"), "a = 1\n# b = 2\n#");
    assert_eq!(
        fields("X {\n    alpha: 1,\n    beta: Y {\n        gamma: 2,\n    },\n}"),
        vec!["alpha", "beta"]
    );
}

/// `key=value` lines of the unit, by key (a key may repeat).
fn unit_settings() -> Vec<(String, String)> {
    UNIT.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn unit_value(key: &str) -> Vec<String> {
    unit_settings()
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect()
}

#[test]
fn systemd_unit_is_a_hardened_notify_service() {
    assert_eq!(unit_value("Type"), ["notify"]);
    assert_eq!(
        unit_value("ExecStart"),
        ["/usr/local/bin/dispatchd serve --config /etc/dispatchd/dispatchd.toml"]
    );
    assert_eq!(
        unit_value("Environment"),
        ["DISPATCHD_DATA_DIR=/var/lib/dispatchd"]
    );
    assert_eq!(unit_value("StateDirectory"), ["dispatchd"]);
    for (k, v) in [
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
        ("CapabilityBoundingSet", ""),
        ("SystemCallFilter", "@system-service"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("User", "dispatchd"),
    ] {
        assert!(
            unit_value(k).iter().any(|x| x == v),
            "the unit lacks {k}={v}"
        );
    }
    assert!(!unit_value("WatchdogSec").is_empty());
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let probe = Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        eprintln!("skipped: systemd-analyze is not installed here");
        return;
    }
    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("dispatchd.service");
    std::fs::write(
        &unit,
        UNIT.replace("/usr/local/bin/dispatchd", env!("CARGO_BIN_EXE_dispatchd")),
    )
    .unwrap();
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify").arg(&unit);
    let out = run(cmd, WAIT);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stdout}\n{stderr}"
    );
    // Unknown or malformed settings are warnings naming the unit file.
    assert!(
        !stderr.contains("dispatchd.service") && !stdout.contains("dispatchd.service"),
        "systemd-analyze verify warned:\n{stdout}\n{stderr}"
    );
}

/// Reads notify datagrams until one satisfies `done` or the deadline passes.
#[allow(clippy::disallowed_methods)] // the test's own clock, outside the daemon
fn read_until(sock: &UnixDatagram, seen: &mut Vec<String>, done: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 4096];
    while !done(seen) {
        assert!(
            Instant::now() < deadline,
            "notify messages so far: {seen:?}"
        );
        match sock.recv(&mut buf) {
            Ok(n) => seen.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
    }
}

#[test]
fn notify_socket_hears_ready_watchdog_then_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let sock_env = sock_path.display().to_string();
    let mut d = Daemon::start_with(
        tmp.path(),
        "",
        &[("NOTIFY_SOCKET", &sock_env), ("WATCHDOG_USEC", "200000")],
    );
    let mut seen = Vec::new();
    read_until(&sock, &mut seen, |s| {
        s.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2
    });
    assert!(
        seen[0].lines().any(|l| l == "READY=1"),
        "first message is not READY=1: {seen:?}"
    );
    assert!(!seen.iter().any(|m| m.contains("STOPPING=1")));

    let status = d.terminate();
    assert!(status.success(), "exit {status:?}\n{}", d.logs());
    read_until(&sock, &mut seen, |s| {
        s.iter().any(|m| m.lines().any(|l| l == "STOPPING=1"))
    });
    let ready = seen.iter().position(|m| m.lines().any(|l| l == "READY=1"));
    let stopping = seen
        .iter()
        .position(|m| m.lines().any(|l| l == "STOPPING=1"));
    assert!(ready < stopping, "{seen:?}");
    assert_eq!(
        seen.iter()
            .filter(|m| m.lines().any(|l| l == "READY=1"))
            .count(),
        1,
        "{seen:?}"
    );
}

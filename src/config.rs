//! Configuration: built-in defaults → TOML file → `DISPATCHD_` environment → flags → `validate()`.
//!
//! The file is read into `RawConfig` (serde, unknown keys are errors) and then validated into
//! `Config`, whose fields are typed and checked. Every error names the file, line and key.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::ingest::source::RawSource;
use crate::model::valid_id;
use crate::subscriptions::spec::{
    RawSubscription, SubscriptionDefaults, refuse_forbidden_destination, subscription_from_raw,
};
use crate::subscriptions::spec::{Subscription, SubscriptionSource};
pub use crate::units::{ByteSize, HumanDuration, Tolerance};

/// A configuration problem, with where it is when it comes from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{}: ", file.display(), line)?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            (None, _) => {}
        }
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// All the problems found in one configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Limits of the API listener: open connections and how long their I/O may wait.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// From the first byte of a request head to its end; also how long an idle keep-alive
    /// connection is kept.
    pub header_read_timeout: Duration,
    /// From a complete request head to the end of its body.
    pub body_read_timeout: Duration,
    /// How long one response write may make no progress before the connection is closed.
    pub response_write_timeout: Duration,
}

/// The configuration file as written. Every table rejects unknown keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: RawServer,
    pub storage: RawStorage,
    pub auth: RawAuth,
    pub delivery: RawDelivery,
    pub log: RawLog,
    pub subscriptions: Vec<Spanned<RawSubscription>>,
    pub sources: Vec<Spanned<RawSource>>,
    /// Cluster mode (`storage.backend = "postgres"`): this node's name and its leases.
    pub cluster: RawCluster,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCluster {
    /// This node's name among the nodes sharing the database [default: host name and a
    /// random suffix].
    pub node_id: Option<String>,
    /// How long a destination lease lasts unrenewed: a dead node's destinations move after it.
    pub lease: HumanDuration,
    /// How often a node scans its destinations' due deliveries (the path that does not rely
    /// on notifications).
    pub scan_interval: HumanDuration,
}

impl Default for RawCluster {
    fn default() -> Self {
        Self {
            node_id: None,
            lease: HumanDuration(Duration::from_secs(10)),
            scan_interval: HumanDuration(Duration::from_secs(2)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: String,
    pub max_body: ByteSize,
    pub max_batch: usize,
    pub shutdown_timeout: HumanDuration,
    pub max_connections: usize,
    pub header_read_timeout: HumanDuration,
    pub body_read_timeout: HumanDuration,
    pub response_write_timeout: HumanDuration,
    /// HTTPS on `listen`.
    pub tls: Option<Spanned<RawTls>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body: ByteSize(1 << 20),
            max_batch: 100,
            shutdown_timeout: HumanDuration(Duration::from_secs(30)),
            max_connections: 10_000,
            header_read_timeout: HumanDuration(Duration::from_secs(30)),
            body_read_timeout: HumanDuration(Duration::from_secs(30)),
            response_write_timeout: HumanDuration(Duration::from_secs(30)),
            tls: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStorage {
    pub data_dir: PathBuf,
    pub retention: HumanDuration,
    pub commit_batch: usize,
    pub cache_size: ByteSize,
    /// Size of each of the two commit journal files; 0 turns the journal off.
    pub journal_size: ByteSize,
    /// How often the retention sweeper looks for expired events.
    pub sweep_interval: HumanDuration,
    /// `redb` (the default: one file in `data_dir`) or `postgres` (cluster mode).
    pub backend: String,
    /// The PostgreSQL database of cluster mode (env `DISPATCHD_POSTGRES_URL`).
    pub postgres_url: Option<String>,
    /// Connections each node opens to PostgreSQL.
    pub postgres_pool: usize,
}

impl Default for RawStorage {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./dispatchd-data"),
            retention: HumanDuration(Duration::from_secs(30 * 86_400)),
            commit_batch: 4096,
            cache_size: ByteSize(64 << 20),
            journal_size: ByteSize(4 << 20),
            sweep_interval: HumanDuration(Duration::from_secs(60)),
            backend: "redb".into(),
            postgres_url: None,
            postgres_pool: 16,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    pub tokens: Vec<Spanned<RawToken>>,
    /// HMAC keys of producers that sign their requests instead of sending a bearer token.
    pub keys: Vec<Spanned<RawKey>>,
    /// How far a signed request's timestamp may be from this clock (and how long its
    /// signature is remembered against replays).
    pub tolerance: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub id: String,
    pub secret: String,
    pub scopes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawToken {
    pub token: String,
    pub scopes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDelivery {
    pub timeout: HumanDuration,
    pub max_attempts: u32,
    pub allow_private_networks: bool,
    pub max_response_body: ByteSize,
    pub scheduler_horizon: HumanDuration,
    pub auto_disable_after: HumanDuration,
    /// Most events one `POST /v1/replay` range may cover.
    pub replay_max_events: u64,
    /// Per-event callback URLs (`[delivery.callbacks]`).
    pub callbacks: RawCallbacks,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCallbacks {
    pub enabled: bool,
    pub allow: Vec<String>,
    pub secret: Option<String>,
    pub max_in_flight: u32,
    pub rate_limit: Option<String>,
}

impl Default for RawCallbacks {
    fn default() -> Self {
        Self {
            enabled: false,
            allow: Vec::new(),
            secret: None,
            max_in_flight: 8,
            rate_limit: None,
        }
    }
}

impl Default for RawDelivery {
    fn default() -> Self {
        Self {
            timeout: HumanDuration(Duration::from_secs(30)),
            max_attempts: 10,
            allow_private_networks: false,
            max_response_body: ByteSize(4096),
            scheduler_horizon: HumanDuration(Duration::from_secs(60)),
            auto_disable_after: HumanDuration(Duration::from_secs(5 * 86_400)),
            replay_max_events: 10_000,
            callbacks: RawCallbacks::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub format: LogFormat,
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A bearer token's permissions. `Admin` includes `Publish`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Publish,
    Admin,
}

/// A configured API token. `Debug` hides the token itself.
#[derive(Clone)]
pub struct Token {
    pub token: String,
    pub scopes: Vec<Scope>,
}

/// A producer's HMAC key (`[auth] keys`): requests signed with it get its scopes. `Debug`
/// hides the secret.
#[derive(Clone)]
pub struct ProducerKey {
    pub id: String,
    pub secret: String,
    pub scopes: Vec<Scope>,
}

impl fmt::Debug for ProducerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProducerKey")
            .field("id", &self.id)
            .field("secret", &"<hidden>")
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// Default `[auth] tolerance`: how far a signed request's timestamp may be from this clock.
pub const DEFAULT_KEY_TOLERANCE: Duration = Duration::from_secs(300);

/// Longest `[auth] tolerance`: signatures are remembered that long against replays.
pub const MAX_KEY_TOLERANCE: Duration = Duration::from_secs(3600);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("token", &"<hidden>")
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// Validated configuration: what the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: Option<PathBuf>,
    pub listen: SocketAddr,
    pub max_body: u64,
    pub max_batch: usize,
    pub shutdown_timeout: Duration,
    /// Connections, header/body read and response write deadlines of the API listener.
    pub limits: ServerLimits,
    /// HTTPS on the listener, when `[server.tls]` is set.
    pub tls: Option<crate::tls::TlsSettings>,
    pub data_dir: PathBuf,
    pub retention: Duration,
    pub commit_batch: usize,
    pub cache_size: usize,
    pub journal_size: u64,
    pub tokens: Vec<Token>,
    /// HMAC keys of producers that sign their requests.
    pub keys: Vec<ProducerKey>,
    /// How far a signed request's timestamp may be from this clock.
    pub key_tolerance: Duration,
    pub delivery_timeout: Duration,
    pub max_attempts: u32,
    pub allow_private_networks: bool,
    pub max_response_body: usize,
    pub scheduler_horizon: Duration,
    pub auto_disable_after: Duration,
    pub replay_max_events: u64,
    pub callbacks: crate::callbacks::CallbackSettings,
    pub log_format: LogFormat,
    pub log_level: String,
    pub subscriptions: Vec<Arc<Subscription>>,
    /// Inbound sources, verifiers built: a source that could not be built refused the config.
    pub sources: Vec<Arc<crate::ingest::source::Source>>,
    pub sweep_interval: Duration,
    /// systemd's notify socket and watchdog, read from the environment by `SystemdEnv::from_env`.
    pub systemd: SystemdEnv,
    /// The environment and flag values that won over the file: a reload reads the file again
    /// under the same ones.
    pub overrides: Overrides,
    /// Where the daemon keeps its state.
    pub backend: Backend,
}

/// The storage backend: the embedded redb file (default) or PostgreSQL (cluster mode).
#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    Redb,
    Postgres(PostgresSettings),
}

/// Cluster mode's database and this node's part in it.
#[derive(Clone, PartialEq)]
pub struct PostgresSettings {
    pub url: String,
    pub pool: usize,
    pub node_id: String,
    pub lease: Duration,
    pub scan_interval: Duration,
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("PostgresSettings")
            .field("pool", &self.pool)
            .field("node_id", &self.node_id)
            .field("lease", &self.lease)
            .field("scan_interval", &self.scan_interval)
            .finish_non_exhaustive()
    }
}

/// A node name for a node that was given none: its host name and a random suffix.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into());
    // One suffix per process, so a reload of a file without `node_id` names the same node.
    static SUFFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    format!("{host}-{:08x}", SUFFIX.get_or_init(rand::random::<u32>))
}

impl Config {
    /// The file name of the database inside the data directory.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("dispatchd.redb")
    }
}

/// Overrides from the environment and the command line, applied after the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// `DISPATCHD_POSTGRES_URL`: kept out of the file, where a password would be written down.
    pub postgres_url: Option<String>,
}

/// What systemd tells a `Type=notify` service through its environment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SystemdEnv {
    /// `NOTIFY_SOCKET`: a datagram socket path, or an abstract name starting with `@`.
    pub notify_socket: Option<std::ffi::OsString>,
    /// `WATCHDOG_USEC`, when it is meant for this process (`WATCHDOG_PID` unset or ours).
    pub watchdog: Option<Duration>,
}

impl SystemdEnv {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, once, at start.
    pub fn from_env() -> Self {
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        Self {
            notify_socket: std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()),
            watchdog: std::env::var("WATCHDOG_USEC")
                .ok()
                .and_then(|u| u.trim().parse::<u64>().ok())
                .filter(|&u| u > 0 && for_us)
                .map(Duration::from_micros),
        }
    }
}

impl Overrides {
    /// Reads `DISPATCHD_LISTEN` and `DISPATCHD_DATA_DIR`: the only place the process environment is read.
    pub fn from_env() -> Self {
        Self {
            listen: std::env::var("DISPATCHD_LISTEN")
                .ok()
                .filter(|s| !s.is_empty()),
            data_dir: std::env::var_os("DISPATCHD_DATA_DIR")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            postgres_url: std::env::var("DISPATCHD_POSTGRES_URL")
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }

    /// Later values win.
    pub fn then(self, other: Overrides) -> Self {
        Self {
            listen: other.listen.or(self.listen),
            data_dir: other.data_dir.or(self.data_dir),
            postgres_url: other.postgres_url.or(self.postgres_url),
        }
    }
}

/// Loads and validates a configuration file (or the built-in defaults when `path` is `None`).
pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigErrors> {
    let (raw, text) = match path {
        None => (RawConfig::default(), String::new()),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| {
                ConfigErrors(vec![ConfigError {
                    file: Some(p.to_path_buf()),
                    line: None,
                    key: String::new(),
                    message: format!("cannot read: {e}"),
                }])
            })?;
            (parse_str(&text, Some(p))?, text)
        }
    };
    validate(raw, &text, path, overrides)
}

/// Parses TOML text into the raw structure; errors carry line and key.
pub fn parse_str(text: &str, file: Option<&Path>) -> Result<RawConfig, ConfigErrors> {
    let de = toml::Deserializer::parse(text).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.map(Path::to_path_buf),
            line: e.span().map(|s| line_of(text, s.start)),
            key: String::new(),
            message: first_line(e.message()),
        }])
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        // Spanned tables add a private path segment that means nothing to a reader.
        let key = e
            .path()
            .to_string()
            .replace(".$__serde_spanned_private_value", "")
            .replace("$__serde_spanned_private_value.", "");
        let inner = e.into_inner();
        ConfigErrors(vec![ConfigError {
            file: file.map(Path::to_path_buf),
            line: inner.span().map(|s| line_of(text, s.start)),
            key: if key == "." { String::new() } else { key },
            message: first_line(inner.message()),
        }])
    })
}

fn first_line(s: &str) -> String {
    s.trim().lines().next().unwrap_or("").to_string()
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset.min(text.len()))
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

struct Checker<'a> {
    text: &'a str,
    file: Option<&'a Path>,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    /// Records a problem; `at` is the offset of the table it is in (None for the fixed
    /// top-level tables, found by name). The line is the key's own when it is written.
    fn err(&mut self, at: Option<usize>, key: impl Into<String>, message: impl Into<String>) {
        let key = key.into();
        let field = key.rsplit('.').next().unwrap_or("");
        // The longest table the key's prefix names: `delivery.callbacks.secret` is in
        // `[delivery.callbacks]`, `delivery.timeout` in `[delivery]`.
        let table_at = at.or_else(|| {
            let parts: Vec<&str> = key.split('.').collect();
            (1..parts.len())
                .rev()
                .find_map(|n| find_table(self.text, &parts[..n].join(".")))
        });
        let line = table_at.map(|o| {
            find_key_line(self.text, o, field.split('[').next().unwrap_or(field))
                .unwrap_or_else(|| line_of(self.text, o))
        });
        self.errors.push(ConfigError {
            file: self.file.map(Path::to_path_buf),
            line,
            key,
            message: message.into(),
        });
    }
}

/// The scopes of a token or key (`publish`, `admin`); at least one.
fn scopes_of(names: &[String], c: &mut Checker<'_>, at: Option<usize>, key: &str) -> Vec<Scope> {
    let mut scopes = Vec::new();
    for s in names {
        match s.as_str() {
            "publish" => scopes.push(Scope::Publish),
            "admin" => scopes.push(Scope::Admin),
            other => c.err(
                at,
                format!("{key}.scopes"),
                format!("unknown scope {other:?} (expected \"publish\" or \"admin\")"),
            ),
        }
    }
    if names.is_empty() {
        c.err(at, format!("{key}.scopes"), "needs at least one scope");
    }
    scopes
}

/// The offset of a `[table]` header.
fn find_table(text: &str, table: &str) -> Option<usize> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if t.strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .is_some_and(|name| name.trim() == table)
        {
            return Some(offset);
        }
        offset += line.len();
    }
    None
}

/// The line of `key = …` in the table starting at `start`, before the next table header.
fn find_key_line(text: &str, start: usize, key: &str) -> Option<usize> {
    let first = line_of(text, start);
    for (i, line) in text.lines().enumerate().skip(first - 1) {
        let t = line.trim_start();
        if i + 1 > first && t.starts_with('[') {
            return None;
        }
        // `key = …`, or `key` inside an inline table on the header line of an array item.
        let rest = t.strip_prefix(key).map(str::trim_start);
        if rest.is_some_and(|r| r.starts_with('=')) {
            return Some(i + 1);
        }
    }
    None
}

/// Turns the raw file into a checked `Config`, collecting every problem rather than the first.
pub fn validate(
    raw: RawConfig,
    text: &str,
    file: Option<&Path>,
    overrides: &Overrides,
) -> Result<Config, ConfigErrors> {
    let mut c = Checker {
        text,
        file,
        errors: Vec::new(),
    };
    let listen_text = overrides
        .listen
        .clone()
        .unwrap_or_else(|| raw.server.listen.clone());
    let listen = match listen_text.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            c.err(
                None,
                "server.listen",
                format!("{listen_text:?} is not an address like 127.0.0.1:8080"),
            );
            SocketAddr::from(([127, 0, 0, 1], 8080))
        }
    };
    if raw.server.max_body.0 < 1024 {
        c.err(None, "server.max_body", "must be at least 1KiB");
    }
    if raw.server.max_connections == 0 || raw.server.max_connections > 1_000_000 {
        c.err(
            None,
            "server.max_connections",
            "must be between 1 and 1000000",
        );
    }
    for (key, d) in [
        (
            "server.header_read_timeout",
            raw.server.header_read_timeout.0,
        ),
        ("server.body_read_timeout", raw.server.body_read_timeout.0),
        (
            "server.response_write_timeout",
            raw.server.response_write_timeout.0,
        ),
    ] {
        if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
            c.err(None, key, "must be between 100ms and 1h");
        }
    }
    let tls = raw.server.tls.as_ref().and_then(|t| {
        let at = Some(t.span().start);
        let t = t.get_ref();
        match crate::tls::load(&t.cert, &t.key) {
            Ok(certified) => Some(crate::tls::TlsSettings {
                cert: t.cert.clone(),
                key: t.key.clone(),
                certified,
            }),
            Err((field, message)) => {
                c.err(at, format!("server.tls.{field}"), message);
                None
            }
        }
    });
    if raw.server.max_batch == 0 || raw.server.max_batch > 10_000 {
        c.err(None, "server.max_batch", "must be between 1 and 10000");
    }
    let journal = raw.storage.journal_size.0;
    if journal != 0 && journal < crate::storage::journal::MIN_SIZE {
        c.err(
            None,
            "storage.journal_size",
            "must be 0 (no journal) or at least 1MiB",
        );
    }
    if raw.storage.commit_batch == 0 {
        c.err(None, "storage.commit_batch", "must be at least 1");
    }
    if raw.storage.sweep_interval.0.is_zero() {
        c.err(None, "storage.sweep_interval", "must be more than zero");
    }
    let data_dir = overrides
        .data_dir
        .clone()
        .unwrap_or_else(|| raw.storage.data_dir.clone());
    let backend = match raw.storage.backend.as_str() {
        "redb" => Backend::Redb,
        "postgres" => {
            let url = overrides
                .postgres_url
                .clone()
                .or_else(|| raw.storage.postgres_url.clone());
            let url = match url {
                Some(u) if u.parse::<tokio_postgres::Config>().is_ok() => u,
                Some(_) => {
                    c.err(
                        None,
                        "storage.postgres_url",
                        "is not a PostgreSQL connection URL",
                    );
                    String::new()
                }
                None => {
                    c.err(
                        None,
                        "storage.postgres_url",
                        "is required with backend = \"postgres\" (or set DISPATCHD_POSTGRES_URL)",
                    );
                    String::new()
                }
            };
            // A node keeps two connections for its group commits (publishes, outcomes) and
            // gives a quarter to its destinations' reads; fewer than six would leave its
            // lease rounds, scans and API reads waiting on the pool.
            if raw.storage.postgres_pool < 6 || raw.storage.postgres_pool > 1000 {
                c.err(
                    None,
                    "storage.postgres_pool",
                    "must be between 6 and 1000 (a node keeps two for its group commits and a quarter for its destinations' reads)",
                );
            }
            let lease = raw.cluster.lease.0;
            if lease < Duration::from_secs(1) || lease > Duration::from_secs(3600) {
                c.err(None, "cluster.lease", "must be between 1s and 1h");
            }
            let scan = raw.cluster.scan_interval.0;
            if scan < Duration::from_millis(100) || scan > Duration::from_secs(600) {
                c.err(
                    None,
                    "cluster.scan_interval",
                    "must be between 100ms and 10m",
                );
            }
            let node_id = match &raw.cluster.node_id {
                Some(n) if n.is_empty() || n.len() > 200 || n.chars().any(char::is_control) => {
                    c.err(
                        None,
                        "cluster.node_id",
                        "must be 1 to 200 printable characters",
                    );
                    String::new()
                }
                Some(n) => n.clone(),
                None => default_node_id(),
            };
            Backend::Postgres(PostgresSettings {
                url,
                pool: raw.storage.postgres_pool,
                node_id,
                lease,
                scan_interval: scan,
            })
        }
        other => {
            c.err(
                None,
                "storage.backend",
                format!("must be \"redb\" or \"postgres\", not {other:?}"),
            );
            Backend::Redb
        }
    };

    let mut tokens = Vec::new();
    for (i, t) in raw.auth.tokens.iter().enumerate() {
        let at = Some(t.span().start);
        let t = t.get_ref();
        let key = format!("auth.tokens[{i}]");
        if t.token.len() < 16 {
            c.err(at, format!("{key}.token"), "must be at least 16 characters");
        }
        let scopes = scopes_of(&t.scopes, &mut c, at, &key);
        tokens.push(Token {
            token: t.token.clone(),
            scopes,
        });
    }
    let mut keys: Vec<ProducerKey> = Vec::new();
    for (i, k) in raw.auth.keys.iter().enumerate() {
        let at = Some(k.span().start);
        let k = k.get_ref();
        let key = format!("auth.keys[{i}]");
        if !valid_id(&k.id) {
            c.err(
                at,
                format!("{key}.id"),
                "must be 1-64 characters of A-Z a-z 0-9 _ . -",
            );
        } else if keys.iter().any(|o| o.id == k.id) {
            c.err(at, format!("{key}.id"), format!("{:?} is used twice", k.id));
        }
        if k.secret.len() < 32 {
            c.err(
                at,
                format!("{key}.secret"),
                "must be at least 32 characters (e.g. openssl rand -hex 32)",
            );
        }
        let scopes = scopes_of(&k.scopes, &mut c, at, &key);
        keys.push(ProducerKey {
            id: k.id.clone(),
            secret: k.secret.clone(),
            scopes,
        });
    }
    let key_tolerance = raw.auth.tolerance.map_or(DEFAULT_KEY_TOLERANCE, |d| d.0);
    if key_tolerance.is_zero() || key_tolerance > MAX_KEY_TOLERANCE {
        c.err(
            None,
            "auth.tolerance",
            "must be more than zero and at most 1h",
        );
    }

    let d = &raw.delivery;
    if d.max_attempts == 0 {
        c.err(None, "delivery.max_attempts", "must be at least 1");
    }
    if d.timeout.0.is_zero() {
        c.err(None, "delivery.timeout", "must be more than zero");
    }
    if d.replay_max_events == 0 {
        c.err(None, "delivery.replay_max_events", "must be at least 1");
    }
    let cb = &d.callbacks;
    for (i, a) in cb.allow.iter().enumerate() {
        let bad = if a.contains("://") {
            crate::subscriptions::spec::parse_destination(a).err()
        } else if a.is_empty() || a.contains('/') || a.contains(char::is_whitespace) {
            Some(format!(
                "{a:?} is neither a host nor an http(s):// URL prefix"
            ))
        } else {
            None
        };
        if let Some(m) = bad {
            c.err(None, format!("delivery.callbacks.allow[{i}]"), m);
        }
    }
    if let Some(sec) = &cb.secret
        && let Err(e) = crate::signing::parse_secret(sec)
    {
        c.err(None, "delivery.callbacks.secret", e.to_string());
    }
    if cb.max_in_flight == 0 || cb.max_in_flight > 1024 {
        c.err(
            None,
            "delivery.callbacks.max_in_flight",
            "must be between 1 and 1024",
        );
    }
    let callback_rate = match cb.rate_limit.as_deref() {
        None => None,
        Some(r) => match crate::ratelimit::parse_rate(r) {
            Ok(v) => Some(v),
            Err(m) => {
                c.err(None, "delivery.callbacks.rate_limit", m);
                None
            }
        },
    };
    let callbacks = crate::callbacks::CallbackSettings {
        enabled: cb.enabled,
        allow: cb.allow.clone(),
        secret: cb.secret.clone(),
        max_in_flight: cb.max_in_flight,
        rate_limit: callback_rate,
    };

    let defaults = SubscriptionDefaults {
        timeout: d.timeout.0,
        max_attempts: d.max_attempts,
    };
    let mut subscriptions = Vec::new();
    let mut seen = HashSet::new();
    for (i, s) in raw.subscriptions.iter().enumerate() {
        let at = Some(s.span().start);
        let key = format!("subscriptions[{i}]");
        match subscription_from_raw(s.get_ref(), &defaults, SubscriptionSource::Config) {
            Ok(sub) => {
                if let Err(m) = refuse_forbidden_destination(&sub.url, d.allow_private_networks) {
                    c.err(at, format!("{key}.url"), m);
                }
                if !seen.insert(sub.id.clone()) {
                    c.err(
                        at,
                        format!("{key}.id"),
                        format!("duplicate id {:?}", sub.id),
                    );
                }
                subscriptions.push(Arc::new(sub));
            }
            Err(errs) => {
                for (field, msg) in errs {
                    c.err(at, format!("{key}.{field}"), msg);
                }
            }
        }
    }

    let mut source_ids = HashSet::new();
    let mut sources = Vec::new();
    for (i, s) in raw.sources.iter().enumerate() {
        let at = Some(s.span().start);
        let src = s.get_ref();
        let key = format!("sources[{i}]");
        if !valid_id(&src.id) {
            c.err(
                at,
                format!("{key}.id"),
                "must be 1-64 characters of A-Z a-z 0-9 _ . -",
            );
        }
        if !source_ids.insert(src.id.clone()) {
            c.err(
                at,
                format!("{key}.id"),
                format!("duplicate id {:?}", src.id),
            );
        }
        // Scheme, secrets and fields are checked by building the verifier itself.
        match crate::ingest::source::Source::from_raw(src, raw.server.max_body.0) {
            Ok(source) => sources.push(Arc::new(source)),
            Err(errs) => {
                for (field, msg) in errs {
                    c.err(at, format!("{key}.{field}"), msg);
                }
            }
        }
    }

    if !c.errors.is_empty() {
        return Err(ConfigErrors(c.errors));
    }
    Ok(Config {
        file: file.map(Path::to_path_buf),
        listen,
        max_body: raw.server.max_body.0,
        max_batch: raw.server.max_batch,
        shutdown_timeout: raw.server.shutdown_timeout.0,
        tls,
        limits: ServerLimits {
            max_connections: raw.server.max_connections,
            header_read_timeout: raw.server.header_read_timeout.0,
            body_read_timeout: raw.server.body_read_timeout.0,
            response_write_timeout: raw.server.response_write_timeout.0,
        },
        data_dir,
        retention: raw.storage.retention.0,
        commit_batch: raw.storage.commit_batch,
        cache_size: usize::try_from(raw.storage.cache_size.0).unwrap_or(usize::MAX),
        journal_size: raw.storage.journal_size.0,
        tokens,
        keys,
        key_tolerance,
        delivery_timeout: d.timeout.0,
        max_attempts: d.max_attempts,
        allow_private_networks: d.allow_private_networks,
        max_response_body: usize::try_from(d.max_response_body.0).unwrap_or(4096),
        scheduler_horizon: d.scheduler_horizon.0,
        auto_disable_after: d.auto_disable_after.0,
        replay_max_events: d.replay_max_events,
        callbacks,
        log_format: raw.log.format,
        log_level: raw.log.level,
        subscriptions,
        sources,
        sweep_interval: raw.storage.sweep_interval.0,
        systemd: SystemdEnv::default(),
        overrides: overrides.clone(),
        backend,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subscriptions::Ordering;

    fn parse_ok(text: &str) -> Config {
        let raw = match parse_str(text, Some(Path::new("t.toml"))) {
            Ok(r) => r,
            Err(e) => panic!("parse failed: {e}"),
        };
        match validate(raw, text, Some(Path::new("t.toml")), &Overrides::default()) {
            Ok(c) => c,
            Err(e) => panic!("validate failed: {e}"),
        }
    }

    fn errors(text: &str) -> String {
        match parse_str(text, Some(Path::new("t.toml")))
            .and_then(|raw| validate(raw, text, Some(Path::new("t.toml")), &Overrides::default()))
        {
            Ok(_) => panic!("expected an error for {text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn journal_size_is_off_or_at_least_a_mebibyte() {
        let e = errors("[storage]\njournal_size = \"64KiB\"\n");
        assert!(e.contains("storage.journal_size"), "{e}");
        assert!(e.contains("at least 1MiB"), "{e}");
        assert_eq!(parse_ok("[storage]\njournal_size = 0\n").journal_size, 0);
        assert_eq!(
            parse_ok("[storage]\njournal_size = \"1MiB\"\n").journal_size,
            1 << 20
        );
    }

    #[test]
    fn subscription_headers_must_be_sendable() {
        let sub = |headers: &str| {
            format!(
                "[[subscriptions]]\nid = \"a\"\nurl = \"https://x.test/h\"\n\
                 secrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\nheaders = {headers}\n"
            )
        };
        let e = errors(&sub(r#"{ "X-Note" = "two\nlines" }"#));
        assert!(e.contains("X-Note") && e.contains("cannot hold"), "{e}");
        let e = errors(&sub(r#"{ "Webhook-Id" = "x" }"#));
        assert!(e.contains("cannot be set"), "{e}");
        let c = parse_ok(&sub(r#"{ "X-Api-Key" = "k 1", "X-Trace" = "t" }"#));
        let map = crate::delivery::attempt::fixed_headers(&c.subscriptions[0])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(map["x-api-key"], "k 1");
        assert_eq!(map["x-trace"], "t");
        assert_eq!(map["content-type"], "application/json");
    }

    #[test]
    fn defaults_without_file() {
        let c = parse_ok("");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.max_body, 1 << 20);
        assert_eq!(
            c.db_path(),
            PathBuf::from("./dispatchd-data/dispatchd.redb")
        );
        assert_eq!(c.retention, Duration::from_secs(30 * 86_400));
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = errors("[server]\nlisten = \"127.0.0.1:1\"\nmax_bodyy = 3\n");
        assert!(e.starts_with("t.toml:3: "), "{e}");
        assert!(e.contains("max_bodyy"), "{e}");
    }

    #[test]
    fn bad_duration_names_key() {
        let e = errors("[delivery]\n\ntimeout = \"soon\"\n");
        assert!(e.contains("t.toml:3"), "{e}");
        assert!(e.contains("delivery.timeout"), "{e}");
        assert!(e.contains("soon"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("1MiB"), Ok(ByteSize(1 << 20)));
        assert_eq!(ByteSize::parse("512 KiB"), Ok(ByteSize(512 << 10)));
        assert_eq!(ByteSize::parse("10MB"), Ok(ByteSize(10_000_000)));
        assert_eq!(ByteSize::parse("42"), Ok(ByteSize(42)));
        assert!(ByteSize::parse("lots").is_err());
        assert!(ByteSize::parse("1XB").is_err());
    }

    #[test]
    fn subscription_validation_points_at_its_table() {
        let text = "[[subscriptions]]\nid = \"a\"\nurl = \"https://x.test/h\"\nsecrets = [\"whsec_AAAAAAAAAAAAAAAAAAAAAAAA\"]\n\n[[subscriptions]]\nid = \"b\"\nurl = \"ftp://nope\"\nsecrets = [\"whsec_AAAAAAAAAAAAAAAAAAAAAAAA\"]\nrate_limit = \"fast\"\n";
        let e = errors(text);
        assert!(e.contains("t.toml:8: subscriptions[1].url"), "{e}");
        assert!(e.contains("t.toml:10: subscriptions[1].rate_limit"), "{e}");
        assert!(e.contains("subscriptions[1].rate_limit"), "{e}");
        assert!(!e.contains("subscriptions[0]"), "{e}");
    }

    #[test]
    fn full_subscription_parses() {
        let text = r#"
[[subscriptions]]
id = "crm"
url = "https://crm.example.com/hooks"
event_types = ["order.*", "invoice.paid"]
secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
headers = { "X-Api-Key" = "k" }
rate_limit = "50/s"
max_in_flight = 4
ordering = "fifo"
retry = { max_attempts = 8, initial = "5s", max = "1h" }
"#;
        let c = parse_ok(text);
        let s = &c.subscriptions[0];
        assert_eq!(s.ordering, Ordering::Fifo);
        assert_eq!(s.retry.max_attempts, 8);
        assert_eq!(s.rate_limit, Some(50.0));
        assert!(s.wants("order.created"));
        assert!(!s.wants("invoice.created"));
    }

    #[test]
    fn debug_output_hides_secrets() {
        let c = parse_ok(
            "[auth]\ntokens = [ { token = \"tok-0123456789abcdef\", scopes = [\"admin\"] } ]\n\
             [[subscriptions]]\nid = \"a\"\nurl = \"https://x.test/h\"\n\
             secrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\nheaders = { \"X-Api-Key\" = \"hunter2\" }\n",
        );
        let dbg = format!("{c:?}");
        for secret in [
            "tok-0123456789abcdef",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "hunter2",
        ] {
            assert!(!dbg.contains(secret), "{secret} leaks in {dbg}");
        }
    }

    #[test]
    fn tokens_and_scopes() {
        let e = errors("[auth]\ntokens = [ { token = \"short\", scopes = [\"root\"] } ]\n");
        assert!(e.contains("auth.tokens[0].token"), "{e}");
        assert!(e.contains("unknown scope \"root\""), "{e}");
    }

    #[test]
    fn the_backend_is_redb_unless_postgres_is_asked_for_with_a_url() {
        assert_eq!(parse_ok("").backend, Backend::Redb);
        let e = errors("[storage]\nbackend = \"mysql\"\n");
        assert!(e.contains("storage.backend") && e.contains("mysql"), "{e}");
        let e = errors("[storage]\nbackend = \"postgres\"\n");
        assert!(e.contains("storage.postgres_url"), "{e}");
        assert!(e.contains("DISPATCHD_POSTGRES_URL"), "{e}");
        let e = errors(
            "[storage]\nbackend = \"postgres\"\npostgres_url = \"postgres://h/db\"\n\
             [cluster]\nlease = \"100ms\"\nscan_interval = \"1h\"\n",
        );
        assert!(
            e.contains("cluster.lease") && e.contains("cluster.scan_interval"),
            "{e}"
        );
        let pool = |n: u32| {
            format!(
                "[storage]\nbackend = \"postgres\"\npostgres_url = \"postgres://h/db\"\npostgres_pool = {n}\n"
            )
        };
        let e = errors(&pool(5));
        assert!(
            e.contains("storage.postgres_pool") && e.contains("6"),
            "{e}"
        );
        match parse_ok(&pool(6)).backend {
            Backend::Postgres(p) => assert_eq!(p.pool, 6),
            other => panic!("{other:?}"),
        }
        let c = parse_ok(
            "[storage]\nbackend = \"postgres\"\npostgres_url = \"postgres://u:pw@h:5433/db\"\n\
             [cluster]\nnode_id = \"node-a\"\nlease = \"5s\"\n",
        );
        match &c.backend {
            Backend::Postgres(p) => {
                assert_eq!(p.node_id, "node-a");
                assert_eq!(p.lease, Duration::from_secs(5));
                assert_eq!(p.pool, 16);
                // The password never reaches a log line through Debug.
                assert!(!format!("{p:?}").contains("pw"), "{p:?}");
            }
            other => panic!("{other:?}"),
        }
        // Without a node id, one is made up once per process: a reload names the same node.
        let text = "[storage]\nbackend = \"postgres\"\npostgres_url = \"postgres://h/db\"\n";
        assert_eq!(parse_ok(text).backend, parse_ok(text).backend);
    }

    #[test]
    fn overrides_win() {
        let raw = RawConfig::default();
        let o = Overrides {
            listen: Some("127.0.0.1:0".into()),
            data_dir: Some(PathBuf::from("/tmp/x")),
            postgres_url: None,
        };
        let c = match validate(raw, "", None, &o) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
    }
}

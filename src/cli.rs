//! Command-line interface: clap types, turned into a validated configuration.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, ConfigErrors, Overrides};

/// dispatchd: a webhook delivery daemon.
#[derive(Debug, Parser)]
#[command(name = "dispatchd", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (built-in defaults when no config file is given).
    Serve(ServeArgs),
    /// Validate a configuration file and print every problem with its line.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Download a consistent copy of a running daemon's database (admin token).
    Backup(BackupArgs),
    /// Check a database file (a backup, or the file of a stopped daemon): schema version,
    /// every record, every index; prints rows per table.
    VerifyDb {
        /// The database file.
        file: PathBuf,
    },
    /// Events of a running daemon (admin token).
    Events(EventsArgs),
    /// Deliveries of a running daemon: list, show, retry, cancel (admin token).
    Deliveries(DeliveriesArgs),
    /// Make new deliveries of stored events: one event, a time range or a seq range.
    Replay(ReplayArgs),
    /// The dead-letter queue: list, redrive.
    DeadLetters(DeadLettersArgs),
    /// Subscriptions: list, show, create, delete, pause, resume, rotate.
    Subscriptions(SubscriptionsArgs),
    /// Make a running daemon re-read its config file (like SIGHUP).
    Reload(ReloadArgs),
}

/// How operator commands reach a running daemon.
#[derive(Debug, Clone, clap::Args)]
pub struct Conn {
    /// The daemon's API [default: the listen address of --config, else http://127.0.0.1:8080].
    #[arg(long, env = "DISPATCHD_URL", global = true)]
    pub url: Option<String>,
    /// An admin-scope API token [default: the first admin token of --config].
    #[arg(long, env = "DISPATCHD_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// The daemon's config file, to take the address and token from.
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// A PEM CA certificate to trust for an https:// daemon (e.g. a private CA).
    #[arg(long, env = "DISPATCHD_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The time window and priority of a list (events by when they were received, deliveries by
/// when they were made).
#[derive(Debug, Clone, clap::Args)]
pub struct Window {
    /// At or after (RFC 3339 or unix seconds).
    #[arg(long)]
    pub since: Option<String>,
    /// Before (RFC 3339 or unix seconds).
    #[arg(long)]
    pub until: Option<String>,
    /// Only this priority: high, normal or low.
    #[arg(long)]
    pub priority: Option<String>,
}

/// Paging of list commands.
#[derive(Debug, Clone, clap::Args)]
pub struct Paging {
    /// Rows per page (1-1000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Continue from a cursor a previous page printed.
    #[arg(long)]
    pub cursor: Option<String>,
    /// Follow cursors to the end.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[command(subcommand)]
    pub command: EventsCommand,
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// List events in sequence order.
    List {
        /// Only this event type.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        #[command(flatten)]
        window: Window,
        #[command(flatten)]
        paging: Paging,
    },
    /// One event, its data, its delivery counts and its deliveries.
    Show { id: String },
    /// Every attempt of every delivery of an event, newest first.
    Attempts {
        id: String,
        #[command(flatten)]
        paging: Paging,
    },
    /// Cancel every delivery of an event not terminal yet.
    Cancel { id: String },
    /// A batch's events and their deliveries by status.
    Batch { id: String },
}

#[derive(Debug, clap::Args)]
pub struct DeliveriesArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[command(subcommand)]
    pub command: DeliveriesCommand,
}

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// List deliveries in id order.
    List {
        /// pending, in_flight, succeeded, retrying, dead or cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        subscription: Option<String>,
        /// The type of the delivery's event.
        #[arg(long)]
        event_type: Option<String>,
        #[command(flatten)]
        window: Window,
        #[command(flatten)]
        paging: Paging,
    },
    /// One delivery and its attempts.
    Show { id: String },
    /// Attempt a delivery again now (dead, retrying or cancelled).
    Retry { id: String },
    /// Cancel a pending or retrying delivery.
    Cancel { id: String },
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Replay one event.
    #[arg(long = "event", conflicts_with_all = ["since", "from_seq"])]
    pub event_id: Option<String>,
    /// Start of a time range (inclusive; RFC 3339 or unix seconds).
    #[arg(long, requires = "until")]
    pub since: Option<String>,
    /// End of a time range (exclusive).
    #[arg(long, requires = "since")]
    pub until: Option<String>,
    /// First event sequence number (inclusive).
    #[arg(long, requires = "to_seq", conflicts_with = "since")]
    pub from_seq: Option<u64>,
    /// Last event sequence number (inclusive).
    #[arg(long, requires = "from_seq")]
    pub to_seq: Option<u64>,
    /// Only to this subscription.
    #[arg(long)]
    pub subscription: Option<String>,
    /// Only events of these type patterns (repeatable; `*` matches any run).
    #[arg(long = "event-type")]
    pub event_types: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct DeadLettersArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[command(subcommand)]
    pub command: DeadLettersCommand,
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// List dead letters.
    List {
        #[arg(long)]
        subscription: Option<String>,
        /// Dead-lettered at or after (RFC 3339 or unix seconds).
        #[arg(long)]
        since: Option<String>,
        #[command(flatten)]
        paging: Paging,
    },
    /// Attempt dead letters again now: all, or one subscription's, or those since a time.
    Redrive {
        #[arg(long)]
        subscription: Option<String>,
        /// Dead-lettered at or after (RFC 3339 or unix seconds).
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
pub struct SubscriptionsArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[command(subcommand)]
    pub command: SubscriptionsCommand,
}

#[derive(Debug, Subcommand)]
pub enum SubscriptionsCommand {
    /// List subscriptions (config ones are read-only).
    List,
    /// One subscription.
    Show { id: String },
    /// Create a subscription over the API.
    Create {
        #[arg(long)]
        id: Option<String>,
        /// The endpoint deliveries are posted to (--url is the daemon's address).
        #[arg(long, value_name = "URL")]
        endpoint: Option<String>,
        /// Event type patterns (repeatable) [default: *].
        #[arg(long = "event-type")]
        event_types: Vec<String>,
        /// whsec_ secrets (repeatable) [default: one is generated and printed once].
        #[arg(long = "secret")]
        secrets: Vec<String>,
        /// Payload filter, JSON: {"field": "total", "gte": 100}.
        #[arg(long)]
        filter: Option<String>,
        /// Custom header NAME=VALUE (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// Rate limit like 50/s.
        #[arg(long)]
        rate_limit: Option<String>,
        #[arg(long)]
        max_in_flight: Option<u32>,
        /// unordered or fifo.
        #[arg(long)]
        ordering: Option<String>,
        /// The whole definition as a JSON file (flags above override its fields).
        #[arg(long)]
        from_file: Option<PathBuf>,
    },
    /// Delete an API subscription; its deliveries still to be attempted are cancelled.
    Delete { id: String },
    /// Hold deliveries (they are still made and kept) until resumed.
    Pause { id: String },
    /// Resume a paused or disabled subscription.
    Resume { id: String },
    /// Add a new signing secret; the old ones keep signing for the grace period.
    Rotate {
        id: String,
        /// The new secret [default: generated and printed].
        #[arg(long)]
        secret: Option<String>,
        /// How long the old secrets keep signing [default: 24h].
        #[arg(long)]
        grace: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// Where to write the copy; written to FILE.partial, checked, then renamed.
    #[arg(long, short)]
    pub output: PathBuf,
    /// The daemon's API.
    #[arg(long, env = "DISPATCHD_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// An admin-scope API token.
    #[arg(long, env = "DISPATCHD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A PEM CA certificate to trust for an https:// daemon.
    #[arg(long, env = "DISPATCHD_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (TOML).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Listen address, overriding the file and DISPATCHD_LISTEN.
    #[arg(long)]
    pub listen: Option<String>,
    /// Data directory, overriding the file and DISPATCHD_DATA_DIR.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl ServeArgs {
    /// defaults → file → environment → flags → validate.
    pub fn config(&self) -> Result<Config, ConfigErrors> {
        let overrides = Overrides::from_env().then(Overrides {
            listen: self.listen.clone(),
            data_dir: self.data_dir.clone(),
            postgres_url: None,
        });
        let mut config = config::load(self.config.as_deref(), &overrides)?;
        config.systemd = config::SystemdEnv::from_env();
        Ok(config)
    }
}

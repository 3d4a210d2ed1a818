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
        });
        config::load(self.config.as_deref(), &overrides)
    }
}

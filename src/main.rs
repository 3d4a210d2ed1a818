//! The `dispatchd` binary: parse the command line, start logging, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use dispatchd::cli::{Cli, Command};
use dispatchd::config::{self, LogFormat, Overrides};

/// mimalloc instead of the system allocator: the request path allocates small buffers on
/// every worker thread, and glibc's malloc spent ~10% of the daemon's CPU on them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match config::load(Some(&file), &Overrides::default()) {
            Ok(c) => {
                println!(
                    "{}: ok ({} subscriptions, {} sources, {} tokens)",
                    file.display(),
                    c.subscriptions.len(),
                    c.sources.len(),
                    c.tokens.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Backup(args) => backup(&args),
        Command::VerifyDb { file } => verify_db(&file),
        Command::Events(a) => dispatchd::client::ops::events(&a),
        Command::Deliveries(a) => dispatchd::client::ops::deliveries(&a),
        Command::Replay(a) => dispatchd::client::ops::replay(&a),
        Command::DeadLetters(a) => dispatchd::client::ops::dead_letters(&a),
        Command::Subscriptions(a) => dispatchd::client::ops::subscriptions(&a),
        Command::Reload(a) => dispatchd::client::ops::reload(&a),
        Command::Serve(args) => {
            let config = match args.config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(config.log_format, &config.log_level);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(dispatchd::daemon::serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("dispatchd: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn backup(args: &dispatchd::cli::BackupArgs) -> ExitCode {
    match dispatchd::client::backup::backup(
        &args.url,
        args.token.as_deref(),
        args.ca_cert.as_deref(),
        &args.output,
    ) {
        Ok(s) => {
            println!("{}: {} bytes, checked", s.path.display(), s.bytes);
            print_rows(&s.report);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dispatchd backup: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn verify_db(file: &std::path::Path) -> ExitCode {
    let arg = file.to_string_lossy();
    if arg.starts_with("postgres://") || arg.starts_with("postgresql://") {
        eprintln!(
            "dispatchd verify-db: checks the embedded backend's redb file; a PostgreSQL \
             deployment (storage.backend = \"postgres\") is checked and backed up with \
             PostgreSQL's own tools (pg_dump, pg_basebackup, amcheck)"
        );
        return ExitCode::from(2);
    }
    match dispatchd::client::backup::verify_db(file) {
        Ok(r) => {
            println!(
                "{}: schema version {}, {}",
                file.display(),
                r.schema_version,
                if r.ok() { "ok" } else { "PROBLEMS" }
            );
            if r.schema_version < dispatchd::storage::schema::SCHEMA_VERSION {
                println!(
                    "(dispatchd upgrades it to schema version {} when it next opens it)",
                    dispatchd::storage::schema::SCHEMA_VERSION
                );
            }
            print_rows(&r);
            for p in &r.problems {
                println!("problem: {p}");
            }
            if r.ok() {
                ExitCode::SUCCESS
            } else {
                if r.problem_count > r.problems.len() as u64 {
                    println!("... {} problems in all", r.problem_count);
                }
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("dispatchd verify-db: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn print_rows(r: &dispatchd::storage::backup::VerifyReport) {
    for (table, n) in &r.tables {
        println!("  {table:<36} {n:>12}");
    }
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

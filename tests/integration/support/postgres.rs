//! A real PostgreSQL server for the tests that need one: `initdb` into a temp dir, the
//! server on its own loopback port, stopped when dropped. PostgreSQL refuses to run as root,
//! so as root it runs as the distribution's `postgres` account (`runuser`). `.ci/run` installs
//! the server from the distribution's packages; a test never reaches a server it did not
//! start.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::run_bounded;

const WAIT: Duration = Duration::from_secs(60);

/// A running server; stopped (fast shutdown) and its files removed when dropped.
pub struct Postgres {
    _dir: tempfile::TempDir,
    bin: PathBuf,
    data: PathBuf,
    pub port: u16,
}

/// Where the server's programs are: on `PATH`, or in Debian's versioned directory.
fn bin_dir() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .find(|d| d.join("initdb").is_file() && d.join("postgres").is_file())
    });
    if let Some(d) = on_path {
        return d;
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("initdb").is_file())
        .collect();
    versions.sort();
    match versions.pop() {
        Some(d) => d,
        None => panic!(
            "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); \
             .ci/run installs it (apt-get install postgresql)"
        ),
    }
}

/// Whether this process runs as root (then the server runs as `postgres`).
fn is_root() -> bool {
    // Read from /proc: the standard library has no geteuid.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// A command for one of the server's programs, as the user that may run it.
fn program(bin: &Path, name: &str) -> Command {
    let path = bin.join(name);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

/// A free loopback port (taken by binding port 0, then released).
fn free_port() -> u16 {
    match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(e) => panic!("no free port: {e}"),
    }
}

impl Postgres {
    /// Initialises a cluster (superuser `dispatchd`, trust auth on loopback) and starts it.
    pub fn start() -> Postgres {
        let bin = bin_dir();
        let dir = match tempfile::Builder::new().prefix("dispatchd-pg-").tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let data = dir.path().join("data");
        if is_root() {
            // The server's account must own its directory.
            let out = run_bounded(
                {
                    let mut c = Command::new("chown");
                    c.arg("postgres").arg(dir.path());
                    c
                },
                WAIT,
            );
            assert!(out.status.success(), "chown: {:?}", out);
        }
        let mut init = program(&bin, "initdb");
        init.arg("-D").arg(&data).args([
            "-U",
            "dispatchd",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        let out = run_bounded(init, WAIT);
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = Postgres {
            _dir: dir,
            bin,
            data,
            port: free_port(),
        };
        pg.resume();
        pg
    }

    /// Starts the server (again) on its data directory and port.
    pub fn resume(&self) {
        let dir = self._dir.path();
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            dir.display()
        );
        let mut start = program(&self.bin, "pg_ctl");
        start
            .arg("-D")
            .arg(&self.data)
            .args(["-o", &options, "-w", "-t", "60"])
            .arg("-l")
            .arg(dir.join("server.log"))
            .arg("start");
        let out = run_bounded(start, WAIT);
        assert!(
            out.status.success(),
            "postgres did not start: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
        );
    }

    /// Stops the server (fast shutdown: clients are cut off), keeping its data.
    pub fn pause(&self) {
        let mut stop = program(&self.bin, "pg_ctl");
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"]);
        let out = run_bounded(stop, WAIT);
        assert!(out.status.success(), "pg_ctl stop: {out:?}");
    }

    /// The URL of database `db` (created by `create_db`), as the daemon's superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://dispatchd@127.0.0.1:{}/{db}", self.port)
    }

    /// A new, empty database.
    pub async fn create_db(&self, db: &str) {
        let (client, conn) =
            match tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await {
                Ok(c) => c,
                Err(e) => panic!("connect: {e}"),
            };
        tokio::spawn(conn);
        if let Err(e) = client
            .batch_execute(&format!("CREATE DATABASE \"{db}\""))
            .await
        {
            panic!("create database {db}: {e}");
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Fast shutdown: clients are disconnected, nothing is waited for.
        let mut stop = program(&self.bin, "pg_ctl");
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"]);
        let _ = run_bounded(stop, WAIT);
    }
}

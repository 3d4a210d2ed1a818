//! The command line and the configuration file: `check-config`, `serve` with a bad file, and
//! the `DISPATCHD_*` environment overrides.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{self, bin, run_bounded};

const WAIT: Duration = Duration::from_secs(60);

fn tempdir() -> tempfile::TempDir {
    match tempfile::tempdir() {
        Ok(t) => t,
        Err(e) => panic!("tempdir: {e}"),
    }
}

fn write(path: &Path, text: &str) {
    if let Err(e) = std::fs::write(path, text) {
        panic!("write {}: {e}", path.display());
    }
}

/// A path as a TOML string literal.
fn toml_str(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

fn check_config(file: &Path) -> Output {
    let mut cmd = bin();
    cmd.arg("check-config").arg(file);
    run_bounded(cmd, WAIT)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const VALID: &str = r#"# a complete configuration
[server]
listen = "127.0.0.1:18080"
max_body = "2KiB"
max_batch = 50
shutdown_timeout = "10s"

[storage]
data_dir = "./data"
retention = "7d"

[auth]
tokens = [
  { token = "publish-token-aaaaaaaa", scopes = ["publish"] },
  { token = "admin-token-bbbbbbbbbbb", scopes = ["admin"] },
]

[delivery]
timeout = "30s"
max_attempts = 10
allow_private_networks = false

[log]
format = "json"
level = "debug"

[[subscriptions]]
id = "crm"
url = "https://crm.example.com/hooks"
event_types = ["order.*", "invoice.paid"]
secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
headers = { "X-Api-Key" = "k" }
rate_limit = "50/s"
max_in_flight = 8
ordering = "fifo"
retry = { max_attempts = 8, initial = "5s", max = "1h" }

[[sources]]
id = "github"
scheme = "github"
secrets = ["s3cret"]
tolerance = "5m"
"#;

#[test]
fn check_config_accepts_a_valid_file() {
    let tmp = tempdir();
    let file = tmp.path().join("ok.toml");
    write(&file, VALID);
    let out = check_config(&file);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("ok"), "stdout: {stdout}");
    assert!(
        stdout.contains("1 subscriptions") && stdout.contains("2 tokens"),
        "stdout: {stdout}"
    );
    // Secrets never appear in the output.
    for secret in [
        "publish-token-aaaaaaaa",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "s3cret",
    ] {
        assert!(
            !stdout.contains(secret) && !text(&out.stderr).contains(secret),
            "{secret} was printed"
        );
    }
    // An empty file is the built-in defaults, which are valid.
    let empty = tmp.path().join("empty.toml");
    write(&empty, "");
    let out = check_config(&empty);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// Writes `text` to `name` in `tmp`, runs `check-config` on it and asserts it is refused
/// (exit 2); answers the file and what was printed.
fn refused(tmp: &tempfile::TempDir, name: &str, text: &str) -> (std::path::PathBuf, String) {
    let file = tmp.path().join(name);
    write(&file, text);
    let out = check_config(&file);
    let stderr = self::text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    (file, stderr)
}

#[test]
fn check_config_names_file_line_and_unknown_key() {
    let tmp = tempdir();
    let (file, stderr) = refused(
        &tmp,
        "unknown.toml",
        "# comment\n[server]\nlisten = \"127.0.0.1:0\"\n\n[storage]\nretention = \"7d\"\nbogus_key = 1\n",
    );
    let prefix = format!("{}:7:", file.display());
    assert!(stderr.contains(&prefix), "want {prefix:?} in: {stderr}");
    assert!(stderr.contains("storage.bogus_key"), "stderr: {stderr}");

    // A misspelt top-level table.
    let (file, stderr) = refused(
        &tmp,
        "top.toml",
        "[server]\nmax_batch = 5\n\n[delivry]\ntimeout = \"5s\"\n",
    );
    let prefix = format!("{}:4:", file.display());
    assert!(stderr.contains(&prefix), "want {prefix:?} in: {stderr}");
    assert!(stderr.contains("delivry"), "stderr: {stderr}");

    // Broken TOML.
    let (file, stderr) = refused(&tmp, "syntax.toml", "[server]\nlisten = \"127.0.0.1:0\n");
    assert!(
        stderr.contains(&format!("{}:2:", file.display())),
        "stderr: {stderr}"
    );

    // A missing file.
    let file = tmp.path().join("absent.toml");
    let out = check_config(&file);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains(&file.display().to_string()),
        "stderr: {stderr}"
    );
}

#[test]

fn check_config_names_unknown_key_in_array_of_tables() {
    let tmp = tempdir();
    let (file, stderr) = refused(
        &tmp,
        "sub.toml",
        "[[subscriptions]]\nid = \"crm\"\nurl = \"https://crm.example.com/hooks\"\n\
         secrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\nbogus = 1\n",
    );
    assert!(
        stderr.contains(&format!("{}:", file.display())),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("subscriptions[0].bogus"),
        "the key should read subscriptions[0].bogus: {stderr}"
    );
    assert!(
        !stderr.contains("$__serde"),
        "serde internals leak: {stderr}"
    );
}

#[test]
fn check_config_names_a_bad_duration() {
    let tmp = tempdir();
    let (file, stderr) = refused(
        &tmp,
        "dur.toml",
        "[delivery]\nmax_attempts = 3\ntimeout = \"thirty\"\n",
    );
    assert!(stderr.contains("delivery.timeout"), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!("{}:3:", file.display())),
        "stderr: {stderr}"
    );
    assert!(stderr.contains("thirty"), "stderr: {stderr}");

    // Every problem of a file is reported, not only the first.
    let (_, stderr) = refused(
        &tmp,
        "many.toml",
        "[server]\nmax_batch = 0\n\n[auth]\ntokens = [ { token = \"short\", scopes = [\"root\"] } ]\n",
    );
    for key in [
        "server.max_batch",
        "auth.tokens[0].token",
        "auth.tokens[0].scopes",
    ] {
        assert!(stderr.contains(key), "want {key} in: {stderr}");
    }
}

#[test]

fn validation_errors_name_the_line() {
    let tmp = tempdir();
    let (file, stderr) = refused(
        &tmp,
        "zero.toml",
        "[delivery]\nmax_attempts = 3\ntimeout = \"0s\"\n",
    );
    assert!(stderr.contains("delivery.timeout"), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!("{}:3:", file.display())),
        "want the line of timeout: {stderr}"
    );
}

#[test]
fn serve_with_a_bad_file_exits_2_and_creates_nothing() {
    let tmp = tempdir();
    let data = tmp.path().join("data-never");
    for (name, body, key) in [
        (
            "unknown.toml",
            "[server]\nlisten = \"127.0.0.1:0\"\nmystery = true\n",
            "server.mystery",
        ),
        (
            "duration.toml",
            "[delivery]\ntimeout = \"soon\"\n",
            "delivery.timeout",
        ),
        (
            "invalid.toml",
            "[server]\nmax_batch = 0\n",
            "server.max_batch",
        ),
    ] {
        let file = tmp.path().join(name);
        write(
            &file,
            &format!("[storage]\ndata_dir = {}\n\n{body}", toml_str(&data)),
        );
        let mut cmd = bin();
        cmd.arg("serve").arg("--config").arg(&file);
        let out = run_bounded(cmd, WAIT);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: stderr: {stderr}");
        assert!(
            stderr.contains(&file.display().to_string()),
            "{name}: stderr: {stderr}"
        );
        assert!(stderr.contains(key), "{name}: want {key} in: {stderr}");
        assert!(!stderr.contains("listening on"), "{name}: stderr: {stderr}");
        assert!(!data.exists(), "{name}: the data dir was created");
    }
    // The line is there for parse errors, as in check-config.
    let file = tmp.path().join("unknown.toml");
    let mut cmd = bin();
    cmd.arg("serve").arg("--config").arg(&file);
    let stderr = text(&run_bounded(cmd, WAIT).stderr);
    assert!(
        stderr.contains(&format!("{}:6:", file.display())),
        "stderr: {stderr}"
    );
}

/// A daemon started by hand (for environment tests the harness's flags would override).
struct Proc {
    child: Option<Child>,
    addr: SocketAddr,
}

impl Proc {
    fn start(mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!("cannot start {cmd:?}: {e}"),
        };
        let Some(stderr) = child.stderr.take() else {
            panic!("no stderr pipe");
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && let Some(addr) = dispatchd::daemon::listen_addr_in(&line) {
                    let _ = tx.send(Ok(addr));
                    sent = true;
                }
                all.push(line);
            }
            if !sent {
                let _ = tx.send(Err(all.join("\n")));
            }
        });
        let mut p = Proc {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        match rx.recv_timeout(WAIT) {
            Ok(Ok(addr)) => p.addr = addr,
            Ok(Err(logs)) => panic!("dispatchd exited without listening:\n{logs}"),
            Err(_) => panic!("dispatchd did not start listening in {WAIT:?}"),
        }
        p
    }

    /// SIGTERM, then waits (bounded) for the exit.
    fn terminate(&mut self) -> ExitStatus {
        let Some(child) = self.child.take() else {
            panic!("already stopped");
        };
        let pid = child.id();
        support::signal(pid, "TERM");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut child = child;
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(WAIT) {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => panic!("wait: {e}"),
            Err(_) => {
                support::signal(pid, "KILL");
                panic!("dispatchd did not exit within {WAIT:?} of SIGTERM");
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_overrides_data_dir_and_listen() {
    let tmp = tempdir();
    let from_file: PathBuf = tmp.path().join("from-file");
    let from_env: PathBuf = tmp.path().join("from-env");
    let cfg = tmp.path().join("dispatchd.toml");
    write(
        &cfg,
        &format!(
            "[server]\nlisten = \"127.0.0.1:1\"\n\n[storage]\ndata_dir = {}\n",
            toml_str(&from_file)
        ),
    );
    let mut cmd = bin();
    cmd.arg("serve")
        .arg("--config")
        .arg(&cfg)
        .env("DISPATCHD_DATA_DIR", &from_env)
        .env("DISPATCHD_LISTEN", "127.0.0.1:0");
    let mut p = Proc::start(cmd);
    assert!(p.addr.ip().is_loopback(), "{}", p.addr);
    assert_ne!(
        p.addr.port(),
        1,
        "DISPATCHD_LISTEN did not override the file"
    );

    let http = support::client();
    let resp = match http
        .post(format!("http://{}/v1/events", p.addr))
        .header("content-type", "application/json")
        .body(json!({"id": "env-1", "type": "t", "data": 1}).to_string())
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => panic!("publish: {e}"),
    };
    let status = resp.status().as_u16();
    let body: Value = match resp.bytes().await {
        Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
        Err(e) => panic!("publish body: {e}"),
    };
    assert_eq!(status, 202, "{body}");

    let status = p.terminate();
    assert_eq!(status.code(), Some(0), "{status:?}");
    let db = from_env.join("dispatchd.redb");
    assert!(db.is_file(), "{} does not exist", db.display());
    assert!(!from_file.exists(), "the file's data_dir was used");

    // The event is in that file: a daemon on it (by flag this time) finds it.
    let mut cmd = bin();
    cmd.arg("serve")
        .arg("--config")
        .arg(&cfg)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(&from_env);
    let mut p = Proc::start(cmd);
    let resp = match http
        .get(format!("http://{}/v1/events/env-1", p.addr))
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => panic!("get: {e}"),
    };
    assert_eq!(resp.status().as_u16(), 200, "event not in the env data dir");
    let status = p.terminate();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

//! Test harness: starts the real `dispatchd` binary on a free loopback port with a temp data
//! dir, and gives tests an HTTP client for it.

#![allow(dead_code)]

pub mod backend;
pub mod config;
pub mod postgres;
pub mod receiver;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use serde_json::Value;

/// How long a test waits for something the daemon does in the background.
pub const WAIT: Duration = Duration::from_secs(60);

/// How long a daemon may take to start listening before a test gives up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running daemon process.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    logs: Arc<Mutex<Vec<String>>>,
    pub http: reqwest::Client,
}

/// Makes reqwest usable: its TLS stack needs a crypto provider chosen once per process.
pub fn install_crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

pub fn client() -> reqwest::Client {
    install_crypto();
    match reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
    {
        Ok(c) => c,
        Err(e) => panic!("cannot build HTTP client: {e}"),
    }
}

impl Daemon {
    /// Starts a daemon with this config file text in a fresh temp dir.
    pub fn start(config: &str) -> Daemon {
        let tmp = match tempfile::tempdir() {
            Ok(t) => t,
            Err(e) => panic!("tempdir: {e}"),
        };
        let dir = tmp.path().to_path_buf();
        let mut d = Self::start_in(&dir, config);
        d._tmp = Some(tmp);
        d
    }

    /// Starts a daemon on an existing data dir (for restarts); the caller keeps the dir.
    pub fn start_in(dir: &Path, config: &str) -> Daemon {
        Self::start_with(dir, config, &[])
    }

    /// Starts with extra environment variables.
    pub fn start_with(dir: &Path, config: &str, env: &[(&str, &str)]) -> Daemon {
        Self::start_wrapped(dir, config, env, &[])
    }

    /// Starts a daemon under a limit of `n` open files (soft and hard), set by `prlimit`.
    pub fn start_with_open_files(config: &str, n: u64) -> Daemon {
        Self::start_with_open_file_limits(config, n, n)
    }

    /// Starts a daemon under soft and hard limits on open files, set by `prlimit`.
    pub fn start_with_open_file_limits(config: &str, soft: u64, hard: u64) -> Daemon {
        let tmp = match tempfile::tempdir() {
            Ok(t) => t,
            Err(e) => panic!("tempdir: {e}"),
        };
        let limit = format!("--nofile={soft}:{hard}");
        let mut d = Self::start_wrapped(tmp.path(), config, &[], &["prlimit", &limit, "--"]);
        d._tmp = Some(tmp);
        d
    }

    /// Starts the daemon through `wrapper` (a command and its arguments before the binary).
    fn start_wrapped(dir: &Path, config: &str, env: &[(&str, &str)], wrapper: &[&str]) -> Daemon {
        let cfg = dir.join("dispatchd.toml");
        if let Err(e) = std::fs::write(&cfg, config) {
            panic!("write config: {e}");
        }
        let bin = env!("CARGO_BIN_EXE_dispatchd");
        let mut cmd = match wrapper.split_first() {
            None => Command::new(bin),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
        };
        cmd.arg("serve")
            .arg("--config")
            .arg(&cfg)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .env_remove("DISPATCHD_LISTEN")
            .env_remove("DISPATCHD_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!("cannot start dispatchd: {e}"),
        };
        let Some(stderr) = child.stderr.take() else {
            panic!("no stderr pipe");
        };
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            // Keeps draining stderr for the life of the process so it never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = dispatchd::daemon::listen_addr_in(&line) {
                    let _ = tx.send(addr);
                }
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
            }
        });
        let addr = match rx.recv_timeout(START_TIMEOUT) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let logs = logs.lock().map(|l| l.join("\n")).unwrap_or_default();
                panic!("dispatchd did not start listening:\n{logs}");
            }
        };
        Daemon {
            child,
            addr,
            dir: dir.to_path_buf(),
            _tmp: None,
            logs,
            http: client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        signal(self.child.id(), "TERM");
        match self.child.wait() {
            Ok(s) => s,
            Err(e) => panic!("wait: {e}"),
        }
    }

    /// Takes the temp dir away so a restart can reuse it after this daemon is gone.
    pub fn keep_dir(&mut self) -> Option<tempfile::TempDir> {
        self._tmp.take()
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(
            self.http
                .post(self.url(path))
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
        .await
    }

    /// Sends a request and returns the status and the JSON body (Null when empty or not JSON).
    pub async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => panic!("request failed: {e}\n{}", self.logs()),
        };
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap_or_default();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// The Prometheus text of /metrics.
    pub async fn metrics(&self) -> String {
        match self.http.get(self.url("/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => panic!("GET /metrics: {e}"),
        }
    }

    /// Publishes one event and asserts it was accepted; returns the response body.
    pub async fn publish(&self, event_type: &str, data: Value) -> Value {
        let (status, body) = self
            .post(
                "/v1/events",
                &serde_json::json!({"type": event_type, "data": data}),
            )
            .await;
        assert_eq!(status, 202, "publish failed: {body}");
        body
    }
}

impl Daemon {
    /// Requests that carry this bearer token.
    pub fn with_token<'a>(&'a self, token: &'a str) -> Authed<'a> {
        Authed { d: self, token }
    }
}

/// A client of one daemon with a bearer token: each call answers the status and the JSON
/// body (Null when empty or not JSON).
pub struct Authed<'a> {
    d: &'a Daemon,
    token: &'a str,
}

impl Authed<'_> {
    fn json(&self, req: reqwest::RequestBuilder, body: &Value) -> reqwest::RequestBuilder {
        req.bearer_auth(self.token)
            .header("content-type", "application/json")
            .body(body.to_string())
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let d = self.d;
        d.send(d.http.get(d.url(path)).bearer_auth(self.token))
            .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let d = self.d;
        d.send(self.json(d.http.post(d.url(path)), body)).await
    }

    /// A POST without a body.
    pub async fn post_empty(&self, path: &str) -> (u16, Value) {
        let d = self.d;
        d.send(d.http.post(d.url(path)).bearer_auth(self.token))
            .await
    }

    pub async fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        let d = self.d;
        d.send(self.json(d.http.put(d.url(path)), body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let d = self.d;
        d.send(d.http.delete(d.url(path)).bearer_auth(self.token))
            .await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
    assert!(matches!(status, Ok(s) if s.success()), "kill -{sig} failed");
}

/// The `dispatchd` binary with no `DISPATCHD_*` environment leaking in.
pub fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dispatchd"));
    cmd.env_remove("DISPATCHD_LISTEN")
        .env_remove("DISPATCHD_DATA_DIR")
        .env_remove("DISPATCHD_URL")
        .env_remove("DISPATCHD_TOKEN");
    cmd
}

/// Runs a command to completion, killing it if it still runs after `limit`.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("cannot run {cmd:?}: {e}"),
    };
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("waiting for {cmd:?}: {e}"),
        Err(_) => {
            signal(pid, "KILL");
            panic!("{cmd:?} was still running after {limit:?}");
        }
    }
}

/// Polls `f` every 20 ms until it yields a value; fails the test after `WAIT`.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the event's first delivery reaches `status`; answers that delivery.
pub async fn wait_delivery(d: &Daemon, event_id: &str, status: &str) -> Value {
    let path = format!("/v1/events/{event_id}/deliveries");
    eventually(
        &format!("the delivery of {event_id} to be {status}"),
        || async {
            let (_, body) = d.get(&path).await;
            let first = body["items"].as_array().and_then(|a| a.first()).cloned()?;
            (first["status"] == status).then_some(first)
        },
    )
    .await
}

/// Independent check of a Standard Webhooks signature (`v1,` HMAC-SHA256 of
/// `"{id}.{ts}.{body}"` under a `whsec_` secret) with the hmac and sha2 crates; `sig` may
/// hold several space-separated signatures.
pub fn verify_signature(secret: &str, id: &str, ts: &str, body: &[u8], sig: &str) -> bool {
    use base64::Engine;
    use hmac::Mac;
    let Some(b64) = secret.strip_prefix("whsec_") else {
        return false;
    };
    let Ok(key) = base64::engine::general_purpose::STANDARD.decode(b64) else {
        return false;
    };
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key) else {
        return false;
    };
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    sig.split(' ').any(|s| s == expected)
}

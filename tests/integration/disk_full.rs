//! A full disk, for real: the data directory is a small tmpfs. Filling it makes publishes fail
//! with 503 `storage_unavailable` and readiness false; freeing space brings the daemon back by
//! itself; every event acknowledged before, during and after is there, also after a restart.
//! Skipped (with a message) where the test cannot mount a tmpfs (not root, no CAP_SYS_ADMIN).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::Daemon;
use crate::support::{bin, run_bounded as run};

const WAIT: Duration = Duration::from_secs(60);

/// A tmpfs mounted for the test, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Result<Mount, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if out.status.success() {
            Ok(Mount(at.to_path_buf()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg(&self.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Writes zeros into `path` until the file system refuses; returns how much it took.
fn fill(path: &Path) -> u64 {
    let mut f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let chunk = vec![0u8; 64 << 10];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(28), "expected ENOSPC, got {e}");
                break;
            }
        }
    }
    let _ = f.flush();
    written
}

async fn readyz(d: &Daemon) -> (u16, Value) {
    d.get("/readyz").await
}

async fn publish(d: &Daemon, n: usize, pad: usize) -> (u16, Value) {
    d.post(
        "/v1/events",
        &json!({"type": "disk.test", "data": {"n": n, "pad": "x".repeat(pad)}}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_answers_503_then_recovers_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let _mount = match Mount::tmpfs(&data, "16m") {
        Ok(m) => m,
        Err(e) => {
            eprintln!("skipped: cannot mount a tmpfs for the data directory ({e})");
            return;
        }
    };
    // A small journal, as on a small disk: its two files must fit beside the database.
    let mut d = Daemon::start_in(tmp.path(), "[storage]\njournal_size = \"1MiB\"\n");
    let mut acked: Vec<(String, usize, usize)> = Vec::new();
    for n in 0..5 {
        let (status, body) = publish(&d, n, 100).await;
        assert_eq!(status, 202, "{body}");
        acked.push((body["id"].as_str().unwrap().to_string(), n, 100));
    }
    assert_eq!(readyz(&d).await.0, 200);

    // Fill the disk, then publish large events until one fails.
    let filler = data.join("filler");
    assert!(fill(&filler) > 0);
    let mut refused = None;
    for n in 5..200 {
        let (status, body) = publish(&d, n, 100_000).await;
        match status {
            202 => acked.push((body["id"].as_str().unwrap().to_string(), n, 100_000)),
            503 => {
                refused = Some(body);
                break;
            }
            other => panic!("publish answered {other}: {body}"),
        }
    }
    let Some(refused) = refused else {
        panic!("no publish failed on a full disk\n{}", d.logs());
    };
    assert_eq!(refused["error"]["code"], "storage_unavailable", "{refused}");

    // While the disk is full: not ready, and even small writes are refused.
    let (status, body) = readyz(&d).await;
    assert_eq!(
        (status, &body["status"]),
        (503, &json!("storage_unavailable"))
    );
    let (status, body) = publish(&d, 1000, 10).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "storage_unavailable");
    let (status, _) = d.get("/healthz").await;
    assert_eq!(status, 200, "liveness is not readiness");
    let m = d.metrics().await;
    assert!(
        m.lines().any(|l| l.starts_with("dispatchd_writer_commit_failures_total ")
            && !l.ends_with(" 0")),
        "{m}"
    );
    // What was acknowledged is readable meanwhile.
    for (id, _, _) in &acked {
        let (status, _) = d.get(&format!("/v1/events/{id}")).await;
        assert_eq!(status, 200, "{id} unreadable while the disk is full");
    }

    // Space returns: the daemon recovers by itself.
    std::fs::remove_file(&filler).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, _) = readyz(&d).await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready again after space returned\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in 2000..2003 {
        let (status, body) = publish(&d, n, 100_000).await;
        assert_eq!(status, 202, "{body}\n{}", d.logs());
        acked.push((body["id"].as_str().unwrap().to_string(), n, 100_000));
    }
    assert!(
        d.logs().contains("database reopened after an I/O failure"),
        "{}",
        d.logs()
    );

    // Nothing acknowledged is lost, now or after a restart.
    for (id, n, pad) in &acked {
        let (status, body) = d.get(&format!("/v1/events/{id}")).await;
        assert_eq!(status, 200, "{id}");
        assert_eq!(body["data"]["n"], json!(n));
        assert_eq!(body["data"]["pad"].as_str().map(str::len), Some(*pad));
    }
    let status = d.terminate();
    assert!(status.success(), "{}", d.logs());
    let db = data.join("dispatchd.redb").display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = bin();
        cmd.args(["verify-db", &db]);
        run(cmd, WAIT)
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    let d = Daemon::start_in(tmp.path(), "");
    for (id, n, _) in &acked {
        let (status, body) = d.get(&format!("/v1/events/{id}")).await;
        assert_eq!(status, 200, "{id} lost after restart");
        assert_eq!(body["data"]["n"], json!(n));
    }
    let (status, body) = d.get("/v1/events?limit=1000").await;
    assert_eq!(status, 200);
    assert_eq!(
        body["items"].as_array().map(Vec::len),
        Some(acked.len()),
        "refused publishes must not have been stored"
    );
    drop(d);
}

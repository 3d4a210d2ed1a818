//! HTTPS on the listener: a client that trusts the test's own CA publishes; a reload (over
//! the API or SIGHUP) puts a new certificate (from a new CA) in force for new connections
//! without dropping open ones; a key that does not belong to its certificate is refused by
//! `check-config` and at start.

use std::path::Path;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

use crate::support::{Daemon, bin, run_bounded};

/// A CA and a server certificate it signed for 127.0.0.1 and localhost: (CA PEM, leaf PEM,
/// leaf key PEM).
pub fn issue() -> (String, String, String) {
    let ca_key = ok(KeyPair::generate(), "CA key");
    let mut ca_params = ok(CertificateParams::new(Vec::<String>::new()), "CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ok(ca_params.self_signed(&ca_key), "CA certificate");
    let key = ok(KeyPair::generate(), "server key");
    let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    let params = ok(CertificateParams::new(names), "server params");
    let leaf = ok(params.signed_by(&key, &ca, &ca_key), "server certificate");
    (ca.pem(), leaf.pem(), key.serialize_pem())
}

fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

fn write(path: &Path, text: &str) {
    if let Err(e) = std::fs::write(path, text) {
        panic!("write {}: {e}", path.display());
    }
}

/// A fresh client (no pooled connections) that trusts only `ca`.
fn trusting(ca: &str) -> reqwest::Client {
    crate::support::install_crypto();
    let cert = ok(reqwest::Certificate::from_pem(ca.as_bytes()), "CA PEM");
    ok(
        reqwest::Client::builder()
            .add_root_certificate(cert)
            .timeout(Duration::from_secs(20))
            .build(),
        "client",
    )
}

fn toml_path(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_publish_and_certificate_reload_without_dropping_connections() {
    let tls_dir = tempfile::tempdir().unwrap();
    let (cert, key) = (
        tls_dir.path().join("cert.pem"),
        tls_dir.path().join("key.pem"),
    );
    let (ca1, leaf1, key1) = issue();
    write(&cert, &leaf1);
    write(&key, &key1);
    let d = Daemon::start(&format!(
        "[server.tls]\ncert = {}\nkey = {}\n",
        toml_path(&cert),
        toml_path(&key)
    ));
    let base = format!("https://127.0.0.1:{}", d.addr.port());
    let old = trusting(&ca1);
    let published = old
        .post(format!("{base}/v1/events"))
        .header("content-type", "application/json")
        .body(r#"{"type":"over.tls","data":{}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(published.status(), 202);
    // Plain HTTP on the TLS listener gets no answer.
    assert!(d.http.get(d.url("/healthz")).send().await.is_err());

    // A new certificate from another CA, put in force by a reload over the open connection.
    let (ca2, leaf2, key2) = issue();
    write(&cert, &leaf2);
    write(&key, &key2);
    let reloaded = old
        .post(format!("{base}/v1/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        reloaded.status(),
        200,
        "{}",
        reloaded.text().await.unwrap_or_default()
    );
    // New connections get the new certificate: a client trusting only the new CA gets in,
    // one trusting only the old CA does not.
    let ready = trusting(&ca2)
        .get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert!(
        trusting(&ca1)
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_err()
    );
    // The connection opened before the reload is still served.
    let again = old.get(format!("{base}/v1/events")).send().await.unwrap();
    assert_eq!(again.status(), 200);
    let events: serde_json::Value = serde_json::from_slice(&again.bytes().await.unwrap()).unwrap();
    assert_eq!(events["items"][0]["type"], "over.tls", "{events}");

    // A broken file on reload: refused with the file named; the certificate in force stays.
    write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    let refused = trusting(&ca2)
        .post(format!("{base}/v1/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let text = refused.text().await.unwrap_or_default();
    assert!(
        text.contains("server.tls.key") && text.contains("key.pem"),
        "{text}"
    );
    let still = trusting(&ca2)
        .get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(still.status(), 200);

    // SIGHUP re-reads the files too: a third pair is served to new connections.
    let (ca3, leaf3, key3) = issue();
    write(&cert, &leaf3);
    write(&key, &key3);
    crate::support::signal(d.pid(), "HUP");
    let url = format!("{base}/readyz");
    crate::support::eventually("the certificate re-read on SIGHUP", || async {
        let r = trusting(&ca3).get(&url).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert!(trusting(&ca2).get(&url).send().await.is_err());

    // The operator commands reach an HTTPS daemon with --ca-cert.
    let ca_file = tls_dir.path().join("ca.pem");
    write(&ca_file, &ca3);
    let mut cmd = bin();
    cmd.arg("events")
        .arg("list")
        .arg("--url")
        .arg(&base)
        .arg("--ca-cert")
        .arg(&ca_file)
        .arg("--json");
    let out = run_bounded(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("over.tls"));
}

#[test]
fn check_config_refuses_a_key_that_does_not_match_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, file) = (
        dir.path().join("cert.pem"),
        dir.path().join("other-key.pem"),
        dir.path().join("dispatchd.toml"),
    );
    let (_, leaf, _) = issue();
    let (_, _, other_key) = issue();
    write(&cert, &leaf);
    write(&key, &other_key);
    write(
        &file,
        &format!(
            "[server.tls]\ncert = {}\nkey = {}\n",
            toml_path(&cert),
            toml_path(&key)
        ),
    );
    let mut cmd = bin();
    cmd.arg("check-config").arg(&file);
    let out = run_bounded(cmd, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("dispatchd.toml:3: server.tls.key"), "{err}");
    assert!(
        err.contains("other-key.pem does not belong to the certificate"),
        "{err}"
    );
    // The daemon refuses to start on it, naming the file.
    let mut cmd = bin();
    cmd.arg("serve")
        .arg("--config")
        .arg(&file)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(dir.path().join("data"));
    let out = run_bounded(cmd, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("server.tls.key")
            && err.contains("other-key.pem does not belong to the certificate"),
        "{err}"
    );
    assert!(!err.contains("listening on"), "{err}");
    // A missing file is named too.
    std::fs::remove_file(&cert).unwrap();
    let mut cmd = bin();
    cmd.arg("check-config").arg(&file);
    let out = run_bounded(cmd, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.tls.cert") && err.contains("cert.pem"),
        "{err}"
    );
}

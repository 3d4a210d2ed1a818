//! The operator command line against a running daemon: `dispatchd events`, `deliveries`,
//! `replay`, `dead-letters`, `subscriptions`, `reload`, with tables and `--json`, the address
//! and token taken from flags or a config file. (`check-config`, `backup` and `verify-db` are
//! tested with the features they check.)

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};

use crate::operator::{
    ADMIN, PUBLISH, all_deliveries, config, items, publish, str_of, sub_n, wait_count,
};
use crate::support::config::SECRET;
use crate::support::receiver::{Receiver, Reply};
use crate::support::{Daemon, eventually};

const WAIT: Duration = Duration::from_secs(30);

/// Runs the `dispatchd` binary with arguments, bounded in time, off the async threads.
pub(crate) async fn cli(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let join = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dispatchd"));
        cmd.args(&args)
            .env_remove("DISPATCHD_URL")
            .env_remove("DISPATCHD_TOKEN")
            .env_remove("DISPATCHD_LISTEN")
            .env_remove("DISPATCHD_DATA_DIR");
        crate::support::run_bounded(cmd, WAIT)
    });
    match join.await {
        Ok(o) => o,
        Err(e) => panic!("cli task: {e}"),
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn cli_ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

#[track_caller]
fn cli_json(o: &Output, what: &str) -> Value {
    let out = cli_ok(o, what);
    match serde_json::from_str(&out) {
        Ok(v) => v,
        Err(e) => panic!("{what}: not JSON ({e}): {out}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_talk_to_a_running_daemon() {
    let rx = Receiver::start().await;
    rx.set_default(Reply::Status(500));
    let crm = sub_n("crm", &rx.url("/"), 1, "");
    let d = Daemon::start(&config("", &crm));
    let url = format!("http://{}", d.addr);
    let dir = match tempfile::tempdir() {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    // A config file that only says where the daemon is and what its admin token is.
    let cfg = dir.path().join("cli.toml");
    let cfg_text = format!(
        "[server]\nlisten = \"{}\"\n[auth]\ntokens = [ {{ token = \"{PUBLISH}\", scopes = [\"publish\"] }}, {{ token = \"{ADMIN}\", scopes = [\"admin\"] }} ]\n",
        d.addr
    );
    if let Err(e) = std::fs::write(&cfg, cfg_text) {
        panic!("{e}");
    }
    let cfg = cfg.display().to_string();
    let with = |args: &[&str]| {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend(["--url".into(), url.clone(), "--token".into(), ADMIN.into()]);
        v
    };
    let run = |v: Vec<String>| async move {
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        cli(&refs).await
    };

    let ev = publish(&d, "order.created", json!({"total": 7})).await;
    let id = str_of(&ev, "id");
    wait_count(&d, "status=dead", 1).await;

    // Events.
    let out = cli_ok(
        &cli(&["events", "list", "--config", &cfg]).await,
        "events list",
    );
    assert!(out.contains("SEQ") && out.contains(&id), "{out}");
    let v = cli_json(
        &run(with(&[
            "events",
            "list",
            "--json",
            "--type",
            "order.created",
        ]))
        .await,
        "events json",
    );
    assert_eq!(items(&v).len(), 1);
    let out = cli_ok(&run(with(&["events", "show", &id])).await, "events show");
    assert!(
        out.contains("order.created") && out.contains("\"total\": 7") && out.contains("dead"),
        "{out}"
    );
    assert!(
        out.contains("deliveries pending 0, in_flight 0, retrying 0, succeeded 0, dead 1"),
        "{out}"
    );
    let out = cli_ok(
        &run(with(&["events", "attempts", &id])).await,
        "events attempts",
    );
    assert!(
        out.contains("SUBSCRIPTION") && out.contains("crm") && out.contains("500"),
        "{out}"
    );
    let out = cli_ok(
        &run(with(&["events", "cancel", &id])).await,
        "events cancel",
    );
    assert!(out.contains("cancelled 0 deliveries"), "{out}");

    // Deliveries.
    let v = cli_json(
        &run(with(&["deliveries", "list", "--status", "dead", "--json"])).await,
        "list",
    );
    let did = str_of(&items(&v)[0], "id");
    let out = cli_ok(
        &run(with(&["deliveries", "list", "--subscription", "crm"])).await,
        "table",
    );
    assert!(out.contains("STATUS") && out.contains("HTTP 500"), "{out}");
    let out = cli_ok(&run(with(&["deliveries", "show", &did])).await, "show");
    assert!(out.contains("last_error") && out.contains("500"), "{out}");
    let v = cli_json(
        &run(with(&["deliveries", "retry", &did, "--json"])).await,
        "retry",
    );
    assert_eq!(v["status"], "retrying");
    eventually("the retried delivery to die again", || async {
        let dead = all_deliveries(&d, "status=dead").await;
        dead.first().filter(|x| x["attempts"] == 2).cloned()
    })
    .await;

    // Dead letters: list, then redrive once the receiver is back.
    let out = cli_ok(&run(with(&["dead-letters", "list"])).await, "dead letters");
    assert!(out.contains("DEAD AT") && out.contains(&id), "{out}");
    rx.set_default(Reply::Status(200));
    let v = cli_json(
        &run(with(&[
            "dead-letters",
            "redrive",
            "--subscription",
            "crm",
            "--json",
        ]))
        .await,
        "redrive",
    );
    assert_eq!(v["deliveries"], 1);
    wait_count(&d, "status=succeeded", 1).await;

    // Replay, three ways.
    let out = cli_ok(
        &run(with(&["replay", "--event", &id])).await,
        "replay event",
    );
    assert!(out.contains("1 new deliveries"), "{out}");
    let v = cli_json(
        &run(with(&[
            "replay",
            "--from-seq",
            "1",
            "--to-seq",
            "1",
            "--json",
        ]))
        .await,
        "seq",
    );
    assert_eq!(v["deliveries"], 1);
    let v = cli_json(
        &run(with(&[
            "replay",
            "--since",
            "0",
            "--until",
            "4000000000",
            "--subscription",
            "crm",
            "--event-type",
            "order.*",
            "--json",
        ]))
        .await,
        "time",
    );
    assert_eq!(v["deliveries"], 1);

    // Cancel: hold a delivery by pausing, then cancel it.
    wait_count(&d, "status=succeeded", 4).await;
    let out = cli_ok(
        &run(with(&["subscriptions", "pause", "crm"])).await,
        "pause",
    );
    assert!(out.contains("paused"), "{out}");
    publish(&d, "order.created", json!({})).await;
    let pending = wait_count(&d, "status=pending", 1).await;
    let pid = str_of(&pending[0], "id");
    let out = cli_ok(&run(with(&["deliveries", "cancel", &pid])).await, "cancel");
    assert!(out.contains("cancelled"), "{out}");
    let out = cli_ok(
        &run(with(&["subscriptions", "resume", "crm"])).await,
        "resume",
    );
    assert!(out.contains("active"), "{out}");

    // Subscriptions.
    let out = cli_ok(
        &cli(&["subscriptions", "list", "--config", &cfg]).await,
        "subs",
    );
    assert!(
        out.contains("crm") && out.contains("config") && out.contains("…LaSw"),
        "{out}"
    );
    assert!(!out.contains(SECRET));
    let v = cli_json(
        &run(with(&[
            "subscriptions",
            "create",
            "--id",
            "cli",
            "--endpoint",
            &rx.url("/cli"),
            "--event-type",
            "cli.*",
            "--filter",
            "{\"field\": \"n\", \"gt\": 1}",
            "--header",
            "X-A=b",
            "--json",
        ]))
        .await,
        "create",
    );
    let secret = str_of(&v, "secret");
    assert!(secret.starts_with("whsec_"), "{v}");
    let out = cli_ok(&run(with(&["subscriptions", "show", "cli"])).await, "show");
    assert!(
        out.contains("cli.*") && out.contains("filter") && !out.contains(&secret),
        "{out}"
    );
    let ev = publish(&d, "cli.x", json!({"n": 2})).await;
    assert_eq!(ev["deliveries"], 2, "crm takes every type, cli this one");
    let ev = publish(&d, "cli.x", json!({"n": 1})).await;
    assert_eq!(ev["deliveries"], 1, "the filter keeps n = 1 from cli");
    let out = cli_ok(
        &run(with(&["subscriptions", "rotate", "cli", "--grace", "1h"])).await,
        "rotate",
    );
    assert!(out.contains("new signing secret: whsec_"), "{out}");
    let out = cli_ok(
        &run(with(&["subscriptions", "delete", "cli"])).await,
        "delete",
    );
    assert!(out.contains("deleted cli"), "{out}");
    let bad = run(with(&[
        "subscriptions",
        "create",
        "--id",
        "x",
        "--endpoint",
        "ftp://nope",
    ]))
    .await;
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("url"), "{}", stderr(&bad));

    // Reload.
    let out = cli_ok(&run(with(&["reload"])).await, "reload");
    assert!(out.contains("reloaded: 1 subscriptions"), "{out}");

    // Failures: exit codes and messages, never a panic.
    let nope = run(with(&["deliveries", "show", "999999"])).await;
    assert_eq!(nope.status.code(), Some(1));
    assert!(stderr(&nope).contains("404"), "{}", stderr(&nope));
    let anon = cli(&["deliveries", "list", "--url", &url]).await;
    assert_eq!(anon.status.code(), Some(1));
    assert!(stderr(&anon).contains("401"), "{}", stderr(&anon));
    let down = cli(&[
        "deliveries",
        "list",
        "--url",
        "http://127.0.0.1:1",
        "--token",
        ADMIN,
    ])
    .await;
    assert_eq!(down.status.code(), Some(3), "{}", stderr(&down));
    assert!(
        stderr(&down).contains("cannot reach dispatchd"),
        "{}",
        stderr(&down)
    );
    assert!(!stderr(&down).contains("panicked"));
    let usage = run(with(&["replay"])).await;
    assert_eq!(usage.status.code(), Some(2), "{}", stderr(&usage));

    // A batch, by id.
    let batch = json!({"events": [{"type": "x", "data": {}}, {"type": "y", "data": {}}]});
    let (s, b) = d.with_token(PUBLISH).post("/v1/events/batch", &batch).await;
    assert_eq!(s, 202, "{b}");
    let bid = str_of(&b, "batch_id");
    let v = cli_json(
        &run(with(&["events", "batch", &bid, "--json"])).await,
        "events batch",
    );
    assert_eq!(v["events"], 2, "{v}");
}

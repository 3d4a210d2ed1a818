//! Operator commands (`dispatchd events|deliveries|replay|dead-letters|subscriptions|reload`):
//! each is one or a few calls to a running daemon's API, printed as a table, or as the API's
//! JSON with `--json` for scripts.
//!
//! Exit codes: 0 done, 1 the daemon refused or failed the request, 2 bad usage (flags or
//! config file), 3 the daemon could not be reached.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::cli::{
    Conn, DeadLettersArgs, DeadLettersCommand, DeliveriesArgs, DeliveriesCommand, EventsArgs,
    EventsCommand, Paging, ReloadArgs, ReplayArgs, SubscriptionsArgs, SubscriptionsCommand, Window,
};
use crate::config::{self, Overrides, Scope};
use crate::wire;

/// Where the daemon is when nothing says otherwise (the built-in listen address).
const DEFAULT_URL: &str = "http://127.0.0.1:8080";
/// How long one API call may take (a redrive of a large queue takes a while).
const CALL_TIMEOUT: Duration = Duration::from_secs(300);
/// How much of a `last_error` a table shows.
const ERROR_WIDTH: usize = 60;

/// Why an operator command failed.
#[derive(Debug)]
pub enum OpsError {
    /// Bad flags or config file.
    Usage(String),
    /// Nothing answered at the address.
    Unreachable { url: String, cause: String },
    /// The daemon answered with an error.
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// Anything else (an unreadable answer, no runtime).
    Other(String),
}

impl std::fmt::Display for OpsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpsError::Usage(m) | OpsError::Other(m) => write!(f, "{m}"),
            OpsError::Unreachable { url, cause } => write!(
                f,
                "cannot reach dispatchd at {url}: {cause}\nis the daemon running? (point at it with --url or --config)"
            ),
            OpsError::Api {
                status,
                code,
                message,
            } => write!(f, "the daemon answered {status} {code}: {message}"),
        }
    }
}

impl OpsError {
    fn exit_code(&self) -> ExitCode {
        match self {
            OpsError::Api { .. } | OpsError::Other(_) => ExitCode::from(1),
            OpsError::Usage(_) => ExitCode::from(2),
            OpsError::Unreachable { .. } => ExitCode::from(3),
        }
    }
}

type Result<T> = std::result::Result<T, OpsError>;

/// A connection to a running daemon's API.
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    json: bool,
}

/// The API's base URL and token: flags first, then the config file, then the defaults.
pub fn resolve(conn: &Conn) -> Result<(String, Option<String>)> {
    let loaded = match &conn.config {
        None => None,
        Some(path) => Some(load_config(path)?),
    };
    let url = match (&conn.url, &loaded) {
        (Some(u), _) => u.trim_end_matches('/').to_string(),
        (None, Some(c)) => {
            let mut addr = c.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(if addr.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            let scheme = if c.tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{addr}")
        }
        (None, None) => DEFAULT_URL.to_string(),
    };
    let token = conn.token.clone().or_else(|| {
        loaded.as_ref().and_then(|c| {
            c.tokens
                .iter()
                .find(|t| t.scopes.contains(&Scope::Admin))
                .map(|t| t.token.clone())
        })
    });
    Ok((url, token))
}

/// Adds a PEM CA certificate (a private CA, or the daemon's self-signed certificate) to what
/// an HTTP client trusts for https:// daemons.
pub fn trusting(
    builder: reqwest::ClientBuilder,
    ca_cert: Option<&Path>,
) -> std::result::Result<reqwest::ClientBuilder, String> {
    let Some(path) = ca_cert else {
        return Ok(builder);
    };
    let pem = std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: holds no CERTIFICATE block", path.display()));
    }
    Ok(certs
        .into_iter()
        .fold(builder, reqwest::ClientBuilder::add_root_certificate))
}

fn load_config(path: &Path) -> Result<config::Config> {
    config::load(Some(path), &Overrides::from_env()).map_err(|e| OpsError::Usage(e.to_string()))
}

impl Client {
    pub fn new(conn: &Conn) -> Result<Client> {
        // reqwest's TLS stack needs a crypto provider chosen once per process (https URLs).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (base, token) = resolve(conn)?;
        let builder = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .user_agent(concat!("dispatchd-cli/", env!("CARGO_PKG_VERSION")));
        let http = trusting(builder, conn.ca_cert.as_deref())
            .map_err(OpsError::Usage)?
            .build()
            .map_err(|e| OpsError::Other(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client {
            http,
            base,
            token,
            json: conn.json,
        })
    }

    /// One API call; answers the JSON body of a 2xx, or the error the daemon gave.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() || e.is_timeout() {
                OpsError::Unreachable {
                    url: self.base.clone(),
                    cause: root_cause(&e),
                }
            } else {
                OpsError::Other(format!("request to {url} failed: {}", root_cause(&e)))
            }
        })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| OpsError::Other(format!("reading the answer of {url}: {e}")))?;
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(v);
        }
        let code = v["error"]["code"].as_str().unwrap_or("error").to_string();
        let mut message = v["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        if let Some(errs) = v["error"]["errors"].as_array() {
            message = errs
                .iter()
                .filter_map(Value::as_str)
                .fold(String::from("invalid configuration:"), |acc, e| {
                    acc + "\n  " + e
                });
        }
        Err(OpsError::Api {
            status: status.as_u16(),
            code,
            message,
        })
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Option<&Value>) -> Result<Value> {
        self.call(reqwest::Method::POST, path, body).await
    }

    /// A list, one page or (with `--all`) every page.
    async fn list(
        &self,
        path: &str,
        mut params: Vec<(&str, String)>,
        paging: &Paging,
    ) -> Result<Value> {
        params.push(("limit", paging.limit.to_string()));
        let mut cursor = paging.cursor.clone();
        let mut items = Vec::new();
        loop {
            let mut q = form_urlencoded::Serializer::new(String::new());
            for (k, v) in &params {
                q.append_pair(k, v);
            }
            if let Some(c) = &cursor {
                q.append_pair("cursor", c);
            }
            let page = self.get(&format!("{path}?{}", q.finish())).await?;
            if let Some(a) = page["items"].as_array() {
                items.extend(a.iter().cloned());
            }
            let next = page["next_cursor"].as_str().map(str::to_string);
            match next {
                Some(n) if paging.all => cursor = Some(n),
                _ => return Ok(json!({"items": items, "next_cursor": next})),
            }
        }
    }

    /// A list as the user asked: the API's JSON, or a table of the API's `T`s.
    async fn show_page<T: DeserializeOwned>(
        &self,
        path: &str,
        params: Vec<(&str, String)>,
        paging: &Paging,
        headers: &[&str],
        row: impl Fn(&T) -> Vec<String>,
    ) -> Result<()> {
        let page = self.list(path, params, paging).await?;
        if self.json {
            self.print_json(&page);
            Ok(())
        } else {
            print_list(&page, headers, row)
        }
    }

    fn print_json(&self, v: &Value) {
        println!(
            "{}",
            serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
        );
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Runs one command on a small runtime and maps its failure to an exit code.
fn run<F, Fut>(conn: &Conn, f: F) -> ExitCode
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let result = Client::new(conn).and_then(|client| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| OpsError::Other(format!("cannot start the async runtime: {e}")))?;
        rt.block_on(f(client))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dispatchd: {e}");
            e.exit_code()
        }
    }
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The query parameters of a list's `--since`, `--until` and `--priority`.
fn window_params(w: &Window) -> Vec<(&'static str, String)> {
    let mut p = Vec::new();
    opt(&mut p, "since", &w.since);
    opt(&mut p, "until", &w.until);
    opt(&mut p, "priority", &w.priority);
    p
}

fn opt(params: &mut Vec<(&'static str, String)>, name: &'static str, v: &Option<String>) {
    if let Some(v) = v {
        params.push((name, v.clone()));
    }
}

// ---------------------------------------------------------------------------------------------
// tables

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// Aligned columns, one header line.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let pad = widths[i].saturating_sub(c.chars().count());
                let _ = write!(l, "{c}{}  ", " ".repeat(pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// An answer read as the API's own type (`wire`).
fn typed<T: DeserializeOwned>(v: &Value) -> Result<T> {
    T::deserialize(v).map_err(|e| OpsError::Other(format!("unexpected answer from the API: {e}")))
}

/// A value, or `-` for none.
fn or_dash(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// A page of the API's `T`s as a table, one row each.
fn print_list<T: DeserializeOwned>(
    page: &Value,
    headers: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> Result<()> {
    let page: wire::Page<T> = typed(page)?;
    let rows: Vec<Vec<String>> = page.items.iter().map(&row).collect();
    if rows.is_empty() {
        println!("(none)");
    } else {
        print!("{}", table(headers, &rows));
    }
    if let Some(c) = page.next_cursor {
        eprintln!("more: --cursor {c}");
    }
    Ok(())
}

fn delivery_row(d: &wire::DeliveryView<'_>) -> Vec<String> {
    vec![
        d.id.clone(),
        d.event_id.to_string(),
        d.subscription.to_string(),
        d.status.to_string(),
        d.attempts.to_string(),
        or_dash(d.next_attempt_at.as_ref()),
        clip(&or_dash(d.last_error.as_ref()), ERROR_WIDTH),
    ]
}

const DELIVERY_HEADERS: &[&str] = &[
    "ID",
    "EVENT",
    "SUBSCRIPTION",
    "STATUS",
    "ATTEMPTS",
    "NEXT ATTEMPT",
    "LAST ERROR",
];

/// Delivery counts by status on one line: `pending 1, in_flight 0, …`.
fn counts(c: &wire::StatusCounts) -> String {
    format!(
        "pending {}, in_flight {}, retrying {}, succeeded {}, dead {}, cancelled {}",
        c.pending, c.in_flight, c.retrying, c.succeeded, c.dead, c.cancelled
    )
}

/// Named values, one per line, aligned.
fn print_fields(fields: &[(&str, String)]) {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in fields {
        println!("{k:width$}  {v}");
    }
}

// ---------------------------------------------------------------------------------------------
// commands

/// `dispatchd events …`
pub fn events(a: &EventsArgs) -> ExitCode {
    run(&a.conn, |c| async move {
        match &a.command {
            EventsCommand::List {
                event_type,
                source,
                window,
                paging,
            } => {
                let mut p = window_params(window);
                opt(&mut p, "type", event_type);
                opt(&mut p, "source", source);
                c.show_page(
                    "/v1/events",
                    p,
                    paging,
                    &["SEQ", "ID", "TYPE", "SOURCE", "RECEIVED"],
                    |e: &wire::EventView<'_>| {
                        vec![
                            e.seq.to_string(),
                            e.id.to_string(),
                            e.event_type.to_string(),
                            or_dash(e.source.as_ref()),
                            e.received_at.clone(),
                        ]
                    },
                )
                .await?;
            }
            EventsCommand::Show { id } => {
                let e = c.get(&format!("/v1/events/{}", enc(id))).await?;
                let d = c.get(&format!("/v1/events/{}/deliveries", enc(id))).await?;
                if c.json {
                    c.print_json(&json!({"event": e, "deliveries": d["items"]}));
                } else {
                    let ev: wire::EventView<'static> = typed(&e)?;
                    print_fields(&[
                        ("id", ev.id.to_string()),
                        ("seq", ev.seq.to_string()),
                        ("type", ev.event_type.to_string()),
                        ("source", or_dash(ev.source.as_ref())),
                        ("received_at", ev.received_at.clone()),
                        ("idempotency_key", or_dash(ev.idempotency_key.as_ref())),
                        ("priority", ev.priority.to_string()),
                        ("batch_id", or_dash(ev.batch_id.as_ref())),
                    ]);
                    let data: Value = serde_json::from_str(ev.data.get()).unwrap_or(Value::Null);
                    println!(
                        "data\n{}",
                        serde_json::to_string_pretty(&data).unwrap_or_default()
                    );
                    if let Some(c) = &ev.deliveries {
                        println!("deliveries {}", counts(c));
                    }
                    println!();
                    print_list(&d, DELIVERY_HEADERS, delivery_row)?;
                }
            }
            EventsCommand::Attempts { id, paging } => {
                c.show_page(
                    &format!("/v1/events/{}/attempts", enc(id)),
                    Vec::new(),
                    paging,
                    &[
                        "STARTED",
                        "DELIVERY",
                        "SUBSCRIPTION",
                        "N",
                        "STATUS",
                        "ERROR",
                    ],
                    |a: &wire::EventAttemptView<'_>| {
                        vec![
                            a.attempt.started_at.clone(),
                            a.delivery_id.clone(),
                            a.subscription.to_string(),
                            a.attempt.n.to_string(),
                            or_dash(a.attempt.status_code),
                            or_dash(a.attempt.error.as_ref()),
                        ]
                    },
                )
                .await?;
            }
            EventsCommand::Cancel { id } => {
                let r = c
                    .post(&format!("/v1/events/{}/cancel", enc(id)), None)
                    .await?;
                if c.json {
                    c.print_json(&r);
                } else {
                    println!(
                        "cancelled {} deliveries of event {id}",
                        text(&r["deliveries"])
                    );
                }
            }
            EventsCommand::Batch { id } => {
                let b = c.get(&format!("/v1/batches/{}", enc(id))).await?;
                if c.json {
                    c.print_json(&b);
                } else {
                    let b: wire::BatchView<'static> = typed(&b)?;
                    print_fields(&[
                        ("id", b.id.to_string()),
                        ("created_at", b.created_at.clone()),
                        ("events", b.events.to_string()),
                        ("total_deliveries", b.total_deliveries.to_string()),
                        ("done", b.done.to_string()),
                    ]);
                    println!("deliveries {}", counts(&b.deliveries));
                }
            }
        }
        Ok(())
    })
}

/// `dispatchd deliveries …`
pub fn deliveries(a: &DeliveriesArgs) -> ExitCode {
    run(&a.conn, |c| async move {
        match &a.command {
            DeliveriesCommand::List {
                status,
                subscription,
                event_type,
                window,
                paging,
            } => {
                let mut p = window_params(window);
                opt(&mut p, "status", status);
                opt(&mut p, "subscription", subscription);
                opt(&mut p, "event_type", event_type);
                c.show_page("/v1/deliveries", p, paging, DELIVERY_HEADERS, delivery_row)
                    .await?;
            }
            DeliveriesCommand::Show { id } => {
                let d = c.get(&format!("/v1/deliveries/{}", enc(id))).await?;
                let at = c
                    .get(&format!("/v1/deliveries/{}/attempts", enc(id)))
                    .await?;
                if c.json {
                    c.print_json(&json!({"delivery": d, "attempts": at["items"]}));
                } else {
                    let d: wire::DeliveryView<'static> = typed(&d)?;
                    print_fields(&[
                        ("id", d.id.clone()),
                        ("event_id", d.event_id.to_string()),
                        ("subscription", d.subscription.to_string()),
                        ("status", d.status.to_string()),
                        ("attempts", d.attempts.to_string()),
                        ("next_attempt_at", or_dash(d.next_attempt_at.as_ref())),
                        ("last_error", or_dash(d.last_error.as_ref())),
                        ("created_at", d.created_at.clone()),
                        ("updated_at", d.updated_at.clone()),
                    ]);
                    println!();
                    print_list(
                        &at,
                        &["N", "STARTED", "MS", "STATUS", "ERROR", "RESPONSE"],
                        |a: &wire::AttemptView<'_>| {
                            vec![
                                a.n.to_string(),
                                a.started_at.clone(),
                                a.duration_ms.to_string(),
                                or_dash(a.status_code),
                                or_dash(a.error.as_ref()),
                                clip(&a.response_body, 40),
                            ]
                        },
                    )?;
                }
            }
            DeliveriesCommand::Retry { id } | DeliveriesCommand::Cancel { id } => {
                let action = match &a.command {
                    DeliveriesCommand::Retry { .. } => "retry",
                    _ => "cancel",
                };
                let d = c
                    .post(&format!("/v1/deliveries/{}/{action}", enc(id)), None)
                    .await?;
                if c.json {
                    c.print_json(&d);
                } else {
                    let d: wire::DeliveryView<'static> = typed(&d)?;
                    println!(
                        "delivery {}: {} (attempts {}, next attempt {})",
                        d.id,
                        d.status,
                        d.attempts,
                        or_dash(d.next_attempt_at.as_ref())
                    );
                }
            }
        }
        Ok(())
    })
}

/// `dispatchd replay …`
pub fn replay(a: &ReplayArgs) -> ExitCode {
    run(&a.conn, |c| async move {
        let mut body = Map::new();
        match (&a.event_id, &a.since, &a.until, a.from_seq, a.to_seq) {
            (Some(id), ..) => {
                body.insert("event_id".into(), json!(id));
            }
            (None, Some(s), Some(u), ..) => {
                body.insert("since".into(), json!(s));
                body.insert("until".into(), json!(u));
            }
            (None, None, None, Some(f), Some(t)) => {
                body.insert("from_seq".into(), json!(f));
                body.insert("to_seq".into(), json!(t));
            }
            _ => {
                return Err(OpsError::Usage(
                    "give --event ID, or --since and --until, or --from-seq and --to-seq".into(),
                ));
            }
        }
        if let Some(s) = &a.subscription {
            body.insert("subscription".into(), json!(s));
        }
        if !a.event_types.is_empty() {
            body.insert("event_types".into(), json!(a.event_types));
        }
        let r = c.post("/v1/replay", Some(&Value::Object(body))).await?;
        if c.json {
            c.print_json(&r);
        } else {
            println!(
                "replayed {} events: {} new deliveries",
                text(&r["events"]),
                text(&r["deliveries"])
            );
        }
        Ok(())
    })
}

/// `dispatchd dead-letters …`
pub fn dead_letters(a: &DeadLettersArgs) -> ExitCode {
    run(&a.conn, |c| async move {
        match &a.command {
            DeadLettersCommand::List {
                subscription,
                since,
                paging,
            } => {
                let mut p = Vec::new();
                opt(&mut p, "subscription", subscription);
                opt(&mut p, "since", since);
                c.show_page(
                    "/v1/dead-letters",
                    p,
                    paging,
                    &[
                        "ID",
                        "EVENT",
                        "SUBSCRIPTION",
                        "ATTEMPTS",
                        "DEAD AT",
                        "LAST ERROR",
                    ],
                    |d: &wire::DeadLetterView<'_>| {
                        let l = &d.delivery;
                        vec![
                            l.id.clone(),
                            l.event_id.to_string(),
                            l.subscription.to_string(),
                            l.attempts.to_string(),
                            d.dead_at.clone(),
                            clip(&or_dash(l.last_error.as_ref()), ERROR_WIDTH),
                        ]
                    },
                )
                .await?;
            }
            DeadLettersCommand::Redrive {
                subscription,
                since,
            } => {
                let mut body = Map::new();
                if let Some(s) = subscription {
                    body.insert("subscription".into(), json!(s));
                }
                if let Some(s) = since {
                    body.insert("since".into(), json!(s));
                }
                let r = c
                    .post("/v1/dead-letters/redrive", Some(&Value::Object(body)))
                    .await?;
                if c.json {
                    c.print_json(&r);
                } else {
                    println!("redrove {} dead letters", text(&r["deliveries"]));
                }
            }
        }
        Ok(())
    })
}

fn subscription_row(s: &wire::SubscriptionView<'_>) -> Vec<String> {
    let state = if s.paused {
        "paused"
    } else if s.enabled {
        "active"
    } else {
        "disabled"
    };
    let secrets: Vec<String> = s.secrets.iter().map(|x| format!("…{}", x.last4)).collect();
    vec![
        s.id.to_string(),
        s.source.to_string(),
        state.into(),
        s.url.clone(),
        s.event_types.join(","),
        secrets.join(" "),
    ]
}

const SUBSCRIPTION_HEADERS: &[&str] = &["ID", "SOURCE", "STATE", "URL", "EVENT TYPES", "SECRETS"];

fn print_subscription(v: &Value) -> Result<()> {
    let s: wire::SubscriptionView<'static> = typed(v)?;
    print!("{}", table(SUBSCRIPTION_HEADERS, &[subscription_row(&s)]));
    if let Some(f) = &s.filter {
        println!("filter: {f}");
    }
    Ok(())
}

/// The body of `subscriptions create`: the file's definition with the flags on top.
fn create_body(cmd: &SubscriptionsCommand) -> Result<Value> {
    let SubscriptionsCommand::Create {
        id,
        endpoint,
        event_types,
        secrets,
        filter,
        headers,
        rate_limit,
        max_in_flight,
        ordering,
        from_file,
    } = cmd
    else {
        return Err(OpsError::Usage("not a create command".into()));
    };
    let mut body = match from_file {
        None => Map::new(),
        Some(p) => {
            let t = std::fs::read_to_string(p)
                .map_err(|e| OpsError::Usage(format!("cannot read {}: {e}", p.display())))?;
            match serde_json::from_str(&t) {
                Ok(Value::Object(m)) => m,
                Ok(_) => {
                    return Err(OpsError::Usage(format!(
                        "{}: expected a JSON object",
                        p.display()
                    )));
                }
                Err(e) => return Err(OpsError::Usage(format!("{}: {e}", p.display()))),
            }
        }
    };
    let mut set = |k: &str, v: Value| {
        body.insert(k.to_string(), v);
    };
    if let Some(v) = id {
        set("id", json!(v));
    }
    if let Some(v) = endpoint {
        set("url", json!(v));
    }
    if !event_types.is_empty() {
        set("event_types", json!(event_types));
    }
    if !secrets.is_empty() {
        set("secrets", json!(secrets));
    }
    if let Some(f) = filter {
        let v: Value = serde_json::from_str(f)
            .map_err(|e| OpsError::Usage(format!("--filter is not JSON: {e}")))?;
        set("filter", v);
    }
    if !headers.is_empty() {
        let mut m = Map::new();
        for h in headers {
            let Some((k, v)) = h.split_once('=') else {
                return Err(OpsError::Usage(format!(
                    "--header {h:?}: expected NAME=VALUE"
                )));
            };
            m.insert(k.trim().to_string(), json!(v));
        }
        set("headers", Value::Object(m));
    }
    if let Some(v) = rate_limit {
        set("rate_limit", json!(v));
    }
    if let Some(v) = max_in_flight {
        set("max_in_flight", json!(v));
    }
    if let Some(v) = ordering {
        set("ordering", json!(v));
    }
    for (key, flag) in [("id", "--id"), ("url", "--endpoint")] {
        if !body.contains_key(key) {
            return Err(OpsError::Usage(format!(
                "{flag} is required (or give {key:?} in --from-file)"
            )));
        }
    }
    Ok(Value::Object(body))
}

/// `dispatchd subscriptions …`
pub fn subscriptions(a: &SubscriptionsArgs) -> ExitCode {
    run(&a.conn, |c| async move {
        let show = |v: &Value| {
            if c.json {
                c.print_json(v);
                Ok(())
            } else {
                print_subscription(v)
            }
        };
        match &a.command {
            SubscriptionsCommand::List => {
                let page = c.get("/v1/subscriptions").await?;
                if c.json {
                    c.print_json(&page);
                } else {
                    print_list(&page, SUBSCRIPTION_HEADERS, subscription_row)?;
                }
            }
            SubscriptionsCommand::Show { id } => {
                show(&c.get(&format!("/v1/subscriptions/{}", enc(id))).await?)?;
            }
            cmd @ SubscriptionsCommand::Create { .. } => {
                let body = create_body(cmd)?;
                let s = c.post("/v1/subscriptions", Some(&body)).await?;
                show(&s)?;
                if !c.json
                    && let Some(secret) = s["secret"].as_str()
                {
                    println!("signing secret (shown once): {secret}");
                }
            }
            SubscriptionsCommand::Delete { id } => {
                let r = c
                    .call(
                        reqwest::Method::DELETE,
                        &format!("/v1/subscriptions/{}", enc(id)),
                        None,
                    )
                    .await?;
                if c.json {
                    c.print_json(&r);
                } else {
                    println!(
                        "deleted {id}; {} deliveries still to be attempted were cancelled",
                        text(&r["cancelled_deliveries"])
                    );
                }
            }
            SubscriptionsCommand::Pause { id } | SubscriptionsCommand::Resume { id } => {
                let action = match &a.command {
                    SubscriptionsCommand::Pause { .. } => "pause",
                    _ => "resume",
                };
                show(
                    &c.post(&format!("/v1/subscriptions/{}/{action}", enc(id)), None)
                        .await?,
                )?;
            }
            SubscriptionsCommand::Rotate { id, secret, grace } => {
                let mut body = Map::new();
                if let Some(s) = secret {
                    body.insert("secret".into(), json!(s));
                }
                if let Some(g) = grace {
                    body.insert("grace".into(), json!(g));
                }
                let r = c
                    .post(
                        &format!("/v1/subscriptions/{}/rotate", enc(id)),
                        Some(&Value::Object(body)),
                    )
                    .await?;
                if c.json {
                    c.print_json(&r);
                } else {
                    print_subscription(&r["subscription"])?;
                    println!("new signing secret: {}", text(&r["secret"]));
                    println!(
                        "the previous secrets keep signing until {}",
                        text(&r["previous_secrets_expire_at"])
                    );
                }
            }
        }
        Ok(())
    })
}

/// `dispatchd reload`
pub fn reload(a: &ReloadArgs) -> ExitCode {
    run(&a.conn, |c| async move {
        let r = c.post("/v1/admin/reload", None).await?;
        if c.json {
            c.print_json(&r);
        } else {
            let list = |k: &str| {
                r[k].as_array()
                    .map(|a| a.iter().map(text).collect::<Vec<_>>().join(", "))
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "-".into())
            };
            println!(
                "reloaded: {} subscriptions, {} sources; added {}; changed {}; removed {}",
                text(&r["subscriptions"]),
                text(&r["sources"]),
                list("added"),
                list("changed"),
                list("removed")
            );
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["ID", "STATUS"],
            &[
                vec!["1".into(), "dead".into()],
                vec!["12345".into(), "ok".into()],
            ],
        );
        assert_eq!(t, "ID     STATUS\n1      dead\n12345  ok\n");
    }

    #[test]
    fn clipping() {
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("abc", 4), "abc");
    }

    #[test]
    fn connection_defaults() {
        let conn = Conn {
            url: None,
            token: None,
            config: None,
            ca_cert: None,
            json: false,
        };
        let (url, token) = match resolve(&conn) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(url, DEFAULT_URL);
        assert_eq!(token, None);
        let conn = Conn {
            url: Some("http://127.0.0.1:9/".into()),
            token: Some("t".into()),
            ..conn
        };
        assert_eq!(
            resolve(&conn).ok(),
            Some(("http://127.0.0.1:9".to_string(), Some("t".to_string())))
        );
    }
}

//! The HTTP API: a hyper 1.x server, its shared state, and the request/response plumbing
//! every handler uses (bodies, JSON, query parameters, paging, auth header). Routes and
//! handlers are in `routes`, `admin` and `inbound`; wire types in `dto`.

pub mod admin;
pub mod backup;
pub mod conn;
pub mod deliveries;
pub mod dto;
pub mod error;
pub mod events;
pub mod health;
pub mod inbound;
pub mod recovery;
pub mod routes;
pub mod stream;
pub mod subscriptions;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::auth::Auth;
use crate::config::Scope;
use crate::metrics::Metrics;
use crate::storage::Store;
use crate::storage::writer::WriterHandle;
use crate::subscriptions::Registry;
use error::ApiError;

/// A response with a fully buffered body.
pub type Resp = Response<Full<Bytes>>;

/// Everything a request handler may touch.
pub struct ApiState {
    pub store: Store,
    /// Deliveries whose attempt is under way: shown as `in_flight`.
    pub attempting: Arc<crate::delivery::attempting::Attempting>,
    pub writer: WriterHandle,
    pub metrics: Arc<Metrics>,
    /// Swapped on reload (shared with the SIGHUP handler).
    pub auth: Arc<Auth>,
    pub registry: Arc<Registry>,
    /// Inbound provider sources by id (swapped whole on reload).
    pub sources: Arc<crate::ingest::source::Sources>,
    /// Operator control of subscriptions, reload and the configuration in force.
    pub control: Arc<crate::subscriptions::control::Control>,
    pub max_body: u64,
    pub max_batch: usize,
    /// `[delivery.callbacks]` as the daemon started with it.
    pub callbacks: crate::callbacks::CallbackSettings,
    pub allow_private_networks: bool,
    pub limits: conn::Limits,
    /// The listener's certificate when it serves HTTPS (swapped on reload).
    pub tls: Option<Arc<crate::tls::Certs>>,
    pub draining: AtomicBool,
}

impl ApiState {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether a request may use a route that needs `need`: the scopes of the key that
    /// signed it, or else its bearer token's.
    pub fn authorize(&self, req: &Req, need: Scope) -> Result<(), ApiError> {
        match req.extensions().get::<SignedBy>() {
            Some(SignedBy(scopes)) => Ok(crate::auth::allowed(scopes, need)?),
            None => Ok(self.auth.check(auth_header(req), need)?),
        }
    }

    /// A delivery as the API shows it: `in_flight` while its attempt is under way.
    pub fn delivery_view<'a>(
        &self,
        id: crate::model::DeliveryId,
        d: &'a crate::model::Delivery,
    ) -> dto::DeliveryView<'a> {
        let mut v = dto::DeliveryView::new(id, d);
        if !d.status.is_terminal() && self.attempting.contains(id) {
            v.status = crate::model::DeliveryStatus::InFlight.as_str().into();
        }
        v
    }

    /// Delivery counts by status (`in_flight` while an attempt is under way).
    pub fn status_counts(
        &self,
        statuses: &[(crate::model::DeliveryId, crate::model::DeliveryStatus)],
    ) -> dto::StatusCounts {
        let mut c = dto::StatusCounts::default();
        for &(id, status) in statuses {
            let status = if !status.is_terminal() && self.attempting.contains(id) {
                crate::model::DeliveryStatus::InFlight
            } else {
                status
            };
            c.add(status);
        }
        c
    }
}

/// Serves HTTP on `listener` until `shutdown` resolves, then lets open requests finish for at
/// most `grace` before returning. At most `limits.max_connections` connections are served at
/// once: the next is not accepted until one ends, so it waits in the kernel's backlog and a
/// flood of clients cannot exhaust the descriptors the rest of the daemon needs.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ApiState>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let limits = state.limits;
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let tls = match state.tls.clone().map(crate::tls::acceptor).transpose() {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up TLS; not serving");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut last_accept_warning: Option<crate::clock::Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let (st, http, watcher, tls) = (state.clone(), http.clone(), graceful.watcher(), tls.clone());
                    tokio::spawn(async move {
                        match tls {
                            None => connection(st, http, watcher, stream).await,
                            // The handshake runs here, in the connection's task, under the
                            // header deadline.
                            Some(tls) => match tokio::time::timeout(limits.header_read_timeout, tls.accept(stream)).await {
                                Ok(Ok(s)) => connection(st, http, watcher, s).await,
                                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                                Err(_) => tracing::debug!("TLS handshake timed out"),
                            },
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning, and
                    // say so at most once a minute.
                    let now = crate::clock::now();
                    if last_accept_warning.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60)) {
                        tracing::warn!(error = %e, "accept failed; backing off");
                        last_accept_warning = Some(now);
                    }
                    state.metrics.accept_errors.inc();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all HTTP connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!("HTTP connections still open after the shutdown grace period"),
    }
}

/// Serves one connection (plain or TLS) until it ends.
async fn connection<S>(
    state: Arc<ApiState>,
    http: http1::Builder,
    watcher: hyper_util::server::graceful::Watcher,
    stream: S,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limit = state.limits.response_write_timeout;
    let io = conn::WriteDeadline::new(TokioIo::new(stream), limit);
    let service = service_fn(move |req| handle(state.clone(), req));
    if let Err(e) = watcher.watch(http.serve_connection(io, service)).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

async fn handle(
    state: Arc<ApiState>,
    req: Request<Incoming>,
) -> Result<Response<stream::Body>, Infallible> {
    // Kept for the log line of a handler that panics (cheap: the URI shares hyper's buffer).
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let route = async {
        match signed(&state, req).await {
            Ok(req) => routes::dispatch(&state, req).await,
            Err(e) => (routes::label(uri.path()), Err(e)),
        }
    };
    let resp = guarded(&state.metrics, &method, &uri, route).await;
    Ok(stream::attach(resp))
}

/// A request's body: as it arrives, or already read (a signed request's, which its
/// signature covers).
pub type Body = http_body_util::Either<Incoming, http_body_util::Full<Bytes>>;

/// A request as handlers take it.
pub type Req = Request<Body>;

/// The scopes of the key that signed a request, verified before routing.
#[derive(Debug, Clone)]
struct SignedBy(Vec<Scope>);

/// Verifies a producer's signed request (`dispatchd-signature`; see `auth`): its body is
/// read first (within `server.max_body` and the body deadline), since the signature covers
/// it, and the key's scopes go with the request. Other requests pass as they are. Inbound
/// provider webhooks are verified by their source, never here.
async fn signed(st: &ApiState, req: Request<Incoming>) -> Result<Req, ApiError> {
    let is_signed = req.headers().contains_key(crate::auth::SIGNATURE_HEADER)
        || req.headers().contains_key(crate::auth::KEY_ID_HEADER);
    if !is_signed || req.uri().path().starts_with("/v1/ingest/") {
        return Ok(req.map(http_body_util::Either::Left));
    }
    let header = |name: &str| -> Vec<u8> {
        req.headers()
            .get(name)
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default()
    };
    let (key_id, timestamp, signature) = (
        header(crate::auth::KEY_ID_HEADER),
        header(crate::auth::TIMESTAMP_HEADER),
        header(crate::auth::SIGNATURE_HEADER),
    );
    let (parts, body) = req.into_parts();
    let body = read_body(st, Request::from_parts(parts.clone(), body), st.max_body).await?;
    let signed = crate::auth::Signed {
        key_id: &key_id,
        timestamp: &timestamp,
        signature: &signature,
    };
    let now = crate::clock::now_micros() / 1_000_000;
    let scopes = st.auth.verify_signed(signed, &body, now)?;
    let mut req = Request::from_parts(
        parts,
        http_body_util::Either::Right(http_body_util::Full::new(body)),
    );
    req.extensions_mut().insert(SignedBy(scopes));
    Ok(req)
}

/// Runs a handler to its response and counts it by route and status. A handler that panics
/// is answered 500 `internal`, logged at error level with its route, method and path, and
/// counted (under its route, and in the panics counter), so a bug in one route never drops
/// the connection without an answer.
async fn guarded(
    metrics: &Metrics,
    method: &hyper::Method,
    uri: &hyper::Uri,
    handler: impl Future<Output = (&'static str, Result<Resp, ApiError>)>,
) -> Resp {
    use futures_util::FutureExt;
    let (route, resp) = match std::panic::AssertUnwindSafe(handler).catch_unwind().await {
        Ok((route, result)) => (route, result.unwrap_or_else(|e| error_response(&e))),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let route = routes::label(uri.path());
            metrics.http_panics.inc();
            let e = ApiError::internal(format_args!(
                "request handler panicked (route {route}, {method} {}): {what}",
                uri.path()
            ));
            (route, error_response(&e))
        }
    };
    metrics
        .http_requests
        .with_label_values(&[route, resp.status().as_str()])
        .inc();
    resp
}

/// A JSON response.
pub fn json(status: StatusCode, body: Vec<u8>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Serializes a value into a JSON response.
pub fn json_of<T: serde::Serialize>(status: StatusCode, v: &T) -> Result<Resp, ApiError> {
    serde_json::to_vec(v)
        .map(|b| json(status, b))
        .map_err(ApiError::internal)
}

/// 405 naming the allowed methods, with an `Allow` header.
pub fn method_not_allowed(method: &hyper::Method, path: &str, allowed: &[hyper::Method]) -> Resp {
    let allow = allowed
        .iter()
        .map(hyper::Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let mut resp = error_response(&ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {path}; allowed: {allow}"),
    ));
    if let Ok(v) = HeaderValue::from_str(&allow) {
        resp.headers_mut().insert(hyper::header::ALLOW, v);
    }
    resp
}

pub fn error_response(e: &ApiError) -> Resp {
    json(e.status, e.body())
}

/// Requires a JSON content type on a request with a body.
pub fn require_json(req: &Req) -> Result<(), ApiError> {
    let ct = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("content-type must be application/json, got {ct:?}"),
        ))
    }
}

/// Reads the whole body, refusing more than `max` bytes with 413 and a body that has not
/// arrived within `server.body_read_timeout` with 408.
pub async fn read_body<B>(st: &ApiState, req: Request<B>, max: u64) -> Result<Bytes, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body exceeds the limit of {max} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    let deadline = st.limits.body_read_timeout;
    let collected = tokio::time::timeout(deadline, Limited::new(req.into_body(), limit).collect());
    match collected.await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::bad_request(
            "body_read_failed",
            format!("could not read the request body: {e}"),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request body did not arrive within {deadline:?}"),
        )),
    }
}

pub fn auth_header<B>(req: &Request<B>) -> Option<&[u8]> {
    req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes)
}

/// Refuses event data nested deeper than `MAX_DATA_DEPTH`: it could be stored but never
/// parsed again, so a payload filter would silently never match it.
pub fn check_data_depth(data: &str) -> Result<(), ApiError> {
    use crate::model::{MAX_DATA_DEPTH, nested_deeper_than};
    if nested_deeper_than(data, MAX_DATA_DEPTH) {
        return Err(ApiError::bad_request(
            "invalid_event",
            format!("data is nested deeper than {MAX_DATA_DEPTH} levels of arrays and objects"),
        ));
    }
    Ok(())
}

/// Query parameters of a request.
pub fn query(req: &Req) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

pub fn invalid_query(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_query", msg)
}

/// `limit` (1..=1000, default 100) and `cursor` of a list request.
/// A page of a list: its items and the cursor of the next page, 200.
pub fn json_page<T: serde::Serialize>(items: Vec<T>, next: Option<u64>) -> Result<Resp, ApiError> {
    json_of(
        StatusCode::OK,
        &dto::ListResponse {
            items,
            next_cursor: next.map(|n| n.to_string()),
        },
    )
}

/// Refuses query parameters a route does not know.
pub fn check_params(q: &HashMap<String, String>, allowed: &[&str]) -> Result<(), ApiError> {
    for k in q.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(invalid_query(format!(
                "unknown parameter {k:?} (expected one of {})",
                allowed.join(", ")
            )));
        }
    }
    Ok(())
}

/// A list's `limit`: 1 to 1000, 100 by default.
pub fn limit_param(q: &HashMap<String, String>) -> Result<usize, ApiError> {
    match q.get("limit") {
        None => Ok(100),
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => Ok(n),
            _ => Err(invalid_query("limit must be a number from 1 to 1000")),
        },
    }
}

pub fn paging(q: &HashMap<String, String>) -> Result<(usize, Option<u64>), ApiError> {
    let limit = limit_param(q)?;
    let cursor = match q.get("cursor") {
        None => None,
        Some(c) if c.is_empty() => None,
        Some(c) => Some(
            c.parse::<u64>()
                .map_err(|_| invalid_query("cursor is not one this API returned"))?,
        ),
    };
    Ok((limit, cursor))
}

pub fn time_param(q: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => crate::model::parse_time(v).map(Some).ok_or_else(|| {
            invalid_query(format!(
                "{name} must be an RFC 3339 time like 2026-01-02T03:04:05Z or unix seconds"
            ))
        }),
    }
}

/// The `priority` filter of a list: `high`, `normal` or `low`.
pub fn priority_param(
    q: &HashMap<String, String>,
) -> Result<Option<crate::model::Priority>, ApiError> {
    match q.get("priority") {
        None => Ok(None),
        Some(v) => crate::model::Priority::parse(v)
            .map(Some)
            .ok_or_else(|| invalid_query("priority must be one of high, normal, low")),
    }
}

/// Reads an optional JSON body: empty means `{}`.
pub async fn optional_json<T: for<'de> serde::Deserialize<'de> + Default>(
    st: &ApiState,
    req: Req,
) -> Result<T, ApiError> {
    let has_type = req.headers().contains_key(hyper::header::CONTENT_TYPE);
    if has_type {
        require_json(&req)?;
    }
    let body = read_body(st, req, st.max_body).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    if !has_type {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "a request body needs content-type: application/json",
        ));
    }
    parse_json(&body)
}

/// Parses a JSON object body, telling malformed JSON apart from JSON of the wrong shape.
pub fn parse_json<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map(|dto::ObjectOnly(t)| t)
        .map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => ApiError::bad_request("invalid_body", e.to_string()),
                Category::Syntax | Category::Eof | Category::Io => {
                    ApiError::bad_request("malformed_json", e.to_string())
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// Log lines written while the test runs, for asserting on them.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A handler that panics answers 500 with the JSON error body over a real connection,
    /// which then serves the next request; the panic is logged at error level with its route,
    /// method and path, and counted, in the panics counter and under its route with 500.
    #[tokio::test]
    async fn handler_panic_answers_500_json_and_keeps_the_connection() {
        let log = Captured::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        // The test's runtime has one thread: the server task below logs through this.
        let _logging = tracing::subscriber::set_default(subscriber);
        let metrics = Arc::new(Metrics::new().unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = metrics.clone();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = service_fn(move |req: Request<Incoming>| {
                let m = m.clone();
                async move {
                    let (method, uri) = (req.method().clone(), req.uri().clone());
                    let panics = uri.path() == "/v1/events/e1";
                    let resp = guarded(&m, &method, &uri, async move {
                        assert!(!panics, "a handler bug");
                        ("healthz", Ok(json(StatusCode::OK, b"{}".to_vec())))
                    })
                    .await;
                    Ok::<_, Infallible>(resp)
                }
            });
            http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
                .unwrap();
        });
        let replies = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"GET /v1/events/e1?x=1 HTTP/1.1\r\nhost: t\r\n\r\nGET /healthz HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .await
        .unwrap();
        server.await.unwrap();
        let first = replies.find("HTTP/1.1 500").expect("a 500 answer");
        let second = replies
            .find("HTTP/1.1 200")
            .expect("the next request answered");
        assert!(first < second, "{replies}");
        assert!(
            replies.contains(
                r#"{"error":{"code":"internal","message":"internal error; see the daemon log"}}"#
            ),
            "{replies}"
        );
        assert_eq!(metrics.http_panics.get(), 1);
        let counted = |route: &str, status: &str| {
            metrics
                .http_requests
                .with_label_values(&[route, status])
                .get()
        };
        assert_eq!(counted("event", "500"), 1, "the panic, under its route");
        assert_eq!(counted("healthz", "200"), 1, "the next request");
        let log = String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
        let line = log
            .lines()
            .find(|l| l.contains("a handler bug"))
            .unwrap_or_else(|| panic!("no log line for the panic:\n{log}"));
        assert!(line.contains("ERROR"), "{line}");
        assert!(line.contains("route event, GET /v1/events/e1)"), "{line}");
    }
}

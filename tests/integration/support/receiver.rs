//! A scriptable webhook receiver on 127.0.0.1: records every request and answers from a
//! script (fail N times, hang, 410, 429 with Retry-After, delay), then with a default reply.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// How the receiver answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    /// Status with extra headers, e.g. 429 with Retry-After.
    WithHeaders(u16, Vec<(&'static str, String)>),
    /// Wait, then answer.
    Delay(Duration, u16),
    /// Never answer (until the client gives up).
    Hang,
    /// Answer once the gate is open (its sender sends `true`).
    Gate(tokio::sync::watch::Receiver<bool>, u16),
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    /// The query string as requested, without the `?`.
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub at: Instant,
    /// The status it was answered with (0 for Hang).
    pub answered: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

struct State {
    script: VecDeque<Reply>,
    default: Reply,
    received: Vec<Received>,
    /// Requests received and not answered yet, and the most there ever were at once.
    open: usize,
    most_open: usize,
}

/// A running receiver; stops when dropped.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Starts answering 200 to everything.
    pub async fn start() -> Receiver {
        Self::start_on("127.0.0.1:0").await
    }

    pub async fn start_on(addr: &str) -> Receiver {
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => panic!("receiver bind {addr}: {e}"),
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("receiver addr: {e}"),
        };
        let state = Arc::new(Mutex::new(State {
            script: VecDeque::new(),
            default: Reply::Status(200),
            received: Vec::new(),
            open: 0,
            most_open: 0,
        }));
        let notify = Arc::new(Notify::new());
        let (st, nt) = (state.clone(), notify.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (st, nt) = (st.clone(), nt.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(st.clone(), nt.clone(), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            state,
            notify,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Replies used in order for the next requests, before the default.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        if let Ok(mut s) = self.state.lock() {
            s.script.extend(replies);
        }
    }

    pub fn set_default(&self, reply: Reply) {
        if let Ok(mut s) = self.state.lock() {
            s.default = reply;
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.state
            .lock()
            .map(|s| s.received.clone())
            .unwrap_or_default()
    }

    /// The most requests that were ever received and not yet answered at the same time.
    pub fn most_concurrent(&self) -> usize {
        self.state.lock().map(|s| s.most_open).unwrap_or(0)
    }

    /// Waits until `pred` holds over the received requests, or panics after `timeout`.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            let got = self.received();
            if pred(&got) {
                return got;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let got = self.received();
                if pred(&got) {
                    return got;
                }
                panic!(
                    "receiver: timed out after {timeout:?} waiting for {what}; got {} requests",
                    got.len()
                );
            }
        }
    }

    /// Waits for at least `n` requests.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        self.wait_until(timeout, &format!("{n} requests"), |r| r.len() >= n)
            .await
    }

    /// Waits for at least `n` requests answered 200; returns their `webhook-id`s in the
    /// order they arrived.
    pub async fn wait_for_successes(&self, n: usize, timeout: Duration) -> Vec<String> {
        let got = self
            .wait_until(timeout, &format!("{n} successful deliveries"), |r| {
                r.iter().filter(|x| x.answered == 200).count() >= n
            })
            .await;
        got.iter()
            .filter(|x| x.answered == 200)
            .map(|x| x.header("webhook-id").unwrap_or("").to_string())
            .collect()
    }

    /// Stops listening: new connections are refused.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[allow(clippy::disallowed_methods)] // the test's own clock, outside the daemon
async fn answer(
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let reply = match state.lock() {
        Ok(mut s) => s.script.pop_front().unwrap_or_else(|| s.default.clone()),
        Err(_) => Reply::Status(500),
    };
    let answered = match &reply {
        Reply::Status(c) | Reply::WithHeaders(c, _) | Reply::Delay(_, c) | Reply::Gate(_, c) => *c,
        Reply::Hang => 0,
    };
    let rec = Received {
        path,
        query,
        headers,
        body,
        at: Instant::now(),
        answered,
    };
    if let Ok(mut s) = state.lock() {
        s.received.push(rec);
        s.open += 1;
        s.most_open = s.most_open.max(s.open);
    }
    notify.notify_waiters();
    let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
    match reply {
        Reply::Status(c) => *resp.status_mut() = status(c),
        Reply::WithHeaders(c, hs) => {
            *resp.status_mut() = status(c);
            for (k, v) in hs {
                if let Ok(v) = hyper::header::HeaderValue::from_str(&v) {
                    resp.headers_mut().insert(k, v);
                }
            }
        }
        Reply::Delay(d, c) => {
            tokio::time::sleep(d).await;
            *resp.status_mut() = status(c);
        }
        Reply::Hang => std::future::pending::<()>().await,
        Reply::Gate(mut gate, c) => {
            let _ = gate.wait_for(|open| *open).await;
            *resp.status_mut() = status(c);
        }
    }
    if let Ok(mut s) = state.lock() {
        s.open -= 1;
    }
    Ok(resp)
}

fn status(c: u16) -> hyper::StatusCode {
    hyper::StatusCode::from_u16(c).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR)
}

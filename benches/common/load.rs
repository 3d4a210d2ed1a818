//! One connection of a closed-loop load generator, and the measured window its answers are
//! counted in.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::REQUEST_TIMEOUT;
use super::event_request::EventRequest;
use super::http_client::{HttpConn, HttpResponse};

/// The span of a run whose answers count; the warm-up before it does not.
#[derive(Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub end: Instant,
}

impl Window {
    /// A window of `measure` that opens one warm-up after `t0`.
    pub fn after_warmup(t0: Instant, measure: Duration) -> Self {
        let start = t0 + super::WARMUP;
        Self {
            start,
            end: start + measure,
        }
    }

    pub fn contains(&self, t: Instant) -> bool {
        t >= self.start && t <= self.end
    }
}

/// A load connection: connects when it has no connection, and drops the connection after a
/// failure or an answer that closes it, so the next send connects anew.
pub struct LoadConn {
    id: usize,
    addr: SocketAddr,
    conn: Option<HttpConn>,
}

/// A whole answer, with when its request was written and when the answer was read.
pub struct Reply {
    pub resp: HttpResponse,
    pub sent_at: Instant,
    pub done: Instant,
}

/// A send that got no answer, and when that was known.
pub struct Failure {
    pub at: Instant,
    id: usize,
    kind: FailureKind,
}

enum FailureKind {
    Connect(std::io::Error),
    ConnectTimeout,
    Request(std::io::Error),
    RequestTimeout,
}

impl Failure {
    pub fn describe(&self) -> String {
        let id = self.id;
        match &self.kind {
            FailureKind::Connect(e) => format!("connection {id}: connect: {e}"),
            FailureKind::ConnectTimeout => format!("connection {id}: connect timed out"),
            FailureKind::Request(e) => format!("connection {id}: {e}"),
            FailureKind::RequestTimeout => {
                format!("connection {id}: no response within {REQUEST_TIMEOUT:?}")
            }
        }
    }
}

impl LoadConn {
    pub fn new(id: usize, addr: SocketAddr) -> Self {
        Self {
            id,
            addr,
            conn: None,
        }
    }

    /// Connects if needed, then sends `req`'s next request and reads its answer, each within
    /// `REQUEST_TIMEOUT`. A failed connect waits 10 ms before it returns, so a refusing server
    /// is not hammered.
    pub async fn send(&mut self, req: &mut EventRequest) -> Result<Reply, Failure> {
        let conn = match self.conn.as_mut() {
            Some(c) => c,
            None => match tokio::time::timeout(REQUEST_TIMEOUT, HttpConn::connect(self.addr)).await
            {
                Ok(Ok(c)) => self.conn.insert(c),
                failed => {
                    let failure = self.failure(match failed {
                        Ok(Err(e)) => FailureKind::Connect(e),
                        _ => FailureKind::ConnectTimeout,
                    });
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    return Err(failure);
                }
            },
        };
        let bytes = req.next();
        let sent_at = Instant::now();
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, conn.round_trip(bytes)).await;
        let done = Instant::now();
        let kind = match outcome {
            Ok(Ok(resp)) => {
                if resp.close {
                    self.conn = None;
                }
                return Ok(Reply {
                    resp,
                    sent_at,
                    done,
                });
            }
            Ok(Err(e)) => FailureKind::Request(e),
            Err(_) => FailureKind::RequestTimeout,
        };
        self.conn = None;
        Err(Failure {
            at: done,
            id: self.id,
            kind,
        })
    }

    fn failure(&self, kind: FailureKind) -> Failure {
        Failure {
            at: Instant::now(),
            id: self.id,
            kind,
        }
    }
}

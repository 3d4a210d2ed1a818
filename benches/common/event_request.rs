//! The request both load generators send.

use std::net::SocketAddr;

/// A prebuilt `POST /v1/events` (or, for `count` > 1, a `POST /v1/events/batch` of `count`
/// events) whose bodies carry a counter rewritten in place for each send.
pub struct EventRequest {
    pub buf: Vec<u8>,
    /// Where each event's counter digits start.
    pub counters: Vec<usize>,
    pub n: u64,
}

const COUNTER_DIGITS: usize = 16;
const BODY_MIDDLE: &str = r#"","pad":""#;
const BODY_END: &str = r#""}}"#;

impl EventRequest {
    /// The event type the benches publish unless told otherwise.
    pub const EVENT_TYPE: &str = "bench.event";

    fn body_start(conn: usize, event_type: &str) -> String {
        format!(r#"{{"type":"{event_type}","data":{{"conn":{conn},"n":""#)
    }

    /// The body length for a requested size: at least what the fields need.
    pub fn body_len(wanted: usize) -> usize {
        let fixed = Self::body_start(0, Self::EVENT_TYPE).len()
            + COUNTER_DIGITS
            + BODY_MIDDLE.len()
            + BODY_END.len();
        wanted.max(fixed)
    }

    /// `count` events of `body_bytes` each per request: one `POST /v1/events` when `count` is
    /// 1, else one `POST /v1/events/batch`.
    pub fn batch(addr: SocketAddr, conn: usize, body_bytes: usize, count: usize) -> Self {
        Self::typed(addr, conn, body_bytes, count, Self::EVENT_TYPE)
    }

    /// As `batch`, with events of type `event_type` (no quotes or backslashes in it).
    pub fn typed(
        addr: SocketAddr,
        conn: usize,
        body_bytes: usize,
        count: usize,
        event_type: &str,
    ) -> Self {
        let start = Self::body_start(conn, event_type);
        let fixed = start.len() + COUNTER_DIGITS + BODY_MIDDLE.len() + BODY_END.len();
        let pad = body_bytes.saturating_sub(fixed);
        let count = count.max(1);
        let (path, open, close) = if count == 1 {
            ("/v1/events", "", "")
        } else {
            ("/v1/events/batch", r#"{"events":["#, "]}")
        };
        let len = open.len() + close.len() + count * (fixed + pad) + (count - 1);
        let mut buf = format!(
            "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             content-length: {len}\r\n\r\n{open}"
        )
        .into_bytes();
        let mut counters = Vec::with_capacity(count);
        for i in 0..count {
            if i > 0 {
                buf.push(b',');
            }
            buf.extend_from_slice(start.as_bytes());
            counters.push(buf.len());
            buf.extend_from_slice(&[b'0'; COUNTER_DIGITS]);
            buf.extend_from_slice(BODY_MIDDLE.as_bytes());
            // Lowercase letters cycling, so the padding is not one long run of a single byte.
            buf.extend((0..pad).map(|i| b'a' + (i % 26) as u8));
            buf.extend_from_slice(BODY_END.as_bytes());
        }
        buf.extend_from_slice(close.as_bytes());
        Self {
            buf,
            counters,
            n: 0,
        }
    }

    /// The next request, with a fresh counter value in each event.
    pub fn next(&mut self) -> &[u8] {
        for &at in &self.counters {
            self.n += 1;
            let mut n = self.n;
            for d in self.buf[at..at + COUNTER_DIGITS].iter_mut().rev() {
                *d = b'0' + (n % 10) as u8;
                n /= 10;
            }
        }
        &self.buf
    }
}

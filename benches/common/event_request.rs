// Included by benches/ingest.rs and benches/delivery.rs: the request both load generators send.

/// A prebuilt `POST /v1/events` whose body carries a counter rewritten in place for each send.
struct EventRequest {
    buf: Vec<u8>,
    counter_at: usize,
    n: u64,
}

const COUNTER_DIGITS: usize = 16;
const BODY_MIDDLE: &str = r#"","pad":""#;
const BODY_END: &str = r#""}}"#;

impl EventRequest {
    fn body_start(conn: usize) -> String {
        format!(r#"{{"type":"bench.event","data":{{"conn":{conn},"n":""#)
    }

    /// The body length for a requested size: at least what the fields need.
    fn body_len(wanted: usize) -> usize {
        let fixed = Self::body_start(0).len() + COUNTER_DIGITS + BODY_MIDDLE.len() + BODY_END.len();
        wanted.max(fixed)
    }

    fn new(addr: SocketAddr, conn: usize, body_bytes: usize) -> Self {
        let start = Self::body_start(conn);
        let fixed = start.len() + COUNTER_DIGITS + BODY_MIDDLE.len() + BODY_END.len();
        let pad = body_bytes.saturating_sub(fixed);
        let mut buf = format!(
            "POST /v1/events HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{start}",
            fixed + pad
        )
        .into_bytes();
        let counter_at = buf.len();
        buf.extend_from_slice(&[b'0'; COUNTER_DIGITS]);
        buf.extend_from_slice(BODY_MIDDLE.as_bytes());
        // Lowercase letters cycling, so the padding is not one long run of a single byte.
        buf.extend((0..pad).map(|i| b'a' + (i % 26) as u8));
        buf.extend_from_slice(BODY_END.as_bytes());
        Self {
            buf,
            counter_at,
            n: 0,
        }
    }

    /// The next request, with a fresh counter value.
    fn next(&mut self) -> &[u8] {
        self.n += 1;
        let mut n = self.n;
        for d in self.buf[self.counter_at..self.counter_at + COUNTER_DIGITS]
            .iter_mut()
            .rev()
        {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
        &self.buf
    }
}

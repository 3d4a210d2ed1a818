//! The API listener's hold on connections: a client that stops reading its answers, or goes
//! quiet, loses its connection at the configured deadline and so frees its place for others;
//! the open-file limit is raised at start and caps the connections served.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::Daemon;

/// How long a well-behaved request may wait for a place while a bad client holds the only one.
const SERVED_WITHIN: Duration = Duration::from_secs(15);

/// `GET /readyz` on a fresh connection: answers its status once a place is free.
async fn readyz(d: &Daemon) -> u16 {
    let client = crate::support::client();
    let req = client.get(d.url("/readyz")).header("connection", "close");
    match tokio::time::timeout(SERVED_WITHIN, req.send()).await {
        Ok(Ok(r)) => r.status().as_u16(),
        Ok(Err(e)) => panic!("/readyz failed: {e}\n{}", d.logs()),
        Err(_) => panic!(
            "/readyz got no answer within {SERVED_WITHIN:?}: the only place is still held\n{}",
            d.logs()
        ),
    }
}

/// Reads until the daemon closes the connection (EOF or reset); answers what was read.
async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the connection was still open after 60s ({} bytes read)",
                got.len()
            ),
        }
    }
}

/// A client that pipelines requests for a large document and never reads the answers holds
/// the only connection place; once a response write has made no progress for
/// `server.response_write_timeout` its connection is closed, and a well-behaved client is
/// served. Without the write deadline the stalled connection is kept for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_answers_loses_its_connection_at_the_write_deadline() {
    let d = Daemon::start("[server]\nmax_connections = 1\nresponse_write_timeout = \"1s\"\n");
    // `connection: close`, so this connection does not stay to hold the only place.
    let doc = d
        .http
        .get(d.url("/v1/openapi.json"))
        .header("connection", "close")
        .send()
        .await;
    let doc_len = match doc {
        Ok(r) => r.bytes().await.map(|b| b.len()).unwrap_or(0),
        Err(e) => panic!("openapi.json: {e}"),
    };
    assert!(doc_len > 10_000, "a large answer: {doc_len} bytes");
    // Far more answer than the kernel buffers on both sides (a few MiB) can hold.
    let requests = (32 << 20) / doc_len + 1;
    assert!(requests < 2_000, "bounded: {requests} requests");
    // The stalled write cannot time out sooner than the deadline after this connection opens.
    let started = tokio::time::Instant::now();
    let socket = match tokio::net::TcpSocket::new_v4() {
        Ok(s) => s,
        Err(e) => panic!("socket: {e}"),
    };
    // A small receive window, so the daemon's writes stall sooner.
    let _ = socket.set_recv_buffer_size(4096);
    let mut stalled = match socket.connect(d.addr).await {
        Ok(s) => s,
        Err(e) => panic!("connect: {e}"),
    };
    let one = "GET /v1/openapi.json HTTP/1.1\r\nhost: t\r\n\r\n";
    let pipelined = one.repeat(requests);
    let write = stalled.write_all(pipelined.as_bytes());
    match tokio::time::timeout(Duration::from_secs(10), write).await {
        Ok(Ok(())) => {}
        other => panic!("could not send the pipelined requests: {other:?}"),
    }
    // The first answer has begun to arrive: this connection holds the place.
    let mut first = [0u8; 12];
    match tokio::time::timeout(Duration::from_secs(10), stalled.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => {}
        other => panic!("no answer started on the stalled connection: {other:?}"),
    }
    assert_eq!(readyz(&d).await, 200);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "served only once the stalled connection was closed, after the write deadline"
    );
    // The stalled connection was closed before all its answers were written.
    let got = read_until_closed(&mut stalled).await;
    assert!(
        got.len() < requests * doc_len,
        "{} of {} bytes: the connection was cut off",
        got.len(),
        requests * doc_len
    );
}

/// A keep-alive connection left idle after its answer, and one that never sends a byte, are
/// each closed after `server.header_read_timeout`, freeing the only place for the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_silent_connections_are_closed_at_the_header_deadline() {
    let d = Daemon::start("[server]\nmax_connections = 1\nheader_read_timeout = \"1s\"\n");
    // Idle after one request on a keep-alive connection.
    let mut idle = match TcpStream::connect(d.addr).await {
        Ok(s) => s,
        Err(e) => panic!("connect: {e}"),
    };
    let sent = idle
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await;
    assert!(sent.is_ok(), "{sent:?}");
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&answer).contains(r#"{"status":"ok"}"#) {
        match tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            other => panic!("no answer to the first request: {other:?}"),
        }
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    assert_eq!(readyz(&d).await, 200);
    assert!(
        read_until_closed(&mut idle).await.is_empty(),
        "closed with nothing more"
    );

    // Silent from the start.
    let mut silent = match TcpStream::connect(d.addr).await {
        Ok(s) => s,
        Err(e) => panic!("connect: {e}"),
    };
    assert_eq!(readyz(&d).await, 200);
    assert!(read_until_closed(&mut silent).await.is_empty());
}

/// Started with a soft open-file limit far below its hard one, the daemon raises the soft
/// limit to the hard one, and lowers a `server.max_connections` that would not fit beside its
/// own files, saying so.
#[test]
fn the_open_file_limit_is_raised_and_caps_the_connections() {
    let d = Daemon::start_with_open_file_limits("", 64, 2048);
    let limits = match std::fs::read_to_string(format!("/proc/{}/limits", d.pid())) {
        Ok(t) => t,
        Err(e) => panic!("cannot read the daemon's limits: {e}"),
    };
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| l.split_whitespace().skip(3).take(2).collect::<Vec<_>>());
    assert_eq!(
        open_files,
        Some(vec!["2048", "2048"]),
        "soft and hard limits:\n{limits}"
    );
    let logs = d.logs();
    let warning = logs
        .lines()
        .find(|l| l.contains("server.max_connections is above"))
        .unwrap_or_else(|| panic!("no warning about the lowered cap:\n{logs}"));
    assert!(warning.contains("configured=10000"), "{warning}");
    assert!(warning.contains("serving=1024"), "{warning}");
}

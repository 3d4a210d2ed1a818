//! A minimal HTTP/1.1 client connection for the benchmarks (keep-alive, Content-Length and
//! chunked bodies, 1xx, read-until-close).

use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head or chunk-size line accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest response body accepted.
const MAX_BODY: usize = 256 * 1024 * 1024;

pub struct HttpConn {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

pub struct HttpResponse {
    pub status: u16,
    pub body: Bytes,
    /// The server will close the connection after this response.
    pub close: bool,
}

impl HttpResponse {
    /// The start of the body as text, for error messages.
    pub fn body_head(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
    }

    /// `HTTP <status>: <start of the body>`, for an unexpected answer.
    pub fn summary(&self) -> String {
        format!("HTTP {}: {}", self.status, self.body_head())
    }
}

/// One GET on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<HttpResponse> {
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    let resp = tokio::time::timeout(timeout, async {
        let mut conn = HttpConn::connect(addr).await?;
        conn.round_trip(request.as_bytes()).await
    })
    .await
    .with_context(|| format!("GET {path} timed out"))?
    .with_context(|| format!("GET {path} failed"))?;
    Ok(resp)
}

pub struct Head {
    pub status: u16,
    pub content_length: Option<usize>,
    /// Transfer-Encoding present; `true` when its final coding is chunked.
    pub transfer_encoding: Option<bool>,
    pub close: bool,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl HttpConn {
    pub async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
        })
    }

    /// Writes a whole request and reads its whole response.
    pub async fn round_trip(&mut self, request: &[u8]) -> io::Result<HttpResponse> {
        self.stream.write_all(request).await?;
        loop {
            let head = self.read_head().await?;
            // Interim responses (100 Continue and the like) precede the real one.
            if (100..200).contains(&head.status) {
                continue;
            }
            let mut close = head.close;
            let body = if head.status == 204 || head.status == 304 {
                Bytes::new()
            } else {
                match (head.transfer_encoding, head.content_length) {
                    (Some(true), _) => self.read_chunked().await?,
                    (None, Some(n)) => self.read_exact(n).await?,
                    // No length at all (or a final coding other than chunked): the body runs
                    // until the server closes the connection.
                    (Some(false), _) | (None, None) => {
                        close = true;
                        self.read_to_close().await?
                    }
                }
            };
            return Ok(HttpResponse {
                status: head.status,
                body,
                close,
            });
        }
    }

    /// Reads more bytes into the buffer; end of stream is an error here.
    pub async fn fill(&mut self) -> io::Result<()> {
        self.buf.reserve(8 * 1024);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by the server mid-response",
            ));
        }
        Ok(())
    }

    pub async fn read_head(&mut self) -> io::Result<Head> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = self.buf.split_to(end + 4);
                return parse_head(&head[..end]);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(invalid("response head too large"));
            }
            self.fill().await?;
        }
    }

    /// One CRLF-terminated line, without its CRLF.
    pub async fn read_line(&mut self) -> io::Result<BytesMut> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                let mut line = self.buf.split_to(end + 2);
                line.truncate(end);
                return Ok(line);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(invalid("line too long in chunked body"));
            }
            self.fill().await?;
        }
    }

    pub async fn read_exact(&mut self, n: usize) -> io::Result<Bytes> {
        if n > MAX_BODY {
            return Err(invalid(format!("response body of {n} bytes is too large")));
        }
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok(self.buf.split_to(n).freeze())
    }

    pub async fn read_chunked(&mut self) -> io::Result<Bytes> {
        let mut body = BytesMut::new();
        loop {
            let line = self.read_line().await?;
            let text = std::str::from_utf8(&line).map_err(|_| invalid("bad chunk size line"))?;
            let size_text = text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| invalid(format!("bad chunk size {size_text:?}")))?;
            if size == 0 {
                // Trailer fields, up to the empty line.
                while !self.read_line().await?.is_empty() {}
                return Ok(body.freeze());
            }
            if body.len() + size > MAX_BODY {
                return Err(invalid("chunked response body too large"));
            }
            let chunk = self.read_exact(size + 2).await?;
            if !chunk.ends_with(b"\r\n") {
                return Err(invalid("chunk not followed by CRLF"));
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }

    pub async fn read_to_close(&mut self) -> io::Result<Bytes> {
        loop {
            if self.buf.len() > MAX_BODY {
                return Err(invalid("response body too large"));
            }
            self.buf.reserve(8 * 1024);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Ok(self.buf.split().freeze());
            }
        }
    }
}

/// Parses a status line and header fields (without the final empty line).
fn parse_head(raw: &[u8]) -> io::Result<Head> {
    let text = String::from_utf8_lossy(raw);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let bad_status = || invalid(format!("bad status line {status_line:?}"));
    // "HTTP/1.x SSS reason"
    let rest = status_line.strip_prefix("HTTP/1.").ok_or_else(bad_status)?;
    let http10 = rest.starts_with('0');
    let code = rest.get(1..5).ok_or_else(bad_status)?;
    let status = code
        .strip_prefix(' ')
        .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(bad_status)?;
    if rest.len() > 5 && !rest[5..].starts_with(' ') {
        return Err(bad_status());
    }
    let mut head = Head {
        status,
        content_length: None,
        transfer_encoding: None,
        close: http10,
    };
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("bad header line {line:?}")))?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .map_err(|_| invalid(format!("bad content-length {value:?}")))?;
            if head.content_length.is_some_and(|m| m != n) {
                return Err(invalid("conflicting content-length headers"));
            }
            head.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let last = value.rsplit(',').next().unwrap_or("").trim();
            head.transfer_encoding = Some(last.eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    head.close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && http10 {
                    head.close = false;
                }
            }
        }
    }
    Ok(head)
}

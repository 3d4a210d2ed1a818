//! Streamed response bodies. Handlers answer a buffered `Resp`; one that streams (a backup)
//! puts a `ChannelBody` in the response's extensions with `Resp`'s body left empty, and
//! `attach` swaps it in before hyper sends the response. Memory stays bounded by the channel.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::Response;
use hyper::body::{Frame, SizeHint};
use tokio::sync::mpsc;

use super::Resp;

/// Every response body: buffered, or streamed from a channel.
pub type Body = Either<Full<Bytes>, ChannelBody>;

/// A body of known length fed chunk by chunk from a channel. Ending short is an error, so a
/// client never mistakes a cut-off stream for a complete one.
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    remaining: u64,
}

impl ChannelBody {
    /// A body of exactly `len` bytes, and the sender that feeds it.
    pub fn new(len: u64, depth: usize) -> (mpsc::Sender<io::Result<Bytes>>, Self) {
        let (tx, rx) = mpsc::channel(depth.max(1));
        (tx, Self { rx, remaining: len })
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                let n = chunk.len() as u64;
                if n > this.remaining {
                    return Poll::Ready(Some(Err(io::Error::other(
                        "the stream is longer than announced",
                    ))));
                }
                this.remaining -= n;
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream ended early",
            )))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// The response extension a streaming handler leaves for `attach`.
#[derive(Clone)]
struct Streamed(Arc<Mutex<Option<ChannelBody>>>);

/// A response whose body is `body` (headers and status as given in `resp`).
pub fn streaming(mut resp: Resp, body: ChannelBody) -> Resp {
    resp.extensions_mut()
        .insert(Streamed(Arc::new(Mutex::new(Some(body)))));
    resp
}

/// Puts a streamed body in place when the handler left one.
pub fn attach(resp: Resp) -> Response<Body> {
    let (mut parts, full) = resp.into_parts();
    let streamed = parts
        .extensions
        .remove::<Streamed>()
        .and_then(|s| s.0.lock().ok().and_then(|mut b| b.take()));
    match streamed {
        Some(body) => Response::from_parts(parts, Either::Right(body)),
        None => Response::from_parts(parts, Either::Left(full)),
    }
}

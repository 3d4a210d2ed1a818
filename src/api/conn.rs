//! What one client connection may hold: a cap on open connections (a permit per connection,
//! taken before `accept`), and a deadline on a response write that makes no progress, so a
//! client that never reads its answer cannot keep a connection (and its memory) for ever.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use tokio::time::{Instant, Sleep};

pub use crate::config::ServerLimits as Limits;

/// An I/O stream whose writes fail with `TimedOut` once one has waited `limit` without the
/// peer taking a byte. The timer exists only while a write is stalled.
pub struct WriteDeadline<T> {
    io: T,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> WriteDeadline<T> {
    pub fn new(io: T, limit: Duration) -> Self {
        Self {
            io,
            limit,
            stalled: None,
        }
    }

    /// Called when a write returned `Pending`: arms the timer on the first stall and fails
    /// once it has run out.
    fn stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + limit)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client read nothing of the response for {limit:?}"),
        ))
    }

    fn progress<R>(&mut self, cx: &mut Context<'_>, p: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match p {
            Poll::Pending => self.stall(cx).map(Err),
            done => {
                self.stalled = None;
                done
            }
        }
    }
}

impl<T: Read + Unpin> Read for WriteDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for WriteDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progress(cx, p)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progress(cx, p)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.io).poll_flush(cx);
        self.progress(cx, p)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Raises the soft limit on open files to the hard limit (so `max_connections` can be
/// reached), and answers how many connections may be open at once: the configured number,
/// lowered if needed to leave room for the database, the journal and outbound deliveries.
pub fn connection_cap(configured: usize) -> usize {
    let nofile = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        // Raising may be refused (a seccomp filter, say): the cap must still fit the limit in
        // force.
        Err(e) => match rlimit::Resource::NOFILE.get() {
            Ok((soft, _)) => {
                tracing::warn!(
                    error = %e,
                    open_file_limit = soft,
                    "cannot raise the open-file limit; serving within the current one"
                );
                soft
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the open-file limit");
                return configured;
            }
        },
    };
    // Half the descriptors, or all but 1024, whichever leaves more for the API.
    let room = nofile.saturating_sub(1024).max(nofile / 2);
    let room = usize::try_from(room).unwrap_or(usize::MAX).max(16);
    if configured > room {
        tracing::warn!(
            configured,
            open_file_limit = nofile,
            serving = room,
            "server.max_connections is above what the open-file limit leaves room for; lowered"
        );
        room
    } else {
        configured
    }
}

#[cfg(test)]
mod tests {
    use hyper_util::rt::TokioIo;

    use super::*;

    fn write_some(
        w: &mut WriteDeadline<TokioIo<tokio::io::DuplexStream>>,
    ) -> Poll<io::Result<usize>> {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        Pin::new(w).poll_write(&mut cx, &[7u8; 64])
    }

    /// A peer that reads nothing fails the write after the limit; one that reads in time
    /// keeps it going.
    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_takes_fails_after_the_limit() {
        use tokio::io::AsyncReadExt;
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut w = WriteDeadline::new(TokioIo::new(ours), Duration::from_secs(30));
        assert!(matches!(write_some(&mut w), Poll::Ready(Ok(64))));
        assert!(write_some(&mut w).is_pending(), "the peer's buffer is full");
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(write_some(&mut w).is_pending(), "not yet");
        // The peer reads: progress resets the deadline.
        let mut buf = [0u8; 64];
        assert_eq!(theirs.read(&mut buf).await.unwrap(), 64);
        assert!(matches!(write_some(&mut w), Poll::Ready(Ok(64))));
        assert!(write_some(&mut w).is_pending());
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(
            write_some(&mut w).is_pending(),
            "a fresh 30 s after progress"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        match write_some(&mut w) {
            Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::TimedOut),
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
}

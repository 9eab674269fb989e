//! One TCP connection, from accept to close: the caps on how many may be
//! open and how many may still be speaking plain HTTP, the 503 given when a
//! cap is reached, and the deadline on HTTP responses a peer does not take
//! (G7: the relay degrades by refusing, never by growing).
//!
//! The other stages have their own limits where they happen: the request
//! head in hyper (its timer and `header_read_timeout`, see `serve`), a
//! `/v1` body in the API, the upgrade in [`super::websocket`], the first
//! frame and the WebSocket's write and ping deadlines in the session.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;

/// Unsent bytes the kernel may queue for one socket (TCP_NOTSENT_LOWAT).
/// Without it the kernel grows a send buffer up to `tcp_wmem`'s maximum
/// (4 MiB on common systems) for a peer that stops reading: kernel memory
/// the relay would cause per stalled connection. Data in flight is not
/// limited by it, so throughput to a reading peer is unchanged; a socket
/// is writable again once its unsent queue falls below this.
pub const UNSENT_LIMIT: u32 = 128 * 1024;

/// Refusals answered at once; each takes at most [`REFUSAL_TIME`]. Past
/// this many, further connections are closed without an answer.
const MAX_REFUSALS: usize = 64;
/// How long a refusal may take to write its 503 and let the peer read it.
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// The caps of [`Admission`].
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open TCP connections, HTTP and WebSocket.
    pub max_connections: usize,
    /// Connections not (yet) upgraded to a WebSocket.
    pub max_pending: usize,
    /// An HTTP response the peer takes no bytes of for this long ends the
    /// connection (a WebSocket has the same deadline in its session).
    pub write_timeout: Duration,
}

/// Decides, at accept, whether a connection may be served.
pub struct Admission {
    total: Arc<Semaphore>,
    pending: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
}

/// A connection's place among those not yet upgraded; the caller drops it
/// once hyper is done with the connection (upgraded or closed).
pub struct PendingSlot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.metrics.pending_connections.fetch_sub(1, Relaxed);
    }
}

/// A connection's place among all open ones, held by its socket for as
/// long as the socket lives, whichever task owns it.
struct OpenSlot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.metrics.tcp_connections.fetch_sub(1, Relaxed);
    }
}

impl Admission {
    pub fn new(limits: ConnectionLimits, metrics: Arc<Metrics>) -> Self {
        Admission {
            total: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            pending: Arc::new(Semaphore::new(limits.max_pending.max(1))),
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS)),
            limits,
            metrics,
        }
    }

    /// The connection, counted, or `None` if a cap is reached (then it
    /// gets a 503 in the background).
    pub fn admit(&self, stream: TcpStream) -> Option<(Counted<TcpStream>, PendingSlot)> {
        let open = self.total.clone().try_acquire_owned();
        let pending = self.pending.clone().try_acquire_owned();
        let (open, pending) = match (open, pending) {
            (Ok(open), Ok(pending)) => (open, pending),
            (open, _) => {
                let message = if open.is_err() {
                    "the relay is at its connection limit; retry shortly"
                } else {
                    "too many connections are still in their HTTP request; retry shortly"
                };
                self.refuse(stream, message);
                return None;
            }
        };
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(UNSENT_LIMIT) {
            tracing::debug!(error = %e, "TCP_NOTSENT_LOWAT not set");
        }
        self.metrics.tcp_connections.fetch_add(1, Relaxed);
        self.metrics.pending_connections.fetch_add(1, Relaxed);
        let counted = Counted {
            inner: stream,
            _slot: OpenSlot {
                _permit: open,
                metrics: self.metrics.clone(),
            },
            write_timeout: self.limits.write_timeout,
            stall: None,
            stalled_since: None,
            upgraded: Arc::new(AtomicBool::new(false)),
            metrics: self.metrics.clone(),
        };
        let slot = PendingSlot {
            _permit: pending,
            metrics: self.metrics.clone(),
        };
        Some((counted, slot))
    }

    /// Answers 503 with a JSON body, without reading the request: the
    /// point is to spend nothing on it. The socket's write side is shut
    /// and what the peer sent is read and dropped for a moment, so the
    /// peer reads the answer instead of a reset.
    fn refuse(&self, mut stream: TcpStream, message: &'static str) {
        self.metrics.over_capacity.fetch_add(1, Relaxed);
        self.metrics.refused_connections.fetch_add(1, Relaxed);
        let Ok(permit) = self.refusals.clone().try_acquire_owned() else {
            // Refusing too many at once: just close.
            return;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let body = serde_json::json!({"error": {"code": "over_capacity", "message": message}})
                .to_string();
            let response = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                 retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(REFUSAL_TIME, async {
                stream.write_all(response.as_bytes()).await?;
                stream.shutdown().await?;
                let mut sink = [0u8; 4096];
                while stream.read(&mut sink).await? > 0 {}
                io::Result::Ok(())
            })
            .await;
        });
    }
}

/// A socket that holds its connection's place while it lives and ends an
/// HTTP response the peer does not take within the write timeout.
pub struct Counted<T> {
    inner: T,
    _slot: OpenSlot,
    write_timeout: Duration,
    /// The write deadline's timer, made on the first write that waits.
    stall: Option<Pin<Box<Sleep>>>,
    /// Since when writes have been waiting (`None` while they progress).
    stalled_since: Option<Instant>,
    /// Set once upgraded: the session keeps its own write deadline, and
    /// closes with a close code rather than an I/O error.
    upgraded: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl<T> Counted<T> {
    /// A handle that turns the HTTP write deadline off once upgraded.
    pub fn upgraded_flag(&self) -> Arc<AtomicBool> {
        self.upgraded.clone()
    }

    /// Called when a write did not complete: `Some` error once the peer
    /// has taken nothing for the write timeout.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if self.upgraded.load(Relaxed) {
            self.stalled_since = None;
            return None;
        }
        let deadline = match self.stalled_since {
            Some(since) => since + self.write_timeout,
            None => {
                let now = Instant::now();
                self.stalled_since = Some(now);
                let deadline = now + self.write_timeout;
                match &mut self.stall {
                    Some(sleep) => sleep.as_mut().reset(deadline),
                    None => self.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
                }
                deadline
            }
        };
        let sleep = self.stall.as_mut()?;
        if sleep.as_mut().poll(cx).is_ready() || Instant::now() >= deadline {
            self.metrics.timeouts.write.fetch_add(1, Relaxed);
            return Some(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer took no bytes of the response in time",
            ));
        }
        None
    }

    fn progress<R>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        match result {
            Poll::Pending => match self.stalled(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            ready => {
                self.stalled_since = None;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progress(cx, result)
    }
}

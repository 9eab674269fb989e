//! The socket side of a session: every write has a deadline, a full
//! socket is noticed without waiting, and a session ends with the closing
//! handshake.

use std::future::Future as _;
use std::sync::atomic::Ordering::Relaxed;
use std::task::Poll;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::metrics::Metrics;
use crate::relay::protocol::close;

/// The write half, with a deadline on every write: a peer that accepts no
/// bytes for `pong_timeout` is as gone as one that answers no ping.
pub(super) struct Out<S> {
    pub(super) sink: SplitSink<WebSocketStream<S>, Message>,
    pub(super) deadline: Duration,
}

/// The timer is armed only when the write cannot finish at once: a
/// socket with room takes the bytes on the first poll, and arming and
/// cancelling a timer for each of those writes was a per-delivery cost.
pub(super) async fn within<T>(
    deadline: Duration,
    op: impl std::future::Future<Output = Result<T, WsError>>,
) -> Result<T, End> {
    let mut op = std::pin::pin!(op);
    let first = std::future::poll_fn(|cx| Poll::Ready(op.as_mut().poll(cx))).await;
    if let Poll::Ready(result) = first {
        return result.map_err(End::from);
    }
    match tokio::time::timeout(deadline, op).await {
        Ok(result) => result.map_err(End::from),
        Err(_) => Err(End::Close(
            close::UNRESPONSIVE,
            "peer accepted no data in time",
        )),
    }
}

impl<S> Out<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Queues a message; writes only when the buffer is full.
    pub(super) async fn feed(&mut self, message: Message) -> Result<(), End> {
        within(self.deadline, self.sink.feed(message)).await
    }

    /// Queues a message if the socket takes it now. `false`: the socket
    /// is full and the message was not queued; nothing waited.
    pub(super) async fn try_feed(&mut self, message: Message) -> Result<bool, End> {
        let ready = std::future::poll_fn(|cx| Poll::Ready(self.sink.poll_ready_unpin(cx))).await;
        match ready {
            Poll::Ready(Ok(())) => {
                self.sink.start_send_unpin(message)?;
                Ok(true)
            }
            Poll::Ready(Err(e)) => Err(End::from(e)),
            Poll::Pending => Ok(false),
        }
    }

    pub(super) async fn flush(&mut self) -> Result<(), End> {
        within(self.deadline, self.sink.flush()).await
    }

    /// Flushes, counting the times the socket was full and the session
    /// had to wait for it to drain.
    pub(super) async fn drain(&mut self, metrics: &Metrics) -> Result<(), End> {
        let mut flush = std::pin::pin!(self.sink.flush());
        let first = std::future::poll_fn(|cx| Poll::Ready(flush.as_mut().poll(cx))).await;
        if let Poll::Ready(result) = first {
            return result.map_err(End::from);
        }
        metrics.socket_full.fetch_add(1, Relaxed);
        metrics.sessions_waiting.fetch_add(1, Relaxed);
        let drained = within(self.deadline, flush).await;
        metrics.sessions_waiting.fetch_sub(1, Relaxed);
        drained
    }

    /// Sends a control frame now.
    pub(super) async fn text(&mut self, frame: String) -> Result<(), End> {
        self.feed(text(frame)).await?;
        self.flush().await
    }
}

/// Why a session ends early.
#[derive(Debug)]
pub(super) enum End {
    /// The peer went away or the socket failed: nothing more to send.
    Gone,
    /// Close with this code and reason.
    Close(u16, &'static str),
}

impl From<WsError> for End {
    fn from(_: WsError) -> Self {
        End::Gone
    }
}

/// The closing handshake: send our close, then wait (at most 2 s) for the
/// peer's, so it reads our code before the TCP connection goes. Close
/// reasons are cut to the protocol's 123 bytes.
pub(super) async fn close_handshake<S>(
    sink: &mut SplitSink<WebSocketStream<S>, Message>,
    stream: &mut SplitStream<WebSocketStream<S>>,
    code: u16,
    reason: &str,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason[..end].into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = sink.send(Message::Close(Some(frame))).await;
        let _ = sink.flush().await;
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

pub(super) fn text(s: String) -> Message {
    Message::Text(Utf8Bytes::from(s))
}

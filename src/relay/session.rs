//! One WebSocket connection: its subscriptions, their cursors, and the
//! order of what it writes.
//!
//! Each subscription has a cursor (the last seq sent). While it keeps up it
//! is fed from its topic's ring; when the ring no longer holds cursor + 1
//! it reads the log at its own pace (batched, bounded in bytes) and goes
//! back to the ring once caught up. So a slow client costs neither memory
//! nor loss, and resume (`since_seq`) is the same path: a cursor that
//! starts behind (G3, G7).
//!
//! Frames are written only while the socket takes them. When it is full
//! the session lets go of whatever it has not written (ring frames stay in
//! the ring, log batches in the log), waits for the socket to drain, and
//! reads again from its cursor. Catch-up batches are reserved in the
//! relay-wide [`CatchupBudget`] and sized to what this socket has shown it
//! takes, so a crowd of stalled clients holds no batches at all (G7).
//!
//! Waiting for a drain has a deadline: a peer that accepts no bytes for
//! `pong_timeout`, like one that answers no ping, is closed with the
//! unresponsive close code, and so is one that sends no frame at all within
//! `first_frame_timeout` of connecting. Nothing else closes a slow client.
//!
//! A cursor names an event (seq and capture time, see [`Cursor`]): the
//! ring serves a subscription only when it holds that very event, and a
//! read of the log checks that the log still holds it. When the log
//! disowns it (a failover lost history this client saw), the client gets
//! `reset` with `history_diverged` and continues from the log's latest
//! event (G8).

use std::collections::HashMap;
use std::future::Future as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use rand::Rng;

use crate::auth::{self, AuthError, Authenticator, Identity};
use crate::metrics::{Metrics, RecheckCause};
use crate::relay::budget::CatchupBudget;
use crate::relay::hub::{Hub, RingRead, Topic};
use crate::relay::log::{
    Batch, Cursor, EventLog, Frame, LogError, ReadLimits, ScopeState, Verdict,
};
use crate::relay::protocol::{self, close, code, reset_reason, ClientMessage};

/// Most ring frames written per subscription before the session looks at
/// its socket and other subscriptions again (fairness).
const PUMP_BATCH: usize = 256;

/// What every session shares.
pub struct SessionContext {
    pub hub: Arc<Hub>,
    pub log: EventLog,
    pub metrics: Arc<Metrics>,
    /// Bounds concurrent catch-up reads, so a crowd of slow or resuming
    /// clients cannot take every database connection.
    pub backfills: Semaphore,
    /// Bounds the catch-up bytes all sessions hold together.
    pub budget: CatchupBudget,
    pub auth: Authenticator,
    pub limits: SessionLimits,
}

#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub max_subscriptions: usize,
    /// The largest catch-up read; each subscription asks for what its
    /// socket takes, up to this.
    pub catchup_read: ReadLimits,
    /// Client frames per second (sustained); twice as many in a burst.
    pub max_frames_per_second: u32,
    /// Every subscription is re-authorized this often (`None`: never), for
    /// rules that read tables nobody tracks.
    pub reauthorize_interval: Option<Duration>,
    /// Longest one call of the app's rule may take.
    pub authorize_timeout: Duration,
    /// A connection that sends no frame this long after the upgrade is
    /// closed.
    pub first_frame_timeout: Duration,
}

struct Subscription {
    topic: Arc<Topic>,
    id: u64,
    /// The last event sent to the client (or the one it said it has).
    cursor: Cursor,
    /// The topic epoch in which the cursor was last checked against the
    /// log; the ring serves it only in that epoch.
    epoch: u64,
    /// The hub's connection-loss generation in which the cursor was last
    /// known to name an event of the log (`None`: never, a client's own
    /// cursor). Otherwise the next read of the log checks it.
    checked_in: Option<u64>,
    /// Fed from the log rather than the ring.
    catching_up: bool,
    /// A membership event was just sent: ask `relay.authorize` again
    /// before sending anything after it (G4).
    recheck: bool,
    /// How much the next catch-up read asks for.
    read_size: ReadSize,
}

/// The smallest catch-up read, in bytes (a read always returns at least
/// one event, whatever its size).
const MIN_READ_BYTES: usize = 64 * 1024;
/// Rows of a first catch-up read, before frame sizes are known.
const FIRST_READ_ROWS: usize = 64;

/// How much one catch-up read asks for: what this client's socket has
/// shown it takes. It starts small, doubles after each batch written
/// whole (up to the configured read limits), and after a batch the socket
/// could not take, falls back to what it did take.
#[derive(Debug, Clone, Copy)]
struct ReadSize {
    bytes: usize,
    /// Average frame size of the last batch (0 before one), to ask for no
    /// more rows than the bytes will hold.
    avg_frame: usize,
}

impl ReadSize {
    fn new() -> Self {
        ReadSize {
            bytes: MIN_READ_BYTES,
            avg_frame: 0,
        }
    }

    fn limits(&self, max: ReadLimits) -> ReadLimits {
        let max_rows = max.rows.max(1) as usize;
        let bytes = self.bytes.min(max.bytes.max(1) as usize);
        let rows = match self.avg_frame {
            0 => FIRST_READ_ROWS,
            avg => bytes / avg + 1,
        };
        ReadLimits {
            rows: rows.clamp(1, max_rows) as i32,
            bytes: bytes as i64,
        }
    }

    fn observe(&mut self, frames: &[Frame]) {
        if !frames.is_empty() {
            let total: usize = frames.iter().map(|f| f.bytes.len()).sum();
            self.avg_frame = (total / frames.len()).max(1);
        }
    }

    fn written_whole(&mut self, max: ReadLimits) {
        self.bytes = (self.bytes * 2).min(max.bytes.max(1) as usize);
    }

    fn socket_full(&mut self, written: usize) {
        self.bytes = written.max(MIN_READ_BYTES);
    }
}

/// What a subscription's turn in `pump` came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Nothing more to send now.
    Idle,
    /// More to send right away.
    More,
    /// The socket is full: wait for it to drain before anything else.
    SocketFull,
}

/// The write half, with a deadline on every write: a peer that accepts no
/// bytes for `pong_timeout` is as gone as one that answers no ping.
struct Out<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
    deadline: Duration,
}

/// The timer is armed only when the write cannot finish at once: a
/// socket with room takes the bytes on the first poll, and arming and
/// cancelling a timer for each of those writes was a per-delivery cost.
async fn within<T>(
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
    async fn feed(&mut self, message: Message) -> Result<(), End> {
        within(self.deadline, self.sink.feed(message)).await
    }

    /// Queues a message if the socket takes it now. `false`: the socket
    /// is full and the message was not queued; nothing waited.
    async fn try_feed(&mut self, message: Message) -> Result<bool, End> {
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

    async fn flush(&mut self) -> Result<(), End> {
        within(self.deadline, self.sink.flush()).await
    }

    /// Flushes, counting the times the socket was full and the session
    /// had to wait for it to drain.
    async fn drain(&mut self, metrics: &Metrics) -> Result<(), End> {
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
    async fn text(&mut self, frame: String) -> Result<(), End> {
        self.feed(text(frame)).await?;
        self.flush().await
    }
}

/// Why a session ends early.
#[derive(Debug)]
enum End {
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

pub async fn run<S>(
    ws: WebSocketStream<S>,
    ctx: Arc<SessionContext>,
    identity: Identity,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _counted = ConnectionCount::new(ctx.metrics.clone());
    let (sink, mut stream) = ws.split();
    let mut out = Out {
        sink,
        deadline: ctx.limits.pong_timeout,
    };
    let mut session = Session {
        ctx: ctx.clone(),
        identity,
        subs: HashMap::new(),
        wake: Arc::new(Notify::new()),
        retry_at: None,
        budget: FrameBudget::new(ctx.limits.max_frames_per_second),
        turn: 0,
    };
    let end = session.serve(&mut out, &mut stream, &shutdown).await;
    if let End::Close(code, reason) = end {
        close_handshake(&mut out.sink, &mut stream, code, reason).await;
    }
    // Dropping the session (here, or while unwinding from a panic)
    // removes its subscriptions from the hub.
    drop(session);
}

/// Closes a connection that never becomes a session (bad token, limits)
/// with `code` and `reason`.
pub async fn refuse<S>(ws: WebSocketStream<S>, code: u16, reason: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    close_handshake(&mut sink, &mut stream, code, reason).await;
}

/// The closing handshake: send our close, then wait (at most 2 s) for the
/// peer's, so it reads our code before the TCP connection goes. Close
/// reasons are cut to the protocol's 123 bytes.
async fn close_handshake<S>(
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

/// Counts an open connection for as long as it lives, panics included.
struct ConnectionCount(Arc<Metrics>);

impl ConnectionCount {
    fn new(metrics: Arc<Metrics>) -> Self {
        metrics.connections.fetch_add(1, Relaxed);
        ConnectionCount(metrics)
    }
}

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Relaxed);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.unsubscribe_all();
    }
}

struct Session {
    ctx: Arc<SessionContext>,
    identity: Identity,
    subs: HashMap<String, Subscription>,
    /// Rung by topics when they publish, and by ourselves for more work.
    wake: Arc<Notify>,
    /// After a failed log read, when to try again.
    retry_at: Option<Instant>,
    budget: FrameBudget,
    /// Which subscription goes first in the next `pump`: it rotates, so a
    /// catch-up that fills the socket every time cannot starve the others.
    turn: usize,
}

/// A token bucket over client frames: `rate` per second sustained, twice
/// that in a burst. Refused frames get an error frame; a client that keeps
/// sending far past its budget is closed, so a flood costs us nothing.
struct FrameBudget {
    rate: f64,
    tokens: f64,
    last: Instant,
    /// Frames refused since the budget last had room.
    refused: u32,
}

impl FrameBudget {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        FrameBudget {
            rate,
            tokens: rate * 2.0,
            last: Instant::now(),
            refused: 0,
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.rate * 2.0);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused = 0;
            true
        } else {
            self.refused += 1;
            false
        }
    }
}

/// Refused frames in a row after which the connection is closed.
const MAX_REFUSED_IN_A_ROW: u32 = 100;

impl Session {
    async fn serve<S>(
        &mut self,
        out: &mut Out<S>,
        stream: &mut SplitStream<WebSocketStream<S>>,
        shutdown: &CancellationToken,
    ) -> End
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let limits = self.ctx.limits;
        // When the oldest ping still unanswered was sent: liveness is
        // judged against pings actually sent, never against plain silence.
        let mut unanswered_since: Option<Instant> = None;
        let mut ping =
            tokio::time::interval_at(Instant::now() + limits.ping_interval, limits.ping_interval);
        // Made once and kept across iterations, not per wake: a fresh
        // cancellation waiter and token timer for every delivery were
        // registrations on structures all sessions share.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let mut expires_at = self.identity.expires_at;
        let expiry = tokio::time::sleep_until(self.expiry());
        tokio::pin!(expiry);
        // The safety net of G4. The first check falls at a random point of
        // the first period, so sessions that connected together (after a
        // relay restart) do not all ask the database at once; after it,
        // every period.
        let mut reauthorize = limits.reauthorize_interval.map(|period| {
            let first = period.mul_f64(rand::rng().random_range(0.0..1.0));
            let mut timer = tokio::time::interval_at(Instant::now() + first, period);
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            timer
        });
        // Until the client says anything, the connection is bounded in
        // time like an HTTP request is.
        let first_frame = tokio::time::sleep(limits.first_frame_timeout);
        tokio::pin!(first_frame);
        let mut heard = false;
        loop {
            if self.identity.expires_at != expires_at {
                // Refreshed by {"action":"auth"}.
                expires_at = self.identity.expires_at;
                expiry.as_mut().reset(self.expiry());
            }
            let retry = self.retry_at;
            tokio::select! {
                biased;
                _ = &mut cancelled => {
                    return End::Close(close::GOING_AWAY, "relay shutting down; reconnect and resume with since_seq");
                }
                _ = &mut expiry => {
                    return End::Close(close::TOKEN_EXPIRED, "token expired; send {\"action\":\"auth\"} with a fresh token before expiry");
                }
                _ = &mut first_frame, if !heard => {
                    self.ctx.metrics.timeouts.first_frame.fetch_add(1, Relaxed);
                    return End::Close(close::UNRESPONSIVE, "no frame received in time after connecting");
                }
                incoming = stream.next() => {
                    heard = true;
                    unanswered_since = None;
                    let result = match incoming {
                        None => return End::Gone,
                        Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. })))
                        | Some(Err(WsError::Capacity(_))) => {
                            return End::Close(close::MESSAGE_TOO_BIG, "frame larger than the inbound limit");
                        }
                        Some(Err(WsError::Utf8(_))) => {
                            return End::Close(close::INVALID_PAYLOAD, "text frame is not valid UTF-8");
                        }
                        Some(Err(_)) => return End::Gone,
                        Some(Ok(message)) => self.on_message(message, out).await,
                    };
                    if let Err(end) = result {
                        return end;
                    }
                }
                // Before `wake`: a long catch-up keeps `wake` ready all the
                // time and must not starve the pings. The deadline runs
                // from the oldest unanswered ping on its own timer, not on
                // the ping tick, so a silent peer goes `pong_timeout` after
                // that ping, as documented.
                _ = sleep_until_opt(unanswered_since.map(|t| t + limits.pong_timeout)) => {
                    return End::Close(close::UNRESPONSIVE, "no answer to pings");
                }
                _ = ping.tick() => {
                    let sent = async {
                        out.feed(Message::Ping(Default::default())).await?;
                        out.flush().await
                    };
                    if let Err(end) = sent.await {
                        return end;
                    }
                    unanswered_since.get_or_insert_with(Instant::now);
                }
                _ = tick_opt(&mut reauthorize) => {
                    if let Err(end) = self.reauthorize_all(out).await {
                        return end;
                    }
                }
                _ = self.wake.notified() => {
                    let pumped = tokio::select! {
                        _ = &mut cancelled => continue,
                        r = self.pump(out) => r,
                    };
                    if let Err(end) = pumped {
                        return end;
                    }
                }
                _ = sleep_until_opt(retry) => {
                    self.retry_at = None;
                    self.wake.notify_one();
                }
            }
        }
    }

    /// When the current token stops being valid (with the leeway).
    /// Tokens that never expire in practice (a far-future `exp`) are
    /// re-checked at least yearly rather than overflowing the clock.
    fn expiry(&self) -> Instant {
        const YEAR: u64 = 365 * 24 * 3600;
        let deadline = self
            .identity
            .expires_at
            .saturating_add(self.ctx.auth.leeway().as_secs());
        let left = deadline.saturating_sub(auth::unix_now()).min(YEAR);
        Instant::now() + Duration::from_secs(left)
    }

    async fn on_message<S>(&mut self, message: Message, out: &mut Out<S>) -> Result<(), End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if matches!(message, Message::Text(_) | Message::Binary(_)) && !self.budget.take() {
            self.ctx.metrics.client_errors.fetch_add(1, Relaxed);
            if self.budget.refused > MAX_REFUSED_IN_A_ROW {
                return Err(End::Close(
                    close::RATE_LIMITED,
                    "too many frames; slow down",
                ));
            }
            let frame = protocol::error_frame(
                code::RATE_LIMITED,
                "too many frames per second; this one was ignored",
                None,
                None,
            );
            return out.text(frame).await;
        }
        match message {
            Message::Text(text) => match protocol::parse(&text) {
                Ok(request) => self.on_request(request, out).await,
                Err(e) => {
                    self.ctx.metrics.client_errors.fetch_add(1, Relaxed);
                    out.text(e.to_frame()).await
                }
            },
            Message::Binary(_) => {
                self.ctx.metrics.client_errors.fetch_add(1, Relaxed);
                let frame = protocol::error_frame(
                    code::BINARY_NOT_SUPPORTED,
                    "binary frames are not part of the protocol; send JSON text frames",
                    None,
                    None,
                );
                out.text(frame).await
            }
            // Pongs are answered by tungstenite; pings only prove liveness.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
            Message::Close(_) => Err(End::Gone),
        }
    }

    async fn on_request<S>(&mut self, request: ClientMessage, out: &mut Out<S>) -> Result<(), End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match request {
            ClientMessage::Ping => out.text(protocol::pong_frame()).await,
            ClientMessage::Subscribe { scope, since } => self.subscribe(scope, since, out).await,
            ClientMessage::Unsubscribe { scope } => {
                if let Some(sub) = self.subs.remove(&scope) {
                    self.drop_subscription(sub);
                    out.text(protocol::unsubscribed_frame(&scope)).await
                } else {
                    self.ctx.metrics.client_errors.fetch_add(1, Relaxed);
                    let frame = protocol::error_frame(
                        code::NOT_SUBSCRIBED,
                        "not subscribed to this project",
                        Some("unsubscribe"),
                        Some(&scope),
                    );
                    out.text(frame).await
                }
            }
            ClientMessage::Auth { token } => {
                let frame = match self.ctx.auth.verify(&token) {
                    Ok(identity) if identity.user_id == self.identity.user_id => {
                        let expires_at = identity.expires_at;
                        self.identity = identity;
                        serde_json::json!({"type": "authenticated", "user_id": self.identity.user_id, "expires_at": expires_at}).to_string()
                    }
                    Ok(_) => protocol::error_frame(
                        code::FORBIDDEN,
                        "the new token is for another user; reconnect to change users",
                        Some("auth"),
                        None,
                    ),
                    Err(e) => {
                        let code = match e {
                            AuthError::Expired => code::TOKEN_EXPIRED,
                            _ => code::UNAUTHORIZED,
                        };
                        protocol::error_frame(code, &e.to_string(), Some("auth"), None)
                    }
                };
                out.text(frame).await
            }
        }
    }

    async fn subscribe<S>(
        &mut self,
        scope: String,
        since: Option<Cursor>,
        out: &mut Out<S>,
    ) -> Result<(), End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let error = |code: &str, message: &str| {
            protocol::error_frame(code, message, Some("subscribe"), Some(&scope))
        };
        if !self.subs.contains_key(&scope) && self.subs.len() >= self.ctx.limits.max_subscriptions {
            self.ctx.metrics.client_errors.fetch_add(1, Relaxed);
            let frame = error(
                code::TOO_MANY_SUBSCRIPTIONS,
                "subscription limit of this connection reached",
            );
            return out.text(frame).await;
        }
        // The state is read before authorizing: a revocation committed after
        // the state was read has a higher seq, so it reaches this client
        // and triggers a re-check; one committed before is seen by
        // authorize. (The other order would let a revocation fall between
        // the two and be skipped: G4.)
        //
        // The generation is read before the state: a connection loss after it makes the new
        // topic (if any) suspect until the fetcher has checked it (G8).
        let generation = self.ctx.hub.generation();
        let checked = async {
            let _permit = self.ctx.backfills.acquire().await;
            let state = self.ctx.log.scope_state(&scope).await?;
            let verdict = self.authorize(std::slice::from_ref(&scope)).await?;
            Ok::<_, LogError>((state, verdict))
        }
        .await;
        let state = match checked {
            Ok((state, verdicts)) => match outcome_for(&verdicts, &scope) {
                Ok(true) => state,
                Ok(false) => {
                    // Refused now: whatever was allowed before ends too.
                    if let Some(old) = self.subs.remove(&scope) {
                        self.drop_subscription(old);
                    }
                    self.ctx.metrics.client_errors.fetch_add(1, Relaxed);
                    let frame = error(code::FORBIDDEN, "not a member of this project");
                    return out.text(frame).await;
                }
                Err(failure) => {
                    self.end_for_failed_rule(&scope, &failure, out).await?;
                    return out.flush().await;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "subscribe could not reach the database");
                let frame = error(code::UNAVAILABLE, "database unavailable; retry shortly");
                return out.text(frame).await;
            }
        };
        // Re-subscribing replaces the old cursor.
        if let Some(old) = self.subs.remove(&scope) {
            self.drop_subscription(old);
        }
        let (topic, id, epoch) =
            self.ctx
                .hub
                .subscribe(&scope, state.latest(), generation, self.wake.clone());
        self.ctx.metrics.subscriptions.fetch_add(1, Relaxed);
        let (cursor, reset) = resume_from(since, &state);
        // The latest event was just read from the log; a client's cursor
        // is checked by its first read.
        let checked_in = (cursor == state.latest()).then_some(generation);
        self.subs.insert(
            scope.clone(),
            Subscription {
                topic,
                id,
                cursor,
                epoch,
                checked_in,
                catching_up: false,
                recheck: false,
                read_size: ReadSize::new(),
            },
        );
        out.text(protocol::subscribed_frame(&scope, state.latest()))
            .await?;
        if let Some(reason) = reset {
            self.ctx.metrics.resets_sent.fetch_add(1, Relaxed);
            out.text(protocol::reset_frame(&scope, state.latest(), reason))
                .await?;
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Asks the app's rule about `scopes` for this session's user.
    async fn authorize(&self, scopes: &[String]) -> Result<Vec<Verdict>, LogError> {
        self.ctx
            .log
            .authorize_each(
                &self.identity.user_id,
                scopes,
                self.ctx.limits.authorize_timeout,
            )
            .await
    }

    /// The scheduled re-check of every subscription (G4's safety net for
    /// rules that read tables nobody tracks): one query for all of this
    /// session's scopes. A database error changes nothing; the next period
    /// tries again.
    async fn reauthorize_all<S>(&mut self, out: &mut Out<S>) -> Result<(), End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if self.subs.is_empty() {
            return Ok(());
        }
        let scopes: Vec<String> = self.subs.keys().cloned().collect();
        self.ctx
            .metrics
            .reauthorized(RecheckCause::Schedule, scopes.len());
        let verdicts = {
            let _permit = self.ctx.backfills.acquire().await;
            self.authorize(&scopes).await
        };
        let verdicts = match verdicts {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "scheduled re-authorization could not reach the database");
                return Ok(());
            }
        };
        for scope in &scopes {
            let outcome = outcome_for(&verdicts, scope);
            self.apply_verdict(scope, outcome, RecheckCause::Schedule, out)
                .await?;
        }
        out.flush().await
    }

    /// Acts on a re-check: keeps the subscription (true), or ends it with
    /// the frame that says why (false).
    async fn apply_verdict<S>(
        &mut self,
        scope: &str,
        outcome: Result<bool, String>,
        cause: RecheckCause,
        out: &mut Out<S>,
    ) -> Result<bool, End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match outcome {
            Ok(true) => Ok(true),
            Ok(false) => {
                if let Some(sub) = self.subs.remove(scope) {
                    self.drop_subscription(sub);
                }
                self.ctx.metrics.revoked(cause);
                let frame = protocol::error_frame(
                    code::FORBIDDEN,
                    "membership revoked; this subscription has ended",
                    Some("subscribe"),
                    Some(scope),
                );
                out.feed(text(frame)).await?;
                Ok(false)
            }
            Err(failure) => {
                self.end_for_failed_rule(scope, &failure, out).await?;
                Ok(false)
            }
        }
    }

    /// The app's rule raised or ran too long for this user and scope: that
    /// subscription ends (G4: a failing rule stays local); nothing else
    /// does. The rule's own message is logged, not sent: it may name
    /// tables or data the client should not see.
    async fn end_for_failed_rule<S>(
        &mut self,
        scope: &str,
        failure: &str,
        out: &mut Out<S>,
    ) -> Result<(), End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if let Some(sub) = self.subs.remove(scope) {
            self.drop_subscription(sub);
        }
        self.ctx.metrics.authorize_failures.fetch_add(1, Relaxed);
        tracing::warn!(
            user = %self.identity.user_id,
            scope,
            failure,
            "relay.authorize failed; this subscription has ended"
        );
        let frame = protocol::error_frame(
            code::AUTHORIZE_FAILED,
            "the authorization rule failed for this project; this subscription has ended",
            Some("subscribe"),
            Some(scope),
        );
        out.feed(text(frame)).await
    }

    /// Writes what each subscription has pending, a bounded amount each,
    /// while the socket takes it, then flushes: if the socket filled, that
    /// is where the session waits for it to drain (within the deadline),
    /// holding no frames. Rings itself again when more is left.
    async fn pump<S>(&mut self, out: &mut Out<S>) -> Result<(), End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut more = false;
        let mut scopes: Vec<String> = self.subs.keys().cloned().collect();
        if !scopes.is_empty() {
            self.turn = self.turn.wrapping_add(1);
            let first = self.turn % scopes.len();
            scopes.rotate_left(first);
        }
        for scope in scopes {
            match self.pump_one(&scope, out).await? {
                Step::Idle => {}
                Step::More => more = true,
                Step::SocketFull => {
                    more = true;
                    break;
                }
            }
        }
        out.drain(&self.ctx.metrics).await?;
        if more {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// One subscription's turn: ring frames, or one catch-up batch from
    /// the log, written while the socket takes them.
    async fn pump_one<S>(&mut self, scope: &str, out: &mut Out<S>) -> Result<Step, End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let ctx = self.ctx.clone();
        let Some(recheck) = self.subs.get(scope).map(|sub| sub.recheck) else {
            return Ok(Step::Idle);
        };
        if recheck {
            // A membership event was the last thing sent: nothing more of
            // this scope goes out until the database says the user may
            // still read it (G4). On a database error, wait, never assume.
            if self.retry_at.is_some() {
                return Ok(Step::Idle);
            }
            ctx.metrics.reauthorized(RecheckCause::MembershipEvent, 1);
            let verdicts = {
                let _permit = ctx.backfills.acquire().await;
                self.authorize(&[scope.to_string()]).await
            };
            match verdicts {
                Ok(verdicts) => {
                    let outcome = outcome_for(&verdicts, scope);
                    if !self
                        .apply_verdict(scope, outcome, RecheckCause::MembershipEvent, out)
                        .await?
                    {
                        return Ok(Step::Idle);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "re-authorizing a subscription failed; retrying");
                    self.retry_at = Some(Instant::now() + Duration::from_millis(250));
                    return Ok(Step::Idle);
                }
            }
            if let Some(sub) = self.subs.get_mut(scope) {
                sub.recheck = false;
            }
        }
        let Some(sub) = self.subs.get_mut(scope) else {
            return Ok(Step::Idle);
        };
        match sub.topic.read_after(sub.cursor, sub.epoch, PUMP_BATCH) {
            RingRead::UpToDate => {
                set_catching_up(sub, false, &ctx.metrics);
                return Ok(Step::Idle);
            }
            RingRead::Frames(frames) => {
                set_catching_up(sub, false, &ctx.metrics);
                let written = send_frames(out, sub, &frames, &ctx.metrics).await?;
                // Whatever was not written is let go here; the ring (or,
                // once it has moved on, the log) still has it.
                drop(frames);
                if written.socket_full {
                    return Ok(Step::SocketFull);
                }
                let more = sub.recheck
                    || written.frames == PUMP_BATCH
                    || sub.topic.head() > sub.cursor.seq;
                return Ok(if more { Step::More } else { Step::Idle });
            }
            RingRead::Lagged => set_catching_up(sub, true, &ctx.metrics),
        }
        if self.retry_at.is_some() {
            return Ok(Step::Idle);
        }
        // Behind the ring (or the ring cannot vouch for the cursor): one
        // batch from the log, sized to what this socket takes, reserved in
        // the relay-wide budget until written. The log checks that it still
        // holds the cursor's event unless the cursor came from the log in
        // this generation and epoch.
        let epoch = sub.topic.epoch();
        let generation = ctx.hub.generation();
        let check = sub.checked_in != Some(generation) || sub.epoch != epoch;
        let wanted = sub.read_size.limits(ctx.limits.catchup_read);
        let read = {
            let Ok(_permit) = ctx.backfills.acquire().await else {
                return Ok(Step::Idle);
            };
            let mut reserved = ctx.budget.reserve(wanted.bytes as usize).await;
            let limits = ReadLimits {
                bytes: reserved.bytes() as i64,
                ..wanted
            };
            ctx.log
                .frames_after(scope, sub.cursor, limits, sub.topic.head(), check)
                .await
                .map(|batch| {
                    let bytes = match &batch {
                        Batch::Frames(frames) => frames.iter().map(|f| f.bytes.len()).sum(),
                        Batch::Diverged => 0,
                    };
                    reserved.shrink_to(bytes);
                    (batch, reserved)
                })
        };
        let (batch, reserved) = match read {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %e, "catch-up read failed; retrying");
                self.retry_at = Some(Instant::now() + Duration::from_millis(250));
                return Ok(Step::Idle);
            }
        };
        let reason = match batch {
            Batch::Frames(frames) if frames.first().map(|f| f.seq) == Some(sub.cursor.seq + 1) => {
                sub.epoch = epoch;
                sub.checked_in = Some(generation);
                sub.read_size.observe(&frames);
                let written = send_frames(out, sub, &frames, &ctx.metrics).await?;
                let whole = written.frames == frames.len();
                // The batch and its reservation go now, written or not: what
                // the socket did not take is read again from the log once it
                // drains.
                drop((frames, reserved));
                if written.socket_full {
                    sub.read_size.socket_full(written.bytes);
                    return Ok(Step::SocketFull);
                }
                if whole {
                    sub.read_size.written_whole(ctx.limits.catchup_read);
                }
                return Ok(Step::More);
            }
            Batch::Frames(frames) if frames.is_empty() => {
                sub.epoch = epoch;
                sub.checked_in = Some(generation);
                if sub.topic.head() <= sub.cursor.seq {
                    // Nothing after the cursor yet; the ring will ring us.
                    set_catching_up(sub, false, &ctx.metrics);
                    return Ok(Step::Idle);
                }
                // The ring is ahead of the log: its history was trimmed
                // away under the cursor, or the ring is not yet checked
                // against the log (the fetcher settles that and rings us).
                None
            }
            // The log does not continue from the cursor: history was
            // trimmed.
            Batch::Frames(_) => Some(reset_reason::HISTORY_TRIMMED),
            // The log does not hold the event the cursor names.
            Batch::Diverged => Some(reset_reason::HISTORY_DIVERGED),
        };
        drop(reserved);
        let state = match ctx.log.scope_state(scope).await {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(error = %e, "reading the scope state failed; retrying");
                self.retry_at = Some(Instant::now() + Duration::from_millis(250));
                return Ok(Step::Idle);
            }
        };
        let reason = match reason {
            Some(reason) => reason,
            None if state.trimmed_through > sub.cursor.seq => reset_reason::HISTORY_TRIMMED,
            None => {
                self.retry_at = Some(Instant::now() + Duration::from_millis(250));
                return Ok(Step::Idle);
            }
        };
        // Say so explicitly, then go on from the latest event.
        if reason == reset_reason::HISTORY_DIVERGED {
            tracing::info!(
                scope,
                cursor = sub.cursor.seq,
                latest = state.latest_seq,
                "a subscriber's cursor names an event the log no longer holds; sending reset"
            );
        }
        ctx.metrics.resets_sent.fetch_add(1, Relaxed);
        out.feed(text(protocol::reset_frame(scope, state.latest(), reason)))
            .await?;
        sub.cursor = state.latest();
        sub.epoch = epoch;
        sub.checked_in = Some(generation);
        // The skipped range may have held a membership change.
        sub.recheck = true;
        Ok(Step::More)
    }

    fn drop_subscription(&self, sub: Subscription) {
        if sub.catching_up {
            self.ctx.metrics.catchup_subscribers.fetch_sub(1, Relaxed);
        }
        self.ctx.hub.unsubscribe(&sub.topic, sub.id);
        self.ctx.metrics.subscriptions.fetch_sub(1, Relaxed);
    }

    fn unsubscribe_all(&mut self) {
        for (_, sub) in std::mem::take(&mut self.subs) {
            self.drop_subscription(sub);
        }
    }
}

fn set_catching_up(sub: &mut Subscription, on: bool, metrics: &Metrics) {
    if sub.catching_up != on {
        sub.catching_up = on;
        if on {
            metrics.catchup_subscribers.fetch_add(1, Relaxed);
        } else {
            metrics.catchup_subscribers.fetch_sub(1, Relaxed);
        }
    }
}

fn text(s: String) -> Message {
    Message::Text(Utf8Bytes::from(s))
}

/// What `send_frames` wrote.
struct Written {
    frames: usize,
    bytes: usize,
    /// It stopped because the socket was full.
    socket_full: bool,
}

/// Queues frames in order while the socket takes them, advancing the
/// cursor, and stops right after a membership event so the subscription
/// is re-authorized before anything later goes out. Never waits: on a full
/// socket it stops, and the caller lets the rest go.
async fn send_frames<S>(
    out: &mut Out<S>,
    sub: &mut Subscription,
    frames: &[Frame],
    metrics: &Metrics,
) -> Result<Written, End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut written = Written {
        frames: 0,
        bytes: 0,
        socket_full: false,
    };
    for frame in frames {
        // The log's bytes, shared, never re-encoded.
        if !out.try_feed(Message::Text(frame.bytes.clone())).await? {
            written.socket_full = true;
            break;
        }
        metrics.events_sent.fetch_add(1, Relaxed);
        let now_us = chrono::Utc::now().timestamp_micros();
        metrics
            .delivery_delay
            .observe_us(now_us.saturating_sub(frame.captured_us).max(0) as u64);
        sub.cursor = Cursor::at(frame);
        written.frames += 1;
        written.bytes += frame.bytes.len();
        if frame.membership {
            sub.recheck = true;
            break;
        }
    }
    Ok(written)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The outcome for `scope` among `verdicts`; a scope the database did not
/// answer for is a failure, never an allowance.
fn outcome_for(verdicts: &[Verdict], scope: &str) -> Result<bool, String> {
    verdicts
        .iter()
        .find(|v| v.scope == scope)
        .map(|v| v.outcome.clone())
        .unwrap_or_else(|| Err("no verdict for this scope".into()))
}

/// Ticks `timer`, or never when there is none.
async fn tick_opt(timer: &mut Option<tokio::time::Interval>) {
    match timer {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Where a subscription starts, and the `reset` it starts with, if any:
/// from the latest event without `since`; from the client's cursor when the
/// log can continue it (the first read checks that the log holds the event
/// the cursor names); else from the latest event after a `reset`.
fn resume_from(since: Option<Cursor>, state: &ScopeState) -> (Cursor, Option<&'static str>) {
    let Some(since) = since else {
        return (state.latest(), None);
    };
    if since.seq > state.latest_seq {
        // Beyond anything the log holds: with a named event, history this
        // client saw was lost; with a bare seq we can only say it is ahead.
        let reason = if since.time_us.is_some() {
            reset_reason::HISTORY_DIVERGED
        } else {
            reset_reason::SEQ_AHEAD
        };
        return (state.latest(), Some(reason));
    }
    if since.seq < state.trimmed_through {
        return (state.latest(), Some(reset_reason::HISTORY_TRIMMED));
    }
    if since.seq == state.latest_seq && !since.names(state.latest_seq, state.latest_time_us) {
        return (state.latest(), Some(reset_reason::HISTORY_DIVERGED));
    }
    (since, None)
}

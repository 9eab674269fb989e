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
//! Socket writes are awaited with a deadline: a peer that accepts no bytes
//! for `pong_timeout`, like one that answers no ping, is closed with the
//! unresponsive close code. Nothing else closes a slow client.

use std::collections::HashMap;
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
use crate::relay::hub::{Hub, RingRead, Topic};
use crate::relay::log::{EventLog, Frame, LogError, ReadLimits, Verdict};
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
    pub auth: Authenticator,
    pub limits: SessionLimits,
}

#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub max_subscriptions: usize,
    pub catchup_read: ReadLimits,
    /// Client frames per second (sustained); twice as many in a burst.
    pub max_frames_per_second: u32,
    /// Every subscription is re-authorized this often (`None`: never), for
    /// rules that read tables nobody tracks.
    pub reauthorize_interval: Option<Duration>,
    /// Longest one call of the app's rule may take.
    pub authorize_timeout: Duration,
}

struct Subscription {
    topic: Arc<Topic>,
    id: u64,
    /// Last seq sent to the client.
    cursor: u64,
    /// Fed from the log rather than the ring.
    catching_up: bool,
    /// A membership event was just sent: ask `relay.authorize` again
    /// before sending anything after it (G4).
    recheck: bool,
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

    async fn flush(&mut self) -> Result<(), End> {
        within(self.deadline, self.sink.flush()).await
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
                incoming = stream.next() => {
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
                // time and must not starve the pings.
                _ = ping.tick() => {
                    if unanswered_since.is_some_and(|t| t.elapsed() > limits.pong_timeout) {
                        return End::Close(close::UNRESPONSIVE, "no answer to pings");
                    }
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
            ClientMessage::Subscribe { scope, since_seq } => {
                self.subscribe(scope, since_seq, out).await
            }
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
        since_seq: Option<u64>,
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
        let (topic, id) = self
            .ctx
            .hub
            .subscribe(&scope, state.latest_seq, self.wake.clone());
        self.ctx.metrics.subscriptions.fetch_add(1, Relaxed);
        let mut cursor = state.latest_seq;
        let mut reset = None;
        if let Some(since) = since_seq {
            if since > state.latest_seq {
                reset = Some(reset_reason::SEQ_AHEAD);
            } else if since < state.trimmed_through {
                reset = Some(reset_reason::HISTORY_TRIMMED);
            } else {
                cursor = since;
            }
        }
        self.subs.insert(
            scope.clone(),
            Subscription {
                topic,
                id,
                cursor,
                catching_up: false,
                recheck: false,
            },
        );
        out.text(protocol::subscribed_frame(&scope, state.latest_seq))
            .await?;
        if let Some(reason) = reset {
            self.ctx.metrics.resets_sent.fetch_add(1, Relaxed);
            out.text(protocol::reset_frame(&scope, state.latest_seq, reason))
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
    /// then flushes once. Rings itself again when more is left.
    async fn pump<S>(&mut self, out: &mut Out<S>) -> Result<(), End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut more = false;
        let scopes: Vec<String> = self.subs.keys().cloned().collect();
        for scope in scopes {
            more |= self.pump_one(&scope, out).await?;
        }
        out.flush().await?;
        if more {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Returns whether this subscription has more to send right away.
    async fn pump_one<S>(&mut self, scope: &str, out: &mut Out<S>) -> Result<bool, End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let ctx = self.ctx.clone();
        let Some(recheck) = self.subs.get(scope).map(|sub| sub.recheck) else {
            return Ok(false);
        };
        if recheck {
            // A membership event was the last thing sent: nothing more of
            // this scope goes out until the database says the user may
            // still read it (G4). On a database error, wait, never assume.
            if self.retry_at.is_some() {
                return Ok(false);
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
                        return Ok(false);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "re-authorizing a subscription failed; retrying");
                    self.retry_at = Some(Instant::now() + Duration::from_millis(250));
                    return Ok(false);
                }
            }
            if let Some(sub) = self.subs.get_mut(scope) {
                sub.recheck = false;
            }
        }
        let Some(sub) = self.subs.get_mut(scope) else {
            return Ok(false);
        };
        match sub.topic.read_after(sub.cursor, PUMP_BATCH) {
            RingRead::UpToDate => {
                set_catching_up(sub, false, &ctx.metrics);
                return Ok(false);
            }
            RingRead::Frames(frames) => {
                set_catching_up(sub, false, &ctx.metrics);
                let sent = send_frames(out, sub, &frames, &ctx.metrics).await?;
                return Ok(sub.recheck || sent == PUMP_BATCH || sub.topic.head() > sub.cursor);
            }
            RingRead::Lagged => set_catching_up(sub, true, &ctx.metrics),
        }
        if self.retry_at.is_some() {
            return Ok(false);
        }
        // Behind the ring: one batch from the log, at this client's pace.
        let read = {
            let Ok(_permit) = ctx.backfills.acquire().await else {
                return Ok(false);
            };
            ctx.log
                .frames_after(scope, sub.cursor, ctx.limits.catchup_read)
                .await
        };
        let frames = match read {
            Ok(frames) => frames,
            Err(e) => {
                tracing::warn!(error = %e, "catch-up read failed; retrying");
                self.retry_at = Some(Instant::now() + Duration::from_millis(250));
                return Ok(false);
            }
        };
        if frames.first().map(|f| f.seq) != Some(sub.cursor + 1) {
            if frames.is_empty() && sub.topic.head() <= sub.cursor {
                // Nothing after the cursor yet; the ring will ring us.
                set_catching_up(sub, false, &ctx.metrics);
                return Ok(false);
            }
            // The log does not continue from the cursor: history was
            // trimmed. Say so explicitly, then go on from the latest seq.
            let latest = match ctx.log.scope_state(scope).await {
                Ok(state) => state.latest_seq,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the scope state failed; retrying");
                    self.retry_at = Some(Instant::now() + Duration::from_millis(250));
                    return Ok(false);
                }
            };
            ctx.metrics.resets_sent.fetch_add(1, Relaxed);
            out.feed(text(protocol::reset_frame(
                scope,
                latest,
                reset_reason::HISTORY_TRIMMED,
            )))
            .await?;
            sub.cursor = latest;
            // The skipped range may have held a membership change.
            sub.recheck = true;
            return Ok(true);
        }
        send_frames(out, sub, &frames, &ctx.metrics).await?;
        Ok(true)
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

/// Queues frames in order, advancing the cursor, and stops right after a
/// membership event so the subscription is re-authorized before anything
/// later goes out. Returns how many were queued.
async fn send_frames<S>(
    out: &mut Out<S>,
    sub: &mut Subscription,
    frames: &[Frame],
    metrics: &Metrics,
) -> Result<usize, End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut sent = 0;
    for frame in frames {
        feed_event(out, frame, metrics).await?;
        sub.cursor = frame.seq;
        sent += 1;
        if frame.membership {
            sub.recheck = true;
            break;
        }
    }
    Ok(sent)
}

/// Queues one event frame: the log's bytes, shared, never re-encoded.
async fn feed_event<S>(out: &mut Out<S>, frame: &Frame, metrics: &Metrics) -> Result<(), End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    out.feed(Message::Text(frame.bytes.clone())).await?;
    metrics.events_sent.fetch_add(1, Relaxed);
    let now_us = chrono::Utc::now().timestamp_micros();
    metrics
        .delivery_delay
        .observe_us(now_us.saturating_sub(frame.captured_us).max(0) as u64);
    Ok(())
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

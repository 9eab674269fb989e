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
//!
//! The session is split by concern: [`socket`] (writes with deadlines, the
//! closing handshake), [`subscriptions`] (subscribe, unsubscribe, where a
//! cursor starts), [`authorization`] (G4's checks), [`delivery`] (events
//! from the ring or the log) and [`signals`] (broadcasts and presence,
//! G9). This file holds the session itself and its loop.

mod authorization;
mod delivery;
mod signals;
mod socket;
mod subscriptions;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::SplitStream;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use rand::Rng;

use crate::auth::{self, AuthError, Authenticator, Identity};
use crate::metrics::Metrics;
use crate::relay::budget::CatchupBudget;
use crate::relay::hub::{Hub, Topic};
use crate::relay::log::{Cursor, EventLog, ReadLimits};
use crate::relay::mailbox::Mailbox;
use crate::relay::protocol::{self, close, code, ClientMessage};
use crate::relay::rate::TokenBucket;
use crate::relay::signal::Signals;

use authorization::outcome_for;
use delivery::ReadSize;
use socket::{close_handshake, End, Out};

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
    /// Broadcasts out, and presence (through [`Signals::presence`]).
    pub signals: Arc<Signals>,
}

/// Numbers this relay's connections: a connection's name in presence, and
/// how a sender's own broadcasts are told apart.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

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
    /// Receives the scope's presence (a snapshot, then diffs).
    watches_presence: bool,
    /// This connection is in the scope's presence.
    present: bool,
    /// Presence frames were let go while the subscription waited for its
    /// re-check: once it passes, a fresh snapshot is owed.
    presence_missed: bool,
    /// Only events of these resources are sent (G10); `None`: all.
    filter: Option<Vec<String>>,
    /// The client's cursor, when events after it were passed over by the
    /// filter and the client was not yet told (a `skipped` frame is owed
    /// through `cursor`).
    skip_from: Option<u64>,
}

impl Subscription {
    /// Whether `resource`'s events are sent to this subscription.
    fn wants(&self, resource: &str) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == resource))
    }
}

/// The session of an upgraded connection, until it ends.
///
/// Everything the session keeps is built here, before the future: an
/// `async fn` would hold its arguments (the whole WebSocket, the identity)
/// besides what is made of them, for as long as the connection lives.
pub fn run<S>(
    ws: WebSocketStream<S>,
    ctx: Arc<SessionContext>,
    identity: Identity,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let counted = ConnectionCount::new(ctx.metrics.clone());
    let (sink, mut stream) = ws.split();
    let mut out = Out {
        sink,
        deadline: ctx.limits.pong_timeout,
    };
    let budget = FrameBudget::new(ctx.limits.max_frames_per_second);
    let mut session = Session {
        ctx,
        identity,
        subs: HashMap::new(),
        turns: Vec::new(),
        mailbox: Mailbox::new(NEXT_CONNECTION.fetch_add(1, Relaxed)),
        retry_at: None,
        budget,
        turn: 0,
    };
    async move {
        let _counted = counted;
        let end = session.serve(&mut out, &mut stream, &shutdown).await;
        if let End::Close(code, reason) = end {
            close_handshake(&mut out.sink, &mut stream, code, reason).await;
        }
        // Dropping the session (here, or while unwinding from a panic)
        // removes its subscriptions from the hub.
        drop(session);
    }
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
    /// Keyed by shared names, so a turn of `pump` names each scope
    /// without copying it. Boxed: the map keeps room for at least four
    /// entries once it has one, and most connections have one
    /// subscription, so inline entries would hold four `Subscription`s for
    /// every idle connection.
    subs: HashMap<Arc<str>, Box<Subscription>>,
    /// The order of `pump`'s turns, refilled each time (kept for its
    /// capacity: a wake allocates nothing).
    turns: Vec<Arc<str>>,
    /// Rung by topics when they publish, and by ourselves for more work.
    mailbox: Arc<Mailbox>,
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
    bucket: TokenBucket,
    /// Frames refused since the budget last had room.
    refused: u32,
}

impl FrameBudget {
    fn new(rate: u32) -> Self {
        FrameBudget {
            bucket: TokenBucket::new(rate),
            refused: 0,
        }
    }

    fn take(&mut self) -> bool {
        if self.bucket.take() {
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
        // When the oldest ping still unanswered was sent: liveness is
        // judged against pings actually sent, never against plain silence.
        let mut unanswered_since: Option<Instant> = None;
        // Made once and kept across iterations, not per wake: a fresh
        // cancellation waiter and token timer for every delivery were
        // registrations on structures all sessions share.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let mut expires_at = self.identity.expires_at;
        let mut valid_until = self.expiry();
        // Until the client says anything, the connection is bounded in
        // time like an HTTP request is.
        let first_frame_by = Instant::now() + self.ctx.limits.first_frame_timeout;
        let mut heard = false;
        // The session's deadlines share two timers, each set to the
        // earliest of its own, rather than one timer each: every timer is
        // memory every idle connection keeps (an interval boxes its own),
        // and a timer made anew on each wake, as the pong deadline was, is
        // a registration per wake. `guard` (the token's expiry, the first
        // frame) is polled before the socket, so a client that keeps
        // sending cannot hold the connection past its token; `chores`
        // (pings, their deadline, the scheduled re-check, a retry) after
        // it, so a pong already received counts before its deadline is
        // judged.
        let guard = tokio::time::sleep_until(first_frame_by.min(valid_until));
        tokio::pin!(guard);
        // The limits are read where they are used rather than copied:
        // this future is kept by every connection.
        let mut next_ping = Instant::now() + self.ctx.limits.ping_interval;
        // The safety net of G4. The first check falls at a random point of
        // the first period, so sessions that connected together (after a
        // relay restart) do not all ask the database at once; after it,
        // every period.
        let mut next_reauthorize = self
            .ctx
            .limits
            .reauthorize_interval
            .map(|period| Instant::now() + period.mul_f64(rand::rng().random_range(0.0..1.0)));
        let chores = tokio::time::sleep_until(next_ping);
        tokio::pin!(chores);
        loop {
            if self.identity.expires_at != expires_at {
                // Refreshed by {"action":"auth"}, a frame: the first frame's
                // deadline is behind us.
                expires_at = self.identity.expires_at;
                valid_until = self.expiry();
                guard.as_mut().reset(valid_until);
            }
            let pong_timeout = self.ctx.limits.pong_timeout;
            let chores_at = [
                unanswered_since.map(|t| t + pong_timeout),
                next_reauthorize,
                self.retry_at,
            ]
            .into_iter()
            .fold(next_ping, |at, other| earliest(other, at));
            if chores.deadline() != chores_at {
                chores.as_mut().reset(chores_at);
            }
            tokio::select! {
                biased;
                _ = &mut cancelled => {
                    return End::Close(close::GOING_AWAY, "relay shutting down; reconnect and resume with since_seq");
                }
                _ = &mut guard => {
                    // Judged at the deadline the timer was set to, so the one
                    // that fired counts as due however the clock is read.
                    let now = Instant::now().max(guard.deadline());
                    if heard || now >= valid_until {
                        return End::Close(close::TOKEN_EXPIRED, "token expired; send {\"action\":\"auth\"} with a fresh token before expiry");
                    }
                    self.ctx.metrics.timeouts.first_frame.fetch_add(1, Relaxed);
                    return End::Close(close::UNRESPONSIVE, "no frame received in time after connecting");
                }
                incoming = stream.next() => {
                    if !heard {
                        heard = true;
                        guard.as_mut().reset(valid_until);
                    }
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
                        Some(Ok(message)) => Box::pin(self.on_message(message, out)).await,
                    };
                    if let Err(end) = result {
                        return end;
                    }
                }
                // Before `wake`: a long catch-up keeps `wake` ready all the
                // time and must not starve the pings. The pong deadline runs
                // from the oldest unanswered ping, not from the ping tick,
                // so a silent peer goes `pong_timeout` after that ping, as
                // documented.
                _ = &mut chores => {
                    let now = Instant::now().max(chores.deadline());
                    if unanswered_since.is_some_and(|t| now >= t + self.ctx.limits.pong_timeout) {
                        return End::Close(close::UNRESPONSIVE, "no answer to pings");
                    }
                    if now >= next_ping {
                        let sent = Box::pin(async {
                            out.feed(Message::Ping(Default::default())).await?;
                            out.flush().await
                        });
                        if let Err(end) = sent.await {
                            return end;
                        }
                        unanswered_since.get_or_insert_with(Instant::now);
                        next_ping = next_after(next_ping, self.ctx.limits.ping_interval, now);
                    }
                    if let Some(at) = next_reauthorize.filter(|at| now >= *at) {
                        next_reauthorize = self
                            .ctx
                            .limits
                            .reauthorize_interval
                            .map(|period| next_after(at, period, now));
                        if let Err(end) = Box::pin(self.reauthorize_all(out)).await {
                            return end;
                        }
                    }
                    if self.retry_at.is_some_and(|at| now >= at) {
                        self.retry_at = None;
                        self.mailbox.wake();
                    }
                }
                _ = self.mailbox.rung() => {
                    let pumped = tokio::select! {
                        _ = &mut cancelled => continue,
                        r = self.pump(out) => r,
                    };
                    if let Err(end) = pumped {
                        return end;
                    }
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
                    if e.action.as_deref() == Some("broadcast") {
                        self.ctx
                            .metrics
                            .signals
                            .broadcasts_refused
                            .fetch_add(1, Relaxed);
                    }
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
            ClientMessage::Subscribe {
                scope,
                since,
                presence,
                resources,
            } => self.subscribe(scope, since, presence, resources, out).await,
            ClientMessage::Broadcast(broadcast) => self.broadcast(broadcast, out).await,
            ClientMessage::Presence { scope, state } => {
                self.set_presence(scope, Some(state), out).await
            }
            ClientMessage::PresenceLeave { scope } => self.set_presence(scope, None, out).await,
            ClientMessage::Unsubscribe { scope } => {
                if let Some(sub) = self.subs.remove(scope.as_str()) {
                    self.drop_subscription(*sub);
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
                // A fresh token may be signed by a key the provider just
                // added: wait for the (rate-limited) JWKS fetch it starts.
                let frame = match self.ctx.auth.verify_fresh(&token).await {
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
}

/// The earlier of a deadline that may not be set and one that is.
fn earliest(at: Option<Instant>, or: Instant) -> Instant {
    at.map_or(or, |at| at.min(or))
}

/// The deadline after `at` for something due every `period`; one already
/// past is moved a period from `now` (late ticks are not made up).
fn next_after(at: Instant, period: Duration, now: Instant) -> Instant {
    let next = at + period;
    if next > now {
        next
    } else {
        now + period
    }
}

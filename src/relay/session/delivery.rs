//! Writing a session's events: from the topic's ring while it keeps up,
//! from the log at its own pace when it falls behind (G3, G7), one
//! subscription at a time, in turns, and only while the socket takes
//! bytes.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::socket::{text, End, Out};
use super::{outcome_for, Session, Subscription};
use crate::metrics::{Metrics, RecheckCause, Tally};
use crate::relay::hub::RingRead;
use crate::relay::log::{Batch, Cursor, Frame, ReadLimits};
use crate::relay::protocol::{self, reset_reason};

/// Most ring frames written per subscription before the session looks at
/// its socket and other subscriptions again (fairness).
pub(super) const PUMP_BATCH: usize = 256;

/// The smallest catch-up read, in bytes (a read always returns at least
/// one event, whatever its size).
pub(super) const MIN_READ_BYTES: usize = 64 * 1024;
/// Rows of a first catch-up read, before frame sizes are known.
pub(super) const FIRST_READ_ROWS: usize = 64;

/// How much one catch-up read asks for: what this client's socket has
/// shown it takes. It starts small, doubles after each batch written
/// whole (up to the configured read limits), and after a batch the socket
/// could not take, falls back to what it did take.
#[derive(Debug, Clone, Copy)]
pub(super) struct ReadSize {
    bytes: usize,
    /// Average frame size of the last batch (0 before one), to ask for no
    /// more rows than the bytes will hold.
    avg_frame: usize,
}

impl ReadSize {
    pub(super) fn new() -> Self {
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
pub(super) enum Step {
    /// Nothing more to send now.
    Idle,
    /// More to send right away.
    More,
    /// The socket is full: wait for it to drain before anything else.
    SocketFull,
}

impl Session {
    /// Writes what each subscription has pending, a bounded amount each,
    /// while the socket takes it, then flushes: if the socket filled, that
    /// is where the session waits for it to drain (within the deadline),
    /// holding no frames. Rings itself again when more is left.
    pub(super) async fn pump<S>(&mut self, out: &mut Out<S>) -> Result<(), End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // Signals first: they are small, and late ones are worth little.
        let mut more = self.write_signals(out).await? == Step::SocketFull;
        let mut turns = std::mem::take(&mut self.turns);
        turns.clear();
        if !more {
            turns.extend(self.subs.keys().cloned());
        }
        if !turns.is_empty() {
            self.turn = self.turn.wrapping_add(1);
            let first = self.turn % turns.len();
            turns.rotate_left(first);
        }
        for scope in turns.drain(..) {
            match self.pump_one(&scope, out).await? {
                Step::Idle => {}
                Step::More => more = true,
                Step::SocketFull => {
                    more = true;
                    break;
                }
            }
        }
        self.turns = turns;
        out.drain(&self.ctx.metrics).await?;
        if more {
            self.mailbox.wake();
        }
        Ok(())
    }

    /// One subscription's turn: ring frames, or one catch-up batch from
    /// the log, written while the socket takes them.
    pub(super) async fn pump_one<S>(&mut self, scope: &str, out: &mut Out<S>) -> Result<Step, End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Some(recheck) = self.subs.get(scope).map(|sub| sub.recheck) else {
            return Ok(Step::Idle);
        };
        // The database is asked only on these rarer paths (a re-check, a
        // read of the log): their futures are boxed, so the state every
        // idle session keeps between wakes does not reserve room for them.
        if recheck && !Box::pin(self.recheck(scope, out)).await? {
            return Ok(Step::Idle);
        }
        let metrics = &self.ctx.metrics;
        let Some(sub) = self.subs.get_mut(scope) else {
            return Ok(Step::Idle);
        };
        // A `skipped` owed since the socket last filled goes first.
        if !send_skipped(out, sub).await? {
            return Ok(Step::SocketFull);
        }
        match sub.topic.read_after(sub.cursor, sub.epoch, PUMP_BATCH) {
            RingRead::UpToDate => {
                set_catching_up(sub, false, metrics);
                return Ok(Step::Idle);
            }
            RingRead::Frames(frames) => {
                set_catching_up(sub, false, metrics);
                let written = send_frames(out, sub, &frames, metrics).await?;
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
            RingRead::Lagged => set_catching_up(sub, true, metrics),
        }
        if self.retry_at.is_some() {
            return Ok(Step::Idle);
        }
        Box::pin(self.catch_up(scope, out)).await
    }

    /// A membership event was the last thing sent: nothing more of this
    /// scope goes out until the database says the user may still read it
    /// (G4). On a database error, wait, never assume. `true`: the
    /// subscription may go on now.
    async fn recheck<S>(&mut self, scope: &str, out: &mut Out<S>) -> Result<bool, End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if self.retry_at.is_some() {
            return Ok(false);
        }
        let ctx = self.ctx.clone();
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
            if std::mem::take(&mut sub.presence_missed) {
                self.mailbox.resync(&std::sync::Arc::from(scope));
            }
        }
        Ok(true)
    }

    /// Behind the ring (or the ring cannot vouch for the cursor): one
    /// batch from the log, sized to what this socket takes, reserved in
    /// the relay-wide budget until written. The log checks that it still
    /// holds the cursor's event unless the cursor came from the log in
    /// this generation and epoch.
    async fn catch_up<S>(&mut self, scope: &str, out: &mut Out<S>) -> Result<Step, End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let ctx = self.ctx.clone();
        let Some(sub) = self.subs.get_mut(scope) else {
            return Ok(Step::Idle);
        };
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
        ctx.metrics.reset_sent(reason);
        out.feed(text(protocol::reset_frame(scope, state.latest(), reason)))
            .await?;
        sub.cursor = state.latest();
        // The reset moves the client's cursor too.
        sub.skip_from = None;
        sub.epoch = epoch;
        sub.checked_in = Some(generation);
        // The skipped range may have held a membership change.
        sub.recheck = true;
        Ok(Step::More)
    }
}

pub(super) fn set_catching_up(sub: &mut Subscription, on: bool, metrics: &Metrics) {
    if sub.catching_up != on {
        sub.catching_up = on;
        if on {
            metrics.catchup_subscribers.fetch_add(1, Relaxed);
        } else {
            metrics.catchup_subscribers.fetch_sub(1, Relaxed);
        }
    }
}

/// What `send_frames` wrote.
pub(super) struct Written {
    frames: usize,
    bytes: usize,
    /// It stopped because the socket was full.
    socket_full: bool,
}

/// Queues frames in order while the socket takes them, advancing the
/// cursor, and stops right after a membership event so the subscription
/// is re-authorized before anything later goes out. Never waits: on a full
/// socket it stops, and the caller lets the rest go.
pub(super) async fn send_frames<S>(
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
    // One clock read and one round of shared counter updates per batch:
    // the frames of a batch leave within microseconds of each other, and
    // every session's deliveries add to the same counters.
    let now_us = chrono::Utc::now().timestamp_micros();
    let mut sent = Sent {
        metrics,
        delays: Tally::default(),
    };
    for frame in frames {
        if !sub.wants(&frame.resource) {
            // Passed over (G10): the cursor moves; the client is told with
            // one `skipped` frame, before its next event or at the end of
            // this batch.
            sub.skip_from.get_or_insert(sub.cursor.seq);
            sub.cursor = Cursor::at(frame);
            written.frames += 1;
            if frame.membership {
                sub.recheck = true;
                break;
            }
            continue;
        }
        if !send_skipped(out, sub).await? {
            written.socket_full = true;
            break;
        }
        // The log's bytes, shared, never re-encoded.
        if !out.try_feed(Message::Text(frame.bytes.clone())).await? {
            written.socket_full = true;
            break;
        }
        sent.delays
            .observe_us(now_us.saturating_sub(frame.captured_us).max(0) as u64);
        sub.cursor = Cursor::at(frame);
        written.frames += 1;
        written.bytes += frame.bytes.len();
        if frame.membership {
            sub.recheck = true;
            break;
        }
    }
    drop(sent);
    if !written.socket_full && !send_skipped(out, sub).await? {
        written.socket_full = true;
    }
    Ok(written)
}

/// The frames a batch queued, added to the shared counters once, when the
/// batch ends (an early return on a failed socket included).
struct Sent<'a> {
    metrics: &'a Metrics,
    delays: Tally,
}

impl Drop for Sent<'_> {
    fn drop(&mut self) {
        let n = self.delays.count();
        if n > 0 {
            self.metrics.events_sent.fetch_add(n, Relaxed);
            self.metrics.delivery_delay.add(&self.delays);
        }
    }
}

/// Tells the client of the events the filter passed over, up to the
/// cursor, if any; `false`: the socket is full (it stays owed).
async fn send_skipped<S>(out: &mut Out<S>, sub: &mut Subscription) -> Result<bool, End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(after) = sub.skip_from else {
        return Ok(true);
    };
    let frame = protocol::skipped_frame(sub.topic.scope(), after, sub.cursor);
    if !out.try_feed(text(frame)).await? {
        return Ok(false);
    }
    sub.skip_from = None;
    Ok(true)
}

//! Who gets what: scope -> topic -> subscribers, and the one task that
//! reads the log for every topic (the fetcher).
//!
//! A topic keeps `head`, the last seq it has published, and a ring of the
//! most recent frames (bounded in count and bytes), shared by all its
//! subscribers. Notices only mark a topic dirty and raise the seq it wants;
//! the fetcher reads every dirty topic in one query (`frames_after_many`),
//! publishes into the rings and wakes the subscribers. While a read is in
//! flight, further notices for the same topic only raise what it wants, so
//! a burst costs a few batched reads, not one per row.
//!
//! A subscriber is a cursor over the ring. One that falls behind the ring's
//! oldest frame is told it lagged and reads the log at its own pace (see
//! `session`), so a slow client costs neither memory here nor loss.
//!
//! No silent divergence (G8). Cursors name events (seq and capture time),
//! and a ring is served only while it is known to be the database's
//! history:
//! - when any database connection breaks, every topic is suspect (the
//!   history may have changed behind it: a failover that lost the last
//!   commits, a restore) until a *checked* read from its head's cursor
//!   succeeds on a connection made since; meanwhile subscribers read the
//!   log, never the ring. A checked read answers "diverged" when the log
//!   no longer holds the head's event: the topic then drops its ring,
//!   starts again from the log's latest event and moves to a new epoch.
//!   Reads of a verified topic continue from cursors the log gave on a
//!   connection that has not broken since, and need no check;
//! - a subscriber is served from the ring only if the ring holds the very
//!   event its cursor names, and only in the epoch it last checked its
//!   cursor in; otherwise it reads the log, which checks its cursor and
//!   answers with `reset` (`history_diverged`) when the log disowns it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::relay::log::{Cursor, EventLog, Frame, ManyBatch, ReadLimits, Wanted};
use crate::relay::mailbox::{Kind, Mailbox, Pushed};
use crate::relay::rate::TokenBucket;

/// Bounds of the hub.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    /// Most frames a topic's ring keeps.
    pub ring_frames: usize,
    /// Most bytes a topic's ring keeps (the newest frame is always kept).
    pub ring_bytes: usize,
    /// Per-scope limits of one fetch.
    pub read: ReadLimits,
    /// Most scopes read in one query.
    pub scopes_per_read: usize,
    /// Broadcasts and presence changes a scope's clients on this relay may
    /// send per second, together (twice that in a burst).
    pub signals_per_second: u32,
}

/// Why a topic is read: a notice (the normal path), or a resync that looks
/// for events no notice announced (after a reconnect, while polling, or the
/// periodic safety net).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Notice,
    Resync,
}

/// One scope with subscribers on this relay.
pub struct Topic {
    scope: String,
    state: Mutex<TopicState>,
    /// The scope's signals (broadcasts, presence changes) sent through
    /// this relay: one noisy project cannot take the database's NOTIFY
    /// lock from the others (G9).
    signal_rate: Mutex<TokenBucket>,
}

struct TopicState {
    /// The last event published into the ring.
    head: Cursor,
    /// The event just before the ring's oldest frame (`head` while the
    /// ring is empty): a subscriber there can be checked and served.
    base: Cursor,
    /// Highest seq a notice has announced.
    wanted: u64,
    /// Recent frames, contiguous seqs from `base` + 1 to `head`.
    ring: VecDeque<Frame>,
    ring_bytes: usize,
    /// Subscriber id -> that session's mailbox (its doorbell, and where
    /// broadcasts go).
    subscribers: HashMap<u64, Arc<Mailbox>>,
    /// The ring is known to be the database's history: read from it, with
    /// its head's cursor checked, since the last connection loss.
    verified: bool,
    /// Bumped when the log disowned the ring: every subscriber checks its
    /// cursor against the log before it is served from the ring again.
    epoch: u64,
}

/// What a subscriber finds in the ring after its cursor.
#[derive(Debug)]
pub enum RingRead {
    /// Nothing after the cursor yet.
    UpToDate,
    /// The next frames, contiguous from cursor + 1.
    Frames(Vec<Frame>),
    /// The ring no longer holds cursor + 1: read the log instead.
    Lagged,
}

impl Topic {
    pub fn scope(&self) -> &str {
        &self.scope
    }

    fn lock(&self) -> MutexGuard<'_, TopicState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last seq published.
    pub fn head(&self) -> u64 {
        self.lock().head.seq
    }

    /// Takes one of the scope's signal tokens (see [`HubLimits`]).
    pub fn take_signal(&self) -> bool {
        self.signal_rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The current epoch (see [`TopicState::epoch`]).
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Up to `max` frames after `cursor`, for a subscriber that checked its
    /// cursor in `epoch`. `Lagged` whenever the ring cannot vouch for the
    /// cursor: not verified since a connection loss, another epoch, the
    /// cursor's event not in the ring or not the same event.
    pub fn read_after(&self, cursor: Cursor, epoch: u64, max: usize) -> RingRead {
        let state = self.lock();
        if !state.verified || epoch != state.epoch {
            return RingRead::Lagged;
        }
        if cursor.seq >= state.head.seq {
            if cursor.seq == state.head.seq && !cursor.names(state.head.seq, state.head.time_us) {
                return RingRead::Lagged;
            }
            return RingRead::UpToDate;
        }
        if cursor.seq < state.base.seq {
            return RingRead::Lagged;
        }
        let start = (cursor.seq - state.base.seq) as usize;
        let named = if start == 0 {
            state.base.time_us
        } else {
            state.ring.get(start - 1).map(|f| f.captured_us)
        };
        if !cursor.names(cursor.seq, named) {
            return RingRead::Lagged;
        }
        RingRead::Frames(state.ring.iter().skip(start).take(max).cloned().collect())
    }
}

/// One topic taken for a read.
struct PendingRead {
    topic: Arc<Topic>,
    reason: Reason,
    /// The topic's head when the read started: the read asks for frames
    /// after it, and whether the log still holds it.
    head: Cursor,
    /// The seq notices had announced when the read started; if the read
    /// does not reach it, the notice was not confirmed by the log.
    wanted_at_start: u64,
    /// The ring was not verified when the read started: the read checks
    /// that the log still holds `head`, and may verify the ring.
    check: bool,
}

/// The fetcher's work list.
#[derive(Default)]
struct Dirty {
    reasons: HashMap<String, Reason>,
    order: VecDeque<String>,
}

/// The scope -> topic map and the fetcher's work list.
pub struct Hub {
    topics: Mutex<HashMap<String, Arc<Topic>>>,
    /// Topics waiting for a read, and why, in arrival order: a FIFO, so a
    /// few backlogged scopes cannot starve the others.
    dirty: Mutex<Dirty>,
    fetcher_wake: Notify,
    next_subscriber: AtomicU64,
    /// Bumped on every connection loss: a read that started in an older
    /// generation cannot vouch for a topic.
    generation: AtomicU64,
    log: EventLog,
    metrics: Arc<Metrics>,
    limits: HubLimits,
}

impl Hub {
    pub fn new(log: EventLog, metrics: Arc<Metrics>, limits: HubLimits) -> Self {
        Hub {
            topics: Mutex::new(HashMap::new()),
            dirty: Mutex::new(Dirty::default()),
            fetcher_wake: Notify::new(),
            next_subscriber: AtomicU64::new(1),
            generation: AtomicU64::new(0),
            log,
            metrics,
            limits,
        }
    }

    fn topics(&self) -> MutexGuard<'_, HashMap<String, Arc<Topic>>> {
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_dirty(&self, scope: &str, reason: Reason) {
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        // A notice read does not count found events as gaps; a resync
        // does. Notice wins so a real notice is never counted as a gap.
        match dirty.reasons.get_mut(scope) {
            Some(r) => {
                if reason == Reason::Notice {
                    *r = Reason::Notice;
                }
            }
            None => {
                dirty.reasons.insert(scope.to_string(), reason);
                dirty.order.push_back(scope.to_string());
            }
        }
        drop(dirty);
        self.fetcher_wake.notify_one();
    }

    /// The connection-loss generation; read it before reading the state
    /// passed to [`subscribe`](Self::subscribe).
    pub fn generation(&self) -> u64 {
        self.generation.load(Relaxed)
    }

    /// Registers a subscriber of `scope`. `latest` is the scope's latest
    /// event as the caller just read it, in `generation`; a new topic
    /// starts there and is read at once, so nothing committed in between
    /// is missed. Returns the topic, the subscriber's id and the epoch its
    /// cursor is checked in.
    pub fn subscribe(
        &self,
        scope: &str,
        latest: Cursor,
        generation: u64,
        mailbox: Arc<Mailbox>,
    ) -> (Arc<Topic>, u64, u64) {
        let id = self.next_subscriber.fetch_add(1, Relaxed);
        let mut topics = self.topics();
        let (topic, created) = match topics.get(scope) {
            Some(t) => (t.clone(), false),
            None => {
                let t = Arc::new(Topic {
                    scope: scope.to_string(),
                    state: Mutex::new(TopicState {
                        head: latest,
                        base: latest,
                        wanted: latest.seq,
                        ring: VecDeque::new(),
                        ring_bytes: 0,
                        subscribers: HashMap::new(),
                        verified: generation == self.generation(),
                        epoch: 0,
                    }),
                    signal_rate: Mutex::new(TokenBucket::new(self.limits.signals_per_second)),
                });
                topics.insert(scope.to_string(), t.clone());
                (t, true)
            }
        };
        let epoch = {
            let mut state = topic.lock();
            state.subscribers.insert(id, mailbox);
            state.epoch
        };
        drop(topics);
        if created {
            self.mark_dirty(scope, Reason::Resync);
        }
        (topic, id, epoch)
    }

    /// Removes a subscriber; the topic goes when its last subscriber does.
    pub fn unsubscribe(&self, topic: &Arc<Topic>, id: u64) {
        let mut topics = self.topics();
        let mut state = topic.lock();
        state.subscribers.remove(&id);
        if state.subscribers.is_empty() {
            if let Some(current) = topics.get(&topic.scope) {
                if Arc::ptr_eq(current, topic) {
                    topics.remove(&topic.scope);
                }
            }
        }
    }

    /// A notice said `scope` reached `seq`. Only a hint: the fetcher reads
    /// the log, and a seq the log does not hold publishes nothing.
    pub fn hint(&self, scope: &str, seq: u64) {
        let Some(topic) = self.topics().get(scope).cloned() else {
            return;
        };
        let mut state = topic.lock();
        if seq <= state.head.seq {
            return;
        }
        state.wanted = state.wanted.max(seq);
        drop(state);
        self.mark_dirty(scope, Reason::Notice);
    }

    /// A database connection broke: what was read before may be history
    /// the database no longer holds (a failover behind the connection
    /// string, a restore). No ring is served until a read on a new
    /// connection has checked its head; every topic is read at once.
    pub fn suspect_all(&self) {
        self.generation.fetch_add(1, Relaxed);
        self.log.distrust_replicas();
        let topics: Vec<Arc<Topic>> = self.topics().values().cloned().collect();
        for topic in &topics {
            topic.lock().verified = false;
            self.mark_dirty(&topic.scope, Reason::Resync);
        }
    }

    /// Reads every topic, looking for events no notice announced.
    pub fn resync_all(&self) {
        let scopes: Vec<String> = self.topics().keys().cloned().collect();
        for scope in scopes {
            self.mark_dirty(&scope, Reason::Resync);
        }
    }

    /// Hands a broadcast frame to every subscriber of `scope` on this
    /// relay but the connection `except`; returns how many took it and how
    /// many dropped it (their queue was full).
    pub fn broadcast(&self, scope: &str, bytes: Utf8Bytes, except: Option<u64>) -> (u64, u64) {
        let Some(topic) = self.topics().get(scope).cloned() else {
            return (0, 0);
        };
        let scope: Arc<str> = Arc::from(scope);
        let mailboxes: Vec<Arc<Mailbox>> = topic.lock().subscribers.values().cloned().collect();
        let (mut queued, mut dropped) = (0, 0);
        for mailbox in mailboxes {
            if Some(mailbox.conn) == except {
                continue;
            }
            match mailbox.push(&scope, Kind::Broadcast, bytes.clone()) {
                Pushed::Dropped => dropped += 1,
                _ => queued += 1,
            }
        }
        (queued, dropped)
    }

    /// Number of topics (scopes with subscribers here).
    pub fn topic_count(&self) -> usize {
        self.topics().len()
    }

    /// The fetcher: reads dirty topics, many per query, until shutdown.
    pub async fn run_fetcher(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.fetcher_wake.notified() => {}
            }
            loop {
                let batch = self.take_dirty();
                if batch.is_empty() {
                    break;
                }
                let wanted: Vec<Wanted> = batch
                    .iter()
                    .map(|read| Wanted {
                        scope: read.topic.scope.clone(),
                        after: read.head,
                        announced: (read.reason == Reason::Notice).then_some(read.wanted_at_start),
                        check: read.check,
                    })
                    .collect();
                let generation = self.generation();
                let result = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = self.log.frames_after_many(&wanted, self.limits.read) => r,
                };
                match result {
                    Ok(rows) => {
                        backoff = Duration::from_millis(50);
                        let diverged = self.publish_batch(batch, rows, generation);
                        for topic in diverged {
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = self.restart_from_log(&topic, generation) => {}
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, topics = batch.len(), retry_in_ms = backoff.as_millis() as u64, "reading the event log failed");
                        for read in &batch {
                            self.mark_dirty(&read.topic.scope, read.reason);
                        }
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }

    /// Takes up to `scopes_per_read` dirty topics with their heads and the
    /// seq wanted when the read starts.
    fn take_dirty(&self) -> Vec<PendingRead> {
        let picked: Vec<(String, Reason)> = {
            let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
            let mut picked = Vec::new();
            while picked.len() < self.limits.scopes_per_read {
                let Some(scope) = dirty.order.pop_front() else {
                    break;
                };
                if let Some(reason) = dirty.reasons.remove(&scope) {
                    picked.push((scope, reason));
                }
            }
            picked
        };
        let topics = self.topics();
        picked
            .into_iter()
            .filter_map(|(scope, reason)| {
                let topic = topics.get(&scope)?.clone();
                let (head, wanted, verified) = {
                    let s = topic.lock();
                    (s.head, s.wanted, s.verified)
                };
                Some(PendingRead {
                    topic,
                    reason,
                    head,
                    wanted_at_start: wanted,
                    check: !verified,
                })
            })
            .collect()
    }

    /// Publishes what a read found; returns the topics whose head the log
    /// disowned.
    fn publish_batch(
        &self,
        batch: Vec<PendingRead>,
        rows: ManyBatch,
        generation: u64,
    ) -> Vec<Arc<Topic>> {
        let mut by_scope: HashMap<String, Vec<Frame>> = HashMap::new();
        for (scope, frame) in rows.frames {
            by_scope.entry(scope).or_default().push(frame);
        }
        let mut diverged = Vec::new();
        for PendingRead {
            topic,
            reason,
            head,
            wanted_at_start,
            check,
        } in batch
        {
            if rows.diverged.contains(&topic.scope) {
                diverged.push(topic);
                continue;
            }
            let frames = by_scope.remove(&topic.scope).unwrap_or_default();
            let full = frames.len() >= self.limits.read.rows as usize
                || frames.iter().map(|f| f.bytes.len() as i64).sum::<i64>()
                    >= self.limits.read.bytes;
            // A checked read found the head this read continued from in
            // the log; if no connection broke meanwhile, the ring is the
            // database's.
            let vouched = check && generation == self.generation();
            self.publish(&topic, head, frames, reason, wanted_at_start, full, vouched);
            if full {
                self.mark_dirty(&topic.scope, reason);
            }
        }
        diverged
    }

    /// The log no longer holds the event at this topic's head: what the
    /// ring holds is history the database lost. Drop it and start again
    /// from the log's latest event, in a new epoch, so that every
    /// subscriber checks its cursor against the log (and gets `reset` if
    /// the log disowns it too).
    async fn restart_from_log(&self, topic: &Arc<Topic>, generation: u64) {
        let state = match self.log.scope_state(&topic.scope).await {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(scope = %topic.scope, error = %e, "reading where a diverged scope stands failed; retrying");
                topic.lock().verified = false;
                self.mark_dirty(&topic.scope, Reason::Resync);
                return;
            }
        };
        self.metrics.divergences.fetch_add(1, Relaxed);
        let mut s = topic.lock();
        tracing::warn!(scope = %topic.scope, relay_head = s.head.seq, log_latest = state.latest_seq,
            "the event log no longer holds events this relay read (failover or restore?); subscribers are checked and reset where needed");
        s.ring.clear();
        s.ring_bytes = 0;
        s.head = state.latest();
        s.base = s.head;
        s.wanted = state.latest_seq;
        s.epoch += 1;
        s.verified = generation == self.generation();
        let wakes: Vec<Arc<Mailbox>> = s.subscribers.values().cloned().collect();
        drop(s);
        for wake in wakes {
            wake.wake();
        }
        // Anything committed after the state was read.
        self.mark_dirty(&topic.scope, Reason::Resync);
    }

    #[allow(clippy::too_many_arguments)]
    fn publish(
        &self,
        topic: &Topic,
        read_from: Cursor,
        frames: Vec<Frame>,
        reason: Reason,
        wanted_at_start: u64,
        full: bool,
        vouched: bool,
    ) {
        let mut state = topic.lock();
        if state.head != read_from {
            // Restarted from the log while this read was in flight.
            return;
        }
        if vouched && !state.verified {
            state.verified = true;
            // Subscribers that went to the log meanwhile may return.
            let wakes: Vec<Arc<Mailbox>> = state.subscribers.values().cloned().collect();
            for wake in wakes {
                wake.wake();
            }
        }
        let mut published = 0u64;
        for frame in frames {
            if frame.seq <= state.head.seq {
                continue;
            }
            if frame.seq != state.head.seq + 1 {
                // A hole (trimmed history): the ring must stay contiguous,
                // so it restarts here; subscribers behind it go to the log,
                // which tells them to reset.
                state.ring.clear();
                state.ring_bytes = 0;
                state.base = Cursor::new(frame.seq - 1, None);
            }
            state.head = Cursor::at(&frame);
            state.ring_bytes += frame.bytes.len();
            state.ring.push_back(frame);
            published += 1;
            while state.ring.len() > self.limits.ring_frames
                || (state.ring_bytes > self.limits.ring_bytes && state.ring.len() > 1)
            {
                if let Some(old) = state.ring.pop_front() {
                    state.ring_bytes -= old.bytes.len();
                    state.base = Cursor::at(&old);
                }
            }
        }
        if state.wanted < state.head.seq {
            state.wanted = state.head.seq;
        }
        if !full && wanted_at_start > state.head.seq && state.wanted == wanted_at_start {
            // A notice named a seq the log does not hold: forged, or from a
            // foreign writer. Nothing was published for it.
            self.metrics.unconfirmed_notices.fetch_add(1, Relaxed);
            tracing::debug!(scope = %topic.scope, wanted = wanted_at_start, head = state.head.seq, "notice not confirmed by the event log");
            state.wanted = state.head.seq;
        }
        if published == 0 {
            return;
        }
        if reason == Reason::Resync {
            self.metrics.gaps_filled.fetch_add(published, Relaxed);
        }
        let wakes: Vec<Arc<Mailbox>> = state.subscribers.values().cloned().collect();
        drop(state);
        for wake in wakes {
            wake.wake();
        }
    }

    /// Resyncs every topic while the listener is down (`poll_interval`), and
    /// as a safety net every `resync_interval` while it is up.
    pub async fn run_poller(
        self: Arc<Self>,
        mut listening: watch::Receiver<bool>,
        poll_interval: Duration,
        resync_interval: Duration,
        shutdown: CancellationToken,
    ) {
        let mut last_resync = tokio::time::Instant::now();
        loop {
            let wait = if *listening.borrow() {
                resync_interval
            } else {
                poll_interval
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                changed = listening.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            }
            let up = *listening.borrow();
            if !up || last_resync.elapsed() >= resync_interval {
                self.resync_all();
                last_resync = tokio::time::Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::Utf8Bytes;

    fn frame(seq: u64, us: i64) -> Frame {
        Frame {
            seq,
            captured_us: us,
            membership: false,
            resource: Arc::from("r"),
            bytes: Utf8Bytes::from_static("{}"),
        }
    }

    /// A topic whose ring holds 3, 4 and 5 (captured at 30, 40, 50) after
    /// event 2 (captured at 20).
    fn topic() -> Topic {
        Topic {
            scope: "s".into(),
            state: Mutex::new(TopicState {
                head: Cursor::new(5, Some(50)),
                base: Cursor::new(2, Some(20)),
                wanted: 5,
                ring: [frame(3, 30), frame(4, 40), frame(5, 50)].into(),
                ring_bytes: 6,
                subscribers: HashMap::new(),
                verified: true,
                epoch: 0,
            }),
            signal_rate: Mutex::new(TokenBucket::new(1)),
        }
    }

    fn seqs(read: RingRead) -> Option<Vec<u64>> {
        match read {
            RingRead::Frames(frames) => Some(frames.iter().map(|f| f.seq).collect()),
            _ => None,
        }
    }

    #[test]
    fn the_ring_serves_a_cursor_only_if_it_holds_the_very_event() {
        let t = topic();
        let read = |seq, us, epoch| t.read_after(Cursor::new(seq, us), epoch, 10);
        assert_eq!(seqs(read(3, Some(30), 0)), Some(vec![4, 5]));
        assert_eq!(seqs(read(2, Some(20), 0)), Some(vec![3, 4, 5]));
        // Another event at the same seq: the log must decide.
        assert!(matches!(read(3, Some(31), 0), RingRead::Lagged));
        assert!(matches!(read(2, Some(21), 0), RingRead::Lagged));
        assert!(matches!(read(5, Some(51), 0), RingRead::Lagged));
        // A cursor not known by name is taken on trust (since_seq alone).
        assert_eq!(seqs(read(3, None, 0)), Some(vec![4, 5]));
        assert!(matches!(read(5, Some(50), 0), RingRead::UpToDate));
        // Behind the ring, or ahead of a topic that lags: as before.
        assert!(matches!(read(1, Some(10), 0), RingRead::Lagged));
        assert!(matches!(read(7, Some(70), 0), RingRead::UpToDate));
        // Checked in another epoch, or a ring not checked since a
        // connection loss: never served.
        assert!(matches!(read(3, Some(30), 1), RingRead::Lagged));
        t.lock().verified = false;
        assert!(matches!(read(3, Some(30), 0), RingRead::Lagged));
    }
}

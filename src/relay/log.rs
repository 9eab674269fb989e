//! Reading the event log, the source of truth. Every frame a client gets
//! comes through here, rendered by `relay.render` in SQL (called by the
//! `relay.read_frames*` functions read here): live delivery, resume and
//! gap fill are one read path, so they send the same bytes. A notice is
//! never trusted beyond "scope X may have news".
//!
//! Every read continues from a [`Cursor`], which names an event (seq and
//! capture time). One read serves every caller, of one scope or many
//! (`EventLog::read`); a *checked* read (`relay.read_frames_checked_many`)
//! makes the log answer [`Batch::Diverged`] when it no longer holds that
//! event (G8): the history after it is not the one its reader saw. Callers
//! check when they cannot vouch for the cursor (the first read after a
//! connection loss, a client's resume); a cursor that came from a read on a
//! connection that has not broken since is the log's own, and a plain read
//! (`relay.read_frames_many`) is cheaper: the check costs about 90,000
//! instructions a read (`bench/results/read-profile.md`). Every query is
//! bounded in time by the pool (G6).
//!
//! Reads may go to hot standbys (`PGRELAY_READ_REPLICA_URLS`): live reads
//! announced by a notice, and catch-up reads. A standby is a prefix of the
//! primary's history, so what it returns is correct but may be short: a
//! read that does not reach the seq its caller knows exists (a notice's, or
//! the topic's head) is retried on the standby for at most `replica_wait`,
//! then made on the primary; so lag never loses or reorders an event, and
//! delays one by at most `replica_wait` plus one read. A standby that
//! disowns a cursor is not believed: the primary decides. Resyncs (which
//! look for events no notice announced), subscribe, authorization and the
//! API read the primary. A standby is used only while its WAL receiver is
//! streaming, checked every probe interval and after any connection loss,
//! so one left behind on an old timeline after a failover is not read.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use chrono::{DateTime, Utc};
use tokio_postgres::types::Type;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::db::connect::ConnectError;
use crate::db::pool::{BoundedPool, DbError};
use crate::metrics::Metrics;

/// Why the log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    Db(#[from] DbError),
}

/// A position in a scope's history that names an event: the last event a
/// reader has, by seq and capture time (microseconds since the epoch, the
/// frame's `timestamp`). `time_us` is `None` when the event is not known by
/// name (seq 0, `since_seq` sent alone, a trimmed event); such a cursor is
/// taken on trust.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    pub seq: u64,
    pub time_us: Option<i64>,
}

impl Cursor {
    pub fn new(seq: u64, time_us: Option<i64>) -> Self {
        Cursor { seq, time_us }
    }

    /// The cursor right after `frame`.
    pub fn at(frame: &Frame) -> Self {
        Cursor {
            seq: frame.seq,
            time_us: Some(frame.captured_us),
        }
    }

    /// Whether `self` and an event known as (`seq`, `time_us`) can be the
    /// same event: a cursor not known by name matches any event of its seq.
    pub fn names(&self, seq: u64, time_us: Option<i64>) -> bool {
        self.seq == seq
            && match (self.time_us, time_us) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    fn time(&self) -> Option<DateTime<Utc>> {
        self.time_us.and_then(DateTime::from_timestamp_micros)
    }
}

/// One rendered event frame. Cloning shares the bytes.
#[derive(Debug, Clone)]
pub struct Frame {
    pub seq: u64,
    /// When the event was captured, microseconds since the epoch: with
    /// `seq`, the event's name (G8), and the start of the delivery-delay
    /// histogram.
    pub captured_us: i64,
    /// The event changes membership (its resource is declared so in the
    /// database, or named in `membership_resources`): subscribers are
    /// re-authorized after it.
    pub membership: bool,
    /// The event's resource: a subscription narrowed to some resources
    /// (G10) is sent only theirs.
    pub resource: Arc<str>,
    /// The frame text, rendered once by `relay.render`; shared, never
    /// re-encoded, by every subscriber it is written to.
    pub bytes: Utf8Bytes,
}

/// What a read after a cursor found.
#[derive(Debug)]
pub enum Batch {
    /// The next frames after the cursor (a hole before the first one means
    /// trimmed history).
    Frames(Vec<Frame>),
    /// The log does not hold the event the cursor names.
    Diverged,
}

/// Frames of many scopes, and the scopes whose cursor the log disowned.
#[derive(Debug, Default)]
pub struct ManyBatch {
    pub frames: Vec<(String, Frame)>,
    pub diverged: Vec<String>,
}

/// Where a scope stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScopeState {
    pub latest_seq: u64,
    pub trimmed_through: u64,
    /// Capture time of the latest event, when the log still has it.
    pub latest_time_us: Option<i64>,
}

impl ScopeState {
    /// The cursor of the latest event.
    pub fn latest(&self) -> Cursor {
        Cursor::new(self.latest_seq, self.latest_time_us)
    }
}

/// What the app's rule said of one scope: allowed or not, or why it
/// could not say (it raised, or ran past the timeout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub scope: String,
    pub outcome: Result<bool, String>,
}

/// Limits of one read, so memory stays bounded whatever the rows' size.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    pub rows: i32,
    pub bytes: i64,
}

/// The read's statements, by (checked, one scope): every one takes the same
/// parameters (scopes, seqs, [times,] rows, bytes) and returns the same
/// columns, so one read serves every caller. A single scope is read with
/// `relay.read_frames*` itself rather than the `_many` form over a list of
/// one: 15% fewer instructions a live read, 6% fewer a 500-event catch-up
/// (callgrind, as bench/read-profile.sh measures).
const READ_FRAMES: &str = "SELECT scope, seq, created_at, resource, frame, membership \
     FROM relay.read_frames_many($1, $2, $3, $4)";
const READ_FRAMES_ONE: &str =
    "SELECT ($1::text[])[1], seq, created_at, resource, frame, membership \
     FROM relay.read_frames(($1::text[])[1], ($2::int8[])[1], $3, $4)";
const READ_FRAMES_CHECKED: &str = "SELECT scope, seq, created_at, resource, frame, membership \
     FROM relay.read_frames_checked_many($1, $2, $3, $4, $5)";
const READ_FRAMES_CHECKED_ONE: &str =
    "SELECT ($1::text[])[1], seq, created_at, resource, frame, membership \
     FROM relay.read_frames_checked(($1::text[])[1], ($2::int8[])[1], ($3::timestamptz[])[1], $4, $5)";

/// One scope a fetch wants.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub scope: String,
    /// Frames after this event.
    pub after: Cursor,
    /// The seq a notice announced: a standby may serve the read if it
    /// reaches it. `None` (a resync, looking for what no notice announced)
    /// reads the primary.
    pub announced: Option<u64>,
    /// Check that the log still holds the event `after` names.
    pub check: bool,
}

/// Hot standbys to read from, and whether each may be read now.
struct Replicas {
    pools: Vec<Replica>,
    /// Round robin over the standbys.
    next: AtomicUsize,
    /// Longest wait for a lagging standby before the primary is read.
    wait: Duration,
    /// Rung to check the standbys again at once.
    recheck: Notify,
}

struct Replica {
    pool: BoundedPool,
    /// Its WAL receiver streams: it follows the primary.
    streaming: AtomicBool,
}

/// What a standby says of itself: whether it may serve log reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StandbyState {
    /// Not in recovery: a primary (or a promoted standby), not a replica.
    NotInRecovery,
    /// Its WAL receiver streams from the primary.
    Streaming,
    /// In recovery but not streaming: the receiver's status, or `None`
    /// when no receiver runs (cut off, or replaying archived WAL only).
    NotStreaming(Option<String>),
    /// A receiver runs, but its status is hidden from this role: only
    /// roles with the privileges of `pg_read_all_stats` see it.
    Hidden,
}

/// One query on a standby's pool, shared by the relay's periodic check and
/// `pgrelay doctor`, so both judge a standby alike.
pub async fn standby_state(pool: &BoundedPool) -> Result<StandbyState, DbError> {
    let row = pool
        .query_one(
            "SELECT pg_is_in_recovery(), r.pid IS NOT NULL, r.status \
             FROM (SELECT 1) one LEFT JOIN pg_stat_wal_receiver r ON true",
            &[],
        )
        .await?;
    let recovering: bool = row.get(0);
    let receiving: bool = row.get(1);
    let status: Option<String> = row.get(2);
    Ok(match (recovering, receiving, status) {
        (false, _, _) => StandbyState::NotInRecovery,
        (true, _, Some(s)) if s == "streaming" => StandbyState::Streaming,
        (true, true, None) => StandbyState::Hidden,
        (true, _, status) => StandbyState::NotStreaming(status),
    })
}

/// The pool-backed reader.
#[derive(Clone)]
pub struct EventLog {
    pool: BoundedPool,
    replicas: Arc<Replicas>,
    metrics: Arc<Metrics>,
    /// Resources whose events change who may read a scope.
    membership_resources: Arc<[String]>,
}

impl EventLog {
    pub fn new(pool: BoundedPool, metrics: Arc<Metrics>, membership_resources: &[String]) -> Self {
        EventLog {
            pool,
            replicas: Arc::new(Replicas {
                pools: Vec::new(),
                next: AtomicUsize::new(0),
                wait: Duration::ZERO,
                recheck: Notify::new(),
            }),
            metrics,
            membership_resources: membership_resources.into(),
        }
    }

    /// Reads live and catch-up frames from these standbys too, waiting at
    /// most `wait` for one that lags.
    pub fn with_replicas(mut self, pools: Vec<BoundedPool>, wait: Duration) -> Self {
        self.replicas = Arc::new(Replicas {
            pools: pools
                .into_iter()
                .map(|pool| Replica {
                    pool,
                    streaming: AtomicBool::new(false),
                })
                .collect(),
            next: AtomicUsize::new(0),
            wait,
            recheck: Notify::new(),
        });
        self
    }

    /// A standby to read from now, if any.
    fn replica(&self) -> Option<&BoundedPool> {
        let pools = &self.replicas.pools;
        if pools.is_empty() {
            return None;
        }
        let start = self.replicas.next.fetch_add(1, Relaxed);
        (0..pools.len())
            .map(|i| &pools[(start + i) % pools.len()])
            .find(|r| r.streaming.load(Relaxed))
            .map(|r| &r.pool)
    }

    /// After a connection loss (a failover?): no standby is read until it
    /// is seen streaming again.
    pub fn distrust_replicas(&self) {
        if self.replicas.pools.is_empty() {
            return;
        }
        for replica in &self.replicas.pools {
            replica.streaming.store(false, Relaxed);
        }
        self.replicas.recheck.notify_one();
    }

    /// Checks every `interval` (and when rung) which standbys stream.
    /// A WAL receiver's status is visible only to roles with the privileges
    /// of `pg_read_all_stats`; without them a standby is never trusted, and
    /// the log says what to grant.
    pub async fn run_replica_checks(self, interval: Duration, shutdown: CancellationToken) {
        let mut advised = false;
        loop {
            for (i, replica) in self.replicas.pools.iter().enumerate() {
                let streaming = standby_state(&replica.pool).await.map(|state| {
                    if state == StandbyState::Hidden && !advised {
                        advised = true;
                        tracing::error!(replica = i + 1,
                            "cannot see whether the read replica streams: grant pg_read_all_stats to the relay's role \
                             (on the primary); until then the primary serves every read");
                    }
                    state == StandbyState::Streaming
                });
                let now = matches!(streaming, Ok(true));
                if replica.streaming.swap(now, Relaxed) != now {
                    match &streaming {
                        Ok(_) => {
                            tracing::info!(replica = i + 1, streaming = now, "read replica state")
                        }
                        Err(e) => {
                            tracing::warn!(replica = i + 1, error = %e, "read replica unreachable")
                        }
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
                _ = self.replicas.recheck.notified() => {}
            }
        }
    }

    /// The primary's pool: writes, authorization, the API.
    pub fn pool(&self) -> &BoundedPool {
        &self.pool
    }

    pub async fn scope_state(&self, scope: &str) -> Result<ScopeState, LogError> {
        let row = self
            .pool
            .query_one(
                "SELECT latest_seq, trimmed_through, latest_time FROM relay.scope_head($1)",
                &[(&scope, Type::TEXT)],
            )
            .await?;
        Ok(ScopeState {
            latest_seq: row.get::<_, i64>(0).max(0) as u64,
            trimmed_through: row.get::<_, i64>(1).max(0) as u64,
            latest_time_us: row
                .get::<_, Option<DateTime<Utc>>>(2)
                .map(|t| t.timestamp_micros()),
        })
    }

    /// Frames of `scope` after `after`, in seq order; with `check`, only
    /// if the log still holds the event `after` names. `known` is a seq the
    /// caller knows the log holds (a standby's answer short of it is not
    /// taken).
    pub async fn frames_after(
        &self,
        scope: &str,
        after: Cursor,
        limits: ReadLimits,
        known: u64,
        check: bool,
    ) -> Result<Batch, LogError> {
        if let Some(replica) = self.replica() {
            match self.read_after(replica, scope, after, limits, check).await {
                Ok(Batch::Frames(frames))
                    if frames.first().map(|f| f.seq) == Some(after.seq + 1)
                        || (frames.is_empty() && known <= after.seq) =>
                {
                    self.metrics.replica_reads.fetch_add(1, Relaxed);
                    return Ok(Batch::Frames(frames));
                }
                // Behind, a hole, or the cursor disowned: the primary says.
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "reading a replica failed; reading the primary")
                }
            }
            self.metrics.replica_fallbacks.fetch_add(1, Relaxed);
        }
        self.read_after(&self.pool, scope, after, limits, check)
            .await
    }

    /// One scope's read: [`Self::read`] with a list of one.
    async fn read_after(
        &self,
        pool: &BoundedPool,
        scope: &str,
        after: Cursor,
        limits: ReadLimits,
        check: bool,
    ) -> Result<Batch, LogError> {
        let wanted = [Wanted {
            scope: scope.to_owned(),
            after,
            announced: None,
            check,
        }];
        let batch = self.read(pool, &wanted, limits).await?;
        if !batch.diverged.is_empty() {
            return Ok(Batch::Diverged);
        }
        Ok(Batch::Frames(
            batch.frames.into_iter().map(|(_, frame)| frame).collect(),
        ))
    }

    /// Frames of many scopes: `(scope, frame)` out, grouped by scope in seq
    /// order, and the scopes whose cursor the log does not hold. Announced
    /// reads go to a standby when one streams (see the module doc).
    pub async fn frames_after_many(
        &self,
        wanted: &[Wanted],
        limits: ReadLimits,
    ) -> Result<ManyBatch, LogError> {
        if self.replicas.pools.is_empty() || wanted.iter().all(|w| w.announced.is_none()) {
            return self.read(&self.pool, wanted, limits).await;
        }
        let (mut pending, mut primary): (Vec<Wanted>, Vec<Wanted>) =
            wanted.iter().cloned().partition(|w| w.announced.is_some());
        let mut out = ManyBatch::default();
        let deadline = tokio::time::Instant::now() + self.replicas.wait;
        let mut waited = false;
        let mut poll = LAG_POLL_FIRST;
        while !pending.is_empty() {
            let Some(replica) = self.replica() else {
                break;
            };
            let batch = match self.read(replica, &pending, limits).await {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::debug!(error = %e, "reading a replica failed; reading the primary");
                    break;
                }
            };
            self.metrics.replica_reads.fetch_add(1, Relaxed);
            pending = take_complete(pending, batch, limits, &mut out);
            if pending.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
            // The standby lags behind what a notice announced.
            if !waited {
                waited = true;
                self.metrics.replica_lag_waits.fetch_add(1, Relaxed);
            }
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + poll)).await;
            poll = (poll * 2).min(LAG_POLL_MAX);
        }
        if !pending.is_empty() {
            self.metrics.replica_fallbacks.fetch_add(1, Relaxed);
            primary.append(&mut pending);
        }
        if !primary.is_empty() {
            let batch = self.read(&self.pool, &primary, limits).await?;
            out.frames.extend(batch.frames);
            out.diverged.extend(batch.diverged);
        }
        Ok(out)
    }

    /// The one read of the log, from `pool`, for one scope or many: each
    /// scope's cursor is checked only if it asks (rare: the first read
    /// after a connection loss). Counted in `log_reads` and `log_rows`.
    async fn read(
        &self,
        pool: &BoundedPool,
        wanted: &[Wanted],
        limits: ReadLimits,
    ) -> Result<ManyBatch, LogError> {
        let scopes: Vec<&str> = wanted.iter().map(|w| w.scope.as_str()).collect();
        let afters: Vec<i64> = wanted.iter().map(|w| w.after.seq as i64).collect();
        // The check is a query of its own, not a NULL time sent to it: the
        // checked function costs 70,000 more instructions a live read even
        // with nothing to check (measured with bench/read-profile.sh
        // and every time NULL).
        let read = if wanted.iter().any(|w| w.check) {
            let times: Vec<Option<DateTime<Utc>>> = wanted
                .iter()
                .map(|w| w.after.time().filter(|_| w.check))
                .collect();
            let statement = if wanted.len() == 1 {
                READ_FRAMES_CHECKED_ONE
            } else {
                READ_FRAMES_CHECKED
            };
            pool.query(
                statement,
                &[
                    (&scopes, Type::TEXT_ARRAY),
                    (&afters, Type::INT8_ARRAY),
                    (&times, Type::TIMESTAMPTZ_ARRAY),
                    (&limits.rows, Type::INT4),
                    (&limits.bytes, Type::INT8),
                ],
            )
            .await
        } else {
            let statement = if wanted.len() == 1 {
                READ_FRAMES_ONE
            } else {
                READ_FRAMES
            };
            pool.query(
                statement,
                &[
                    (&scopes, Type::TEXT_ARRAY),
                    (&afters, Type::INT8_ARRAY),
                    (&limits.rows, Type::INT4),
                    (&limits.bytes, Type::INT8),
                ],
            )
            .await
        };
        let rows = read.inspect_err(|_| {
            self.metrics.log_errors.fetch_add(1, Relaxed);
        })?;
        self.metrics.log_reads.fetch_add(1, Relaxed);
        self.metrics.log_rows.fetch_add(rows.len() as u64, Relaxed);
        let mut out = ManyBatch {
            frames: Vec::with_capacity(rows.len()),
            diverged: Vec::new(),
        };
        for r in rows {
            let scope: String = r.get(0);
            match self.frame(r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)) {
                Some(frame) => out.frames.push((scope, frame)),
                None => out.diverged.push(scope),
            }
        }
        Ok(out)
    }

    /// The app's rule (`relay.authorize`) for each of `scopes`, in one
    /// round trip, through `relay.authorize_each`: a rule that raises fails
    /// for its scope alone. Past `timeout` the statement is cancelled and
    /// its connection discarded (never reused while the backend may still
    /// be busy); the call cannot say which scope was slow, so each scope is
    /// then asked alone, with a timeout of its own, and only the slow ones
    /// fail (G4: a failing rule ends that subscription only).
    pub async fn authorize_each(
        &self,
        user_id: &str,
        scopes: &[String],
        timeout: Duration,
    ) -> Result<Vec<Verdict>, LogError> {
        match self.authorize_once(user_id, scopes, timeout).await? {
            Some(verdicts) => Ok(verdicts),
            None if scopes.len() > 1 => {
                let mut verdicts = Vec::with_capacity(scopes.len());
                for chunk in scopes.chunks(AUTHORIZE_ALONE_AT_ONCE) {
                    let alone = chunk.iter().map(|scope| {
                        self.authorize_once(user_id, std::slice::from_ref(scope), timeout)
                    });
                    for (scope, answer) in chunk
                        .iter()
                        .zip(futures_util::future::join_all(alone).await)
                    {
                        let one = std::slice::from_ref(scope);
                        verdicts.extend(answer?.unwrap_or_else(|| timed_out(one, timeout)));
                    }
                }
                Ok(verdicts)
            }
            None => Ok(timed_out(scopes, timeout)),
        }
    }

    /// One call of `relay.authorize_each`; `None` when it ran past
    /// `timeout`.
    async fn authorize_once(
        &self,
        user_id: &str,
        scopes: &[String],
        timeout: Duration,
    ) -> Result<Option<Vec<Verdict>>, LogError> {
        let rows = self
            .pool
            .query_or_cancel(
                "SELECT scope, allowed, failure FROM relay.authorize_each($1, $2)",
                &[(&user_id, Type::TEXT), (&scopes, Type::TEXT_ARRAY)],
                timeout,
            )
            .await?;
        let Some(rows) = rows else {
            return Ok(None);
        };
        Ok(Some(
            rows.into_iter()
                .map(|r| {
                    let failure: Option<String> = r.get(2);
                    Verdict {
                        scope: r.get(0),
                        outcome: match failure {
                            Some(f) => Err(f),
                            None => Ok(r.get::<_, Option<bool>>(1).unwrap_or(false)),
                        },
                    }
                })
                .collect(),
        ))
    }

    /// The resources tracked tables are captured as (their capture
    /// triggers' first argument), read from the catalog: no grant needed.
    pub async fn tracked_resources(&self) -> Result<Vec<String>, LogError> {
        let rows = self
            .pool
            .query(
                "SELECT DISTINCT split_part(encode(tgargs, 'escape'), '\\000', 1)::text \
                 FROM pg_trigger WHERE tgname = 'relay_capture_insert'",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// `pg_notification_queue_usage()`, for `/metrics`.
    pub async fn notification_queue_usage(&self) -> Result<f64, LogError> {
        let row = self
            .pool
            .query_one("SELECT pg_notification_queue_usage()", &[])
            .await?;
        Ok(row.get(0))
    }

    /// Sends a notice from a pooled session: how the listener proves that
    /// notices of other sessions reach it.
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), LogError> {
        self.pool
            .query(
                "SELECT pg_notify($1, $2)::text",
                &[(&channel, Type::TEXT), (&payload, Type::TEXT)],
            )
            .await?;
        Ok(())
    }
}

/// Scopes asked about alone at once after a call for several ran too
/// long: each may hold a pooled connection for a whole timeout.
const AUTHORIZE_ALONE_AT_ONCE: usize = 4;

/// Every one of `scopes` failed: the rule ran past `timeout`.
fn timed_out(scopes: &[String], timeout: Duration) -> Vec<Verdict> {
    let failure = format!("the rule took longer than {timeout:?}");
    scopes
        .iter()
        .map(|scope| Verdict {
            scope: scope.clone(),
            outcome: Err(failure.clone()),
        })
        .collect()
}

/// How soon a lagging standby is asked again, within `replica_wait`: a
/// standby usually trails the notice by a millisecond or two, so at first
/// soon, then less often.
const LAG_POLL_FIRST: Duration = Duration::from_millis(1);
const LAG_POLL_MAX: Duration = Duration::from_millis(8);

/// Moves what a standby answered for each scope into `out` when it is
/// complete (it reaches the announced seq, or fills a batch), and returns
/// the scopes it fell short on (behind, or a cursor it disowned).
fn take_complete(
    wanted: Vec<Wanted>,
    batch: ManyBatch,
    limits: ReadLimits,
    out: &mut ManyBatch,
) -> Vec<Wanted> {
    let mut by_scope: std::collections::HashMap<String, Vec<Frame>> = Default::default();
    for (scope, frame) in batch.frames {
        by_scope.entry(scope).or_default().push(frame);
    }
    let mut short = Vec::new();
    for w in wanted {
        if batch.diverged.contains(&w.scope) {
            short.push(w);
            continue;
        }
        let frames = by_scope.remove(&w.scope).unwrap_or_default();
        let reached = frames.last().map_or(w.after.seq, |f| f.seq);
        let full = frames.len() >= limits.rows.max(1) as usize
            || frames.iter().map(|f| f.bytes.len() as i64).sum::<i64>() >= limits.bytes;
        if full || reached >= w.announced.unwrap_or(0) {
            out.frames
                .extend(frames.into_iter().map(|f| (w.scope.clone(), f)));
        } else {
            short.push(w);
        }
    }
    short
}

impl EventLog {
    /// A frame from a row; `None` for the row that says the cursor's
    /// event is not in the log (its frame is NULL).
    fn frame(
        &self,
        seq: i64,
        created_at: Option<DateTime<Utc>>,
        resource: Option<&str>,
        text: Option<String>,
        declared_membership: Option<bool>,
    ) -> Option<Frame> {
        let (created_at, resource, text) = (created_at?, resource?, text?);
        Some(Frame {
            seq: seq.max(0) as u64,
            captured_us: created_at.timestamp_micros(),
            membership: declared_membership.unwrap_or(false)
                || self.membership_resources.iter().any(|r| r == resource),
            resource: Arc::from(resource),
            bytes: Utf8Bytes::from(text),
        })
    }
}

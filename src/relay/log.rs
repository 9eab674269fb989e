//! Reading the event log, the source of truth. Every frame a client gets
//! comes through here, rendered by `relay.frames_after_cursor` in SQL: live
//! delivery, resume and gap fill are one read path, so they send the same
//! bytes. A notice is never trusted beyond "scope X may have news".
//!
//! Every read continues from a [`Cursor`], which names an event (seq and
//! capture time), and the log answers [`Batch::Diverged`] when it no longer
//! holds that event (G8): the history after it is not the one its reader
//! saw. Every query is bounded in time by the pool (G6).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

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

impl LogError {
    /// The database answered with a SQL error (as opposed to being out of
    /// reach).
    pub fn as_sql(&self) -> Option<&tokio_postgres::Error> {
        match self {
            LogError::Db(e) => e.as_sql(),
            LogError::Connect(_) => None,
        }
    }
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

const READ_FRAMES_CHECKED: &str = "SELECT seq, created_at, resource, frame, membership \
     FROM relay.read_frames_checked($1, $2, $3, $4, $5)";
const READ_FRAMES_CHECKED_MANY: &str =
    "SELECT scope, seq, created_at, resource, frame, membership \
     FROM relay.read_frames_checked_many($1, $2, $3, $4, $5)";

/// The pool-backed reader.
#[derive(Clone)]
pub struct EventLog {
    pool: BoundedPool,
    metrics: Arc<Metrics>,
    /// Resources whose events change who may read a scope.
    membership_resources: Arc<[String]>,
}

impl EventLog {
    pub fn new(pool: BoundedPool, metrics: Arc<Metrics>, membership_resources: &[String]) -> Self {
        EventLog {
            pool,
            metrics,
            membership_resources: membership_resources.into(),
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

    /// Frames of `scope` after `after`, in seq order, if the log still
    /// holds the event `after` names.
    pub async fn frames_after(
        &self,
        scope: &str,
        after: Cursor,
        limits: ReadLimits,
    ) -> Result<Batch, LogError> {
        let seq = after.seq as i64;
        let time = after.time();
        let rows = self
            .pool
            .query(
                READ_FRAMES_CHECKED,
                &[
                    (&scope, Type::TEXT),
                    (&seq, Type::INT8),
                    (&time, Type::TIMESTAMPTZ),
                    (&limits.rows, Type::INT4),
                    (&limits.bytes, Type::INT8),
                ],
            )
            .await
            .inspect_err(|_| {
                self.metrics.log_errors.fetch_add(1, Relaxed);
            })?;
        self.metrics.log_reads.fetch_add(1, Relaxed);
        self.metrics.log_rows.fetch_add(rows.len() as u64, Relaxed);
        let mut frames = Vec::with_capacity(rows.len());
        for r in rows {
            match self.frame(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)) {
                Some(frame) => frames.push(frame),
                None => return Ok(Batch::Diverged),
            }
        }
        Ok(Batch::Frames(frames))
    }

    /// Frames of many scopes in one round trip: `(scope, after)` pairs in,
    /// `(scope, frame)` out, grouped by scope in seq order, and the scopes
    /// whose cursor the log does not hold.
    pub async fn frames_after_many(
        &self,
        wanted: &[(String, Cursor)],
        limits: ReadLimits,
    ) -> Result<ManyBatch, LogError> {
        let scopes: Vec<&str> = wanted.iter().map(|(s, _)| s.as_str()).collect();
        let afters: Vec<i64> = wanted.iter().map(|(_, c)| c.seq as i64).collect();
        let times: Vec<Option<DateTime<Utc>>> = wanted.iter().map(|(_, c)| c.time()).collect();
        let rows = self
            .pool
            .query(
                READ_FRAMES_CHECKED_MANY,
                &[
                    (&scopes, Type::TEXT_ARRAY),
                    (&afters, Type::INT8_ARRAY),
                    (&times, Type::TIMESTAMPTZ_ARRAY),
                    (&limits.rows, Type::INT4),
                    (&limits.bytes, Type::INT8),
                ],
            )
            .await
            .inspect_err(|_| {
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
    /// for its scope alone. Past `timeout` the statement is cancelled, its
    /// connection is discarded (never reused while the backend may still be
    /// busy), and every scope of the call fails.
    pub async fn authorize_each(
        &self,
        user_id: &str,
        scopes: &[String],
        timeout: Duration,
    ) -> Result<Vec<Verdict>, LogError> {
        let rows = self
            .pool
            .query_or_cancel(
                "SELECT scope, allowed, failure FROM relay.authorize_each($1, $2)",
                &[(&user_id, Type::TEXT), (&scopes, Type::TEXT_ARRAY)],
                timeout,
            )
            .await?;
        let Some(rows) = rows else {
            let failure = format!("the rule took longer than {timeout:?}");
            return Ok(scopes
                .iter()
                .map(|scope| Verdict {
                    scope: scope.clone(),
                    outcome: Err(failure.clone()),
                })
                .collect());
        };
        Ok(rows
            .into_iter()
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
            .collect())
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
            bytes: Utf8Bytes::from(text),
        })
    }
}

//! Reading the event log, the source of truth. Every frame a client gets
//! comes through here, rendered by `relay.frames_after` in SQL: live
//! delivery, resume and gap fill are one read path, so they send the same
//! bytes. A notice is never trusted beyond "scope X may have news".

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::db::connect::{self, ConnectError};
use crate::metrics::Metrics;

/// Why the log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
}

/// One rendered event frame. Cloning shares the bytes.
#[derive(Debug, Clone)]
pub struct Frame {
    pub seq: u64,
    /// When the event was captured, microseconds since the epoch; for the
    /// delivery-delay histogram.
    pub captured_us: i64,
    /// The event changes membership (its resource is declared so in the
    /// database, or named in `membership_resources`): subscribers are
    /// re-authorized after it.
    pub membership: bool,
    /// The frame text, rendered once by `relay.render`; shared, never
    /// re-encoded, by every subscriber it is written to.
    pub bytes: Utf8Bytes,
}

/// Where a scope stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScopeState {
    pub latest_seq: u64,
    pub trimmed_through: u64,
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

/// The pool-backed reader.
#[derive(Clone)]
pub struct EventLog {
    pool: Pool,
    metrics: Arc<Metrics>,
    /// Resources whose events change who may read a scope.
    membership_resources: Arc<[String]>,
}

impl EventLog {
    pub fn connect(
        database_url: &str,
        size: usize,
        metrics: Arc<Metrics>,
        membership_resources: &[String],
    ) -> Result<Self, LogError> {
        let pool = connect::pool(database_url, size)?;
        Ok(EventLog {
            pool,
            metrics,
            membership_resources: membership_resources.into(),
        })
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub async fn scope_state(&self, scope: &str) -> Result<ScopeState, LogError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached("SELECT latest_seq, trimmed_through FROM relay.scope_state($1)")
            .await?;
        let row = client.query_one(&stmt, &[&scope]).await?;
        Ok(ScopeState {
            latest_seq: row.get::<_, i64>(0).max(0) as u64,
            trimmed_through: row.get::<_, i64>(1).max(0) as u64,
        })
    }

    /// Frames of `scope` after `after`, in seq order.
    pub async fn frames_after(
        &self,
        scope: &str,
        after: u64,
        limits: ReadLimits,
    ) -> Result<Vec<Frame>, LogError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT seq, created_at, resource, frame, membership \
                 FROM relay.read_frames($1, $2, $3, $4)",
            )
            .await?;
        let rows = client
            .query(
                &stmt,
                &[&scope, &(after as i64), &limits.rows, &limits.bytes],
            )
            .await
            .inspect_err(|_| {
                self.metrics.log_errors.fetch_add(1, Relaxed);
            })?;
        self.metrics.log_reads.fetch_add(1, Relaxed);
        self.metrics.log_rows.fetch_add(rows.len() as u64, Relaxed);
        Ok(rows
            .into_iter()
            .map(|r| self.frame(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect())
    }

    /// Frames of many scopes in one round trip: `(scope, after)` pairs in,
    /// `(scope, frame)` out, grouped by scope in seq order.
    pub async fn frames_after_many(
        &self,
        wanted: &[(String, u64)],
        limits: ReadLimits,
    ) -> Result<Vec<(String, Frame)>, LogError> {
        let scopes: Vec<&str> = wanted.iter().map(|(s, _)| s.as_str()).collect();
        let afters: Vec<i64> = wanted.iter().map(|(_, a)| *a as i64).collect();
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT scope, seq, created_at, resource, frame, membership \
                 FROM relay.read_frames_many($1, $2, $3, $4)",
            )
            .await?;
        let rows = client
            .query(&stmt, &[&scopes, &afters, &limits.rows, &limits.bytes])
            .await
            .inspect_err(|_| {
                self.metrics.log_errors.fetch_add(1, Relaxed);
            })?;
        self.metrics.log_reads.fetch_add(1, Relaxed);
        self.metrics.log_rows.fetch_add(rows.len() as u64, Relaxed);
        Ok(rows
            .into_iter()
            .map(|r| {
                let frame = self.frame(r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
                (r.get::<_, String>(0), frame)
            })
            .collect())
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
        timeout: std::time::Duration,
    ) -> Result<Vec<Verdict>, LogError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached("SELECT scope, allowed, failure FROM relay.authorize_each($1, $2)")
            .await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&user_id, &scopes];
        let query = client.query(&stmt, &params);
        let rows = match tokio::time::timeout(timeout, query).await {
            Ok(rows) => rows?,
            Err(_) => {
                let cancel = client.cancel_token();
                // Taken out of the pool: its backend may still be running
                // the rule, and the next borrower would wait behind it.
                drop(deadpool_postgres::Object::take(client));
                if let Err(e) = cancel.cancel_query(tokio_postgres::NoTls).await {
                    tracing::debug!(error = %e, "cancelling a slow authorize failed");
                }
                let failure = format!("the rule took longer than {timeout:?}");
                return Ok(scopes
                    .iter()
                    .map(|scope| Verdict {
                        scope: scope.clone(),
                        outcome: Err(failure.clone()),
                    })
                    .collect());
            }
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
        let client = self.pool.get().await?;
        let row = client
            .query_one("SELECT pg_notification_queue_usage()", &[])
            .await?;
        Ok(row.get(0))
    }
}

impl EventLog {
    fn frame(
        &self,
        seq: i64,
        created_at: chrono::DateTime<chrono::Utc>,
        resource: &str,
        text: String,
        declared_membership: Option<bool>,
    ) -> Frame {
        Frame {
            seq: seq.max(0) as u64,
            captured_us: created_at.timestamp_micros(),
            membership: declared_membership.unwrap_or(false)
                || self.membership_resources.iter().any(|r| r == resource),
            bytes: Utf8Bytes::from(text),
        }
    }
}

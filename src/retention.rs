//! Retention: trims the event log on a schedule, from one relay process at
//! a time.
//!
//! The trimmer is whoever holds a session-level advisory lock on its own
//! connection; the others try again each period, so if the holder dies its
//! connection closes, the lock goes, and another relay takes over. Each run
//! calls `relay.trim` in small batches with a pause between them, so it
//! never holds many row locks or competes long with writers. Clients that
//! resume from before the trimmed horizon get `reset` (G3), never a silent
//! gap.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::db::connect;
use crate::metrics::Metrics;

/// Advisory-lock key of the trimmer ("pgrelay" + 2).
pub const TRIM_LOCK: i64 = 0x7067_7265_6c61_7902;
/// Deadline of each statement of a run (a trim batch is small). One that
/// misses it gives up the connection, and with it the lock (G6).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a trim run stopped.
#[derive(Debug, thiserror::Error)]
enum TrimError {
    #[error("{0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("no answer within {0:?}; the connection was closed")]
    Timeout(Duration),
}

/// A statement of the trimmer, within [`STATEMENT_TIMEOUT`].
async fn bounded<T>(
    statement: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, TrimError> {
    tokio::time::timeout(STATEMENT_TIMEOUT, statement)
        .await
        .map_err(|_| TrimError::Timeout(STATEMENT_TIMEOUT))?
        .map_err(TrimError::from)
}

#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// How often a run starts.
    pub interval: Duration,
    /// Newest events kept per scope, however old.
    pub keep_min: i32,
    /// Events younger than this are kept.
    pub min_age: Duration,
    /// Rows deleted per `relay.trim` call.
    pub batch: i32,
    /// Pause between batches of one run.
    pub pause: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            interval: Duration::from_secs(60),
            keep_min: 1000,
            min_age: Duration::from_secs(24 * 3600),
            batch: 1000,
            pause: Duration::from_millis(50),
        }
    }
}

/// Runs until shutdown.
pub async fn run(
    database_url: String,
    config: RetentionConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    metrics.retention_enabled.store(true, Relaxed);
    let mut leader: Option<Client> = None;
    loop {
        if leader.as_ref().is_some_and(Client::is_closed) {
            leader = None;
            metrics.retention_leader.store(0, Relaxed);
        }
        if leader.is_none() {
            leader = try_lead(&database_url).await;
            metrics
                .retention_leader
                .store(i64::from(leader.is_some()), Relaxed);
        }
        if let Some(client) = &leader {
            match trim_run(client, &config, &metrics, &shutdown).await {
                Ok(deleted) => {
                    metrics
                        .retention_last_success_unix
                        .store(unix_now(), Relaxed);
                    if deleted > 0 {
                        tracing::info!(deleted, "trimmed the event log");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "trimming the event log failed");
                    leader = None;
                    metrics.retention_leader.store(0, Relaxed);
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(config.interval) => {}
        }
    }
}

/// Seconds since the epoch (0 if the clock is before it).
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A connection holding the trim lock, or `None` if another relay has it
/// (or the database is away).
async fn try_lead(database_url: &str) -> Option<Client> {
    let client = connect::single(database_url, "pgrelay-retention")
        .await
        .ok()?;
    let row = bounded(client.query_one("SELECT pg_try_advisory_lock($1)", &[&TRIM_LOCK]))
        .await
        .ok()?;
    row.get::<_, bool>(0).then_some(client)
}

async fn trim_run(
    client: &Client,
    config: &RetentionConfig,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<i64, TrimError> {
    let stmt =
        bounded(client.prepare("SELECT relay.trim($1, make_interval(secs => $2), $3)")).await?;
    let min_age = config.min_age.as_secs_f64();
    let mut total = 0;
    metrics.retention_runs.fetch_add(1, Relaxed);
    loop {
        let deleted: i64 =
            bounded(client.query_one(&stmt, &[&config.keep_min, &min_age, &config.batch]))
                .await?
                .get(0);
        total += deleted;
        metrics
            .events_trimmed
            .fetch_add(deleted.max(0) as u64, Relaxed);
        if deleted < i64::from(config.batch) || shutdown.is_cancelled() {
            record_oldest(client, metrics).await?;
            return Ok(total);
        }
        tokio::time::sleep(config.pause).await;
    }
}

/// Seconds since the oldest event still in the log (NULL when it is
/// empty). Seqs are per scope, so the age is what says how far back
/// clients can resume; it is found with one primary-key lookup per scope,
/// never a scan of the log. Also `pgrelay doctor`'s.
pub const OLDEST_EVENT_AGE_SQL: &str =
    "SELECT extract(epoch FROM now() - min(first.created_at))::float8
         FROM relay.scope_counter c
         CROSS JOIN LATERAL (SELECT e.created_at FROM relay.events e
                             WHERE e.scope = c.scope ORDER BY e.seq LIMIT 1) first";

/// Records how old the oldest event still in the log is.
async fn record_oldest(client: &Client, metrics: &Metrics) -> Result<(), TrimError> {
    let row = bounded(client.query_one(OLDEST_EVENT_AGE_SQL, &[])).await?;
    let age: Option<f64> = row.get(0);
    metrics
        .oldest_event_age_ms
        .store(age.map(|a| (a * 1000.0) as i64).unwrap_or(0), Relaxed);
    Ok(())
}

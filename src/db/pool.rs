//! A pool of database connections whose every query is bounded in time
//! (G6), whatever the network does.
//!
//! A half-open partition (packets dropped, no reset) leaves a connection
//! that looks alive and answers nothing; keepalives may not notice it for
//! a long time, or ever (a proxy in the path keeps the TCP session alive).
//! So every query here runs under `query_timeout`, and a connection that
//! misses it is taken out of the pool and closed, never handed out again.
//! A missed deadline also drops every idle connection of the pool, which
//! was opened over the same network and is as suspect: the next query
//! opens a fresh one, so one partition costs one timeout, not one per
//! pooled connection.
//!
//! The pool records whether it can serve ([`PoolHealth`]) for `/healthz`,
//! and calls a hook when a connection is lost, so the hub can stop trusting
//! what it read before (G8).
//!
//! Statements: behind PgBouncer in transaction mode (before 1.21) a named
//! prepared statement may be executed on another server connection than
//! the one it was prepared on, and fails. [`Statements::Unnamed`] sends
//! every query as one unnamed parse-bind-execute, which a transaction
//! pooler passes whole, at the cost of planning each time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Row;

/// How queries are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statements {
    /// Prepared once per connection and cached (the default): no parsing
    /// or planning per query.
    Prepared,
    /// One unnamed statement per query, for transaction-mode poolers.
    Unnamed,
}

/// Why a pooled query failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("no answer from the database within {0:?}; the connection was discarded")]
    Timeout(Duration),
    #[error("query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("expected one row, the query returned {0}")]
    RowCount(usize),
}

/// Whether a pool can serve, and if not, why; for `/healthz`.
#[derive(Default)]
pub struct PoolHealth {
    failing: AtomicBool,
    reason: Mutex<String>,
    /// Connections discarded after a missed deadline.
    pub timeouts: AtomicU64,
}

impl PoolHealth {
    /// `None` while the pool serves; the reason of its last failure while
    /// it does not.
    pub fn problem(&self) -> Option<String> {
        self.failing.load(Relaxed).then(|| {
            self.reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        })
    }

    fn ok(&self) {
        // A load first: the flag is read on every query, written rarely.
        if self.failing.load(Relaxed) {
            self.failing.store(false, Relaxed);
            tracing::info!("database reads work again");
        }
    }

    fn fail(&self, reason: String) {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason;
        self.failing.store(true, Relaxed);
    }
}

/// Called when a connection is found broken.
pub type LostHook = Arc<dyn Fn() + Send + Sync>;

/// A pool whose queries are bounded in time.
#[derive(Clone)]
pub struct BoundedPool {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// What the pool is for, in logs (`primary`, `replica 1`).
    name: String,
    query_timeout: Duration,
    statements: Statements,
    health: PoolHealth,
    on_lost: OnceLock<LostHook>,
    /// The transaction-pooler advice is logged once.
    advised: AtomicBool,
}

impl BoundedPool {
    pub fn new(pool: Pool, name: &str, query_timeout: Duration, statements: Statements) -> Self {
        BoundedPool {
            inner: Arc::new(Inner {
                pool,
                name: name.to_string(),
                query_timeout,
                statements,
                health: PoolHealth::default(),
                on_lost: OnceLock::new(),
                advised: AtomicBool::new(false),
            }),
        }
    }

    /// Sets what to call when a connection is found broken (once).
    pub fn on_connection_lost(&self, hook: LostHook) {
        let _ = self.inner.on_lost.set(hook);
    }

    pub fn health(&self) -> &PoolHealth {
        &self.inner.health
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn query_timeout(&self) -> Duration {
        self.inner.query_timeout
    }

    /// Runs one statement and returns its rows, within `query_timeout`
    /// (waiting for a connection included).
    pub async fn query(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, DbError> {
        let deadline = tokio::time::Instant::now() + self.inner.query_timeout;
        let client = match tokio::time::timeout_at(deadline, self.inner.pool.get()).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                self.failed(format!("{}: no connection: {e}", self.inner.name), true);
                return Err(e.into());
            }
            Err(_) => {
                self.failed(
                    format!(
                        "{}: no connection within {:?}",
                        self.inner.name, self.inner.query_timeout
                    ),
                    true,
                );
                return Err(DbError::Timeout(self.inner.query_timeout));
            }
        };
        let run = self.run(&client, sql, params);
        match tokio::time::timeout_at(deadline, run).await {
            Ok(Ok(rows)) => {
                self.inner.health.ok();
                Ok(rows)
            }
            Ok(Err(e)) => {
                self.query_failed(&e);
                Err(e.into())
            }
            Err(_) => {
                self.discard(client);
                Err(DbError::Timeout(self.inner.query_timeout))
            }
        }
    }

    /// Runs one statement whose own work may be slow (the app's
    /// authorization rule): past `timeout` it is cancelled on the server
    /// and its connection closed, and the answer is `None`. That is the
    /// statement's fault, not the network's: the pool stays healthy. Only a
    /// connection that answers the cancel proves it: one that answers
    /// nothing within the network's deadline (`query_timeout`, which bounds
    /// the whole call) is a network fault, and fails like [`query`]
    /// (a half-open partition must not look like a slow rule).
    ///
    /// [`query`]: Self::query
    pub async fn query_or_cancel(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
        timeout: Duration,
    ) -> Result<Option<Vec<Row>>, DbError> {
        if timeout >= self.inner.query_timeout {
            return self.query(sql, params).await.map(Some);
        }
        let deadline = tokio::time::Instant::now() + self.inner.query_timeout;
        let client = match tokio::time::timeout_at(deadline, self.inner.pool.get()).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                self.failed(format!("{}: no connection: {e}", self.inner.name), true);
                return Err(e.into());
            }
            Err(_) => return Err(DbError::Timeout(self.inner.query_timeout)),
        };
        let mut run = Box::pin(self.run(&client, sql, params));
        let answer = match tokio::time::timeout(timeout, &mut run).await {
            Ok(answer) => answer,
            Err(_) => {
                // Slow, or its answer lost on the way. Cancel it, and wait
                // for this very connection to say so.
                let cancel = client.cancel_token();
                let cancelled = async {
                    if let Err(e) = cancel.cancel_query(tokio_postgres::NoTls).await {
                        tracing::debug!(error = %e, "cancelling a slow statement failed");
                    }
                    (&mut run).await
                };
                match tokio::time::timeout_at(deadline, cancelled).await {
                    Ok(Err(e)) if e.code() == Some(&SqlState::QUERY_CANCELED) => {
                        drop(run);
                        // Never reused, as after any statement it gave up.
                        drop(Object::take(client));
                        return Ok(None);
                    }
                    Ok(answer) => answer,
                    Err(_) => {
                        drop(run);
                        self.discard(client);
                        return Err(DbError::Timeout(self.inner.query_timeout));
                    }
                }
            }
        };
        match answer {
            Ok(rows) => {
                self.inner.health.ok();
                Ok(Some(rows))
            }
            Err(e) => {
                self.query_failed(&e);
                Err(e.into())
            }
        }
    }

    /// Runs one statement that returns exactly one row.
    pub async fn query_one(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Row, DbError> {
        let mut rows = self.query(sql, params).await?;
        match rows.len() {
            1 => Ok(rows.remove(0)),
            n => Err(DbError::RowCount(n)),
        }
    }

    /// One statement on `client`, as the pool's statements are sent.
    async fn run(
        &self,
        client: &Object,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        match self.inner.statements {
            Statements::Prepared => {
                let stmt = client.prepare_cached(sql).await?;
                let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
                client.query(&stmt, &values).await
            }
            Statements::Unnamed => client.query_typed(sql, params).await,
        }
    }

    /// A connection that missed its deadline is closed, never reused, and
    /// so is every idle one (opened over the same, now suspect, network).
    fn discard(&self, client: Object) {
        let inner = &self.inner;
        inner.health.timeouts.fetch_add(1, Relaxed);
        drop(Object::take(client));
        let idle = inner.pool.retain(|_, _| false).removed.len();
        tracing::warn!(pool = %inner.name, timeout_ms = inner.query_timeout.as_millis() as u64, idle_dropped = idle,
            "a database query got no answer in time; its connection and the idle ones were closed");
        self.failed(
            format!(
                "{}: a query got no answer within {:?} (network partition or overloaded server?)",
                inner.name, inner.query_timeout
            ),
            true,
        );
    }

    fn query_failed(&self, e: &tokio_postgres::Error) {
        if let Some(db) = e.as_db_error() {
            // The server answered: the connection works. A named statement
            // unknown to the server means a transaction-mode pooler moved us
            // to another server connection.
            if *db.code() == SqlState::INVALID_SQL_STATEMENT_NAME
                && self.inner.statements == Statements::Prepared
                && !self.inner.advised.swap(true, Relaxed)
            {
                tracing::error!(pool = %self.inner.name, error = %db.message(),
                    "a prepared statement vanished between two queries: this connection string goes through a \
                     transaction-mode pooler; set PGRELAY_TRANSACTION_POOLER=1 (or point it at a session-mode pooler or Postgres itself)");
            }
            return;
        }
        // Anything but an answer from the server: the connection is gone
        // (closed, reset) and with it whatever was read on it is suspect.
        self.failed(format!("{}: {e}", self.inner.name), true);
    }

    fn failed(&self, reason: String, lost: bool) {
        self.inner.health.fail(reason);
        if lost {
            if let Some(hook) = self.inner.on_lost.get() {
                hook();
            }
        }
    }
}

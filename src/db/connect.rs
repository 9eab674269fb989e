//! Every connection the relay opens to Postgres starts here: the read pool
//! and its session settings, the LISTEN connection, and the short-lived
//! single connections of migrations and retention. One place, so that
//! connection-wide policy (keepalives, timeouts, which server a role goes
//! to) is set once and holds for all of them.
//!
//! The time policy (G6): no connection is ever waited on forever.
//! - Connecting gives up after [`CONNECT_TIMEOUT`].
//! - TCP keepalives probe an idle connection after [`KEEPALIVE_IDLE`],
//!   and a user timeout closes one whose sent data stays unacknowledged
//!   for [`TCP_USER_TIMEOUT`]: a dead peer or a dropped route is noticed by
//!   the kernel even while nothing is being asked.
//! - Every query has a deadline on top (`PGRELAY_QUERY_TIMEOUT`, see
//!   [`crate::db::pool`]), because keepalives see only the next hop: a
//!   proxy or pooler in between keeps TCP alive while the database behind
//!   it is gone.
//! - The server is asked to keepalive the relay's session connections too,
//!   so a relay that vanished does not keep a LISTEN backend or the trim
//!   lock for hours.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::{Client, Config, NoTls};

use crate::db::pool::{BoundedPool, Statements};

/// How long opening a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle time before the first keepalive probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// Between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// Unanswered probes before the kernel gives up.
pub const KEEPALIVE_RETRIES: u32 = 3;
/// Sent data unacknowledged this long closes the connection.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings for every pooled connection, which runs the same few
/// statements thousands of times a second.
///
/// With the default plan cache mode, Postgres re-plans `frames_after_many`
/// on every call (its array parameters make a custom plan look cheaper),
/// and planning it, which inlines `frames_after` and `render` from their
/// text, took 0.35 to 0.7 ms of a read that executes in 0.06 ms. A generic
/// plan is made once per connection. JIT goes off because that generic
/// plan's row estimate is above `jit_above_cost`, and compiling it cost
/// 7 ms per execution; no query here runs long enough to repay JIT.
/// Plain `SET`s rather than startup options, which poolers such as
/// PgBouncer refuse.
pub const POOL_SESSION_SETTINGS: &str = "SET plan_cache_mode = force_generic_plan; SET jit = off";

/// The server's side of the keepalive policy, for the relay's session
/// connections (LISTEN, retention, migrations). Plain `SET`s, each allowed
/// to any role.
const SERVER_KEEPALIVES: &str = "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; \
     SET tcp_keepalives_count = 3; SET tcp_user_timeout = 10000";

/// Why a connection or pool could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("database URL: {0}")]
    Url(#[source] tokio_postgres::Error),
    #[error("building the pool: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
    #[error("connecting: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("connecting: no answer within {0:?}")]
    Timeout(Duration),
}

/// Parses a connection string, applies the time policy and names the
/// connection for `pg_stat_activity`, so an operator can tell the relay's
/// roles apart. Settings given in the URL win over the policy's defaults
/// only for `connect_timeout`; keepalives are always on.
pub fn config(database_url: &str, application_name: &str) -> Result<Config, ConnectError> {
    let mut config: Config = database_url.parse().map_err(ConnectError::Url)?;
    config
        .application_name(application_name)
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(KEEPALIVE_RETRIES)
        .tcp_user_timeout(TCP_USER_TIMEOUT);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    Ok(config)
}

/// What a pool is for and how it talks.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// In logs and `/healthz`: `primary`, `replica 1`, ...
    pub name: String,
    /// Most connections.
    pub size: usize,
    /// Deadline of every query (`PGRELAY_QUERY_TIMEOUT`).
    pub query_timeout: Duration,
    /// Prepared (direct or session pooler) or unnamed (transaction pooler).
    pub statements: Statements,
}

/// A pool for log reads, authorization and the HTTP API.
pub fn pool(database_url: &str, options: &PoolOptions) -> Result<BoundedPool, ConnectError> {
    let manager = Manager::from_config(
        config(database_url, "pgrelay")?,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let mut builder = Pool::builder(manager)
        .max_size(options.size)
        .wait_timeout(Some(options.query_timeout))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(options.query_timeout))
        .runtime(deadpool_postgres::Runtime::Tokio1);
    if options.statements == Statements::Prepared {
        // Behind a transaction pooler session settings would leak to other
        // clients' transactions; there, none are made. A server-side
        // statement timeout ends a query the relay stopped waiting for.
        let settings = format!(
            "{POOL_SESSION_SETTINGS}; SET statement_timeout = {}",
            options.query_timeout.as_millis()
        );
        builder = builder.post_create(deadpool_postgres::Hook::async_fn(move |client, _| {
            let settings = settings.clone();
            Box::pin(async move {
                client
                    .batch_execute(&settings)
                    .await
                    .map_err(deadpool_postgres::HookError::Backend)
            })
        }));
    }
    Ok(BoundedPool::new(
        builder.build()?,
        &options.name,
        options.query_timeout,
        options.statements,
    ))
}

/// The LISTEN connection's settings.
pub fn listen_config(database_url: &str) -> Result<Config, ConnectError> {
    config(database_url, "pgrelay-listener")
}

/// Asks the server to keepalive this session connection too (see the
/// module doc). Best effort: over a Unix socket the settings do nothing.
pub async fn server_keepalives(client: &Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(SERVER_KEEPALIVES).await
}

/// One connection whose driver runs on its own task; for work that holds a
/// connection for a while (migrations, the retention job's lock).
pub async fn single(database_url: &str, application_name: &str) -> Result<Client, ConnectError> {
    let config = config(database_url, application_name)?;
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT * 2, config.connect(NoTls))
        .await
        .map_err(|_| ConnectError::Timeout(CONNECT_TIMEOUT * 2))?
        .map_err(ConnectError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection ended");
        }
    });
    match tokio::time::timeout(CONNECT_TIMEOUT, server_keepalives(&client)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "could not ask the server for keepalives"),
        Err(_) => tracing::debug!("no answer when asking the server for keepalives"),
    }
    Ok(client)
}

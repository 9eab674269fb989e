//! Every connection the relay opens to Postgres starts here: the read pool
//! and its session settings, the LISTEN connection, and the short-lived
//! single connections of migrations and retention. One place, so that
//! connection-wide policy (keepalives, timeouts, which server a role goes
//! to) is set once and holds for all of them.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::{Client, Config, NoTls};

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

/// Why a connection or pool could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("database URL: {0}")]
    Url(#[source] tokio_postgres::Error),
    #[error("building the pool: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
    #[error("connecting: {0}")]
    Connect(#[source] tokio_postgres::Error),
}

/// Parses a connection string and names the connection for
/// `pg_stat_activity`, so an operator can tell the relay's roles apart.
pub fn config(database_url: &str, application_name: &str) -> Result<Config, ConnectError> {
    let mut config: Config = database_url.parse().map_err(ConnectError::Url)?;
    config.application_name(application_name);
    Ok(config)
}

/// The pool for log reads, authorization and the HTTP API.
pub fn pool(database_url: &str, size: usize) -> Result<Pool, ConnectError> {
    let manager = Manager::from_config(
        config(database_url, "pgrelay")?,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .post_create(deadpool_postgres::Hook::async_fn(|client, _| {
            Box::pin(async move {
                client
                    .batch_execute(POOL_SESSION_SETTINGS)
                    .await
                    .map_err(deadpool_postgres::HookError::Backend)
            })
        }))
        .build()?)
}

/// The LISTEN connection's settings. Keepalives find a dead peer on an
/// otherwise silent connection, which a LISTEN connection mostly is.
pub fn listen_config(database_url: &str) -> Result<Config, ConnectError> {
    let mut pg = config(database_url, "pgrelay-listener")?;
    pg.keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .connect_timeout(Duration::from_secs(5));
    Ok(pg)
}

/// One connection whose driver runs on its own task; for work that holds a
/// connection for a while (migrations, the retention job's lock).
pub async fn single(database_url: &str, application_name: &str) -> Result<Client, ConnectError> {
    let (client, connection) = config(database_url, application_name)?
        .connect(NoTls)
        .await
        .map_err(ConnectError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection ended");
        }
    });
    Ok(client)
}

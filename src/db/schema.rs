//! The SQL that pgrelay installs: the `relay` engine and the `chat`
//! reference app, as refinery migrations embedded in the binary.
//!
//! The same files are what a user runs with psql (`pgrelay sql`), and every
//! statement in them is idempotent, so a database prepared by hand can later
//! be handed to `pgrelay migrate` without conflict.

use tokio_postgres::{Client, NoTls};

use crate::db::connect::{self, ConnectError};

refinery::embed_migrations!("migrations");

/// Advisory-lock key that serialises migrations when several relay
/// processes start against one database at once.
const MIGRATION_LOCK: i64 = 0x7067_7265_6c61_7901; // "pgrelay" + 1

/// Why the schema could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("taking the migration lock: {0}")]
    Lock(#[source] tokio_postgres::Error),
    #[error("applying migrations: {0}")]
    Migrate(#[from] refinery::Error),
}

/// The install SQL for an existing database, in order: the relay engine,
/// then (when `with_chat`) the chat reference app.
pub fn install_sql(with_chat: bool) -> String {
    let mut sql = String::from(
        "-- pgrelay install SQL; run with: psql -v ON_ERROR_STOP=1 -f this_file.sql\n",
    );
    sql.push_str(include_str!("../../migrations/V1__relay.sql"));
    if with_chat {
        sql.push_str(include_str!("../../migrations/V2__chat.sql"));
    }
    sql
}

/// Applies every pending migration, holding an advisory lock so that
/// concurrent relays do not race. Returns the names of those applied.
pub async fn migrate(database_url: &str) -> Result<Vec<String>, SchemaError> {
    let (mut client, connection) = connect::config(database_url, "pgrelay-migrate")?
        .connect(NoTls)
        .await
        .map_err(ConnectError::Connect)?;
    let conn_task = tokio::spawn(connection);
    let applied = migrate_with(&mut client).await;
    drop(client);
    let _ = conn_task.await;
    applied
}

async fn migrate_with(client: &mut Client) -> Result<Vec<String>, SchemaError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(SchemaError::Lock)?;
    let report = migrations::runner().run_async(client).await;
    // The lock is session-scoped; closing the connection releases it even
    // if this unlock is never reached.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    Ok(report?
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect())
}

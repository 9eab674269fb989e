//! The `pgrelay` command line: configuration lives here and only here; the
//! library takes what it needs as arguments.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pgrelay::embedded_pg::{PgOptions, PgServer};
use pgrelay::{demo, schema};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser, Debug)]
#[command(
    name = "pgrelay",
    version,
    about = "Postgres-native realtime event relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the relay (the default). Without DATABASE_URL, start a private
    /// Postgres with demo data.
    Serve(ServeArgs),
    /// Apply the migrations to DATABASE_URL and exit.
    Migrate {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// Print the install SQL for an existing database (psql -f).
    Sql {
        /// Only the generic `relay` engine, without the `chat` reference app.
        #[arg(long)]
        relay_only: bool,
    },
}

#[derive(clap::Args, Debug, Default)]
struct ServeArgs {
    /// Database to use; without it a private Postgres is started.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Where the private Postgres keeps its data; a temporary directory
    /// (removed on exit) when not set.
    #[arg(long, env = "PGRELAY_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    match cli.command.unwrap_or(Cmd::Serve(ServeArgs::default())) {
        Cmd::Serve(args) => runtime.block_on(serve(args)),
        Cmd::Migrate { database_url } => runtime.block_on(async {
            let applied = schema::migrate(&database_url).await?;
            tracing::info!(applied = ?applied, "migrations up to date");
            Ok(())
        }),
        Cmd::Sql { relay_only } => {
            print!("{}", schema::install_sql(!relay_only));
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Keep the private server alive for as long as we serve.
    let mut _private_pg = None;
    let database_url = match args.database_url {
        Some(url) => {
            schema::migrate(&url)
                .await
                .context("migrating DATABASE_URL")?;
            url
        }
        None => {
            let options = PgOptions {
                data_dir: args.data_dir,
                ..PgOptions::default()
            };
            let pg = tokio::task::spawn_blocking(move || PgServer::start(options))
                .await
                .context("starting the private Postgres")?
                .context("starting the private Postgres")?;
            let admin_url = pg.url("postgres");
            create_database(&admin_url, "pgrelay").await?;
            let url = pg.url("pgrelay");
            schema::migrate(&url)
                .await
                .context("migrating the private database")?;
            let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            let conn_task = tokio::spawn(conn);
            demo::seed(&mut client).await.context("seeding demo data")?;
            drop(client);
            let _ = conn_task.await;
            tracing::info!(port = pg.port(), log = %pg.log_path().display(), "private Postgres ready");
            println!("Private Postgres with the pgrelay schema and a demo project is running.");
            println!("  psql {url}");
            println!(
                "  demo project: {} with members {}",
                demo::DEMO_PROJECT,
                demo::DEMO_USERS.join(", ")
            );
            _private_pg = Some(pg);
            url
        }
    };
    tracing::info!(database = %redact(&database_url), "ready; press Ctrl-C to stop");
    wait_for_shutdown().await?;
    tracing::info!("shutting down");
    Ok(())
}

async fn create_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let (client, conn) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls).await?;
    let conn_task = tokio::spawn(conn);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        // CREATE DATABASE takes no bind parameters; the name is ours.
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await?;
    }
    drop(client);
    let _ = conn_task.await;
    Ok(())
}

async fn wait_for_shutdown() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// A database URL fit for a log line: the password, if any, is hidden.
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    match (rest.find('@'), rest.find(':')) {
        (Some(at), Some(colon)) if colon < at => {
            format!(
                "{}{}:***{}",
                &url[..scheme_end],
                &rest[..colon],
                &rest[at..]
            )
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("postgresql://app:s3cret@db:5432/x"),
            "postgresql://app:***@db:5432/x"
        );
        assert_eq!(redact("postgresql://app@db/x"), "postgresql://app@db/x");
        assert_eq!(redact("host=db user=app"), "host=db user=app");
    }
}

//! The `pgrelay` command line: configuration lives here and only here; the
//! library takes what it needs as arguments.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pgrelay::auth::{AuthConfig, Authenticator};
use pgrelay::embedded_pg::{PgOptions, PgServer};
use pgrelay::retention::RetentionConfig;
use pgrelay::server::{self, RelayConfig};
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
    Serve(Box<ServeArgs>),
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
    /// Print a client token signed with the configured secret (for
    /// development and tests).
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        user: String,
        /// Lifetime, e.g. 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        #[arg(long, env = "PGRELAY_JWT_SECRET", hide_env_values = true)]
        jwt_secret: String,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Database to use; without it a private Postgres is started.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Where the private Postgres keeps its data; a temporary directory
    /// (removed on exit) when not set.
    #[arg(long, env = "PGRELAY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address and port to serve on.
    #[arg(long, env = "PGRELAY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// HS256 secret for client tokens (at least 16 bytes). With
    /// DATABASE_URL a secret or a public key is required; the private demo
    /// mode makes a random secret and prints tokens.
    #[arg(long, env = "PGRELAY_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// File holding the HS256 secret (trailing newline ignored).
    #[arg(long, env = "PGRELAY_JWT_SECRET_FILE")]
    jwt_secret_file: Option<PathBuf>,
    /// PEM public key (RSA for RS256, P-256 for ES256) to verify tokens.
    #[arg(long, env = "PGRELAY_JWT_PUBLIC_KEY_FILE")]
    jwt_public_key_file: Option<PathBuf>,
    /// Clock-skew allowance on exp and nbf.
    #[arg(long, env = "PGRELAY_JWT_LEEWAY", default_value = "5s", value_parser = parse_duration)]
    jwt_leeway: Duration,
    /// Required `aud` claim, if any.
    #[arg(long, env = "PGRELAY_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// Required `iss` claim, if any.
    #[arg(long, env = "PGRELAY_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Largest inbound WebSocket frame, in bytes.
    #[arg(long, env = "PGRELAY_MAX_FRAME_BYTES", default_value_t = 65_536)]
    max_frame_bytes: usize,
    /// Subscriptions per connection.
    #[arg(long, env = "PGRELAY_MAX_SUBSCRIPTIONS", default_value_t = 100)]
    max_subscriptions: usize,
    /// Open connections per user.
    #[arg(long, env = "PGRELAY_MAX_CONNECTIONS_PER_USER", default_value_t = 32)]
    max_connections_per_user: usize,
    /// Client frames per second per connection (twice that in a burst).
    #[arg(long, env = "PGRELAY_MAX_FRAMES_PER_SECOND", default_value_t = 50)]
    max_frames_per_second: u32,
    /// Concurrent catch-up reads of the event log.
    #[arg(long, env = "PGRELAY_MAX_BACKFILLS", default_value_t = 8)]
    max_backfills: usize,
    /// Comma-separated browser origins allowed to connect (default: any).
    #[arg(long, env = "PGRELAY_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// HTTP API requests per second per user (twice that in a burst).
    #[arg(long, env = "PGRELAY_API_REQUESTS_PER_SECOND", default_value_t = 50)]
    api_requests_per_second: u32,
    /// Newest events kept per project by the retention job, however old.
    #[arg(long, env = "PGRELAY_RETENTION_KEEP_MIN", default_value_t = 1000)]
    retention_keep_min: i32,
    /// Events younger than this are never trimmed.
    #[arg(long, env = "PGRELAY_RETENTION_MIN_AGE", default_value = "1d", value_parser = parse_duration)]
    retention_min_age: Duration,
    /// How often the retention job runs.
    #[arg(long, env = "PGRELAY_RETENTION_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    retention_interval: Duration,
    /// Never trim the event log.
    #[arg(long, env = "PGRELAY_NO_RETENTION")]
    no_retention: bool,
    /// Comma-separated resources whose events change membership.
    #[arg(
        long,
        env = "PGRELAY_MEMBERSHIP_RESOURCES",
        value_delimiter = ',',
        default_value = "project_member"
    )]
    membership_resources: Vec<String>,
    /// The NOTIFY channel the capture triggers use.
    #[arg(long, env = "PGRELAY_CHANNEL", default_value = "cache_invalidate")]
    channel: String,
}

impl Default for ServeArgs {
    fn default() -> Self {
        // The same defaults as the flags, environment included.
        ServeArgs::parse_from(["serve"])
    }
}

#[derive(Parser)]
struct ServeOnly {
    #[command(flatten)]
    args: ServeArgs,
}

impl ServeArgs {
    fn parse_from<const N: usize>(argv: [&str; N]) -> Self {
        ServeOnly::parse_from(argv).args
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 1h or 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("unknown unit {unit:?}; use s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tokio_postgres=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    match cli.command.unwrap_or_else(|| Cmd::Serve(Box::default())) {
        Cmd::Serve(args) => runtime.block_on(serve(*args)),
        Cmd::Migrate { database_url } => runtime.block_on(async {
            let applied = schema::migrate(&database_url).await?;
            tracing::info!(applied = ?applied, "migrations up to date");
            Ok(())
        }),
        Cmd::Sql { relay_only } => {
            print!("{}", schema::install_sql(!relay_only));
            Ok(())
        }
        Cmd::Token {
            user,
            ttl,
            jwt_secret,
        } => {
            let auth = Authenticator::new(&AuthConfig {
                hs256_secret: Some(jwt_secret.into_bytes()),
                ..AuthConfig::default()
            })?;
            println!("{}", auth.issue(&user, ttl)?);
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Keep the private server alive for as long as we serve.
    let mut _private_pg = None;
    let private = args.database_url.is_none();
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
            create_database(&pg.url("postgres"), "pgrelay").await?;
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
            _private_pg = Some(pg);
            url
        }
    };
    let mut secret = match (&args.jwt_secret, &args.jwt_secret_file) {
        (Some(s), _) if !s.is_empty() => Some(s.clone()),
        (_, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the JWT secret file {}", path.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        ),
        _ => None,
    };
    let public_key = match &args.jwt_public_key_file {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("reading the JWT public key file {}", path.display()))?,
        ),
        None => None,
    };
    if secret.is_none() && public_key.is_none() {
        if !private {
            anyhow::bail!(
                "PGRELAY_JWT_SECRET (or PGRELAY_JWT_SECRET_FILE, or PGRELAY_JWT_PUBLIC_KEY_FILE) \
                 is required with DATABASE_URL: it is what client tokens are checked with"
            );
        }
        secret = Some(random_secret());
    }
    let socket = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let mut config = RelayConfig::new(database_url.clone(), Vec::new());
    config.auth = AuthConfig {
        hs256_secret: secret.clone().map(String::into_bytes),
        public_key_pem: public_key,
        leeway: args.jwt_leeway,
        audience: args.jwt_audience,
        issuer: args.jwt_issuer,
    };
    config.channel = args.channel;
    config.max_frame_bytes = args.max_frame_bytes;
    config.max_subscriptions_per_connection = args.max_subscriptions;
    config.max_connections_per_user = args.max_connections_per_user;
    config.max_frames_per_second = args.max_frames_per_second;
    config.max_concurrent_backfills = args.max_backfills;
    config.allowed_origins = args.allowed_origins;
    config.membership_resources = args.membership_resources;
    config.api_requests_per_second = args.api_requests_per_second;
    config.retention = (!args.no_retention).then(|| RetentionConfig {
        interval: args.retention_interval,
        keep_min: args.retention_keep_min,
        min_age: args.retention_min_age,
        ..RetentionConfig::default()
    });
    let relay = server::start(config, socket).await?;
    let addr = relay.addr;
    if let (true, Some(secret)) = (private, &secret) {
        let auth = Authenticator::hs256(secret.as_bytes(), Duration::ZERO);
        println!("pgrelay is running with a private Postgres and a demo project.");
        println!("  psql {database_url}");
        println!("  WebSocket: ws://{addr}/ws?token=<token>");
        for user in demo::DEMO_USERS {
            let token = auth.issue(user, Duration::from_secs(86_400))?;
            println!("  demo page as {user}: http://{addr}/?token={token}");
        }
        println!(
            "  or write with psql: INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('{}', 'bob', 'hi');",
            demo::DEMO_PROJECT
        );
    }
    tracing::info!(database = %redact(&database_url), %addr, "ready; press Ctrl-C to stop");
    wait_for_shutdown().await?;
    tracing::info!("shutting down");
    relay.shutdown().await;
    Ok(())
}

/// A secret for the private demo mode, which has no configuration.
fn random_secret() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..32)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
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

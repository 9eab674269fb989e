//! The `pgrelay` command line: configuration lives here and only here; the
//! library takes what it needs as arguments.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pgrelay::auth::{AuthConfig, Authenticator};
use pgrelay::config::{parse_duration, AppsArgs, ServeArgs};
use pgrelay::db::demo;
use pgrelay::db::embedded::{PgOptions, PgServer};
use pgrelay::db::redact::redact;
use pgrelay::db::schema::{self, Apps};
use pgrelay::doctor::{DoctorConfig, Status};
use pgrelay::server;
use tokio::signal::unix::{signal, SignalKind};

/// jemalloc rather than the system allocator: glibc's malloc keeps what a
/// crowd of connections freed in its per-thread arenas, so the relay's RSS
/// stayed at its peak after the crowd left. jemalloc hands freed pages
/// back to the system from a background thread, on a timer, whether or
/// not the threads that freed them ever allocate again (settings below).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read when it starts: a background thread purges
/// dirty pages after 1 s and returns them to the system at once
/// (`muzzy_decay_ms:0`, so RSS falls instead of waiting for memory
/// pressure). `_RJEM_MALLOC_CONF` in the environment overrides them.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

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
        #[command(flatten)]
        apps: AppsArgs,
    },
    /// Print the install SQL for an existing database (psql -f).
    Sql {
        #[command(flatten)]
        apps: AppsArgs,
        /// The engine alone; what `pgrelay sql` prints without `--chat`
        /// (kept for scripts written for earlier versions).
        #[arg(long, hide = true, conflicts_with = "chat")]
        relay_only: bool,
    },
    /// Check a deployment with serve's settings: schema, grants, rule,
    /// triggers, LISTEN path, replicas, notice queue, event log. Prints one
    /// line per check (ok / warn / fail, with the fix); exits 1 if any
    /// fails. Reads only (its LISTEN proof sends one NOTIFY).
    Doctor(Box<DoctorArgs>),
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

/// `pgrelay doctor`: serve's settings, and the doctor's own.
#[derive(clap::Args, Debug)]
struct DoctorArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// A running relay (http://host:port) whose /healthz is checked too.
    #[arg(long, env = "PGRELAY_DOCTOR_RELAY_URL")]
    relay_url: Option<String>,
    /// Print the report as JSON (for scripts and CI).
    #[arg(long)]
    json: bool,
    /// Longest wait for the LISTEN proof's notice.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    listen_timeout: Duration,
    /// Notice-queue usage, as a fraction of the queue, from which the
    /// doctor warns (it fails from 0.5).
    #[arg(long, default_value_t = 0.1)]
    notice_queue_warn: f64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tokio_postgres=warn".into()),
        )
        // Colour codes only for a person at a terminal: a log file or a
        // pipe to a collector gets plain text (and NO_COLOR is honoured).
        .with_ansi(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    match cli.command.unwrap_or_else(|| Cmd::Serve(Box::default())) {
        Cmd::Serve(args) => runtime.block_on(serve(*args)),
        Cmd::Migrate { database_url, apps } => runtime.block_on(async {
            let applied = schema::migrate(&database_url, apps.apps()).await?;
            tracing::info!(applied = ?applied, "migrations up to date");
            Ok(())
        }),
        Cmd::Doctor(args) => {
            let failed = runtime.block_on(doctor(*args))?;
            // Let the runtime close the doctor's connections first.
            drop(runtime);
            if failed {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Sql { apps, .. } => {
            print!("{}", schema::install_sql(apps.apps()));
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
    let database_url = match args.database_url.clone() {
        Some(url) => {
            // Migrations hold a session-level lock and run multi-statement
            // transactions: never through a transaction pooler.
            let direct = args.listen_database_url.as_deref().unwrap_or(&url);
            schema::migrate(direct, args.apps.apps())
                .await
                .context("migrating the database")?;
            url
        }
        None => {
            let options = PgOptions {
                data_dir: args.data_dir.clone(),
                ..PgOptions::default()
            };
            let pg = tokio::task::spawn_blocking(move || PgServer::start(options))
                .await
                .context("starting the private Postgres")?
                .context("starting the private Postgres")?;
            create_database(&pg.url("postgres"), "pgrelay").await?;
            let url = pg.url("pgrelay");
            schema::migrate(&url, Apps::WITH_CHAT)
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
    let (mut secret, public_key) = args.token_keys()?;
    if secret.is_none() && public_key.is_none() && args.jwks_config().is_none() {
        if !private {
            anyhow::bail!(
                "PGRELAY_JWT_SECRET (or PGRELAY_JWT_SECRET_FILE, PGRELAY_JWT_PUBLIC_KEY_FILE, \
                 PGRELAY_JWT_JWKS_URL or PGRELAY_JWT_OIDC_ISSUER) is required with DATABASE_URL: \
                 it is what client tokens are checked with"
            );
        }
        // Kept with the data when there is a data directory, so printed
        // tokens and open demo pages survive a restart.
        let dir = args.data_dir.as_deref();
        secret = Some(demo::signing_secret(dir).with_context(|| match dir {
            Some(dir) => format!(
                "the demo token secret in {}",
                dir.join(demo::SECRET_FILE).display()
            ),
            None => "making the demo token secret".to_string(),
        })?);
    }
    raise_open_files_limit(args.max_connections);
    let socket = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let config = args.relay_config(database_url.clone(), secret.clone(), public_key);
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

/// Runs the checks and prints the report; `true` when a check failed.
async fn doctor(args: DoctorArgs) -> anyhow::Result<bool> {
    let serve = &args.serve;
    let url = serve
        .database_url
        .clone()
        .context("DATABASE_URL (or --database-url) is required: the doctor checks that database")?;
    let config = DoctorConfig {
        relay: serve.relay_config(url, None, None),
        apps: serve.apps.apps(),
        relay_url: args.relay_url.clone(),
        listen_timeout: args.listen_timeout,
        queue_warn: args.notice_queue_warn,
    };
    let report = pgrelay::doctor::run(&config).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(report.status == Status::Fail)
}

/// Every connection is a file descriptor: raise the soft limit to the
/// hard one (as Go and others do), and say so if the connection cap could
/// still not be reached.
fn raise_open_files_limit(max_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    // Room for the database pool, the LISTEN connection, logs and refusals.
    let needed = max_connections as u64 + 256;
    if limit < needed {
        tracing::warn!(
            open_files_limit = limit,
            max_connections,
            "the open-files limit is below the connection cap; connections past it fail at accept"
        );
    }
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

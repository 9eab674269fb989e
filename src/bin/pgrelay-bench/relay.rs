//! The relay process the scenarios load: this binary re-executed in the
//! hidden `relay` mode, running `server::start` as `pgrelay serve` does.

use pgrelay::config::RelayConfig;
use pgrelay::server;

/// The secret the relay verifies and [`crate::env::Env`] signs tokens with.
pub const SECRET: &str = "pgrelay-bench-secret-0123456789";

/// The limits a relay of the benchmark runs with (flags of the hidden
/// `relay` mode, named as `pgrelay serve`'s).
#[derive(clap::Args, Clone, Debug)]
pub struct Limits {
    /// Client frames per second per connection (`serve`'s default is 50).
    #[arg(long, default_value_t = 1_000_000)]
    pub max_frames_per_second: u32,
    /// Broadcasts and presence changes per second per project (G9).
    #[arg(long, default_value_t = 100)]
    pub project_signals_per_second: u32,
    /// Open TCP connections the relay accepts (`serve`'s default is
    /// 10,000): opened up, like the per-user limits, for the crowds of
    /// `connections`.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frames_per_second: 1_000_000,
            project_signals_per_second: 100,
            max_connections: 1_000_000,
        }
    }
}

impl Limits {
    /// The same limits as command-line arguments.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--max-frames-per-second".into(),
            self.max_frames_per_second.to_string(),
            "--project-signals-per-second".into(),
            self.project_signals_per_second.to_string(),
            "--max-connections".into(),
            self.max_connections.to_string(),
        ]
    }
}

/// `server::start` with the per-user limits opened up for load and no
/// retention, reading the log from `replica_url` when given, until
/// SIGTERM.
pub fn run(
    database_url: &str,
    replica_url: Option<&str>,
    listen: &str,
    limits: &Limits,
) -> anyhow::Result<()> {
    // PGRELAY_BENCH_WORKERS=1 runs the relay on a single-threaded runtime,
    // to measure what cross-thread wake-ups cost.
    let workers: usize = std::env::var("PGRELAY_BENCH_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(0);
    let runtime = match workers {
        0 => tokio::runtime::Runtime::new()?,
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    runtime.block_on(async {
        let mut config = RelayConfig::new(database_url, SECRET.as_bytes().to_vec());
        config.max_connections_per_user = 1_000_000;
        config.max_frames_per_second = limits.max_frames_per_second;
        config.project_signals_per_second = limits.project_signals_per_second;
        config.max_connections = limits.max_connections;
        config.retention = None;
        config.pool_size = 8;
        config.replica_urls = replica_url.map(str::to_string).into_iter().collect();
        let socket = tokio::net::TcpListener::bind(listen).await?;
        let relay = server::start(config, socket).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        term.recv().await;
        relay.shutdown().await;
        Ok(())
    })
}

//! The relay process the scenarios load: this binary re-executed in the
//! hidden `relay` mode, running `server::start` as `pgrelay serve` does.

use pgrelay::config::RelayConfig;
use pgrelay::server;

/// The secret the relay verifies and [`crate::env::Env`] signs tokens with.
pub const SECRET: &str = "pgrelay-bench-secret-0123456789";

/// `server::start` with the per-user limits opened up for load and no
/// retention, until SIGTERM.
pub fn run(database_url: &str, listen: &str) -> anyhow::Result<()> {
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
        config.max_frames_per_second = 1_000_000;
        config.retention = None;
        config.pool_size = 8;
        let socket = tokio::net::TcpListener::bind(listen).await?;
        let relay = server::start(config, socket).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        term.recv().await;
        relay.shutdown().await;
        Ok(())
    })
}

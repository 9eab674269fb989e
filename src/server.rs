//! Wiring: starts the listener, the fetcher, the poller and the HTTP
//! server of one relay, and shuts them down in order. The binary and the
//! tests both come through [`start`], with a listener they bound
//! themselves (tests use `127.0.0.1:0`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::Api;
use crate::auth::{AuthConfig, AuthError, Authenticator};
use crate::http::{self, HttpState};
use crate::hub::{Hub, HubLimits};
use crate::listener::{self, ListenerConfig};
use crate::log::{EventLog, LogError, ReadLimits};
use crate::metrics::Metrics;
use crate::retention::{self, RetentionConfig};
use crate::session::{SessionContext, SessionLimits};

/// Everything a relay needs to know. Defaults are the documented ones.
#[derive(Clone)]
pub struct RelayConfig {
    pub database_url: String,
    /// The NOTIFY channel (`PGRELAY_CHANNEL`).
    pub channel: String,
    /// How client tokens are checked.
    pub auth: AuthConfig,
    /// Resources whose events change membership: subscribers of the scope
    /// are re-authorized after each (G4).
    pub membership_resources: Vec<String>,
    /// WebSocket ping period.
    pub ping_interval: Duration,
    /// A peer silent (or accepting no bytes) this long is closed.
    pub pong_timeout: Duration,
    /// Largest inbound WebSocket message.
    pub max_frame_bytes: usize,
    pub max_subscriptions_per_connection: usize,
    /// Open WebSockets per user; more are closed with 4029.
    pub max_connections_per_user: usize,
    /// Client frames per second per connection (twice that in a burst).
    pub max_frames_per_second: u32,
    /// Browser origins allowed to connect; empty allows any. Requests
    /// without an Origin header (non-browsers) are always allowed.
    pub allowed_origins: Vec<String>,
    pub max_concurrent_backfills: usize,
    /// HTTP API requests per second per user (twice that in a burst).
    pub api_requests_per_second: u32,
    /// Database connections for reads (not counting the LISTEN one).
    pub pool_size: usize,
    /// Per-scope limits of one log read.
    pub read_rows: i32,
    pub read_bytes: i64,
    /// Per-topic ring of recent frames.
    pub ring_frames: usize,
    pub ring_bytes: usize,
    /// Resync period while the LISTEN connection is down.
    pub poll_interval: Duration,
    /// Safety-net resync period while it is up.
    pub resync_interval: Duration,
    /// How often the LISTEN connection re-proves itself.
    pub probe_interval: Duration,
    /// How long shutdown waits for clients to take their close frames.
    pub shutdown_grace: Duration,
    /// Trimming of the event log; `None` leaves the log untrimmed.
    pub retention: Option<RetentionConfig>,
}

impl RelayConfig {
    pub fn new(database_url: impl Into<String>, jwt_secret: impl Into<Vec<u8>>) -> Self {
        RelayConfig {
            database_url: database_url.into(),
            channel: "cache_invalidate".into(),
            auth: AuthConfig {
                hs256_secret: Some(jwt_secret.into()),
                leeway: Duration::from_secs(5),
                ..AuthConfig::default()
            },
            membership_resources: vec!["project_member".into()],
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(45),
            max_frame_bytes: 64 * 1024,
            max_subscriptions_per_connection: 100,
            max_connections_per_user: 32,
            max_frames_per_second: 50,
            allowed_origins: Vec::new(),
            max_concurrent_backfills: 8,
            api_requests_per_second: 50,
            pool_size: 16,
            read_rows: 500,
            read_bytes: 4 << 20,
            ring_frames: 4096,
            ring_bytes: 16 << 20,
            poll_interval: Duration::from_millis(500),
            resync_interval: Duration::from_secs(10),
            probe_interval: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            retention: Some(RetentionConfig::default()),
        }
    }
}

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("event log: {0}")]
    Log(#[from] LogError),
    #[error("listening socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("{0}")]
    Auth(#[from] AuthError),
}

/// A running relay.
pub struct RelayHandle {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    listening: watch::Receiver<bool>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl RelayHandle {
    /// True while the LISTEN connection is up and proven.
    pub fn is_listening(&self) -> bool {
        *self.listening.borrow()
    }

    /// Waits until the LISTEN connection is up and proven.
    pub async fn wait_listening(&mut self) {
        let _ = self.listening.wait_for(|l| *l).await;
    }

    /// Stops accepting, sends every client the going-away close, and
    /// returns once all is done (bounded by `shutdown_grace`).
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

pub async fn start(config: RelayConfig, socket: TcpListener) -> Result<RelayHandle, StartError> {
    let addr = socket.local_addr()?;
    let auth = Authenticator::new(&config.auth)?;
    let metrics = Arc::new(Metrics::default());
    let log = EventLog::connect(
        &config.database_url,
        config.pool_size,
        metrics.clone(),
        &config.membership_resources,
    )?;
    let hub = Arc::new(Hub::new(
        log.clone(),
        metrics.clone(),
        HubLimits {
            ring_frames: config.ring_frames,
            ring_bytes: config.ring_bytes,
            read: ReadLimits {
                rows: config.read_rows,
                bytes: config.read_bytes,
            },
            scopes_per_read: 64,
        },
    ));
    let shutdown = CancellationToken::new();
    let background = TaskTracker::new();
    let (listening_tx, listening_rx) = watch::channel(false);

    background.spawn(hub.clone().run_fetcher(shutdown.clone()));
    background.spawn(hub.clone().run_poller(
        listening_rx.clone(),
        config.poll_interval,
        config.resync_interval,
        shutdown.clone(),
    ));
    background.spawn(listener::run(
        ListenerConfig {
            database_url: config.database_url.clone(),
            channel: config.channel.clone(),
            probe_interval: config.probe_interval,
        },
        hub.clone(),
        metrics.clone(),
        listening_tx,
        shutdown.clone(),
    ));

    if let Some(retention) = config.retention.clone() {
        background.spawn(retention::run(
            config.database_url.clone(),
            retention,
            metrics.clone(),
            shutdown.clone(),
        ));
    }

    let sessions = Arc::new(SessionContext {
        hub,
        log,
        metrics: metrics.clone(),
        backfills: Semaphore::new(config.max_concurrent_backfills.max(1)),
        auth,
        limits: SessionLimits {
            ping_interval: config.ping_interval,
            pong_timeout: config.pong_timeout,
            max_subscriptions: config.max_subscriptions_per_connection,
            catchup_read: ReadLimits {
                rows: config.read_rows,
                bytes: config.read_bytes,
            },
            max_frames_per_second: config.max_frames_per_second,
        },
    });
    let websockets = TaskTracker::new();
    let api = Api::new(
        sessions.log.clone(),
        sessions.auth.clone(),
        config.api_requests_per_second,
    );
    let state = Arc::new(HttpState {
        api,
        sessions,
        metrics: metrics.clone(),
        allowed_origins: config.allowed_origins.clone(),
        max_connections_per_user: config.max_connections_per_user,
        user_connections: Default::default(),
        listening: listening_rx.clone(),
        max_frame_bytes: config.max_frame_bytes,
        shutdown: shutdown.clone(),
        tasks: websockets.clone(),
    });
    let grace = config.shutdown_grace;
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        serve(socket, state, token.clone()).await;
        // Sessions saw the same token and are sending their close frames.
        websockets.close();
        if tokio::time::timeout(grace, websockets.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "some WebSocket sessions did not finish in time"
            );
        }
        background.close();
        let _ = tokio::time::timeout(grace, background.wait()).await;
    });
    tracing::info!(%addr, "relay serving");
    Ok(RelayHandle {
        addr,
        metrics,
        listening: listening_rx,
        shutdown,
        task,
    })
}

/// Accepts connections until shutdown, then lets plain HTTP requests in
/// flight finish.
async fn serve(socket: TcpListener, state: Arc<HttpState>, shutdown: CancellationToken) {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = socket.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let service = service_fn(move |req| http::handle(req, state.clone()));
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(socket);
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

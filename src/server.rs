//! Wiring: starts the listener, the fetcher, the poller and the HTTP
//! server of one relay, and shuts them down in order. The binary and the
//! tests both come through [`start`], with a listener they bound
//! themselves (tests use `127.0.0.1:0`).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, Authenticator};
use crate::config::RelayConfig;
use crate::db::connect::{self, ConnectError, PoolOptions};
use crate::db::pool::{BoundedPool, PoolHealth, Statements};
use crate::http::api::Api;
use crate::http::connection::{Admission, ConnectionLimits};
use crate::http::{self, HttpState};
use crate::metrics::Metrics;
use crate::relay::budget::CatchupBudget;
use crate::relay::hub::{Hub, HubLimits};
use crate::relay::listener::{self, ListenHealth, Listener, ListenerConfig};
use crate::relay::log::{EventLog, LogError, ReadLimits};
use crate::relay::presence::{Presence, PresenceConfig};
use crate::relay::session::{SessionContext, SessionLimits};
use crate::relay::signal::Signals;
use crate::retention;

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("event log: {0}")]
    Log(#[from] LogError),
    #[error("database: {0}")]
    Connect(#[from] ConnectError),
    #[error("listening socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("{0}")]
    Auth(#[from] AuthError),
}

/// A running relay.
pub struct RelayHandle {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    /// The primary's pool, whose health `/healthz` reports.
    pool: BoundedPool,
    listening: watch::Receiver<bool>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl RelayHandle {
    /// True while the LISTEN connection is up and proven.
    pub fn is_listening(&self) -> bool {
        *self.listening.borrow()
    }

    /// Whether the pool serves reads, and its discarded connections.
    pub fn pool_health(&self) -> &PoolHealth {
        self.pool.health()
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
    let metrics = Arc::new(Metrics::default());
    let auth = Authenticator::with_metrics(&config.auth, metrics.jwks.clone())?;
    // The identity provider's keys, before serving: a relay that could
    // not load them still starts (the schedule retries), with /healthz at
    // 503 naming the reason.
    if let Some(jwks) = auth.jwks() {
        jwks.load_at_start().await;
    }
    let statements = if config.transaction_pooler {
        Statements::Unnamed
    } else {
        Statements::Prepared
    };
    let pool = connect::pool(
        &config.database_url,
        &PoolOptions {
            name: "primary".into(),
            size: config.pool_size,
            query_timeout: config.query_timeout,
            statements,
        },
    )?;
    let pool_handle = pool.clone();
    let mut replicas = Vec::new();
    for (i, url) in config.replica_urls.iter().enumerate() {
        replicas.push(connect::pool(
            url,
            &PoolOptions {
                name: format!("replica {}", i + 1),
                size: config.pool_size,
                query_timeout: config.query_timeout,
                statements,
            },
        )?);
    }
    let log = EventLog::new(pool, metrics.clone(), &config.membership_resources)
        .with_replicas(replicas, config.replica_wait);
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
            signals_per_second: config.project_signals_per_second,
        },
    ));
    // A broken pooled connection makes the hub distrust what it read
    // before (G8). Weak: the pool lives inside the hub.
    let weak = Arc::downgrade(&hub);
    log.pool().on_connection_lost(Arc::new(move || {
        if let Some(hub) = weak.upgrade() {
            hub.suspect_all();
        }
    }));
    let listen_health = Arc::new(ListenHealth::default());
    let shutdown = CancellationToken::new();
    let background = TaskTracker::new();
    let (listening_tx, listening_rx) = watch::channel(false);

    background.spawn(hub.clone().run_fetcher(shutdown.clone()));
    if let Some(jwks) = auth.jwks() {
        background.spawn(jwks.clone().run(shutdown.clone()));
    }
    // Ephemeral signals (G9): presence in the database, broadcasts on the
    // signal channel.
    let relay_id = format!("{:012x}", rand::random::<u64>() >> 16);
    let presence = Presence::new(
        PresenceConfig {
            instance: config
                .instance
                .clone()
                .unwrap_or_else(|| format!("relay {relay_id}")),
            relay_id,
            timeout: config.presence_timeout,
            max_snapshot_connections: config.presence_snapshot_max,
        },
        log.pool().clone(),
        metrics.clone(),
    );
    background.spawn(presence.clone().run(shutdown.clone()));
    let (signals, outgoing) = Signals::new(&config.channel, hub.clone(), presence, metrics.clone());
    background.spawn(
        signals
            .clone()
            .run_sender(outgoing, log.pool().clone(), shutdown.clone()),
    );
    if !config.replica_urls.is_empty() {
        background.spawn(
            log.clone()
                .run_replica_checks(config.probe_interval, shutdown.clone()),
        );
    }
    background.spawn(hub.clone().run_poller(
        listening_rx.clone(),
        config.poll_interval,
        config.resync_interval,
        shutdown.clone(),
    ));
    background.spawn(listener::run(
        Listener {
            config: ListenerConfig {
                database_url: config.session_database_url().to_string(),
                channel: config.channel.clone(),
                probe_interval: config.probe_interval,
                poll_interval: config.poll_interval,
            },
            hub: hub.clone(),
            log: log.clone(),
            metrics: metrics.clone(),
            health: listen_health.clone(),
            signals: signals.clone(),
        },
        listening_tx,
        shutdown.clone(),
    ));

    if let Some(retention) = config.retention.clone() {
        // The trim lock is a session-level advisory lock: it needs a
        // session of its own, never a transaction pooler's.
        background.spawn(retention::run(
            config.session_database_url().to_string(),
            retention,
            metrics.clone(),
            shutdown.clone(),
        ));
    }

    let sessions = Arc::new(SessionContext {
        hub,
        log,
        signals,
        metrics: metrics.clone(),
        backfills: Semaphore::new(config.max_concurrent_backfills.max(1)),
        budget: CatchupBudget::new(config.catchup_budget_bytes, metrics.clone()),
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
            reauthorize_interval: config.reauthorize_interval,
            authorize_timeout: config.authorize_timeout,
            first_frame_timeout: config.first_frame_timeout,
        },
    });
    let websockets = TaskTracker::new();
    let api = Api::new(
        sessions.log.clone(),
        sessions.auth.clone(),
        config.api_requests_per_second,
        config.http_read_timeout,
        metrics.clone(),
    );
    let state = Arc::new(HttpState {
        api,
        sessions,
        metrics: metrics.clone(),
        allowed_origins: config.allowed_origins.clone(),
        max_connections_per_user: config.max_connections_per_user,
        user_connections: Default::default(),
        listening: listening_rx.clone(),
        listen_health,
        max_frame_bytes: config.max_frame_bytes,
        shutdown: shutdown.clone(),
        tasks: websockets.clone(),
        admission: Admission::new(
            ConnectionLimits {
                max_connections: config.max_connections,
                max_pending: config.max_pending_connections,
                write_timeout: config.pong_timeout,
            },
            metrics.clone(),
        ),
        http_read_timeout: config.http_read_timeout,
    });
    let grace = config.shutdown_grace;
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        http::serve(socket, state, token.clone()).await;
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
        pool: pool_handle,
        listening: listening_rx,
        shutdown,
        task,
    })
}

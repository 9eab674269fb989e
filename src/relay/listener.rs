//! Notices in: the one LISTEN connection of a relay process (G6).
//!
//! The connection is driven by hand (`poll_message`), the only way
//! tokio-postgres surfaces notifications. It goes to
//! `PGRELAY_LISTEN_DATABASE_URL` when set (a direct connection, while
//! `DATABASE_URL` may go through a transaction-mode pooler), else to
//! `DATABASE_URL`.
//!
//! Before it is trusted, and every `probe_interval` after, it proves two
//! things in turn, each within [`PROBE_TIMEOUT`]:
//! - that it is alive: a query on the connection itself answers (a
//!   half-open connection answers nothing, and keepalives cannot see past a
//!   proxy);
//! - that notices of *other* sessions reach it: a NOTIFY on a private
//!   channel is sent from the pool, another session. A transaction-mode
//!   pooler or a hot standby on the LISTEN path delivers a connection's own
//!   NOTIFY but drops everyone else's; this probe fails there, and the
//!   relay says so (log and `/healthz`) instead of trusting it. It is sent
//!   only once the first query has answered: a transaction-mode pooler
//!   hands a notice to whichever client is running a query on the server
//!   connection that LISTENed, so a probe sent during our own query could
//!   come back through it.
//!
//! When the connection drops or a proof fails it reconnects with
//! exponential backoff and jitter, then asks the hub to resync every topic
//! from the log, so nothing sent in the gap is lost. While it is not
//! proven, `listening` is false: `/healthz` answers 503 with the reason and
//! the hub polls the log every `poll_interval` instead. Any loss of the
//! connection also makes the hub distrust what it read before (G8): the
//! connection may come back to another server (a failover).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use rand::Rng;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use crate::db::connect::{self, ConnectError};
use crate::metrics::Metrics;
use crate::relay::hub::Hub;
use crate::relay::log::EventLog;
use crate::relay::signal::Signals;

/// How long a probe (either half) may take to come back.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Retry period of a first proof whose NOTIFY the pool could not send.
const PROBE_SEND_RETRY: Duration = Duration::from_secs(1);

/// What the listener needs.
pub struct ListenerConfig {
    /// Where LISTEN goes (`PGRELAY_LISTEN_DATABASE_URL`, else
    /// `DATABASE_URL`).
    pub database_url: String,
    pub channel: String,
    pub probe_interval: Duration,
    /// Named in the advice when LISTEN cannot be proven.
    pub poll_interval: Duration,
}

/// Why the relay is not listening, for `/healthz`; empty while it is.
#[derive(Default)]
pub struct ListenHealth {
    problem: Mutex<String>,
}

impl ListenHealth {
    pub fn problem(&self) -> String {
        self.problem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, problem: String) {
        *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = problem;
    }
}

/// Why one LISTEN session ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("{0}")]
    Config(#[source] ConnectError),
    #[error("connecting: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("connecting: no answer within {0:?}")]
    ConnectTimeout(Duration),
    #[error("LISTEN/NOTIFY command failed: {0}")]
    Command(#[source] tokio_postgres::Error),
    #[error("the LISTEN connection did not answer a query within {0:?} (half-open network partition?); reconnecting")]
    Unresponsive(Duration),
    #[error(
        "a NOTIFY sent from another session did not arrive within {timeout:?}: this LISTEN connection \
         does not receive other sessions' notices. {advice}. Meanwhile the event log is polled \
         every {poll:?}",
        advice = POOLER_ADVICE
    )]
    ProbeLost { timeout: Duration, poll: Duration },
    #[error("the connection closed: {0}")]
    Closed(String),
}

/// The only part of a notice the relay uses; everything else in it is
/// ignored, and the event itself is read from the log.
#[derive(Deserialize)]
struct Notice {
    #[serde(rename = "type")]
    kind: String,
    project_id: String,
    seq: u64,
}

/// What a listener shares with the rest of the relay.
pub struct Listener {
    pub config: ListenerConfig,
    pub hub: Arc<Hub>,
    /// Sends the probes from the pool.
    pub log: EventLog,
    pub metrics: Arc<Metrics>,
    pub health: Arc<ListenHealth>,
    /// Broadcasts and presence diffs arrive on the same connection, on the
    /// signal channel; after a loss, presence mirrors load again.
    pub signals: Arc<Signals>,
}

/// Runs until shutdown, reconnecting as needed.
pub async fn run(listener: Listener, listening: watch::Sender<bool>, shutdown: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    listener
        .health
        .set("connecting to the database for LISTEN".into());
    loop {
        let result = listener.session(&listening, &shutdown, &mut backoff).await;
        listening.send_replace(false);
        listener.metrics.listening.store(0, Relaxed);
        // Whatever comes next may be another server.
        listener.hub.suspect_all();
        if shutdown.is_cancelled() {
            return;
        }
        let jittered = backoff.mul_f64(rand::rng().random_range(0.5..1.5));
        match result {
            Ok(()) => return,
            Err(e) => {
                listener.health.set(e.to_string());
                match e {
                    SessionEnd::ProbeLost { .. } => {
                        tracing::error!(error = %e, retry_in_ms = jittered.as_millis() as u64, "LISTEN cannot be proven")
                    }
                    _ => {
                        tracing::warn!(error = %e, retry_in_ms = jittered.as_millis() as u64, "LISTEN connection lost; polling the event log until it is back")
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(jittered) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

impl Listener {
    /// One connection's life: connect, LISTEN, prove, then serve notices
    /// and re-prove periodically until it fails. `Ok` only on shutdown.
    async fn session(
        &self,
        listening: &watch::Sender<bool>,
        shutdown: &CancellationToken,
        backoff: &mut Duration,
    ) -> Result<(), SessionEnd> {
        let config = &self.config;
        let pg = connect::listen_config(&config.database_url).map_err(SessionEnd::Config)?;
        let (client, mut connection) =
            tokio::time::timeout(connect::CONNECT_TIMEOUT * 2, pg.connect(NoTls))
                .await
                .map_err(|_| SessionEnd::ConnectTimeout(connect::CONNECT_TIMEOUT * 2))?
                .map_err(SessionEnd::Connect)?;

        let probe_channel = format!(
            "pgrelay_probe_{}_{:08x}",
            std::process::id(),
            rand::rng().random::<u32>()
        );
        let (probe_tx, mut probe_rx) = mpsc::unbounded_channel::<String>();
        let driver = {
            let hub = self.hub.clone();
            let metrics = self.metrics.clone();
            let signals = self.signals.clone();
            let channel = config.channel.clone();
            let probe_channel = probe_channel.clone();
            tokio::spawn(async move {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(message) = messages.next().await {
                    match message {
                        Ok(AsyncMessage::Notification(n)) if n.channel() == probe_channel => {
                            let _ = probe_tx.send(n.payload().to_string());
                        }
                        Ok(AsyncMessage::Notification(n)) if n.channel() == channel => {
                            on_notice(n.payload(), &hub, &metrics);
                        }
                        Ok(AsyncMessage::Notification(n)) if n.channel() == signals.channel() => {
                            signals.on_notice(n.payload());
                        }
                        Ok(_) => {}
                        Err(e) => {
                            // At once, not when the prober next looks: a
                            // failover may be under way.
                            hub.suspect_all();
                            return e.to_string();
                        }
                    }
                }
                hub.suspect_all();
                "end of stream".to_string()
            })
        };
        // Dropping the session (reconnect, shutdown) ends the driver too.
        let driver = AbortOnDrop(driver);
        let mut driver = std::pin::pin!(driver);

        if let Err(e) = bounded(connect::server_keepalives(&client)).await {
            tracing::debug!(error = %e, "could not ask the server for keepalives");
        }
        let listen = format!(
            "LISTEN {}; LISTEN {}; LISTEN {}",
            quote_ident(&config.channel),
            quote_ident(self.signals.channel()),
            quote_ident(&probe_channel)
        );
        bounded(client.batch_execute(&listen)).await?;

        // The triggers ring the channel the database is configured with; a
        // relay listening elsewhere would only ever poll. Say so loudly.
        if let Ok(row) = bounded(client.query_one("SELECT relay.channel()", &[])).await {
            let db_channel: String = row.get(0);
            if db_channel != config.channel {
                tracing::error!(relay_channel = %config.channel, database_channel = %db_channel,
                    "the capture triggers notify another channel than the relay listens on; set PGRELAY_CHANNEL to match");
            }
        }

        let mut nonce = 0u64;
        let mut proven = false;
        loop {
            nonce += 1;
            let payload = nonce.to_string();
            // Alive first, so a dead connection is found within one
            // PROBE_TIMEOUT whatever the pool does. Then the NOTIFY, never
            // while a query of ours is in flight: behind a transaction-mode
            // pooler, a notice reaches whichever client is running a query
            // on the server connection that LISTENed, so a probe sent during
            // our own query could come back and prove a path that drops
            // every other notice.
            bounded(client.simple_query("SELECT 1")).await?;
            let sent = self.log.notify(&probe_channel, &payload).await;
            let wait = match sent {
                Ok(()) => {
                    let arrived = tokio::time::timeout(PROBE_TIMEOUT, async {
                        while let Some(p) = probe_rx.recv().await {
                            if p == payload {
                                return true;
                            }
                        }
                        false
                    })
                    .await
                    .unwrap_or(false);
                    if !arrived {
                        return Err(SessionEnd::ProbeLost {
                            timeout: PROBE_TIMEOUT,
                            poll: config.poll_interval,
                        });
                    }
                    if !proven {
                        // Proven: trust it, and fill whatever was missed
                        // while down.
                        proven = true;
                        *backoff = BACKOFF_MIN;
                        self.health.set(String::new());
                        self.metrics.listener_reconnects.fetch_add(1, Relaxed);
                        self.metrics.listening.store(1, Relaxed);
                        listening.send_replace(true);
                        self.hub.resync_all();
                        self.signals.presence().reload_all();
                        tracing::info!(channel = %config.channel, "listening");
                    }
                    config.probe_interval
                }
                // The pool could not send the probe: that is the pool's
                // problem (`/healthz` reports it). A connection already
                // proven stays trusted while it answers; an unproven one
                // is tried again soon.
                Err(e) if !proven => {
                    self.health.set(format!(
                        "LISTEN is connected but not proven: the probe NOTIFY could not be sent from the pool: {e}"
                    ));
                    PROBE_SEND_RETRY
                }
                Err(_) => config.probe_interval,
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                ended = &mut driver => {
                    return Err(SessionEnd::Closed(ended.unwrap_or_else(|e| e.to_string())));
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// What to do when a LISTEN connection misses other sessions' notices;
/// said by the relay's log and `/healthz`, and by `pgrelay doctor`.
pub const POOLER_ADVICE: &str = "A transaction-mode pooler (PgBouncer pool_mode=transaction) or a hot \
     standby on the LISTEN path does this: set PGRELAY_LISTEN_DATABASE_URL to a direct connection to \
     the primary (or a session-mode pooler)";

/// Why a one-off LISTEN proof failed.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("connecting: {0}")]
    Connection(#[source] tokio_postgres::Error),
    #[error("LISTEN failed: {0}")]
    Command(#[source] tokio_postgres::Error),
    #[error("no answer within {0:?}")]
    Unresponsive(Duration),
    #[error("the probe NOTIFY could not be sent from another session: {0}")]
    Send(#[source] crate::relay::log::LogError),
    #[error(
        "a NOTIFY sent from another session did not arrive within {0:?}: this LISTEN connection does \
         not receive other sessions' notices"
    )]
    Lost(Duration),
}

/// Proves once, the way the relay's listener does, that a LISTEN
/// connection to `database_url` receives another session's notices: LISTEN
/// on a private channel, one query answered on that connection, then a
/// NOTIFY sent through `log`'s pool, awaited for at most `wait`. Returns how
/// long the notice took. For `pgrelay doctor`; the connection is its own
/// and closes on return.
pub async fn prove_once(
    database_url: &str,
    log: &EventLog,
    wait: Duration,
) -> Result<Duration, ProofError> {
    let pg = connect::config(database_url, "pgrelay-doctor")?;
    let (client, mut connection) =
        tokio::time::timeout(connect::CONNECT_TIMEOUT * 2, pg.connect(NoTls))
            .await
            .map_err(|_| ProofError::Unresponsive(connect::CONNECT_TIMEOUT * 2))?
            .map_err(ProofError::Connection)?;
    let channel = format!(
        "pgrelay_doctor_{}_{:08x}",
        std::process::id(),
        rand::rng().random::<u32>()
    );
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let driver = {
        let channel = channel.clone();
        AbortOnDrop(tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message {
                    if n.channel() == channel {
                        let _ = tx.send(n.payload().to_string());
                    }
                }
            }
        }))
    };
    let command = |sql: String| {
        let client = &client;
        async move {
            tokio::time::timeout(PROBE_TIMEOUT, client.batch_execute(&sql))
                .await
                .map_err(|_| ProofError::Unresponsive(PROBE_TIMEOUT))?
                .map_err(ProofError::Command)
        }
    };
    command(format!("LISTEN {}", quote_ident(&channel))).await?;
    // As the listener: our own query first, the NOTIFY only after it has
    // answered (see the module doc).
    command("SELECT 1".to_string()).await?;
    let payload = format!("{:016x}", rand::rng().random::<u64>());
    let started = tokio::time::Instant::now();
    log.notify(&channel, &payload)
        .await
        .map_err(ProofError::Send)?;
    let arrived = tokio::time::timeout(wait, async {
        while let Some(p) = rx.recv().await {
            if p == payload {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    drop(driver);
    if arrived {
        Ok(started.elapsed())
    } else {
        Err(ProofError::Lost(wait))
    }
}

/// A command on the LISTEN connection, within [`PROBE_TIMEOUT`].
async fn bounded<T>(
    command: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, SessionEnd> {
    tokio::time::timeout(PROBE_TIMEOUT, command)
        .await
        .map_err(|_| SessionEnd::Unresponsive(PROBE_TIMEOUT))?
        .map_err(SessionEnd::Command)
}

/// Aborts a spawned task when dropped, so a LISTEN session given up on
/// (a failed proof) takes its connection with it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

/// Counts and forwards one notice as a hint. Foreign or malformed payloads
/// are counted and ignored: they can never make the relay send anything,
/// since only what the log holds is ever sent.
fn on_notice(payload: &str, hub: &Hub, metrics: &Metrics) {
    metrics.notices_received.fetch_add(1, Relaxed);
    match serde_json::from_str::<Notice>(payload) {
        Ok(n) if n.kind == "cache_invalidate" && !n.project_id.is_empty() => {
            hub.hint(&n.project_id, n.seq);
        }
        _ => {
            metrics.foreign_notices.fetch_add(1, Relaxed);
            tracing::debug!(
                bytes = payload.len(),
                "ignoring a notice that is not pgrelay's"
            );
        }
    }
}

/// Double-quotes an identifier for LISTEN, which takes no parameters.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

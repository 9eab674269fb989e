//! Notices in: the one LISTEN connection of a relay process (G6).
//!
//! The connection is driven by hand (`poll_message`), the only way
//! tokio-postgres surfaces notifications. Before it is trusted, and every
//! `probe_interval` after, it proves that notices reach it with a
//! self-addressed NOTIFY on a private channel: a transaction-mode pooler or
//! a hot standby silently breaks LISTEN, and is reported instead of
//! trusted. When the connection drops it reconnects with exponential
//! backoff and jitter, then asks the hub to resync every topic from the
//! log, so nothing sent in the gap is lost. While it is down, `listening`
//! is false: `/healthz` answers 503 and the hub polls the log instead.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
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

/// How long a self-addressed probe may take to come back.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What the listener needs.
pub struct ListenerConfig {
    pub database_url: String,
    pub channel: String,
    pub probe_interval: Duration,
}

/// Why one LISTEN session ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("{0}")]
    Config(#[source] ConnectError),
    #[error("connecting: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("LISTEN/NOTIFY command failed: {0}")]
    Command(#[source] tokio_postgres::Error),
    #[error(
        "a self-addressed notice did not come back within {0:?}: LISTEN does not work on this \
         connection (a transaction-mode pooler or a hot standby?)"
    )]
    ProbeLost(Duration),
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

/// Runs until shutdown, reconnecting as needed.
pub async fn run(
    config: ListenerConfig,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    listening: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let result = session(&config, &hub, &metrics, &listening, &shutdown, &mut backoff).await;
        listening.send_replace(false);
        metrics.listening.store(0, Relaxed);
        if shutdown.is_cancelled() {
            return;
        }
        let jittered = backoff.mul_f64(rand::rng().random_range(0.5..1.5));
        match result {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = jittered.as_millis() as u64, "LISTEN connection lost; polling the event log until it is back")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(jittered) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection's life: connect, LISTEN, prove, then serve notices and
/// re-prove periodically until it fails. `Ok` only on shutdown.
async fn session(
    config: &ListenerConfig,
    hub: &Arc<Hub>,
    metrics: &Arc<Metrics>,
    listening: &watch::Sender<bool>,
    shutdown: &CancellationToken,
    backoff: &mut Duration,
) -> Result<(), SessionEnd> {
    let pg = connect::listen_config(&config.database_url).map_err(SessionEnd::Config)?;
    let (client, mut connection) = pg.connect(NoTls).await.map_err(SessionEnd::Connect)?;

    let probe_channel = format!(
        "pgrelay_probe_{}_{:08x}",
        std::process::id(),
        rand::rng().random::<u32>()
    );
    let (probe_tx, mut probe_rx) = mpsc::unbounded_channel::<String>();
    let driver = {
        let hub = hub.clone();
        let metrics = metrics.clone();
        let channel = config.channel.clone();
        let probe_channel = probe_channel.clone();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) if n.channel() == probe_channel => {
                        let _ = probe_tx.send(n.payload().to_string());
                    }
                    Ok(AsyncMessage::Notification(n)) if n.channel() == channel => {
                        on_notice(n.payload(), &hub, &metrics);
                    }
                    Ok(_) => {}
                    Err(e) => return e.to_string(),
                }
            }
            "end of stream".to_string()
        })
    };
    let mut driver = std::pin::pin!(driver);

    let listen = format!(
        "LISTEN {}; LISTEN {}",
        quote_ident(&config.channel),
        quote_ident(&probe_channel)
    );
    tokio::time::timeout(PROBE_TIMEOUT, client.batch_execute(&listen))
        .await
        .map_err(|_| SessionEnd::ProbeLost(PROBE_TIMEOUT))?
        .map_err(SessionEnd::Command)?;

    // The triggers ring the channel the database is configured with; a
    // relay listening elsewhere would only ever poll. Say so loudly.
    if let Ok(Ok(row)) = tokio::time::timeout(
        PROBE_TIMEOUT,
        client.query_one("SELECT relay.channel()", &[]),
    )
    .await
    {
        let db_channel: String = row.get(0);
        if db_channel != config.channel {
            tracing::error!(relay_channel = %config.channel, database_channel = %db_channel,
                "the capture triggers notify another channel than the relay listens on; set PGRELAY_CHANNEL to match");
        }
    }

    let mut nonce = 0u64;
    loop {
        nonce += 1;
        let payload = nonce.to_string();
        // Bounded: on a half-open connection the send itself can hang.
        tokio::time::timeout(
            PROBE_TIMEOUT,
            client.execute("SELECT pg_notify($1, $2)", &[&probe_channel, &payload]),
        )
        .await
        .map_err(|_| SessionEnd::ProbeLost(PROBE_TIMEOUT))?
        .map_err(SessionEnd::Command)?;
        let proven = tokio::time::timeout(PROBE_TIMEOUT, async {
            while let Some(p) = probe_rx.recv().await {
                if p == payload {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if !proven {
            return Err(SessionEnd::ProbeLost(PROBE_TIMEOUT));
        }
        if nonce == 1 {
            // Proven: trust it, and fill whatever was missed while down.
            *backoff = BACKOFF_MIN;
            metrics.listener_reconnects.fetch_add(1, Relaxed);
            metrics.listening.store(1, Relaxed);
            listening.send_replace(true);
            hub.resync_all();
            tracing::info!(channel = %config.channel, "listening");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            ended = &mut driver => {
                return Err(SessionEnd::Closed(ended.unwrap_or_else(|e| e.to_string())));
            }
            _ = tokio::time::sleep(config.probe_interval) => {}
        }
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

//! The signal channel (G9): broadcasts and presence diffs between relays,
//! through Postgres.
//!
//! Every relay LISTENs on `relay.signal_channel()` (the capture channel's
//! name + `_signals`) on the connection it already has. A notice there is
//! an envelope, `{"k":"b",..}` for a broadcast or `{"k":"p",..}` for a
//! presence diff (see `migrations/relay/V5__signals.sql`).
//!
//! A client's broadcast goes to one sender task, which sends whatever is
//! waiting in one statement: one transaction, so one turn of the
//! database's NOTIFY commit lock for the lot. Once the database took it,
//! the relay hands it to its own subscribers at once (its echo on the
//! channel is skipped) and acknowledges it when asked; other relays get it
//! from the channel. A broadcast the database refused reaches no one, and
//! its sender is told.
//!
//! Unlike capture notices, which are only hints checked against the event
//! log, a broadcast *is* its notice: a database role that can connect can
//! NOTIFY this channel too (see `docs/security.md`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_postgres::types::Type;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use crate::db::pool::BoundedPool;
use crate::metrics::Metrics;
use crate::relay::hub::Hub;
use crate::relay::mailbox::{Kind, Mailbox};
use crate::relay::presence::{Diff, Presence};
use crate::relay::protocol::{self, code, Broadcast};

/// A NOTIFY payload stops at 7,999 bytes.
pub const MAX_NOTICE_BYTES: usize = 7_999;
/// Broadcasts waiting for the database, relay-wide; past this a broadcast
/// is refused (`unavailable`), never queued without bound.
const MAX_WAITING: usize = 4_096;
/// Broadcasts sent in one statement.
const MAX_BATCH: usize = 256;

/// The signal channel's name for a capture channel (as
/// `relay.signal_channel()` derives it).
pub fn channel_for(capture_channel: &str) -> String {
    format!("{capture_channel}_signals")
}

/// Why a broadcast was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Too many broadcasts wait for the database.
    Busy,
    /// The envelope would not fit in a NOTIFY payload.
    TooLarge,
}

/// A broadcast on its way to the database.
pub struct Outgoing {
    scope: Arc<str>,
    envelope: String,
    /// The client frame, shared by every local recipient.
    frame: Utf8Bytes,
    sender: Arc<Mailbox>,
    echo: bool,
    id: Option<String>,
}

/// Both directions of the signal channel, for one relay.
pub struct Signals {
    channel: String,
    hub: Arc<Hub>,
    presence: Arc<Presence>,
    metrics: Arc<Metrics>,
    outgoing: mpsc::Sender<Outgoing>,
    /// Makes every envelope unique: NOTIFY folds identical payloads of one
    /// transaction into one.
    nonce: AtomicU64,
}

/// What arrives on the channel; the fields of both kinds.
#[derive(Deserialize)]
struct Envelope<'a> {
    k: &'a str,
    s: String,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    f: Option<String>,
    #[serde(default, borrow)]
    p: Option<&'a RawValue>,
    /// The relay that sent a broadcast (none from SQL).
    #[serde(default)]
    r: Option<&'a str>,
    #[serde(default)]
    c: Option<String>,
    #[serde(default)]
    u: Option<String>,
    #[serde(default)]
    v: Option<i64>,
    #[serde(default, borrow)]
    st: Option<&'a RawValue>,
}

impl Signals {
    pub fn new(
        capture_channel: &str,
        hub: Arc<Hub>,
        presence: Arc<Presence>,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, mpsc::Receiver<Outgoing>) {
        let (outgoing, rx) = mpsc::channel(MAX_WAITING);
        let signals = Arc::new(Signals {
            channel: channel_for(capture_channel),
            hub,
            presence,
            metrics,
            outgoing,
            nonce: AtomicU64::new(0),
        });
        (signals, rx)
    }

    pub fn presence(&self) -> &Presence {
        &self.presence
    }

    /// The channel this relay LISTENs on for signals.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Queues a client's broadcast, stamped with `from` (the token's user).
    pub fn broadcast(
        &self,
        broadcast: Broadcast,
        from: &str,
        sender: &Arc<Mailbox>,
    ) -> Result<(), Refused> {
        let quote = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        let envelope = format!(
            r#"{{"k":"b","s":{},"e":{},"f":{},"p":{},"r":{},"n":{}}}"#,
            quote(&broadcast.scope),
            quote(&broadcast.event),
            quote(from),
            broadcast.payload,
            quote(self.presence.relay_id()),
            self.nonce.fetch_add(1, Relaxed)
        );
        if envelope.len() > MAX_NOTICE_BYTES {
            return Err(Refused::TooLarge);
        }
        let frame = protocol::broadcast_frame(
            &broadcast.scope,
            &broadcast.event,
            Some(from),
            &broadcast.payload,
        );
        self.outgoing
            .try_send(Outgoing {
                scope: Arc::from(broadcast.scope),
                envelope,
                frame: Utf8Bytes::from(frame),
                sender: sender.clone(),
                echo: broadcast.echo,
                id: broadcast.id,
            })
            .map_err(|_| Refused::Busy)
    }

    /// Sends queued broadcasts to the database, many per statement, until
    /// shutdown.
    pub async fn run_sender(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Outgoing>,
        pool: BoundedPool,
        shutdown: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                first = rx.recv() => first,
            };
            let Some(first) = first else { return };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let envelopes: Vec<&str> = batch.iter().map(|o| o.envelope.as_str()).collect();
            let sent = pool
                .query(
                    "SELECT count(pg_notify($1, e)) FROM unnest($2::text[]) AS e",
                    &[(&self.channel, Type::TEXT), (&envelopes, Type::TEXT_ARRAY)],
                )
                .await;
            match sent {
                Ok(_) => {
                    for out in batch.drain(..) {
                        self.metrics.signals.broadcasts_in.fetch_add(1, Relaxed);
                        let except = (!out.echo).then_some(out.sender.conn);
                        self.deliver(&out.scope, out.frame, except);
                        if let Some(id) = &out.id {
                            let ack = protocol::broadcast_ack_frame(&out.scope, id);
                            out.sender
                                .push(&out.scope, Kind::Reply, Utf8Bytes::from(ack));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, broadcasts = batch.len(), "sending broadcasts failed; their senders are told");
                    for out in batch.drain(..) {
                        self.metrics
                            .signals
                            .broadcasts_refused
                            .fetch_add(1, Relaxed);
                        let frame = protocol::signal_error_frame(
                            code::UNAVAILABLE,
                            "database unavailable; this broadcast reached no one",
                            "broadcast",
                            &out.scope,
                            out.id.as_deref(),
                        );
                        out.sender
                            .push(&out.scope, Kind::Reply, Utf8Bytes::from(frame));
                    }
                }
            }
        }
    }

    /// A notice on the signal channel.
    pub fn on_notice(&self, payload: &str) {
        self.metrics.signals.signal_notices.fetch_add(1, Relaxed);
        let envelope = match serde_json::from_str::<Envelope>(payload) {
            Ok(envelope) if !envelope.s.is_empty() => envelope,
            _ => {
                self.metrics.foreign_notices.fetch_add(1, Relaxed);
                tracing::debug!(bytes = payload.len(), "ignoring a malformed signal notice");
                return;
            }
        };
        match (envelope.k, envelope) {
            ("b", Envelope { r: Some(r), .. }) if r == self.presence.relay_id() => {
                // Ours: delivered here when the database took it.
            }
            (
                "b",
                Envelope {
                    s,
                    e: Some(e),
                    f,
                    p,
                    ..
                },
            ) => {
                let payload = p.map_or("null", RawValue::get);
                let frame = protocol::broadcast_frame(&s, &e, f.as_deref(), payload);
                self.deliver(&s, Utf8Bytes::from(frame), None);
            }
            (
                "p",
                Envelope {
                    s,
                    c: Some(connection),
                    u: Some(user),
                    v: Some(version),
                    st,
                    ..
                },
            ) => self.presence.on_diff(Diff {
                scope: s,
                connection,
                user,
                version,
                state: st.map(|st| st.get().to_string()),
            }),
            _ => {
                self.metrics.foreign_notices.fetch_add(1, Relaxed);
                tracing::debug!(
                    bytes = payload.len(),
                    "ignoring a signal notice of no known kind"
                );
            }
        }
    }

    fn deliver(&self, scope: &str, frame: Utf8Bytes, except: Option<u64>) {
        let (_, dropped) = self.hub.broadcast(scope, frame, except);
        if dropped > 0 {
            self.metrics
                .signals
                .broadcasts_dropped
                .fetch_add(dropped, Relaxed);
        }
    }
}

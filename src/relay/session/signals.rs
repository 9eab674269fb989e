//! A session's part in ephemeral signals (G9): the broadcasts and presence
//! changes it sends, checked here (a subscription of the scope, the
//! project's rate), and the signals its mailbox holds for it, written
//! while the socket takes them.
//!
//! Only a connection subscribed to a scope may signal in it or receive its
//! signals, so the subscription's checks (the rule at subscribe,
//! revocation, `authorize_failed`) hold for signals too: a subscription
//! that ends takes its presence and its mailbox entries with it.

use std::sync::atomic::Ordering::Relaxed;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;

use super::delivery::Step;
use super::socket::{End, Out};
use super::Session;
use crate::relay::mailbox::{Kind, Signal};
use crate::relay::protocol::{self, code, Broadcast};
use crate::relay::signal::Refused;

impl Session {
    /// `{"action":"broadcast",..}`: stamped with this connection's user and
    /// handed to the signal channel; the sender hears back only on error,
    /// or with `broadcast_ack` when it gave an `id`.
    pub(super) async fn broadcast<S>(
        &mut self,
        broadcast: Broadcast,
        out: &mut Out<S>,
    ) -> Result<(), End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let refusal = match self.subs.get(broadcast.scope.as_str()) {
            None => Some((
                code::NOT_SUBSCRIBED,
                "subscribe to this project before broadcasting to it",
            )),
            Some(sub) if !sub.topic.take_signal() => Some((
                code::RATE_LIMITED,
                "this project's broadcasts and presence changes are over their rate; this one was dropped",
            )),
            Some(_) => None,
        };
        let refusal = refusal.or_else(|| {
            match self.ctx.signals.broadcast(
                broadcast.clone(),
                &self.identity.user_id,
                &self.mailbox,
            ) {
                Ok(()) => None,
                Err(Refused::Busy) => Some((
                    code::UNAVAILABLE,
                    "too many broadcasts wait for the database; retry shortly",
                )),
                Err(Refused::TooLarge) => Some((
                    code::TOO_LARGE,
                    "this broadcast does not fit in a NOTIFY payload (7999 bytes with its envelope)",
                )),
            }
        });
        let Some((code, message)) = refusal else {
            return Ok(());
        };
        self.ctx.metrics.client_errors.fetch_add(1, Relaxed);
        self.ctx
            .metrics
            .signals
            .broadcasts_refused
            .fetch_add(1, Relaxed);
        out.text(protocol::signal_error_frame(
            code,
            message,
            "broadcast",
            &broadcast.scope,
            broadcast.id.as_deref(),
        ))
        .await
    }

    /// `{"action":"presence",..}` (a state: join or update) and
    /// `{"action":"presence_leave",..}` (`None`). Answered with
    /// `presence_joined` / `presence_left` once the database holds it.
    pub(super) async fn set_presence<S>(
        &mut self,
        scope: String,
        state: Option<String>,
        out: &mut Out<S>,
    ) -> Result<(), End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let action = if state.is_some() {
            "presence"
        } else {
            "presence_leave"
        };
        let refusal = match self.subs.get_mut(scope.as_str()) {
            None => Some((
                code::NOT_SUBSCRIBED,
                "subscribe to this project before joining its presence",
            )),
            // Leaving what one is not in costs nothing and is no error.
            Some(sub) if state.is_none() && !sub.present => {
                let frame = protocol::presence_left_frame(&scope);
                return out.text(frame).await;
            }
            Some(sub) if !sub.topic.take_signal() => Some((
                code::RATE_LIMITED,
                "this project's broadcasts and presence changes are over their rate; this change was dropped",
            )),
            Some(sub) => {
                sub.present = state.is_some();
                None
            }
        };
        if let Some((code, message)) = refusal {
            self.ctx.metrics.client_errors.fetch_add(1, Relaxed);
            let frame = protocol::signal_error_frame(code, message, action, &scope, None);
            return out.text(frame).await;
        }
        self.ctx.signals.presence().set(
            &scope,
            self.mailbox.conn,
            &self.identity.user_id,
            state,
            Some(self.mailbox.clone()),
        );
        Ok(())
    }

    /// Writes what the mailbox holds while the socket takes it. A signal
    /// for a scope this connection no longer subscribes to (or no longer
    /// watches the presence of) is let go; so is one for a subscription
    /// that waits for its rule to be asked again (G4).
    pub(super) async fn write_signals<S>(&mut self, out: &mut Out<S>) -> Result<Step, End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        while let Some(signal) = self.mailbox.pop() {
            let bytes = match &signal {
                Signal::Frame {
                    kind: Kind::Reply,
                    bytes,
                    ..
                } => bytes.clone(),
                Signal::Frame { scope, kind, bytes } => {
                    let Some(sub) = self.subs.get_mut(scope.as_ref()) else {
                        continue;
                    };
                    if *kind == Kind::Presence && !sub.watches_presence {
                        continue;
                    }
                    if sub.recheck {
                        match kind {
                            Kind::Broadcast => {
                                self.ctx
                                    .metrics
                                    .signals
                                    .broadcasts_dropped
                                    .fetch_add(1, Relaxed);
                            }
                            // A snapshot follows the re-check, if it passes.
                            _ => sub.presence_missed = true,
                        }
                        continue;
                    }
                    bytes.clone()
                }
                Signal::PresenceResync { scope } => {
                    if !self
                        .subs
                        .get(scope.as_ref())
                        .is_some_and(|s| s.watches_presence)
                    {
                        continue;
                    }
                    match self.ctx.signals.presence().snapshot_frame(scope) {
                        Some(bytes) => bytes,
                        // Loading: the load sends one.
                        None => continue,
                    }
                }
            };
            let broadcast = matches!(
                signal,
                Signal::Frame {
                    kind: Kind::Broadcast,
                    ..
                }
            );
            if !out.try_feed(Message::Text(bytes)).await? {
                self.mailbox.unpop(signal);
                return Ok(Step::SocketFull);
            }
            if broadcast {
                self.ctx
                    .metrics
                    .signals
                    .broadcasts_out
                    .fetch_add(1, Relaxed);
            }
        }
        Ok(Step::Idle)
    }
}

//! Subscribing and unsubscribing: where a subscription starts (its
//! cursor, and the `reset` it starts with), and what ending one lets go of.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::delivery::ReadSize;
use super::socket::{End, Out};
use super::{outcome_for, Session, Subscription};
use crate::relay::log::{Cursor, LogError, ScopeState};
use crate::relay::protocol::{self, code, reset_reason};

impl Session {
    pub(super) async fn subscribe<S>(
        &mut self,
        scope: String,
        since: Option<Cursor>,
        watch_presence: bool,
        resources: Option<Vec<String>>,
        out: &mut Out<S>,
    ) -> Result<(), End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let error = |code: &str, message: &str| {
            protocol::error_frame(code, message, Some("subscribe"), Some(&scope))
        };
        if !self.subs.contains_key(scope.as_str())
            && self.subs.len() >= self.ctx.limits.max_subscriptions
        {
            self.ctx.metrics.client_errors.fetch_add(1, Relaxed);
            let frame = error(
                code::TOO_MANY_SUBSCRIPTIONS,
                "subscription limit of this connection reached",
            );
            return out.text(frame).await;
        }
        // The state is read before authorizing: a revocation committed after
        // the state was read has a higher seq, so it reaches this client
        // and triggers a re-check; one committed before is seen by
        // authorize. (The other order would let a revocation fall between
        // the two and be skipped: G4.)
        //
        // The generation is read before the state: a connection loss after it makes the new
        // topic (if any) suspect until the fetcher has checked it (G8).
        let generation = self.ctx.hub.generation();
        let checked = async {
            let _permit = self.ctx.backfills.acquire().await;
            let state = self.ctx.log.scope_state(&scope).await?;
            let verdict = self.authorize(std::slice::from_ref(&scope)).await?;
            let tracked = match resources {
                Some(_) => self.ctx.log.tracked_resources().await?,
                None => Vec::new(),
            };
            Ok::<_, LogError>((state, verdict, tracked))
        }
        .await;
        let (state, tracked) = match checked {
            Ok((state, verdicts, tracked)) => match outcome_for(&verdicts, &scope) {
                Ok(true) => (state, tracked),
                Ok(false) => {
                    // Refused now: whatever was allowed before ends too.
                    if let Some(old) = self.subs.remove(scope.as_str()) {
                        self.drop_subscription(*old);
                    }
                    self.ctx.metrics.client_errors.fetch_add(1, Relaxed);
                    let frame = error(code::FORBIDDEN, "not a member of this project");
                    return out.text(frame).await;
                }
                Err(failure) => {
                    self.end_for_failed_rule(&scope, &failure, out).await?;
                    return out.flush().await;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "subscribe could not reach the database");
                let frame = error(code::UNAVAILABLE, "database unavailable; retry shortly");
                return out.text(frame).await;
            }
        };
        // Re-subscribing replaces the old cursor; the connection stays in
        // the scope's presence.
        let mut present = false;
        if let Some(mut old) = self.subs.remove(scope.as_str()) {
            present = std::mem::take(&mut old.present);
            self.drop_subscription(*old);
        }
        let (topic, id, epoch) =
            self.ctx
                .hub
                .subscribe(&scope, state.latest(), generation, self.mailbox.clone());
        self.ctx.metrics.subscriptions.fetch_add(1, Relaxed);
        let (cursor, reset) = resume_from(since, &state);
        // The latest event was just read from the log; a client's cursor
        // is checked by its first read.
        let checked_in = (cursor == state.latest()).then_some(generation);
        self.subs.insert(
            Arc::from(scope.as_str()),
            Box::new(Subscription {
                topic,
                id,
                cursor,
                epoch,
                checked_in,
                catching_up: false,
                recheck: false,
                read_size: ReadSize::new(),
                watches_presence: watch_presence,
                present,
                presence_missed: false,
                filter: resources.clone(),
                skip_from: None,
            }),
        );
        let subscribed = match &resources {
            Some(resources) => {
                let untracked: Vec<String> = resources
                    .iter()
                    .filter(|r| !tracked.contains(r))
                    .cloned()
                    .collect();
                protocol::subscribed_filtered_frame(&scope, state.latest(), resources, &untracked)
            }
            None => protocol::subscribed_frame(&scope, state.latest()),
        };
        out.text(subscribed).await?;
        if let Some(reason) = reset {
            self.ctx.metrics.reset_sent(reason);
            out.text(protocol::reset_frame(&scope, state.latest(), reason))
                .await?;
        }
        if watch_presence {
            // The snapshot follows `subscribed` through the mailbox.
            self.ctx
                .signals
                .presence()
                .watch(&scope, id, self.mailbox.clone());
        }
        self.mailbox.wake();
        Ok(())
    }

    pub(super) fn drop_subscription(&self, sub: Subscription) {
        if sub.catching_up {
            self.ctx.metrics.catchup_subscribers.fetch_sub(1, Relaxed);
        }
        self.ctx.hub.unsubscribe(&sub.topic, sub.id);
        self.ctx.metrics.subscriptions.fetch_sub(1, Relaxed);
        let presence = self.ctx.signals.presence();
        if sub.watches_presence {
            presence.unwatch(sub.topic.scope(), sub.id);
        }
        if sub.present {
            // Unsubscribed, revoked, refused or disconnected: gone for
            // everyone.
            presence.set(
                sub.topic.scope(),
                self.mailbox.conn,
                &self.identity.user_id,
                None,
                None,
            );
        }
    }

    pub(super) fn unsubscribe_all(&mut self) {
        for (_, sub) in std::mem::take(&mut self.subs) {
            self.drop_subscription(*sub);
        }
    }
}

/// Where a subscription starts, and the `reset` it starts with, if any:
/// from the latest event without `since`; from the client's cursor when the
/// log can continue it (the first read checks that the log holds the event
/// the cursor names); else from the latest event after a `reset`.
pub(super) fn resume_from(
    since: Option<Cursor>,
    state: &ScopeState,
) -> (Cursor, Option<&'static str>) {
    let Some(since) = since else {
        return (state.latest(), None);
    };
    if since.seq > state.latest_seq {
        // Beyond anything the log holds: with a named event, history this
        // client saw was lost; with a bare seq we can only say it is ahead.
        let reason = if since.time_us.is_some() {
            reset_reason::HISTORY_DIVERGED
        } else {
            reset_reason::SEQ_AHEAD
        };
        return (state.latest(), Some(reason));
    }
    if since.seq < state.trimmed_through {
        return (state.latest(), Some(reset_reason::HISTORY_TRIMMED));
    }
    if since.seq == state.latest_seq && !since.names(state.latest_seq, state.latest_time_us) {
        return (state.latest(), Some(reset_reason::HISTORY_DIVERGED));
    }
    (since, None)
}

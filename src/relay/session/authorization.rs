//! Who may read a subscription (G4): the app's rule asked at subscribe,
//! after every membership event, and on a schedule; a rule that fails or
//! runs too long ends that subscription only.

use std::sync::atomic::Ordering::Relaxed;

use tokio::io::{AsyncRead, AsyncWrite};

use super::socket::{text, End, Out};
use super::Session;
use crate::metrics::RecheckCause;
use crate::relay::log::{LogError, Verdict};
use crate::relay::protocol::{self, code};

impl Session {
    /// Asks the app's rule about `scopes` for this session's user.
    pub(super) async fn authorize(&self, scopes: &[String]) -> Result<Vec<Verdict>, LogError> {
        self.ctx
            .log
            .authorize_each(
                &self.identity.user_id,
                scopes,
                self.ctx.limits.authorize_timeout,
            )
            .await
    }

    /// The scheduled re-check of every subscription (G4's safety net for
    /// rules that read tables nobody tracks): one query for all of this
    /// session's scopes. A database error changes nothing; the next period
    /// tries again.
    pub(super) async fn reauthorize_all<S>(&mut self, out: &mut Out<S>) -> Result<(), End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if self.subs.is_empty() {
            return Ok(());
        }
        let scopes: Vec<String> = self.subs.keys().map(|k| k.to_string()).collect();
        self.ctx
            .metrics
            .reauthorized(RecheckCause::Schedule, scopes.len());
        let verdicts = {
            let _permit = self.ctx.backfills.acquire().await;
            self.authorize(&scopes).await
        };
        let verdicts = match verdicts {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "scheduled re-authorization could not reach the database");
                return Ok(());
            }
        };
        for scope in &scopes {
            let outcome = outcome_for(&verdicts, scope);
            self.apply_verdict(scope, outcome, RecheckCause::Schedule, out)
                .await?;
        }
        out.flush().await
    }

    /// Acts on a re-check: keeps the subscription (true), or ends it with
    /// the frame that says why (false).
    pub(super) async fn apply_verdict<S>(
        &mut self,
        scope: &str,
        outcome: Result<bool, String>,
        cause: RecheckCause,
        out: &mut Out<S>,
    ) -> Result<bool, End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match outcome {
            Ok(true) => Ok(true),
            Ok(false) => {
                if let Some(sub) = self.subs.remove(scope) {
                    self.drop_subscription(*sub);
                }
                self.ctx.metrics.revoked(cause);
                let frame = protocol::error_frame(
                    code::FORBIDDEN,
                    "membership revoked; this subscription has ended",
                    Some("subscribe"),
                    Some(scope),
                );
                out.feed(text(frame)).await?;
                Ok(false)
            }
            Err(failure) => {
                self.end_for_failed_rule(scope, &failure, out).await?;
                Ok(false)
            }
        }
    }

    /// The app's rule raised or ran too long for this user and scope: that
    /// subscription ends (G4: a failing rule stays local); nothing else
    /// does. The rule's own message is logged, not sent: it may name
    /// tables or data the client should not see.
    pub(super) async fn end_for_failed_rule<S>(
        &mut self,
        scope: &str,
        failure: &str,
        out: &mut Out<S>,
    ) -> Result<(), End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if let Some(sub) = self.subs.remove(scope) {
            self.drop_subscription(*sub);
        }
        self.ctx.metrics.authorize_failures.fetch_add(1, Relaxed);
        tracing::warn!(
            user = %self.identity.user_id,
            scope,
            failure,
            "relay.authorize failed; this subscription has ended"
        );
        let frame = protocol::error_frame(
            code::AUTHORIZE_FAILED,
            "the authorization rule failed for this project; this subscription has ended",
            Some("subscribe"),
            Some(scope),
        );
        out.feed(text(frame)).await
    }
}

/// The outcome for `scope` among `verdicts`; a scope the database did not
/// answer for is a failure, never an allowance.
pub(super) fn outcome_for(verdicts: &[Verdict], scope: &str) -> Result<bool, String> {
    verdicts
        .iter()
        .find(|v| v.scope == scope)
        .map(|v| v.outcome.clone())
        .unwrap_or_else(|| Err("no verdict for this scope".into()))
}

//! Notices: LISTEN proven from another session (a transaction-mode pooler
//! or a standby on the LISTEN path passes a connection's own notices and
//! drops everyone else's), and the cluster's notice queue, which a session
//! that LISTENs and never reads (one left idle in a transaction) fills
//! until every notifying commit fails.

use std::time::Duration;

use super::{Check, Probe, Status};
use crate::db::redact::redact;
use crate::relay::listener::{self, ProofError, POOLER_ADVICE};

pub(super) async fn listen(probe: &Probe<'_>) -> Check {
    let relay = &probe.config.relay;
    let url = relay.session_database_url();
    let which = if relay.listen_database_url.is_some() {
        "PGRELAY_LISTEN_DATABASE_URL"
    } else {
        "DATABASE_URL"
    };
    let wait = probe.config.listen_timeout;
    match listener::prove_once(url, &probe.log, wait).await {
        Ok(took) => Check::ok(
            "listen",
            format!(
                "a NOTIFY from another session reached a LISTEN connection to {which} ({}) in {:.1} ms",
                redact(url),
                took.as_secs_f64() * 1000.0
            ),
        ),
        Err(ProofError::Lost(_)) => Check::fail(
            "listen",
            format!(
                "a NOTIFY sent from another session did not reach a LISTEN connection to {which} ({}) within \
                 {wait:?}: the relay would poll instead of listening. {POOLER_ADVICE}",
                redact(url)
            ),
            if relay.listen_database_url.is_some() {
                "point PGRELAY_LISTEN_DATABASE_URL at the primary directly (or at a session-mode pooler)"
                    .to_string()
            } else {
                "PGRELAY_LISTEN_DATABASE_URL=postgresql://<role>@<primary host>:5432/<db>   \
                 (a direct connection, or a session-mode pooler; DATABASE_URL may stay on the pooler \
                 with PGRELAY_TRANSACTION_POOLER=true)"
                    .to_string()
            },
        ),
        Err(e) => Check::fail(
            "listen",
            format!("cannot prove LISTEN on {which} ({}): {e}", redact(url), e = super::why(&e)),
            format!("check {which}"),
        ),
    }
}

/// Sessions that may hold the queue: idle in a transaction (a backend in
/// a transaction does not read its notices) or blocked writing to a client
/// that does not read.
const SUSPECTS: &str = "SELECT pid, coalesce(usename::text, ''), coalesce(application_name, ''), \
        coalesce(datname::text, ''), coalesce(state, ''), \
        coalesce(extract(epoch FROM now() - coalesce(xact_start, state_change)), 0)::float8 \
     FROM pg_stat_activity \
     WHERE pid <> pg_backend_pid() AND backend_type = 'client backend' \
       AND (state LIKE 'idle in transaction%' OR wait_event = 'ClientWrite') \
     ORDER BY coalesce(xact_start, state_change) NULLS LAST LIMIT 3";

pub(super) async fn queue(probe: &Probe<'_>) -> Check {
    let usage = match probe.log.notification_queue_usage().await {
        Ok(u) => u,
        Err(e) => {
            return Check::fail(
                "notice queue",
                format!(
                    "cannot read pg_notification_queue_usage(): {e}",
                    e = super::why(&e)
                ),
                "check DATABASE_URL",
            )
        }
    };
    let warn_at = probe.config.queue_warn;
    let fail_at = warn_at.max(0.5);
    let percent = |u: f64| format!("{:.4}%", u * 100.0);
    let status = if usage >= fail_at {
        Status::Fail
    } else if usage >= warn_at {
        Status::Warn
    } else {
        Status::Ok
    };
    if status == Status::Ok {
        return Check::ok(
            "notice queue",
            format!(
                "{} of the notice queue in use (warns from {})",
                percent(usage),
                percent(warn_at)
            ),
        );
    }
    let suspects = probe.query(SUSPECTS, &[]).await.unwrap_or_default();
    let mut fix: Vec<String> = suspects
        .iter()
        .map(|r| {
            let pid: i32 = r.get(0);
            let user: String = r.get(1);
            let app: String = r.get(2);
            let db: String = r.get(3);
            let state: String = r.get(4);
            let secs: f64 = r.get(5);
            format!(
                "SELECT pg_terminate_backend({pid});   -- {user} {app:?} on {db}, {} for {:?}",
                if state.is_empty() {
                    "waiting on its client"
                } else {
                    &state
                },
                Duration::from_secs(secs.max(0.0) as u64)
            )
        })
        .collect();
    fix.push(
        "find the session that LISTENs and does not read: SELECT pid, usename, application_name, state, xact_start \
         FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' OR wait_event = 'ClientWrite' ORDER BY \
         xact_start; end its transaction or the session (the queue drains as the next notices are sent)"
            .to_string(),
    );
    Check {
        name: "notice queue".into(),
        status,
        summary: format!(
            "{} of the notice queue in use (warn from {}, fail from {}): a session that LISTENs is not reading, \
             and when the queue is full every notifying commit fails",
            percent(usage),
            percent(warn_at),
            percent(fail_at)
        ),
        fix: Some(fix.join("\n")),
    }
}

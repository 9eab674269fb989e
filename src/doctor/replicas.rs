//! Each read replica (`PGRELAY_READ_REPLICA_URLS`): reachable, a standby,
//! streaming, and seen streaming by the relay's role. The relay reads a
//! standby only while it sees its WAL receiver stream, and that status is
//! visible only to roles with the privileges of `pg_read_all_stats`: a
//! standby without it is configured and never used.

use super::{ident, Check, Probe};
use crate::db::connect::{self, PoolOptions};
use crate::db::pool::Statements;
use crate::db::redact::redact;
use crate::relay::log::{standby_state, StandbyState};

pub(super) async fn check(probe: &Probe<'_>) -> Vec<Check> {
    let relay = &probe.config.relay;
    let statements = if relay.transaction_pooler {
        Statements::Unnamed
    } else {
        Statements::Prepared
    };
    let mut checks = Vec::new();
    for (i, url) in relay.replica_urls.iter().enumerate() {
        let name = format!("replica {}", i + 1);
        let shown = redact(url);
        let pool = match connect::pool(
            url,
            &PoolOptions {
                name: name.clone(),
                size: 1,
                query_timeout: relay.query_timeout,
                statements,
            },
        ) {
            Ok(pool) => pool,
            Err(e) => {
                checks.push(Check::fail(
                    name,
                    format!("{shown}: {e}", e = super::why(&e)),
                    "fix this entry of PGRELAY_READ_REPLICA_URLS",
                ));
                continue;
            }
        };
        let state = standby_state(&pool).await;
        let role = pool
            .query_one("SELECT current_user::text", &[])
            .await
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_else(|_| "<the relay's role>".into());
        checks.push(match state {
            Err(e) => Check::fail(
                name,
                format!("{shown} is unreachable: {e}; the primary serves every read", e = super::why(&e)),
                "check this entry of PGRELAY_READ_REPLICA_URLS, the standby and the network to it",
            ),
            Ok(StandbyState::NotInRecovery) => Check::fail(
                name,
                format!("{shown} is not a standby (not in recovery): a promoted or unrelated server"),
                "remove it from PGRELAY_READ_REPLICA_URLS, or point the entry at a hot standby of the primary",
            ),
            Ok(StandbyState::Hidden) => Check::warn(
                name,
                format!(
                    "{shown} is a standby, but role {role} cannot see whether it streams (pg_stat_wal_receiver needs \
                     pg_read_all_stats): the relay never reads it"
                ),
                format!("GRANT pg_read_all_stats TO {};   -- on the primary", ident(&role)),
            ),
            Ok(StandbyState::NotStreaming(status)) => Check::warn(
                name,
                format!(
                    "{shown} is a standby whose WAL receiver is {}: the relay reads the primary instead",
                    status.as_deref().unwrap_or("not running")
                ),
                "check primary_conninfo on the standby and its log; SELECT * FROM pg_stat_replication on the primary",
            ),
            Ok(StandbyState::Streaming) => Check::ok(
                name,
                format!("{shown} is a standby, streaming, and role {role} sees it"),
            ),
        });
    }
    checks
}

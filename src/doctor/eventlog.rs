//! The event log: its size, its oldest event, and whether retention is
//! configured and running (some relay holds the trim lock). The oldest
//! event is found per scope through the primary key, as `relay.trim`
//! reads, never by scanning the log.

use std::time::Duration;

use tokio_postgres::types::Type;

use super::{Check, Probe};
use crate::retention::{OLDEST_EVENT_AGE_SQL, TRIM_LOCK};

pub(super) async fn check(probe: &Probe<'_>) -> Check {
    let rows = match probe
        .query(
            "SELECT pg_total_relation_size('relay.events'), \
                    coalesce((SELECT n_live_tup FROM pg_stat_all_tables \
                              WHERE relid = 'relay.events'::regclass), 0)::float8, \
                    (SELECT count(*) FROM relay.scope_counter)",
            &[],
        )
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            return Check::fail(
                "event log",
                format!("cannot read the event log: {e}", e = super::why(&e)),
                "see the grants check",
            )
        }
    };
    let Some(row) = rows.first() else {
        return Check::fail("event log", "no answer", "check DATABASE_URL");
    };
    let bytes: i64 = row.get(0);
    let live: f64 = row.get(1);
    let scopes: i64 = row.get(2);
    // The relay's own query for pgrelay_oldest_event_age_seconds: one
    // lookup per scope, so on a very large number of scopes it may miss
    // the query timeout; the check then says so instead of failing.
    let oldest = match probe.query(OLDEST_EVENT_AGE_SQL, &[]).await {
        Ok(rows) => match rows.first().and_then(|r| r.get::<_, Option<f64>>(0)) {
            Some(secs) => format!(
                "oldest {} old",
                age(Duration::from_secs(secs.max(0.0) as u64))
            ),
            None => "no event".to_string(),
        },
        Err(e) => format!("oldest not read ({e})", e = super::why(&e)),
    };
    let facts = format!(
        "{:.1} MiB, about {} live events in {scopes} scope(s), {oldest}",
        bytes as f64 / (1 << 20) as f64,
        live as u64,
    );
    let Some(retention) = &probe.config.relay.retention else {
        return Check::warn(
            "event log",
            format!("{facts}; retention is off (PGRELAY_NO_RETENTION): the log grows without bound"),
            "unset PGRELAY_NO_RETENTION on one relay at least (PGRELAY_RETENTION_MIN_AGE, \
             PGRELAY_RETENTION_KEEP_MIN), or trim on a schedule of your own: SELECT relay.trim(1000, '1 day');",
        );
    };
    let classid = (TRIM_LOCK >> 32) as i32;
    let objid = (TRIM_LOCK & 0xffff_ffff) as u32;
    // pg_locks shows oid columns; compare as text to avoid signedness.
    let holder = probe
        .query(
            "SELECT l.pid FROM pg_locks l \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND l.classid::text = $1 AND l.objid::text = $2 LIMIT 1",
            &[
                (&classid.to_string(), Type::TEXT),
                (&objid.to_string(), Type::TEXT),
            ],
        )
        .await;
    let settings = format!(
        "keeps {} per scope and anything younger than {}, runs every {:?}",
        retention.keep_min,
        age(retention.min_age),
        retention.interval
    );
    match holder {
        Ok(rows) if !rows.is_empty() => {
            let pid: i32 = rows[0].get(0);
            Check::ok(
                "event log",
                format!("{facts}; retention {settings}; trimming now from backend {pid}"),
            )
        }
        Ok(_) => Check::warn(
            "event log",
            format!(
                "{facts}; retention is configured ({settings}) but no relay holds the trim lock: no relay runs \
                 against this database, or its retention connection fails"
            ),
            "start a relay (pgrelay serve) with these settings, and see its log for \"trimming the event log failed\"",
        ),
        Err(e) => Check::fail(
            "event log",
            format!("{facts}; cannot read pg_locks: {e}", e = super::why(&e)),
            "check DATABASE_URL",
        ),
    }
}

/// An age as a person says it: `3d 4h`, `12m`, `40s`.
fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_people_say_them() {
        assert_eq!(age(Duration::from_secs(40)), "40s");
        assert_eq!(age(Duration::from_secs(720)), "12m");
        assert_eq!(age(Duration::from_secs(3 * 3600 + 60)), "3h 1m");
        assert_eq!(age(Duration::from_secs(86_400 * 3 + 4 * 3600)), "3d 4h");
    }
}

//! The app's rule, `relay.authorize`: still the engine's deny-all default
//! (every subscribe refused), raising, or slower than the relay waits.
//! It is called once, the way the relay calls it (`relay.authorize_each`
//! through a pool like the relay's, bounded by
//! `PGRELAY_AUTHORIZE_TIMEOUT`), for a user that exists nowhere.

use std::time::{Duration, Instant};

use rand::Rng;

use super::{Check, Probe};

/// The comment the engine's default rule carries (`migrations/relay/V1`).
const DEFAULT_RULE_MARK: &str = "pgrelay default rule: denies everyone";

const RULE_EXAMPLE: &str =
    "CREATE OR REPLACE FUNCTION relay.authorize(user_id text, scope text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT EXISTS (SELECT 1 FROM app.team_members m   -- your membership table
                   WHERE m.team_id::text = authorize.scope
                     AND m.user_id::text = authorize.user_id)
$$;   -- see docs/deploying.md";

pub(super) async fn check(probe: &Probe<'_>) -> Check {
    let source = match probe
        .query(
            // By name in the catalog: a lookup through `relay.` is refused to a
            // role without USAGE on the schema (the grants check says so).
            "SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = 'relay' AND p.proname = 'authorize' \
               AND oidvectortypes(p.proargtypes) = 'text, text'",
            &[],
        )
        .await
    {
        Ok(rows) => rows.first().map(|r| r.get::<_, String>(0)),
        Err(e) => {
            return Check::fail(
                "rule",
                format!("cannot read relay.authorize: {e}", e = super::why(&e)),
                "check DATABASE_URL",
            )
        }
    };
    let Some(source) = source else {
        return Check::fail(
            "rule",
            "relay.authorize(text, text) does not exist: every subscribe fails",
            RULE_EXAMPLE,
        );
    };
    if source.contains(DEFAULT_RULE_MARK) {
        return Check::fail(
            "rule",
            "relay.authorize is still the engine's default, which denies everyone: every subscribe is refused",
            RULE_EXAMPLE,
        );
    }
    let timeout = probe.config.relay.authorize_timeout;
    let user = format!("pgrelay-doctor-{:08x}", rand::rng().random::<u32>());
    // A scope that exists, so the rule runs on real rows; any name will do
    // on an empty log (or when the role may not read the counters).
    let scope = probe
        .query("SELECT scope FROM relay.scope_counter LIMIT 1", &[])
        .await
        .ok()
        .and_then(|rows| rows.first().map(|r| r.get::<_, String>(0)))
        .unwrap_or_else(|| "pgrelay-doctor".to_string());
    let started = Instant::now();
    let verdicts = probe
        .log
        .authorize_each(&user, std::slice::from_ref(&scope), timeout)
        .await;
    let took = started.elapsed();
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    let verdict = match verdicts {
        Ok(mut v) if !v.is_empty() => v.swap_remove(0),
        Ok(_) => {
            return Check::fail(
                "rule",
                "relay.authorize_each answered no row",
                "DATABASE_URL=<owner's url> pgrelay migrate",
            )
        }
        Err(e) => {
            return Check::fail(
                "rule",
                format!("calling relay.authorize failed: {e}", e = super::why(&e)),
                "see the grants check; the relay's role calls relay.authorize_each",
            )
        }
    };
    match verdict.outcome {
        Err(_) if took >= timeout => Check::fail(
            "rule",
            format!(
                "relay.authorize took longer than PGRELAY_AUTHORIZE_TIMEOUT ({timeout:?}) for scope {scope:?}: \
                 subscriptions end with authorize_failed"
            ),
            "make the rule fast (EXPLAIN ANALYZE SELECT relay.authorize('<user>', '<scope>'); index what it reads), \
             or raise PGRELAY_AUTHORIZE_TIMEOUT",
        ),
        Err(failure) if failure.starts_with("42501") => Check::fail(
            "rule",
            format!(
                "relay.authorize raises for scope {scope:?}: {failure}; it runs as the relay's role, which may not \
                 read what the rule reads"
            ),
            "make the rule SECURITY DEFINER (as in docs/deploying.md), or grant the relay's role what it reads \
             (with the chat app: SELECT chat.grant_api('<the relay role>');)",
        ),
        Err(failure) => Check::fail(
            "rule",
            format!(
                "relay.authorize raises for scope {scope:?}: {failure}; those subscriptions end with authorize_failed"
            ),
            format!(
                "fix the function (\\sf relay.authorize in psql shows it); try it with: SELECT relay.authorize({}, {});",
                super::literal(&user),
                super::literal(&scope)
            ),
        ),
        Ok(_) if took * 2 >= timeout => Check::warn(
            "rule",
            format!(
                "relay.authorize took {} for scope {scope:?}, over half of PGRELAY_AUTHORIZE_TIMEOUT ({timeout:?})",
                ms(took)
            ),
            "make the rule faster (EXPLAIN ANALYZE SELECT relay.authorize('<user>', '<scope>')), or raise \
             PGRELAY_AUTHORIZE_TIMEOUT",
        ),
        Ok(true) => Check::warn(
            "rule",
            format!(
                "relay.authorize lets {user:?}, a user that exists nowhere, read scope {scope:?}: any valid \
                 token may read it"
            ),
            "if that is not intended, make the rule check membership (see docs/deploying.md)",
        ),
        Ok(false) => Check::ok(
            "rule",
            format!(
                "relay.authorize is the app's; it refused a made-up user for scope {scope:?} in {}",
                ms(took)
            ),
        ),
    }
}

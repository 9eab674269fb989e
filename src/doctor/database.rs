//! The database itself: reachable and a primary, the engine's migrations
//! against this binary's, the relay role's grants, and the notice channel
//! the triggers ring.

use tokio_postgres::types::{ToSql, Type};

use super::{ident, literal, Check, Probe};
use crate::db::schema;

/// Connects and says who and where; `true` when the `relay` schema exists
/// (the checks that read it run only then).
pub(super) async fn connection(probe: &Probe<'_>) -> (Check, bool) {
    let row = match probe
        .query(
            "SELECT current_setting('server_version'), current_user::text, current_database()::text, \
             pg_is_in_recovery(), to_regnamespace('relay') IS NOT NULL",
            &[],
        )
        .await
    {
        Ok(mut rows) if !rows.is_empty() => rows.swap_remove(0),
        Ok(_) => {
            return (
                Check::fail("database", "the server answered no row", "check DATABASE_URL"),
                false,
            )
        }
        Err(e) => {
            return (
                Check::fail(
                    "database",
                    format!("cannot query: {e}", e = super::why(&e)),
                    "check DATABASE_URL",
                ),
                false,
            )
        }
    };
    let version: String = row.get(0);
    let user: String = row.get(1);
    let db: String = row.get(2);
    let recovering: bool = row.get(3);
    let installed: bool = row.get(4);
    let check = if recovering {
        Check::fail(
            "database",
            format!("DATABASE_URL reaches a standby (PostgreSQL {version}, database {db}): the relay must write presence and be rung by the primary's triggers"),
            "point DATABASE_URL at the primary; name standbys in PGRELAY_READ_REPLICA_URLS",
        )
    } else if !installed {
        Check::fail(
            "database",
            format!("PostgreSQL {version}, database {db} as {user}: there is no `relay` schema"),
            "DATABASE_URL=<owner's url> pgrelay migrate    (or: pgrelay sql | psql -v ON_ERROR_STOP=1 \"$DATABASE_URL\")",
        )
    } else {
        Check::ok(
            "database",
            format!("PostgreSQL {version}, database {db} as {user}, primary"),
        )
    };
    (check, installed)
}

/// Every migration this binary embeds is applied, and none it does not
/// know.
pub(super) async fn migrations(probe: &Probe<'_>) -> Check {
    let states =
        match schema::migration_state(&probe.client, probe.config.apps).await {
            Ok(states) => states,
            Err(e) => return Check::fail(
                "migrations",
                format!("cannot read the migration history: {e}", e = super::why(&e)),
                "SELECT relay.grant_relay('<the relay role>');   -- as the owner of schema relay",
            ),
        };
    let mut summary = Vec::new();
    let mut pending = Vec::new();
    let mut newer = Vec::new();
    let mut changed = Vec::new();
    for s in &states {
        let last = s.embedded.last().map(|(v, _)| *v).unwrap_or(0);
        summary.push(format!(
            "{}: {} of {} applied (through V{last})",
            s.set,
            s.embedded.len() - s.pending.len(),
            s.embedded.len()
        ));
        for v in &s.pending {
            let name = s
                .embedded
                .iter()
                .find(|(e, _)| e == v)
                .map(|(_, n)| n.as_str())
                .unwrap_or("");
            pending.push(format!("{} V{v}__{name}", s.set));
        }
        newer.extend(s.unknown.iter().map(|v| format!("{} V{v}", s.set)));
        changed.extend(s.changed.iter().map(|v| format!("{} V{v}", s.set)));
    }
    let chat = states.iter().any(|s| s.set == "chat");
    let migrate = format!(
        "DATABASE_URL=<owner's url> pgrelay migrate{}    (or: pgrelay sql{} | psql -v ON_ERROR_STOP=1 \"$DATABASE_URL\")",
        if chat { " --chat" } else { "" },
        if chat { " --chat" } else { "" }
    );
    if !pending.is_empty() {
        return Check::fail(
            "migrations",
            format!(
                "pending: {}; `serve` stops at start until they are applied",
                pending.join(", ")
            ),
            migrate,
        );
    }
    if !newer.is_empty() {
        return Check::warn(
            "migrations",
            format!(
                "the database has migrations this pgrelay does not know ({}): it is older than the one that migrated it",
                newer.join(", ")
            ),
            "run the pgrelay version that migrated this database (or a newer one)",
        );
    }
    if !changed.is_empty() {
        return Check::warn(
            "migrations",
            format!(
                "applied from another text than this binary embeds: {}",
                changed.join(", ")
            ),
            "compare `pgrelay sql` with what was installed; `pgrelay migrate` refuses a changed migration",
        );
    }
    Check::ok("migrations", summary.join("; "))
}

/// What `relay.grant_relay(role)` gives, each checked on the role of
/// `DATABASE_URL`: (kind, schema, name, argument types, privilege). Found
/// in the catalogs by name, since a lookup through `relay.` (`to_regclass`
/// and the like) is itself refused to a role without USAGE on the schema.
const RELAY_GRANTS: &[(&str, &str, &str, &str, &str)] = &[
    ("schema", "", "relay", "", "USAGE"),
    ("table", "relay", "events", "", "SELECT"),
    ("table", "relay", "scope_counter", "", "SELECT"),
    ("table", "relay", "trim_horizon", "", "SELECT"),
    ("table", "relay", "membership_resources", "", "SELECT"),
    ("table", "relay", "presence", "", "SELECT"),
    (
        "function",
        "relay",
        "trim",
        "integer, interval, integer",
        "EXECUTE",
    ),
    (
        "function",
        "relay",
        "presence_apply",
        "text, text[], text[], text[], jsonb[]",
        "EXECUTE",
    ),
    ("function", "relay", "presence_sweep", "", "EXECUTE"),
    (
        "function",
        "relay",
        "relay_heartbeat",
        "text, text, interval",
        "EXECUTE",
    ),
    ("function", "relay", "relay_stop", "text", "EXECUTE"),
    ("function", "relay", "presence_rows", "text[]", "EXECUTE"),
    // Where the search path finds it, as `serve` reads it.
    ("table", "", "refinery_schema_history", "", "SELECT"),
];

/// The relay's role holds every grant of `relay.grant_relay`.
pub(super) async fn grants(probe: &Probe<'_>) -> Check {
    let mut missing = Vec::new();
    let mut absent = Vec::new();
    let mut role = String::new();
    for (kind, schema, name, args, privilege) in RELAY_GRANTS {
        let (schema_, name_, args_, privilege_) = (*schema, *name, *args, *privilege);
        let (sql, params): (&str, Vec<(&(dyn ToSql + Sync), Type)>) = match *kind {
            "schema" => (
                "SELECT current_user::text, \
                 (SELECT has_schema_privilege(n.oid, $2) FROM pg_namespace n WHERE n.nspname = $1)",
                vec![(&name_, Type::TEXT), (&privilege_, Type::TEXT)],
            ),
            "table" => (
                "SELECT current_user::text, \
                 (SELECT has_table_privilege(c.oid, $3) FROM pg_class c \
                  JOIN pg_namespace n ON n.oid = c.relnamespace \
                  WHERE c.relname = $2 AND (n.nspname = $1 OR ($1 = '' AND pg_table_is_visible(c.oid))) \
                  LIMIT 1)",
                vec![
                    (&schema_, Type::TEXT),
                    (&name_, Type::TEXT),
                    (&privilege_, Type::TEXT),
                ],
            ),
            _ => (
                "SELECT current_user::text, \
                 (SELECT has_function_privilege(p.oid, $4) FROM pg_proc p \
                  JOIN pg_namespace n ON n.oid = p.pronamespace \
                  WHERE n.nspname = $1 AND p.proname = $2 AND oidvectortypes(p.proargtypes) = $3 LIMIT 1)",
                vec![
                    (&schema_, Type::TEXT),
                    (&name_, Type::TEXT),
                    (&args_, Type::TEXT),
                    (&privilege_, Type::TEXT),
                ],
            ),
        };
        let rows = match probe.query(sql, &params).await {
            Ok(rows) => rows,
            Err(e) => {
                return Check::fail(
                    "grants",
                    format!(
                        "cannot check {privilege} on {schema}.{name}: {e}",
                        e = super::why(&e)
                    ),
                    "check DATABASE_URL",
                )
            }
        };
        let Some(row) = rows.first() else { continue };
        role = row.get(0);
        let object = match (*schema, *kind) {
            (_, "schema") => format!("schema {name}"),
            ("", _) => name.to_string(),
            (_, "function") => format!("{schema}.{name}({args})"),
            _ => format!("{schema}.{name}"),
        };
        match row.get::<_, Option<bool>>(1) {
            Some(true) => {}
            Some(false) => missing.push(format!("{privilege} on {object}")),
            // The history table exists only where refinery or the install
            // SQL made it; an object the schema lacks (an older install) is
            // a migration's business, not a grant's.
            None if *name == "refinery_schema_history" => {}
            None => absent.push(object),
        }
    }
    let fix = format!(
        "SELECT relay.grant_relay({});   -- as the owner of schema relay",
        literal(&ident(&role))
    );
    if !missing.is_empty() {
        return Check::fail(
            "grants",
            format!(
                "role {role} lacks {} of what relay.grant_relay gives: {}",
                missing.len(),
                missing.join(", ")
            ),
            fix,
        );
    }
    if !absent.is_empty() {
        return Check::fail(
            "grants",
            format!(
                "missing from the schema: {} (migrations pending?)",
                absent.join(", ")
            ),
            "DATABASE_URL=<owner's url> pgrelay migrate",
        );
    }
    Check::ok(
        "grants",
        format!("role {role} holds everything relay.grant_relay gives"),
    )
}

/// The capture triggers ring `relay.channel()` as the database sets it;
/// a relay listening elsewhere would only ever poll.
pub(super) async fn channel(probe: &Probe<'_>) -> Check {
    let configured = &probe.config.relay.channel;
    let rows = match probe
        .query("SELECT relay.channel(), current_database()::text", &[])
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            return Check::fail(
                "channel",
                format!("cannot call relay.channel(): {e}", e = super::why(&e)),
                "fix the grants check first if it fails; else: DATABASE_URL=<owner's url> pgrelay migrate",
            )
        }
    };
    let Some(row) = rows.first() else {
        return Check::fail(
            "channel",
            "relay.channel() answered no row",
            "check DATABASE_URL",
        );
    };
    let database: String = row.get(0);
    let db: String = row.get(1);
    if &database == configured {
        return Check::ok(
            "channel",
            format!("the triggers and the relay both use {database:?}"),
        );
    }
    Check::fail(
        "channel",
        format!(
            "the capture triggers notify {database:?} (relay.channel()), the relay listens on {configured:?}: \
             events arrive only by polling"
        ),
        format!(
            "PGRELAY_CHANNEL={database}    (or, to move the triggers: ALTER DATABASE {} SET relay.channel = {};)",
            ident(&db),
            literal(configured)
        ),
    )
}

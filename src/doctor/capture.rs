//! Capture: every tracked table has its four triggers, enabled ALWAYS,
//! and no table has some of them alone (an app's migration that dropped
//! one, a half-removed table); membership declarations name resources
//! that some tracked table is captured as.

use std::collections::BTreeMap;

use super::{literal, Check, Probe, Status};

const CAPTURE: [&str; 3] = [
    "relay_capture_insert",
    "relay_capture_update",
    "relay_capture_delete",
];
const TRUNCATE: &str = "relay_refuse_truncate";

/// One of the engine's triggers on one table, or a trigger that calls the
/// engine's functions under another name.
struct Trigger {
    name: String,
    /// `A` (always), `O` (origin: the default), `R` (replica), `D`.
    enabled: String,
    function: String,
    args: Vec<String>,
}

pub(super) async fn triggers(probe: &Probe<'_>) -> Check {
    let rows = match probe
        .query(
            "SELECT t.tgrelid::regclass::text, t.tgname::text, t.tgenabled::text, \
                    p.pronamespace::regnamespace::text || '.' || p.proname, \
                    array_remove(string_to_array(encode(t.tgargs, 'escape'), '\\000'), '') \
             FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
             WHERE NOT t.tgisinternal \
               AND (t.tgname IN ('relay_capture_insert', 'relay_capture_update', \
                                 'relay_capture_delete', 'relay_refuse_truncate') \
                    OR (p.pronamespace = to_regnamespace('relay') \
                        AND (p.proname IN ('capture', 'refuse_truncate') OR p.proname ~ '^capture_[0-9]+$'))) \
             ORDER BY 1, 2",
            &[],
        )
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            return Check::fail(
                "triggers",
                format!("cannot read pg_trigger: {e}", e = super::why(&e)),
                "check DATABASE_URL",
            )
        }
    };
    let mut tables: BTreeMap<String, Vec<Trigger>> = BTreeMap::new();
    for r in &rows {
        tables.entry(r.get(0)).or_default().push(Trigger {
            name: r.get(1),
            enabled: r.get(2),
            function: r.get(3),
            args: r.get::<_, Option<Vec<String>>>(4).unwrap_or_default(),
        });
    }
    let mut status = Status::Ok;
    let mut problems = Vec::new();
    let mut fixes = Vec::new();
    let mut tracked = 0;
    for (table, triggers) in &tables {
        let named = |n: &str| triggers.iter().find(|t| t.name == n);
        let capture_fn = |f: &str| f == "relay.capture" || is_own_capture(f);
        // Triggers calling the engine's functions under names of their own:
        // capture the engine does not know (relay.disable leaves them).
        for t in triggers {
            let known = CAPTURE.contains(&t.name.as_str()) || t.name == TRUNCATE;
            if !known {
                status = status.max(Status::Warn);
                problems.push(format!(
                    "{table}: trigger {} calls {} but is not one of the engine's",
                    t.name, t.function
                ));
                fixes.push(format!(
                    "DROP TRIGGER {} ON {table};   -- then SELECT relay.enable(...) if {table} should be captured",
                    super::ident(&t.name)
                ));
            } else if (t.name == TRUNCATE && t.function != "relay.refuse_truncate")
                || (t.name != TRUNCATE && !capture_fn(&t.function))
            {
                status = Status::Fail;
                problems.push(format!(
                    "{table}: {} calls {}, not the engine's function",
                    t.name, t.function
                ));
            }
        }
        // What relay.enable was called with, from any capture trigger left.
        let args = CAPTURE.iter().find_map(|n| named(n)).map(|t| &t.args);
        let missing: Vec<&str> = CAPTURE
            .iter()
            .copied()
            .chain([TRUNCATE])
            .filter(|n| named(n).is_none())
            .collect();
        if named(CAPTURE[0]).is_some() {
            tracked += 1;
        }
        match args {
            None => {
                // Only the TRUNCATE guard is left: nothing is captured.
                status = status.max(Status::Warn);
                problems.push(format!(
                    "{table}: has {TRUNCATE} but no capture trigger (half removed)"
                ));
                fixes.push(format!(
                    "SELECT relay.disable({});   -- or SELECT relay.enable(...) to capture it again",
                    literal(table)
                ));
                continue;
            }
            Some(args) if !missing.is_empty() => {
                status = Status::Fail;
                problems.push(format!(
                    "{table}: {} missing, its writes are not all captured",
                    missing.join(", ")
                ));
                fixes.push(enable_call(table, args));
                continue;
            }
            Some(_) => {}
        }
        for t in triggers.iter().filter(|t| t.enabled != "A") {
            let (what, severity) = match t.enabled.as_str() {
                "D" => ("disabled", Status::Fail),
                "R" => ("enabled only for replication sessions", Status::Fail),
                _ => (
                    "not ENABLE ALWAYS (skipped under session_replication_role = replica)",
                    Status::Warn,
                ),
            };
            status = status.max(severity);
            problems.push(format!("{table}: {} is {what}", t.name));
            fixes.push(format!(
                "ALTER TABLE {table} ENABLE ALWAYS TRIGGER {};",
                super::ident(&t.name)
            ));
        }
    }
    if status == Status::Ok {
        if tracked == 0 {
            return Check::warn(
                "triggers",
                "no table is tracked: no row change becomes an event",
                "SELECT relay.enable('app.table', 'resource', 'scope_column', 'id_column');   -- see docs/deploying.md",
            );
        }
        return Check::ok(
            "triggers",
            format!(
                "{tracked} tracked table(s), each with its 4 triggers ENABLE ALWAYS; no partial or stray capture triggers"
            ),
        );
    }
    Check {
        name: "triggers".into(),
        status,
        summary: problems.join("; "),
        fix: Some(fixes.join("\n")).filter(|f| !f.is_empty()),
    }
}

/// `relay.capture_<oid>`: a table's own capture function (a column choice).
fn is_own_capture(function: &str) -> bool {
    function
        .strip_prefix("relay.capture_")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The `relay.enable` call that recreates a table's triggers as they were:
/// its resource, scope and id columns, and its column choice (a bare
/// re-enable reads the choice from the insert trigger, which may be the
/// one that is gone).
fn enable_call(table: &str, args: &[String]) -> String {
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    let mut call = format!(
        "SELECT relay.enable({}, {}, {}, {}",
        literal(table),
        literal(arg(0)),
        literal(arg(1)),
        literal(arg(2))
    );
    let columns = || {
        let list: Vec<String> = args.iter().skip(5).map(|c| literal(c)).collect();
        format!("ARRAY[{}]::name[]", list.join(", "))
    };
    match arg(3) {
        "only" => call.push_str(&format!(", p_columns => {}", columns())),
        "except" => call.push_str(&format!(", p_exclude_columns => {}", columns())),
        _ => {}
    }
    if arg(4) == "id_only" {
        call.push_str(", p_row_data => false");
    }
    call.push_str(");");
    call
}

/// Declared membership resources that no tracked table is captured as.
pub(super) async fn membership(probe: &Probe<'_>) -> Check {
    let declared: Vec<String> = match probe
        .query(
            "SELECT resource FROM relay.membership_resources ORDER BY 1",
            &[],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(e) => {
            return Check::fail(
                "membership",
                format!(
                    "cannot read relay.membership_resources: {e}",
                    e = super::why(&e)
                ),
                "see the grants check (relay.grant_relay gives SELECT on it)",
            )
        }
    };
    let tracked = match probe.log.tracked_resources().await {
        Ok(t) => t,
        Err(e) => {
            return Check::fail(
                "membership",
                format!("cannot read the tracked resources: {e}", e = super::why(&e)),
                "check DATABASE_URL",
            )
        }
    };
    let configured = &probe.config.relay.membership_resources;
    let stray: Vec<&String> = declared
        .iter()
        .chain(configured.iter())
        .filter(|r| !tracked.contains(r))
        .collect();
    if !stray.is_empty() {
        let names: Vec<String> = stray.iter().map(|r| format!("{r:?}")).collect();
        let fixes: Vec<String> = stray
            .iter()
            .map(|r| {
                if configured.contains(r) && !declared.contains(r) {
                    format!("remove {r} from PGRELAY_MEMBERSHIP_RESOURCES")
                } else {
                    format!(
                        "SELECT relay.declare_membership({}, false);   -- or relay.enable(<its table>, {}, ...)",
                        literal(r),
                        literal(r)
                    )
                }
            })
            .collect();
        return Check::warn(
            "membership",
            format!(
                "declared as changing membership but captured by no tracked table: {} (a typo, or a table no \
                 longer tracked; events published with relay.append still count)",
                names.join(", ")
            ),
            fixes.join("\n"),
        );
    }
    if declared.is_empty() && configured.is_empty() {
        return Check::ok(
            "membership",
            "no resource is declared as changing membership; revocations are seen by the periodic re-check",
        );
    }
    Check::ok(
        "membership",
        format!(
            "{} declared, each captured by a tracked table",
            declared
                .iter()
                .chain(configured.iter())
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_enable_call_keeps_the_column_choice() {
        let plain: Vec<String> = ["task", "project_id", "id"].map(String::from).into();
        assert_eq!(
            enable_call("app.tasks", &plain),
            "SELECT relay.enable('app.tasks', 'task', 'project_id', 'id');"
        );
        let only: Vec<String> = ["doc", "team_id", "id", "only", "row_data", "title"]
            .map(String::from)
            .into();
        assert_eq!(
            enable_call("\"App\".docs", &only),
            "SELECT relay.enable('\"App\".docs', 'doc', 'team_id', 'id', p_columns => ARRAY['title']::name[]);"
        );
        let ids: Vec<String> = ["n", "s", "i", "all", "id_only"].map(String::from).into();
        assert_eq!(
            enable_call("t", &ids),
            "SELECT relay.enable('t', 'n', 's', 'i', p_row_data => false);"
        );
        assert!(is_own_capture("relay.capture_16384"));
        assert!(!is_own_capture("relay.capture_"));
        assert!(!is_own_capture("relay.capture"));
    }
}

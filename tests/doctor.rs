//! `pgrelay doctor`, run as the binary against real deployments: a healthy
//! one (a relay running, everything ok, exit 0), then each broken set-up an
//! operator meets, built by the test: the check finds it (warn or fail,
//! with its fix), the test applies the fix the doctor printed, and the
//! check passes. Real Postgres from the harness, a real PgBouncer in
//! transaction mode, a real streaming standby.

mod common;

#[path = "common/pgbouncer.rs"]
mod pgbouncer;

use std::time::Duration;

use common::*;
use pgbouncer::PgBouncer;
use pgrelay::db::embedded::PgOptions;
use serde_json::Value;

/// What one run of `pgrelay doctor` gave.
struct Run {
    code: i32,
    report: Value,
    stderr: String,
}

impl Run {
    /// The check named `name`; panics (showing the report) if absent.
    fn check(&self, name: &str) -> &Value {
        self.report["checks"]
            .as_array()
            .and_then(|checks| checks.iter().find(|c| c["name"] == name))
            .unwrap_or_else(|| panic!("no check {name:?} in {:#}", self.report))
    }

    fn status(&self, name: &str) -> String {
        self.check(name)["status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Asserts that the check named `name` came out `status`, showing it
    /// when not.
    fn expect(&self, name: &str, status: &str) {
        assert_eq!(self.status(name), status, "{name}: {:#}", self.check(name));
    }

    fn fix(&self, name: &str) -> String {
        self.check(name)["fix"]
            .as_str()
            .unwrap_or_else(|| panic!("check {name:?} has no fix: {:#}", self.check(name)))
            .to_string()
    }

    /// Names of the checks that failed.
    fn failed(&self) -> Vec<String> {
        self.report["checks"]
            .as_array()
            .map(|checks| {
                checks
                    .iter()
                    .filter(|c| c["status"] == "fail")
                    .map(|c| c["name"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The binary with `DATABASE_URL` = `url`, these extra environment
/// variables and flags, and `--json`; no other pgrelay setting leaks in.
async fn doctor(url: &str, env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"));
    command.arg("doctor").arg("--json").args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("PGRELAY_") || key == "DATABASE_URL" {
            command.env_remove(key);
        }
    }
    command
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null());
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the doctor finished within 60 s")
        .expect("running pgrelay doctor");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("--json output is not JSON ({e}):\n{stdout}\nstderr:\n{stderr}")
    });
    Run {
        code: output.status.code().unwrap_or(-1),
        report,
        stderr,
    }
}

/// The same URL as another role (the test servers trust local roles).
fn as_role(url: &str, role: &str) -> String {
    url.replacen(
        "postgresql://postgres@",
        &format!("postgresql://{role}@"),
        1,
    )
}

/// Runs a printed fix as SQL, as an operator would paste it into psql.
async fn apply(client: &tokio_postgres::Client, fix: &str) {
    client
        .batch_execute(fix)
        .await
        .unwrap_or_else(|e| panic!("applying the printed fix failed: {e}\n{fix}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_deployment_is_all_ok() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "healthy", &["ann"]).await;
    let relay = spawn_relay_process(&db.url, &[]).await;
    // The relay takes the trim lock as its retention job starts.
    let t0 = tokio::time::Instant::now();
    while c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgrelay-retention' \
             AND datname = current_database()",
            &[],
        )
        .await
        .expect("reading pg_stat_activity")
        .get::<_, i64>(0)
        == 0
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the relay's retention job never connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let relay_url = format!("http://{}", relay.addr);
    let run = doctor(&db.url, &[], &["--relay-url", &relay_url]).await;
    assert_eq!(
        run.report["status"], "ok",
        "{:#}\n{}",
        run.report, run.stderr
    );
    assert_eq!(run.code, 0);
    let checks = run.report["checks"].as_array().expect("a list of checks");
    for name in [
        "database",
        "migrations",
        "grants",
        "rule",
        "triggers",
        "membership",
        "channel",
        "listen",
        "notice queue",
        "event log",
        "relay",
    ] {
        run.expect(name, "ok");
    }
    assert!(
        checks.iter().all(|c| c["fix"].is_null()),
        "{:#}",
        run.report
    );

    // The text form: one line per check, then the count.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["doctor", "--relay-url", &relay_url])
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("running pgrelay doctor");
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), checks.len() + 1, "{text}");
    assert!(
        lines[..checks.len()].iter().all(|l| l.starts_with("ok ")),
        "{text}"
    );
    assert_eq!(
        lines[checks.len()],
        format!("{0} checks: {0} ok, 0 warn, 0 fail", checks.len())
    );
}

#[tokio::test]
async fn the_deny_all_rule_fails_and_the_printed_rule_passes() {
    let db = TestDb::new().await;
    let c = db.client().await;
    // The engine's own default, as an install without an app's rule has.
    c.batch_execute(
        "CREATE OR REPLACE FUNCTION relay.authorize(user_id text, scope text) RETURNS boolean \
         LANGUAGE sql STABLE AS $rule$ SELECT false /* pgrelay default rule: denies everyone */ $rule$",
    )
    .await
    .expect("restoring the default rule");
    let run = doctor(&db.url, &[], &[]).await;
    run.expect("rule", "fail");
    assert_eq!(run.code, 1, "a failed check exits 1");
    assert_eq!(run.report["status"], "fail");
    let fix = run.fix("rule");
    assert!(
        fix.starts_with("CREATE OR REPLACE FUNCTION relay.authorize(user_id text, scope text)"),
        "{fix}"
    );
    // The printed rule reads the membership table docs/deploying.md uses.
    c.batch_execute(
        "CREATE SCHEMA app; CREATE TABLE app.team_members (team_id text, user_id text)",
    )
    .await
    .expect("the app's membership table");
    apply(&c, &fix).await;
    let run = doctor(&db.url, &[], &[]).await;
    run.expect("rule", "ok");
    assert!(run.failed().is_empty(), "{:#}", run.report);
    assert_eq!(run.code, 0);
}

#[tokio::test]
async fn a_rule_that_raises_or_is_slow_fails() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE OR REPLACE FUNCTION relay.authorize(user_id text, scope text) RETURNS boolean \
         LANGUAGE plpgsql STABLE AS $$ BEGIN RAISE EXCEPTION 'rule broken by a migration'; END $$",
    )
    .await
    .expect("a rule that raises");
    let run = doctor(&db.url, &[], &[]).await;
    run.expect("rule", "fail");
    let summary = run.check("rule")["summary"].as_str().unwrap_or_default();
    assert!(summary.contains("rule broken by a migration"), "{summary}");
    assert!(run.fix("rule").contains("SELECT relay.authorize("));

    c.batch_execute(
        "CREATE OR REPLACE FUNCTION relay.authorize(user_id text, scope text) RETURNS boolean \
         LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(2); RETURN false; END $$",
    )
    .await
    .expect("a slow rule");
    let run = doctor(&db.url, &[("PGRELAY_AUTHORIZE_TIMEOUT", "300ms")], &[]).await;
    run.expect("rule", "fail");
    let summary = run.check("rule")["summary"].as_str().unwrap_or_default();
    assert!(summary.contains("longer than"), "{summary}");
    assert!(run.fix("rule").contains("PGRELAY_AUTHORIZE_TIMEOUT"));

    // A rule that answers in time passes.
    c.batch_execute(
        "CREATE OR REPLACE FUNCTION relay.authorize(user_id text, scope text) RETURNS boolean \
         LANGUAGE sql STABLE AS $$ SELECT false $$",
    )
    .await
    .expect("a fast rule");
    let run = doctor(&db.url, &[("PGRELAY_AUTHORIZE_TIMEOUT", "300ms")], &[]).await;
    run.expect("rule", "ok");
}

#[tokio::test]
async fn dropped_disabled_and_stray_capture_triggers_are_found_and_the_fixes_restore_them() {
    let db = TestDb::new().await;
    let c = db.client().await;

    // An app's migration dropped one trigger of a tracked table.
    c.batch_execute("DROP TRIGGER relay_capture_update ON chat.messages")
        .await
        .expect("dropping a trigger");
    let run = doctor(&db.url, &[], &[]).await;
    run.expect("triggers", "fail");
    assert_eq!(run.code, 1);
    let fix = run.fix("triggers");
    assert_eq!(
        fix,
        "SELECT relay.enable('chat.messages', 'message', 'project_id', 'id');"
    );
    apply(&c, &fix).await;
    let run = doctor(&db.url, &[], &[]).await;
    run.expect("triggers", "ok");

    // A trigger disabled: writes go uncaptured.
    c.batch_execute("ALTER TABLE chat.projects DISABLE TRIGGER relay_capture_insert")
        .await
        .expect("disabling a trigger");
    let run = doctor(&db.url, &[], &[]).await;
    run.expect("triggers", "fail");
    let fix = run.fix("triggers");
    assert_eq!(
        fix,
        "ALTER TABLE chat.projects ENABLE ALWAYS TRIGGER \"relay_capture_insert\";"
    );
    apply(&c, &fix).await;
    let run = doctor(&db.url, &[], &[]).await;
    run.expect("triggers", "ok");

    // A table left with the TRUNCATE guard alone (capture half removed).
    c.batch_execute(
        "CREATE TABLE public.notes (id int PRIMARY KEY, project_id text); \
         CREATE TRIGGER relay_refuse_truncate BEFORE TRUNCATE ON public.notes \
         FOR EACH STATEMENT EXECUTE FUNCTION relay.refuse_truncate()",
    )
    .await
    .expect("a stray trigger");
    let run = doctor(&db.url, &[], &[]).await;
    run.expect("triggers", "warn");
    let fix = run.fix("triggers");
    assert!(fix.starts_with("SELECT relay.disable('notes');"), "{fix}");
    apply(&c, &fix).await;
    let run = doctor(&db.url, &[], &[]).await;
    run.expect("triggers", "ok");
}

#[tokio::test]
async fn a_role_without_grants_fails_and_grant_relay_fixes_it() {
    let db = TestDb::new().await;
    let owner = db.client().await;
    let role = format!("relay_{}", db.name);
    owner
        .batch_execute(&format!("CREATE ROLE {role} LOGIN"))
        .await
        .expect("creating the relay's role");
    let url = as_role(&db.url, &role);
    let run = doctor(&url, &[], &[]).await;
    run.expect("grants", "fail");
    assert_eq!(run.code, 1);
    let fix = run.fix("grants");
    assert_eq!(
        fix,
        format!("SELECT relay.grant_relay('\"{role}\"');   -- as the owner of schema relay")
    );
    apply(&owner, &fix).await;
    let run = doctor(&url, &[], &[]).await;
    run.expect("grants", "ok");
    // This database has the chat app, whose rule reads its tables: the
    // relay's role needs chat.grant_api too (docs/deploying.md), and the
    // rule check says so.
    run.expect("rule", "fail");
    let fix = run.fix("rule");
    assert!(fix.contains("SELECT chat.grant_api("), "{fix}");
    owner
        .batch_execute(&format!("SELECT chat.grant_api('{role}')"))
        .await
        .expect("chat.grant_api");
    // Then those two grants are all the relay (and the doctor) need.
    let run = doctor(&url, &[], &["--chat"]).await;
    assert!(run.failed().is_empty(), "{:#}", run.report);
    assert_eq!(run.code, 0);
}

#[tokio::test]
async fn a_transaction_pooler_on_the_listen_path_fails_and_a_direct_listen_url_passes() {
    let db = TestDb::new().await;
    let bouncer = PgBouncer::start(TestServer::shared().pg.port(), &[&db.name]).await;
    let pooled = bouncer.url(&db.name, "tx");
    let env = [("PGRELAY_TRANSACTION_POOLER", "true")];
    let run = doctor(&pooled, &env, &["--listen-timeout", "2s"]).await;
    assert_eq!(
        run.status("listen"),
        "fail",
        "{:#}\npgbouncer's log:\n{}",
        run.check("listen"),
        bouncer.log()
    );
    assert_eq!(run.code, 1);
    let fix = run.fix("listen");
    assert!(fix.starts_with("PGRELAY_LISTEN_DATABASE_URL="), "{fix}");
    // Everything else reads through the pooler as the relay would.
    assert_eq!(run.failed(), vec!["listen".to_string()], "{:#}", run.report);

    // The fix: LISTEN on a direct connection, reads still pooled.
    let env = [
        ("PGRELAY_TRANSACTION_POOLER", "true"),
        ("PGRELAY_LISTEN_DATABASE_URL", db.url.as_str()),
    ];
    let run = doctor(&pooled, &env, &["--listen-timeout", "2s"]).await;
    run.expect("listen", "ok");
    assert!(run.failed().is_empty(), "{:#}", run.report);
}

/// Polls `sql` (one boolean) on `url` until it is true, or panics.
async fn until(url: &str, sql: &str, what: &str) {
    let (c, conn) = connect(url).await;
    let t0 = tokio::time::Instant::now();
    loop {
        let done: bool = c
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"))
            .get(0);
        if done {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{what}: not within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(c);
    let _ = conn.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_whose_role_lacks_pg_read_all_stats_warns_and_the_grant_fixes_it() {
    let primary = TestServer::with_options(primary_options("64MB")).await;
    let db = primary.fresh_db().await;
    let c = db.client().await;
    c.batch_execute("CREATE ROLE replica_reader LOGIN")
        .await
        .expect("creating the replica's role");
    // pg_basebackup blocks: tell the runtime.
    let standby = tokio::task::block_in_place(|| primary.pg.start_standby(PgOptions::for_tests()))
        .expect("a streaming standby");
    let standby_url = standby.url(&db.name);
    until(
        &standby_url,
        "SELECT coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false)",
        "the standby streams",
    )
    .await;
    let replica = as_role(&standby_url, "replica_reader");
    let env = [("PGRELAY_READ_REPLICA_URLS", replica.as_str())];
    let run = doctor(&db.url, &env, &[]).await;
    run.expect("replica 1", "warn");
    let summary = run.check("replica 1")["summary"]
        .as_str()
        .unwrap_or_default();
    assert!(summary.contains("pg_read_all_stats"), "{summary}");
    let fix = run.fix("replica 1");
    assert_eq!(
        fix,
        "GRANT pg_read_all_stats TO \"replica_reader\";   -- on the primary"
    );
    apply(&c, &fix).await;
    until(
        &standby_url,
        "SELECT pg_has_role('replica_reader', 'pg_read_all_stats', 'MEMBER')",
        "the grant reaches the standby",
    )
    .await;
    let run = doctor(&db.url, &env, &[]).await;
    run.expect("replica 1", "ok");

    // A configured replica that is not there fails.
    let gone = "postgresql://postgres@127.0.0.1:1/nowhere";
    let run = doctor(&db.url, &[("PGRELAY_READ_REPLICA_URLS", gone)], &[]).await;
    run.expect("replica 1", "fail");
}

#[tokio::test]
async fn a_stuck_listener_filling_the_notice_queue_warns_and_ending_it_passes() {
    // The queue is the cluster's: a server of this test's own.
    let server = TestServer::dedicated().await;
    let db = server.fresh_db().await;
    let c = db.client().await;
    // A session that LISTENs, then sits in a transaction: a backend in a
    // transaction reads no notices, so the queue cannot move past it.
    let stuck = db.client().await;
    // Two calls: LISTEN takes effect at its commit.
    stuck
        .batch_execute("LISTEN doctor_stuck")
        .await
        .expect("the stuck listener's LISTEN");
    stuck
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("the stuck listener's transaction");
    let stuck_pid: i32 = c
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE state = 'idle in transaction' \
             AND datname = current_database()",
            &[],
        )
        .await
        .expect("the stuck session's pid")
        .get(0);
    // About 2.8 MB of notices: 0.03% of the queue, with the warning set
    // at 0.01%.
    c.batch_execute(
        "SELECT pg_notify('doctor_stuck', repeat(md5(i::text), 218) || i) FROM generate_series(1, 400) i",
    )
    .await
    .expect("filling the queue");
    let args = ["--notice-queue-warn", "0.0001"];
    let run = doctor(&db.url, &[], &args).await;
    run.expect("notice queue", "warn");
    let fix = run.fix("notice queue");
    let first = fix.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("SELECT pg_terminate_backend({stuck_pid});")),
        "{fix}"
    );
    apply(&c, first).await;
    // The queue's tail moves when the next notices are sent.
    c.batch_execute(
        "SELECT pg_notify('doctor_nudge', repeat(md5(i::text), 218) || i) FROM generate_series(1, 20) i",
    )
    .await
    .expect("sending more notices");
    let run = doctor(&db.url, &[], &args).await;
    run.expect("notice queue", "ok");
}

#[tokio::test]
async fn a_pending_migration_a_channel_mismatch_a_stray_declaration_and_no_retention_are_found() {
    let db = TestDb::new().await;
    let c = db.client().await;

    // A migration this binary embeds is not applied.
    c.batch_execute("DELETE FROM refinery_schema_history WHERE version = 6")
        .await
        .expect("forgetting a migration");
    let run = doctor(&db.url, &[], &[]).await;
    run.expect("migrations", "fail");
    let summary = run.check("migrations")["summary"]
        .as_str()
        .unwrap_or_default();
    assert!(summary.contains("relay V6__columns"), "{summary}");
    assert!(run.fix("migrations").contains("pgrelay migrate"));
    let migrate = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .arg("migrate")
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("running pgrelay migrate");
    assert!(migrate.status.success(), "{migrate:?}");
    let run = doctor(&db.url, &[], &[]).await;
    run.expect("migrations", "ok");

    // The database rings another channel than the relay listens on.
    c.batch_execute(&format!(
        "ALTER DATABASE {} SET relay.channel = 'elsewhere'",
        db.name
    ))
    .await
    .expect("moving the channel");
    let run = doctor(&db.url, &[], &[]).await;
    run.expect("channel", "fail");
    let fix = run.fix("channel");
    assert!(fix.starts_with("PGRELAY_CHANNEL=elsewhere "), "{fix}");
    let run = doctor(&db.url, &[("PGRELAY_CHANNEL", "elsewhere")], &[]).await;
    run.expect("channel", "ok");

    // A membership declaration no tracked table is captured as.
    c.batch_execute("SELECT relay.declare_membership('team_membr')")
        .await
        .expect("a misspelt declaration");
    let run = doctor(&db.url, &[], &[]).await;
    run.expect("membership", "warn");
    let fix = run.fix("membership");
    assert!(
        fix.starts_with("SELECT relay.declare_membership('team_membr', false);"),
        "{fix}"
    );
    apply(&c, &fix).await;
    let run = doctor(&db.url, &[], &[]).await;
    run.expect("membership", "ok");

    // Retention configured, but no relay runs to trim.
    run.expect("event log", "warn");
    let summary = run.check("event log")["summary"]
        .as_str()
        .unwrap_or_default();
    assert!(
        summary.contains("no relay holds the trim lock"),
        "{summary}"
    );

    // Retention off: the log grows without bound.
    let run = doctor(&db.url, &[("PGRELAY_NO_RETENTION", "true")], &[]).await;
    run.expect("event log", "warn");
    assert!(run.fix("event log").contains("relay.trim("));

    // A relay that does not answer.
    let closed = format!("http://{}", testkit::process::free_addr().expect("a port"));
    let run = doctor(&db.url, &[], &["--relay-url", &closed]).await;
    run.expect("relay", "fail");
    assert_eq!(run.code, 1);

    // No database at all: one failing line, exit 1.
    let run = doctor("postgresql://postgres@127.0.0.1:1/nowhere", &[], &[]).await;
    assert_eq!(run.status("database"), "fail", "{:#}", run.report);
    assert_eq!(run.report["checks"].as_array().map(Vec::len), Some(1));
    assert_eq!(run.code, 1);
}

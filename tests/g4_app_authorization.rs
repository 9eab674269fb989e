//! G4 with an app's own database: its own roles, its own membership table,
//! its own rule, installed by hand with psql and then migrated and served
//! by the documented roles, with no relay setting. Also the safety net (a
//! scheduled re-check for rules that read untracked tables) and a failing
//! rule that stays local to one subscription.

mod common;

use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::{
    http_json, relay_config, seed_project, spawn_relay_process, start_relay, TestDb, TestServer,
    WsClient,
};
use serde_json::json;

/// Runs a SQL file (or `-c` text) with psql against `url`; panics with its
/// output when it fails.
fn psql(url: &str, args: &[&str]) -> String {
    let out = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .arg(url)
        .output()
        .expect("running psql (is the PostgreSQL client installed?)");
    assert!(
        out.status.success(),
        "psql {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A database with nothing of pgrelay in it, as an app's would be.
async fn empty_database(name: &str) -> String {
    let server = TestServer::shared();
    let admin = server.pg.url("postgres");
    psql(&admin, &["-c", &format!("CREATE DATABASE {name}")]);
    server.pg.url(name)
}

fn as_role(url: &str, role: &str) -> String {
    url.replacen(
        "postgresql://postgres@",
        &format!("postgresql://{role}@"),
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_installed_by_hand_keeps_its_rule_and_revokes_with_no_relay_setting() {
    let owner_url = empty_database("app_by_hand").await;
    let install = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/install.sql");
    psql(&owner_url, &["-f", install]);
    // The app: its tables, its membership table, its rule, its roles.
    psql(
        &owner_url,
        &[
            "-c",
            "CREATE SCHEMA acc;
             CREATE TABLE acc.members (team text, member text, PRIMARY KEY (team, member));
             CREATE TABLE acc.docs (id serial PRIMARY KEY, team text NOT NULL, body text);
             SELECT relay.enable('acc.docs', 'doc', 'team');
             SELECT relay.enable('acc.members', 'member', 'team', 'member', p_grants_membership => true);
             CREATE OR REPLACE FUNCTION relay.authorize(user_id text, scope text) RETURNS boolean
             LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
                 SELECT EXISTS (SELECT 1 FROM acc.members m
                                WHERE m.team = authorize.scope AND m.member = authorize.user_id)
             $$;
             DO $$ BEGIN
                 IF to_regrole('app_writer') IS NULL THEN CREATE ROLE app_writer LOGIN; END IF;
                 IF to_regrole('relay_svc') IS NULL THEN CREATE ROLE relay_svc LOGIN; END IF;
             END $$;
             GRANT USAGE ON SCHEMA acc TO app_writer;
             GRANT SELECT, INSERT, UPDATE, DELETE ON acc.members, acc.docs TO app_writer;
             GRANT USAGE ON SEQUENCE acc.docs_id_seq TO app_writer;
             SELECT relay.grant_relay('relay_svc');",
        ],
    );

    // `pgrelay migrate` by the owner finds the hand install current.
    let migrate = Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .arg("migrate")
        .env("DATABASE_URL", &owner_url)
        .env("RUST_LOG", "info")
        .output()
        .expect("running pgrelay migrate");
    assert!(
        migrate.status.success(),
        "pgrelay migrate failed: {}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let state = psql(
        &owner_url,
        &[
            "-tA",
            "-c",
            "SELECT to_regnamespace('chat') IS NULL, \
                    pg_get_functiondef('relay.authorize(text,text)'::regprocedure) LIKE '%acc.members%'",
        ],
    );
    assert_eq!(
        state.trim(),
        "t|t",
        "no chat schema, and the app's rule intact"
    );

    // `pgrelay serve` as the unprivileged role, with no membership setting.
    let relay = spawn_relay_process(&as_role(&owner_url, "relay_svc"), &[]).await;
    let writer = common::connect(&as_role(&owner_url, "app_writer")).await.0;
    writer
        .batch_execute("INSERT INTO acc.members VALUES ('t1', 'ann'), ('t1', 'bob')")
        .await
        .expect("adding members as the app role");
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let mut bob = WsClient::connect(relay.addr, "bob").await;
    let mut eve = WsClient::connect(relay.addr, "eve").await;
    let at = ann.subscribe("t1", None).await["seq"]
        .as_u64()
        .expect("seq");
    bob.subscribe("t1", None).await;
    eve.send_json(json!({"action": "subscribe", "project_id": "t1"}))
        .await;
    let refused = eve.next_json(10).await;
    assert_eq!(refused["code"], "forbidden", "{refused}");

    for i in 0..5 {
        writer
            .execute(
                "INSERT INTO acc.docs (team, body) VALUES ('t1', $1)",
                &[&format!("d{i}")],
            )
            .await
            .expect("writing as the app role");
    }
    assert_eq!(bob.events_until("t1", at + 5, 10).await.len(), 5);
    // Bob is removed by the app role; the 20 docs after it never reach him.
    writer
        .execute(
            "DELETE FROM acc.members WHERE team = 't1' AND member = 'bob'",
            &[],
        )
        .await
        .expect("removing bob");
    for i in 0..20 {
        writer
            .execute(
                "INSERT INTO acc.docs (team, body) VALUES ('t1', $1)",
                &[&format!("late{i}")],
            )
            .await
            .expect("writing after the removal");
    }
    let last = at + 5 + 1 + 20;
    let ann_seqs = ann.events_until("t1", last, 10).await;
    common::assert_contiguous(&ann_seqs, at + 1, last, "ann");
    // Bob: his removal (at + 6), then forbidden, then none of the 20 docs
    // after it (ann has every one of them by now).
    common::expect_events_then_ended(
        &mut bob,
        "t1",
        (at + 6, at + 6),
        "forbidden",
        Duration::from_secs(2),
        "bob",
    )
    .await;
    // The relay-only database has no chat API, and says so.
    let (status, body) = http_json(relay.addr, "GET", "/v1/projects", Some("ann"), None).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "chat_not_installed", "{body}");
    println!(
        "app install: ann got {} events, bob up to his removal at {}",
        ann_seqs.len(),
        at + 6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduled_recheck_revokes_through_a_table_nobody_tracks() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann", "bob"]).await;
    c.batch_execute(
        "CREATE TABLE public.banned (user_id text PRIMARY KEY);
         CREATE OR REPLACE FUNCTION relay.authorize(user_id text, scope text) RETURNS boolean
         LANGUAGE sql STABLE AS $$
             SELECT chat.authorize(user_id, scope)
                AND NOT EXISTS (SELECT 1 FROM public.banned b WHERE b.user_id = authorize.user_id)
         $$;",
    )
    .await
    .expect("an app rule over an untracked table");
    let mut config = relay_config(&db.url);
    config.reauthorize_interval = Some(Duration::from_secs(1));
    let relay = start_relay(config).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let mut bob = WsClient::connect(relay.addr, "bob").await;
    ann.subscribe("p", None).await;
    let at = bob.subscribe("p", None).await["seq"].as_u64().expect("seq");

    c.execute("INSERT INTO public.banned VALUES ('ann')", &[])
        .await
        .expect("banning ann");
    let banned_at = Instant::now();
    let ended = ann.next_json(10).await;
    let took = banned_at.elapsed();
    assert_eq!(ended["type"], "error", "{ended}");
    assert_eq!(ended["code"], "forbidden", "{ended}");
    assert_eq!(ended["project_id"], "p", "{ended}");
    for i in 0..5 {
        c.execute(
            "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('p', 'bob', $1)",
            &[&format!("m{i}")],
        )
        .await
        .expect("a message");
    }
    assert_eq!(bob.events_until("p", at + 5, 10).await.len(), 5);
    assert!(
        ann.try_next_json(Duration::from_millis(500))
            .await
            .is_none(),
        "ann received something after the revocation"
    );
    assert_eq!(relay.metrics.revocations_total(), 1);
    let metrics = common::http_get(relay.addr, "/metrics").await;
    assert!(
        metrics.contains("pgrelay_revocations_total{cause=\"schedule\"} 1"),
        "{metrics}"
    );
    println!("scheduled re-check (interval 1 s) revoked after {took:?}");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_that_raises_or_hangs_for_one_user_ends_only_that_subscription() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann", "eve", "slow"]).await;
    c.batch_execute(
        "CREATE TABLE public.rule_mode (user_id text PRIMARY KEY, mode text);
         CREATE OR REPLACE FUNCTION relay.authorize(user_id text, scope text) RETURNS boolean
         LANGUAGE plpgsql STABLE AS $$
         DECLARE v_mode text;
         BEGIN
             SELECT m.mode INTO v_mode FROM public.rule_mode m WHERE m.user_id = authorize.user_id;
             IF v_mode = 'raise' THEN
                 RAISE EXCEPTION 'licence table is broken for %', user_id;
             ELSIF v_mode = 'hang' THEN
                 PERFORM pg_sleep(30);
             END IF;
             RETURN chat.authorize(user_id, scope);
         END $$;",
    )
    .await
    .expect("an app rule that can fail");
    let mut config = relay_config(&db.url);
    config.authorize_timeout = Duration::from_millis(500);
    config.reauthorize_interval = None;
    let relay = start_relay(config).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let mut eve = WsClient::connect(relay.addr, "eve").await;
    let mut slow = WsClient::connect(relay.addr, "slow").await;
    let at = ann.subscribe("p", None).await["seq"].as_u64().expect("seq");
    eve.subscribe("p", None).await;
    slow.subscribe("p", None).await;

    // The rule breaks for eve and hangs for slow; a membership event makes
    // every subscriber of the scope ask it again.
    c.batch_execute(
        "INSERT INTO public.rule_mode VALUES ('eve', 'raise'), ('slow', 'hang');
         INSERT INTO chat.project_members (project_id, user_id) VALUES ('p', 'zed');",
    )
    .await
    .expect("breaking the rule");
    let started = Instant::now();
    for i in 0..20 {
        c.execute(
            "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('p', 'ann', $1)",
            &[&format!("m{i}")],
        )
        .await
        .expect("a message");
    }
    let seqs = ann.events_until("p", at + 21, 20).await;
    let ann_took = started.elapsed();
    common::assert_contiguous(&seqs, at + 1, at + 21, "ann");
    // Eve and slow: the membership event itself (at + 1), then
    // authorize_failed, then none of ann's 20 messages (all delivered to
    // ann by now).
    for (who, client) in [("eve", &mut eve), ("slow", &mut slow)] {
        let error = common::expect_events_then_ended(
            client,
            "p",
            (at + 1, at + 1),
            "authorize_failed",
            Duration::from_secs(3),
            who,
        )
        .await;
        assert!(
            !error["message"]
                .as_str()
                .expect("an error frame has a message")
                .contains("licence"),
            "the rule's own message leaked to the client: {error}"
        );
    }
    assert_eq!(relay.metrics.authorize_failures.load(Relaxed), 2);
    // Ann's connection is healthy and her subscription goes on.
    ann.send_json(json!({"action": "ping"})).await;
    assert_eq!(ann.next_json(5).await["type"], "pong");
    println!("ann received 21 events in {ann_took:?} while eve's rule raised and slow's hung");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_migrated_by_release_0_1_upgrades_in_place() {
    let url = empty_database("released_0_1").await;
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/released-0.1");
    // What `pgrelay migrate` of 0.1 left: both files applied, both in
    // refinery's default history with the checksums 0.1 computed.
    psql(&url, &["-f", &format!("{fixtures}/V1__relay.sql")]);
    psql(&url, &["-f", &format!("{fixtures}/V2__chat.sql")]);
    psql(
        &url,
        &[
            "-c",
            "CREATE TABLE refinery_schema_history (version int4 PRIMARY KEY, name varchar(255),
                 applied_on varchar(255), checksum varchar(255));
             INSERT INTO refinery_schema_history VALUES
                 (1, 'relay', '2026-11-30T10:00:00Z', '5173365813508423578'),
                 (2, 'chat', '2026-11-30T10:00:00Z', '15705922035601939919');
             INSERT INTO chat.projects (id, name) VALUES ('p', 'p');
             INSERT INTO chat.project_members (project_id, user_id) VALUES ('p', 'ann'), ('p', 'bob');",
        ],
    );
    let migrate = |chat: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgrelay"));
        cmd.arg("migrate").env("DATABASE_URL", &url);
        if chat {
            cmd.arg("--chat");
        }
        let out = cmd.output().expect("running pgrelay migrate");
        assert!(
            out.status.success(),
            "pgrelay migrate (chat: {chat}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    migrate(false);
    let state = psql(
        &url,
        &[
            "-tA",
            "-c",
            "SELECT (SELECT string_agg(version || ':' || name, ',' ORDER BY version) FROM refinery_schema_history),
                    EXISTS (SELECT 1 FROM relay.membership_resources WHERE resource = 'project_member'),
                    relay.authorize('ann', 'p'), relay.authorize('eve', 'p')",
        ],
    );
    assert_eq!(
        state.trim(),
        "1:relay,2:chat,3:any_writer,4:divergence,5:signals,6:columns|t|t|f",
        "the engine upgraded, chat's membership declared, the rule as it was"
    );
    migrate(true);
    migrate(true);

    let relay = spawn_relay_process(&url, &[]).await;
    let writer = common::connect(&url).await.0;
    let mut bob = WsClient::connect(relay.addr, "bob").await;
    let at = bob.subscribe("p", None).await["seq"].as_u64().expect("seq");
    writer
        .batch_execute(
            "DELETE FROM chat.project_members WHERE project_id = 'p' AND user_id = 'bob';
             INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('p', 'ann', 'after');",
        )
        .await
        .expect("removing bob, then a message");
    let mut saw = Vec::new();
    while let Some(f) = bob.try_next_json(Duration::from_secs(2)).await {
        saw.push(f);
    }
    assert!(
        saw.iter().any(|f| f["code"] == "forbidden"),
        "bob's subscription ended at his removal: {saw:?}"
    );
    assert!(
        !saw.iter().any(|f| f["seq"].as_u64() == Some(at + 2)),
        "bob received the message after his removal: {saw:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_as_a_role_that_may_not_migrate_says_to_run_migrate() {
    let url = empty_database("not_migrated").await;
    psql(
        &url,
        &["-c", "DO $$ BEGIN IF to_regrole('reader_only') IS NULL THEN CREATE ROLE reader_only LOGIN; END IF; END $$"],
    );
    let out = Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", as_role(&url, "reader_only"))
        .env("PGRELAY_JWT_SECRET", "a-secret-of-at-least-16-bytes")
        .env("RUST_LOG", "warn")
        .output()
        .expect("running pgrelay serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "serve started without a schema: {stderr}"
    );
    assert!(
        stderr.contains("run `pgrelay migrate` as the role that owns the schema"),
        "{stderr}"
    );
}

/// A scheduled re-check asks about all of a connection's scopes in one
/// call; when the rule hangs for one scope, only that subscription ends
/// (G4), and the connection's other subscription keeps delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_that_hangs_for_one_scope_in_a_scheduled_recheck_ends_only_that_scope() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann"]).await;
    seed_project(&c, "q", &["ann"]).await;
    c.batch_execute(
        "CREATE TABLE public.slow_scopes (scope text PRIMARY KEY);
         CREATE OR REPLACE FUNCTION relay.authorize(user_id text, scope text) RETURNS boolean
         LANGUAGE plpgsql STABLE AS $$
         BEGIN
             IF EXISTS (SELECT 1 FROM public.slow_scopes s WHERE s.scope = authorize.scope) THEN
                 PERFORM pg_sleep(30);
             END IF;
             RETURN chat.authorize(user_id, scope);
         END $$;",
    )
    .await
    .expect("an app rule that can hang for one scope");
    let mut config = relay_config(&db.url);
    config.authorize_timeout = Duration::from_millis(500);
    config.reauthorize_interval = Some(Duration::from_secs(1));
    let relay = start_relay(config).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let at = ann.subscribe("p", None).await["seq"].as_u64().expect("seq");
    ann.subscribe("q", None).await;

    c.execute("INSERT INTO public.slow_scopes VALUES ('q')", &[])
        .await
        .expect("the rule hangs for q");
    // Within a few periods the schedule asks, the joint call times out, and
    // each scope is asked alone: q fails, p is allowed.
    let ended = ann.next_json(15).await;
    assert_eq!(ended["type"], "error", "{ended}");
    assert_eq!(ended["code"], "authorize_failed", "{ended}");
    assert_eq!(ended["project_id"], "q", "{ended}");
    for i in 0..5 {
        c.execute(
            "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('p', 'ann', $1)",
            &[&format!("m{i}")],
        )
        .await
        .expect("a message in p");
    }
    let seqs = ann.events_until("p", at + 5, 10).await;
    common::assert_contiguous(&seqs, at + 1, at + 5, "ann in p");
    // Further scheduled checks keep p (each is a joint call that answers
    // now that q is gone): nothing ends it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('p', 'ann', 'late')",
        &[],
    )
    .await
    .expect("a later message in p");
    let frame = ann.next_json(10).await;
    assert_eq!(frame["type"], "cache_invalidate", "{frame}");
    assert_eq!(frame["seq"].as_u64(), Some(at + 6), "{frame}");
    assert_eq!(relay.metrics.authorize_failures.load(Relaxed), 1);
    relay.shutdown().await;
}

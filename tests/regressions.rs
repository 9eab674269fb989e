//! Regressions found in review, each a way the guarantees or the latency
//! lead were once broken: a revocation racing a subscribe (G4), a reset
//! skipping a membership event (G4), pings starved by a long catch-up (G7),
//! a refused re-subscribe that kept the old one running (G4), a far-future
//! token expiry that panicked a session and leaked its subscription, and
//! pooled reads that were re-planned and JIT-compiled on every read.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Drains frames for `secs`; returns all cache_invalidate seqs and whether
/// a forbidden error arrived.
async fn drain(c: &mut WsClient, secs: u64) -> (Vec<u64>, bool, Vec<serde_json::Value>) {
    let mut seqs = Vec::new();
    let mut forbidden = false;
    let mut all = Vec::new();
    while let Some(f) = c.try_next_json(Duration::from_secs(secs)).await {
        if f["type"] == "cache_invalidate" {
            seqs.push(f["seq"].as_u64().expect("test step"));
        } else if f["type"] == "error" && f["code"] == "forbidden" {
            forbidden = true;
        }
        all.push(f);
    }
    (seqs, forbidden, all)
}

/// G4: a revocation committed while a subscribe is being authorized must
/// still end the subscription (the state is read before authorizing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_racing_a_subscribe_is_never_skipped() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "team", &["ann", "bob"]).await;
    // Same rule as the default, but slow for bob (as a real, heavier
    // authorize query could be): the answer is computed, then 1 s passes.
    c.batch_execute(
        "CREATE OR REPLACE FUNCTION relay.authorize(user_id text, scope text) RETURNS boolean
         LANGUAGE plpgsql VOLATILE AS $f$
         DECLARE v boolean;
         BEGIN
           SELECT EXISTS (SELECT 1 FROM chat.project_members m
                          WHERE m.project_id = authorize.scope AND m.user_id = authorize.user_id) INTO v;
           IF authorize.user_id = 'bob' THEN PERFORM pg_sleep(1); END IF;
           RETURN v;
         END $f$;",
    )
    .await
    .expect("test step");
    let relay = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let mut bob = WsClient::connect(relay.addr, "bob").await;
    bob.send_json(json!({"action":"subscribe","project_id":"team"}))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Revoke while the subscribe's authorize is in flight.
    c.execute(
        "DELETE FROM chat.project_members WHERE project_id='team' AND user_id='bob'",
        &[],
    )
    .await
    .expect("test step");
    let revoked_at = c
        .query_one(
            "SELECT seq FROM relay.events WHERE scope = 'team' AND resource = 'project_member'
               AND action = 'DELETE' AND row_id = 'bob'",
            &[],
        )
        .await
        .expect("the revoking seq")
        .get::<_, i64>(0) as u64;
    let sub = bob.next_json(10).await;
    println!("bob got: {sub}");
    // A message after bob left, delivered to ann, so that "nothing after"
    // below covers every seq after the revocation.
    ann.subscribe("team", None).await;
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('team','ann','after bob left')",
        &[],
    )
    .await
    .expect("test step");
    let ann_seqs = ann.events_until("team", revoked_at + 1, 10).await;
    assert_eq!(ann_seqs, [revoked_at + 1], "ann");
    match sub["type"].as_str() {
        // The authorize answered yes before the DELETE committed: the
        // subscription starts before the revocation, so bob gets every
        // event from there up to and including his removal, then
        // forbidden, then nothing.
        Some("subscribed") => {
            let from = sub["seq"].as_u64().expect("subscribed seq");
            assert!(
                from < revoked_at,
                "subscribed at seq {from}, not before the revocation at {revoked_at}: \
                 the revocation would be skipped"
            );
            expect_events_then_ended(
                &mut bob,
                "team",
                (from + 1, revoked_at),
                "forbidden",
                Duration::from_secs(2),
                "bob",
            )
            .await;
        }
        // On a slow machine the authorize may start after the DELETE:
        // refused at once, and nothing after.
        Some("error") => {
            assert_eq!(sub["code"], "forbidden", "{sub}");
            assert_eq!(sub["project_id"], "team", "{sub}");
            if let Some(f) = bob.try_next_json(Duration::from_secs(2)).await {
                panic!("bob, refused, received {f}");
            }
        }
        _ => panic!("bob's subscribe answered with {sub}"),
    }
    relay.shutdown().await;
}

/// G4: when the log does not continue from a cursor (trim overtook a
/// lagging subscriber; simulated by deleting one event in the writing
/// transaction), the `reset` jumps over a membership event, so the
/// subscription must be re-authorized before anything later is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_over_a_membership_event_re_checks_membership() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "team", &["ann", "bob"]).await;
    let relay = start_relay(relay_config(&db.url)).await;
    let mut bob = WsClient::connect(relay.addr, "bob").await;
    let start = bob.subscribe("team", None).await["seq"]
        .as_u64()
        .expect("test step");
    // start+1 (deleted: the hole), start+2 bob's removal, start+3 a message.
    c.batch_execute(&format!(
        "BEGIN;
         INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('team','ann','x');
         DELETE FROM chat.project_members WHERE project_id='team' AND user_id='bob';
         INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('team','ann','y');
         DELETE FROM relay.events WHERE scope='team' AND seq={};
         COMMIT;",
        start + 1
    ))
    .await
    .expect("test step");
    // The log cannot continue from bob's cursor: a reset to where it does
    // (the latest event, over bob's removal), never an event.
    let reset = bob.next_json(10).await;
    println!("bob got: {reset}");
    assert_eq!(reset["type"], "reset", "{reset}");
    assert_eq!(reset["reason"], "history_trimmed", "{reset}");
    assert_eq!(reset["project_id"], "team", "{reset}");
    assert_eq!(reset["seq"], start + 3, "{reset}");
    // A secret after his removal, delivered to ann first.
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    assert_eq!(ann.subscribe("team", None).await["seq"], start + 3);
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('team','ann','secret')",
        &[],
    )
    .await
    .expect("test step");
    assert_eq!(ann.events_until("team", start + 4, 10).await, [start + 4]);
    // Then forbidden, and no event at all: none of start+2..=start+4.
    expect_events_then_ended(
        &mut bob,
        "team",
        (start + 4, start + 3),
        "forbidden",
        Duration::from_secs(2),
        "bob, removed at seq start+2",
    )
    .await;
    relay.shutdown().await;
}

/// G7: a long catch-up keeps the session busy; pings must still go out and
/// a client that reads and answers them must not be closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_catch_up_keeps_pinging_a_healthy_client() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "big", &["ann"]).await;
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body)
         SELECT 'big', 'ann', repeat('x', 2000) || g FROM generate_series(1, 6000) g",
        &[],
    )
    .await
    .expect("test step");
    let mut config = relay_config(&db.url);
    config.ping_interval = Duration::from_millis(200);
    config.pong_timeout = Duration::from_millis(1500);
    config.read_rows = 20;
    let relay = start_relay(config).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let latest = ann.subscribe("big", Some(0)).await["seq"]
        .as_u64()
        .expect("test step");
    // A healthy but modest reader: reads everything, answers pings (the
    // tungstenite client does so while reading), ~1 ms per frame.
    let mut n = 0u64;
    let mut pings = 0u64;
    let t0 = std::time::Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ann.ws.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => {
                n += 1;
                if n.is_multiple_of(4) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(Message::Close(f)))) => {
                panic!(
                    "healthy client closed after {n} of {latest} events, {:?}, pings seen {pings}: {f:?}",
                    t0.elapsed()
                )
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("unexpected {other:?} after {n} events"),
        }
        if n >= latest {
            break;
        }
    }
    // Pings went out during the catch-up, not only after it: one every
    // 200 ms is due; at least one per second of catch-up is required.
    let took = t0.elapsed();
    let due = took.as_secs().max(1);
    assert!(
        pings >= due,
        "{pings} pings during a catch-up of {took:?} (at least {due} required, one due every 200 ms)"
    );
    println!("catch-up of {latest} events in {took:?}: {pings} pings");
    // Stay connected a little: a healthy client must not be closed now.
    if let Some(code) = ann.try_close_code(Duration::from_millis(800)).await {
        panic!(
            "closed with {code} right after catch-up ({:?}, pings seen {pings})",
            t0.elapsed()
        );
    }
    relay.shutdown().await;
}

/// A re-subscribe refused as forbidden must end the old subscription too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_re_subscribe_ends_the_old_subscription() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "team", &["ann", "bob"]).await;
    // An app rule that also depends on an untracked table.
    c.batch_execute(
        "CREATE TABLE banned (user_id text primary key);
         CREATE OR REPLACE FUNCTION relay.authorize(user_id text, scope text) RETURNS boolean
         LANGUAGE sql STABLE AS $f$
           SELECT EXISTS (SELECT 1 FROM chat.project_members m
                          WHERE m.project_id = authorize.scope AND m.user_id = authorize.user_id)
              AND NOT EXISTS (SELECT 1 FROM banned b WHERE b.user_id = authorize.user_id)
         $f$;",
    )
    .await
    .expect("test step");
    let relay = start_relay(relay_config(&db.url)).await;
    let mut bob = WsClient::connect(relay.addr, "bob").await;
    bob.subscribe("team", None).await;
    c.execute("INSERT INTO banned VALUES ('bob')", &[])
        .await
        .expect("test step");
    bob.send_json(json!({"action":"subscribe","project_id":"team"}))
        .await;
    let f = bob.next_json(10).await;
    assert_eq!(f["code"], "forbidden", "{f}");
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('team','ann','after ban')",
        &[],
    )
    .await
    .expect("test step");
    let (seqs, _, _) = drain(&mut bob, 2).await;
    assert!(seqs.is_empty(), "told forbidden, yet received {seqs:?}");
    relay.shutdown().await;
}

/// A validly signed token with a far-future `exp` once overflowed the
/// expiry timer and panicked the session, leaking its subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_future_expiry_neither_panics_nor_leaks() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "team", &["ann"]).await;
    let relay = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    ann.subscribe("team", None).await;
    let far = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "ann", "exp": 10_000_000_000_000_000_000u64}),
        &EncodingKey::from_secret(SECRET),
    )
    .expect("test step");
    ann.send_json(json!({"action":"auth","token": far})).await;
    // The token is accepted as it says: it expires in the far future.
    let reply = ann.next_json(5).await;
    assert_eq!(
        reply,
        json!({"type": "authenticated", "user_id": "ann", "expires_at": 10_000_000_000_000_000_000u64}),
        "the answer to auth"
    );
    // The session lives on and still delivers.
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('team', 'ann', 'after auth')",
        &[],
    )
    .await
    .expect("test step");
    let f = ann.next_json(10).await;
    assert_eq!(
        (&f["type"], &f["project_id"]),
        (&json!("cache_invalidate"), &json!("team")),
        "an event after the refresh: {f}"
    );
    assert_eq!(ann.try_close_code(Duration::from_secs(1)).await, None);
    drop(ann);
    let (mut subs, mut conns) = (-1, -1);
    for _ in 0..50 {
        subs = relay.metrics.subscriptions.load(Relaxed);
        conns = relay.metrics.connections.load(Relaxed);
        if subs == 0 && conns == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(subs, 0, "subscription leaked after the session ended");
    assert_eq!(conns, 0, "connection gauge leaked");
    relay.shutdown().await;
}

/// The relay's pooled connections plan once and never JIT: with the
/// defaults, Postgres re-planned `frames_after_many` on every read, and JIT
/// of its generic plan cost milliseconds per read. Their statements end on
/// the server too when the relay stops waiting for them (G6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_use_generic_plans_without_jit() {
    use pgrelay::db::connect::{pool, PoolOptions};
    use pgrelay::db::pool::Statements;
    let db = TestDb::new().await;
    let pool = pool(
        &db.url,
        &PoolOptions {
            name: "primary".into(),
            size: 2,
            query_timeout: Duration::from_secs(5),
            statements: Statements::Prepared,
        },
    )
    .expect("pool");
    let row = pool
        .query_one(
            "SELECT current_setting('plan_cache_mode'), current_setting('jit'), \
             current_setting('statement_timeout')",
            &[],
        )
        .await
        .expect("settings");
    assert_eq!(row.get::<_, String>(0), "force_generic_plan");
    assert_eq!(row.get::<_, String>(1), "off");
    assert_eq!(row.get::<_, String>(2), "5s");

    // A statement the relay stops waiting for ends on the server too: the
    // pool gives up after its query timeout (1 s here), and the backend
    // must not go on running it for the minute it asked for.
    let short = pool_with_timeout(&db.url, Duration::from_secs(1));
    let marker = "pgrelay_regression_slow_statement";
    let t0 = std::time::Instant::now();
    let slow = short
        .query(&format!("SELECT pg_sleep(60) AS {marker}"), &[])
        .await;
    assert!(slow.is_err(), "a 60 s statement under a 1 s timeout failed");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the caller was answered after {:?}",
        t0.elapsed()
    );
    let c = db.client().await;
    let mut running = -1i64;
    for _ in 0..100 {
        running = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1 AND pid <> pg_backend_pid()",
                &[&format!("%{marker}%")],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if running == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        running,
        0,
        "the statement was still running on the server {:?} after it began",
        t0.elapsed()
    );
}

fn pool_with_timeout(url: &str, query_timeout: Duration) -> pgrelay::db::pool::BoundedPool {
    use pgrelay::db::connect::{pool, PoolOptions};
    use pgrelay::db::pool::Statements;
    pool(
        url,
        &PoolOptions {
            name: "primary".into(),
            size: 1,
            query_timeout,
            statements: Statements::Prepared,
        },
    )
    .expect("pool")
}

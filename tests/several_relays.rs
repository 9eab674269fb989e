//! Several relay processes on one database, with no coordination beyond
//! Postgres: each delivers every event to its own clients, and retention
//! trims from one of them at a time (an advisory lock).

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use pgrelay::retention::RetentionConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_database_each_deliver_everything() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "two", &["ann", "bob"]).await;
    let r1 = start_relay(relay_config(&db.url)).await;
    let r2 = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(r1.addr, "ann").await;
    let mut bob = WsClient::connect(r2.addr, "bob").await;
    let start = ann.subscribe("two", None).await["seq"]
        .as_u64()
        .expect("seq");
    bob.subscribe("two", None).await;
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body)
         SELECT 'two', 'ann', 'm' || g FROM generate_series(1, 500) g",
        &[],
    )
    .await
    .expect("insert");
    assert_contiguous(
        &ann.events_until("two", start + 500, 30).await,
        start + 1,
        start + 500,
        "ann on relay 1",
    );
    assert_contiguous(
        &bob.events_until("two", start + 500, 30).await,
        start + 1,
        start + 500,
        "bob on relay 2",
    );
    r1.shutdown().await;
    r2.shutdown().await;
}

/// Ages every event of the database by two days, past the retention's
/// `min_age`, and returns how many the trim may then delete: those beyond
/// the newest `keep_min` of their scope.
async fn age_everything(c: &tokio_postgres::Client, keep_min: i32) -> u64 {
    c.execute(
        "UPDATE relay.events SET created_at = created_at - interval '2 days'",
        &[],
    )
    .await
    .expect("ageing the event log");
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM relay.events ev JOIN relay.scope_counter sc USING (scope)
             WHERE ev.seq <= sc.last_seq - $1",
            &[&i64::from(keep_min)],
        )
        .await
        .expect("counting what may be trimmed")
        .get(0);
    n as u64
}

async fn insert(c: &tokio_postgres::Client, project: &str, n: i32) {
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body)
         SELECT $1, 'ann', 'm' || g FROM generate_series(1, $2) g",
        &[&project, &n],
    )
    .await
    .expect("insert");
}

/// Events of `scope` left in the log.
async fn kept(c: &tokio_postgres::Client, scope: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM relay.events WHERE scope = $1",
        &[&scope],
    )
    .await
    .expect("counting the log")
    .get(0)
}

/// Waits until `relay` has trimmed `n` events in all (panics after 10 s).
async fn trimmed(relay: &pgrelay::server::RelayHandle, n: u64, who: &str) {
    for _ in 0..100 {
        if relay.metrics.events_trimmed.load(Relaxed) >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        relay.metrics.events_trimmed.load(Relaxed),
        n,
        "events trimmed by {who}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_relay_trims_at_a_time() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "old", &["ann"]).await;
    insert(&c, "old", 60).await;
    let keep_min = 10;
    let fast = RetentionConfig {
        interval: Duration::from_millis(100),
        keep_min,
        min_age: Duration::from_secs(3600),
        batch: 7,
        pause: Duration::from_millis(5),
    };
    let mut a = relay_config(&db.url);
    a.retention = Some(fast.clone());
    let mut b = relay_config(&db.url);
    b.retention = Some(fast);
    let r1 = start_relay(a).await;
    let r2 = start_relay(b).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let leaders =
        r1.metrics.retention_leader.load(Relaxed) + r2.metrics.retention_leader.load(Relaxed);
    assert_eq!(leaders, 1, "exactly one relay holds the trim lock");
    let (leader, other) = if r1.metrics.retention_leader.load(Relaxed) == 1 {
        (r1, r2)
    } else {
        (r2, r1)
    };
    assert!(
        leader.metrics.retention_runs.load(Relaxed) > 0,
        "the leader runs"
    );
    assert_eq!(
        leader.metrics.events_trimmed.load(Relaxed),
        0,
        "nothing is old enough yet"
    );

    // Everything is now two days old: the leader trims all but the newest
    // `keep_min` of each scope, in batches, and the other relay nothing.
    let due = age_everything(&c, keep_min).await;
    assert!(due >= 50, "the 60 messages are old enough to trim: {due}");
    trimmed(&leader, due, "the leader").await;
    assert_eq!(kept(&c, "old").await, i64::from(keep_min));
    assert_eq!(
        age_everything(&c, keep_min).await,
        0,
        "nothing left to trim"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(leader.metrics.events_trimmed.load(Relaxed), due);
    assert_eq!(
        (
            other.metrics.retention_leader.load(Relaxed),
            other.metrics.retention_runs.load(Relaxed),
            other.metrics.events_trimmed.load(Relaxed)
        ),
        (0, 0, 0),
        "the other relay never ran a trim"
    );

    // When the leader goes, the other takes over, and trims what ages next.
    leader.shutdown().await;
    let mut took_over = false;
    for _ in 0..50 {
        if other.metrics.retention_leader.load(Relaxed) == 1 {
            took_over = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(took_over, "the other relay took over trimming");
    insert(&c, "old", 30).await;
    let due = age_everything(&c, keep_min).await;
    assert_eq!(due, 30, "the 30 new messages push 30 out of the newest 10");
    trimmed(&other, due, "the relay that took over").await;
    assert_eq!(kept(&c, "old").await, i64::from(keep_min));
    other.shutdown().await;
}

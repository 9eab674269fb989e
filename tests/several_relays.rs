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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_relay_trims_at_a_time() {
    let db = TestDb::new().await;
    let fast = RetentionConfig {
        interval: Duration::from_millis(100),
        ..RetentionConfig::default()
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
    // When the leader goes, the other takes over.
    let (leader, other) = if r1.metrics.retention_leader.load(Relaxed) == 1 {
        (r1, r2)
    } else {
        (r2, r1)
    };
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
    other.shutdown().await;
}

//! G5 Any size, any burst: one statement that changes 10,000 rows rings
//! 10,000 notices in seq order at the database and delivers 10,000 events
//! to each subscriber, and a row far larger than NOTIFY's 8000-byte payload
//! limit (1 MiB) arrives whole.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn one_statement_changing_10000_rows_rings_10000_notices_in_order() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO chat.projects (id, name) VALUES ('bulk', 'Bulk');
         INSERT INTO chat.messages (project_id, sender_id, body)
         SELECT 'bulk', 'u', 'row ' || g FROM generate_series(1, 10000) g;",
    )
    .await
    .expect("setup");
    let mut notices = Notices::listen(&db.url, "cache_invalidate").await;
    let updated = c
        .execute(
            "UPDATE chat.messages SET body = body || '!' WHERE project_id = 'bulk'",
            &[],
        )
        .await
        .expect("bulk update");
    assert_eq!(updated, 10_000);
    for expected in 10_002..=20_001i64 {
        let n = notices.next_json(30).await;
        assert_eq!(n["seq"], expected);
        assert_eq!(n["action"], "UPDATE");
    }
    let count: i64 = c
        .query_one(
            "SELECT count(*) FROM relay.events WHERE scope = 'bulk' AND action = 'UPDATE'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_update_of_10000_rows_delivers_10000_events_in_order_to_each_subscriber() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "bulk", &["ann", "bob"]).await;
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body)
         SELECT 'bulk', 'ann', 'row ' || g FROM generate_series(1, 10000) g",
        &[],
    )
    .await
    .expect("seeding rows");
    let relay = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let mut bob = WsClient::connect(relay.addr, "bob").await;
    let latest = ann.subscribe("bulk", None).await["seq"]
        .as_u64()
        .expect("seq");
    bob.subscribe("bulk", None).await;
    assert_eq!(latest, 10_003);

    let updated = c
        .execute(
            "UPDATE chat.messages SET status = 'delivered' WHERE project_id = 'bulk'",
            &[],
        )
        .await
        .expect("bulk update");
    assert_eq!(updated, 10_000);
    for (name, client) in [("ann", &mut ann), ("bob", &mut bob)] {
        let seqs = client.events_until("bulk", latest + 10_000, 60).await;
        assert_contiguous(&seqs, latest + 1, latest + 10_000, name);
    }
    println!(
        "10,000-row UPDATE: 2 subscribers x 10000 events, contiguous; log reads {} rows read {}",
        relay
            .metrics
            .log_reads
            .load(std::sync::atomic::Ordering::Relaxed),
        relay
            .metrics
            .log_rows
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_mib_message_arrives_whole() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "big", &["ann"]).await;
    let relay = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    ann.subscribe("big", None).await;
    let body = "x".repeat(1 << 20);
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('big', 'ann', $1)",
        &[&body],
    )
    .await
    .expect("insert 1 MiB");
    let f = ann.next_json(20).await;
    assert_eq!(f["data"]["body"].as_str().map(str::len), Some(1 << 20));
    assert_eq!(f["data"]["body"].as_str(), Some(body.as_str()));
    relay.shutdown().await;
}

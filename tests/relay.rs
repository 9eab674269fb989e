//! The relay end to end: real Postgres, real WebSocket clients (G1, G2,
//! G3, G5, G7 as seen by a client).

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_sql_writes_reach_every_member_and_no_one_else() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann", "bob"]).await;
    seed_project(&c, "q", &["cat"]).await;
    let relay = start_relay(relay_config(&db.url)).await;

    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let mut bob = WsClient::connect(relay.addr, "bob").await;
    let mut cat = WsClient::connect(relay.addr, "cat").await;
    assert_eq!(ann.subscribe("p", None).await["seq"], 3);
    bob.subscribe("p", None).await;
    cat.subscribe("q", None).await;
    // cat is no member of p: refused, and nothing of p ever reaches it.
    cat.send_json(serde_json::json!({"action": "subscribe", "project_id": "p"}))
        .await;
    let refused = cat.next_json(10).await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "forbidden");
    assert_eq!(refused["project_id"], "p");

    c.batch_execute(
        "INSERT INTO chat.messages (id, project_id, sender_id, body) VALUES ('m1', 'p', 'ann', 'one');
         UPDATE chat.messages SET body = 'uno' WHERE id = 'm1';
         DELETE FROM chat.messages WHERE id = 'm1';
         INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('q', 'cat', 'for q');",
    )
    .await
    .expect("raw writes");

    for client in [&mut ann, &mut bob] {
        let frames: Vec<serde_json::Value> = {
            let mut v = Vec::new();
            for _ in 0..3 {
                v.push(client.next_json(10).await);
            }
            v
        };
        let seqs: Vec<u64> = frames
            .iter()
            .map(|f| f["seq"].as_u64().expect("seq"))
            .collect();
        assert_eq!(seqs, vec![4, 5, 6]);
        assert_eq!(frames[0]["action"], "INSERT");
        assert_eq!(frames[0]["data"]["body"], "one");
        assert_eq!(frames[1]["action"], "UPDATE");
        assert_eq!(frames[1]["data"]["body"], "uno");
        assert_eq!(frames[2]["action"], "DELETE");
        assert_eq!(
            frames[2]["data"]["body"], "uno",
            "a DELETE carries the row as it was"
        );
        assert_eq!(frames[0]["id"], "m1");
        assert!(frames[0]["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
    }
    let q_event = cat.next_json(10).await;
    assert_eq!(
        q_event["project_id"], "q",
        "cat gets its own project's event: {q_event}"
    );
    assert_eq!(q_event["data"]["body"], "for q");
    assert!(
        cat.try_next_json(Duration::from_millis(500))
            .await
            .is_none(),
        "nothing of p reached cat"
    );
    assert!(
        ann.try_next_json(Duration::from_millis(200))
            .await
            .is_none(),
        "nothing of q reached ann"
    );
    relay.shutdown().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_since_seq_under_load_gets_every_event_once() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "live", &["ann", "w"]).await;
    let relay = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let start = ann.subscribe("live", None).await["seq"]
        .as_u64()
        .expect("seq");

    const WRITERS: usize = 4;
    const PER_WRITER: usize = 300;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let client = db.client().await;
        writers.push(tokio::spawn(async move {
            for i in 0..PER_WRITER {
                client
                    .execute(
                        "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('live', 'w', $1)",
                        &[&format!("{w}/{i}")],
                    )
                    .await
                    .expect("insert");
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    // Read a while, then drop the connection mid-stream.
    let mut seen = ann.events_until("live", start + 200, 30).await;
    drop(ann);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resume_from = *seen.last().expect("some events");
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    ann.subscribe("live", Some(resume_from)).await;
    for w in writers {
        w.await.expect("writer");
    }
    let last = start + (WRITERS * PER_WRITER) as u64;
    seen.extend(ann.events_until("live", last, 60).await);
    assert_contiguous(&seen, start + 1, last, "resumed client");
    println!(
        "resume under load: {} writers x {PER_WRITER} rows, disconnected after seq {resume_from}, received {} events once each in order",
        WRITERS,
        seen.len()
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_from_trimmed_history_gets_an_explicit_reset() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "old", &["ann"]).await;
    c.batch_execute(
        "INSERT INTO chat.messages (project_id, sender_id, body)
         SELECT 'old', 'ann', 'm' || g FROM generate_series(1, 50) g;
         UPDATE relay.events SET created_at = created_at - interval '1 day' WHERE scope = 'old';
         SELECT relay.trim(10, '1 hour', 1000);",
    )
    .await
    .expect("seed and trim");
    let relay = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    // 52 events (project, member, 50 messages); 42 trimmed.
    let sub = ann.subscribe("old", Some(5)).await;
    assert_eq!(sub["seq"], 52);
    let reset = ann.next_json(10).await;
    assert_eq!(reset["type"], "reset");
    assert_eq!(reset["reason"], "history_trimmed");
    assert_eq!(reset["seq"], 52);
    // From within the kept history, a plain resume.
    let mut bob = WsClient::connect(relay.addr, "ann").await;
    bob.subscribe("old", Some(45)).await;
    let seqs = bob.events_until("old", 52, 10).await;
    assert_contiguous(&seqs, 46, 52, "resume inside kept history");
    // Live goes on after a reset.
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('old', 'ann', 'new')",
        &[],
    )
    .await
    .expect("insert");
    assert_eq!(ann.events_until("old", 53, 10).await, vec![53]);
    relay.shutdown().await;
}

/// The relay's pooled connections plan once and never JIT: with the
/// defaults, Postgres re-planned `frames_after_many` on every read, and JIT
/// of its generic plan cost milliseconds per read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_use_generic_plans_without_jit() {
    let db = TestDb::new().await;
    let log = pgrelay::relay::log::EventLog::connect(
        &db.url,
        2,
        std::sync::Arc::new(pgrelay::metrics::Metrics::default()),
        &[],
    )
    .expect("pool");
    let client = log.pool().get().await.expect("connection");
    let row = client
        .query_one(
            "SELECT current_setting('plan_cache_mode'), current_setting('jit')",
            &[],
        )
        .await
        .expect("settings");
    assert_eq!(row.get::<_, String>(0), "force_generic_plan");
    assert_eq!(row.get::<_, String>(1), "off");
}

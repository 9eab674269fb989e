//! G1 Capture: every committed INSERT, UPDATE and DELETE on a tracked
//! table, by any writer, yields exactly one event in its scope; a rolled-back
//! transaction yields none. Seen at the database edge by a real LISTEN
//! connection (one small doorbell per row, never the row data) and at the
//! client edge by real WebSocket subscribers, who get raw SQL writes like
//! any other (and only the members of the scope get them).

mod common;

use std::time::Duration;

use common::*;

const NOTICE_KEYS: [&str; 7] = [
    "type",
    "resource",
    "action",
    "id",
    "project_id",
    "seq",
    "timestamp",
];

fn assert_notice_shape(n: &serde_json::Value) {
    let obj = n.as_object().expect("notice is an object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut expected = NOTICE_KEYS.to_vec();
    expected.sort_unstable();
    assert_eq!(keys, expected, "notice keys (no row data): {n}");
    assert_eq!(n["type"], "cache_invalidate");
    let ts = n["timestamp"].as_str().expect("timestamp is a string");
    assert!(
        ts.ends_with('Z') && ts.len() == 27,
        "RFC 3339 UTC microseconds: {ts}"
    );
}

#[tokio::test]
async fn raw_insert_update_delete_each_ring_one_notice() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO chat.projects (id, name) VALUES ('p', 'P');
         INSERT INTO chat.project_members (project_id, user_id) VALUES ('p', 'ann');",
    )
    .await
    .expect("setup");
    let mut notices = Notices::listen(&db.url, "cache_invalidate").await;

    c.batch_execute(
        "INSERT INTO chat.messages (id, project_id, sender_id, body) VALUES ('m1', 'p', 'ann', 'hi');
         UPDATE chat.messages SET body = 'hello' WHERE id = 'm1';
         DELETE FROM chat.messages WHERE id = 'm1';",
    )
    .await
    .expect("raw writes");

    for (seq, action) in [(3, "INSERT"), (4, "UPDATE"), (5, "DELETE")] {
        let n = notices.next_json(10).await;
        assert_notice_shape(&n);
        assert_eq!(n["resource"], "message");
        assert_eq!(n["action"], action);
        assert_eq!(n["id"], "m1");
        assert_eq!(n["project_id"], "p");
        assert_eq!(n["seq"], seq);
    }

    // The frames carry the data: the row after the change, and for the
    // DELETE the row as it was.
    let rows = c
        .query("SELECT seq, frame FROM relay.frames_after('p', 2, 10)", &[])
        .await
        .expect("frames_after");
    let frames: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(1)).expect("frame is JSON"))
        .collect();
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[0]["data"]["body"], "hi");
    assert_eq!(frames[1]["data"]["body"], "hello");
    assert_eq!(frames[2]["data"]["body"], "hello");
    assert_eq!(frames[2]["action"], "DELETE");
}

#[tokio::test]
async fn rolled_back_transaction_rings_nothing() {
    let db = TestDb::new().await;
    let mut c = db.client().await;
    c.batch_execute("INSERT INTO chat.projects (id, name) VALUES ('rb', 'RB')")
        .await
        .expect("setup");
    let mut notices = Notices::listen(&db.url, "cache_invalidate").await;
    let tx = c.transaction().await.expect("begin");
    tx.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('rb', 'x', 'lost')",
        &[],
    )
    .await
    .expect("insert");
    tx.rollback().await.expect("rollback");
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('rb', 'x', 'kept')",
        &[],
    )
    .await
    .expect("insert");
    let n = notices.next_json(10).await;
    assert_eq!(n["seq"], 2, "the rollback gave its seq back: no gap");
    assert_eq!(n["action"], "INSERT");
    // Anything else (a late notice of the rolled-back insert, a duplicate)
    // would follow within moments; wait a generous second for it.
    let late = notices.next_within(Duration::from_secs(1)).await;
    assert!(late.is_none(), "nothing else was rung, yet got {late:?}");
}

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

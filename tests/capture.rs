//! G1 and G5 at the database edge, seen by a real LISTEN connection: raw
//! SQL writes, whichever session makes them, ring exactly one doorbell per
//! row, with the small notice of DESIGN.md and never the row data.

mod common;

use common::{Notices, TestDb, TestServer};

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
    assert!(notices.rx.try_recv().is_err(), "nothing else was rung");
}

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

#[tokio::test(flavor = "multi_thread")]
async fn private_server_survives_stop_and_restart_with_its_data() {
    let server = std::sync::Arc::new(TestServer::dedicated().await);
    let db = server.fresh_db().await;
    let c = db.client().await;
    c.batch_execute("INSERT INTO chat.projects (id, name) VALUES ('keep', 'Keep')")
        .await
        .expect("write before restart");
    let port = server.pg.port();

    let s = server.clone();
    tokio::task::spawn_blocking(move || s.pg.stop().expect("stop"))
        .await
        .expect("stop task");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the server is down after stop"
    );
    assert!(
        c.query_one("SELECT 1", &[]).await.is_err(),
        "an old connection fails while the server is down"
    );

    let s = server.clone();
    tokio::task::spawn_blocking(move || s.pg.start_again().expect("start again"))
        .await
        .expect("start task");
    let c = db.client().await;
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM relay.events WHERE scope = 'keep'",
            &[],
        )
        .await
        .expect("query after restart")
        .get(0);
    assert_eq!(
        n, 1,
        "the event written before the restart is still there, same port"
    );
}

//! G2 Order under real concurrency: 8 writers on separate connections insert into
//! one project at once, some transactions rolled back at random. The event
//! log must hold seq 1..N with no gap or duplicate, and a LISTEN connection
//! must receive every notice exactly once, in seq order.

mod common;

use std::time::Duration;

use common::{Notices, TestDb};
use rand::{Rng, SeedableRng};

const WRITERS: u64 = 8;
const PER_WRITER: usize = 500;
const ROLLBACK_PROBABILITY: f64 = 0.2;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_get_contiguous_seqs_in_commit_order() {
    let db = TestDb::new().await;
    let setup = db.client().await;
    setup
        .batch_execute(
            "INSERT INTO chat.projects (id, name) VALUES ('race', 'Race');
             INSERT INTO chat.project_members (project_id, user_id) VALUES ('race', 'w');",
        )
        .await
        .expect("setup");
    let mut notices = Notices::listen(&db.url, "cache_invalidate").await;

    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let mut client = db.client().await;
        writers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(writer);
            let mut committed = 0u64;
            let mut rolled_back = 0u64;
            for i in 0..PER_WRITER {
                let tx = client.transaction().await.expect("begin");
                tx.execute(
                    "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('race', 'w', $1)",
                    &[&format!("writer {writer} message {i}")],
                )
                .await
                .expect("insert");
                if rng.random_bool(ROLLBACK_PROBABILITY) {
                    tx.rollback().await.expect("rollback");
                    rolled_back += 1;
                } else {
                    tx.commit().await.expect("commit");
                    committed += 1;
                }
            }
            (committed, rolled_back)
        }));
    }
    let (mut committed, mut rolled_back) = (0u64, 0u64);
    for w in writers {
        let (c, r) = w.await.expect("writer task");
        committed += c;
        rolled_back += r;
    }

    // The log: setup wrote seq 1 (project) and 2 (member).
    let rows = setup
        .query(
            "SELECT seq, resource FROM relay.events WHERE scope = 'race' ORDER BY seq",
            &[],
        )
        .await
        .expect("reading the log");
    let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let messages = rows
        .iter()
        .filter(|r| r.get::<_, String>(1) == "message")
        .count() as u64;
    let expected_last = committed as i64 + 2;
    assert_eq!(messages, committed, "one event per committed insert");
    assert_eq!(
        seqs,
        (1..=expected_last).collect::<Vec<_>>(),
        "the log must hold seq 1..={expected_last} with no gap or duplicate"
    );

    // The doorbells: every one rung after LISTEN (seq 3 on), once, in seq
    // order.
    let expected_notices: Vec<i64> = (3..=expected_last).collect();
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while received.len() < expected_notices.len() && tokio::time::Instant::now() < deadline {
        let notice = notices.next_json(60).await;
        if notice["project_id"] == "race" {
            received.push(notice["seq"].as_i64().expect("seq is a number"));
        }
    }
    // Anything extra would show up as a duplicate or an out-of-range seq.
    tokio::time::sleep(Duration::from_millis(200)).await;
    while let Some(payload) = notices.try_next() {
        let v: serde_json::Value = serde_json::from_str(&payload).expect("notice is JSON");
        if v["project_id"] == "race" {
            received.push(v["seq"].as_i64().expect("seq is a number"));
        }
    }
    assert_eq!(
        received, expected_notices,
        "notices must arrive once each, in seq order, none missing"
    );
    println!(
        "writers={WRITERS} attempted={} committed={committed} rolled_back={rolled_back} \
         log_seq_range=1..={expected_last} (contiguous) notices_received={} in_order=true",
        WRITERS as usize * PER_WRITER,
        received.len()
    );
}

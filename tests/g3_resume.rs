//! G3 Resume: a client that subscribes with `since_seq = k` receives every
//! event after k exactly once, in seq order, then live events, with no gap
//! between the two; if history before k+1 has been trimmed it gets an
//! explicit `reset`. Also while retention trims concurrently with writers
//! and resuming clients: each resume either continues at exactly its
//! `since_seq + 1`, or gets a `reset`, never silent loss.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use pgrelay::retention::RetentionConfig;
use rand::{Rng, SeedableRng};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_under_load_never_silently_skips_an_event() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "trim", &["ann", "w"]).await;
    let mut config = relay_config(&db.url);
    config.retention = Some(RetentionConfig {
        interval: Duration::from_millis(100),
        keep_min: 20,
        min_age: Duration::ZERO,
        batch: 50,
        pause: Duration::from_millis(5),
    });
    let relay = start_relay(config).await;
    const TOTAL: u64 = 3000;
    let start = {
        let mut probe = WsClient::connect(relay.addr, "ann").await;
        probe.subscribe("trim", None).await["seq"]
            .as_u64()
            .expect("seq")
    };
    let last = start + TOTAL;
    let writer = {
        let client = db.client().await;
        tokio::spawn(async move {
            for i in 0..TOTAL {
                client
                    .execute(
                        "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('trim', 'w', $1)",
                        &[&format!("m{i}")],
                    )
                    .await
                    .expect("insert");
                if i % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        })
    };

    let mut clients = Vec::new();
    for n in 0..4u64 {
        let addr = relay.addr;
        let db_client = db.client().await;
        clients.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(n);
            let mut cursor = start;
            let (mut events, mut resets, mut resumes) = (0u64, 0u64, 0u64);
            while cursor < last {
                let mut ws = WsClient::connect(addr, "ann").await;
                ws.subscribe("trim", Some(cursor)).await;
                resumes += 1;
                // Read a little, then drop the connection and stay away.
                let quota = rng.random_range(50..400);
                let mut read = 0;
                while read < quota && cursor < last {
                    let Some(f) = ws.try_next_json(Duration::from_secs(20)).await else {
                        panic!("client {n}: stalled at seq {cursor}");
                    };
                    match f["type"].as_str() {
                        Some("cache_invalidate") => {
                            let seq = f["seq"].as_u64().expect("seq");
                            assert_eq!(seq, cursor + 1, "client {n}: silent gap after {cursor}");
                            cursor = seq;
                            events += 1;
                        }
                        Some("reset") => {
                            let seq = f["seq"].as_u64().expect("seq");
                            assert_eq!(f["reason"], "history_trimmed", "client {n}: {f}");
                            // A reset only where history really was trimmed:
                            // the horizon the database reports (it only
                            // grows) must have passed the cursor, so that
                            // event cursor + 1 is gone; anywhere else the
                            // events are there and must be sent.
                            let trimmed_through = db_client
                                .query_one(
                                    "SELECT trimmed_through FROM relay.scope_state('trim')",
                                    &[],
                                )
                                .await
                                .expect("the trim horizon")
                                .get::<_, i64>(0)
                                as u64;
                            assert!(
                                cursor < trimmed_through,
                                "client {n}: reset at cursor {cursor}, but history is trimmed \
                                 only through {trimmed_through}: {f}"
                            );
                            assert!(
                                seq > cursor && seq <= last,
                                "client {n}: reset from cursor {cursor} to {seq}: {f}"
                            );
                            cursor = seq;
                            resets += 1;
                        }
                        other => panic!("client {n}: unexpected frame {other:?}: {f}"),
                    }
                    read += 1;
                }
                drop(ws);
                tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
            }
            (events, resets, resumes)
        }));
    }
    writer.await.expect("writer");
    let mut total_resets = 0;
    for (n, client) in clients.into_iter().enumerate() {
        let (events, resets, resumes) = client.await.expect("client");
        println!("client {n}: {resumes} resumes, {events} events in order, {resets} resets, no silent gap");
        total_resets += resets;
    }
    let trimmed = relay.metrics.events_trimmed.load(Relaxed);
    println!("retention under load: {TOTAL} events written, {trimmed} trimmed meanwhile, {total_resets} resets sent");
    assert!(
        trimmed > 0,
        "the retention job trimmed while clients resumed"
    );
    assert_eq!(relay.metrics.retention_leader.load(Relaxed), 1);
    let oldest_ms = relay.metrics.oldest_event_age_ms.load(Relaxed);
    assert!(oldest_ms > 0, "the oldest retained event's age is recorded");
    println!("oldest retained event age after the run: {oldest_ms} ms");
    relay.shutdown().await;
}

//! Retention running concurrently with writers and resuming clients: no
//! client ever silently misses an event. Each resume either continues at
//! exactly its `since_seq + 1`, or gets an explicit `reset` (G3).

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use pgrelay::retention::RetentionConfig;
use rand::{Rng, SeedableRng};

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
                            assert_eq!(f["reason"], "history_trimmed");
                            assert!(seq >= cursor, "client {n}: reset backwards");
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

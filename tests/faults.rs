//! G6 and G7 under faults: the relay's LISTEN backend killed, the whole
//! Postgres stopped and restarted, a client that stops reading, forged
//! notices, two relays on one database, shutdown. Writers keep writing
//! throughout; every subscriber must end with the contiguous seq range.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// Inserts `n` messages into `project`, one per transaction, retrying any
/// that fail because the database is away. Returns how many committed.
async fn write_through_outages(
    url: String,
    project: &'static str,
    n: usize,
    pause: Duration,
) -> usize {
    let mut committed = 0;
    let mut client: Option<tokio_postgres::Client> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while committed < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "writer could not finish"
        );
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    client = Some(c);
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let Some(c) = client.as_ref() else { continue };
        let r = c
            .execute(
                "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ($1, 'w', $2)",
                &[&project, &format!("m{committed}")],
            )
            .await;
        match r {
            Ok(_) => committed += 1,
            // Ambiguous failures (connection lost at commit) are not
            // retried blindly: a lost commit would leave the count short,
            // an extra one is counted from the log below.
            Err(_) => {
                client = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tokio::time::sleep(pause).await;
    }
    committed
}

async fn latest_seq(url: &str, scope: &str) -> u64 {
    for _ in 0..200 {
        if let Ok((c, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            if let Ok(row) = c
                .query_one("SELECT latest_seq FROM relay.scope_state($1)", &[&scope])
                .await
            {
                return row.get::<_, i64>(0) as u64;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("could not read the latest seq");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_listen_backend_loses_nothing() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "k", &["ann", "bob", "w"]).await;
    let relay = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let mut bob = WsClient::connect(relay.addr, "bob").await;
    let start = ann.subscribe("k", None).await["seq"].as_u64().expect("seq");
    bob.subscribe("k", None).await;

    let writer = tokio::spawn(write_through_outages(
        db.url.clone(),
        "k",
        600,
        Duration::from_millis(2),
    ));
    let mut killed = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let n: i64 = c
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE application_name = 'pgrelay-listener' AND datname = current_database()",
                &[],
            )
            .await
            .expect("terminating the listener")
            .get(0);
        killed += n;
    }
    assert!(killed >= 1, "found the LISTEN backend to kill");
    let committed = writer.await.expect("writer");
    let last = latest_seq(&db.url, "k").await;
    assert_eq!(last, start + committed as u64);
    let a = ann.events_until("k", last, 60).await;
    let b = bob.events_until("k", last, 60).await;
    assert_contiguous(&a, start + 1, last, "ann");
    assert_contiguous(&b, start + 1, last, "bob");
    println!(
        "listener killed {killed} times: written {committed}, ann received {}, bob received {}, duplicates 0, gaps 0, reconnects {}, gaps_filled {}",
        a.len(),
        b.len(),
        relay.metrics.listener_reconnects.load(Relaxed),
        relay.metrics.gaps_filled.load(Relaxed)
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_postgres_loses_nothing() {
    let server = Arc::new(TestServer::dedicated().await);
    let db = server.fresh_db().await;
    let c = db.client().await;
    seed_project(&c, "r", &["ann", "bob", "w"]).await;
    drop(c);
    let relay = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let mut bob = WsClient::connect(relay.addr, "bob").await;
    let start = ann.subscribe("r", None).await["seq"].as_u64().expect("seq");
    bob.subscribe("r", None).await;

    let writer = tokio::spawn(write_through_outages(
        db.url.clone(),
        "r",
        400,
        Duration::from_millis(3),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.pg.stop().expect("stopping postgres"))
        .await
        .expect("stop");
    // While the database is away, /healthz says so.
    let mut down = String::new();
    for _ in 0..100 {
        down = http_get(relay.addr, "/healthz").await;
        if down.starts_with("HTTP/1.1 503") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        down.starts_with("HTTP/1.1 503"),
        "healthz while Postgres is down: {down}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.pg.start_again().expect("starting postgres again"))
        .await
        .expect("start");
    let committed = writer.await.expect("writer");
    let last = latest_seq(&db.url, "r").await;
    assert!(
        last >= start + committed as u64,
        "every acknowledged insert is in the log"
    );
    let a = ann.events_until("r", last, 60).await;
    let b = bob.events_until("r", last, 60).await;
    assert_contiguous(&a, start + 1, last, "ann");
    assert_contiguous(&b, start + 1, last, "bob");
    let mut health = relay.is_listening();
    for _ in 0..100 {
        if health {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        health = relay.is_listening();
    }
    assert!(health, "the relay is listening again after the restart");
    println!(
        "postgres restarted: written {committed} (log has {}), ann received {}, bob received {}, duplicates 0, gaps 0, reconnects {}, gaps_filled {}",
        last - start,
        a.len(),
        b.len(),
        relay.metrics.listener_reconnects.load(Relaxed),
        relay.metrics.gaps_filled.load(Relaxed)
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_foreign_notices_deliver_nothing_that_is_not_in_the_log() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "f", &["ann"]).await;
    let relay = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let latest = ann.subscribe("f", None).await["seq"].as_u64().expect("seq");
    let next = latest + 1;
    c.batch_execute(&format!(
        "NOTIFY cache_invalidate, 'not json';
         NOTIFY cache_invalidate, '{{\"hello\":\"world\"}}';
         NOTIFY cache_invalidate, '{{\"type\":\"cache_invalidate\",\"project_id\":\"f\",\"seq\":-3}}';
         SELECT pg_notify('cache_invalidate', json_build_object(
             'type','cache_invalidate','resource','message','action','INSERT','id','forged',
             'project_id','f','seq',{next},'timestamp','2026-01-01T00:00:00.000000Z',
             'data', json_build_object('body','FORGED'))::text);"
    ))
    .await
    .expect("forged notices");
    assert!(
        ann.try_next_json(Duration::from_millis(800))
            .await
            .is_none(),
        "a forged notice delivers nothing"
    );
    c.execute(
        "INSERT INTO chat.messages (id, project_id, sender_id, body) VALUES ('real', 'f', 'ann', 'real')",
        &[],
    )
    .await
    .expect("real insert");
    let f = ann.next_json(10).await;
    assert_eq!(f["seq"], next, "the real event with the forged seq arrives");
    assert_eq!(f["id"], "real");
    assert_eq!(f["data"]["body"], "real");
    assert!(ann
        .try_next_json(Duration::from_millis(300))
        .await
        .is_none());
    assert!(relay.metrics.foreign_notices.load(Relaxed) >= 3);
    assert!(relay.metrics.unconfirmed_notices.load(Relaxed) >= 1);
    println!(
        "forged notices: foreign {}, unconfirmed {}, delivered only the real event",
        relay.metrics.foreign_notices.load(Relaxed),
        relay.metrics.unconfirmed_notices.load(Relaxed)
    );
    relay.shutdown().await;
}

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
async fn shutdown_sends_going_away() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "bye", &["ann"]).await;
    let relay = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    ann.subscribe("bye", None).await;
    let addr = relay.addr;
    let stopping = tokio::spawn(relay.shutdown());
    assert_eq!(ann.close_code(10).await, Some(1001), "going away");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown finished in bounded time")
        .expect("shutdown task");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

/// One value from the relay's `/metrics`.
async fn metric(addr: std::net::SocketAddr, name: &str) -> f64 {
    let text = http_get(addr, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("/metrics has no {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_gets_everything_later_and_slows_no_one() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "slow", &["ann", "bob"]).await;
    // Its own process, so the relay's memory is measured apart from ours.
    let relay = RelayProcess::start(&db.url, &[]).await;
    let mut slow = WsClient::connect(relay.addr, "ann").await;
    let mut fast = WsClient::connect(relay.addr, "bob").await;
    let start = slow.subscribe("slow", None).await["seq"]
        .as_u64()
        .expect("seq");
    fast.subscribe("slow", None).await;

    let rss_before = relay.rss_kib();
    // ~2 KiB rows, 20 statements of 1,000: about 40 MiB of frames, far
    // more than the socket buffers and the ring (4096 frames) hold.
    const BATCHES: u64 = 20;
    const ROWS: u64 = 1000;
    let mut rss_during = Vec::new();
    let mut fast_seqs = Vec::new();
    for b in 0..BATCHES {
        c.execute(
            "INSERT INTO chat.messages (project_id, sender_id, body)
             SELECT 'slow', 'bob', repeat('z', 2000) FROM generate_series(1, $1::int)",
            &[&(ROWS as i32)],
        )
        .await
        .expect("insert");
        // The fast client keeps up meanwhile.
        fast_seqs.extend(fast.events_until("slow", start + (b + 1) * ROWS, 30).await);
        rss_during.push(relay.rss_kib());
    }
    let last = start + BATCHES * ROWS;
    assert_contiguous(&fast_seqs, start + 1, last, "the reading client");
    let reads_before = metric(relay.addr, "pgrelay_log_reads_total").await;
    // Now the slow client reads everything.
    let slow_seqs = slow.events_until("slow", last, 120).await;
    assert_contiguous(
        &slow_seqs,
        start + 1,
        last,
        "the client that stopped reading",
    );
    let catchup_reads = metric(relay.addr, "pgrelay_log_reads_total").await - reads_before;
    let rss_after = relay.rss_kib();
    let peak = rss_during.iter().copied().max().unwrap_or(0).max(rss_after);
    println!(
        "slow client: {} events of ~2 KiB (~{} MiB) written while it did not read; the reading client got all {} in step; \
         the stalled one then got all of them through {catchup_reads} catch-up reads of the log; \
         relay RSS KiB before {rss_before}, during {:?}, after {rss_after}",
        last - start,
        (last - start) * 2 / 1024,
        fast_seqs.len(),
        rss_during
    );
    assert!(
        catchup_reads >= 1.0,
        "the stalled client was fed from the log"
    );
    // The relay holds at most the ring (16 MiB cap) plus socket buffers,
    // never the 40 MiB backlog.
    assert!(
        peak.saturating_sub(rss_before) < 40 * 1024,
        "relay memory grew by {} KiB while a client stalled",
        peak - rss_before
    );
}

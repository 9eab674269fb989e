//! G6 Self-healing: the relay's LISTEN backend killed, the whole Postgres
//! stopped and restarted, while writers keep writing: the relay reconnects,
//! fills every gap from the event log, says on `/healthz` while it is not
//! listening, and every subscriber ends with the contiguous seq range. A
//! relay that shuts down tells its clients to come back (going away) in
//! bounded time. The private Postgres these faults are made with keeps its
//! data across a stop and a start.

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

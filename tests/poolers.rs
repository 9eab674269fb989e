//! G6 behind a real PgBouncer: a transaction-mode pooler on the LISTEN path
//! drops other sessions' notices, and the relay must say so (`/healthz`
//! 503 with the reason, polling meanwhile), never count itself ready; the
//! same pooler in front of the pool, with LISTEN on a direct or
//! session-mode connection, must deliver everything promptly.

mod common;

#[path = "common/pgbouncer.rs"]
mod pgbouncer;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use pgbouncer::PgBouncer;

/// The most an event may take from commit to client where delivery must
/// be prompt, in milliseconds: generous (a few ms is typical), and far
/// below what anything but a notice could achieve with the periodic resync
/// set to minutes.
const PROMPTLY_MS: f64 = 1000.0;

/// Milliseconds from each event's capture to its arrival, for `n` events of
/// `project` after `after`; panics on a gap, a duplicate or a reset.
async fn delays(ws: &mut WsClient, project: &str, after: u64, n: u64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut next = after + 1;
    while next <= after + n {
        let f = ws.next_json(30).await;
        assert_ne!(f["type"], "reset", "{f}");
        if f["type"] != "cache_invalidate" {
            continue;
        }
        assert_eq!(f["project_id"], project);
        assert_eq!(f["seq"].as_u64(), Some(next), "in order, once each");
        let ts = pgrelay::relay::protocol::parse_timestamp(f["timestamp"].as_str().expect("ts"))
            .expect("a wire timestamp");
        out.push((chrono::Utc::now().timestamp_micros() - ts) as f64 / 1000.0);
        next += 1;
    }
    out
}

fn summary(mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    format!(
        "p50 {:.1} ms, max {:.1} ms",
        ms[ms.len() / 2],
        ms[ms.len() - 1]
    )
}

/// Inserts `n` rows, 20 ms apart, in the background (the test reads
/// meanwhile, so what it measures is delivery, not its own lateness).
fn insert_spread(url: &str, project: &'static str, n: u64) -> tokio::task::JoinHandle<()> {
    let url = url.to_string();
    tokio::spawn(async move {
        let (c, conn) = connect(&url).await;
        insert_rows(&c, project, n).await;
        drop(c);
        let _ = conn.await;
    })
}

async fn insert_rows(c: &tokio_postgres::Client, project: &str, n: u64) {
    for i in 0..n {
        c.execute(
            "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ($1, 'ann', $2)",
            &[&project, &format!("m{i}")],
        )
        .await
        .expect("insert");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_pooler_on_the_listen_path_is_reported_never_trusted() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "txl", &["ann"]).await;
    let bouncer = PgBouncer::start(TestServer::shared().pg.port(), &[&db.name]).await;
    let mut config = relay_config(&bouncer.url(&db.name, "tx"));
    config.transaction_pooler = true;
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let relay = pgrelay::server::start(config, socket)
        .await
        .expect("the relay starts");

    // It says what is wrong and what to change.
    let mut health = String::new();
    for _ in 0..200 {
        health = http_get(relay.addr, "/healthz").await;
        if health.contains("PGRELAY_LISTEN_DATABASE_URL") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    assert!(
        health.contains("transaction-mode pooler")
            && health.contains("PGRELAY_LISTEN_DATABASE_URL"),
        "/healthz names the cause and the setting: {health}"
    );

    // Meanwhile it serves by polling the log: nothing is lost.
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let start = ann.subscribe("txl", None).await["seq"]
        .as_u64()
        .expect("seq");
    let writer = insert_spread(&db.url, "txl", 20);
    let polled = delays(&mut ann, "txl", start, 20).await;
    writer.await.expect("writer");
    assert!(!relay.is_listening(), "never counted as listening");
    assert_eq!(relay.metrics.listener_reconnects.load(Relaxed), 0);
    assert!(
        http_get(relay.addr, "/healthz")
            .await
            .starts_with("HTTP/1.1 503"),
        "still not ready"
    );
    println!(
        "LISTEN through PgBouncer pool_mode=transaction: /healthz 503 naming PGRELAY_LISTEN_DATABASE_URL; \
         20 events delivered by polling (poll interval 100 ms in tests): {}",
        summary(polled)
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_pooler_in_front_of_the_pool_delivers_promptly() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "txp", &["ann", "bob"]).await;
    let bouncer = PgBouncer::start(TestServer::shared().pg.port(), &[&db.name]).await;
    // One relay LISTENs directly, the other through the pooler in session
    // mode; both read and serve the API through it in transaction mode.
    let mut direct = relay_config(&bouncer.url(&db.name, "tx"));
    direct.transaction_pooler = true;
    direct.listen_database_url = Some(db.url.clone());
    // Only notices can deliver promptly: the safety-net resync is far away,
    // and a listening relay does not poll.
    direct.resync_interval = Duration::from_secs(600);
    let mut session = direct.clone();
    session.listen_database_url = Some(bouncer.url(&db.name, "session"));
    let r1 = start_relay(direct).await;
    let r2 = start_relay(session).await;
    let mut ann = WsClient::connect(r1.addr, "ann").await;
    let mut bob = WsClient::connect(r2.addr, "bob").await;
    let start = ann.subscribe("txp", None).await["seq"]
        .as_u64()
        .expect("seq");
    bob.subscribe("txp", None).await;

    let writer = insert_spread(&db.url, "txp", 100);
    let (a, b) = tokio::join!(
        delays(&mut ann, "txp", start, 100),
        delays(&mut bob, "txp", start, 100)
    );
    writer.await.expect("writer");
    // Promptly: each event within a second of its commit (a few ms is
    // typical).
    for (who, delays) in [("LISTEN direct", &a), ("LISTEN through session mode", &b)] {
        let max = delays.iter().copied().fold(0.0, f64::max);
        assert!(
            max < PROMPTLY_MS,
            "{who}: an event took {max:.1} ms from commit to client (bound {PROMPTLY_MS} ms)"
        );
    }
    for relay in [&r1, &r2] {
        assert!(relay.is_listening());
        assert!(http_get(relay.addr, "/healthz")
            .await
            .starts_with("HTTP/1.1 200"));
    }
    // The API's statements pass the pooler too.
    let (status, body) = http_json(r1.addr, "GET", "/v1/projects", Some("ann"), None).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !bouncer.log().contains("not linked"),
        "no notice was dropped by the pooler"
    );
    println!(
        "pool through PgBouncer pool_mode=transaction: LISTEN direct {}, LISTEN through session mode {}; \
         100 events each, in order, once",
        summary(a),
        summary(b)
    );
    r1.shutdown().await;
    r2.shutdown().await;
}

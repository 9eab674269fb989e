//! G6 Self-healing: the relay's LISTEN backend killed, the whole Postgres
//! stopped and restarted, while writers keep writing: the relay reconnects,
//! fills every gap from the event log, says on `/healthz` while it is not
//! listening, and every subscriber ends with the contiguous seq range. The
//! periodic safety-net resync is set too far away to deliver anything: the
//! events committed while LISTEN is down are found by the polling fallback
//! (counted in `pgrelay_gaps_filled_total`), LISTEN comes back (counted in
//! `pgrelay_listener_reconnects_total`, `/healthz` listening), and after
//! healing notices deliver within a bound. A
//! relay that shuts down tells its clients to come back (going away) in
//! bounded time. The private Postgres these faults are made with keeps its
//! data across a stop and a start.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// Inserts `n` messages into `project`, one per transaction, retrying any
/// that fail because the database is away. Returns how many committed.
/// While `hold` is set, the writer waits (after the insert in flight).
async fn write_through_outages(
    url: String,
    project: &'static str,
    n: usize,
    pause: Duration,
    hold: Arc<AtomicBool>,
) -> usize {
    let mut committed = 0;
    let mut client: Option<tokio_postgres::Client> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while committed < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "writer could not finish"
        );
        if hold.load(Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
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

/// Delivery after healing must be this prompt (typically tens of ms): with
/// LISTEN back it comes from notices, and nothing else could deliver in
/// time, since the periodic resync is 10 minutes away and polling stops.
const AFTER_HEALING: Duration = Duration::from_secs(5);
/// How long a LISTEN connection may take to come back once it can (the
/// reconnect backoff reaches 5 s, with jitter).
const RELISTEN: Duration = Duration::from_secs(20);

/// The test timings, except that the safety-net resync is too far away to
/// deliver anything: what delivers is LISTEN, the resync after a reconnect,
/// and the polling fallback while LISTEN is down. LISTEN goes through
/// `listen_url` (a fault proxy that can refuse it new connections).
fn healing_config(url: &str, listen_url: String) -> pgrelay::config::RelayConfig {
    let mut config = relay_config(url);
    config.resync_interval = Duration::from_secs(600);
    config.listen_database_url = Some(listen_url);
    config
}

/// Reads events of `project` into `seen` until it holds `last` (panics
/// after `secs`).
async fn read_within(ws: &mut WsClient, project: &str, seen: &mut Vec<u64>, last: u64, secs: u64) {
    if seen.last().is_some_and(|s| *s >= last) {
        return;
    }
    seen.extend(ws.events_until(project, last, secs).await);
}

async fn read_to(ws: &mut WsClient, project: &str, seen: &mut Vec<u64>, last: u64) {
    read_within(ws, project, seen, last, 60).await;
}

async fn insert(c: &tokio_postgres::Client, project: &str, n: usize) {
    for i in 0..n {
        c.execute(
            "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ($1, 'w', $2)",
            &[&project, &format!("t{i}")],
        )
        .await
        .expect("a test write");
    }
}

async fn counter(relay: &pgrelay::server::RelayHandle, name: &str) -> u64 {
    metric(relay.addr, name).await as u64
}

/// Waits until the counter `name` reaches `at_least` (it may lag the
/// delivery it counts: a subscriber may read the log itself while the hub
/// is not trusted, before the hub's own read counts), or panics after 5 s.
/// Returns its value.
async fn counted(
    relay: &pgrelay::server::RelayHandle,
    name: &str,
    at_least: u64,
    what: &str,
) -> u64 {
    let t0 = tokio::time::Instant::now();
    loop {
        let n = counter(relay, name).await;
        if n >= at_least {
            return n;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{what}: {name} is {n}, expected at least {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With LISTEN healed, `n` new events reach both subscribers within
/// [`AFTER_HEALING`], announced by notices: no resync finds any of them.
async fn delivered_by_notices_after_healing(
    relay: &pgrelay::server::RelayHandle,
    c: &tokio_postgres::Client,
    url: &str,
    project: &str,
    subscribers: [(&mut WsClient, &mut Vec<u64>); 2],
) -> u64 {
    let gaps = counter(relay, "pgrelay_gaps_filled_total").await;
    let notices = counter(relay, "pgrelay_notices_received_total").await;
    let t0 = tokio::time::Instant::now();
    insert(c, project, 20).await;
    let last = latest_seq(url, project).await;
    for (ws, seen) in subscribers {
        read_within(ws, project, seen, last, AFTER_HEALING.as_secs()).await;
    }
    let took = t0.elapsed();
    assert!(
        took < AFTER_HEALING,
        "20 events after healing took {took:?} to arrive (bound {AFTER_HEALING:?})"
    );
    assert_eq!(
        counter(relay, "pgrelay_gaps_filled_total").await,
        gaps,
        "after healing, events are announced by notices, not found by a resync"
    );
    counted(
        relay,
        "pgrelay_notices_received_total",
        notices + 20,
        "the healed LISTEN connection received the 20 notices",
    )
    .await;
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_listen_backend_loses_nothing() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "k", &["ann", "bob", "w"]).await;
    let proxy = FaultProxy::start(TestServer::shared().pg.port()).await;
    let relay = start_relay(healing_config(&db.url, proxy.url(&db.url))).await;
    assert_eq!(
        counter(&relay, "pgrelay_listener_reconnects_total").await,
        1
    );
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let mut bob = WsClient::connect(relay.addr, "bob").await;
    let start = ann.subscribe("k", None).await["seq"].as_u64().expect("seq");
    bob.subscribe("k", None).await;
    let (mut a, mut b) = (Vec::new(), Vec::new());

    let hold = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_through_outages(
        db.url.clone(),
        "k",
        600,
        Duration::from_millis(2),
        hold.clone(),
    ));
    let rounds = 3;
    for round in 1..=rounds {
        tokio::time::sleep(Duration::from_millis(250)).await;
        wait_healthz_listening(relay.addr, RELISTEN).await;
        // Everything announced so far is delivered before the kill, so no
        // read for a notice is pending that could take the events committed
        // after it along (and count them as announced).
        hold.store(true, Relaxed);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before_kill = latest_seq(&db.url, "k").await;
        read_to(&mut ann, "k", &mut a, before_kill).await;
        let gaps = counter(&relay, "pgrelay_gaps_filled_total").await;
        // The LISTEN connection cannot come back until the test says so.
        proxy.refuse_new();
        let killed = terminate_listeners(&c).await;
        assert_eq!(killed, 1, "round {round}: the one LISTEN backend, killed");
        wait_healthz_not_listening(relay.addr, Duration::from_secs(10)).await;
        hold.store(false, Relaxed);
        // Committed while no LISTEN connection exists: no notice announces
        // them, so only reads of the log can deliver them now, and the
        // polling fallback's count them.
        insert(&c, "k", 5).await;
        let mark = latest_seq(&db.url, "k").await;
        read_to(&mut ann, "k", &mut a, mark).await;
        let (status, health) = healthz(relay.addr).await;
        assert_eq!(
            (status, &health["listening"]),
            (503, &serde_json::Value::Bool(false)),
            "round {round}: delivered while LISTEN was still down: {health}"
        );
        counted(
            &relay,
            "pgrelay_gaps_filled_total",
            gaps + 5,
            &format!("round {round}: the 5 unannounced events were found by resync reads"),
        )
        .await;
        proxy.heal();
        wait_healthz_listening(relay.addr, RELISTEN).await;
        assert_eq!(
            counter(&relay, "pgrelay_listener_reconnects_total").await,
            1 + round,
            "round {round}: LISTEN came back once, proven"
        );
    }
    let committed = writer.await.expect("writer");
    let last = latest_seq(&db.url, "k").await;
    assert_eq!(last, start + committed as u64 + 5 * rounds);
    read_to(&mut ann, "k", &mut a, last).await;
    read_to(&mut bob, "k", &mut b, last).await;
    let end = delivered_by_notices_after_healing(
        &relay,
        &c,
        &db.url,
        "k",
        [(&mut ann, &mut a), (&mut bob, &mut b)],
    )
    .await;
    assert_contiguous(&a, start + 1, end, "ann");
    assert_contiguous(&b, start + 1, end, "bob");
    println!(
        "listener killed {rounds} times: written {} (5 of each round while LISTEN was down), ann received {}, bob received {}, \
         duplicates 0, gaps 0, reconnects {}, gaps_filled {}",
        end - start,
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
    let proxy = FaultProxy::start(server.pg.port()).await;
    let relay = start_relay(healing_config(&db.url, proxy.url(&db.url))).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let mut bob = WsClient::connect(relay.addr, "bob").await;
    let start = ann.subscribe("r", None).await["seq"].as_u64().expect("seq");
    bob.subscribe("r", None).await;
    let (mut a, mut b) = (Vec::new(), Vec::new());

    let hold = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_through_outages(
        db.url.clone(),
        "r",
        400,
        Duration::from_millis(3),
        hold.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Everything announced so far is delivered before the stop: a read for a
    // notice that the stop interrupts is retried as a notice read, and would
    // take the events committed after the restart with it, uncounted. The
    // writer goes on once Postgres is down, retrying until it is back.
    hold.store(true, Relaxed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before_stop = latest_seq(&db.url, "r").await;
    read_to(&mut ann, "r", &mut a, before_stop).await;
    let gaps = counter(&relay, "pgrelay_gaps_filled_total").await;
    // After the restart, LISTEN stays away until the test says so.
    proxy.refuse_new();
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.pg.stop().expect("stopping postgres"))
        .await
        .expect("stop");
    hold.store(false, Relaxed);
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
    // Committed after the restart with no LISTEN connection: only the
    // polling fallback can deliver them now.
    let c = db.client().await;
    insert(&c, "r", 5).await;
    let mark = latest_seq(&db.url, "r").await;
    read_to(&mut ann, "r", &mut a, mark).await;
    let (status, health) = healthz(relay.addr).await;
    assert_eq!(
        (status, &health["listening"]),
        (503, &serde_json::Value::Bool(false)),
        "delivered while LISTEN was still down: {health}"
    );
    counted(
        &relay,
        "pgrelay_gaps_filled_total",
        gaps + 5,
        "the events committed after the restart were found by resync reads",
    )
    .await;
    proxy.heal();
    let relisten = wait_healthz_listening(relay.addr, RELISTEN).await;
    assert_eq!(
        counter(&relay, "pgrelay_listener_reconnects_total").await,
        2,
        "LISTEN came back once after the restart, proven"
    );
    let committed = writer.await.expect("writer");
    let last = latest_seq(&db.url, "r").await;
    assert!(
        last >= start + committed as u64 + 5,
        "every acknowledged insert is in the log"
    );
    read_to(&mut ann, "r", &mut a, last).await;
    read_to(&mut bob, "r", &mut b, last).await;
    let end = delivered_by_notices_after_healing(
        &relay,
        &c,
        &db.url,
        "r",
        [(&mut ann, &mut a), (&mut bob, &mut b)],
    )
    .await;
    assert_contiguous(&a, start + 1, end, "ann");
    assert_contiguous(&b, start + 1, end, "bob");
    println!(
        "postgres restarted: written {committed} + 25 (log has {}), ann received {}, bob received {}, duplicates 0, gaps 0, \
         LISTEN back {relisten:?} after it could, reconnects {}, gaps_filled {}",
        end - start,
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

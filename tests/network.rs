//! G6 on a bad network: a TCP fault proxy sits between the relay and
//! Postgres and freezes connections without a reset (a half-open
//! partition), resets them, or delays every byte; writers write directly
//! to Postgres throughout. Every subscriber must end with every committed
//! row once, in order, and the relay must notice and heal within the
//! bound DESIGN.md G6 sets (15 s). The safety-net resync is set too far
//! away to deliver: after each fault `/healthz` must say the relay LISTENs
//! again and new events arrive within a bound, and a recorder asserts on
//! every frame it got, also after the last awaited event (a late `reset`).

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::time::Instant;

/// What DESIGN.md G6 allows for noticing a half-open connection and
/// delivering again.
const BOUND: Duration = Duration::from_secs(15);

/// A subscriber reading in the background, noting when each event came,
/// and every frame that is neither an event of its project nor expected
/// (a `reset` above all): the test asserts on them, whenever they came.
struct Recorder {
    seen: Arc<Mutex<Vec<(u64, Instant)>>>,
    unexpected: Arc<Mutex<Vec<serde_json::Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    /// Connects, subscribes from the latest event and records from there.
    /// Returns the recorder and the seq it started after.
    async fn start(addr: std::net::SocketAddr, user: &str, project: &str) -> (Recorder, u64) {
        let mut ws = WsClient::connect(addr, user).await;
        let start = ws.subscribe(project, None).await["seq"]
            .as_u64()
            .expect("seq");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let unexpected = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let seen = seen.clone();
            let unexpected = unexpected.clone();
            let project = project.to_string();
            tokio::spawn(async move {
                use futures_util::StreamExt;
                // Until the relay closes the connection at the test's end.
                while let Some(Ok(message)) = ws.ws.next().await {
                    let tokio_tungstenite::tungstenite::Message::Text(text) = message else {
                        continue;
                    };
                    let f: serde_json::Value = serde_json::from_str(&text).expect("JSON frames");
                    if f["type"] == "cache_invalidate" && f["project_id"] == project.as_str() {
                        let seq = f["seq"].as_u64().expect("seq");
                        seen.lock().expect("lock").push((seq, Instant::now()));
                    } else {
                        unexpected.lock().expect("lock").push(f);
                    }
                }
            })
        };
        (
            Recorder {
                seen,
                unexpected,
                task,
            },
            start,
        )
    }

    fn assert_nothing_unexpected(&self) {
        let unexpected = self.unexpected.lock().expect("lock");
        assert!(
            unexpected.is_empty(),
            "frames other than events: {unexpected:?}"
        );
    }

    /// Asserts that exactly `from..=to` arrived, once each, in order, and
    /// nothing else: also after `to`, for a while (a late `reset` or a
    /// duplicate would otherwise go unseen).
    async fn assert_exactly(&self, from: u64, to: u64, who: &str) {
        self.until(to, 30).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!self.task.is_finished(), "{who}: the connection ended");
        self.assert_nothing_unexpected();
        let seqs: Vec<u64> = self
            .seen
            .lock()
            .expect("lock")
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_contiguous(&seqs, from, to, who);
    }

    /// The seqs received once `last` has arrived (panics after `secs`).
    async fn until(&self, last: u64, secs: u64) -> Vec<u64> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let seqs: Vec<u64> = self
                .seen
                .lock()
                .expect("lock")
                .iter()
                .map(|(s, _)| *s)
                .collect();
            self.assert_nothing_unexpected();
            if seqs.last().is_some_and(|s| *s >= last) {
                return seqs;
            }
            assert!(
                Instant::now() < deadline && !self.task.is_finished(),
                "timed out: got {} events, last {:?}, wanted up to {last}",
                seqs.len(),
                seqs.last()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// When the first event after `seq` arrived.
    fn first_after(&self, seq: u64) -> Option<Instant> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .find(|(s, _)| *s > seq)
            .map(|(_, at)| *at)
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Inserts a row into `project` every `pause` for `duration`, directly
/// into Postgres. Returns how many committed.
async fn write_for(url: String, project: &'static str, duration: Duration, pause: Duration) -> u64 {
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("writer connects");
    tokio::spawn(conn);
    let end = Instant::now() + duration;
    let mut n = 0;
    while Instant::now() < end {
        c.execute(
            "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ($1, 'w', $2)",
            &[&project, &format!("m{n}")],
        )
        .await
        .expect("a direct write");
        n += 1;
        tokio::time::sleep(pause).await;
    }
    n
}

async fn latest_seq(c: &tokio_postgres::Client, scope: &str) -> u64 {
    c.query_one("SELECT latest_seq FROM relay.scope_state($1)", &[&scope])
        .await
        .expect("latest seq")
        .get::<_, i64>(0) as u64
}

/// A relay whose every database connection goes through `proxy`. Its
/// safety-net resync is too far away to deliver anything in these tests:
/// what heals is the relay noticing the fault and reconnecting.
async fn relay_through(proxy: &FaultProxy, db: &TestDb) -> pgrelay::server::RelayHandle {
    let mut config = relay_config(&proxy.url(&db.url));
    config.resync_interval = Duration::from_secs(600);
    start_relay(config).await
}

/// Delivery after healing must be this prompt (typically tens of ms).
const AFTER_HEALING: Duration = Duration::from_secs(5);

/// Once the fault is over: `/healthz` says the relay LISTENs again within
/// [`BOUND`], and new events reach every recorder within
/// [`AFTER_HEALING`]. Returns the last seq.
async fn delivers_after_healing(
    relay: &pgrelay::server::RelayHandle,
    c: &tokio_postgres::Client,
    project: &str,
    recorders: &[&Recorder],
) -> u64 {
    wait_healthz_listening(relay.addr, BOUND).await;
    assert!(relay.is_listening());
    let t0 = Instant::now();
    for i in 0..10 {
        c.execute(
            "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ($1, 'w', $2)",
            &[&project, &format!("after {i}")],
        )
        .await
        .expect("a write after healing");
    }
    let last = latest_seq(c, project).await;
    for r in recorders {
        r.until(last, AFTER_HEALING.as_secs()).await;
    }
    let took = t0.elapsed();
    assert!(
        took < AFTER_HEALING,
        "10 events after healing took {took:?} (bound {AFTER_HEALING:?})"
    );
    last
}

async fn setup(project: &str) -> (TestDb, tokio_postgres::Client, FaultProxy) {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, project, &["ann", "bob", "carl", "w"]).await;
    let proxy = FaultProxy::start(TestServer::shared().pg.port()).await;
    (db, c, proxy)
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_half_open_partition_is_detected_and_healed() {
    let (db, c, proxy) = setup("part").await;
    let relay = relay_through(&proxy, &db).await;
    let (ann, start) = Recorder::start(relay.addr, "ann", "part").await;
    let (bob, _) = Recorder::start(relay.addr, "bob", "part").await;
    let writer = tokio::spawn(write_for(
        db.url.clone(),
        "part",
        Duration::from_secs(11),
        Duration::from_millis(20),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let reconnects = relay.metrics.listener_reconnects.load(Relaxed);
    let t0 = Instant::now();
    // Every connection open now goes silent for good; new ones pass.
    proxy.freeze_existing();
    // Events after this one are committed during the partition.
    let at_fault = latest_seq(&c, "part").await;

    // A client arriving during the partition gets an answer.
    let addr = relay.addr;
    let newcomer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut carl = WsClient::connect(addr, "carl").await;
        loop {
            carl.send_json(serde_json::json!({"action": "subscribe", "project_id": "part"}))
                .await;
            let f = carl.next_json(BOUND.as_secs()).await;
            match f["type"].as_str() {
                Some("subscribed") => return Instant::now(),
                Some("error") if f["code"] == "unavailable" => continue,
                _ => panic!("unexpected answer to subscribe: {f}"),
            }
        }
    });

    let (mut pool_detected, mut listen_healed) = (None, None);
    while Instant::now() < t0 + BOUND && (pool_detected.is_none() || listen_healed.is_none()) {
        if pool_detected.is_none() && relay.pool_health().timeouts.load(Relaxed) > 0 {
            pool_detected = Some(t0.elapsed());
        }
        if listen_healed.is_none() && relay.metrics.listener_reconnects.load(Relaxed) > reconnects {
            listen_healed = Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pool_detected = pool_detected.expect("a pooled connection's missed deadline was noticed");
    let listen_healed = listen_healed.expect("the LISTEN connection was replaced and proven");
    let answered = newcomer.await.expect("newcomer") - t0;

    let committed = writer.await.expect("writer");
    let last = latest_seq(&c, "part").await;
    assert_eq!(last, start + committed);
    let a = ann.until(last, 30).await;
    let b = bob.until(last, 30).await;
    let end = delivers_after_healing(&relay, &c, "part", &[&ann, &bob]).await;
    ann.assert_exactly(start + 1, end, "ann").await;
    bob.assert_exactly(start + 1, end, "bob").await;
    let healed = ann.first_after(at_fault).expect("delivery resumed") - t0;
    assert!(
        pool_detected < BOUND,
        "pool partition noticed after {pool_detected:?}"
    );
    assert!(
        listen_healed < BOUND,
        "LISTEN healed after {listen_healed:?}"
    );
    assert!(healed < BOUND, "delivery resumed after {healed:?}");
    assert!(
        answered < BOUND,
        "a new subscribe answered after {answered:?}"
    );
    println!(
        "permanent half-open partition: pooled connection discarded after {}, LISTEN replaced and proven after {}, \
         delivery resumed after {}, a new subscriber answered after {}; written {committed}, ann {} and bob {} events, \
         lost 0, duplicates 0; connections discarded {}",
        secs(pool_detected),
        secs(listen_healed),
        secs(healed),
        secs(answered),
        a.len(),
        b.len(),
        relay.pool_health().timeouts.load(Relaxed),
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_second_half_open_partition_loses_nothing() {
    let (db, c, proxy) = setup("blip").await;
    let relay = relay_through(&proxy, &db).await;
    let (ann, start) = Recorder::start(relay.addr, "ann", "blip").await;
    let writer = tokio::spawn(write_for(
        db.url.clone(),
        "blip",
        Duration::from_secs(9),
        Duration::from_millis(20),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = Instant::now();
    proxy.freeze_existing();
    let at_fault = latest_seq(&c, "blip").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.heal();
    let committed = writer.await.expect("writer");
    let last = latest_seq(&c, "blip").await;
    assert_eq!(last, start + committed);
    let a = ann.until(last, 30).await;
    let end = delivers_after_healing(&relay, &c, "blip", &[&ann]).await;
    ann.assert_exactly(start + 1, end, "ann").await;
    let healed = ann.first_after(at_fault).expect("delivery resumed") - t0;
    assert!(healed < BOUND, "delivery resumed after {healed:?}");
    println!(
        "5 s half-open partition: delivery resumed {} after it began; written {committed}, received {}, lost 0, \
         duplicates 0; connections discarded {}",
        secs(healed),
        a.len(),
        relay.pool_health().timeouts.load(Relaxed),
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_says_why_while_the_database_is_out_of_reach() {
    let (db, c, proxy) = setup("dark").await;
    let relay = relay_through(&proxy, &db).await;
    let (ann, start) = Recorder::start(relay.addr, "ann", "dark").await;
    let writer = tokio::spawn(write_for(
        db.url.clone(),
        "dark",
        Duration::from_secs(3),
        Duration::from_millis(20),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    // Existing and new connections alike hear nothing.
    proxy.freeze_all();
    let mut down = None;
    while Instant::now() < t0 + BOUND {
        let health = http_get(relay.addr, "/healthz").await;
        if health.starts_with("HTTP/1.1 503") && health.contains("database reads fail") {
            down = Some((t0.elapsed(), health));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (reported, health) = down.expect("/healthz turned 503 naming the reads");
    let body = health.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let body: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
    assert_eq!(body["reads"], false, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no answer") || r.contains("no connection")),
        "{body}"
    );
    proxy.heal();
    let t1 = Instant::now();
    let mut up = None;
    while Instant::now() < t1 + BOUND {
        if http_get(relay.addr, "/healthz")
            .await
            .starts_with("HTTP/1.1 200")
        {
            up = Some(t1.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let up = up.expect("/healthz is 200 again after the network heals");
    let committed = writer.await.expect("writer");
    let last = latest_seq(&c, "dark").await;
    assert_eq!(last, start + committed);
    let a = ann.until(last, 30).await;
    let end = delivers_after_healing(&relay, &c, "dark", &[&ann]).await;
    ann.assert_exactly(start + 1, end, "ann").await;
    println!(
        "database out of reach: /healthz 503 after {} with reason {:?}; 200 again {} after the network healed; \
         written {committed}, received {}, lost 0",
        secs(reported),
        body["reason"],
        secs(up),
        a.len()
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resetting_every_connection_repeatedly_loses_nothing() {
    let (db, c, proxy) = setup("rst").await;
    let relay = relay_through(&proxy, &db).await;
    let (ann, start) = Recorder::start(relay.addr, "ann", "rst").await;
    let (bob, _) = Recorder::start(relay.addr, "bob", "rst").await;
    let writer = tokio::spawn(write_for(
        db.url.clone(),
        "rst",
        Duration::from_secs(6),
        Duration::from_millis(10),
    ));
    let before = proxy.connections();
    let reconnects = relay.metrics.listener_reconnects.load(Relaxed);
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        proxy.reset_existing();
    }
    let committed = writer.await.expect("writer");
    let last = latest_seq(&c, "rst").await;
    assert_eq!(last, start + committed);
    let a = ann.until(last, 30).await;
    let b = bob.until(last, 30).await;
    let end = delivers_after_healing(&relay, &c, "rst", &[&ann, &bob]).await;
    ann.assert_exactly(start + 1, end, "ann").await;
    bob.assert_exactly(start + 1, end, "bob").await;
    // Each reset ends the LISTEN connection; each is replaced and proven
    // again (a reset that comes before a replacement is proven costs no
    // extra one).
    let proven = relay.metrics.listener_reconnects.load(Relaxed) - reconnects;
    assert!(
        proven >= 1,
        "LISTEN was replaced and proven after the resets, {proven} times"
    );

    println!(
        "every connection reset 8 times, 600 ms apart: written {committed}, ann {} and bob {} events, lost 0, \
         duplicates 0; {} new connections, LISTEN proven {} times, gaps filled from the log {}",
        a.len(),
        b.len(),
        proxy.connections() - before,
        relay.metrics.listener_reconnects.load(Relaxed),
        relay.metrics.gaps_filled.load(Relaxed),
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_ms_latency_each_way_delivers_everything_in_order() {
    let (db, c, proxy) = setup("slow").await;
    proxy.set_latency(Duration::from_millis(100));
    let relay = relay_through(&proxy, &db).await;
    let (ann, start) = Recorder::start(relay.addr, "ann", "slow").await;
    let (bob, _) = Recorder::start(relay.addr, "bob", "slow").await;
    let committed = write_for(
        db.url.clone(),
        "slow",
        Duration::from_secs(4),
        Duration::from_millis(10),
    )
    .await;
    let last = latest_seq(&c, "slow").await;
    assert_eq!(last, start + committed);
    let a = ann.until(last, 30).await;
    let b = bob.until(last, 30).await;
    ann.assert_exactly(start + 1, last, "ann").await;
    bob.assert_exactly(start + 1, last, "bob").await;
    assert_eq!(
        relay.pool_health().timeouts.load(Relaxed),
        0,
        "a slow network is not a partition"
    );
    assert!(relay.is_listening());
    assert_eq!(
        relay.metrics.listener_reconnects.load(Relaxed),
        1,
        "LISTEN was never lost"
    );
    println!(
        "100 ms each way: written {committed}, ann {} and bob {} events, lost 0, duplicates 0, no connection discarded",
        a.len(),
        b.len(),
    );
    relay.shutdown().await;
}

/// A scheduled re-check whose query meets a half-open partition is a
/// database failure, not the app's rule failing: the subscription stays
/// and delivery resumes. (The pool once took the rule's timeout for the
/// rule's fault whatever the network did, and ended the subscription with
/// `authorize_failed`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_during_a_scheduled_recheck_keeps_the_subscription() {
    use pgrelay::metrics::RecheckCause;
    let (db, c, proxy) = setup("rchk").await;
    let mut config = relay_config(&proxy.url(&db.url));
    config.resync_interval = Duration::from_secs(600);
    config.reauthorize_interval = Some(Duration::from_millis(500));
    let relay = start_relay(config).await;
    let (ann, start) = Recorder::start(relay.addr, "ann", "rchk").await;
    let rechecks = || relay.metrics.reauthorizations[RecheckCause::Schedule as usize].load(Relaxed);
    let t0 = Instant::now();
    while rechecks() == 0 {
        assert!(t0.elapsed() < BOUND, "no scheduled re-check ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The pooled connections go silent: the next re-checks meet them.
    proxy.freeze_existing();
    let before = rechecks();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        rechecks() > before,
        "re-checks were due during the partition"
    );
    proxy.heal();
    let end = delivers_after_healing(&relay, &c, "rchk", &[&ann]).await;
    ann.assert_exactly(start + 1, end, "ann").await;
    assert_eq!(relay.metrics.authorize_failures.load(Relaxed), 0);
    assert!(
        relay.pool_health().timeouts.load(Relaxed) > 0,
        "the partition was met and noticed"
    );
    relay.shutdown().await;
}

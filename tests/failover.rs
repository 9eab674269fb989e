//! G6 and G8 across a real failover: a private primary streams to a hot
//! standby made by `pg_basebackup -R`; the relay's `DATABASE_URL` names
//! both (`target_session_attrs=read-write`). The primary crashes and the
//! standby is promoted.
//!
//! - With synchronous replication nothing is lost: every client ends with
//!   every event once, and no one gets a `reset`.
//! - With a lost tail (the standby stopped receiving before the last
//!   commits, which subscribers had already received), every client whose
//!   cursor names a lost event (connected, resuming, or new) gets `reset`
//!   with `history_diverged` and then the new history, and no client is
//!   ever sent an event the new primary does not hold.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use pgrelay::db::embedded::{PgOptions, PgServer};
use serde_json::{json, Value};
use tokio::time::Instant;

/// A standby's settings: those of the tests (it must allow as many
/// connections as its primary), never waiting for a standby of its own.
fn standby_options() -> PgOptions {
    PgOptions::for_tests()
}

/// A primary with a migrated database and project, and its standby.
struct Pair {
    primary: TestServer,
    standby: Arc<PgServer>,
    db: TestDb,
}

impl Pair {
    async fn start(sync: bool, project: &str, members: &[&str]) -> Pair {
        // A primary (`common::primary_options`) whose commits wait for the
        // standby once synchronous replication is switched on, below,
        // after the standby streams: before, every commit would wait
        // forever.
        let primary = TestServer::with_options(primary_options("256MB")).await;
        let db = primary.fresh_db().await;
        let c = db.client().await;
        seed_project(&c, project, members).await;
        drop(c);
        // pg_basebackup blocks: tell the runtime.
        let standby = tokio::task::block_in_place(|| primary.pg.start_standby(standby_options()))
            .expect("a streaming standby");
        let pair = Pair {
            primary,
            standby: Arc::new(standby),
            db,
        };
        if sync {
            let c = pair.db.client().await;
            // Two statements: ALTER SYSTEM refuses an implicit transaction.
            for sql in [
                "ALTER SYSTEM SET synchronous_standby_names = '*'",
                "SELECT pg_reload_conf()",
            ] {
                c.batch_execute(sql)
                    .await
                    .expect("switching on synchronous replication");
            }
        }
        let want = if sync { "sync" } else { "async" };
        pair.wait_on_primary(&format!(
            "SELECT count(*) = 1 FROM pg_stat_replication WHERE state = 'streaming' AND sync_state = '{want}'"
        ))
        .await;
        pair
    }

    /// The relay's URL: both servers, whichever takes writes.
    fn url(&self) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:{},127.0.0.1:{}/{}?target_session_attrs=read-write",
            self.primary.pg.port(),
            self.standby.port(),
            self.db.name
        )
    }

    fn standby_url(&self) -> String {
        self.standby.url(&self.db.name)
    }

    async fn wait_on_primary(&self, condition: &str) {
        let c = self.db.client().await;
        for _ in 0..300 {
            if c.query_one(condition, &[])
                .await
                .expect(condition)
                .get::<_, bool>(0)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("never true on the primary: {condition}");
    }

    /// Waits until the standby has replayed everything the primary wrote.
    async fn standby_caught_up(&self) {
        let c = self.db.client().await;
        let lsn: String = c
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("lsn")
            .get(0);
        let s = client_of(&self.standby_url()).await;
        for _ in 0..300 {
            let done: bool = s
                .query_one(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                    &[&lsn],
                )
                .await
                .expect("replay lsn")
                .get(0);
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the standby did not catch up");
    }

    /// Stops the standby's WAL receiver: what the primary commits from now
    /// on never reaches it (a lost tail, on purpose).
    async fn cut_replication(&self) {
        let s = client_of(&self.standby_url()).await;
        for sql in [
            "ALTER SYSTEM SET primary_conninfo = ''",
            "SELECT pg_reload_conf()",
        ] {
            s.batch_execute(sql)
                .await
                .expect("stopping the WAL receiver");
        }
        for _ in 0..300 {
            let n: i64 = s
                .query_one("SELECT count(*) FROM pg_stat_wal_receiver", &[])
                .await
                .expect("wal receiver")
                .get(0);
            if n == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the WAL receiver did not stop");
    }

    /// The primary crashes (immediate shutdown) and the standby is
    /// promoted.
    async fn fail_over(&self) {
        tokio::task::block_in_place(|| self.primary.pg.crash()).expect("crashing the primary");
        let s = client_of(&self.standby_url()).await;
        let promoted: bool = s
            .query_one("SELECT pg_promote(true, 60)", &[])
            .await
            .expect("promoting the standby")
            .get(0);
        assert!(promoted, "the standby was promoted");
    }
}

async fn client_of(url: &str) -> tokio_postgres::Client {
    let (c, conn) = connect(url).await;
    drop(conn);
    c
}

async fn insert(url: &str, project: &str, n: usize) {
    let c = client_of(url).await;
    for i in 0..n {
        c.execute(
            "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ($1, 'ann', $2)",
            &[&project, &format!("m{i}")],
        )
        .await
        .expect("insert");
    }
}

/// `seq -> timestamp` of every event of `scope` in the log at `url`.
async fn history(url: &str, scope: &str) -> Vec<(u64, String)> {
    let c = client_of(url).await;
    c.query(
        "SELECT seq, relay.wire_time(created_at) FROM relay.events WHERE scope = $1 ORDER BY seq",
        &[&scope],
    )
    .await
    .expect("history")
    .iter()
    .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, String>(1)))
    .collect()
}

/// A client reading in the background, keeping every frame and when it
/// came.
struct Watcher {
    frames: Arc<Mutex<Vec<(Value, Instant)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Connects as `user` and subscribes with `request` extras
    /// (`since_seq`, `since_timestamp`); retries while the database is
    /// unavailable. Returns once subscribed.
    async fn start(addr: std::net::SocketAddr, user: &str, project: &str, extra: Value) -> Watcher {
        let mut ws = WsClient::connect(addr, user).await;
        let mut request = json!({"action": "subscribe", "project_id": project});
        if let Value::Object(extra) = extra {
            for (k, v) in extra {
                request[k] = v;
            }
        }
        let frames = Arc::new(Mutex::new(Vec::new()));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            ws.send_json(request.clone()).await;
            let f = ws.next_json(30).await;
            if f["type"] == "error" && f["code"] == "unavailable" && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            assert_eq!(f["type"], "subscribed", "{f}");
            frames.lock().expect("lock").push((f, Instant::now()));
            break;
        }
        let task = {
            let frames = frames.clone();
            tokio::spawn(async move {
                use futures_util::StreamExt;
                while let Some(Ok(message)) = ws.ws.next().await {
                    if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
                        let f: Value = serde_json::from_str(&text).expect("JSON frames");
                        frames.lock().expect("lock").push((f, Instant::now()));
                    }
                }
            })
        };
        Watcher { frames, task }
    }

    fn frames(&self) -> Vec<(Value, Instant)> {
        self.frames.lock().expect("lock").clone()
    }

    /// Waits until a frame satisfies `done`; panics after `secs`.
    async fn wait(&self, what: &str, secs: u64, done: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !self.frames().iter().any(|(f, _)| done(f)) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.frames()
                    .iter()
                    .map(|(f, _)| f.clone())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn until_seq(&self, seq: u64, secs: u64) {
        self.wait(&format!("seq {seq}"), secs, |f| {
            f["type"] == "cache_invalidate" && f["seq"].as_u64() >= Some(seq)
        })
        .await
    }

    /// The event frames, in arrival order.
    fn events(&self) -> Vec<Value> {
        self.frames()
            .into_iter()
            .filter(|(f, _)| f["type"] == "cache_invalidate")
            .map(|(f, _)| f)
            .collect()
    }

    fn resets(&self) -> Vec<Value> {
        self.frames()
            .into_iter()
            .filter(|(f, _)| f["type"] == "reset")
            .map(|(f, _)| f)
            .collect()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|f| f["seq"].as_u64().expect("seq"))
        .collect()
}

/// Every event is one the log holds (same seq, same timestamp).
fn all_held(events: &[Value], log: &[(u64, String)], who: &str) {
    for f in events {
        let seq = f["seq"].as_u64().expect("seq");
        let ts = f["timestamp"].as_str().expect("timestamp");
        assert!(
            log.iter().any(|(s, t)| *s == seq && t == ts),
            "{who} was sent seq {seq} at {ts}, which the new primary does not hold"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_failover_loses_nothing_and_resets_no_one() {
    let pair = Pair::start(true, "sync", &["ann", "bob", "carol"]).await;
    let relay = start_relay(relay_config(&pair.url())).await;
    let ann = Watcher::start(relay.addr, "ann", "sync", json!({})).await;
    let start = ann.frames()[0].0["seq"].as_u64().expect("seq");
    insert(&pair.db.url, "sync", 30).await;
    ann.until_seq(start + 30, 20).await;
    // bob saw half, then went away with his cursor.
    let bob = Watcher::start(relay.addr, "bob", "sync", json!({"since_seq": start})).await;
    bob.until_seq(start + 15, 20).await;
    let bob_cursor = bob.events()[14].clone();
    drop(bob);

    let crashed = Instant::now();
    pair.fail_over().await;
    insert(&pair.standby_url(), "sync", 20).await;
    let last = start + 50;
    ann.until_seq(last, 60).await;
    let healed = ann
        .frames()
        .iter()
        .find(|(f, _)| f["seq"].as_u64() > Some(start + 30))
        .map(|(_, at)| *at - crashed)
        .expect("a post-failover event");
    let bob = Watcher::start(
        relay.addr,
        "bob",
        "sync",
        json!({"since_seq": bob_cursor["seq"], "since_timestamp": bob_cursor["timestamp"]}),
    )
    .await;
    let carol = Watcher::start(relay.addr, "carol", "sync", json!({"since_seq": 0})).await;
    bob.until_seq(last, 30).await;
    carol.until_seq(last, 30).await;

    let log = history(&pair.standby_url(), "sync").await;
    assert_contiguous(&seqs(&ann.events()), start + 1, last, "ann (connected)");
    assert_contiguous(&seqs(&bob.events()), start + 16, last, "bob (resumed)");
    assert_contiguous(&seqs(&carol.events()), 1, last, "carol (new, from 0)");
    for (w, who) in [(&ann, "ann"), (&bob, "bob"), (&carol, "carol")] {
        assert!(w.resets().is_empty(), "{who} got {:?}", w.resets());
        all_held(&w.events(), &log, who);
    }
    assert_eq!(relay.metrics.resets_sent.load(Relaxed), 0);
    assert_eq!(relay.metrics.divergences.load(Relaxed), 0);
    println!(
        "synchronous failover: first new event delivered {:.1} s after the crash (promotion included); \
         ann {} events, bob resumed with {} and carol from 0 with {}; lost 0, duplicates 0, resets 0",
        healed.as_secs_f64(),
        ann.events().len(),
        bob.events().len(),
        carol.events().len()
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_lost_a_tail_resets_every_client_that_saw_it() {
    let users = ["ann", "dave", "eve", "gus", "frank"];
    let pair = Pair::start(false, "tail", &users).await;
    let relay = start_relay(relay_config(&pair.url())).await;
    let ann = Watcher::start(relay.addr, "ann", "tail", json!({})).await;
    let start = ann.frames()[0].0["seq"].as_u64().expect("seq");

    // 20 events reach the standby; the next 10 only the primary, and the
    // subscribers.
    insert(&pair.db.url, "tail", 20).await;
    pair.standby_caught_up().await;
    pair.cut_replication().await;
    insert(&pair.db.url, "tail", 10).await;
    let lost_end = start + 30;
    ann.until_seq(lost_end, 20).await;
    let old = ann.events();
    let cursor_of = |seq: u64| {
        let f = old
            .iter()
            .find(|f| f["seq"].as_u64() == Some(seq))
            .expect("seen");
        json!({"since_seq": seq, "since_timestamp": f["timestamp"]})
    };
    let dave_cursor = cursor_of(lost_end);
    let eve_cursor = cursor_of(start + 25);

    let crashed = Instant::now();
    pair.fail_over().await;
    // New from 0, while the relay is finding out: the new primary's
    // history, none of the lost one.
    let frank = Watcher::start(relay.addr, "frank", "tail", json!({"since_seq": 0})).await;
    // The new primary continues from the standby's seq: 21.. again.
    insert(&pair.standby_url(), "tail", 5).await;
    ann.wait("ann's reset", 60, |f| f["type"] == "reset").await;
    let detected = ann
        .frames()
        .iter()
        .find(|(f, _)| f["type"] == "reset")
        .map(|(_, at)| *at - crashed)
        .expect("reset");

    // Resuming from a lost event at or beyond the new latest, from one
    // below it, and by seq alone.
    let dave = Watcher::start(relay.addr, "dave", "tail", dave_cursor).await;
    let eve = Watcher::start(relay.addr, "eve", "tail", eve_cursor).await;
    let gus = Watcher::start(relay.addr, "gus", "tail", json!({"since_seq": start + 22})).await;
    insert(&pair.standby_url(), "tail", 5).await;
    let last = start + 30;
    for w in [&ann, &dave, &eve, &gus, &frank] {
        w.until_seq(last, 30).await;
    }
    // Nothing more comes.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let log = history(&pair.standby_url(), "tail").await;
    assert_eq!(log.last().map(|(s, _)| *s), Some(last));
    // ann: the 30 old events before the crash, nothing between the crash
    // and the reset, then the new history after the reset's seq.
    let frames = ann.frames();
    let reset_at = frames
        .iter()
        .position(|(f, _)| f["type"] == "reset")
        .expect("reset");
    let reset = &frames[reset_at].0;
    assert_eq!(reset["reason"], "history_diverged", "{reset}");
    let before: Vec<Value> = frames[..reset_at]
        .iter()
        .filter(|(f, _)| f["type"] == "cache_invalidate")
        .map(|(f, _)| f.clone())
        .collect();
    assert_contiguous(
        &seqs(&before),
        start + 1,
        lost_end,
        "ann before the failover",
    );
    assert!(
        frames[..reset_at].iter().all(|(_, at)| *at < crashed),
        "ann got nothing between the crash and the reset"
    );
    let after: Vec<Value> = frames[reset_at + 1..]
        .iter()
        .map(|(f, _)| f.clone())
        .collect();
    let from = reset["seq"].as_u64().expect("reset seq");
    assert_contiguous(&seqs(&after), from + 1, last, "ann after the reset");
    all_held(&after, &log, "ann");
    assert!(
        log.iter()
            .any(|(s, t)| *s == from && reset["timestamp"] == t.as_str()),
        "the reset names an event of the new history: {reset}"
    );

    // dave and eve: reset first, then the new history.
    for (w, who) in [(&dave, "dave"), (&eve, "eve")] {
        let resets = w.resets();
        assert_eq!(resets.len(), 1, "{who}: {resets:?}");
        assert_eq!(resets[0]["reason"], "history_diverged", "{who}");
        let from = resets[0]["seq"].as_u64().expect("seq");
        assert_contiguous(&seqs(&w.events()), from + 1, last, who);
        all_held(&w.events(), &log, who);
    }
    // gus sent since_seq alone: it cannot be checked, so he gets the new
    // events after it without a reset (the documented limit of since_seq).
    assert!(gus.resets().is_empty());
    assert_contiguous(&seqs(&gus.events()), start + 23, last, "gus");
    all_held(&gus.events(), &log, "gus");
    // frank, new from 0 during the failover: the new primary's history,
    // none of the lost one.
    assert!(frank.resets().is_empty());
    assert_contiguous(&seqs(&frank.events()), 1, last, "frank");
    all_held(&frank.events(), &log, "frank");

    let resets = relay.metrics.resets_sent.load(Relaxed);
    assert_eq!(resets, 3, "ann, dave and eve, no one else");
    assert!(relay.metrics.divergences.load(Relaxed) >= 1);
    println!(
        "failover that lost a tail of 10 delivered events: ann (connected) reset after {:.1} s (promotion \
         included), then the new history; dave (resumed at the lost {lost_end}) and eve (resumed at a lost \
         {}) reset, then the new history; gus (since_seq alone) and frank (new, from 0) got the new history \
         (subscribed right after the promotion) without reset; resets sent {resets}; events sent that the new primary does not hold: 0",
        detected.as_secs_f64(),
        start + 25,
    );
    relay.shutdown().await;
}

/// Without any failover: a cursor (since_seq with since_timestamp) resumes
/// exactly where it says when the log holds its event, and is reset when it
/// names an event the log does not hold; `subscribed` and `reset` carry the
/// cursor to keep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_resumes_only_from_an_event_the_log_holds() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "cur", &["ann"]).await;
    let relay = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let subscribed = ann.subscribe("cur", None).await;
    let start = subscribed["seq"].as_u64().expect("seq");
    let log = history(&db.url, "cur").await;
    assert_eq!(
        subscribed["timestamp"].as_str(),
        log.last().map(|(_, t)| t.as_str()),
        "subscribed names the latest event: {subscribed}"
    );
    insert(&db.url, "cur", 5).await;
    let mut frames = Vec::new();
    while frames.len() < 5 {
        let f = ann.next_json(10).await;
        if f["type"] == "cache_invalidate" {
            frames.push(f);
        }
    }
    let third = &frames[2];

    // Held: the rest follows, no reset.
    let mut back = WsClient::connect(relay.addr, "ann").await;
    back.send_json(json!({"action": "subscribe", "project_id": "cur",
        "since_seq": third["seq"], "since_timestamp": third["timestamp"]}))
        .await;
    assert_eq!(back.next_json(10).await["type"], "subscribed");
    assert_eq!(
        back.events_until("cur", start + 5, 10).await,
        vec![start + 4, start + 5]
    );

    // The same seq with another time: not the event this client saw.
    for (seq, ts) in [
        (third["seq"].clone(), "2001-01-01T00:00:00.000001Z"),
        (json!(start + 5), "2001-01-01T00:00:00.000001Z"),
        (json!(start + 9), third["timestamp"].as_str().expect("ts")),
    ] {
        let mut other = WsClient::connect(relay.addr, "ann").await;
        other
            .send_json(json!({"action": "subscribe", "project_id": "cur",
                "since_seq": seq, "since_timestamp": ts}))
            .await;
        assert_eq!(other.next_json(10).await["type"], "subscribed");
        let reset = other.next_json(10).await;
        assert_eq!(reset["type"], "reset", "{reset}");
        assert_eq!(reset["reason"], "history_diverged", "{reset}");
        assert_eq!(reset["seq"], start + 5);
        assert_eq!(
            reset["timestamp"], frames[4]["timestamp"],
            "the reset names the latest event"
        );
    }
    relay.shutdown().await;
}

/// Log reads from a hot standby, with its replay paused for 3 s under
/// writes: everything arrives once, in order, and late by no more than the
/// replica wait plus a primary read, never by the lag (the resync safety net
/// is pushed out of the way so it cannot hide a missing fallback).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_from_a_lagging_standby_lose_nothing_and_wait_a_bounded_time() {
    let pair = Pair::start(false, "rep", &["ann", "bob"]).await;
    let mut config = relay_config(&pair.db.url);
    config.replica_urls = vec![pair.standby_url()];
    config.resync_interval = Duration::from_secs(600);
    let relay = start_relay(config).await;
    let ann = Watcher::start(relay.addr, "ann", "rep", json!({})).await;
    let start = ann.frames()[0].0["seq"].as_u64().expect("seq");
    // A standby that streams is used as soon as it is checked.
    for _ in 0..100 {
        insert(&pair.db.url, "rep", 1).await;
        if relay.metrics.replica_reads.load(Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        relay.metrics.replica_reads.load(Relaxed) > 0,
        "the standby was read"
    );

    let url = pair.db.url.clone();
    let writer = tokio::spawn(async move {
        let c = client_of(&url).await;
        for i in 0..300 {
            c.execute(
                "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('rep', 'ann', $1)",
                &[&format!("w{i}")],
            )
            .await
            .expect("insert");
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = client_of(&pair.standby_url()).await;
    s.batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause replay");
    let fallbacks_before = relay.metrics.replica_fallbacks.load(Relaxed);
    // bob catches up from 0 while the standby lags.
    let bob = Watcher::start(relay.addr, "bob", "rep", json!({"since_seq": 0})).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume replay");
    writer.await.expect("writer");

    let last = history(&pair.db.url, "rep")
        .await
        .last()
        .map(|(s, _)| *s)
        .expect("events");
    ann.until_seq(last, 30).await;
    bob.until_seq(last, 30).await;
    assert_contiguous(&seqs(&ann.events()), start + 1, last, "ann");
    assert_contiguous(&seqs(&bob.events()), 1, last, "bob (from 0)");
    let mut late: Vec<f64> = ann
        .frames()
        .iter()
        .filter(|(f, _)| f["type"] == "cache_invalidate")
        .map(|(f, at)| {
            let ts =
                pgrelay::relay::protocol::parse_timestamp(f["timestamp"].as_str().expect("ts"))
                    .expect("timestamp");
            let arrived = chrono::Utc::now().timestamp_micros() - at.elapsed().as_micros() as i64;
            (arrived - ts) as f64 / 1000.0
        })
        .collect();
    late.sort_by(f64::total_cmp);
    let (p50, max) = (late[late.len() / 2], late[late.len() - 1]);
    let m = &relay.metrics;
    assert!(
        m.replica_lag_waits.load(Relaxed) > 0,
        "reads waited for the lagging standby"
    );
    assert!(
        m.replica_fallbacks.load(Relaxed) > fallbacks_before,
        "reads went to the primary while the standby lagged"
    );
    assert!(
        max < 1500.0,
        "an event was {max:.0} ms late: the lag leaked through"
    );
    let (reads, waits, fallbacks) = (
        m.replica_reads.load(Relaxed),
        m.replica_lag_waits.load(Relaxed),
        m.replica_fallbacks.load(Relaxed),
    );

    // A standby that stops streaming (cut off, or left on an old timeline
    // after a failover) is no longer read; delivery goes on from the
    // primary. The probe interval is 2 s in tests.
    pair.cut_replication().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reads_cut = m.replica_reads.load(Relaxed);
    insert(&pair.db.url, "rep", 20).await;
    ann.until_seq(last + 20, 30).await;
    assert_contiguous(
        &seqs(&ann.events()),
        start + 1,
        last + 20,
        "ann after the cut",
    );
    assert_eq!(
        m.replica_reads.load(Relaxed),
        reads_cut,
        "a standby that does not stream is not read"
    );
    println!(
        "reads from a standby paused for 3 s under writes: ann {} events from {} and bob {} from 0, in order, once; \
         commit-to-delivery p50 {p50:.1} ms, max {max:.1} ms (replica wait 50 ms); standby reads {}, lag waits {}, \
         primary fallbacks {}; once its WAL receiver stopped, 20 more events came from the primary, none from it",
        ann.events().len() - 20,
        start + 1,
        bob.events().len(),
        reads,
        waits,
        fallbacks,
    );
    relay.shutdown().await;
}

//! G7 Bounded, tried as a hostile crowd would: clients that resume and
//! never read, half-open HTTP requests, a crowd that arrives and leaves,
//! connections past the caps. The relay runs as its own process where its
//! memory is measured (`RelayProcess`: the built `pgrelay` binary, so its
//! RSS is its own and not the test's clients'), in-process elsewhere.
//!
//! The tests of this file run one at a time (`SERIAL`): each loads the
//! machine, and a neighbour's crowd would be measured as ours.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

type RawWs = tokio_tungstenite::WebSocketStream<TcpStream>;

/// A WebSocket client with a small receive buffer (so a client that does
/// not read fills up soon, and this shared machine's kernel memory is
/// spared), subscribed to `project` from `since`. It reads nothing.
async fn subscriber_that_never_reads(
    addr: SocketAddr,
    user: &str,
    project: &str,
    since: Option<u64>,
) -> RawWs {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
    let stream = socket.connect(addr).await.expect("connect");
    let url = format!("ws://{addr}/ws?token={}", token(user));
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("WebSocket handshake");
    let mut req = serde_json::json!({"action": "subscribe", "project_id": project});
    if let Some(s) = since {
        req["since_seq"] = s.into();
    }
    ws.send(Message::Text(req.to_string().into()))
        .await
        .expect("subscribe");
    ws
}

/// The event seq of a frame of `project`, read without parsing the whole
/// frame (they are ~8 KiB each): the rendered frame has `"seq":N` before
/// its `data`.
fn event_seq(frame: &str) -> Option<u64> {
    if !frame.starts_with("{\"type\":\"cache_invalidate\"") {
        return None;
    }
    let at = frame.find(",\"seq\":")? + 7;
    let digits: String = frame[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Reads a subscriber that never read until now: its `subscribed` frame,
/// then every event up to `last`. Returns the seqs, in arrival order.
async fn read_everything(ws: &mut RawWs, last: u64, who: &str) -> Vec<u64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut seqs = Vec::new();
    let mut subscribed = false;
    while seqs.last().copied().unwrap_or(0) < last {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("{who}: timed out after {} events", seqs.len()));
        match msg {
            Some(Ok(Message::Text(t))) => {
                if let Some(seq) = event_seq(&t) {
                    assert!(subscribed, "{who}: an event before `subscribed`");
                    seqs.push(seq);
                } else if t.contains("\"type\":\"subscribed\"") {
                    subscribed = true;
                } else {
                    panic!("{who}: unexpected frame {t}");
                }
            }
            Some(Ok(Message::Close(f))) => {
                panic!("{who}: closed after {} events: {f:?}", seqs.len())
            }
            Some(Ok(_)) => {}
            other => panic!("{who}: {other:?} after {} events", seqs.len()),
        }
    }
    seqs
}

/// One value from the relay's `/metrics` (the whole line's name, labels
/// included).
async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = http_get(addr, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("/metrics has no {name}"))
}

/// What one connection may cost the relay: an idle subscribed WebSocket
/// (3.8 KiB measured, see docs/benchmarks.md; 24 KiB allowed, twice the
/// 12 KiB it was before)
/// plus the write buffer a session fills before it waits on a full socket
/// (32 KiB, plus the one ~8 KiB frame that crossed it, rounded up to
/// 16 KiB).
const PER_CONNECTION_KIB: u64 = 24 + 32 + 16;
/// The default catch-up budget (`--catchup-budget`).
const BUDGET_KIB: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_resumers_hold_no_batches_and_later_catch_up_exactly_once() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "crowd", &["eve", "bob"]).await;
    // 1,000 events of ~8 KiB: 8 MiB of history each resumer is owed, two
    // of the old 4 MiB batches, and more than the kernel's buffers hold.
    const HISTORY: u64 = 1000;
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body)
         SELECT 'crowd', 'bob', repeat('x', 8000) FROM generate_series(1, $1::int)",
        &[&(HISTORY as i32)],
    )
    .await
    .expect("history");
    let relay = spawn_relay_process(&db.url, &["--max-connections-per-user", "1000"]).await;
    let mut bob = WsClient::connect(relay.addr, "bob").await;
    // The history: the members' events, then the messages.
    let history = bob.subscribe("crowd", None).await["seq"]
        .as_u64()
        .expect("seq");
    let rss_baseline = relay.rss_kib();

    // 300 resumers from seq 0 that never read.
    const CROWD: usize = 300;
    let mut stalled = Vec::with_capacity(CROWD);
    for chunk in (0..CROWD).collect::<Vec<_>>().chunks(50) {
        let joins = chunk
            .iter()
            .map(|_| subscriber_that_never_reads(relay.addr, "eve", "crowd", Some(0)));
        stalled.extend(futures_util::future::join_all(joins).await);
    }
    // Until every one of them has filled its socket (the kernel takes
    // about 1.5 MB of each first), the relay's memory is sampled.
    let mut rss_peak = relay.rss_kib();
    let t0 = Instant::now();
    loop {
        rss_peak = rss_peak.max(relay.rss_kib());
        let waiting = metric(relay.addr, "pgrelay_sessions_waiting").await;
        if waiting >= CROWD as f64 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "only {waiting} of {CROWD} sessions filled their sockets in 40 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stalled_after = t0.elapsed();

    // While they stall: the bystander gets every live event within 2 s.
    let mut worst = Duration::ZERO;
    const LIVE: u64 = 10;
    for i in 1..=LIVE {
        let sent = Instant::now();
        c.execute(
            "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('crowd', 'bob', $1)",
            &[&format!("live {i}")],
        )
        .await
        .expect("live insert");
        let f = bob.next_json(10).await;
        assert_eq!(f["seq"], history + i, "bystander: {f}");
        let took = sent.elapsed();
        worst = worst.max(took);
        assert!(
            took < Duration::from_secs(2),
            "the bystander waited {took:?} for event {i}"
        );
        rss_peak = rss_peak.max(relay.rss_kib());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss_stalled = relay.rss_kib();
    rss_peak = rss_peak.max(rss_stalled);
    let socket_full = metric(relay.addr, "pgrelay_socket_full_total").await;
    let held = metric(relay.addr, "pgrelay_catchup_bytes").await;
    let bound = rss_baseline + CROWD as u64 * PER_CONNECTION_KIB + BUDGET_KIB;
    println!(
        "{CROWD} stalled resumers, all waiting on a full socket after {stalled_after:?}: relay RSS baseline {rss_baseline} KiB, \
         peak {rss_peak} KiB (bound {bound} KiB), {rss_stalled} KiB while they wait; catch-up bytes held {held}; bystander's slowest event {worst:?}; \
         sockets found full {socket_full} times"
    );
    assert_eq!(held, 0.0, "stalled sessions hold no catch-up data");
    assert!(
        rss_peak <= bound,
        "relay RSS {rss_peak} KiB is past {bound} KiB: baseline {rss_baseline} + {CROWD} x {PER_CONNECTION_KIB} KiB + the {BUDGET_KIB} KiB budget"
    );

    // Every tenth of them now reads: all history and the live events,
    // exactly once, in order. The others leave.
    let last = history + LIVE;
    let mut readers = Vec::new();
    for (i, ws) in stalled.into_iter().enumerate() {
        if i % 10 == 0 {
            readers.push(ws);
        }
    }
    let t0 = Instant::now();
    let reads = readers.iter_mut().enumerate().map(|(i, ws)| async move {
        let who = format!("stalled reader {i}");
        let seqs = read_everything(ws, last, &who).await;
        assert_contiguous(&seqs, 1, last, &who);
    });
    futures_util::future::join_all(reads).await;
    println!(
        "{} stalled clients then read all {last} events each, exactly once and in order, in {:?}",
        readers.len(),
        t0.elapsed()
    );
    drop(readers);
    let status = relay.terminate().expect("sending SIGTERM to the relay");
    assert!(status.success(), "the relay exits cleanly: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_requests_are_closed_at_the_head_timeout_while_others_connect() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann"]).await;
    const TIMEOUT: Duration = Duration::from_secs(2);
    let relay = spawn_relay_process(&db.url, &["--http-read-timeout", "2s"]).await;
    let addr = relay.addr;

    // 300 connections trickle a request head, one byte every 500 ms (each
    // byte in time, the head never whole); 30 more send nothing at all;
    // one finishes a request and then idles on keep-alive.
    const TRICKLERS: usize = 300;
    const SILENT: usize = 30;
    let started = Instant::now();
    let mut conns = Vec::new();
    for i in 0..TRICKLERS + SILENT {
        let trickle = i < TRICKLERS;
        conns.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let opened = Instant::now();
            if trickle {
                s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    .await
                    .expect("write");
            }
            let mut buf = [0u8; 256];
            loop {
                tokio::select! {
                    n = s.read(&mut buf) => match n {
                        Ok(0) | Err(_) => return opened.elapsed(),
                        Ok(_) => panic!("a half-open request got an answer"),
                    },
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        if opened.elapsed() > Duration::from_secs(15) {
                            panic!("a half-open request was kept for 15 s");
                        }
                        if trickle && s.write_all(b"a").await.is_err() {
                            return opened.elapsed();
                        }
                    }
                }
            }
        }));
    }
    let keep_alive = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        let answered = loop {
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before answering");
            got.extend_from_slice(&buf[..n]);
            if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}") {
                break Instant::now();
            }
        };
        // Idle now: the next head never comes.
        let n = tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf))
            .await
            .expect("an idle keep-alive connection was kept for 15 s");
        assert!(matches!(n, Ok(0) | Err(_)), "unexpected bytes: {n:?}");
        answered.elapsed()
    });

    // Meanwhile a real client connects, subscribes and is served.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ann = WsClient::connect(addr, "ann").await;
    let seq = ann.subscribe("p", None).await["seq"].as_u64().expect("seq");
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('p', 'ann', 'served')",
        &[],
    )
    .await
    .expect("insert");
    assert_eq!(ann.next_json(10).await["seq"], seq + 1);
    let served_at = started.elapsed();

    let mut closed = Vec::new();
    for conn in conns {
        closed.push(conn.await.expect("slow connection task"));
    }
    let idle = keep_alive.await.expect("keep-alive task");
    closed.sort();
    let (first, median, slowest) = (
        closed[0],
        closed[closed.len() / 2],
        closed[closed.len() - 1],
    );
    println!(
        "{} half-open requests ({TRICKLERS} trickling, {SILENT} silent) against a {TIMEOUT:?} head timeout: \
         closed after {first:?} (first), {median:?} (median), {slowest:?} (last); idle keep-alive closed after {idle:?}; \
         a new client was served {served_at:?} into the attack",
        closed.len()
    );
    // Closed by the head timeout, not before it and not much after.
    assert!(
        first >= TIMEOUT - Duration::from_millis(100),
        "closed early: {first:?}"
    );
    assert!(
        slowest < TIMEOUT + Duration::from_secs(3),
        "a half-open request lived {slowest:?}"
    );
    assert!(
        idle < TIMEOUT + Duration::from_secs(3),
        "idle keep-alive lived {idle:?}"
    );
    assert!(
        metric(addr, "pgrelay_timeouts_total{stage=\"head\"}").await >= (TRICKLERS + SILENT) as f64
    );
    drop(ann);
    let status = relay.terminate().expect("sending SIGTERM to the relay");
    assert!(status.success(), "the relay exits cleanly: {status}");
}

/// Connects `n` clients that subscribe to `project` and read what they
/// get; returns them.
async fn crowd(addr: SocketAddr, n: usize, project: &str) -> Vec<WsClient> {
    let mut clients = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let joins = chunk.iter().map(|&i| async move {
            let mut c = WsClient::connect(addr, &format!("c{}", i % 50)).await;
            c.subscribe(project, None).await;
            c
        });
        clients.extend(futures_util::future::join_all(joins).await);
    }
    clients
}

/// What the relay may keep after a crowd has left: the allocator's
/// caches and the runtime's I/O slab, which never shrinks.
const AFTER_CROWD_KIB: u64 = 16 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_arrives_and_leaves_and_memory_goes_back() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let c = db.client().await;
    let users: Vec<String> = (0..50).map(|i| format!("c{i}")).collect();
    let members: Vec<&str> = users.iter().map(String::as_str).collect();
    seed_project(&c, "p", &members).await;
    // Started with a low soft limit on open files (as systemd gives
    // services): the relay raises it to the hard limit itself.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let low = hard.min(1024);
    setrlimit(Resource::RLIMIT_NOFILE, low, hard).expect("setrlimit");
    let relay = spawn_relay_process(&db.url, &["--max-connections-per-user", "100"]).await;
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("setrlimit");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", relay.pid())).expect("limits");
    let open_files: Vec<u64> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if hard != nix::sys::resource::RLIM_INFINITY {
        assert_eq!(
            open_files,
            vec![hard, hard],
            "the relay raised its open-files limit to the hard one"
        );
    }
    let rss_baseline = relay.rss_kib();
    const CROWD: usize = 1000;
    const BURST: u64 = 30;
    let mut rounds = Vec::new();
    for round in 1..=2 {
        let mut clients = crowd(relay.addr, CROWD, "p").await;
        let connected = relay.rss_kib();
        // A burst of ~4 KiB events, which every client reads.
        let before: i64 = c
            .query_one("SELECT latest_seq FROM relay.scope_state('p')", &[])
            .await
            .expect("scope state")
            .get(0);
        c.execute(
            "INSERT INTO chat.messages (project_id, sender_id, body)
             SELECT 'p', 'c0', repeat('y', 4000) FROM generate_series(1, $1::int)",
            &[&(BURST as i32)],
        )
        .await
        .expect("burst");
        let last = before as u64 + BURST;
        let reads = clients.iter_mut().map(|client| async move {
            let mut seqs = Vec::new();
            loop {
                let msg = tokio::time::timeout(Duration::from_secs(60), client.ws.next()).await;
                let Ok(Some(Ok(Message::Text(t)))) = msg else {
                    panic!("a crowd client stopped: {msg:?}");
                };
                if let Some(seq) = event_seq(&t) {
                    seqs.push(seq);
                    if seq >= last {
                        return seqs;
                    }
                }
            }
        });
        let received = futures_util::future::join_all(reads).await;
        let burst: Vec<u64> = (before as u64 + 1..=last).collect();
        for (i, seqs) in received.iter().enumerate() {
            assert_eq!(
                seqs, &burst,
                "round {round}: crowd client {i} must get the burst once each, in seq order"
            );
        }
        let peak = relay.rss_kib();
        drop(clients);
        // Memory goes back within a few seconds of the crowd leaving.
        let left = Instant::now();
        let mut after = relay.rss_kib();
        while after > rss_baseline + AFTER_CROWD_KIB && left.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            after = relay.rss_kib();
        }
        // And stays back: the later sample is the one that counts.
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = relay.rss_kib();
        println!(
            "crowd round {round}: {CROWD} connections; relay RSS baseline {rss_baseline} KiB, \
             connected {connected} KiB, after a {BURST}-event burst {peak} KiB, \
             {after} KiB {:?} after they left",
            left.elapsed()
        );
        rounds.push(after);
        assert!(
            after <= rss_baseline + AFTER_CROWD_KIB,
            "round {round}: RSS {after} KiB did not come back within {AFTER_CROWD_KIB} KiB of the baseline {rss_baseline} KiB"
        );
    }
    let status = relay.terminate().expect("sending SIGTERM to the relay");
    assert!(status.success(), "the relay exits cleanly: {status}");
}

/// The status and JSON body of whatever the relay answers first; the
/// head's text is checked for `retry-after` on a 503.
async fn raw_answer(addr: SocketAddr, request: &[u8]) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(request).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if status == 503 {
        assert!(
            head.to_ascii_lowercase().contains("\r\nretry-after: 1"),
            "a 503 says when to retry: {head}"
        );
    }
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_caps_get_503_with_a_json_body() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann"]).await;
    let mut config = relay_config(&db.url);
    config.max_connections = 4;
    config.max_pending_connections = 2;
    let relay = start_relay(config).await;
    let addr = relay.addr;
    let get = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    // Two WebSockets: upgraded, so no longer pending.
    let mut ann1 = WsClient::connect(addr, "ann").await;
    ann1.subscribe("p", None).await;
    let mut ann2 = WsClient::connect(addr, "ann").await;
    ann2.subscribe("p", None).await;
    // Two idle HTTP connections: pending, and the total is reached.
    let idle1 = TcpStream::connect(addr).await.expect("connect");
    let idle2 = TcpStream::connect(addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = raw_answer(addr, get).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "over_capacity", "{body}");
    // A WebSocket leaves: room for one more connection, but the pending
    // cap (two idle requests) is reached.
    drop(ann2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = raw_answer(addr, get).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("HTTP request")),
        "{body}"
    );
    // An idle request leaves: a new client is served again.
    drop(idle1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = raw_answer(addr, get).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        relay
            .metrics
            .over_capacity
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    drop(idle2);
    drop(ann1);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_that_sends_nothing_is_closed_after_the_first_frame_timeout() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann"]).await;
    let mut config = relay_config(&db.url);
    config.first_frame_timeout = Duration::from_secs(1);
    let relay = start_relay(config).await;
    let mut silent = WsClient::connect(relay.addr, "ann").await;
    let mut talker = WsClient::connect(relay.addr, "ann").await;
    talker.subscribe("p", None).await;
    let t0 = Instant::now();
    assert_eq!(silent.close_code(10).await, Some(4008));
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(4), "closed after {took:?}");
    // One that spoke in time stays, and is served.
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('p', 'ann', 'still here')",
        &[],
    )
    .await
    .expect("insert");
    assert_eq!(talker.next_json(10).await["data"]["body"], "still here");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_gets_408_and_an_untaken_response_is_cut_off() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann"]).await;
    // 200 messages of 10,000 four-byte characters: a page of about 8 MB,
    // more than the kernel's socket buffers hold (4 MiB at most here).
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body)
         SELECT 'p', 'ann', repeat('😀', 10000) FROM generate_series(1, 200)",
        &[],
    )
    .await
    .expect("messages");
    let mut config = relay_config(&db.url);
    config.http_read_timeout = Duration::from_secs(1);
    config.pong_timeout = Duration::from_secs(1);
    let relay = start_relay(config).await;
    let addr = relay.addr;

    // A body that never arrives whole.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /v1/projects/p/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"bo",
        token("ann")
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    let t0 = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    // A response the client does not read: cut off after the write
    // timeout, not kept forever.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut s = socket.connect(addr).await.expect("connect");
    let get = format!(
        "GET /v1/projects/p/messages?limit=200 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        token("ann")
    );
    s.write_all(get.as_bytes()).await.expect("write");
    // Rendering the page takes a while in a debug build; then the kernel's
    // buffers fill and the response waits on us.
    let t0 = Instant::now();
    while relay
        .metrics
        .timeouts
        .write
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
        && t0.elapsed() < Duration::from_secs(20)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection was kept open");
    let cut = relay
        .metrics
        .timeouts
        .write
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        cut, 1,
        "responses cut off for not being taken ({got} bytes read)"
    );
    assert!(got < 8_000_000, "the whole page arrived ({got} bytes)");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_is_refused_and_http1_still_served() {
    let db = TestDb::new().await;
    let relay = start_relay(relay_config(&db.url)).await;
    let mut s = TcpStream::connect(relay.addr).await.expect("connect");
    // The HTTP/2 connection preface and an empty SETTINGS frame.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .expect("closed at once")
        .ok();
    assert!(raw.is_empty(), "an answer to the HTTP/2 preface: {raw:?}");
    assert!(http_get(relay.addr, "/healthz")
        .await
        .starts_with("HTTP/1.1 200"));
    relay.shutdown().await;
}

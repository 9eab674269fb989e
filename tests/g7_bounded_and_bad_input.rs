//! G7 Bounded, and bad input: a client that stops reading gets everything
//! later from the log while the relay's memory stays bounded; only a peer
//! that stops answering pings is closed; malformed JSON, unknown actions,
//! missing fields, binary and oversize frames get a clear error frame or
//! close code while the connection (or the others) go on; forged and
//! foreign notices on the channel deliver nothing that is not in the log;
//! rounds of hostile input leave the relay's memory at its baseline; every
//! HTTP route, known or not, answers with JSON or text.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_error_frames_and_the_connection_stays_healthy() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann"]).await;
    let relay = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    ann.subscribe("p", None).await;

    let cases: Vec<(Message, &str)> = vec![
        (Message::Text("{not json".into()), "bad_json"),
        (Message::Text("[1,2,3]".into()), "bad_request"),
        (
            Message::Text(r#"{"action":"launch"}"#.into()),
            "unknown_action",
        ),
        (
            Message::Text(r#"{"action":"subscribe"}"#.into()),
            "bad_request",
        ),
        (
            Message::Text(r#"{"action":"subscribe","project_id":7.5}"#.into()),
            "bad_request",
        ),
        (
            Message::Text(r#"{"action":"subscribe","project_id":"p","since_seq":"x"}"#.into()),
            "bad_request",
        ),
        (
            Message::Text(r#"{"action":"unsubscribe","project_id":"nope"}"#.into()),
            "not_subscribed",
        ),
        (Message::Text("[".repeat(5000).into()), "bad_json"),
        (
            Message::Binary(vec![0u8, 159, 146, 150].into()),
            "binary_not_supported",
        ),
    ];
    for (frame, code) in cases {
        ann.ws.send(frame).await.expect("send");
        let reply = ann.next_json(10).await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], code, "{reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Still subscribed and healthy: ping works, events flow.
    ann.send_json(json!({"action": "ping"})).await;
    assert_eq!(ann.next_json(10).await["type"], "pong");
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('p', 'ann', 'still here')",
        &[],
    )
    .await
    .expect("insert");
    let f = ann.next_json(10).await;
    assert_eq!(f["data"]["body"], "still here");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frame_closes_with_1009_and_others_go_on() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann"]).await;
    let relay = start_relay(relay_config(&db.url)).await;
    let mut big = WsClient::connect(relay.addr, "ann").await;
    let mut other = WsClient::connect(relay.addr, "ann").await;
    other.subscribe("p", None).await;
    let huge = "x".repeat(1 << 20);
    let _ = big.ws.send(Message::Text(huge.into())).await;
    assert_eq!(big.close_code(10).await, Some(1009));
    other.send_json(json!({"action": "ping"})).await;
    assert_eq!(other.next_json(10).await["type"], "pong");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_pings_is_closed_as_unresponsive() {
    let db = TestDb::new().await;
    let mut config = relay_config(&db.url);
    config.ping_interval = Duration::from_millis(200);
    config.pong_timeout = Duration::from_millis(700);
    let relay = start_relay(config).await;
    let mut silent = WsClient::connect(relay.addr, "ann").await;
    let mut lively = WsClient::connect(relay.addr, "bob").await;
    // `silent` reads nothing (so it answers no ping) for two seconds;
    // `lively` keeps talking.
    for _ in 0..10 {
        lively.send_json(json!({"action": "ping"})).await;
        assert_eq!(lively.next_json(5).await["type"], "pong");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(silent.close_code(5).await, Some(4008));
    relay.shutdown().await;
}

/// The deadline runs from the ping, not from the next ping tick: with
/// pings every 10 s and a 1 s timeout, a silent peer is closed about 11 s
/// after connecting. The client reads nothing until 14 s: had the relay not
/// closed it by then (the old check, on the tick, waited until 20 s), that
/// read answers the ping and the connection lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_closed_pong_timeout_after_the_ping() {
    let db = TestDb::new().await;
    let mut config = relay_config(&db.url);
    config.ping_interval = Duration::from_secs(10);
    config.pong_timeout = Duration::from_secs(1);
    let relay = start_relay(config).await;
    let mut silent = WsClient::connect(relay.addr, "ann").await;
    let connected = tokio::time::Instant::now();
    // A frame first, so the first-frame limit is not what closes it; then
    // nothing is read, so no ping is answered.
    silent.send_json(json!({"action": "ping"})).await;
    assert_eq!(silent.next_json(5).await["type"], "pong");
    tokio::time::sleep_until(connected + Duration::from_secs(14)).await;
    assert_eq!(silent.close_code(5).await, Some(4008));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_metrics_and_unknown_routes_answer_json_or_text() {
    let db = TestDb::new().await;
    let relay = start_relay(relay_config(&db.url)).await;
    let get = |path: &'static str| http_get(relay.addr, path);
    let health = get("/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("\"listening\":true"));
    let metrics = get("/metrics").await;
    for name in [
        "pgrelay_connections",
        "pgrelay_subscriptions",
        "pgrelay_notices_received_total",
        "pgrelay_events_sent_total",
        "pgrelay_log_reads_total",
        "pgrelay_catchup_subscribers",
        "pgrelay_gaps_filled_total",
        "pgrelay_foreign_notices_total",
        "pgrelay_listener_reconnects_total",
        "pgrelay_notification_queue_usage",
        "pgrelay_delivery_delay_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    let page = get("/").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("text/html") && page.contains("<title>pgrelay demo chat</title>"));
    let missing = get("/nope").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    assert!(missing.contains("\"error\""));
    let plain_ws = get("/ws").await;
    assert!(plain_ws.starts_with("HTTP/1.1 426"), "{plain_ws}");
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
    // Not JSON, not ours, a negative seq: three foreign notices; the
    // forged one named a seq the log did not hold: one unconfirmed.
    assert_eq!(relay.metrics.foreign_notices.load(Relaxed), 3);
    assert_eq!(relay.metrics.unconfirmed_notices.load(Relaxed), 1);
    println!(
        "forged notices: foreign {}, unconfirmed {}, delivered only the real event",
        relay.metrics.foreign_notices.load(Relaxed),
        relay.metrics.unconfirmed_notices.load(Relaxed)
    );
    relay.shutdown().await;
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
    let relay = spawn_relay_process(&db.url, &[]).await;
    let mut slow = WsClient::connect(relay.addr, "ann").await;
    let mut fast = WsClient::connect(relay.addr, "bob").await;
    let start = slow.subscribe("slow", None).await["seq"]
        .as_u64()
        .expect("seq");
    fast.subscribe("slow", None).await;

    let rss_before = relay.rss_kib();
    // ~2 KiB rows, 30 statements of 1,000: about 70 MiB of frames, far
    // more than the socket buffers and the ring (4096 frames) hold, and
    // more than twice the bound on what the relay may hold (below).
    const BATCHES: u64 = 30;
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
    // What the relay may hold, from its limits (the child runs with the
    // defaults) and the size of these frames: one scope's ring; a read's
    // worth (at most `read_rows` rows and `read_bytes`) per pooled database
    // connection, whose driver keeps a buffer as large as the largest
    // response it read; one catch-up read held for the stalled client
    // (within the catch-up budget); and per connection the idle cost, the
    // write buffer and a frame. The backlog is more than twice that.
    let limits = pgrelay::config::RelayConfig::new(&db.url, SECRET.to_vec());
    let frame_bytes = c
        .query_one(
            "SELECT max(octet_length(relay.render(e, true)))::int8 FROM relay.events e WHERE scope = 'slow'",
            &[],
        )
        .await
        .expect("frame size")
        .get::<_, i64>(0) as u64;
    let ring = (limits.ring_bytes as u64).min(limits.ring_frames as u64 * frame_bytes);
    let read = (limits.read_bytes as u64).min(limits.read_rows as u64 * frame_bytes);
    let catchup = read.min(limits.catchup_budget_bytes as u64);
    let per_connection = 13 * 1024 + 32 * 1024 + frame_bytes;
    let pool_reads = limits.pool_size as u64 * read;
    let bound_kib = (ring + pool_reads + catchup + 2 * per_connection) / 1024;
    let backlog_kib = (last - start) * frame_bytes / 1024;
    println!(
        "growth bound {bound_kib} KiB = ring {} + {} pooled reads {} + catch-up read {} + 2 connections x {} (KiB); \
         backlog {backlog_kib} KiB; grew {} KiB",
        ring / 1024,
        limits.pool_size,
        pool_reads / 1024,
        catchup / 1024,
        per_connection / 1024,
        peak.saturating_sub(rss_before)
    );
    assert!(
        bound_kib < backlog_kib / 2,
        "the bound ({bound_kib} KiB) must be far below the backlog ({backlog_kib} KiB) to mean anything"
    );
    assert!(
        peak.saturating_sub(rss_before) < bound_kib,
        "relay memory grew by {} KiB while a client stalled, over the bound of {bound_kib} KiB",
        peak.saturating_sub(rss_before)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_clear_answers_and_memory_returns_to_baseline() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann", "bob"]).await;
    // The relay runs as its own process, so its memory is its own.
    let relay = spawn_relay_process(
        &db.url,
        &[
            "--max-connections-per-user",
            "32",
            "--max-frames-per-second",
            "200",
        ],
    )
    .await;
    // A bystander who must be served throughout.
    let mut bob = WsClient::connect(relay.addr, "bob").await;
    let mut bob_seq = bob.subscribe("p", None).await["seq"].as_u64().expect("seq");
    let rss_baseline = relay.rss_kib();
    let mut rss_rounds = Vec::new();
    for round in 1..=2 {
        let report = hostile_round(relay.addr, &c).await;
        if round == 1 {
            println!("hostile input:\n  {}", report.join("\n  "));
        }
        // The bystander was served all along.
        c.execute(
            "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('p', 'bob', 'still served')",
            &[],
        )
        .await
        .expect("insert");
        bob_seq += 1;
        let f = bob.next_json(10).await;
        assert_eq!(f["seq"], bob_seq);
        assert_eq!(f["data"]["body"], "still served");
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_rounds.push(relay.rss_kib());
    }
    println!(
        "relay RSS KiB: baseline {rss_baseline}, after round 1 {}, after round 2 {}",
        rss_rounds[0], rss_rounds[1]
    );
    // Allocators keep some freed memory, so "baseline" means: the same
    // abuse again costs nothing more, and the total stays small.
    assert!(
        rss_rounds[1] < rss_rounds[0] + 4 * 1024,
        "memory grew from round 1 to round 2: {rss_rounds:?} KiB"
    );
    assert!(
        rss_rounds[1] < rss_baseline + 32 * 1024,
        "memory did not return near its baseline: {rss_baseline} -> {rss_rounds:?} KiB"
    );
    let status = relay.terminate().expect("sending SIGTERM to the relay");
    assert!(
        status.success(),
        "the relay exits cleanly on SIGTERM: {status}"
    );
}

/// One round of abuse; returns what the relay answered to each case.
async fn hostile_round(addr: std::net::SocketAddr, c: &tokio_postgres::Client) -> Vec<String> {
    let mut report = Vec::new();
    // 1. 1,000 random frames, binary and text, paced under the rate limit
    //    in bursts: each gets an error frame.
    let mut ann = WsClient::connect(addr, "ann").await;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..1000 {
        let len = (next() % 512) as usize + 1;
        let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let frame = if i % 2 == 0 {
            Message::Binary(bytes.into())
        } else {
            Message::Text(String::from_utf8_lossy(&bytes).into_owned().into())
        };
        // What this frame must get: binary is refused as such; text that
        // is not JSON is bad_json; JSON that is no object is bad_request.
        let expected = match &frame {
            Message::Binary(_) => "binary_not_supported",
            Message::Text(t) => match serde_json::from_str::<serde_json::Value>(t) {
                Err(_) => "bad_json",
                Ok(serde_json::Value::Object(_)) => {
                    panic!("frame {i} happens to be a JSON object: {t:?}; name its code here")
                }
                Ok(_) => "bad_request",
            },
            other => unreachable!("only text and binary are sent: {other:?}"),
        };
        ann.ws.send(frame).await.expect("send");
        let reply = ann.next_json(10).await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], expected, "random frame {i}: {reply}");
        *codes
            .entry(reply["code"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
        if i % 350 == 349 {
            // Stay inside 200 frames/s with a burst of 400.
            tokio::time::sleep(Duration::from_millis(1800)).await;
        }
    }
    report.push(format!("1000 random frames -> error frames {codes:?}"));

    // 2. Scope strings with quotes and SQL: forbidden, and the table stands.
    for scope in [
        "p'; DROP TABLE chat.messages; --",
        "\"quoted\"",
        "x' OR '1'='1",
        "🦀",
        "p\\",
    ] {
        ann.send_json(json!({"action": "subscribe", "project_id": scope}))
            .await;
        let reply = ann.next_json(10).await;
        assert_eq!(reply["code"], "forbidden", "{scope:?}: {reply}");
    }
    // Control characters (Postgres text cannot hold NUL) are bad input.
    ann.send_json(json!({"action": "subscribe", "project_id": "a\u{0}b"}))
        .await;
    assert_eq!(ann.next_json(10).await["code"], "bad_request");
    let still: i64 = c
        .query_one("SELECT count(*) FROM chat.messages", &[])
        .await
        .expect("chat.messages still exists")
        .get(0);
    report.push(format!(
        "SQL-ish scopes -> forbidden; chat.messages intact ({still} rows)"
    ));

    // 3. Deeply nested JSON within the size limit.
    ann.ws
        .send(Message::Text(
            format!("{}1{}", "[".repeat(30_000), "]".repeat(30_000)).into(),
        ))
        .await
        .expect("send");
    assert_eq!(ann.next_json(10).await["code"], "bad_json");
    report.push("30,000-deep JSON -> bad_json".into());

    // 4. Invalid UTF-8 in a text frame: close 1007.
    let mut bad_utf8 = WsClient::connect(addr, "ann").await;
    let raw = Frame::message(vec![0x7b, 0xff, 0xfe, 0x7d], OpCode::Data(Data::Text), true);
    let _ = bad_utf8.ws.send(Message::Frame(raw)).await;
    assert_eq!(bad_utf8.close_code(10).await, Some(1007));
    report.push("invalid UTF-8 text frame -> close 1007".into());

    // 5. A 16 MiB frame: close 1009, without buffering it.
    let mut huge = WsClient::connect(addr, "ann").await;
    let _ = huge
        .ws
        .send(Message::Text("x".repeat(16 << 20).into()))
        .await;
    assert_eq!(huge.close_code(10).await, Some(1009));
    report.push("16 MiB frame -> close 1009".into());

    // 6. 10,000 subscribe/unsubscribe frames in a burst: the first are
    //    served, then rate_limited errors, then close 4029.
    let mut flood = WsClient::connect(addr, "ann").await;
    for i in 0..10_000 {
        let action = if i % 2 == 0 {
            "subscribe"
        } else {
            "unsubscribe"
        };
        if flood
            .ws
            .feed(Message::Text(
                json!({"action": action, "project_id": "p"})
                    .to_string()
                    .into(),
            ))
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = flood.ws.flush().await;
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    let close = loop {
        match tokio::time::timeout(
            Duration::from_secs(10),
            futures_util::StreamExt::next(&mut flood.ws),
        )
        .await
        {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: serde_json::Value = serde_json::from_str(&t).expect("json");
                let key = v["code"]
                    .as_str()
                    .or(v["type"].as_str())
                    .unwrap_or("?")
                    .to_string();
                *seen.entry(key).or_default() += 1;
            }
            Ok(Some(Ok(Message::Close(f)))) => break f.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            _ => break None,
        }
    };
    assert_eq!(
        close,
        Some(4029),
        "a flood is closed as rate limited; saw {seen:?}"
    );
    assert!(seen.get("rate_limited").copied().unwrap_or(0) >= 1);
    report.push(format!("10,000-frame burst -> {seen:?} then close 4029"));

    // 7. A thousand connections from one user: 32 allowed, the rest 4029.
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..20 {
        let batch: Vec<_> = (0..50)
            .map(|_| {
                tokio_tungstenite::connect_async(format!("ws://{}/ws?token={}", addr, token("ann")))
            })
            .collect();
        for r in futures_util::future::join_all(batch).await {
            let (ws, _) = r.expect("handshake");
            held.push(WsClient { ws });
        }
        // Refused ones are closed at once; keep the accepted ones open.
        let verdicts = futures_util::future::join_all(
            held.iter_mut()
                .map(|c| c.try_close_code(Duration::from_millis(300))),
        )
        .await;
        let mut kept = Vec::new();
        for (client, verdict) in held.drain(..).zip(verdicts) {
            match verdict {
                Some(4029) => refused += 1,
                Some(other) => panic!("unexpected close {other}"),
                None => kept.push(client),
            }
        }
        held = kept;
    }
    let accepted = held.len();
    assert_eq!(
        accepted,
        32 - 1,
        "the per-user limit (one earlier ann connection is open)"
    );
    report.push(format!("1,000 connections of one user -> {accepted} accepted (+1 already open), {refused} closed 4029"));
    drop(held);
    drop(flood);
    drop(ann);
    // Wait until the refused and dropped connections are gone.
    tokio::time::sleep(Duration::from_millis(300)).await;
    report
}

//! Bad input gets a clear error and loses nothing (G7): malformed JSON,
//! unknown actions, missing fields, binary and oversize frames, bad tokens;
//! and the HTTP surface (`/healthz`, `/metrics`, unknown routes).

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use serde_json::json;
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
async fn missing_bad_and_expired_tokens_are_closed_with_documented_codes() {
    let db = TestDb::new().await;
    let relay = start_relay(relay_config(&db.url)).await;
    let expired = {
        use jsonwebtoken::{encode, EncodingKey, Header};
        let claims = json!({"sub": "ann", "exp": pgrelay::auth::unix_now() - 3600});
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .expect("sign")
    };
    for (query, code) in [
        (String::new(), 4001u16),
        ("?token=not.a.jwt".to_string(), 4001),
        (
            format!("?token={}", {
                let other = pgrelay::auth::Authenticator::hs256(
                    b"wrong-secret-of-enough-bytes",
                    Duration::ZERO,
                );
                other.issue("ann", Duration::from_secs(60)).expect("sign")
            }),
            4001,
        ),
        (format!("?token={expired}"), 4002),
    ] {
        let url = format!("ws://{}/ws{query}", relay.addr);
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("handshake");
        let mut client = WsClient { ws };
        assert_eq!(client.close_code(10).await, Some(code), "query {query:?}");
    }
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

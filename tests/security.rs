//! G4 and hostile input: only authorized members ever receive a project's
//! events, tokens are checked strictly, and nothing a client sends can
//! crash, stall or exhaust the relay.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use pgrelay::auth::{unix_now, AuthConfig};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

fn hs256(claims: serde_json::Value, secret: &[u8]) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("sign")
}

async fn close_code_for(addr: std::net::SocketAddr, token: &str) -> Option<u16> {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={token}"))
        .await
        .expect("handshake");
    WsClient { ws }.close_code(10).await
}

/// An ES256 key pair made by openssl: (private PKCS#8 PEM, public PEM).
fn es256_keys() -> (Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("key.pem");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("running openssl (install the openssl package)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let key_path = key.to_str().expect("utf-8 path");
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        key_path,
    ]);
    let public = run(&["pkey", "-in", key_path, "-pubout"]);
    (std::fs::read(&key).expect("reading the key"), public)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_documented_close_codes() {
    let db = TestDb::new().await;
    let mut config = relay_config(&db.url);
    config.auth.leeway = Duration::ZERO;
    config.auth.audience = Some("pgrelay-clients".into());
    config.auth.issuer = Some("https://auth.example".into());
    let relay = start_relay(config).await;
    let now = unix_now();
    let good = json!({"sub": "ann", "exp": now + 600, "aud": "pgrelay-clients", "iss": "https://auth.example"});
    let with = |patch: serde_json::Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().expect("object") {
            if v.is_null() {
                c.as_object_mut().expect("object").remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        hs256(c, SECRET)
    };
    // alg "none": header {"alg":"none"}, claims, empty signature.
    let b64 = |v: &serde_json::Value| base64url(v.to_string().as_bytes());
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&good)
    );
    let cases: Vec<(&str, String, u16)> = vec![
        ("no token", String::new(), 4001),
        ("malformed", "not-a-jwt".into(), 4001),
        (
            "wrong signature",
            hs256(good.clone(), b"some-other-secret-entirely"),
            4001,
        ),
        ("alg none", alg_none, 4001),
        ("expired", with(json!({"exp": now - 10})), 4002),
        ("not yet valid", with(json!({"nbf": now + 600})), 4001),
        ("wrong audience", with(json!({"aud": "someone-else"})), 4001),
        ("missing audience", with(json!({"aud": null})), 4001),
        (
            "wrong issuer",
            with(json!({"iss": "https://evil.example"})),
            4001,
        ),
        ("no sub", with(json!({"sub": null})), 4001),
    ];
    let mut refused = Vec::new();
    for (name, token, code) in &cases {
        let got = close_code_for(relay.addr, token).await;
        assert_eq!(got, Some(*code), "{name}");
        refused.push(format!("{name} -> {code}"));
    }
    // The good token is accepted.
    let (ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/ws?token={}",
        relay.addr,
        hs256(good, SECRET)
    ))
    .await
    .expect("handshake");
    let mut ann = WsClient { ws };
    ann.send_json(json!({"action": "ping"})).await;
    assert_eq!(ann.next_json(5).await["type"], "pong");
    println!("refused: {}", refused.join("; "));
    relay.shutdown().await;
}

fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_key_tokens_work_and_algorithm_confusion_is_refused() {
    let db = TestDb::new().await;
    let (private, public) = es256_keys();
    let mut config = relay_config(&db.url);
    config.auth = AuthConfig {
        hs256_secret: None,
        public_key_pem: Some(public.clone()),
        leeway: Duration::from_secs(5),
        audience: None,
        issuer: None,
    };
    let relay = start_relay(config).await;
    let claims = json!({"sub": "ann", "exp": unix_now() + 600});
    let es = encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(&private).expect("private key"),
    )
    .expect("sign ES256");
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?token={es}", relay.addr))
        .await
        .expect("handshake");
    let mut ann = WsClient { ws };
    ann.send_json(json!({"action": "ping"})).await;
    assert_eq!(
        ann.next_json(5).await["type"],
        "pong",
        "ES256 token accepted"
    );
    // The classic confusion: HS256 "signed" with the public key as secret.
    let confused = hs256(claims.clone(), &public);
    assert_eq!(close_code_for(relay.addr, &confused).await, Some(4001));
    // And a token signed with the (unconfigured) test secret.
    assert_eq!(
        close_code_for(relay.addr, &hs256(claims, SECRET)).await,
        Some(4001)
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_member_gets_forbidden_and_none_of_the_events() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "secret", &["ann"]).await;
    seed_project(&c, "open", &["eve", "ann"]).await;
    let relay = start_relay(relay_config(&db.url)).await;
    let mut eve = WsClient::connect(relay.addr, "eve").await;
    eve.send_json(json!({"action": "subscribe", "project_id": "secret"}))
        .await;
    let refused = eve.next_json(10).await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    eve.subscribe("open", None).await;
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body)
         SELECT 'secret', 'ann', 'classified ' || g FROM generate_series(1, 200) g",
        &[],
    )
    .await
    .expect("secret writes");
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('open', 'ann', 'marker')",
        &[],
    )
    .await
    .expect("marker");
    // The marker, written after the 200 secret events, is the next frame.
    let f = eve.next_json(10).await;
    assert_eq!(
        f["project_id"], "open",
        "eve got only her project's event: {f}"
    );
    assert_eq!(f["data"]["body"], "marker");
    assert!(eve
        .try_next_json(Duration::from_millis(300))
        .await
        .is_none());
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_membership_stops_delivery_at_the_revoking_seq() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "team", &["ann", "bob", "w"]).await;
    let relay = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let mut bob = WsClient::connect(relay.addr, "bob").await;
    let start = ann.subscribe("team", None).await["seq"]
        .as_u64()
        .expect("seq");
    bob.subscribe("team", None).await;

    let writer = {
        let client = db.client().await;
        tokio::spawn(async move {
            for i in 0..600 {
                client
                    .execute(
                        "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('team', 'w', $1)",
                        &[&format!("m{i}")],
                    )
                    .await
                    .expect("insert");
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let revoked_at: i64 = c
        .query_one(
            "WITH d AS (DELETE FROM chat.project_members WHERE project_id = 'team' AND user_id = 'bob' RETURNING 1)
             SELECT max(seq) FROM relay.events WHERE scope = 'team' AND resource = 'project_member' AND action = 'DELETE'
                                                    AND row_id = 'bob'",
            &[],
        )
        .await
        .expect("revoke")
        .get::<_, Option<i64>>(0)
        .unwrap_or(0);
    // The CTE's DELETE is not visible to its own SELECT; read it after.
    let revoked_at = if revoked_at > 0 {
        revoked_at as u64
    } else {
        c.query_one(
            "SELECT seq FROM relay.events WHERE scope = 'team' AND resource = 'project_member'
                AND action = 'DELETE' AND row_id = 'bob'",
            &[],
        )
        .await
        .expect("revoking seq")
        .get::<_, i64>(0) as u64
    };
    writer.await.expect("writer");
    let last = start + 601; // 600 messages and the revocation
    let ann_seqs = ann.events_until("team", last, 60).await;
    assert_contiguous(&ann_seqs, start + 1, last, "ann (still a member)");

    // bob: events up to and including his removal, then forbidden, then
    // nothing at all.
    let mut bob_max = 0;
    let mut forbidden = false;
    while let Some(f) = bob.try_next_json(Duration::from_secs(3)).await {
        if f["type"] == "cache_invalidate" {
            assert!(!forbidden, "event after the forbidden frame: {f}");
            bob_max = bob_max.max(f["seq"].as_u64().expect("seq"));
        } else if f["type"] == "error" {
            assert_eq!(f["code"], "forbidden", "{f}");
            forbidden = true;
        }
    }
    assert!(forbidden, "bob was told his subscription ended");
    assert!(
        bob_max <= revoked_at,
        "bob received seq {bob_max} after his removal at seq {revoked_at}"
    );
    println!(
        "revocation at seq {revoked_at}: bob's highest seq {bob_max}, ann received {} of {} events; revocations {}",
        ann_seqs.len(),
        last - start,
        relay.metrics.revocations.load(Relaxed)
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_closes_and_a_refresh_keeps_the_connection() {
    let db = TestDb::new().await;
    let mut config = relay_config(&db.url);
    config.auth.leeway = Duration::ZERO;
    let relay = start_relay(config).await;
    let short = |sub: &str| hs256(json!({"sub": sub, "exp": unix_now() + 2}), SECRET);

    let (ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?token={}", relay.addr, short("ann")))
            .await
            .expect("handshake");
    let mut expiring = WsClient { ws };
    let (ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?token={}", relay.addr, short("bob")))
            .await
            .expect("handshake");
    let mut refreshed = WsClient { ws };
    refreshed
        .send_json(json!({"action": "auth", "token": hs256(json!({"sub": "bob", "exp": unix_now() + 600}), SECRET)}))
        .await;
    let ok = refreshed.next_json(5).await;
    assert_eq!(ok["type"], "authenticated", "{ok}");
    // A token for another user is refused, the connection stays.
    refreshed
        .send_json(json!({"action": "auth", "token": hs256(json!({"sub": "eve", "exp": unix_now() + 600}), SECRET)}))
        .await;
    assert_eq!(refreshed.next_json(5).await["code"], "forbidden");

    assert_eq!(
        expiring.close_code(10).await,
        Some(4002),
        "closed at expiry"
    );
    refreshed.send_json(json!({"action": "ping"})).await;
    assert_eq!(
        refreshed.next_json(5).await["type"],
        "pong",
        "the refreshed connection lives on"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_outside_the_allow_list_are_refused() {
    let db = TestDb::new().await;
    let mut config = relay_config(&db.url);
    config.allowed_origins = vec!["https://app.example".into()];
    let relay = start_relay(config).await;
    let attempt = |origin: Option<&'static str>| {
        let addr = relay.addr;
        async move {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut req = format!("ws://{addr}/ws?token={}", token("ann"))
                .into_client_request()
                .expect("request");
            if let Some(o) = origin {
                req.headers_mut()
                    .insert("origin", o.parse().expect("header"));
            }
            tokio_tungstenite::connect_async(req)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    assert!(attempt(Some("https://app.example")).await.is_ok());
    assert!(
        attempt(None).await.is_ok(),
        "non-browser clients send no Origin"
    );
    let refused = attempt(Some("https://evil.example")).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("403")),
        "{refused:?}"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_clear_answers_and_memory_returns_to_baseline() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann", "bob"]).await;
    // The relay runs as its own process, so its memory is its own.
    let relay = RelayProcess::start(
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
    let status = relay.terminate();
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
        ann.ws.send(frame).await.expect("send");
        let reply = ann.next_json(10).await;
        assert_eq!(reply["type"], "error", "{reply}");
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

#[tokio::test]
async fn the_token_command_signs_with_the_configured_secret() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["token", "--user", "zoe", "--ttl", "2h"])
        .env(
            "PGRELAY_JWT_SECRET",
            std::str::from_utf8(SECRET).expect("utf-8"),
        )
        .output()
        .expect("running pgrelay token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).expect("utf-8");
    let identity = pgrelay::auth::Authenticator::hs256(SECRET, Duration::ZERO)
        .verify(token.trim())
        .expect("the printed token verifies");
    assert_eq!(identity.user_id, "zoe");
    let ttl = identity.expires_at - unix_now();
    assert!((7100..=7200).contains(&ttl), "ttl {ttl}");
}

//! G4 Authorization: only users authorized for a scope at delivery time
//! receive its events, revoking membership stops delivery at once without a
//! reconnect, and a missing, bad, expired or wrongly signed token is
//! refused with a documented close code; tokens are checked strictly
//! (audience, algorithm, in-band refresh), origins outside the allow-list
//! are refused, and `pgrelay token` signs with the configured secret.
//! Races found in review (a revocation racing a subscribe, a reset over a
//! membership event) are in `regressions.rs`.

mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use pgrelay::auth::{unix_now, AuthConfig};
use serde_json::json;

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
    let key_path = key.to_str().expect("utf-8 path");
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        key_path,
    ]);
    let public = openssl(&["pkey", "-in", key_path, "-pubout"]);
    (std::fs::read(&key).expect("reading the key"), public)
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
        jwks: None,
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
    let bob_start = bob.subscribe("team", None).await["seq"]
        .as_u64()
        .expect("seq");

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
    c.execute(
        "DELETE FROM chat.project_members WHERE project_id = 'team' AND user_id = 'bob'",
        &[],
    )
    .await
    .expect("revoke");
    let revoked_at = c
        .query_one(
            "SELECT seq FROM relay.events WHERE scope = 'team' AND resource = 'project_member'
                AND action = 'DELETE' AND row_id = 'bob'",
            &[],
        )
        .await
        .expect("revoking seq")
        .get::<_, i64>(0) as u64;
    writer.await.expect("writer");
    let last = start + 601; // 600 messages and the revocation
    let ann_seqs = ann.events_until("team", last, 60).await;
    assert_contiguous(&ann_seqs, start + 1, last, "ann (still a member)");

    // bob: every event up to and including his removal, then forbidden,
    // then nothing at all: every later seq is committed and ann has it.
    expect_events_then_ended(
        &mut bob,
        "team",
        (bob_start + 1, revoked_at),
        "forbidden",
        Duration::from_secs(2),
        "bob",
    )
    .await;
    println!(
        "revocation at seq {revoked_at}: bob received seq {}..={revoked_at}, ann received {} of {} events; revocations {}",
        bob_start + 1,
        ann_seqs.len(),
        last - start,
        relay.metrics.revocations_total()
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

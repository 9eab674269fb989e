//! Tokens of an identity provider (PGRELAY_JWT_JWKS_URL,
//! PGRELAY_JWT_OIDC_ISSUER), against a real HTTP server this file starts on
//! loopback, serving a JWKS the tests rotate, take down and flood with
//! unknown `kid`s; key pairs are made by openssl, tokens are signed with
//! them and sent to a real relay over real WebSockets.
//!
//! - a key added by the provider is accepted without a restart (on a new
//!   connection and in a renewal on an open one); a key it removed is
//!   refused within the refresh interval;
//! - the provider down (connections dropped, or a broken document): known
//!   keys keep working, failures are counted;
//! - a JWKS unreachable at start: the relay serves, `/healthz` is 503 with
//!   the reason, and all is well once the provider answers;
//! - 10,000 tokens with made-up `kid`s, over 10,000 WebSockets, cost the
//!   provider a handful of requests (counted at the server);
//! - RS256, ES256 and EdDSA; `aud`/`iss`; OIDC discovery.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use pgrelay::auth::{unix_now, AuthConfig};
use pgrelay::config::RelayConfig;
use pgrelay::jwks::{JwksConfig, JwksSource};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

// ---- keys ---------------------------------------------------------------

/// A key pair of the provider: the private half signs, the public half is
/// in the JWKS under `kid`.
struct TestKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

fn key(kid: &str, alg: Algorithm) -> TestKey {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("key.pem");
    let out = path.to_str().expect("utf-8 path");
    match alg {
        Algorithm::RS256 => openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            out,
        ]),
        Algorithm::ES256 => openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            out,
        ]),
        Algorithm::EdDSA => openssl(&["genpkey", "-algorithm", "ED25519", "-out", out]),
        other => panic!("no test keys for {other:?}"),
    };
    let pem = std::fs::read(&path).expect("reading the key");
    let encoding = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        _ => EncodingKey::from_ed_pem(&pem),
    }
    .expect("openssl's private key");
    let mut jwk = Jwk::from_encoding_key(&encoding, alg).expect("the public JWK");
    jwk.common.key_id = Some(kid.to_string());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    TestKey {
        kid: kid.to_string(),
        alg,
        encoding,
        jwk: serde_json::to_value(&jwk).expect("JWK as JSON"),
    }
}

fn jwks(keys: &[&TestKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
}

fn claims(user: &str) -> Value {
    json!({"sub": user, "exp": unix_now() + 600})
}

fn sign(key: &TestKey, claims: &Value) -> String {
    sign_as(key, &key.kid, key.alg, claims)
}

/// A token whose header says `kid` and `alg`, signed with `key`.
fn sign_as(key: &TestKey, kid: &str, alg: Algorithm, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_string());
    encode(&header, claims, &key.encoding).expect("signing")
}

/// `token` with its header replaced by one naming `kid` (the signature no
/// longer matches, which an unknown `kid` never gets to check): made-up
/// kids cost an attacker nothing, and here no signing time.
fn with_kid(token: &str, kid: &str) -> String {
    let (_, rest) = token.split_once('.').expect("a JWT");
    let header = json!({"alg": "ES256", "typ": "JWT", "kid": kid}).to_string();
    format!("{}.{rest}", base64url(header.as_bytes()))
}

// ---- the provider -------------------------------------------------------

#[derive(Clone)]
enum Mode {
    /// Answers with the document.
    Serve,
    /// Takes connections and drops them without a word.
    Down,
    /// Answers 200 with a document that is no JWKS.
    Garbage,
}

struct ProviderState {
    jwks: Value,
    mode: Mode,
    delay: Duration,
}

/// A JWKS endpoint (and an OIDC discovery document) on loopback: one
/// HTTP/1.1 request per connection, every request counted.
struct Provider {
    addr: SocketAddr,
    state: Arc<Mutex<ProviderState>>,
    jwks_requests: Arc<AtomicU64>,
    discovery_requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Provider {
    async fn start(jwks: Value) -> Provider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the provider");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(Mutex::new(ProviderState {
            jwks,
            mode: Mode::Serve,
            delay: Duration::ZERO,
        }));
        let jwks_requests = Arc::new(AtomicU64::new(0));
        let discovery_requests = Arc::new(AtomicU64::new(0));
        let task = {
            let (state, jwks_requests, discovery_requests) = (
                state.clone(),
                jwks_requests.clone(),
                discovery_requests.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let Ok((mut socket, _)) = listener.accept().await else {
                        continue;
                    };
                    let (state, jwks_requests, discovery_requests) = (
                        state.clone(),
                        jwks_requests.clone(),
                        discovery_requests.clone(),
                    );
                    tokio::spawn(async move {
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match socket.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        let head = String::from_utf8_lossy(&head).to_string();
                        let path = head.split(' ').nth(1).unwrap_or("").to_string();
                        let (mode, delay, doc) = {
                            let s = state.lock().expect("lock");
                            (s.mode.clone(), s.delay, s.jwks.clone())
                        };
                        let body = match path.as_str() {
                            "/.well-known/jwks.json" => {
                                jwks_requests.fetch_add(1, SeqCst);
                                match mode {
                                    Mode::Serve => doc.to_string(),
                                    Mode::Down => return,
                                    Mode::Garbage => "<html>maintenance</html>".to_string(),
                                }
                            }
                            "/.well-known/openid-configuration" => {
                                discovery_requests.fetch_add(1, SeqCst);
                                if matches!(mode, Mode::Down) {
                                    return;
                                }
                                let issuer = format!("http://{addr}");
                                json!({"issuer": issuer,
                                       "jwks_uri": format!("{issuer}/.well-known/jwks.json")})
                                .to_string()
                            }
                            _ => {
                                let _ = socket
                                    .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                                    .await;
                                return;
                            }
                        };
                        tokio::time::sleep(delay).await;
                        let response = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = socket.write_all(response.as_bytes()).await;
                        let _ = socket.shutdown().await;
                    });
                }
            })
        };
        Provider {
            addr,
            state,
            jwks_requests,
            discovery_requests,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    fn issuer(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn serve(&self, jwks: Value) {
        let mut s = self.state.lock().expect("lock");
        s.jwks = jwks;
        s.mode = Mode::Serve;
    }

    fn set_mode(&self, mode: Mode) {
        self.state.lock().expect("lock").mode = mode;
    }

    fn set_delay(&self, delay: Duration) {
        self.state.lock().expect("lock").delay = delay;
    }

    fn requests(&self) -> u64 {
        self.jwks_requests.load(SeqCst)
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---- the relay's side ---------------------------------------------------

/// A relay whose tokens are checked with `jwks` only (no shared secret).
fn jwks_relay_config(url: &str, jwks: JwksConfig) -> RelayConfig {
    let mut config = relay_config(url);
    config.auth = AuthConfig {
        hs256_secret: None,
        public_key_pem: None,
        leeway: Duration::from_secs(5),
        audience: None,
        issuer: None,
        jwks: Some(jwks),
    };
    config
}

fn jwks_config(url: String, refresh: Duration, min_fetch: Duration) -> JwksConfig {
    JwksConfig {
        refresh_interval: refresh,
        min_fetch_interval: min_fetch,
        ..JwksConfig::new(JwksSource::Url(url))
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Accepted,
    Closed(Option<u16>),
}

/// Connects to `/ws` with `token` and pings: `Accepted` if a pong comes,
/// else the close code the relay sent.
async fn connect_with(addr: SocketAddr, token: &str) -> Outcome {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={token}"))
        .await
        .expect("handshake");
    let _ = ws
        .send(Message::Text(json!({"action": "ping"}).to_string().into()))
        .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => panic!("neither a pong nor a close within 15 s"),
            Ok(Some(Ok(Message::Text(text)))) => {
                let frame: Value = serde_json::from_str(&text).expect("JSON frame");
                if frame["type"] == "pong" {
                    let _ = ws.close(None).await;
                    return Outcome::Accepted;
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Outcome::Closed(frame.map(|f| u16::from(f.code)))
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_))) | Ok(None) => return Outcome::Closed(None),
        }
    }
}

/// Polls until `token` gets `want`, or panics after `bound`; returns how
/// long it took.
async fn wait_for_outcome(
    addr: SocketAddr,
    token: &str,
    want: Outcome,
    bound: Duration,
) -> Duration {
    let t0 = Instant::now();
    loop {
        let got = connect_with(addr, token).await;
        if got == want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < bound,
            "still {got:?} after {bound:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const REFUSED: Outcome = Outcome::Closed(Some(4001));

// ---- the tests ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_in_key_works_at_once_and_a_rotated_out_key_stops_within_the_refresh() {
    let db = TestDb::new().await;
    let (old, new) = (key("old", Algorithm::RS256), key("new", Algorithm::RS256));
    let provider = Provider::start(jwks(&[&old])).await;
    let refresh = Duration::from_secs(2);
    let relay = start_relay(jwks_relay_config(
        &db.url,
        jwks_config(provider.url(), refresh, Duration::from_millis(500)),
    ))
    .await;
    assert_eq!(healthz(relay.addr).await.0, 200);
    assert_eq!(
        connect_with(relay.addr, &sign(&old, &claims("ann"))).await,
        Outcome::Accepted
    );
    let fetched = provider.requests();
    assert_eq!(fetched, 1, "one fetch at start");
    // A client signed in with the old key stays connected through the
    // rotation, and will renew its token on the connection.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/ws?token={}",
        relay.addr,
        sign(&old, &claims("cat"))
    ))
    .await
    .expect("handshake");

    // The provider publishes a new key and signs with it: the first token
    // naming it (here a renewal on the open connection) fetches the set
    // again and is accepted, no restart.
    provider.serve(jwks(&[&old, &new]));
    ws.send(Message::Text(
        json!({"action": "auth", "token": sign(&new, &claims("cat"))})
            .to_string()
            .into(),
    ))
    .await
    .expect("sending auth");
    let reply = loop {
        match tokio::time::timeout(Duration::from_secs(15), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let frame: Value = serde_json::from_str(&text).expect("JSON frame");
                if frame["type"] == "authenticated" || frame["type"] == "error" {
                    break frame;
                }
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no reply to auth: {other:?}"),
        }
    };
    assert_eq!(
        reply["type"], "authenticated",
        "renewal with the new key: {reply}"
    );
    assert_eq!(
        provider.requests(),
        fetched + 1,
        "the unknown kid was fetched"
    );
    let _ = ws.close(None).await;
    assert_eq!(
        connect_with(relay.addr, &sign(&new, &claims("bob"))).await,
        Outcome::Accepted,
        "a new connection with a token of the rotated-in key"
    );

    // The old key is withdrawn: its tokens stop working within the
    // refresh interval (bound: the interval, a failed-fetch backoff and
    // a loaded machine's margin), while the new key goes on.
    provider.serve(jwks(&[&new]));
    let old_token = sign(&old, &claims("ann"));
    let took = wait_for_outcome(relay.addr, &old_token, REFUSED, refresh * 5).await;
    assert_eq!(
        connect_with(relay.addr, &sign(&new, &claims("bob"))).await,
        Outcome::Accepted
    );
    assert!(metric(relay.addr, "pgrelay_jwks_keys").await == 1.0);
    assert_eq!(
        metric(relay.addr, "pgrelay_jwks_fetch_failures_total").await,
        0.0
    );
    println!(
        "rotated-out key refused {took:?} after its withdrawal (refresh {refresh:?}); {} JWKS requests",
        provider.requests()
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_provider_down_known_keys_keep_working_and_failures_are_counted() {
    let db = TestDb::new().await;
    let (k1, k2) = (key("k1", Algorithm::ES256), key("k2", Algorithm::ES256));
    let provider = Provider::start(jwks(&[&k1])).await;
    let refresh = Duration::from_millis(500);
    let relay = start_relay(jwks_relay_config(
        &db.url,
        jwks_config(provider.url(), refresh, Duration::from_millis(250)),
    ))
    .await;
    let token = sign(&k1, &claims("ann"));
    assert_eq!(connect_with(relay.addr, &token).await, Outcome::Accepted);

    for mode in [Mode::Down, Mode::Garbage] {
        let failures = metric(relay.addr, "pgrelay_jwks_fetch_failures_total").await;
        provider.set_mode(mode);
        // Some scheduled refreshes fail (bound: generous for a loaded
        // machine; the backoff is capped by the refresh interval).
        let t0 = Instant::now();
        while metric(relay.addr, "pgrelay_jwks_fetch_failures_total").await < failures + 2.0 {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "refreshes did not fail"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The last good keys are kept: the known key verifies, the relay
        // stays healthy; an unknown key is still refused.
        assert_eq!(connect_with(relay.addr, &token).await, Outcome::Accepted);
        assert_eq!(healthz(relay.addr).await.0, 200);
        assert_eq!(
            connect_with(relay.addr, &sign(&k2, &claims("bob"))).await,
            REFUSED
        );
        assert_eq!(metric(relay.addr, "pgrelay_jwks_keys").await, 1.0);
    }
    // Back up, with k2 added: it is taken.
    provider.serve(jwks(&[&k1, &k2]));
    wait_for_outcome(
        relay.addr,
        &sign(&k2, &claims("bob")),
        Outcome::Accepted,
        Duration::from_secs(20),
    )
    .await;
    assert!(metric(relay.addr, "pgrelay_jwks_unknown_kid_total").await >= 2.0);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_unreachable_at_start_keeps_healthz_at_503_until_it_loads() {
    let db = TestDb::new().await;
    let k = key("k", Algorithm::EdDSA);
    let provider = Provider::start(jwks(&[&k])).await;
    provider.set_mode(Mode::Down);
    let relay = start_relay(jwks_relay_config(
        &db.url,
        jwks_config(
            provider.url(),
            Duration::from_secs(300),
            Duration::from_millis(500),
        ),
    ))
    .await;
    let (status, body) = healthz(relay.addr).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["token_keys"], false, "{body}");
    assert!(
        body["reason"].as_str().unwrap_or("").contains("JWKS"),
        "{body}"
    );
    let token = sign(&k, &claims("ann"));
    assert_eq!(connect_with(relay.addr, &token).await, REFUSED);

    provider.set_mode(Mode::Serve);
    let t0 = Instant::now();
    loop {
        let (status, body) = healthz(relay.addr).await;
        if status == 200 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "still {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(connect_with(relay.addr, &token).await, Outcome::Accepted);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_es256_and_eddsa_keys_each_verify_and_keys_keep_to_their_algorithm() {
    let db = TestDb::new().await;
    let keys = [
        key("rsa", Algorithm::RS256),
        key("ec", Algorithm::ES256),
        key("ed", Algorithm::EdDSA),
    ];
    let provider = Provider::start(jwks(&keys.iter().collect::<Vec<_>>())).await;
    let mut config = jwks_relay_config(
        &db.url,
        jwks_config(
            provider.url(),
            Duration::from_secs(300),
            Duration::from_secs(10),
        ),
    );
    config.auth.audience = Some("pgrelay-clients".into());
    config.auth.issuer = Some("https://auth.example".into());
    let relay = start_relay(config).await;
    let good = json!({"sub": "ann", "exp": unix_now() + 600, "aud": "pgrelay-clients", "iss": "https://auth.example"});
    for k in &keys {
        assert_eq!(
            connect_with(relay.addr, &sign(k, &good)).await,
            Outcome::Accepted,
            "{:?}",
            k.alg
        );
        // aud and iss are checked as with a secret.
        for (field, value) in [("aud", "someone-else"), ("iss", "https://evil.example")] {
            let mut c = good.clone();
            c[field] = json!(value);
            assert_eq!(
                connect_with(relay.addr, &sign(k, &c)).await,
                REFUSED,
                "{:?} with {field} {value}",
                k.alg
            );
        }
        let mut no_aud = good.clone();
        no_aud.as_object_mut().expect("object").remove("aud");
        assert_eq!(connect_with(relay.addr, &sign(k, &no_aud)).await, REFUSED);
    }
    // A key verifies only its own algorithm: a token that names the RSA
    // key but is signed (and labelled) ES256 by the EC key is refused,
    // and so is an HS256 token naming a JWKS key.
    let mislabelled = sign_as(&keys[1], "rsa", Algorithm::ES256, &good);
    assert_eq!(connect_with(relay.addr, &mislabelled).await, REFUSED);
    let hs = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rsa".into());
        encode(&header, &good, &EncodingKey::from_secret(SECRET)).expect("sign")
    };
    assert_eq!(connect_with(relay.addr, &hs).await, REFUSED);
    // None of these made-up or mislabelled tokens needed a second fetch
    // beyond the rate limit (10 s here): the start's, and at most one.
    assert!(provider.requests() <= 2, "{}", provider.requests());
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_discovery_finds_the_jwks_and_checks_the_issuer() {
    let db = TestDb::new().await;
    let k = key("k", Algorithm::RS256);
    let provider = Provider::start(jwks(&[&k])).await;
    let config = jwks_relay_config(
        &db.url,
        JwksConfig {
            refresh_interval: Duration::from_secs(300),
            ..JwksConfig::new(JwksSource::Issuer(format!("{}/", provider.issuer())))
        },
    );
    let relay = start_relay(config).await;
    assert_eq!(provider.discovery_requests.load(SeqCst), 1);
    assert_eq!(provider.requests(), 1);
    let mut c = claims("ann");
    c["iss"] = json!(provider.issuer());
    assert_eq!(
        connect_with(relay.addr, &sign(&k, &c)).await,
        Outcome::Accepted
    );
    c["iss"] = json!("https://other.example");
    assert_eq!(connect_with(relay.addr, &sign(&k, &c)).await, REFUSED);
    assert_eq!(
        connect_with(relay.addr, &sign(&k, &claims("ann"))).await,
        REFUSED,
        "iss is required"
    );
    relay.shutdown().await;
}

/// 10,000 tokens with made-up `kid`s, each on its own WebSocket to the
/// relay's `/ws`, 100 at a time, while the provider takes 200 ms to answer
/// (so misses pile up behind a fetch under way): each is refused, and the
/// provider, counting the requests it gets, sees at most one fetch per
/// started `min_fetch_interval` (the default, 10 s) beyond the start's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_unknown_kids_cost_a_handful_of_fetches() {
    const TOKENS: u64 = 10_000;
    const CLIENTS: u64 = 100;
    let db = TestDb::new().await;
    let k = key("real", Algorithm::ES256);
    let provider = Provider::start(jwks(&[&k])).await;
    let config = JwksConfig {
        refresh_interval: Duration::from_secs(3600),
        ..JwksConfig::new(JwksSource::Url(provider.url()))
    };
    let min_fetch = config.min_fetch_interval;
    let relay = start_relay(jwks_relay_config(&db.url, config)).await;
    assert_eq!(provider.requests(), 1, "one fetch at start");
    provider.set_delay(Duration::from_millis(200));
    let real = sign(&k, &claims("ann"));

    let t0 = Instant::now();
    let refused = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for worker in 0..CLIENTS {
        let (addr, real, refused) = (relay.addr, real.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..TOKENS / CLIENTS {
                let token = with_kid(&real, &format!("made-up-{worker}-{i}"));
                if connect_with(addr, &token).await == REFUSED {
                    refused.fetch_add(1, SeqCst);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("a client task");
    }
    let elapsed = t0.elapsed();
    let fetches = provider.requests() - 1;
    assert_eq!(refused.load(SeqCst), TOKENS, "every made-up kid refused");
    // An unknown kid may fetch the set again (a key may have just been
    // added), but at most once per started min_fetch_interval.
    let allowed = 1 + elapsed.as_secs() / min_fetch.as_secs();
    assert!(
        (1..=allowed).contains(&fetches),
        "{fetches} JWKS fetches in {elapsed:?} for {TOKENS} unknown kids (at most {allowed})"
    );
    assert_eq!(
        metric(relay.addr, "pgrelay_jwks_unknown_kid_total").await,
        TOKENS as f64
    );
    assert_eq!(
        metric(relay.addr, "pgrelay_jwks_fetches_total").await,
        (fetches + 1) as f64,
        "the relay counts the fetches the provider saw"
    );
    // The real key was never in doubt.
    assert_eq!(connect_with(relay.addr, &real).await, Outcome::Accepted);
    println!(
        "{TOKENS} unknown kids over /ws in {elapsed:?} -> {fetches} JWKS fetch(es) \
         (min_fetch_interval {min_fetch:?})"
    );
    relay.shutdown().await;
}

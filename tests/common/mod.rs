//! The test harness: one private Postgres per test binary, a fresh database
//! per test cloned from a migrated template, so tests are independent and
//! need no server set up beforehand.
//!
//! Tests that inject faults (stopping or restarting Postgres) take a
//! [`TestServer::dedicated`] server of their own (or one with settings of
//! their own, [`TestServer::with_options`], e.g. a primary for a standby),
//! so they never disturb the tests sharing the binary's server. Network
//! faults go through a [`FaultProxy`] (`proxy.rs`); `pgbouncer.rs` runs a
//! real PgBouncer for the tests that need one.

#![allow(dead_code)] // each test binary uses a different part of this

mod proxy;
#[allow(unused_imports)]
pub use proxy::FaultProxy;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use pgrelay::db::embedded::{PgOptions, PgServer};
use pgrelay::db::schema;
use tokio_postgres::{Client, NoTls};

const TEMPLATE: &str = "pgrelay_template";

/// A private server whose `pgrelay_template` database is migrated.
pub struct TestServer {
    pub pg: PgServer,
}

/// A fresh, migrated database of its own for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestServer {
    /// The server shared by every test of this binary.
    pub fn shared() -> &'static TestServer {
        static SHARED: OnceLock<TestServer> = OnceLock::new();
        SHARED.get_or_init(|| TestServer::dedicated_blocking(PgOptions::for_tests()))
    }

    /// A server of the caller's own, for fault injection.
    pub async fn dedicated() -> TestServer {
        TestServer::with_options(PgOptions::for_tests()).await
    }

    /// A server of the caller's own, with these settings.
    pub async fn with_options(options: PgOptions) -> TestServer {
        tokio::task::spawn_blocking(move || TestServer::dedicated_blocking(options))
            .await
            .expect("starting a dedicated test server")
    }

    /// Starts a server and migrates its template. Runs its own runtime on a
    /// plain thread so it can be called from inside a test's runtime.
    fn dedicated_blocking(options: PgOptions) -> TestServer {
        let pg = PgServer::start(options).expect("starting the test Postgres");
        let admin = pg.url("postgres");
        let template = pg.url(TEMPLATE);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building a runtime for the template");
            rt.block_on(async {
                let (client, conn) = connect(&admin).await;
                client
                    .batch_execute(&format!("CREATE DATABASE {TEMPLATE}"))
                    .await
                    .expect("creating the template database");
                drop(client);
                let _ = conn.await;
                schema::migrate(&template, schema::Apps::WITH_CHAT)
                    .await
                    .expect("migrating the template");
            });
        })
        .join()
        .expect("preparing the template database");
        TestServer { pg }
    }

    /// A fresh database cloned from the migrated template.
    pub async fn fresh_db(&self) -> TestDb {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let (client, conn) = connect(&self.pg.url("postgres")).await;
        client
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {TEMPLATE}"))
            .await
            .expect("cloning the template database");
        drop(client);
        let _ = conn.await;
        TestDb {
            url: self.pg.url(&name),
            name,
        }
    }
}

impl TestDb {
    /// A fresh database on the binary's shared server.
    pub async fn new() -> TestDb {
        TestServer::shared().fresh_db().await
    }

    /// A client whose connection is driven in the background.
    pub async fn client(&self) -> Client {
        let (client, conn) = connect(&self.url).await;
        tokio::spawn(conn);
        client
    }
}

/// Connects, returning the connection future for the caller to drive.
pub async fn connect(
    url: &str,
) -> (
    Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    (client, tokio::spawn(conn))
}

/// A connection that LISTENs on a channel ([`testkit::listen::Notices`]),
/// whose failures panic.
pub struct Notices {
    inner: testkit::listen::Notices,
}

impl Notices {
    pub async fn listen(url: &str, channel: &str) -> Notices {
        let inner = testkit::listen::Notices::listen(url, channel)
            .await
            .unwrap_or_else(|e| panic!("LISTEN {channel} on {url}: {e}"));
        Notices { inner }
    }

    /// The next notice as JSON, or a panic after `secs` seconds.
    pub async fn next_json(&mut self, secs: u64) -> serde_json::Value {
        let notice = self
            .inner
            .next(std::time::Duration::from_secs(secs))
            .await
            .unwrap_or_else(|e| panic!("waiting for a notice: {e}"));
        serde_json::from_str(&notice.payload)
            .unwrap_or_else(|e| panic!("notice {:?} is not JSON: {e}", notice.payload))
    }

    /// The payload of a notice already received, if any.
    pub fn try_next(&mut self) -> Option<String> {
        self.inner.rx.try_recv().ok().map(|n| n.payload)
    }

    /// The payload of the next notice if one arrives within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<String> {
        tokio::time::timeout(wait, self.inner.rx.recv())
            .await
            .ok()
            .flatten()
            .map(|n| n.payload)
    }
}

// ---------------------------------------------------------------------
// The relay, in-process, and real WebSocket clients.

use pgrelay::auth::Authenticator;
use pgrelay::config::RelayConfig;
use pgrelay::server::RelayHandle;
use std::time::Duration;
use testkit::ws;

pub const SECRET: &[u8] = b"test-secret-of-enough-bytes";

/// Test timings: faster polling and probing than production, same logic.
pub fn relay_config(url: &str) -> RelayConfig {
    let mut c = RelayConfig::new(url, SECRET.to_vec());
    c.poll_interval = Duration::from_millis(100);
    c.resync_interval = Duration::from_secs(2);
    c.probe_interval = Duration::from_secs(2);
    c.shutdown_grace = Duration::from_secs(3);
    // No scheduled re-check: its first falls at a random point of the
    // first minute, and one that lands between a revocation's commit and
    // its delivery ends the subscription before the revoking event is sent,
    // which the tests of the membership-event path (events up to and
    // including the removal, then `forbidden`) must not race. The tests of
    // the schedule set it.
    c.reauthorize_interval = None;
    c
}

/// Starts a relay on 127.0.0.1:0 and waits until it LISTENs.
pub async fn start_relay(config: RelayConfig) -> RelayHandle {
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding 127.0.0.1:0");
    let mut relay = pgrelay::server::start(config, socket)
        .await
        .expect("starting the relay");
    tokio::time::timeout(Duration::from_secs(20), relay.wait_listening())
        .await
        .expect("the relay did not start listening");
    relay
}

pub fn token(user: &str) -> String {
    Authenticator::hs256(SECRET, Duration::ZERO)
        .issue(user, Duration::from_secs(3600))
        .expect("signing a token")
}

/// Creates a project and its members by raw SQL.
pub async fn seed_project(c: &Client, project: &str, members: &[&str]) {
    c.execute(
        "INSERT INTO chat.projects (id, name) VALUES ($1, $1)",
        &[&project],
    )
    .await
    .expect("creating a project");
    for m in members {
        c.execute(
            "INSERT INTO chat.project_members (project_id, user_id) VALUES ($1, $2)",
            &[&project, m],
        )
        .await
        .expect("adding a member");
    }
}

pub use testkit::ws::Ws;

/// A real WebSocket client of the relay ([`testkit::ws`]), whose failures
/// panic.
pub struct WsClient {
    pub ws: Ws,
}

impl WsClient {
    pub async fn connect(addr: std::net::SocketAddr, user: &str) -> WsClient {
        let ws = ws::connect(addr, &token(user))
            .await
            .expect("WebSocket connect");
        WsClient { ws }
    }

    pub async fn send_json(&mut self, v: serde_json::Value) {
        ws::send_json(&mut self.ws, &v)
            .await
            .expect("sending a frame");
    }

    /// The next text frame as JSON; `None` on timeout. Panics on close.
    pub async fn try_next_json(&mut self, timeout: Duration) -> Option<serde_json::Value> {
        ws::next_json(&mut self.ws, timeout)
            .await
            .unwrap_or_else(|e| panic!("reading a frame: {e}"))
    }

    pub async fn next_json(&mut self, secs: u64) -> serde_json::Value {
        self.try_next_json(Duration::from_secs(secs))
            .await
            .expect("timed out waiting for a frame")
    }

    /// Subscribes and returns the `subscribed` frame.
    pub async fn subscribe(&mut self, project: &str, since: Option<u64>) -> serde_json::Value {
        ws::subscribe(&mut self.ws, project, since, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("subscribing to {project}: {e}"))
    }

    /// Collects event seqs of `project` until `last` arrives (or panics
    /// after `secs`). Other frames are returned separately.
    pub async fn events_until(&mut self, project: &str, last: u64, secs: u64) -> Vec<u64> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let mut seqs = Vec::new();
        while seqs.last().copied().unwrap_or(0) < last {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(f) = self.try_next_json(left).await else {
                panic!(
                    "timed out: got {} events of {project}, last {:?}, wanted up to {last}",
                    seqs.len(),
                    seqs.last()
                );
            };
            if f["type"] == "cache_invalidate" && f["project_id"] == project {
                seqs.push(f["seq"].as_u64().expect("seq"));
            } else if f["type"] == "reset" {
                panic!("unexpected reset: {f}");
            }
        }
        seqs
    }

    /// The close frame's code, after reading whatever comes first.
    pub async fn close_code(&mut self, secs: u64) -> Option<u16> {
        self.try_close_code(Duration::from_secs(secs)).await
    }

    /// Like `close_code`, with `None` also when nothing comes in time.
    pub async fn try_close_code(&mut self, wait: Duration) -> Option<u16> {
        ws::close_code(&mut self.ws, wait).await
    }
}

/// Asserts `seqs` is exactly `from..=to`, once each, in order.
pub fn assert_contiguous(seqs: &[u64], from: u64, to: u64, who: &str) {
    let expected: Vec<u64> = (from..=to).collect();
    if seqs != expected.as_slice() {
        let dups = seqs.len() - {
            let mut s = seqs.to_vec();
            s.dedup();
            s.len()
        };
        panic!(
            "{who}: expected seq {from}..={to} ({} events), got {} events ({} duplicates), first {:?}, last {:?}",
            expected.len(),
            seqs.len(),
            dups,
            seqs.first(),
            seqs.last()
        );
    }
}

/// A subscription whose access ended (G4): `client` must receive every
/// event of `project` with seq `from..=to`, contiguous and once each (none
/// when `from > to`), then one `error` frame with `code` for `project`, and
/// then nothing at all for `quiet`. Any other frame (a reset, a pong, an
/// event after the error) fails. Call it once every event after `to` has
/// been committed and delivered to someone else, so that "nothing after"
/// covers each of them, not one probe. Returns the error frame.
pub async fn expect_events_then_ended(
    client: &mut WsClient,
    project: &str,
    (from, to): (u64, u64),
    code: &str,
    quiet: Duration,
    who: &str,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut seqs = Vec::new();
    let error = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(f) = client.try_next_json(left).await else {
            panic!("{who}: no `{code}` error within 30 s; events so far {seqs:?}");
        };
        match f["type"].as_str() {
            Some("cache_invalidate") if f["project_id"] == project => {
                seqs.push(f["seq"].as_u64().expect("an event's seq"));
            }
            Some("error") => break f,
            _ => panic!("{who}: unexpected frame before the error: {f}"),
        }
    };
    assert_eq!(error["code"], code, "{who}: {error}");
    assert_eq!(error["project_id"], project, "{who}: {error}");
    let expected: Vec<u64> = (from..=to).collect();
    assert_eq!(
        seqs, expected,
        "{who}: events before the `{code}` error must be exactly seq {from}..={to}"
    );
    if let Some(f) = client.try_next_json(quiet).await {
        panic!("{who}: a frame after the `{code}` error: {f}");
    }
    error
}

/// Resident memory of this process, in KiB (Linux); panics when it cannot
/// be read.
pub fn rss_kib() -> u64 {
    testkit::process::rss_kib(std::process::id())
        .unwrap_or_else(|e| panic!("resident memory of this test process: {e}"))
}

/// A plain HTTP/1.1 GET; returns the whole response as text.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    testkit::http::get(addr, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

pub use testkit::process::RelayProcess;

/// Terminates every relay's LISTEN connection to this database; returns how
/// many there were.
pub async fn terminate_listeners(c: &Client) -> i64 {
    c.query_one(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE application_name = 'pgrelay-listener' AND datname = current_database()",
        &[],
    )
    .await
    .expect("terminating the listeners")
    .get(0)
}

/// Starts the `pgrelay serve` binary as a separate process, so its memory
/// can be measured apart from the test's clients: on a free port against
/// `url` with extra flags, once `/healthz` says it LISTENs.
pub async fn spawn_relay_process(url: &str, extra: &[&str]) -> RelayProcess {
    let addr = testkit::process::free_addr().expect("a free port");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"));
    command
        .arg("serve")
        .arg("--listen")
        .arg(addr.to_string())
        .args(extra)
        .env("DATABASE_URL", url)
        .env(
            "PGRELAY_JWT_SECRET",
            std::str::from_utf8(SECRET).expect("utf-8"),
        )
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null());
    RelayProcess::spawn(&mut command, addr)
        .await
        .unwrap_or_else(|e| panic!("starting the pgrelay binary: {e}"))
}

/// One HTTP/1.1 request with `Connection: close`; returns the status and
/// the body parsed as JSON (`Null` if empty or not JSON).
pub async fn http_json(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    user: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let bearer = user.map(|u| format!("Bearer {}", token(u)));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("Authorization", b.as_str()))
        .collect();
    let response = testkit::http::request(addr, method, path, &headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = testkit::http::status(&response).unwrap_or_else(|e| panic!("{e}"));
    (
        status,
        serde_json::from_str(testkit::http::body(&response)).unwrap_or(serde_json::Value::Null),
    )
}

/// The value of one unlabelled series of the relay's `/metrics`, read over
/// HTTP as a scraper would; panics if the relay does not expose it.
pub async fn metric(addr: std::net::SocketAddr, name: &str) -> f64 {
    let response = http_get(addr, "/metrics").await;
    let body = testkit::http::body(&response);
    body.lines()
        .find_map(|line| {
            let (series, value) = line.split_once(' ')?;
            (series == name).then(|| {
                value
                    .trim()
                    .parse::<f64>()
                    .unwrap_or_else(|e| panic!("{name} = {value:?}: {e}"))
            })
        })
        .unwrap_or_else(|| panic!("/metrics has no {name}:\n{body}"))
}

/// `/healthz` as the relay answers it: the status code and the JSON body.
pub async fn healthz(addr: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let response = http_get(addr, "/healthz").await;
    let status = testkit::http::status(&response).unwrap_or_else(|e| panic!("{e}"));
    let body = serde_json::from_str(testkit::http::body(&response))
        .unwrap_or_else(|e| panic!("/healthz body is not JSON ({e}): {response}"));
    (status, body)
}

/// Waits until `/healthz` says the relay LISTENs again (200, `listening`
/// true), or panics after `bound`. Returns how long it took.
pub async fn wait_healthz_listening(addr: std::net::SocketAddr, bound: Duration) -> Duration {
    let t0 = tokio::time::Instant::now();
    loop {
        let (status, body) = healthz(addr).await;
        if status == 200 && body["listening"] == true {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < bound,
            "/healthz did not say listening within {bound:?}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `/healthz` says the relay does not LISTEN (503, `listening`
/// false), or panics after `bound`.
pub async fn wait_healthz_not_listening(addr: std::net::SocketAddr, bound: Duration) {
    let t0 = tokio::time::Instant::now();
    loop {
        let (status, body) = healthz(addr).await;
        if status == 503 && body["listening"] == false {
            return;
        }
        assert!(
            t0.elapsed() < bound,
            "/healthz still says listening after {bound:?}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `openssl` with `args` and returns its standard output; fails the
/// test with openssl's message (or what to install) when it cannot.
pub fn openssl(args: &[&str]) -> Vec<u8> {
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
}

/// Base64url without padding (RFC 7515's encoding of token parts).
pub fn base64url(bytes: &[u8]) -> String {
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

/// Settings of a primary a standby can stream from: durable enough for a
/// base backup (full-page writes and synchronous commit back at their
/// defaults) and `wal_keep_size` of WAL kept for the standby.
pub fn primary_options(wal_keep_size: &str) -> PgOptions {
    let mut options = PgOptions::for_tests();
    options
        .settings
        .retain(|(k, _)| k != "full_page_writes" && k != "synchronous_commit");
    options
        .settings
        .push(("wal_keep_size".into(), wal_keep_size.into()));
    options
}

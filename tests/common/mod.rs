//! The test harness: one private Postgres per test binary, a fresh database
//! per test cloned from a migrated template, so tests are independent and
//! need no server set up beforehand.
//!
//! Tests that inject faults (stopping or restarting Postgres) take a
//! [`TestServer::dedicated`] server of their own, so they never disturb the
//! tests sharing the binary's server.

#![allow(dead_code)] // each test binary uses a different part of this

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
        SHARED.get_or_init(TestServer::dedicated_blocking)
    }

    /// A server of the caller's own, for fault injection.
    pub async fn dedicated() -> TestServer {
        tokio::task::spawn_blocking(TestServer::dedicated_blocking)
            .await
            .expect("starting a dedicated test server")
    }

    /// Starts a server and migrates its template. Runs its own runtime on a
    /// plain thread so it can be called from inside a test's runtime.
    fn dedicated_blocking() -> TestServer {
        let pg = PgServer::start(PgOptions::for_tests()).expect("starting the test Postgres");
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

/// A connection that LISTENs on a channel and hands every notification's
/// payload to the test, in arrival order. The connection is driven with
/// `poll_message`, the only way tokio-postgres surfaces notifications.
pub struct Notices {
    pub rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    _client: Client,
}

impl Notices {
    pub async fn listen(url: &str, channel: &str) -> Notices {
        use futures_util::StreamExt;
        let (client, mut conn) = tokio_postgres::connect(url, NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notification(n) = message {
                    if tx.send(n.payload().to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .expect("LISTEN");
        Notices {
            rx,
            _client: client,
        }
    }

    /// The next notice as JSON, or a panic after `secs` seconds.
    pub async fn next_json(&mut self, secs: u64) -> serde_json::Value {
        let payload = tokio::time::timeout(std::time::Duration::from_secs(secs), self.rx.recv())
            .await
            .expect("timed out waiting for a notice")
            .expect("the LISTEN connection closed");
        serde_json::from_str(&payload)
            .unwrap_or_else(|e| panic!("notice {payload:?} is not JSON: {e}"))
    }
}

// ---------------------------------------------------------------------
// The relay, in-process, and real WebSocket clients.

use futures_util::{SinkExt, StreamExt};
use pgrelay::auth::Authenticator;
use pgrelay::config::RelayConfig;
use pgrelay::server::RelayHandle;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

pub const SECRET: &[u8] = b"test-secret-of-enough-bytes";

/// Test timings: faster polling and probing than production, same logic.
pub fn relay_config(url: &str) -> RelayConfig {
    let mut c = RelayConfig::new(url, SECRET.to_vec());
    c.poll_interval = Duration::from_millis(100);
    c.resync_interval = Duration::from_secs(2);
    c.probe_interval = Duration::from_secs(2);
    c.shutdown_grace = Duration::from_secs(3);
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

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A real WebSocket client of the relay.
pub struct WsClient {
    pub ws: Ws,
}

impl WsClient {
    pub async fn connect(addr: std::net::SocketAddr, user: &str) -> WsClient {
        let url = format!("ws://{addr}/ws?token={}", token(user));
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket connect");
        WsClient { ws }
    }

    pub async fn send_json(&mut self, v: serde_json::Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("sending a frame");
    }

    /// The next text frame as JSON; `None` on timeout. Panics on close.
    pub async fn try_next_json(&mut self, timeout: Duration) -> Option<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match msg {
                Some(Ok(Message::Text(t))) => {
                    return Some(serde_json::from_str(&t).expect("relay frames are JSON"))
                }
                Some(Ok(Message::Close(f))) => panic!("connection closed: {f:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("WebSocket error: {e}"),
                None => panic!("connection ended"),
            }
        }
    }

    pub async fn next_json(&mut self, secs: u64) -> serde_json::Value {
        self.try_next_json(Duration::from_secs(secs))
            .await
            .expect("timed out waiting for a frame")
    }

    /// Subscribes and returns the `subscribed` frame.
    pub async fn subscribe(&mut self, project: &str, since: Option<u64>) -> serde_json::Value {
        let mut req = serde_json::json!({"action": "subscribe", "project_id": project});
        if let Some(s) = since {
            req["since_seq"] = s.into();
        }
        self.send_json(req).await;
        let f = self.next_json(10).await;
        assert_eq!(f["type"], "subscribed", "expected subscribed, got {f}");
        f
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
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) | Ok(None) => return None,
            }
        }
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

/// Resident memory of this process, in KiB (Linux).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A plain HTTP/1.1 GET; returns the whole response as text.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// The relay binary as a separate process, so its memory can be measured
/// apart from the test's clients.
pub struct RelayProcess {
    pub child: std::process::Child,
    pub addr: std::net::SocketAddr,
}

impl RelayProcess {
    /// Starts `pgrelay serve` on a free port against `url` with extra
    /// flags, and waits until `/healthz` says it LISTENs.
    pub async fn start(url: &str, extra: &[&str]) -> RelayProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
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
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("starting the pgrelay binary");
        let relay = RelayProcess { child, addr };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok()
                && http_get(addr, "/healthz").await.starts_with("HTTP/1.1 200")
            {
                return relay;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the relay process did not become healthy");
    }

    /// Resident memory of the relay process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.child.wait().expect("waiting for the relay")
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    if let Some(u) = user {
        req.push_str(&format!("Authorization: Bearer {}\r\n", token(u)));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    if let Some(b) = body {
        // A server may answer (413) before reading it all.
        let _ = s.write_all(b.as_bytes()).await;
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

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

use pgrelay::embedded_pg::{PgOptions, PgServer};
use pgrelay::schema;
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
                schema::migrate(&template)
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

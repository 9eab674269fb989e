//! Clients of a pgrelay relay, from the outside, the way its users talk to
//! it. pgrelay's tests (`tests/common`) check the guarantees with them and
//! `pgrelay-bench` measures with them, so both exercise the same client
//! code against the real relay.
//!
//! - [`ws`]: a WebSocket client of the relay's protocol (`/ws`).
//! - [`listen`]: a direct LISTEN connection to Postgres, each notice
//!   stamped as it is read off the connection.
//! - [`http`]: one plain HTTP/1.1 request (`/healthz`, `/metrics`, `/v1`).
//! - [`process`]: a relay running as a child process, and what `/proc`
//!   says of a process's memory and CPU.
//!
//! Every call returns a [`Result`]: the benchmark reports what failed, the
//! tests turn it into a panic with context. Nothing here depends on the
//! `pgrelay` crate (callers issue their own tokens), so the `pgrelay`
//! package itself can depend on it for its benchmark binary.

pub mod http;
pub mod listen;
pub mod process;
pub mod ws;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_tungstenite::tungstenite;

/// What can go wrong talking to a relay or to Postgres.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Boxed: tungstenite's error is large, and every `Result` here would
    /// carry its size.
    #[error("WebSocket: {0}")]
    WebSocket(Box<tungstenite::Error>),
    #[error("Postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the relay closed the connection: {0:?}")]
    Closed(Option<tungstenite::protocol::CloseFrame>),
    #[error("the connection ended")]
    Ended,
    #[error("nothing came within {0:?}")]
    Timeout(Duration),
    #[error("expected a `subscribed` frame, got {0}")]
    NotSubscribed(serde_json::Value),
    #[error("no HTTP status line in {0:?}")]
    NoStatus(String),
    #[error("the relay process {0}")]
    Process(String),
    #[error("/proc/stat: {0}")]
    ProcStat(String),
}

impl From<tungstenite::Error> for Error {
    fn from(e: tungstenite::Error) -> Self {
        Error::WebSocket(Box::new(e))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Microseconds since the epoch: the one clock that writers stamp into
/// rows and readers compare against, across processes.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

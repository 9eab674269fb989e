//! Resumers that subscribe from seq 0 and never read (G7): the relay's
//! resident memory against how many there are, and after they leave. Each
//! crowd size runs against a fresh `pgrelay serve` process from a binary
//! given on the command line, so a build of another commit (say, main) is
//! measured with the same clients.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::SinkExt;
use serde_json::json;
use testkit::process::{free_addr, RelayProcess};
use tokio_tungstenite::tungstenite::Message;

use crate::env::Env;
use crate::relay::SECRET;
use crate::report::{machine, Outcome};

pub struct Options {
    /// Crowd sizes, each against a fresh relay process.
    pub counts: Vec<usize>,
    /// Events in the project's history.
    pub events: usize,
    /// Size of each event's message body, in bytes.
    pub row_bytes: usize,
    /// The `pgrelay` binary to measure.
    pub relay_bin: PathBuf,
    /// Least time the crowd stays connected while RSS is sampled.
    pub settle: Duration,
    /// Receive buffer of each stalled client's socket.
    pub client_rcvbuf: u32,
}

/// `pgrelay serve` from `bin` against `url`, with retention off and the
/// per-user cap out of the way, once `/healthz` is 200.
async fn serve(bin: &Path, url: &str) -> anyhow::Result<RelayProcess> {
    let addr = free_addr()?;
    let mut command = Command::new(bin);
    command
        .args(["serve", "--listen", &addr.to_string(), "--no-retention"])
        .args(["--max-connections-per-user", "100000"])
        .env("DATABASE_URL", url)
        .env("PGRELAY_JWT_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    RelayProcess::spawn(&mut command, addr)
        .await
        .with_context(|| format!("starting {}", bin.display()))
}

/// One value from a relay's `/metrics`, if it has it (builds before the
/// metric existed do not).
async fn metric(relay: &RelayProcess, name: &str) -> Option<f64> {
    let text = testkit::http::get(relay.addr, "/metrics").await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub async fn run(env: &Env, opts: &Options) -> anyhow::Result<Outcome> {
    let c = env.client().await?;
    // One member: the history is the messages (a membership event costs
    // each resumer a re-authorization).
    let user = "s0".to_string();
    env.seed_projects(1, std::slice::from_ref(&user)).await?;
    let t0 = Instant::now();
    let mut left = opts.events;
    while left > 0 {
        let n = left.min(2000);
        c.execute(
            "INSERT INTO chat.messages (project_id, sender_id, body)
             SELECT 'p1', 's0', repeat('x', $2::int) FROM generate_series(1, $1::int)",
            &[&(n as i32), &(opts.row_bytes as i32)],
        )
        .await?;
        left -= n;
    }
    eprintln!(
        "stalled: {} events of {} bytes written in {:.1} s",
        opts.events,
        opts.row_bytes,
        t0.elapsed().as_secs_f64()
    );
    let token = env.token(&user)?;
    let mut rows = Vec::new();
    for &count in &opts.counts {
        let relay = serve(&opts.relay_bin, &env.url).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_idle = relay.rss_kib();
        let mut crowd = Vec::with_capacity(count);
        for _ in 0..count {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.set_recv_buffer_size(opts.client_rcvbuf)?;
            let stream = socket.connect(relay.addr).await?;
            let url = format!("ws://{}/ws?token={token}", relay.addr);
            let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await?;
            ws.send(Message::Text(
                json!({"action": "subscribe", "project_id": "p1", "since_seq": 0})
                    .to_string()
                    .into(),
            ))
            .await?;
            crowd.push(ws);
        }
        // Sampled until RSS has not grown by 1% for 3 s (at least `settle`,
        // at most 120 s).
        let mut peak = relay.rss_kib();
        let started = Instant::now();
        let mut grew_at = Instant::now();
        while started.elapsed() < Duration::from_secs(120) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = relay.rss_kib();
            if now > peak + peak / 100 {
                grew_at = Instant::now();
            }
            peak = peak.max(now);
            if started.elapsed() >= opts.settle && grew_at.elapsed() >= Duration::from_secs(3) {
                break;
            }
        }
        let settled_after = started.elapsed();
        let with_crowd = relay.rss_kib();
        let waiting = metric(&relay, "pgrelay_sessions_waiting").await;
        drop(crowd);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = relay.rss_kib();
        relay.terminate()?;
        eprintln!(
            "stalled {count}: RSS idle {rss_idle} KiB, peak {peak} KiB, settled after {:.1} s at {with_crowd} KiB \
             ({waiting:?} sessions waiting on a full socket), 3 s after they left {after} KiB",
            settled_after.as_secs_f64()
        );
        rows.push(json!({
            "stalled": count, "rss_idle_kib": rss_idle, "rss_peak_kib": peak,
            "rss_with_crowd_kib": with_crowd, "rss_3s_after_kib": after,
            "settled_after_s": (settled_after.as_secs_f64() * 10.0).round() / 10.0,
            "sessions_waiting": waiting,
            "kib_per_stalled_settled": ((with_crowd.saturating_sub(rss_idle)) as f64 / count as f64).round(),
        }));
    }
    let mut markdown = format!(
        "### Stalled resumers: {} events of {} bytes, `{}`\n\n\
         | stalled | RSS idle MiB | RSS peak MiB | RSS settled MiB | KiB per stalled (settled) | RSS 3 s after they left MiB |\n\
         | --- | --- | --- | --- | --- | --- |\n",
        opts.events,
        opts.row_bytes,
        opts.relay_bin.display()
    );
    for r in &rows {
        let mib = |k: &str| r[k].as_u64().unwrap_or(0) as f64 / 1024.0;
        let _ = writeln!(
            markdown,
            "| {} | {:.1} | {:.1} | {:.1} | {} | {:.1} |",
            r["stalled"],
            mib("rss_idle_kib"),
            mib("rss_peak_kib"),
            mib("rss_with_crowd_kib"),
            r["kib_per_stalled_settled"],
            mib("rss_3s_after_kib")
        );
    }
    Ok(Outcome {
        name: "stalled".into(),
        json: json!({
            "scenario": "stalled", "events": opts.events, "row_bytes": opts.row_bytes,
            "relay_bin": opts.relay_bin.display().to_string(), "rows": rows, "machine": machine(),
        }),
        markdown,
        svg: None,
    })
}

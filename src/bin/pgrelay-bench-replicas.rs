//! pgrelay-bench-replicas: what log reads cost the primary, with and
//! without a hot standby to take them.
//!
//! Starts a private primary (and, with `--standby`, a streaming standby
//! made by `pg_basebackup -R`), several relay processes (this binary
//! re-executed in `relay` mode: `server::start` as `pgrelay serve` runs it,
//! reading from the standby when there is one), subscribers spread over the
//! relays, and writers inserting as fast as they can: the saturation
//! scenario with several relays. Over the measuring window it reports the
//! CPU time of the primary's processes (and the standby's) per delivered
//! event. Everything is on 127.0.0.1, bounded in count and time.
//!
//! Usage: pgrelay-bench-replicas [--standby] [--relays 3] [--subscribers 300]
//!        [--projects 10] [--writers 4] [--seconds 10]
//! `bench/replicas.sh` runs both configurations in alternation.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use pgrelay::auth::Authenticator;
use pgrelay::config::RelayConfig;
use pgrelay::db::embedded::{PgOptions, PgServer};
use pgrelay::server;
use serde_json::json;
use tokio_postgres::NoTls;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "pgrelay-bench-secret-0123456789";
const ROWS_PER_STATEMENT: i32 = 10;
const INSERT_MANY: &str = "INSERT INTO chat.messages (id, project_id, sender_id, body) \
     SELECT $1 || '-' || g, $2, 'w', $3 FROM generate_series(1, $4::int) g";

#[derive(Parser, Clone)]
struct Cli {
    /// Read the log from a streaming standby.
    #[arg(long)]
    standby: bool,
    #[arg(long, default_value_t = 3)]
    relays: usize,
    #[arg(long, default_value_t = 300)]
    subscribers: usize,
    #[arg(long, default_value_t = 10)]
    projects: usize,
    #[arg(long, default_value_t = 4)]
    writers: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Runs one relay (internal).
    #[arg(long, hide = true)]
    relay_of: Option<String>,
    #[arg(long, hide = true)]
    replica: Option<String>,
    #[arg(long, hide = true)]
    listen: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    if let (Some(url), Some(listen)) = (&cli.relay_of, &cli.listen) {
        return runtime.block_on(relay(url.clone(), cli.replica.clone(), listen.clone()));
    }
    runtime.block_on(run(cli))
}

/// One relay process, limits opened up for load.
async fn relay(url: String, replica: Option<String>, listen: String) -> anyhow::Result<()> {
    let mut config = RelayConfig::new(url, SECRET.as_bytes().to_vec());
    config.max_connections_per_user = 1_000_000;
    config.max_frames_per_second = 1_000_000;
    config.retention = None;
    config.pool_size = 8;
    config.replica_urls = replica.into_iter().collect();
    let socket = tokio::net::TcpListener::bind(&listen).await?;
    let relay = server::start(config, socket).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    term.recv().await;
    relay.shutdown().await;
    Ok(())
}

/// CPU seconds of a Postgres server: the postmaster, its live children,
/// and the children that have exited (the postmaster's cutime/cstime).
fn server_cpu_seconds(postmaster: u32) -> f64 {
    let fields = |pid: u32| -> Vec<f64> {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.to_string()))
            .map(|r| {
                r.split_whitespace()
                    .map(|v| v.parse::<f64>().unwrap_or(0.0))
                    .collect()
            })
            .unwrap_or_default()
    };
    let at = |f: &[f64], i: usize| f.get(i).copied().unwrap_or(0.0);
    let own = fields(postmaster);
    let mut ticks = at(&own, 11) + at(&own, 12) + at(&own, 13) + at(&own, 14);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let f = fields(pid);
            if at(&f, 1) as u32 == postmaster {
                ticks += at(&f, 11) + at(&f, 12);
            }
        }
    }
    ticks / 100.0
}

async fn healthy(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let _ = s
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.starts_with("HTTP/1.1 200")
}

async fn metric(addr: SocketAddr, name: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return 0.0;
    };
    let _ = s
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = |extra: &[(&str, &str)]| {
        [
            ("synchronous_commit", "off"),
            ("max_connections", "300"),
            ("shared_buffers", "256MB"),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<Vec<_>>()
    };
    let primary = tokio::task::spawn_blocking(move || {
        PgServer::start(PgOptions {
            data_dir: None,
            settings: settings(&[("wal_keep_size", "512MB")]),
        })
    })
    .await??;
    let (admin, conn) = tokio_postgres::connect(&primary.url("postgres"), NoTls).await?;
    tokio::spawn(conn);
    admin.batch_execute("CREATE DATABASE bench").await?;
    let url = primary.url("bench");
    pgrelay::db::schema::migrate(&url, pgrelay::db::schema::Apps::WITH_CHAT).await?;
    let (c, conn) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(conn);
    let users: Vec<String> = (0..cli.subscribers).map(|i| format!("u{i}")).collect();
    c.execute(
        "INSERT INTO chat.projects (id, name) SELECT 'p' || g, 'bench ' || g FROM generate_series(1, $1::int) g",
        &[&(cli.projects as i32)],
    )
    .await?;
    c.execute(
        "INSERT INTO chat.project_members (project_id, user_id)
         SELECT 'p' || g, u FROM generate_series(1, $1::int) g, unnest($2::text[]) u",
        &[&(cli.projects as i32), &users],
    )
    .await?;

    let standby = if cli.standby {
        let primary = &primary;
        let standby = tokio::task::block_in_place(|| {
            primary.start_standby(PgOptions {
                data_dir: None,
                settings: settings(&[]),
            })
        })?;
        Some(standby)
    } else {
        None
    };
    let replica_url = standby.as_ref().map(|s| s.url("bench"));

    let mut relays = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..cli.relays {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.args(["--relay-of", &url, "--listen", &addr.to_string()])
            .env("RUST_LOG", "warn");
        if let Some(r) = &replica_url {
            cmd.args(["--replica", r]);
        }
        relays.push(cmd.spawn().context("starting a relay")?);
        addrs.push(addr);
    }
    for addr in &addrs {
        let mut up = false;
        for _ in 0..200 {
            if healthy(*addr).await {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !up {
            bail!("a relay did not become healthy");
        }
    }

    let auth = Authenticator::hs256(SECRET.as_bytes(), Duration::ZERO);
    let delivered = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = CancellationToken::new();
    let subscribed = Arc::new(AtomicU64::new(0));
    let mut subs = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let addr = addrs[i % addrs.len()];
        let token = auth.issue(user, Duration::from_secs(3600))?;
        let project = format!("p{}", i % cli.projects + 1);
        let (delivered, measuring, stop, subscribed) = (
            delivered.clone(),
            measuring.clone(),
            stop.clone(),
            subscribed.clone(),
        );
        subs.push(tokio::spawn(async move {
            let (mut ws, _) =
                tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={token}")).await?;
            ws.send(Message::Text(
                json!({"action": "subscribe", "project_id": project})
                    .to_string()
                    .into(),
            ))
            .await?;
            let stopped = stop.cancelled();
            tokio::pin!(stopped);
            loop {
                let m = tokio::select! {
                    biased;
                    m = ws.next() => match m { Some(m) => m?, None => break },
                    _ = &mut stopped => break,
                };
                let Message::Text(text) = m else { continue };
                if text.contains("\"type\":\"subscribed\"") {
                    subscribed.fetch_add(1, Relaxed);
                } else if text.contains("\"type\":\"cache_invalidate\"") && measuring.load(Relaxed)
                {
                    delivered.fetch_add(1, Relaxed);
                }
            }
            anyhow::Ok(())
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while subscribed.load(Relaxed) < cli.subscribers as u64 {
        if Instant::now() > deadline {
            bail!("subscribers did not subscribe");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let written = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(cli.seconds + 2);
    let body = "y".repeat(150);
    let mut writers = Vec::new();
    for w in 0..cli.writers {
        let (client, conn) = tokio_postgres::connect(&url, NoTls).await?;
        tokio::spawn(conn);
        let (written, body, projects, writers_n) =
            (written.clone(), body.clone(), cli.projects, cli.writers);
        writers.push(tokio::spawn(async move {
            let stmt = client.prepare(INSERT_MANY).await?;
            let mut n = 0usize;
            while Instant::now() < end {
                let project = format!("p{}", (n * writers_n + w) % projects + 1);
                let id = format!("{w}-{n}");
                client
                    .execute(&stmt, &[&id, &project, &body, &ROWS_PER_STATEMENT])
                    .await?;
                n += 1;
                written.fetch_add(ROWS_PER_STATEMENT as u64, Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let primary_pid = primary.pid().context("the primary's pid")?;
    let standby_pid = standby.as_ref().and_then(|s| s.pid());
    let cpu0 = server_cpu_seconds(primary_pid);
    let scpu0 = standby_pid.map(server_cpu_seconds).unwrap_or(0.0);
    let written0 = written.load(Relaxed);
    measuring.store(true, Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(cli.seconds)).await;
    measuring.store(false, Relaxed);
    let window = t0.elapsed().as_secs_f64();
    let cpu = server_cpu_seconds(primary_pid) - cpu0;
    let scpu = standby_pid.map(server_cpu_seconds).unwrap_or(0.0) - scpu0;
    let events = (written.load(Relaxed) - written0) as f64;
    let deliveries = delivered.load(Relaxed) as f64;
    for w in writers {
        w.await??;
    }
    let mut replica_reads = 0.0;
    let mut fallbacks = 0.0;
    let mut log_reads = 0.0;
    for addr in &addrs {
        replica_reads += metric(*addr, "pgrelay_replica_reads_total").await;
        fallbacks += metric(*addr, "pgrelay_replica_fallbacks_total").await;
        log_reads += metric(*addr, "pgrelay_log_reads_total").await;
    }
    stop.cancel();
    for s in subs {
        let _ = s.await;
    }
    for r in &mut relays {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(r.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = r.wait();
    }
    let result = json!({
        "standby": cli.standby, "relays": cli.relays, "subscribers": cli.subscribers,
        "projects": cli.projects, "writers": cli.writers, "seconds": cli.seconds,
        "events_per_s": (events / window).round(),
        "deliveries_per_s": (deliveries / window).round(),
        "primary_cpu_cores": ((cpu / window) * 100.0).round() / 100.0,
        "standby_cpu_cores": ((scpu / window) * 100.0).round() / 100.0,
        "primary_cpu_us_per_delivery": ((cpu * 1e6 / deliveries.max(1.0)) * 100.0).round() / 100.0,
        "primary_cpu_us_per_event": ((cpu * 1e6 / events.max(1.0)) * 10.0).round() / 10.0,
        "log_reads": log_reads, "replica_reads": replica_reads, "replica_fallbacks": fallbacks,
    });
    println!("{}", serde_json::to_string(&result)?);
    drop(standby);
    drop(primary);
    Ok(())
}

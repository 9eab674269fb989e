//! pgrelay-bench: the numbers a realtime relay is judged by, measured
//! against a baseline taken in the same run.
//!
//! Each scenario starts a private Postgres and the relay as a separate
//! process (this binary re-executed in `relay` mode, running the same
//! `server::start` as `pgrelay serve`), so the relay's CPU and memory are
//! its own; the load generator runs here, on the same cores. Everything
//! talks over 127.0.0.1 and every loop is bounded in count and time.
//!
//! The writer puts its send time (microseconds since the epoch) at the
//! start of each row's id, which both the NOTIFY notice and the event frame
//! carry, so a direct LISTEN client (the floor no NOTIFY-based relay can
//! beat) and the relay's WebSocket clients measure the same interval.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use pgrelay::auth::Authenticator;
use pgrelay::config::RelayConfig;
use pgrelay::db::embedded::{PgOptions, PgServer};
use pgrelay::server;
use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "pgrelay-bench-secret-0123456789";

#[derive(Parser)]
#[command(
    name = "pgrelay-bench",
    about = "Benchmarks of pgrelay against a direct-LISTEN baseline"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Where results (JSON, Markdown, SVG) are written.
    #[arg(long, default_value = "bench/results", global = true)]
    out: PathBuf,
}

#[derive(Subcommand, Clone)]
enum Scenario {
    /// Commit-to-receive latency at a fixed write rate, relay vs direct LISTEN.
    Latency {
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        #[arg(long, default_value_t = 1)]
        projects: usize,
        /// Events per second, over all projects.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Writers as fast as they can: sustained deliveries per second.
    Saturation {
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        #[arg(long, default_value_t = 1)]
        projects: usize,
        #[arg(long, default_value_t = 4)]
        writers: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Idle subscribed WebSockets: resident memory per connection.
    Connections {
        #[arg(long, default_value_t = 10_000)]
        count: usize,
    },
    /// What capture costs writers: captured vs uncaptured inserts.
    WriteCost {
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Runs the relay for the other scenarios (internal).
    #[command(hide = true)]
    Relay {
        #[arg(long)]
        database_url: String,
        #[arg(long)]
        listen: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Scenario::Relay {
        database_url,
        listen,
    } = &cli.scenario
    {
        return run_relay_process(database_url, listen);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let env = Env::start().await?;
        let result = match cli.scenario.clone() {
            Scenario::Latency {
                subscribers,
                projects,
                rate,
                seconds,
            } => latency(&env, subscribers, projects, rate, seconds).await?,
            Scenario::Saturation {
                subscribers,
                projects,
                writers,
                seconds,
            } => saturation(&env, subscribers, projects, writers, seconds).await?,
            Scenario::Connections { count } => connections(&env, count).await?,
            Scenario::WriteCost { seconds } => write_cost(&env, seconds).await?,
            Scenario::Relay { .. } => unreachable!("handled above"),
        };
        write_results(&cli.out, &result)?;
        println!("{}", serde_json::to_string_pretty(&result.json)?);
        env.stop();
        Ok(())
    })
}

/// The relay process: `server::start` with limits opened up for load.
fn run_relay_process(database_url: &str, listen: &str) -> anyhow::Result<()> {
    // PGRELAY_BENCH_WORKERS=1 runs the relay on a single-threaded runtime,
    // to measure what cross-thread wake-ups cost.
    let workers: usize = std::env::var("PGRELAY_BENCH_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(0);
    let runtime = match workers {
        0 => tokio::runtime::Runtime::new()?,
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    runtime.block_on(async {
        let mut config = RelayConfig::new(database_url, SECRET.as_bytes().to_vec());
        config.max_connections_per_user = 1_000_000;
        config.max_frames_per_second = 1_000_000;
        config.retention = None;
        config.pool_size = 8;
        let socket = tokio::net::TcpListener::bind(listen).await?;
        let relay = server::start(config, socket).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        term.recv().await;
        relay.shutdown().await;
        Ok(())
    })
}

/// A private Postgres, a migrated database and a relay process.
struct Env {
    pg: PgServer,
    url: String,
    relay: std::process::Child,
    addr: SocketAddr,
    auth: Authenticator,
}

impl Env {
    async fn start() -> anyhow::Result<Env> {
        let mut options = PgOptions::for_tests();
        // Durable but not waiting for fsync per commit: this disk's fsync
        // otherwise caps every scenario near 450 commits/s.
        options.settings = vec![
            ("synchronous_commit".into(), "off".into()),
            ("max_connections".into(), "300".into()),
            ("shared_buffers".into(), "256MB".into()),
        ];
        let pg = tokio::task::spawn_blocking(move || PgServer::start(options)).await??;
        let (admin, conn) = tokio_postgres::connect(&pg.url("postgres"), NoTls).await?;
        tokio::spawn(conn);
        admin.batch_execute("CREATE DATABASE bench").await?;
        let url = pg.url("bench");
        pgrelay::db::schema::migrate(&url, pgrelay::db::schema::Apps::WITH_CHAT).await?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let relay = std::process::Command::new(std::env::current_exe()?)
            .args([
                "relay",
                "--database-url",
                &url,
                "--listen",
                &addr.to_string(),
            ])
            .env("RUST_LOG", "warn")
            .spawn()
            .context("starting the relay process")?;
        let env = Env {
            pg,
            url,
            relay,
            addr,
            auth: Authenticator::hs256(SECRET.as_bytes(), Duration::ZERO),
        };
        for _ in 0..200 {
            if healthz(addr).await {
                return Ok(env);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the relay did not become healthy")
    }

    async fn client(&self) -> anyhow::Result<Client> {
        self.client_named("pgrelay_bench").await
    }

    /// A client that pg_stat_activity shows under `application_name`.
    async fn client_named(&self, application_name: &str) -> anyhow::Result<Client> {
        let mut config: tokio_postgres::Config = self.url.parse()?;
        config.application_name(application_name);
        let (c, conn) = config.connect(NoTls).await?;
        tokio::spawn(conn);
        Ok(c)
    }

    fn relay_pid(&self) -> u32 {
        self.relay.id()
    }

    fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.relay.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.relay.wait();
        drop(self.pg);
    }
}

async fn healthz(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.starts_with("HTTP/1.1 200")
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    // utime and stime: the 14th and 15th fields of the whole line.
    let f = stat_fields(pid);
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (field(11) + field(12)) / 100.0
}

/// The fields of /proc/PID/stat after the command name.
fn stat_fields(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, r)| r.to_string()))
        .map(|r| r.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// CPU seconds used by Postgres: every live `postgres` process, plus what
/// the postmaster's exited children used (its cutime and cstime), so
/// backends that come and go are still counted.
fn postgres_cpu_seconds() -> f64 {
    let field =
        |f: &[String], i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let comm = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let mut ticks = 0.0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if comm(&pid.to_string()).trim() != "postgres" {
                continue;
            }
            let f = stat_fields(pid);
            ticks += field(&f, 11) + field(&f, 12);
            let parent = f.get(1).cloned().unwrap_or_default();
            if comm(&parent).trim() != "postgres" {
                ticks += field(&f, 13) + field(&f, 14);
            }
        }
    }
    ticks / 100.0
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn seed_projects(c: &Client, projects: usize, members: &[String]) -> anyhow::Result<()> {
    c.execute(
        "INSERT INTO chat.projects (id, name) SELECT 'p' || g, 'bench ' || g FROM generate_series(1, $1::int) g",
        &[&(projects as i32)],
    )
    .await?;
    c.execute(
        "INSERT INTO chat.project_members (project_id, user_id)
         SELECT 'p' || g, u FROM generate_series(1, $1::int) g, unnest($2::text[]) u",
        &[&(projects as i32), &members],
    )
    .await?;
    Ok(())
}

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    received: u64,
    duplicates: u64,
    out_of_order: u64,
    last_seq: u64,
}

/// The send time encoded at the start of an id (`<micros>-...`), found in
/// a frame or notice without a full JSON parse.
fn sent_us(frame: &str) -> Option<u64> {
    let start = frame.find("\"id\":\"")? + 6;
    let digits: &str = frame[start..].split('-').next()?;
    digits.parse().ok()
}

fn seq_of(frame: &str) -> Option<u64> {
    let start = frame.find("\"seq\":")? + 6;
    let end = frame[start..].find(|c: char| !c.is_ascii_digit())? + start;
    frame[start..end].parse().ok()
}

/// What the subscribers of one run share.
#[derive(Clone)]
struct Shared {
    hist: Arc<Mutex<Histogram<u64>>>,
    /// True during the measured window (after warm-up).
    measuring: Arc<AtomicBool>,
    /// Cancelled when the run is over and clients should finish.
    stop: CancellationToken,
    /// Deliveries counted during the window.
    delivered: Arc<AtomicU64>,
    /// Subscribers that have their `subscribed` frame: writes start only
    /// once all do, so none misses events by subscribing late.
    subscribed: Arc<AtomicU64>,
}

impl Shared {
    fn new() -> anyhow::Result<Self> {
        Ok(Shared {
            hist: Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
                1, 60_000_000, 3,
            )?)),
            measuring: Arc::new(AtomicBool::new(false)),
            stop: CancellationToken::new(),
            delivered: Arc::new(AtomicU64::new(0)),
            subscribed: Arc::new(AtomicU64::new(0)),
        })
    }

    async fn wait_subscribed(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.subscribed.load(Relaxed) < n as u64 {
            if Instant::now() > deadline {
                bail!(
                    "only {} of {n} subscribers subscribed",
                    self.subscribed.load(Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    fn histogram(&self) -> anyhow::Result<Histogram<u64>> {
        Ok(self
            .hist
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone())
    }
}

/// A subscribed WebSocket client recording latency and order.
async fn subscriber(
    addr: SocketAddr,
    token: String,
    project: String,
    shared: Shared,
) -> anyhow::Result<Seen> {
    let Shared {
        hist,
        measuring,
        stop,
        delivered,
        subscribed,
    } = shared;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={token}")).await?;
    ws.send(Message::Text(
        json!({"action": "subscribe", "project_id": project})
            .to_string()
            .into(),
    ))
    .await?;
    let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut seen = Seen::default();
    // Registered once, not per message: the client's own cost per
    // delivery runs on the same two cores as the relay and is measured
    // with it.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let msg = tokio::select! {
            biased;
            m = ws.next() => match m {
                None => break,
                Some(m) => m?,
            },
            _ = &mut stopped => break,
        };
        let Message::Text(text) = msg else { continue };
        if text.contains("\"type\":\"subscribed\"") {
            let v: Value = serde_json::from_str(&text)?;
            seen.last_seq = v["seq"].as_u64().unwrap_or(0);
            subscribed.fetch_add(1, Relaxed);
            continue;
        }
        let now = now_us();
        let Some(seq) = seq_of(&text) else { continue };
        if seq <= seen.last_seq {
            seen.duplicates += 1;
            continue;
        }
        if seq != seen.last_seq + 1 {
            seen.out_of_order += 1;
        }
        seen.last_seq = seq;
        seen.received += 1;
        if measuring.load(Relaxed) {
            delivered.fetch_add(1, Relaxed);
            if let Some(sent) = sent_us(&text) {
                let _ = local.record(now.saturating_sub(sent).max(1));
            }
        }
    }
    hist.lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .add(&local)?;
    Ok(seen)
}

/// The baseline: LISTEN straight on Postgres, same writes, same clock.
async fn baseline_listener(
    url: String,
    hist: Arc<Mutex<Histogram<u64>>>,
    measuring: Arc<AtomicBool>,
    stop: CancellationToken,
    ready: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<u64> {
    let (client, mut conn) = tokio_postgres::connect(&url, NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, String)>();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                if tx.send((now_us(), n.payload().to_string())).is_err() {
                    break;
                }
            }
        }
    });
    client.batch_execute("LISTEN cache_invalidate").await?;
    let _ = ready.send(());
    let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut count = 0;
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let next = tokio::select! {
            biased;
            n = rx.recv() => n,
            _ = &mut stopped => break,
        };
        match next {
            None => break,
            Some((at, payload)) => {
                if measuring.load(Relaxed) {
                    if let Some(sent) = sent_us(&payload) {
                        let _ = local.record(at.saturating_sub(sent).max(1));
                        count += 1;
                    }
                }
            }
        }
    }
    hist.lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .add(&local)?;
    Ok(count)
}

/// Inserts one message whose id starts with its send time.
async fn insert_one(
    c: &Client,
    stmt: &tokio_postgres::Statement,
    project: &str,
    writer: usize,
    n: u64,
    body: &str,
) -> anyhow::Result<()> {
    let id = format!("{}-{writer}-{n}", now_us());
    c.execute(stmt, &[&id, &project, &body]).await?;
    Ok(())
}

/// Saturation writes several rows per statement, so that the relay, not
/// the writers' commit rate, is what saturates.
const ROWS_PER_STATEMENT: i32 = 10;
const INSERT_MANY: &str = "INSERT INTO chat.messages (id, project_id, sender_id, body) \
     SELECT $1 || '-' || g, $2, 'w', $3 FROM generate_series(1, $4::int) g";
const INSERT: &str =
    "INSERT INTO chat.messages (id, project_id, sender_id, body) VALUES ($1, $2, 'w', $3)";

fn percentiles(h: &Histogram<u64>) -> Value {
    let ms = |q: f64| (h.value_at_quantile(q) as f64 / 1000.0 * 1000.0).round() / 1000.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "p999_ms": ms(0.999),
        "max_ms": (h.max() as f64 / 1000.0 * 1000.0).round() / 1000.0,
    })
}

struct Outcome {
    name: String,
    json: Value,
    markdown: String,
    svg: Option<String>,
}

async fn latency(
    env: &Env,
    subscribers: usize,
    projects: usize,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<Outcome> {
    let c = env.client().await?;
    let users: Vec<String> = (0..subscribers).map(|i| format!("u{i}")).collect();
    seed_projects(&c, projects, &users).await?;
    let shared = Shared::new()?;
    let base_hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let (measuring, stop, delivered) = (
        shared.measuring.clone(),
        shared.stop.clone(),
        shared.delivered.clone(),
    );
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let baseline = tokio::spawn(baseline_listener(
        env.url.clone(),
        base_hist.clone(),
        measuring.clone(),
        stop.clone(),
        ready_tx,
    ));
    ready_rx.await?;
    let mut subs = Vec::new();
    for (i, user) in users.iter().enumerate() {
        subs.push(tokio::spawn(subscriber(
            env.addr,
            env.auth.issue(user, Duration::from_secs(3600))?,
            format!("p{}", i % projects + 1),
            shared.clone(),
        )));
    }
    shared.wait_subscribed(subscribers).await?;

    // Writers at a fixed total rate: 4 connections, each paced.
    let writers = 4usize;
    let per_writer_interval = Duration::from_secs_f64(writers as f64 / rate as f64);
    let warmup = Duration::from_secs(2);
    let total = warmup + Duration::from_secs(seconds);
    let written = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let client = env.client().await?;
        let written = written.clone();
        let body = "x".repeat(150);
        tasks.push(tokio::spawn(async move {
            let stmt = client.prepare(INSERT).await?;
            let mut tick = tokio::time::interval(per_writer_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let end = Instant::now() + total;
            let mut n = 0u64;
            while Instant::now() < end {
                tick.tick().await;
                let project = format!("p{}", (n as usize * writers + w) % projects + 1);
                insert_one(&client, &stmt, &project, w, n, &body).await?;
                n += 1;
                written.fetch_add(1, Relaxed);
            }
            anyhow::Ok(n)
        }));
    }
    tokio::time::sleep(warmup).await;
    let cpu_relay0 = cpu_seconds(env.relay_pid());
    let cpu_pg0 = postgres_cpu_seconds();
    let written0 = written.load(Relaxed);
    measuring.store(true, Relaxed);
    let t0 = Instant::now();
    for t in tasks {
        t.await??;
    }
    measuring.store(false, Relaxed);
    let window = t0.elapsed().as_secs_f64();
    let written_window = written.load(Relaxed) - written0;
    let cpu_relay = (cpu_seconds(env.relay_pid()) - cpu_relay0) / window;
    let cpu_pg = (postgres_cpu_seconds() - cpu_pg0) / window;
    // Let the tail arrive, then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let mut totals = Seen::default();
    let total_written = written.load(Relaxed);
    let mut lost = 0u64;
    for s in subs {
        let seen = s.await??;
        totals.duplicates += seen.duplicates;
        totals.out_of_order += seen.out_of_order;
        totals.received += seen.received;
        // Each subscriber should have every event of its project.
        let _ = seen.last_seq;
    }
    let expected = total_written * (subscribers as u64) / (projects as u64);
    if totals.received < expected {
        lost = expected - totals.received;
    }
    baseline.await??;
    let relay_h = shared.histogram()?;
    let base_h = base_hist
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let deliveries_per_s = delivered.load(Relaxed) as f64 / window;
    let name = format!("latency-{subscribers}x{rate}");
    let p50_delta_ms =
        (relay_h.value_at_quantile(0.5) as f64 - base_h.value_at_quantile(0.5) as f64) / 1000.0;
    let result = json!({
        "scenario": "latency",
        "subscribers": subscribers, "projects": projects, "rate_events_per_s": rate, "seconds": seconds,
        "events_written": total_written, "events_in_window": written_window,
        "deliveries_per_s": deliveries_per_s.round(),
        "relay": percentiles(&relay_h),
        "baseline_listen": percentiles(&base_h),
        "p50_minus_baseline_ms": (p50_delta_ms * 1000.0).round() / 1000.0,
        "p50_ratio": ratio(relay_h.value_at_quantile(0.5), base_h.value_at_quantile(0.5)),
        "p99_ratio": ratio(relay_h.value_at_quantile(0.99), base_h.value_at_quantile(0.99)),
        "lost": lost, "duplicates": totals.duplicates, "out_of_order": totals.out_of_order,
        "relay_cpu_cores": (cpu_relay * 100.0).round() / 100.0,
        "postgres_cpu_cores": (cpu_pg * 100.0).round() / 100.0,
        "machine": machine(),
    });
    let markdown = format!(
        "### Latency: {subscribers} subscribers, {projects} project(s), {rate} events/s\n\n\
         | | p50 | p90 | p99 | p99.9 | max |\n| --- | --- | --- | --- | --- | --- |\n\
         | relay (WebSocket) | {} | {} | {} | {} | {} |\n| baseline (direct LISTEN) | {} | {} | {} | {} | {} |\n\n\
         Milliseconds from the writer's send to receipt. Deliveries/s {:.0}; lost {lost}, duplicated {}, out of order {}; \
         relay CPU {:.2} cores, Postgres CPU {:.2} cores.\n",
        ms_cell(&relay_h, 0.5), ms_cell(&relay_h, 0.9), ms_cell(&relay_h, 0.99), ms_cell(&relay_h, 0.999), ms_max(&relay_h),
        ms_cell(&base_h, 0.5), ms_cell(&base_h, 0.9), ms_cell(&base_h, 0.99), ms_cell(&base_h, 0.999), ms_max(&base_h),
        deliveries_per_s, totals.duplicates, totals.out_of_order, cpu_relay, cpu_pg,
    );
    let svg = latency_svg(&name, &[("relay", &relay_h), ("direct LISTEN", &base_h)]);
    Ok(Outcome {
        name,
        json: result,
        markdown,
        svg: Some(svg),
    })
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        return 0.0;
    }
    ((a as f64 / b as f64) * 100.0).round() / 100.0
}

fn ms_cell(h: &Histogram<u64>, q: f64) -> String {
    format!("{:.2}", h.value_at_quantile(q) as f64 / 1000.0)
}

fn ms_max(h: &Histogram<u64>) -> String {
    format!("{:.2}", h.max() as f64 / 1000.0)
}

async fn saturation(
    env: &Env,
    subscribers: usize,
    projects: usize,
    writers: usize,
    seconds: u64,
) -> anyhow::Result<Outcome> {
    let c = env.client().await?;
    let users: Vec<String> = (0..subscribers).map(|i| format!("u{i}")).collect();
    seed_projects(&c, projects, &users).await?;
    let shared = Shared::new()?;
    let (measuring, stop, delivered) = (
        shared.measuring.clone(),
        shared.stop.clone(),
        shared.delivered.clone(),
    );
    let mut subs = Vec::new();
    for (i, user) in users.iter().enumerate() {
        subs.push(tokio::spawn(subscriber(
            env.addr,
            env.auth.issue(user, Duration::from_secs(3600))?,
            format!("p{}", i % projects + 1),
            shared.clone(),
        )));
    }
    shared.wait_subscribed(subscribers).await?;
    let body = "y".repeat(150); // frames of about 300 bytes
    let written = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(seconds + 2);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let client = env.client().await?;
        let body = body.clone();
        let written = written.clone();
        tasks.push(tokio::spawn(async move {
            let stmt = client.prepare(INSERT_MANY).await?;
            let mut n = 0u64;
            while Instant::now() < end {
                let project = format!("p{}", (n as usize * writers + w) % projects + 1);
                let id = format!("{}-{w}-{n}", now_us());
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
    let (cpu_relay0, cpu_pg0) = (cpu_seconds(env.relay_pid()), postgres_cpu_seconds());
    let written0 = written.load(Relaxed);
    measuring.store(true, Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    measuring.store(false, Relaxed);
    let window = t0.elapsed().as_secs_f64();
    let deliveries = delivered.load(Relaxed) as f64 / window;
    let events = (written.load(Relaxed) - written0) as f64 / window;
    let cpu_relay = (cpu_seconds(env.relay_pid()) - cpu_relay0) / window;
    let cpu_pg = (postgres_cpu_seconds() - cpu_pg0) / window;
    for t in tasks {
        t.await??;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let (mut dups, mut ooo) = (0, 0);
    for s in subs {
        let seen = s.await??;
        dups += seen.duplicates;
        ooo += seen.out_of_order;
    }
    let h = shared.histogram()?;
    let name = format!("saturation-{subscribers}x{writers}w");
    let json = json!({
        "scenario": "saturation", "subscribers": subscribers, "projects": projects, "writers": writers,
        "seconds": seconds, "events_per_s": events.round(), "deliveries_per_s": deliveries.round(),
        "latency_under_saturation": percentiles(&h),
        "duplicates": dups, "out_of_order": ooo,
        "relay_cpu_cores": (cpu_relay * 100.0).round() / 100.0,
        "postgres_cpu_cores": (cpu_pg * 100.0).round() / 100.0,
        "machine": machine(),
    });
    let markdown = format!(
        "### Saturation: {subscribers} subscribers, {writers} writers as fast as they can ({ROWS_PER_STATEMENT} rows per statement)\n\n\
         {events:.0} events/s written, **{deliveries:.0} deliveries/s**; relay CPU {cpu_relay:.2} cores, \
         Postgres CPU {cpu_pg:.2} cores; p50 {} ms, p99 {} ms; duplicates {dups}, out of order {ooo}.\n",
        ms_cell(&h, 0.5),
        ms_cell(&h, 0.99)
    );
    Ok(Outcome {
        name,
        json,
        markdown,
        svg: None,
    })
}

async fn connections(env: &Env, count: usize) -> anyhow::Result<Outcome> {
    let c = env.client().await?;
    let users: Vec<String> = (0..100).map(|i| format!("u{i}")).collect();
    seed_projects(&c, 100, &users).await?;
    let tokens: Vec<String> = users
        .iter()
        .map(|u| env.auth.issue(u, Duration::from_secs(3600)))
        .collect::<Result<_, _>>()?;
    let rss_before = rss_kib(env.relay_pid());
    let t0 = Instant::now();
    let mut sockets = Vec::with_capacity(count);
    let mut i = 0;
    while i < count {
        let batch = (count - i).min(200);
        let futs = (i..i + batch).map(|k| {
            let url = format!("ws://{}/ws?token={}", env.addr, tokens[k % 100]);
            let project = format!("p{}", k % 100 + 1);
            async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
                ws.send(Message::Text(
                    json!({"action": "subscribe", "project_id": project})
                        .to_string()
                        .into(),
                ))
                .await?;
                // Wait for `subscribed`, so the subscription really exists.
                while let Some(m) = ws.next().await {
                    if let Message::Text(t) = m? {
                        if t.contains("subscribed") {
                            break;
                        }
                    }
                }
                anyhow::Ok(ws)
            }
        });
        for ws in futures_util::future::join_all(futs).await {
            sockets.push(ws?);
        }
        i += batch;
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(env.relay_pid());
    let per_conn = (rss_after.saturating_sub(rss_before)) as f64 / count as f64;
    drop(sockets);
    let name = format!("connections-{count}");
    let json = json!({
        "scenario": "connections", "connections": count,
        "relay_rss_kib_before": rss_before, "relay_rss_kib_after": rss_after,
        "kib_per_connection": (per_conn * 100.0).round() / 100.0,
        "connect_and_subscribe_per_s": (count as f64 / connect_secs).round(),
        "machine": machine(),
    });
    let markdown = format!(
        "### Connections: {count} idle subscribed WebSockets\n\n\
         Relay RSS {rss_before} KiB before, {rss_after} KiB after: **{per_conn:.1} KiB per connection**; \
         {:.0} connections (handshake + subscribe) per second.\n",
        count as f64 / connect_secs
    );
    Ok(Outcome {
        name,
        json,
        markdown,
        svg: None,
    })
}

async fn write_cost(env: &Env, seconds: u64) -> anyhow::Result<Outcome> {
    let c = env.client().await?;
    c.batch_execute(
        "CREATE SCHEMA bench;
         CREATE TABLE bench.captured (id bigserial PRIMARY KEY, project_id text NOT NULL, body text NOT NULL);
         CREATE TABLE bench.plain    (id bigserial PRIMARY KEY, project_id text NOT NULL, body text NOT NULL);
         -- The floor of any NOTIFY-based design: no event log, no counter,
         -- just one small notice per row, like the one capture sends.
         CREATE TABLE bench.notified (id bigserial PRIMARY KEY, project_id text NOT NULL, body text NOT NULL);
         CREATE FUNCTION bench.notify_row() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_notify('bench_floor', json_build_object('id', NEW.id, 'project_id', NEW.project_id)::text);
             RETURN NULL;
         END $$;
         CREATE TRIGGER notify_row AFTER INSERT ON bench.notified FOR EACH ROW EXECUTE FUNCTION bench.notify_row();
         SELECT relay.enable('bench.captured', 'row');",
    )
    .await?;
    let mut rows = BTreeMap::new();
    let mut states = BTreeMap::new();
    for writers in [1usize, 8] {
        for table in ["bench.plain", "bench.notified", "bench.captured"] {
            let end = Instant::now() + Duration::from_secs(seconds);
            let sampler = tokio::spawn(sample_waits(env.client().await?, end));
            let mut tasks = Vec::new();
            for w in 0..writers {
                let client = env.client_named(WRITER_APP).await?;
                let sql = format!("INSERT INTO {table} (project_id, body) VALUES ($1, $2)");
                tasks.push(tokio::spawn(async move {
                    let stmt = client.prepare(&sql).await?;
                    let body = "z".repeat(150);
                    let project = format!("p{}", w % 8 + 1);
                    let mut n = 0u64;
                    while Instant::now() < end {
                        client.execute(&stmt, &[&project, &body]).await?;
                        n += 1;
                    }
                    anyhow::Ok(n)
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await??;
            }
            rows.insert(format!("{table}/{writers}"), total as f64 / seconds as f64);
            states.insert(format!("{table}/{writers}"), sampler.await??);
        }
    }
    let notify_lock = |k: &str| {
        states
            .get(k)
            .and_then(|w: &BTreeMap<String, f64>| w.get(NOTIFY_LOCK_WAIT))
            .copied()
            .unwrap_or(0.0)
    };
    let get = |k: &str| rows.get(k).copied().unwrap_or(0.0);
    let r1 = get("bench.captured/1") / get("bench.plain/1").max(1.0);
    let r8 = get("bench.captured/8") / get("bench.plain/8").max(1.0);
    let n1 = get("bench.captured/1") / get("bench.notified/1").max(1.0);
    let n8 = get("bench.captured/8") / get("bench.notified/8").max(1.0);

    // A 10,000-row statement, timed until the last subscriber has the last
    // event.
    c.execute(
        "INSERT INTO chat.projects (id, name) VALUES ('bulk', 'bulk');
",
        &[],
    )
    .await
    .ok();
    let subscribers = 10;
    c.execute(
        "INSERT INTO chat.project_members (project_id, user_id) SELECT 'bulk', 'u' || g FROM generate_series(1, $1::int) g",
        &[&subscribers],
    )
    .await?;
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body) SELECT 'bulk', 'w', 'r' || g FROM generate_series(1, 10000) g",
        &[],
    )
    .await?;
    let mut clients = Vec::new();
    for u in 1..=subscribers {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!(
            "ws://{}/ws?token={}",
            env.addr,
            env.auth
                .issue(&format!("u{u}"), Duration::from_secs(3600))?
        ))
        .await?;
        ws.send(Message::Text(
            json!({"action": "subscribe", "project_id": "bulk"})
                .to_string()
                .into(),
        ))
        .await?;
        let mut latest = 0;
        while let Some(m) = ws.next().await {
            if let Message::Text(t) = m? {
                let v: Value = serde_json::from_str(&t)?;
                latest = v["seq"].as_u64().unwrap_or(0);
                break;
            }
        }
        clients.push((ws, latest));
    }
    let t0 = Instant::now();
    c.execute(
        "UPDATE chat.messages SET status = 'delivered' WHERE project_id = 'bulk'",
        &[],
    )
    .await?;
    let statement_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let waits = clients.into_iter().map(|(mut ws, latest)| async move {
        let target = latest + 10_000;
        while let Some(m) = ws.next().await {
            if let Message::Text(t) = m? {
                if seq_of(&t).is_some_and(|s| s >= target) {
                    break;
                }
            }
        }
        anyhow::Ok(())
    });
    for r in futures_util::future::join_all(waits).await {
        r?;
    }
    let all_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let name = "write-cost".to_string();
    let json = json!({
        "scenario": "write_cost", "seconds_per_run": seconds,
        "inserts_per_s": rows,
        "captured_over_plain_1_writer": (r1 * 1000.0).round() / 1000.0,
        "captured_over_plain_8_writers": (r8 * 1000.0).round() / 1000.0,
        "captured_over_notify_only_1_writer": (n1 * 1000.0).round() / 1000.0,
        "captured_over_notify_only_8_writers": (n8 * 1000.0).round() / 1000.0,
        "writer_time_by_state": states,
        "update_10000_rows_statement_ms": statement_ms.round(),
        "update_10000_rows_until_last_of_10_subscribers_ms": all_ms.round(),
        "machine": machine(),
    });
    let markdown = format!(
        "### Write cost (synchronous_commit = off)\n\n\
         | writers | uncaptured inserts/s | NOTIFY only | captured inserts/s | captured / uncaptured | captured / NOTIFY only |\n\
         | --- | --- | --- | --- | --- | --- |\n\
         | 1 | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |\n| 8 | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |\n\n\
         With 8 writers, the share of writer time spent waiting for NOTIFY's database-wide commit lock \
         (`Lock:object`, sampled from pg_stat_activity every 20 ms): {:.0}% with NOTIFY only, {:.0}% captured, \
         {:.0}% uncaptured.\n\n\
         One UPDATE of 10,000 rows: the statement took {statement_ms:.0} ms; the last of 10 subscribers had the \
         last of the 10,000 events after {all_ms:.0} ms.\n",
        get("bench.plain/1"),
        get("bench.notified/1"),
        get("bench.captured/1"),
        r1,
        n1,
        get("bench.plain/8"),
        get("bench.notified/8"),
        get("bench.captured/8"),
        r8,
        n8,
        notify_lock("bench.notified/8") * 100.0,
        notify_lock("bench.captured/8") * 100.0,
        notify_lock("bench.plain/8") * 100.0,
    );
    Ok(Outcome {
        name,
        json,
        markdown,
        svg: None,
    })
}

/// The application_name of write-cost writers, so the sampler sees only them.
const WRITER_APP: &str = "pgrelay_bench_writer";
/// What pg_stat_activity shows for a backend queued on NOTIFY's lock: at
/// commit, a transaction that notified takes a heavyweight lock on
/// database 0, so notifying commits run one at a time, cluster-wide.
const NOTIFY_LOCK_WAIT: &str = "Lock:object";

/// Samples what the writers' backends are doing every 20 ms until `end`:
/// the share of samples per state (`CPU` when active and not waiting,
/// `client` when idle between statements, else the wait event).
async fn sample_waits(c: Client, end: Instant) -> anyhow::Result<BTreeMap<String, f64>> {
    let stmt = c
        .prepare(
            "SELECT CASE WHEN state = 'idle' THEN 'client'
                         WHEN wait_event IS NULL THEN 'CPU'
                         ELSE wait_event_type || ':' || wait_event END
             FROM pg_stat_activity WHERE application_name = $1",
        )
        .await?;
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut total = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while Instant::now() < end {
        tick.tick().await;
        for row in c.query(&stmt, &[&WRITER_APP]).await? {
            *counts.entry(row.get(0)).or_default() += 1;
            total += 1;
        }
    }
    Ok(counts
        .into_iter()
        .map(|(k, n)| {
            (
                k,
                (n as f64 / total.max(1) as f64 * 1000.0).round() / 1000.0,
            )
        })
        .collect())
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "pgrelay": env!("CARGO_PKG_VERSION"),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
    })
}

/// A latency percentile plot (x: percentile on a log scale of 1/(1-q),
/// y: milliseconds), one line per series.
fn latency_svg(title: &str, series: &[(&str, &Histogram<u64>)]) -> String {
    let (w, h, left, bottom) = (720.0, 420.0, 60.0, 40.0);
    let quantiles = [0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999];
    let max_ms = series
        .iter()
        .map(|(_, hist)| hist.value_at_quantile(0.9999) as f64 / 1000.0)
        .fold(0.1_f64, f64::max)
        * 1.1;
    let x = |i: usize| left + (w - left - 20.0) * i as f64 / (quantiles.len() - 1) as f64;
    let y = |ms: f64| h - bottom - (h - bottom - 30.0) * (ms / max_ms);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="18" font-size="14">{title}: latency by percentile (ms)</text>
<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{left}" y1="30" x2="{left}" y2="{}" stroke="black"/>
"#,
        h - bottom,
        w - 20.0,
        h - bottom,
        h - bottom
    );
    for (i, q) in quantiles.iter().enumerate() {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">p{}</text>"#,
            x(i),
            h - bottom + 16.0,
            q * 100.0
        );
    }
    for k in 0..=4 {
        let ms = max_ms * k as f64 / 4.0;
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end">{ms:.2}</text><line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="#eee"/>"##,
            left - 6.0,
            y(ms) + 4.0,
            y(ms),
            w - 20.0,
            y(ms)
        );
    }
    let colors = ["#d62728", "#1f77b4", "#2ca02c"];
    for (s, (name, hist)) in series.iter().enumerate() {
        let points: Vec<String> = quantiles
            .iter()
            .enumerate()
            .map(|(i, q)| {
                format!(
                    "{:.1},{:.1}",
                    x(i),
                    y(hist.value_at_quantile(*q) as f64 / 1000.0)
                )
            })
            .collect();
        let color = colors[s % colors.len()];
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/><text x="{}" y="{}" fill="{color}">{name}</text>"#,
            points.join(" "),
            left + 10.0,
            45.0 + 16.0 * s as f64
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn write_results(dir: &Path, outcome: &Outcome) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join(format!("{}.json", outcome.name)),
        serde_json::to_string_pretty(&outcome.json)? + "\n",
    )?;
    std::fs::write(dir.join(format!("{}.md", outcome.name)), &outcome.markdown)?;
    if let Some(svg) = &outcome.svg {
        std::fs::write(dir.join(format!("{}.svg", outcome.name)), svg)?;
    }
    Ok(())
}

//! Commit-to-receive latency at a fixed write rate: the relay's WebSocket
//! subscribers against a direct LISTEN connection, the floor no NOTIFY-based
//! relay can beat, both timing the same writes with the same clock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;
use testkit::listen::{Notice, Notices};
use testkit::now_us;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::env::Env;
use crate::report::{latency_svg, machine, Outcome};
use crate::stats::{latency_histogram, ms_cell, ms_max, percentiles, ratio, round2};
use crate::subscriber::{self, sent_us};

const INSERT: &str =
    "INSERT INTO chat.messages (id, project_id, sender_id, body) VALUES ($1, $2, 'w', $3)";

pub async fn run(
    env: &Env,
    subscribers: usize,
    projects: usize,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<Outcome> {
    let (shared, subs) = subscriber::start(env, subscribers, projects).await?;
    let baseline = start_baseline(env, shared.measuring.clone(), shared.stop.clone()).await?;

    // Writers at a fixed total rate: 4 connections, each paced.
    let warmup = Duration::from_secs(2);
    let load = PacedWriters::start(
        env,
        4,
        rate,
        projects,
        warmup + Duration::from_secs(seconds),
    )
    .await?;
    let written = load.written.clone();
    tokio::time::sleep(warmup).await;
    let cpu = env.cpu_meter()?;
    let written0 = written.load(Relaxed);
    shared.measuring.store(true, Relaxed);
    let t0 = Instant::now();
    load.join().await?;
    shared.measuring.store(false, Relaxed);
    let window = t0.elapsed().as_secs_f64();
    let written_window = written.load(Relaxed) - written0;
    let cores = cpu.cores(window)?;
    let (cpu_relay, cpu_pg) = (cores.relay, cores.postgres);
    // Let the tail arrive, then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    shared.stop.cancel();
    let total_written = written.load(Relaxed);
    // Each subscriber should have every event of its project.
    let totals = subscriber::join_all(subs).await?;
    let expected = total_written * (subscribers as u64) / (projects as u64);
    let lost = expected.saturating_sub(totals.received);
    let base_h = baseline.await??;
    let relay_h = shared.histogram()?;
    let deliveries_per_s = shared.delivered.load(Relaxed) as f64 / window;
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
        "relay_cpu_cores": round2(cpu_relay),
        "postgres_cpu_cores": round2(cpu_pg),
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

/// Writers committing one event per statement at a fixed total rate,
/// spread over projects `p1`..`pN` in turn, each row's id starting with its
/// send time.
pub struct PacedWriters {
    /// Events committed so far.
    pub written: Arc<AtomicU64>,
    /// Events committed so far to each project (`p1` first): what each of
    /// its subscribers must receive.
    pub per_project: Arc<[AtomicU64]>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl PacedWriters {
    /// Starts `writers` connections committing `rate` events per second
    /// between them for `run_for`. A writer that falls behind its pace
    /// (a commit slower than its share of a second) sends its missed
    /// statements back to back: the rate reached is the caller's to check.
    pub async fn start(
        env: &Env,
        writers: usize,
        rate: u64,
        projects: usize,
        run_for: Duration,
    ) -> anyhow::Result<PacedWriters> {
        let interval = Duration::from_secs_f64(writers as f64 / rate.max(1) as f64);
        let written = Arc::new(AtomicU64::new(0));
        let per_project: Arc<[AtomicU64]> = (0..projects).map(|_| AtomicU64::new(0)).collect();
        let mut tasks = Vec::new();
        for w in 0..writers {
            let client = env.client().await?;
            let (written, per_project) = (written.clone(), per_project.clone());
            let body = "x".repeat(150);
            tasks.push(tokio::spawn(async move {
                let stmt = client.prepare(INSERT).await?;
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let end = Instant::now() + run_for;
                let mut n = 0u64;
                while Instant::now() < end {
                    tick.tick().await;
                    let p = (n as usize * writers + w) % projects;
                    insert_one(&client, &stmt, &format!("p{}", p + 1), w, n, &body).await?;
                    n += 1;
                    written.fetch_add(1, Relaxed);
                    per_project[p].fetch_add(1, Relaxed);
                }
                anyhow::Ok(())
            }));
        }
        Ok(PacedWriters {
            written,
            per_project,
            tasks,
        })
    }

    /// Waits for the writers to finish; the first one's error, if any.
    pub async fn join(self) -> anyhow::Result<()> {
        for t in self.tasks {
            t.await??;
        }
        Ok(())
    }
}

/// Starts the baseline: LISTEN straight on Postgres, same writes, same
/// clock. Its task ends with the latencies of the window once `stop` is
/// cancelled.
pub async fn start_baseline(
    env: &Env,
    measuring: Arc<AtomicBool>,
    stop: CancellationToken,
) -> anyhow::Result<JoinHandle<anyhow::Result<Histogram<u64>>>> {
    let notices = Notices::listen(&env.url, "cache_invalidate").await?;
    Ok(tokio::spawn(baseline_listener(notices, measuring, stop)))
}

/// Each notice was stamped as it came off the connection.
async fn baseline_listener(
    mut notices: Notices,
    measuring: Arc<AtomicBool>,
    stop: CancellationToken,
) -> anyhow::Result<Histogram<u64>> {
    let mut local = latency_histogram()?;
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let next = tokio::select! {
            biased;
            n = notices.rx.recv() => n,
            _ = &mut stopped => break,
        };
        match next {
            None => break,
            Some(Notice { at_us, payload }) => {
                if measuring.load(Relaxed) {
                    if let Some(sent) = sent_us(&payload) {
                        let _ = local.record(at_us.saturating_sub(sent).max(1));
                    }
                }
            }
        }
    }
    Ok(local)
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

//! Writers as fast as they can: the deliveries per second the relay
//! sustains, and its latency meanwhile. Run with 1 to 1,000 subscribers it
//! is the throughput sweep (`bench/results/throughput.svg`). Its writers
//! ([`Writers`]) are also the load of [`crate::replicas`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::now_us;
use tokio::task::JoinHandle;

use crate::env::Env;
use crate::report::{machine, Outcome};
use crate::stats::{ms_cell, percentiles, round2};
use crate::subscriber;

/// Several rows per statement, so that the relay, not the writers' commit
/// rate, is what saturates.
pub const ROWS_PER_STATEMENT: i32 = 10;
const INSERT_MANY: &str = "INSERT INTO chat.messages (id, project_id, sender_id, body) \
     SELECT $1 || '-' || g, $2, 'w', $3 FROM generate_series(1, $4::int) g";

pub async fn run(
    env: &Env,
    subscribers: usize,
    projects: usize,
    writers: usize,
    seconds: u64,
) -> anyhow::Result<Outcome> {
    let (shared, subs) = subscriber::start(env, subscribers, projects).await?;
    let load = Writers::start(env, writers, projects, Duration::from_secs(seconds + 2)).await?;
    let written = load.written.clone();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = env.cpu_meter()?;
    let written0 = written.load(Relaxed);
    shared.measuring.store(true, Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    shared.measuring.store(false, Relaxed);
    let window = t0.elapsed().as_secs_f64();
    let deliveries = shared.delivered.load(Relaxed) as f64 / window;
    let events = (written.load(Relaxed) - written0) as f64 / window;
    let cores = cpu.cores(window)?;
    let (cpu_relay, cpu_pg) = (cores.relay, cores.postgres);
    load.join().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    shared.stop.cancel();
    let totals = subscriber::join_all(subs).await?;
    let (dups, ooo) = (totals.duplicates, totals.out_of_order);
    let h = shared.histogram()?;
    let name = format!("saturation-{subscribers}x{writers}w");
    let json = json!({
        "scenario": "saturation", "subscribers": subscribers, "projects": projects, "writers": writers,
        "seconds": seconds, "events_per_s": events.round(), "deliveries_per_s": deliveries.round(),
        "latency_under_saturation": percentiles(&h),
        "duplicates": dups, "out_of_order": ooo,
        "relay_cpu_cores": round2(cpu_relay),
        "postgres_cpu_cores": round2(cpu_pg),
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

/// Writers inserting [`ROWS_PER_STATEMENT`]-row statements as fast as they
/// can, spread over projects `p1`..`pN` in turn, each row's id starting
/// with its send time.
pub struct Writers {
    /// Rows written so far.
    pub written: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Writers {
    /// Starts `writers` connections writing for `run_for`.
    pub async fn start(
        env: &Env,
        writers: usize,
        projects: usize,
        run_for: Duration,
    ) -> anyhow::Result<Writers> {
        let body = "y".repeat(150); // frames of about 300 bytes
        let written = Arc::new(AtomicU64::new(0));
        let end = Instant::now() + run_for;
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
        Ok(Writers { written, tasks })
    }

    /// Waits for the writers to finish; the first one's error, if any.
    pub async fn join(self) -> anyhow::Result<()> {
        for t in self.tasks {
            t.await??;
        }
        Ok(())
    }
}

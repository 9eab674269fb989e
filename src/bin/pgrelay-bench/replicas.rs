//! What log reads cost the primary, with and without a hot standby to
//! take them: the saturation scenario ([`crate::saturation::Writers`],
//! [`crate::subscriber`]) with several relays, the subscribers spread over
//! them. With `standby`, the [`Env`] has a streaming standby
//! (`pg_basebackup -R`) and every relay reads the log from it. Over the
//! measured window it reports the CPU time of the primary's processes
//! (and the standby's) per delivered and per written event.
//! `bench/replicas.sh` runs both configurations in alternation.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::env::Env;
use crate::relay::Limits;
use crate::report::{machine, Outcome};
use crate::saturation::{Writers, ROWS_PER_STATEMENT};
use crate::stats::{ms_cell, round2};
use crate::subscriber;

/// What the scenario is asked to do (its command-line options).
#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// Read the log from a streaming standby, which the bench starts.
    #[arg(long)]
    pub standby: bool,
    #[arg(long, default_value_t = 3)]
    pub relays: usize,
    #[arg(long, default_value_t = 300)]
    pub subscribers: usize,
    #[arg(long, default_value_t = 10)]
    pub projects: usize,
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
}

pub async fn run(env: &Env, opts: &Options) -> anyhow::Result<Outcome> {
    let mut others = Vec::new();
    for _ in 1..opts.relays.max(1) {
        others.push(env.spawn_relay(&Limits::default()).await?);
    }
    let addrs: Vec<SocketAddr> = std::iter::once(env.addr())
        .chain(others.iter().map(|r| r.addr))
        .collect();
    let (shared, subs) = subscriber::start_on(env, &addrs, opts.subscribers, opts.projects).await?;
    let load = Writers::start(
        env,
        opts.writers,
        opts.projects,
        Duration::from_secs(opts.seconds + 2),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let primary0 = env.primary_cpu_seconds()?;
    let standby0 = env.standby_cpu_seconds()?;
    let written0 = load.written.load(Relaxed);
    shared.measuring.store(true, Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(opts.seconds)).await;
    shared.measuring.store(false, Relaxed);
    let window = t0.elapsed().as_secs_f64();
    let primary_cpu = env.primary_cpu_seconds()? - primary0;
    let standby_cpu = env.standby_cpu_seconds()? - standby0;
    let events = (load.written.load(Relaxed) - written0) as f64;
    let deliveries = shared.delivered.load(Relaxed) as f64;
    let written = load.written.clone();
    load.join().await?;
    let (mut replica_reads, mut fallbacks, mut log_reads) = (0.0, 0.0, 0.0);
    for addr in &addrs {
        let text = testkit::http::get(*addr, "/metrics").await?;
        replica_reads += metric(&text, "pgrelay_replica_reads_total");
        fallbacks += metric(&text, "pgrelay_replica_fallbacks_total");
        log_reads += metric(&text, "pgrelay_log_reads_total");
    }
    // Let the tail arrive, then check every subscriber had every event.
    tokio::time::sleep(Duration::from_secs(3)).await;
    shared.stop.cancel();
    let totals = subscriber::join_all(subs).await?;
    let expected = written.load(Relaxed) * opts.subscribers as u64 / opts.projects as u64;
    let lost = expected.saturating_sub(totals.received);
    for relay in others {
        relay.terminate()?;
    }
    let h = shared.histogram()?;
    let per_delivery = primary_cpu * 1e6 / deliveries.max(1.0);
    let per_event = primary_cpu * 1e6 / events.max(1.0);
    let (events_s, deliveries_s) = (events / window, deliveries / window);
    let (primary_cores, standby_cores) = (primary_cpu / window, standby_cpu / window);
    let standby = if opts.standby { "standby" } else { "primary" };
    let json = json!({
        "scenario": "replicas",
        "standby": opts.standby, "relays": opts.relays, "subscribers": opts.subscribers,
        "projects": opts.projects, "writers": opts.writers, "seconds": opts.seconds,
        "events_per_s": events_s.round(),
        "deliveries_per_s": deliveries_s.round(),
        "primary_cpu_cores": round2(primary_cores),
        "standby_cpu_cores": round2(standby_cores),
        "primary_cpu_us_per_delivery": round2(per_delivery),
        "primary_cpu_us_per_event": (per_event * 10.0).round() / 10.0,
        "log_reads": log_reads, "replica_reads": replica_reads, "replica_fallbacks": fallbacks,
        "lost": lost, "duplicates": totals.duplicates, "out_of_order": totals.out_of_order,
        "machine": machine(),
    });
    let markdown = format!(
        "### Replicas: {} relays reading from the {standby}, {} subscribers over {} projects, {} writers ({ROWS_PER_STATEMENT} rows per statement)\n\n\
         {events_s:.0} events/s, {deliveries_s:.0} deliveries/s; primary {primary_cores:.2} cores \
         (**{per_delivery:.2} µs per delivery**, {per_event:.1} µs per event), standby {standby_cores:.2} cores; \
         log reads {log_reads:.0}, of which from the standby {replica_reads:.0}, fallbacks to the primary {fallbacks:.0}; \
         p50 {} ms, p99 {} ms; lost {lost}, duplicates {}, out of order {}.\n",
        opts.relays, opts.subscribers, opts.projects, opts.writers,
        ms_cell(&h, 0.5), ms_cell(&h, 0.99), totals.duplicates, totals.out_of_order,
    );
    Ok(Outcome {
        name: format!("replicas-{standby}"),
        json,
        markdown,
        svg: None,
    })
}

/// A counter's value in Prometheus text; 0 when it is absent.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

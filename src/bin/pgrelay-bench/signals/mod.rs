//! Broadcast and presence (G9) across two relays: the `signals` scenario.
//!
//! Relay 1 is the environment's relay, relay 2 another process of the same
//! build on the same database; both run with the per-connection frame rate
//! and the per-project signal rate raised (`--max-frames-per-second`,
//! `--project-signals-per-second`), so the figures are the relay's and the
//! database's, not the limits'. Each run measures, in this order:
//!
//! - [`broadcast::latency`]: senders on relay 1 at a fixed rate, 100 and
//!   then 1,000 subscribers split over both relays; the time from send to
//!   the last subscriber of each broadcast, and to each subscriber.
//! - [`broadcast::ceiling`]: captured inserts/s of one writer alone, with a
//!   broadcast load as fast as the relays take it, and alone again; the
//!   broadcasts/s of that load alone and meanwhile; and SQL
//!   `relay.broadcast` from backends, one NOTIFY commit each, as fast as
//!   they go.
//! - [`presence::latency`]: joins, updates and leaves on relay 1, the time
//!   until watchers on relay 2 see them.
//! - [`presence::memory`]: a fresh relay with 10,000 idle subscribed
//!   connections, then another with 10,000 that watch and join presence;
//!   the RSS each adds per connection.
//!
//! The report gives each figure of every run and their median.

mod broadcast;
mod presence;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Value};
use testkit::process::RelayProcess;

use crate::env::Env;
use crate::relay::Limits;
use crate::report::{machine, Outcome};

/// What the scenario is asked to do (its command-line options).
#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Subscriber counts of the latency part, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    pub subscribers: Vec<usize>,
    /// Broadcasts per second in the latency part.
    #[arg(long, default_value_t = 50)]
    pub rate: u64,
    /// Seconds each timed phase lasts.
    #[arg(long, default_value_t = 6)]
    pub seconds: u64,
    /// Closed-loop sender connections (relay 1) in the ceiling part.
    #[arg(long, default_value_t = 4)]
    pub senders: usize,
    /// Unacknowledged broadcasts each of them keeps outstanding.
    #[arg(long, default_value_t = 32)]
    pub in_flight: usize,
    /// Users who join, update and leave in the presence part.
    #[arg(long, default_value_t = 100)]
    pub presence_users: usize,
    /// Presence changes per second.
    #[arg(long, default_value_t = 20)]
    pub presence_rate: u64,
    /// Connections of the memory part.
    #[arg(long, default_value_t = 10_000)]
    pub present: usize,
    /// Projects they spread over.
    #[arg(long, default_value_t = 1_000)]
    pub present_projects: usize,
}

/// The limits both relays run with.
pub fn limits() -> Limits {
    Limits {
        max_frames_per_second: 1_000_000,
        project_signals_per_second: 1_000_000,
        ..Limits::default()
    }
}

/// One run's figures, by name.
pub type Figures = BTreeMap<String, f64>;

pub async fn run(env: &Env, opts: &Options) -> anyhow::Result<Outcome> {
    let relay2 = env.spawn_relay(&limits()).await?;
    let mut runs: Vec<Figures> = Vec::new();
    let mut details: Vec<Value> = Vec::new();
    for run in 0..opts.runs {
        eprintln!("signals: run {} of {}", run + 1, opts.runs);
        let (figures, detail) = one_run(env, &relay2, opts, run).await?;
        runs.push(figures);
        details.push(detail);
    }
    relay2.terminate()?;
    let medians = medians(&runs);
    let json = json!({
        "scenario": "signals",
        "runs": opts.runs,
        "options": {
            "subscribers": opts.subscribers, "rate_broadcasts_per_s": opts.rate,
            "seconds": opts.seconds, "senders": opts.senders, "in_flight": opts.in_flight,
            "presence_users": opts.presence_users, "presence_changes_per_s": opts.presence_rate,
            "present_connections": opts.present, "present_projects": opts.present_projects,
        },
        "median": medians,
        "figures_by_run": runs,
        "details_by_run": details,
        "machine": machine(),
    });
    let markdown = markdown(opts, &runs, &medians);
    Ok(Outcome {
        name: "signals".into(),
        json,
        markdown,
        svg: None,
    })
}

async fn one_run(
    env: &Env,
    relay2: &RelayProcess,
    opts: &Options,
    run: usize,
) -> anyhow::Result<(Figures, Value)> {
    let mut figures = Figures::new();
    let mut detail = serde_json::Map::new();
    for &n in &opts.subscribers {
        let project = format!("bl{run}x{n}");
        let (f, d) = broadcast::latency(env, relay2, &project, n, opts.rate, opts.seconds).await?;
        merge(&mut figures, &format!("broadcast_{n}"), f);
        detail.insert(format!("broadcast_latency_{n}"), d);
    }
    let (f, d) = broadcast::ceiling(env, relay2, &format!("bc{run}"), opts).await?;
    merge(&mut figures, "ceiling", f);
    detail.insert("broadcast_ceiling".into(), d);
    let (f, d) = presence::latency(env, relay2, &format!("pl{run}"), opts).await?;
    merge(&mut figures, "presence", f);
    detail.insert("presence_latency".into(), d);
    let (f, d) = presence::memory(env, &format!("pm{run}"), opts).await?;
    merge(&mut figures, "memory", f);
    detail.insert("presence_memory".into(), d);
    Ok((figures, Value::Object(detail)))
}

fn merge(into: &mut Figures, prefix: &str, figures: Figures) {
    for (k, v) in figures {
        into.insert(format!("{prefix}.{k}"), v);
    }
}

/// The median of each figure over the runs that have it.
fn medians(runs: &[Figures]) -> Figures {
    let mut all: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for r in runs {
        for (k, v) in r {
            all.entry(k).or_default().push(*v);
        }
    }
    all.into_iter()
        .map(|(k, mut v)| {
            v.sort_by(f64::total_cmp);
            let m = if v.len() % 2 == 1 {
                v[v.len() / 2]
            } else {
                (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
            };
            (k.to_string(), round3(m))
        })
        .collect()
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn markdown(opts: &Options, runs: &[Figures], medians: &Figures) -> String {
    let mut md = format!(
        "### Signals (G9): broadcast and presence across two relays, {} runs\n\n\
         | figure | median | runs |\n| --- | --- | --- |\n",
        opts.runs
    );
    for (k, m) in medians {
        let each: Vec<String> = runs
            .iter()
            .map(|r| r.get(k).map_or("-".into(), |v| format!("{}", round3(*v))))
            .collect();
        let _ = writeln!(md, "| {k} | {m} | {} |", each.join(", "));
    }
    md
}

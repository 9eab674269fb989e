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
//!
//! # Layout
//!
//! - One file per scenario: [`latency`], [`saturation`], [`connections`],
//!   [`crowded`] (a crowded project and a spread load), [`write_cost`],
//!   [`stalled`], [`signals`] (broadcast and presence, G9), [`replicas`]
//!   (log reads from a hot standby); each returns a [`report::Outcome`].
//! - What they share: [`env`] (the private Postgres, the relay process,
//!   database clients, the CPU meter), [`subscriber`] (a WebSocket subscriber
//!   that records latency and order), [`lightws`] (the lightest client
//!   that holds or reads a subscription, for crowds), [`loopback`] (source
//!   addresses and open files for crowds), [`stats`] (histograms and
//!   percentiles), [`report`] (JSON, Markdown and SVG results).
//! - [`relay`]: the relay process itself (the hidden `relay` mode).
//! - The clients (WebSocket, LISTEN, HTTP, the child process, `/proc`) are
//!   the `testkit` crate's, the same the tests use.

mod connections;
mod crowded;
mod env;
mod latency;
mod lightws;
mod loopback;
mod relay;
mod replicas;
mod report;
mod saturation;
mod signals;
mod stalled;
mod stats;
mod subscriber;
mod write_cost;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// The same allocator and settings as `pgrelay` (see `src/main.rs`), so
/// the relay this binary runs is measured as deployed.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

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
    /// Idle subscribed WebSockets: resident memory per connection, the
    /// opening rate, and a new subscriber's first-event latency while
    /// they are all connected.
    Connections {
        #[command(flatten)]
        opts: connections::Options,
    },
    /// Many light subscribers while paced writers commit a fixed rate: a
    /// crowded project (`--projects 1`) or a spread load; latency against
    /// direct LISTEN, losses, relay CPU per delivery.
    Crowded {
        #[command(flatten)]
        opts: crowded::Options,
    },
    /// Resumers that subscribe from seq 0 and never read: the relay's
    /// RSS against their number, and after they leave (G7). Each crowd
    /// size runs against a fresh `pgrelay serve` process.
    Stalled {
        /// Crowd sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "50,100,200,300")]
        counts: Vec<usize>,
        /// Events in the project's history.
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        /// Size of each event's message body, in bytes.
        #[arg(long, default_value_t = 8000)]
        row_bytes: usize,
        /// The `pgrelay` binary to measure, e.g. a build of another
        /// commit; default: the one beside this binary.
        #[arg(long)]
        relay_bin: Option<PathBuf>,
        /// Seconds the crowd stays connected at least while RSS is
        /// sampled; then until RSS has not grown for 3 s (at most 120 s).
        #[arg(long, default_value_t = 5)]
        settle_seconds: u64,
        /// Receive buffer of each stalled client's socket (spares this
        /// shared machine's kernel memory; the relay's side is untouched).
        #[arg(long, default_value_t = 65_536)]
        client_rcvbuf: u32,
    },
    /// Primary CPU per delivered event with several relays, with or
    /// without a hot standby taking their log reads.
    Replicas {
        #[command(flatten)]
        opts: replicas::Options,
    },
    /// What capture costs writers: captured vs uncaptured inserts.
    WriteCost {
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Broadcast and presence across two relays (G9): latency, the
    /// broadcast rate the database takes and what it costs a writer,
    /// presence latency and memory; every figure per run and its median.
    Signals {
        #[command(flatten)]
        opts: signals::Options,
    },
    /// Runs the relay for the other scenarios (internal).
    #[command(hide = true)]
    Relay {
        #[arg(long)]
        database_url: String,
        /// A hot standby to read the log from.
        #[arg(long)]
        replica_url: Option<String>,
        #[arg(long)]
        listen: String,
        #[command(flatten)]
        limits: relay::Limits,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    raise_open_files_limit();
    if let Scenario::Relay {
        database_url,
        replica_url,
        listen,
        limits,
    } = &cli.scenario
    {
        return relay::run(database_url, replica_url.as_deref(), listen, limits);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let env = match cli.scenario {
            Scenario::Signals { .. } => env::Env::start_with(&signals::limits()).await?,
            Scenario::Replicas {
                opts: replicas::Options { standby: true, .. },
            } => env::Env::start_with_standby(&relay::Limits::default()).await?,
            _ => env::Env::start().await?,
        };
        let result = match cli.scenario.clone() {
            Scenario::Latency {
                subscribers,
                projects,
                rate,
                seconds,
            } => latency::run(&env, subscribers, projects, rate, seconds).await?,
            Scenario::Saturation {
                subscribers,
                projects,
                writers,
                seconds,
            } => saturation::run(&env, subscribers, projects, writers, seconds).await?,
            Scenario::Connections { opts } => connections::run(&env, &opts).await?,
            Scenario::Replicas { opts } => replicas::run(&env, &opts).await?,
            Scenario::WriteCost { seconds } => write_cost::run(&env, seconds).await?,
            Scenario::Stalled {
                counts,
                events,
                row_bytes,
                relay_bin,
                settle_seconds,
                client_rcvbuf,
            } => {
                let relay_bin = match relay_bin {
                    Some(bin) => bin,
                    None => std::env::current_exe()?
                        .parent()
                        .context("the bench binary's directory")?
                        .join("pgrelay"),
                };
                let opts = stalled::Options {
                    counts,
                    events,
                    row_bytes,
                    relay_bin,
                    settle: std::time::Duration::from_secs(settle_seconds),
                    client_rcvbuf,
                };
                stalled::run(&env, &opts).await?
            }
            Scenario::Signals { opts } => signals::run(&env, &opts).await?,
            Scenario::Crowded { opts } => crowded::run(&env, &opts).await?,
            Scenario::Relay { .. } => unreachable!("handled above"),
        };
        report::write(&cli.out, &result)?;
        println!("{}", serde_json::to_string_pretty(&result.json)?);
        env.stop()?;
        // A result that is not a valid measurement is written, then fails
        // the run with its own exit status, which scripts tell from a
        // crash.
        if let Some(why) = result.json.get("failed").and_then(|v| v.as_str()) {
            eprintln!("{}: not a valid measurement: {why}", result.name);
            std::process::exit(INVALID_RUN);
        }
        Ok(())
    })
}

/// The exit status of a run whose result is written but flagged `failed`
/// (see [`report::Outcome`]); errors exit with 1.
const INVALID_RUN: i32 = 2;

/// Every client and relay connection is a file descriptor, on both ends
/// of the loopback: 100,000 connections cost the bench and the relay (its
/// child, which inherits the limit) 100,000 each. Raises the soft and hard
/// RLIMIT_NOFILE to the kernel's `fs.nr_open` where allowed (as root, or
/// with CAP_SYS_RESOURCE), else the soft limit to the hard one as `pgrelay
/// serve` does.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    if nr_open > hard && setrlimit(Resource::RLIMIT_NOFILE, nr_open, nr_open).is_ok() {
        return;
    }
    if soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

//! A crowded project and a spread load (issue 20, target 2): many
//! subscribers while paced writers commit a fixed rate, every delivery
//! timed from the writer's send to the frame, every subscriber's seq order
//! checked, and the relay's CPU per delivery.
//!
//! Run as `crowded --subscribers 1000 --projects 1` it is the crowded
//! project (a thousand subscribers of one project, a million deliveries a
//! second at 1,000 events/s); as `--subscribers 19000 --projects 1000` the
//! spread load.
//!
//! The load generator must not decide the result, so the subscribers are
//! [`lightws`] connections read on `reader_threads` threads of their own,
//! each a single-threaded runtime whose connections share one read buffer
//! ([`Conn::receive`]) and one latency histogram: a delivery costs the
//! bench a slice of one read and a scan for `seq` and the send time, and
//! the writers and the direct LISTEN baseline run on the main runtime,
//! which the readers cannot crowd out. The writers' rate in the measured
//! window is checked: below 95% of the rate asked, the result is written
//! with `failed` set and the run exits non-zero.
//!
//! Lost events are counted exactly: each subscriber must receive every
//! event committed to its project after its `subscribed` frame (writes
//! start once all are subscribed), and once the writers stop the run waits
//! until every subscriber has them all, or for [`DRAIN_WAIT`].

use std::cell::{Cell, RefCell};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::env::Env;
use crate::latency::{start_baseline, PacedWriters};
use crate::lightws::Conn;
use crate::loopback;
use crate::report::{latency_svg, machine, Outcome};
use crate::stats::{latency_histogram, ms_cell, ms_max, percentiles, ratio, round2};
use crate::subscriber::{sent_us, seq_of, Seen, SUBSCRIBE_WAIT};

/// What the scenario is asked to do (its command-line options).
#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// Subscribers, subscriber k to project p{k % projects + 1}.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    #[arg(long, default_value_t = 1)]
    pub projects: usize,
    /// Events committed per second over all projects, one per transaction.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Seconds measured, after 2 s of warm-up.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Paced writer connections sharing the rate.
    #[arg(long, default_value_t = 8)]
    pub writers: usize,
    /// Threads the subscribers are read on.
    #[arg(long, default_value_t = 1)]
    pub reader_threads: usize,
    /// Clients per 127.0.0.x source address (loopback has ~28,000
    /// ephemeral ports per address).
    #[arg(long, default_value_t = 5000)]
    pub per_source: usize,
    /// Connections being opened at once, over all reader threads.
    #[arg(long, default_value_t = 256)]
    pub in_flight: usize,
}

/// Users the subscribers are, in turn; each is a member of every project.
const USERS: usize = 100;

const WARMUP: Duration = Duration::from_secs(2);

/// How long the writers go on after the measured window, so that it is
/// loaded to its end; what they write then is still checked for loss.
const TAIL: Duration = Duration::from_secs(1);

/// How long the run waits, after the writers stop, for every subscriber
/// to have every event of its project.
const DRAIN_WAIT: Duration = Duration::from_secs(30);

/// Below this share of the rate asked, the writers did not load the relay
/// as the run claims.
const MIN_RATE_SHARE: f64 = 0.95;

/// How every event frame begins (`relay.render`).
const EVENT_PREFIX: &str = r#"{"type":"cache_invalidate","#;

pub async fn run(env: &Env, opts: &Options) -> anyhow::Result<Outcome> {
    let n = opts.subscribers;
    let projects = opts.projects.max(1);
    loopback::check_open_files(env, n)?;
    let sources = loopback::sources(n, opts.per_source)?;
    let users: Vec<String> = (0..USERS.min(n).max(1)).map(|i| format!("u{i}")).collect();
    env.seed_projects(projects, &users).await?;
    let tokens = env.tokens(&users)?;

    let shared = Arc::new(Shared {
        stop: CancellationToken::new(),
        measuring: Arc::new(AtomicBool::new(false)),
        failure: Mutex::new(None),
    });
    let threads = opts.reader_threads.max(1);
    let t_open = Instant::now();
    let mut readers = Vec::with_capacity(threads);
    for t in 0..threads {
        let clients = (t..n).step_by(threads).map(|k| Client {
            k,
            source: loopback::source(k, opts.per_source),
            project: k % projects,
        });
        readers.push(Reader::spawn(
            t,
            clients.collect(),
            tokens.clone(),
            env.addr(),
            opts.in_flight.div_ceil(threads).max(1),
            shared.clone(),
        )?);
    }
    let opened = wait_subscribed(&readers, &shared, n).await;
    if let Err(e) = opened {
        shared.stop.cancel();
        for r in readers {
            let _ = r.join().await;
        }
        return Err(e);
    }
    let open_secs = t_open.elapsed().as_secs_f64();

    let baseline = start_baseline(env, shared.measuring.clone(), shared.stop.clone()).await?;
    let load = PacedWriters::start(
        env,
        opts.writers,
        opts.rate,
        projects,
        WARMUP + Duration::from_secs(opts.seconds) + TAIL,
    )
    .await?;
    let (written, per_project) = (load.written.clone(), load.per_project.clone());
    tokio::time::sleep(WARMUP).await;
    let cpu = env.cpu_meter()?;
    let written0 = written.load(Relaxed);
    shared.measuring.store(true, Relaxed);
    let unread = tokio::task::spawn_blocking({
        let (measuring, port) = (shared.measuring.clone(), env.addr().port());
        move || sample_unread(&measuring, port, unread_every(n))
    });
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(opts.seconds)).await;
    shared.measuring.store(false, Relaxed);
    let written_window = written.load(Relaxed) - written0;
    let window = t0.elapsed().as_secs_f64();
    let cores = cpu.cores(window)?;
    let relay_rss = env.relay.rss_kib();
    let bench_rss = testkit::process::rss_kib(std::process::id())?;
    let unread = unread.await??;
    load.join().await?;

    // Every subscriber must have every event of its project.
    let committed: Vec<u64> = per_project.iter().map(|c| c.load(Relaxed)).collect();
    let expected: u64 = (0..n).map(|k| committed[k % projects]).sum();
    let t_drain = Instant::now();
    while received(&readers) < expected && t_drain.elapsed() < DRAIN_WAIT {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_secs = t_drain.elapsed().as_secs_f64();
    shared.stop.cancel();
    let mut relay_h = latency_histogram()?;
    let mut seen = Vec::with_capacity(n);
    let (mut in_window, mut bytes_in_window) = (0, 0);
    let (mut other_frames, mut first_other) = (0, None);
    for r in readers {
        let got = r.join().await?;
        relay_h.add(&got.hist)?;
        seen.extend(got.subscribers);
        in_window += got.in_window;
        bytes_in_window += got.bytes_in_window;
        other_frames += got.other_frames;
        first_other = first_other.or(got.first_other);
    }
    let base_h = baseline.await??;

    let mut totals = Seen::default();
    let (mut lost, mut short, mut dropped, mut first_drop) = (0u64, 0u64, 0u64, None);
    for s in &seen {
        totals.add(&s.seen);
        let missing = committed[s.project].saturating_sub(s.seen.received);
        lost += missing;
        short += u64::from(missing > 0);
        if let Some(e) = &s.ended {
            dropped += 1;
            first_drop = first_drop.or(Some(e.clone()));
        }
    }
    let total_written = written.load(Relaxed);
    let achieved = written_window as f64 / window;
    let rate_reached = achieved >= MIN_RATE_SHARE * opts.rate as f64;
    let deliveries_per_s = in_window as f64 / window;
    let per_delivery_us = |cores: f64| match in_window {
        0 => 0.0,
        d => (cores * window / d as f64 * 1e6 * 1000.0).round() / 1000.0,
    };
    // The unread bytes as time: how far behind the relay's sends the
    // clients' reads were, at the rate bytes were delivered.
    let bytes_per_ms = bytes_in_window as f64 / window / 1000.0;
    let behind_ms = |bytes: u64| {
        if bytes_per_ms > 0.0 {
            round2(bytes as f64 / bytes_per_ms)
        } else {
            0.0
        }
    };
    let name = format!("crowded-{n}x{projects}p-{}", opts.rate);
    let mut json = json!({
        "scenario": "crowded",
        "subscribers": n, "projects": projects, "rate_events_per_s": opts.rate,
        "seconds": opts.seconds, "writers": opts.writers, "reader_threads": threads,
        "source_addresses": sources,
        "open_and_subscribe_seconds": round2(open_secs),
        "achieved_events_per_s": achieved.round(), "rate_reached": rate_reached,
        "events_written": total_written, "events_in_window": written_window,
        "deliveries_per_s": deliveries_per_s.round(),
        "relay": percentiles(&relay_h),
        "baseline_listen": percentiles(&base_h),
        "p50_ratio": ratio(relay_h.value_at_quantile(0.5), base_h.value_at_quantile(0.5)),
        "p99_ratio": ratio(relay_h.value_at_quantile(0.99), base_h.value_at_quantile(0.99)),
        "lost": lost, "subscribers_missing_events": short,
        "duplicates": totals.duplicates, "out_of_order": totals.out_of_order,
        "dropped": dropped, "first_drop": first_drop,
        "other_frames": other_frames, "first_other_frame": first_other,
        "drain_seconds": round2(drain_secs),
        "unread_by_clients": {
            "samples": unread.samples, "mean_kib": round2(unread.mean() / 1024.0),
            "max_kib": round2(unread.max as f64 / 1024.0),
            "mean_ms_of_deliveries": behind_ms(unread.mean() as u64),
            "max_ms_of_deliveries": behind_ms(unread.max),
        },
        "relay_cpu_cores": round2(cores.relay),
        "postgres_cpu_cores": round2(cores.postgres),
        "bench_cpu_cores": round2(cores.bench),
        "other_processes_cpu_cores": round2(cores.others()),
        "relay_cpu_us_per_delivery": per_delivery_us(cores.relay),
        "bench_cpu_us_per_delivery": per_delivery_us(cores.bench),
        "relay_rss_kib": relay_rss, "bench_rss_kib": bench_rss,
        "machine": machine(),
    });
    let warning = if rate_reached {
        String::new()
    } else {
        let why = format!(
            "the writers reached {achieved:.0} events/s, below {:.0}% of the {} asked: \
             the relay was not loaded as asked",
            MIN_RATE_SHARE * 100.0,
            opts.rate
        );
        json["failed"] = why.clone().into();
        format!("**NOT A VALID RUN: {why}.**\n\n")
    };
    let markdown = format!(
        "### Crowded: {n} subscribers over {projects} project(s), {} events/s\n\n{warning}\
         Writers reached **{achieved:.0} events/s** ({} writers, one event per commit); \
         **{deliveries_per_s:.0} deliveries/s**; lost **{lost}** ({short} subscribers short), duplicated {}, \
         out of order {}, connections dropped {dropped}.\n\n\
         | | p50 | p90 | p99 | p99.9 | max |\n| --- | --- | --- | --- | --- | --- |\n\
         | relay (light WebSocket clients) | {} | {} | {} | {} | {} |\n\
         | baseline (direct LISTEN) | {} | {} | {} | {} | {} |\n\n\
         Milliseconds from the writer's send to receipt. CPU over the {window:.1} s window: relay {:.2} cores \
         (**{} µs per delivery**), Postgres {:.2}, the bench {:.2} ({} µs per delivery; {threads} reader thread(s)), \
         other processes on the machine {:.2}. Bytes delivered but not yet read by the clients (kernel receive \
         queues, sampled every {} ms): mean {:.0} KiB ({} ms of deliveries), max {:.0} KiB ({} ms). Relay RSS {relay_rss} KiB. Clients from {sources} source address(es), \
         opened and subscribed in {open_secs:.1} s.\n",
        opts.rate,
        opts.writers,
        totals.duplicates,
        totals.out_of_order,
        ms_cell(&relay_h, 0.5), ms_cell(&relay_h, 0.9), ms_cell(&relay_h, 0.99), ms_cell(&relay_h, 0.999), ms_max(&relay_h),
        ms_cell(&base_h, 0.5), ms_cell(&base_h, 0.9), ms_cell(&base_h, 0.99), ms_cell(&base_h, 0.999), ms_max(&base_h),
        cores.relay, per_delivery_us(cores.relay), cores.postgres, cores.bench, per_delivery_us(cores.bench),
        cores.others(),
        unread_every(n).as_millis(),
        unread.mean() / 1024.0,
        behind_ms(unread.mean() as u64),
        unread.max as f64 / 1024.0,
        behind_ms(unread.max),
    );
    let svg = latency_svg(&name, &[("relay", &relay_h), ("direct LISTEN", &base_h)]);
    Ok(Outcome {
        name,
        json,
        markdown,
        svg: Some(svg),
    })
}

/// What every reader thread shares with the run.
struct Shared {
    /// Cancelled when the run is over (or failed) and clients should end.
    stop: CancellationToken,
    /// True during the measured window (after warm-up).
    measuring: Arc<AtomicBool>,
    /// The first subscriber that could not open or subscribe.
    failure: Mutex<Option<String>>,
}

/// One subscriber before it connects.
struct Client {
    k: usize,
    source: IpAddr,
    /// Index of its project (`p1` is 0).
    project: usize,
}

/// A reader thread: its progress, read by the run while it goes, and what
/// its subscribers saw, once it ends.
struct Reader {
    subscribed: Arc<AtomicU64>,
    /// Events received, counted once each.
    received: Arc<AtomicU64>,
    thread: JoinHandle<anyhow::Result<ThreadSeen>>,
}

/// What one reader thread's subscribers saw.
struct ThreadSeen {
    hist: Histogram<u64>,
    subscribers: Vec<Subscriber>,
    /// Deliveries in the measured window, and their payload bytes.
    in_window: u64,
    bytes_in_window: u64,
    /// Frames that were neither events nor pings (a `reset`, an error).
    other_frames: u64,
    first_other: Option<String>,
}

struct Subscriber {
    project: usize,
    seen: Seen,
    /// Why the connection ended before the run did.
    ended: Option<String>,
}

/// The state a reader thread's subscribers share: one histogram, a few
/// counters.
struct Group {
    hist: RefCell<Histogram<u64>>,
    in_window: Cell<u64>,
    bytes_in_window: Cell<u64>,
    other_frames: Cell<u64>,
    first_other: RefCell<Option<String>>,
}

impl Reader {
    fn spawn(
        t: usize,
        clients: Vec<Client>,
        tokens: Arc<[String]>,
        relay: SocketAddr,
        in_flight: usize,
        shared: Arc<Shared>,
    ) -> anyhow::Result<Reader> {
        let subscribed = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let progress = (subscribed.clone(), received.clone());
        let thread = std::thread::Builder::new()
            .name(format!("crowd-reader-{t}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting a reader runtime")?;
                let local = tokio::task::LocalSet::new();
                local.block_on(
                    &runtime,
                    read_all(clients, tokens, relay, in_flight, shared, progress),
                )
            })
            .context("starting a reader thread")?;
        Ok(Reader {
            subscribed,
            received,
            thread,
        })
    }

    async fn join(self) -> anyhow::Result<ThreadSeen> {
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("a reader thread panicked"))?
    }
}

/// Events received so far by every reader thread's subscribers.
fn received(readers: &[Reader]) -> u64 {
    readers.iter().map(|r| r.received.load(Relaxed)).sum()
}

/// Waits until all `n` subscribers have their `subscribed` frame; an error
/// as soon as one could not open or subscribe, or a reader thread ended.
async fn wait_subscribed(readers: &[Reader], shared: &Shared, n: usize) -> anyhow::Result<()> {
    // Opening at a few thousand a second, plus a subscribe's own wait.
    let deadline = Instant::now() + SUBSCRIBE_WAIT + Duration::from_millis(n as u64);
    loop {
        let subscribed: u64 = readers.iter().map(|r| r.subscribed.load(Relaxed)).sum();
        if subscribed == n as u64 {
            return Ok(());
        }
        if let Some(e) = shared
            .failure
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .take()
        {
            bail!("{e} (after {subscribed} of {n} subscribed)");
        }
        if readers.iter().any(|r| r.thread.is_finished()) {
            bail!("a reader thread ended early (after {subscribed} of {n} subscribed)");
        }
        if Instant::now() > deadline {
            bail!("only {subscribed} of {n} subscribers subscribed in time");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A reader thread's work: opens its clients (`in_flight` at a time), then
/// reads them all until the run stops.
async fn read_all(
    clients: Vec<Client>,
    tokens: Arc<[String]>,
    relay: SocketAddr,
    in_flight: usize,
    shared: Arc<Shared>,
    (subscribed, received): (Arc<AtomicU64>, Arc<AtomicU64>),
) -> anyhow::Result<ThreadSeen> {
    let group = Rc::new(Group {
        hist: RefCell::new(latency_histogram()?),
        in_window: Cell::new(0),
        bytes_in_window: Cell::new(0),
        other_frames: Cell::new(0),
        first_other: RefCell::new(None),
    });
    let gate = Rc::new(Semaphore::new(in_flight));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| {
            tokio::task::spawn_local(subscribe_and_read(
                client,
                tokens.clone(),
                relay,
                gate.clone(),
                group.clone(),
                shared.clone(),
                (subscribed.clone(), received.clone()),
            ))
        })
        .collect();
    let mut subscribers = Vec::with_capacity(tasks.len());
    for task in tasks {
        subscribers.push(task.await?);
    }
    let group =
        Rc::try_unwrap(group).map_err(|_| anyhow::anyhow!("a subscriber outlived its thread"))?;
    Ok(ThreadSeen {
        hist: group.hist.into_inner(),
        subscribers,
        in_window: group.in_window.get(),
        bytes_in_window: group.bytes_in_window.get(),
        other_frames: group.other_frames.get(),
        first_other: group.first_other.into_inner(),
    })
}

/// One subscriber: opens from its source address, subscribes, then takes
/// every frame until the run stops, checking seq order and timing the
/// deliveries of the measured window.
async fn subscribe_and_read(
    client: Client,
    tokens: Arc<[String]>,
    relay: SocketAddr,
    gate: Rc<Semaphore>,
    group: Rc<Group>,
    shared: Arc<Shared>,
    (subscribed, received): (Arc<AtomicU64>, Arc<AtomicU64>),
) -> Subscriber {
    let project = client.project;
    let mut out = Subscriber {
        project,
        seen: Seen::default(),
        ended: None,
    };
    let open = async {
        let _permit = gate.acquire().await?;
        let token = &tokens[client.k % tokens.len()];
        let mut conn = Conn::open(client.source, relay, token).await?;
        let seq = conn
            .subscribe(&format!("p{}", project + 1), SUBSCRIBE_WAIT)
            .await?;
        anyhow::Ok((conn, seq))
    };
    let opened = tokio::select! {
        _ = shared.stop.cancelled() => return out,
        opened = open => opened,
    };
    let (conn, seq) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            let why = format!("subscriber {} from {}: {e:#}", client.k, client.source);
            if let Ok(mut failure) = shared.failure.lock() {
                failure.get_or_insert(why.clone());
            }
            out.ended = Some(why);
            return out;
        }
    };
    subscribed.fetch_add(1, Relaxed);
    out.seen = Seen::after(seq);
    let seen = &mut out.seen;
    let ended = conn
        .receive(&shared.stop, |payload, at| {
            // The finders read bytes: no UTF-8 check of a frame whose
            // text nothing else reads.
            let event = payload.starts_with(EVENT_PREFIX.as_bytes());
            let Some(seq) = seq_of(payload).filter(|_| event) else {
                group.other_frames.set(group.other_frames.get() + 1);
                let mut first = group.first_other.borrow_mut();
                if first.is_none() {
                    let text = String::from_utf8_lossy(payload);
                    *first = Some(text.chars().take(300).collect());
                }
                return;
            };
            if !seen.note(seq) {
                return;
            }
            received.fetch_add(1, Relaxed);
            if shared.measuring.load(Relaxed) {
                group.in_window.set(group.in_window.get() + 1);
                let bytes = group.bytes_in_window.get() + payload.len() as u64;
                group.bytes_in_window.set(bytes);
                if let Some(sent) = sent_us(payload) {
                    let _ = group
                        .hist
                        .borrow_mut()
                        .record(at.saturating_sub(sent).max(1));
                }
            }
        })
        .await;
    if let Err(e) = ended {
        out.ended = Some(format!(
            "subscriber {} from {}: {e:#}",
            client.k, client.source
        ));
    }
    out
}

/// How often the unread bytes of `clients` are sampled: every 500 ms, less
/// often for large crowds. A sample costs the kernel about 2 µs per TCP
/// socket on the machine (it formats `/proc/net/tcp` line by line, and
/// both ends of each client are there), so at 200 µs per client the
/// sampler stays near 2% of a core: 19,000 clients are sampled every 3.8 s.
fn unread_every(clients: usize) -> Duration {
    Duration::from_millis(500).max(Duration::from_micros(200) * clients as u32)
}

/// The clients' unread bytes, sampled through the measured window.
struct Unread {
    samples: u64,
    sum: u64,
    max: u64,
}

impl Unread {
    fn mean(&self) -> f64 {
        self.sum as f64 / self.samples.max(1) as f64
    }
}

/// Samples [`loopback::unread_by_clients`] every `every` while
/// `measuring`: when the clients keep up, their receive queues stay near
/// empty and the latency is the relay's; when they do not, the bytes
/// waiting there say by how much the load generator lagged.
fn sample_unread(
    measuring: &AtomicBool,
    relay_port: u16,
    every: Duration,
) -> anyhow::Result<Unread> {
    let mut unread = Unread {
        samples: 0,
        sum: 0,
        max: 0,
    };
    while measuring.load(Relaxed) {
        let bytes = loopback::unread_by_clients(relay_port)?;
        unread.samples += 1;
        unread.sum += bytes;
        unread.max = unread.max.max(bytes);
        // In steps, so the window's end is not overrun by a whole period.
        let next = Instant::now() + every;
        while measuring.load(Relaxed) && Instant::now() < next {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(unread)
}

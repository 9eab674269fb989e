//! Idle subscribed WebSockets: the relay's resident memory per connection,
//! how fast connections are opened and subscribed, and whether a new
//! subscriber is still served promptly while they are all connected.
//!
//! The idle clients are [`lightws`] connections, so the load generator's
//! own memory and CPU stay small next to the relay's, spread over source
//! addresses by [`loopback`] (`per_source` each). The relay's RSS is sampled
//! as they open (the curve of RSS against connections).
//!
//! Probes: one new subscriber at a time subscribes to a project no idle
//! client is in, a writer commits one event there, and the time from the
//! writer's send to the frame is that subscriber's first-event latency.
//! The same probes run before the crowd connects (the baseline of the same
//! run) and while it is connected.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use testkit::now_us;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::env::Env;
use crate::lightws::Conn;
use crate::loopback;
use crate::report::{machine, Outcome};
use crate::stats::{latency_histogram, ms_cell, ms_max, percentiles, round2};
use crate::subscriber::{sent_us, SUBSCRIBE_WAIT};

/// Projects the idle clients spread over; the probes use one more.
const PROJECTS: usize = 100;

const INSERT: &str =
    "INSERT INTO chat.messages (id, project_id, sender_id, body) VALUES ($1, $2, 'w', $3)";

/// What the scenario is asked to do (its command-line options).
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct Options {
    #[arg(long, default_value_t = 10_000)]
    pub count: usize,
    /// Clients per 127.0.0.x source address (loopback has ~28,000
    /// ephemeral ports per address).
    #[arg(long, default_value_t = 20_000)]
    pub per_source: usize,
    /// Connections being opened at once (below the relay's accept backlog
    /// and its limit on connections not yet upgraded).
    #[arg(long, default_value_t = 256)]
    pub in_flight: usize,
    /// New subscribers timed before and while the crowd is connected.
    #[arg(long, default_value_t = 300)]
    pub probes: usize,
    /// Milliseconds between two of them.
    #[arg(long, default_value_t = 50)]
    pub probe_gap_ms: u64,
    /// Seconds the crowd stays connected at least: longer than the
    /// relay's ping period plus its pong timeout (20 + 45 s), so a client
    /// that failed to answer would be dropped, and counted.
    #[arg(long, default_value_t = 70)]
    pub hold_seconds: u64,
    /// New subscribers timed at each tenth of the count as the crowd
    /// opens (0: none), for the curve of first-event p99 against
    /// connections. Opening pauses while they run.
    #[arg(long, default_value_t = 0)]
    pub curve_probes: usize,
}

/// The first-event and connect+subscribe latencies of one phase's probes.
struct Probed {
    first_event: Histogram<u64>,
    subscribe: Histogram<u64>,
}

pub async fn run(env: &Env, opts: &Options) -> anyhow::Result<Outcome> {
    let count = opts.count;
    let users: Vec<String> = (0..100).map(|i| format!("u{i}")).collect();
    env.seed_projects(PROJECTS + 1, &users).await?;
    let tokens = env.tokens(&users)?;
    let probe_project = format!("p{}", PROJECTS + 1);

    loopback::check_open_files(env, count)?;
    let baseline = probe(env, &tokens[0], &probe_project, opts).await?;
    let rss_before = env.relay.rss_kib();
    let kernel_before = Kernel::read();
    let sources = loopback::sources(count, opts.per_source)?;

    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let dropped = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(Semaphore::new(opts.in_flight.max(1)));
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel::<anyhow::Result<()>>();
    let step = (count / 10).max(1);
    let mut curve: Vec<Value> = Vec::new();
    let mut opened = 0usize;
    let t0 = Instant::now();
    // Time spent probing the curve is not time spent opening.
    let mut paused = Duration::ZERO;
    // A client's report that it opened (or why it failed): counted, and a
    // point of the curve at every tenth.
    let one_opened = |result: anyhow::Result<()>, opened: &mut usize, curve: &mut Vec<Value>| {
        result?;
        *opened += 1;
        if opened.is_multiple_of(step) || *opened == count {
            curve.push(json!({
                "connections": *opened,
                "seconds": round2(t0.elapsed().as_secs_f64()),
                "relay_rss_kib": env.relay.rss_kib(),
            }));
        }
        anyhow::Ok(())
    };
    curve.push(json!({"connections": 0, "seconds": 0.0, "relay_rss_kib": rss_before}));
    if opts.curve_probes > 0 {
        add_probe_point(&mut curve, 0, &baseline);
    }
    let curve_opts = Options {
        probes: opts.curve_probes,
        ..*opts
    };
    let result: anyhow::Result<()> = async {
        for k in 0..count {
            if opts.curve_probes > 0 && k > 0 && k.is_multiple_of(step) {
                // Every connection asked for so far is open before the
                // probes run, so the point's count is exact.
                while opened < k {
                    let r = opened_rx.recv().await.context("opening clients vanished")?;
                    one_opened(r, &mut opened, &mut curve)?;
                }
                let started = Instant::now();
                let probed = probe(env, &tokens[0], &probe_project, &curve_opts).await?;
                paused += started.elapsed();
                add_probe_point(&mut curve, k, &probed);
            }
            let permit = gate.clone().acquire_owned().await?;
            let source = loopback::source(k, opts.per_source);
            let client = Client {
                source,
                token: tokens.clone(),
                k,
                env_addr: env.addr(),
                permit,
                opened: opened_tx.clone(),
                stop: stop.clone(),
                dropped: dropped.clone(),
                tracker: tracker.clone(),
            };
            tracker.spawn(client.open());
            while let Ok(r) = opened_rx.try_recv() {
                one_opened(r, &mut opened, &mut curve)?;
            }
        }
        while opened < count {
            let r = opened_rx.recv().await.context("opening clients vanished")?;
            one_opened(r, &mut opened, &mut curve)?;
        }
        Ok(())
    }
    .await;
    let connect_secs = t0.elapsed().saturating_sub(paused).as_secs_f64();
    let held_since = Instant::now();
    if let Err(e) = result {
        stop.cancel();
        return Err(e.context(format!("after {opened} of {count} connections opened")));
    }

    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_after = env.relay.rss_kib();
    let kernel_after = Kernel::read();
    let relay_fds = open_fds(env.relay.pid());
    let bench_rss = testkit::process::rss_kib(std::process::id())?;
    let crowded = probe(env, &tokens[0], &probe_project, opts).await;
    if let Some(rest) = Duration::from_secs(opts.hold_seconds).checked_sub(held_since.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let rss_end = env.relay.rss_kib();
    let dropped_n = dropped.load(Relaxed);
    let held_secs = held_since.elapsed().as_secs_f64();
    stop.cancel();
    tracker.close();
    tracker.wait().await;
    let crowded = crowded?;
    if opts.curve_probes > 0 {
        add_probe_point(&mut curve, count, &crowded);
    }

    let per_conn = rss_after.saturating_sub(rss_before) as f64 / count as f64;
    let rate = count as f64 / connect_secs;
    let name = format!("connections-{count}");
    let json = json!({
        "scenario": "connections", "connections": count,
        "source_addresses": sources, "in_flight": opts.in_flight,
        "relay_rss_kib_before": rss_before, "relay_rss_kib_after": rss_after,
        "relay_rss_kib_end": rss_end,
        "kib_per_connection": round2(per_conn),
        "connect_and_subscribe_per_s": rate.round(),
        "connect_seconds": round2(connect_secs),
        "held_seconds": (held_secs * 10.0).round() / 10.0,
        "dropped_while_held": dropped_n,
        "relay_open_fds": relay_fds,
        "kernel_before": kernel_before.json(), "kernel_after": kernel_after.json(),
        "kernel_slab_kib_per_connection": kernel_after.slab_per(&kernel_before, count),
        "bench_rss_kib": bench_rss,
        "rss_curve": curve,
        "probe_first_event": {"baseline": percentiles(&baseline.first_event), "connected": percentiles(&crowded.first_event)},
        "probe_subscribe": {"baseline": percentiles(&baseline.subscribe), "connected": percentiles(&crowded.subscribe)},
        "machine": machine(),
    });
    let row = |label: &str, h: &Histogram<u64>| {
        format!(
            "| {label} | {} | {} | {} | {} |\n",
            ms_cell(h, 0.5),
            ms_cell(h, 0.9),
            ms_cell(h, 0.99),
            ms_max(h)
        )
    };
    let markdown = format!(
        "### Connections: {count} idle subscribed WebSockets\n\n\
         Relay RSS {rss_before} KiB before, {rss_after} KiB after: **{per_conn:.1} KiB per connection**; \
         {rate:.0} connections (handshake + subscribe) per second, from {sources} source address(es). \
         Held {held_secs:.0} s (the relay pings every 20 s and closes a peer silent 45 s after a ping): {dropped_n} dropped; relay RSS {rss_end} KiB at the end, \
         {relay_fds} open files; the load generator's RSS {bench_rss} KiB. Kernel slab (machine-wide) \
         {:.1} KiB more per connection (both ends; TCP sockets in use {} before, {} after; \
         TCP buffer pages {} after).\n\n\
         New subscribers, one at a time ({} each phase), before the crowd and while it is connected (ms):\n\n\
         | | p50 | p90 | p99 | max |\n| --- | --- | --- | --- | --- |\n{}{}{}{}",
        kernel_after.slab_per(&kernel_before, count),
        kernel_before.tcp_inuse,
        kernel_after.tcp_inuse,
        kernel_after.tcp_mem_pages,
        opts.probes,
        row("first event, commit to frame, baseline", &baseline.first_event),
        row("first event, commit to frame, connected", &crowded.first_event),
        row("connect + subscribe, baseline", &baseline.subscribe),
        row("connect + subscribe, connected", &crowded.subscribe),
    );
    let svg = (opts.curve_probes > 0).then(|| curve_svg(&name, &curve));
    Ok(Outcome {
        name,
        json,
        markdown,
        svg,
    })
}

/// Adds a new subscriber's first-event percentiles to the curve's point
/// at `connections`.
fn add_probe_point(curve: &mut [Value], connections: usize, probed: &Probed) {
    let point = curve
        .iter_mut()
        .rev()
        .find(|p| p["connections"].as_u64() == Some(connections as u64));
    if let Some(Value::Object(point)) = point {
        point.insert("probe_first_event".into(), percentiles(&probed.first_event));
    }
}

/// Relay RSS and a new subscriber's first-event p99 against connections.
fn curve_svg(title: &str, curve: &[Value]) -> String {
    let points = |y: &dyn Fn(&Value) -> Option<f64>| -> Vec<(f64, f64)> {
        curve
            .iter()
            .filter_map(|p| Some((p["connections"].as_f64()?, y(p)?)))
            .collect()
    };
    let rss = points(&|p| Some(p["relay_rss_kib"].as_f64()? / 1024.0));
    let p99 = points(&|p| p["probe_first_event"]["p99_ms"].as_f64());
    crate::report::curve_svg(
        &format!("{title}: relay against connections"),
        "connections",
        &[
            ("relay RSS (MiB)", &rss),
            ("new subscriber's first event, p99 (ms)", &p99),
        ],
    )
}

/// One idle client while it opens.
struct Client {
    source: IpAddr,
    token: Arc<[String]>,
    k: usize,
    env_addr: std::net::SocketAddr,
    permit: OwnedSemaphorePermit,
    opened: mpsc::UnboundedSender<anyhow::Result<()>>,
    stop: CancellationToken,
    dropped: Arc<AtomicU64>,
    tracker: TaskTracker,
}

impl Client {
    /// Opens and subscribes, then hands the connection to a task of its
    /// own: the idle task's state is the connection alone, not this
    /// future's larger one.
    async fn open(self) {
        let token = &self.token[self.k % self.token.len()];
        let project = format!("p{}", self.k % PROJECTS + 1);
        let conn = async {
            let mut conn = Conn::open(self.source, self.env_addr, token).await?;
            conn.subscribe(&project, SUBSCRIBE_WAIT).await?;
            anyhow::Ok(conn)
        }
        .await;
        drop(self.permit);
        match conn {
            Err(e) => {
                let _ = self.opened.send(Err(
                    e.context(format!("client {} from {}", self.k, self.source))
                ));
            }
            Ok(conn) => {
                let (stop, dropped) = (self.stop, self.dropped);
                self.tracker.spawn(async move {
                    if let Err(e) = conn.idle(&stop).await {
                        tracing::warn!(error = %e, "idle client ended");
                        dropped.fetch_add(1, Relaxed);
                    }
                });
                let _ = self.opened.send(Ok(()));
            }
        }
    }
}

/// `opts.probes` new subscribers, one after another, each timed from
/// connect to `subscribed` and from the writer's send of its first event
/// to the frame.
async fn probe(env: &Env, token: &str, project: &str, opts: &Options) -> anyhow::Result<Probed> {
    let writer = env.client().await?;
    let insert = writer.prepare(INSERT).await?;
    let mut probed = Probed {
        first_event: latency_histogram()?,
        subscribe: latency_histogram()?,
    };
    let source = IpAddr::V4(Ipv4Addr::LOCALHOST);
    for i in 0..opts.probes {
        let start = Instant::now();
        let mut conn = Conn::open(source, env.addr(), token).await?;
        conn.subscribe(project, SUBSCRIBE_WAIT).await?;
        let subscribed_us = start.elapsed().as_micros() as u64;
        let id = format!("{}-probe-{i}", now_us());
        let receive = async {
            let frame = conn.next_text(Duration::from_secs(30)).await;
            (frame, now_us())
        };
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&id, &project, &"probe"];
        let (inserted, (frame, at_us)) = tokio::join!(writer.execute(&insert, &params), receive);
        inserted?;
        let frame = frame.with_context(|| format!("probe {i}'s first event"))?;
        if !frame.contains(&id) {
            bail!("probe {i} expected its event {id}, got {frame}");
        }
        let sent = sent_us(&frame).context("event frame without a timed id")?;
        probed
            .first_event
            .record(at_us.saturating_sub(sent).max(1))?;
        probed.subscribe.record(subscribed_us.max(1))?;
        drop(conn);
        tokio::time::sleep(Duration::from_millis(opts.probe_gap_ms)).await;
    }
    Ok(probed)
}

/// What the kernel holds for sockets: slab memory (machine-wide, so
/// other processes' work is noise in it) and this network namespace's
/// TCP sockets and their buffered pages (`/proc/net/sockstat`). 0 where
/// `/proc` cannot say.
struct Kernel {
    slab_kib: u64,
    unreclaimable_slab_kib: u64,
    tcp_inuse: u64,
    tcp_mem_pages: u64,
}

impl Kernel {
    fn read() -> Kernel {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
        let field = |text: &str, line: &str, key: &str| -> u64 {
            text.lines()
                .find(|l| l.starts_with(line))
                .and_then(|l| {
                    let mut words = l.split_whitespace();
                    words.find(|w| *w == key)?;
                    words.next()?.parse().ok()
                })
                .unwrap_or(0)
        };
        Kernel {
            slab_kib: field(&meminfo, "Slab:", "Slab:"),
            unreclaimable_slab_kib: field(&meminfo, "SUnreclaim:", "SUnreclaim:"),
            tcp_inuse: field(&sockstat, "TCP:", "inuse"),
            tcp_mem_pages: field(&sockstat, "TCP:", "mem"),
        }
    }

    fn json(&self) -> Value {
        json!({"slab_kib": self.slab_kib, "unreclaimable_slab_kib": self.unreclaimable_slab_kib,
               "tcp_inuse": self.tcp_inuse, "tcp_mem_pages": self.tcp_mem_pages})
    }

    /// Slab growth since `before`, per connection, to a tenth of a KiB.
    fn slab_per(&self, before: &Kernel, count: usize) -> f64 {
        let grown = self.slab_kib.saturating_sub(before.slab_kib) as f64;
        (grown / count.max(1) as f64 * 10.0).round() / 10.0
    }
}

/// Open file descriptors of a process (0 if `/proc` cannot say).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

//! The relay's WebSocket subscribers as the latency and saturation
//! scenarios run them: each records the latency of every delivery (from
//! the send time in the event's id) and checks seq order.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use testkit::{now_us, ws};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::env::Env;
use crate::stats::latency_histogram;

/// How long a subscribe may take under load before the run fails.
pub const SUBSCRIBE_WAIT: Duration = Duration::from_secs(120);

/// What one subscriber saw (or all of them, added up).
#[derive(Default)]
pub struct Seen {
    pub received: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    last_seq: u64,
}

/// What the subscribers of one run share.
#[derive(Clone)]
pub struct Shared {
    hist: Arc<Mutex<Histogram<u64>>>,
    /// True during the measured window (after warm-up).
    pub measuring: Arc<AtomicBool>,
    /// Cancelled when the run is over and clients should finish.
    pub stop: CancellationToken,
    /// Deliveries counted during the window.
    pub delivered: Arc<AtomicU64>,
    /// Subscribers that have their `subscribed` frame: writes start only
    /// once all do, so none misses events by subscribing late.
    subscribed: Arc<AtomicU64>,
}

impl Shared {
    fn new() -> anyhow::Result<Self> {
        Ok(Shared {
            hist: Arc::new(Mutex::new(latency_histogram()?)),
            measuring: Arc::new(AtomicBool::new(false)),
            stop: CancellationToken::new(),
            delivered: Arc::new(AtomicU64::new(0)),
            subscribed: Arc::new(AtomicU64::new(0)),
        })
    }

    async fn wait_subscribed(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + SUBSCRIBE_WAIT;
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

    /// The latencies all subscribers recorded in the window.
    pub fn histogram(&self) -> anyhow::Result<Histogram<u64>> {
        Ok(self
            .hist
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone())
    }
}

/// Running subscribers, to be stopped with [`Shared::stop`] and joined.
pub type Subscribers = Vec<JoinHandle<anyhow::Result<Seen>>>;

/// Seeds projects `p1`..`p{projects}` and starts `count` subscribers, user
/// `u{i}` a member of every project and subscribed to `p{i % projects + 1}`;
/// returns once every one is subscribed.
pub async fn start(
    env: &Env,
    count: usize,
    projects: usize,
) -> anyhow::Result<(Shared, Subscribers)> {
    start_on(env, &[env.addr()], count, projects).await
}

/// [`start`], the subscribers spread over the relays at `relays` in turn.
pub async fn start_on(
    env: &Env,
    relays: &[SocketAddr],
    count: usize,
    projects: usize,
) -> anyhow::Result<(Shared, Subscribers)> {
    let users: Vec<String> = (0..count).map(|i| format!("u{i}")).collect();
    env.seed_projects(projects, &users).await?;
    let shared = Shared::new()?;
    let mut subs = Vec::new();
    for (i, user) in users.iter().enumerate() {
        subs.push(tokio::spawn(subscriber(
            relays[i % relays.len()],
            env.token(user)?,
            format!("p{}", i % projects + 1),
            shared.clone(),
        )));
    }
    shared.wait_subscribed(count).await?;
    Ok((shared, subs))
}

/// Waits for every subscriber to finish (after [`Shared::stop`]) and adds
/// up what they saw.
pub async fn join_all(subs: Subscribers) -> anyhow::Result<Seen> {
    let mut totals = Seen::default();
    for s in subs {
        let seen = s.await??;
        totals.received += seen.received;
        totals.duplicates += seen.duplicates;
        totals.out_of_order += seen.out_of_order;
    }
    Ok(totals)
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
    let mut ws = ws::connect(addr, &token).await?;
    let frame = ws::subscribe(&mut ws, &project, None, SUBSCRIBE_WAIT).await?;
    let mut seen = Seen {
        last_seq: frame["seq"].as_u64().unwrap_or(0),
        ..Seen::default()
    };
    subscribed.fetch_add(1, Relaxed);
    let mut local = latency_histogram()?;
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

/// The send time encoded at the start of an id (`<micros>-...`), found in
/// a frame or notice without a full JSON parse.
pub fn sent_us(frame: &str) -> Option<u64> {
    let start = frame.find("\"id\":\"")? + 6;
    let digits: &str = frame[start..].split('-').next()?;
    digits.parse().ok()
}

/// The `seq` of a frame, without a full JSON parse.
pub fn seq_of(frame: &str) -> Option<u64> {
    let start = frame.find("\"seq\":")? + 6;
    let end = frame[start..].find(|c: char| !c.is_ascii_digit())? + start;
    frame[start..end].parse().ok()
}

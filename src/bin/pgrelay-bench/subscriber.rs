//! The relay's WebSocket subscribers as the latency and saturation
//! scenarios run them: each records the latency of every delivery (from
//! the send time in the event's id) and checks seq order.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use memchr::memmem::Finder;
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

impl Seen {
    /// A subscriber whose `subscribed` frame named `seq`: its events start
    /// after it.
    pub fn after(seq: u64) -> Seen {
        Seen {
            last_seq: seq,
            ..Seen::default()
        }
    }

    /// Takes an event's `seq`: true when it is new (counted received, and
    /// out of order if seqs were skipped before it), false for a
    /// duplicate.
    pub fn note(&mut self, seq: u64) -> bool {
        if seq <= self.last_seq {
            self.duplicates += 1;
            return false;
        }
        if seq != self.last_seq + 1 {
            self.out_of_order += 1;
        }
        self.last_seq = seq;
        self.received += 1;
        true
    }

    /// Adds another subscriber's counts to these.
    pub fn add(&mut self, other: &Seen) {
        self.received += other.received;
        self.duplicates += other.duplicates;
        self.out_of_order += other.out_of_order;
    }
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
        totals.add(&s.await??);
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
    let mut seen = Seen::after(frame["seq"].as_u64().unwrap_or(0));
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
        if !seen.note(seq) {
            continue;
        }
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
/// a frame or notice (text or its bytes) without a full JSON parse.
pub fn sent_us(frame: &(impl AsRef<[u8]> + ?Sized)) -> Option<u64> {
    static ID: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""id":""#));
    let frame = frame.as_ref();
    let (sent, end) = digits(frame, value_of(frame, &ID)?)?;
    (frame.get(end) == Some(&b'-')).then_some(sent)
}

/// The `seq` of a frame, without a full JSON parse.
pub fn seq_of(frame: &(impl AsRef<[u8]> + ?Sized)) -> Option<u64> {
    static SEQ: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""seq":"#));
    let frame = frame.as_ref();
    let (seq, end) = digits(frame, value_of(frame, &SEQ)?)?;
    // A number ends the value; anything else (`null`, a fraction) is none.
    matches!(frame.get(end), Some(b',' | b'}')).then_some(seq)
}

/// Where the value after the first `key` (a quoted name and its colon)
/// starts. The finders are built once: `str::find` builds its searcher on
/// every call, which at a million frames a second cost the load generator
/// more than the search itself.
fn value_of(frame: &[u8], key: &Finder<'_>) -> Option<usize> {
    Some(key.find(frame)? + key.needle().len())
}

/// The decimal number at `start` (at least one digit, no overflow) and
/// where it ends.
fn digits(frame: &[u8], start: usize) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    let mut end = start;
    while let Some(d) = frame.get(end).filter(|b| b.is_ascii_digit()) {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        end += 1;
    }
    (end > start).then_some((value, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: &str = r#"{"type":"cache_invalidate","resource":"message","action":"INSERT","id":"1764000000123456-3-17","project_id":"p1","seq":4711,"timestamp":"2026-11-24T08:00:00.123456Z","data":{"id":"9-x","seq":1}}"#;

    #[test]
    fn finders_read_the_event_fields_from_text_or_bytes() {
        assert_eq!(sent_us(FRAME), Some(1_764_000_000_123_456));
        assert_eq!(seq_of(FRAME), Some(4711));
        assert_eq!(sent_us(FRAME.as_bytes()), Some(1_764_000_000_123_456));
        assert_eq!(seq_of(FRAME.as_bytes()), Some(4711));
    }

    #[test]
    fn finders_refuse_what_is_not_a_timed_id_or_a_number() {
        assert_eq!(
            seq_of(r#"{"type":"subscribed","project_id":"p1","seq":null}"#),
            None
        );
        assert_eq!(
            seq_of(r#"{"type":"subscribed","seq":0,"timestamp":null}"#),
            Some(0)
        );
        assert_eq!(seq_of(r#"{"seq":1.5}"#), None);
        assert_eq!(seq_of(r#"{"seq":99999999999999999999999}"#), None);
        assert_eq!(sent_us(r#"{"id":"m1"}"#), None);
        assert_eq!(sent_us(r#"{"id":"123"}"#), None);
        assert_eq!(sent_us(r#"{"type":"pong"}"#), None);
    }
}

//! Broadcasts across two relays: latency to every subscriber and to the
//! last of them, and the rate at which the database takes them, with what
//! that load costs a writer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use testkit::process::RelayProcess;
use testkit::{now_us, ws};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::{round3, Figures, Options};
use crate::env::Env;
use crate::stats::{latency_histogram, percentiles};
use crate::subscriber::SUBSCRIBE_WAIT;
use crate::write_cost::{sample_waits, NOTIFY_LOCK_WAIT, WRITER_APP};

/// Project `project` with `users` as members.
pub async fn seed(env: &Env, project: &str, users: &[String]) -> anyhow::Result<()> {
    let c = env.client().await?;
    c.execute(
        "INSERT INTO chat.projects (id, name) VALUES ($1, $1)",
        &[&project],
    )
    .await?;
    c.execute(
        "INSERT INTO chat.project_members (project_id, user_id) SELECT $1, unnest($2::text[])",
        &[&project, &users],
    )
    .await?;
    Ok(())
}

/// A connection of `user` subscribed to `project`.
pub async fn subscribed(
    env: &Env,
    addr: SocketAddr,
    user: &str,
    project: &str,
) -> anyhow::Result<ws::Ws> {
    let mut ws = ws::connect(addr, &env.token(user)?).await?;
    ws::subscribe(&mut ws, project, None, SUBSCRIBE_WAIT).await?;
    Ok(ws)
}

/// `"key":<digits>` in a frame, without a JSON parse.
pub fn number_after(frame: &str, key: &str) -> Option<u64> {
    let start = frame.find(key)? + key.len();
    let end = frame[start..]
        .find(|c: char| !c.is_ascii_digit())
        .map_or(frame.len(), |e| e + start);
    frame[start..end].parse().ok()
}

/// Per broadcast index: when it was sent, when its last receiver had it,
/// and how many had it.
struct Ledger {
    sent: Vec<AtomicU64>,
    last: Vec<AtomicU64>,
    receivers: Vec<AtomicU32>,
}

/// Senders on relay 1 at `rate` broadcasts/s (a second of warm-up, then
/// `seconds` measured), `subscribers` receivers alternating between relay 1
/// and relay 2.
pub async fn latency(
    env: &Env,
    relay2: &RelayProcess,
    project: &str,
    subscribers: usize,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<(Figures, Value)> {
    const SENDERS: usize = 4;
    let users: Vec<String> = (0..subscribers)
        .map(|i| format!("r{i}"))
        .chain((0..SENDERS).map(|i| format!("s{i}")))
        .collect();
    seed(env, project, &users).await?;
    let warm = rate; // one second
    let total = (rate * (seconds + 1)) as usize;
    let ledger = Arc::new(Ledger {
        sent: (0..total).map(|_| AtomicU64::new(0)).collect(),
        last: (0..total).map(|_| AtomicU64::new(0)).collect(),
        receivers: (0..total).map(|_| AtomicU32::new(0)).collect(),
    });
    let stop = CancellationToken::new();
    // Per-receiver latencies, by the relay the receiver is on.
    let hists = Arc::new(Mutex::new([latency_histogram()?, latency_histogram()?]));
    let mut receivers = Vec::new();
    let mut i = 0;
    while i < subscribers {
        let batch: Vec<usize> = (i..(i + 200).min(subscribers)).collect();
        let conns = futures_util::future::join_all(batch.iter().map(|&k| {
            let addr = if k % 2 == 0 { env.addr() } else { relay2.addr };
            let user = users[k].clone();
            async move { subscribed(env, addr, &user, project).await }
        }))
        .await;
        for (ws, k) in conns.into_iter().zip(batch) {
            let (_, rx) = ws?.split();
            receivers.push(tokio::spawn(receiver(
                rx,
                k % 2,
                warm,
                ledger.clone(),
                hists.clone(),
                stop.clone(),
            )));
        }
        i += 200;
    }
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let ws = subscribed(env, env.addr(), &format!("s{s}"), project).await?;
        let (mut tx, mut rx) = ws.split();
        let errors = errors.clone();
        let stop_reader = stop.clone();
        // Senders hear only errors (no id, no "self").
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop_reader.cancelled() => break,
                    m = rx.next() => match m {
                        Some(Ok(Message::Text(t))) if t.contains("\"type\":\"error\"") => {
                            errors.fetch_add(1, Relaxed);
                        }
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                }
            }
        });
        let (ledger, next, project) = (ledger.clone(), next.clone(), project.to_string());
        let interval = Duration::from_secs_f64(SENDERS as f64 / rate as f64);
        senders.push(tokio::spawn(async move {
            // Spread the senders over one interval.
            tokio::time::sleep(interval.mul_f64(s as f64 / SENDERS as f64)).await;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            loop {
                tick.tick().await;
                let i = next.fetch_add(1, Relaxed) as usize;
                if i >= total {
                    break;
                }
                let t = now_us();
                ledger.sent[i].store(t, Relaxed);
                let frame = json!({"action": "broadcast", "project_id": project,
                                   "event": "bench", "payload": {"t": t, "i": i}});
                tx.send(Message::Text(frame.to_string().into())).await?;
            }
            anyhow::Ok(tx)
        }));
    }
    let mut sockets = Vec::new();
    for s in senders {
        sockets.push(s.await??);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let mut received = 0;
    for r in receivers {
        received += r.await??;
    }
    drop(sockets);

    // Latency to the last receiver, for broadcasts every receiver had.
    let mut last_h = latency_histogram()?;
    let (mut complete, mut incomplete) = (0u64, 0u64);
    for i in warm as usize..total {
        if ledger.receivers[i].load(Relaxed) as usize == subscribers {
            complete += 1;
            let d = ledger.last[i]
                .load(Relaxed)
                .saturating_sub(ledger.sent[i].load(Relaxed));
            last_h.record(d.max(1))?;
        } else {
            incomplete += 1;
        }
    }
    let [h1, h2] = hists
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let mut all = h1.clone();
    all.add(&h2)?;
    let expected = total as u64 * subscribers as u64;
    let ms = |h: &Histogram<u64>, q: f64| round3(h.value_at_quantile(q) as f64 / 1000.0);
    let mut f = Figures::new();
    f.insert("to_last_p50_ms".into(), ms(&last_h, 0.5));
    f.insert("to_last_p99_ms".into(), ms(&last_h, 0.99));
    f.insert("per_receiver_p50_ms".into(), ms(&all, 0.5));
    f.insert("per_receiver_p99_ms".into(), ms(&all, 0.99));
    f.insert("relay1_receiver_p99_ms".into(), ms(&h1, 0.99));
    f.insert("relay2_receiver_p99_ms".into(), ms(&h2, 0.99));
    f.insert("incomplete_broadcasts".into(), incomplete as f64);
    f.insert("sender_errors".into(), errors.load(Relaxed) as f64);
    let detail = json!({
        "subscribers": subscribers, "rate_broadcasts_per_s": rate, "seconds": seconds,
        "broadcasts_sent": total, "measured": total as u64 - warm,
        "deliveries": received, "deliveries_expected": expected,
        "complete": complete, "incomplete": incomplete,
        "sender_errors": errors.load(Relaxed),
        "to_last_receiver": percentiles(&last_h),
        "per_receiver": percentiles(&all),
        "per_receiver_relay1": percentiles(&h1),
        "per_receiver_relay2": percentiles(&h2),
    });
    eprintln!("broadcast latency, {subscribers} subscribers: {detail}");
    Ok((f, detail))
}

/// A receiver: records the latency of every broadcast of index `warm` and
/// later, and its arrival in the ledger; returns how many it had.
async fn receiver(
    mut rx: SplitStream<ws::Ws>,
    relay: usize,
    warm: u64,
    ledger: Arc<Ledger>,
    hists: Arc<Mutex<[Histogram<u64>; 2]>>,
    stop: CancellationToken,
) -> anyhow::Result<u64> {
    let mut local = latency_histogram()?;
    let mut count = 0;
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let msg = tokio::select! {
            biased;
            m = rx.next() => match m {
                None => break,
                Some(m) => m?,
            },
            _ = &mut stopped => break,
        };
        let Message::Text(text) = msg else { continue };
        let now = now_us();
        if !text.starts_with("{\"type\":\"broadcast\"") {
            continue;
        }
        let (Some(t), Some(i)) = (number_after(&text, "\"t\":"), number_after(&text, "\"i\":"))
        else {
            continue;
        };
        count += 1;
        let i = i as usize;
        if i < ledger.last.len() {
            ledger.last[i].fetch_max(now, Relaxed);
            ledger.receivers[i].fetch_add(1, Relaxed);
        }
        if i as u64 >= warm {
            local.record(now.saturating_sub(t).max(1))?;
        }
    }
    hists.lock().map_err(|_| anyhow::anyhow!("poisoned"))?[relay].add(&local)?;
    Ok(count)
}

/// What one phase of the ceiling part measured.
#[derive(Default, Debug)]
struct Phase {
    inserts_per_s: f64,
    notify_lock_share: f64,
    broadcasts_per_s: f64,
    received_per_s: [f64; 2],
    errors: u64,
    relay_cores: f64,
    relay2_cores: f64,
    postgres_cores: f64,
    /// The writer's time by state (`pg_stat_activity`, every 20 ms).
    writer_states: std::collections::BTreeMap<String, f64>,
    /// Broadcast frames both relays dropped at full client queues.
    dropped: f64,
}

/// The broadcast load of a phase.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    None,
    /// Every sender keeps `in_flight` broadcasts unacknowledged.
    Max,
    /// Broadcasts per second over all senders.
    Paced(u64),
}

/// `pgrelay_broadcasts_dropped_total` of a relay.
async fn dropped(addr: SocketAddr) -> anyhow::Result<f64> {
    let text = testkit::http::get(addr, "/metrics").await?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("pgrelay_broadcasts_dropped_total ")?
                .trim()
                .parse()
                .ok()
        })
        .ok_or_else(|| anyhow::anyhow!("no pgrelay_broadcasts_dropped_total at {addr}"))
}

/// The ceiling: a writer alone, broadcasts alone, both, the writer alone
/// again; then SQL `relay.broadcast` as fast as backends can call it.
pub async fn ceiling(
    env: &Env,
    relay2: &RelayProcess,
    project: &str,
    opts: &Options,
) -> anyhow::Result<(Figures, Value)> {
    let c = env.client().await?;
    let table = format!("bench_{project}.captured");
    c.batch_execute(&format!(
        "CREATE SCHEMA bench_{project};
         CREATE TABLE {table} (id bigserial PRIMARY KEY, project_id text NOT NULL, body text NOT NULL);
         SELECT relay.enable('{table}', 'row');"
    ))
    .await?;
    let users: Vec<String> = (0..opts.senders)
        .map(|i| format!("s{i}"))
        .chain((0..4).map(|i| format!("r{i}")))
        .collect();
    seed(env, project, &users).await?;
    let secs = opts.seconds.min(10);
    const PACED: u64 = 2_000;
    let alone1 = phase(env, relay2, project, &table, secs, true, Load::None, opts).await?;
    let load = phase(env, relay2, project, &table, secs, false, Load::Max, opts).await?;
    let both = phase(env, relay2, project, &table, secs, true, Load::Max, opts).await?;
    let paced = phase(
        env,
        relay2,
        project,
        &table,
        secs,
        true,
        Load::Paced(PACED),
        opts,
    )
    .await?;
    let alone2 = phase(env, relay2, project, &table, secs, true, Load::None, opts).await?;
    let (sql_rate, sql_lock) = sql_broadcasts(env, project, secs).await?;
    let alone = (alone1.inserts_per_s + alone2.inserts_per_s) / 2.0;
    let mut f = Figures::new();
    f.insert("writer_alone_inserts_per_s".into(), alone.round());
    f.insert(
        "writer_with_broadcasts_inserts_per_s".into(),
        both.inserts_per_s.round(),
    );
    f.insert(
        "writer_with_over_alone".into(),
        round3(both.inserts_per_s / alone.max(1.0)),
    );
    f.insert(
        format!("writer_with_{PACED}_per_s_inserts_per_s"),
        paced.inserts_per_s.round(),
    );
    f.insert(
        format!("writer_with_{PACED}_per_s_over_alone"),
        round3(paced.inserts_per_s / alone.max(1.0)),
    );
    f.insert(
        "writer_notify_lock_share_alone".into(),
        round3((alone1.notify_lock_share + alone2.notify_lock_share) / 2.0),
    );
    f.insert(
        "writer_notify_lock_share_with_broadcasts".into(),
        round3(both.notify_lock_share),
    );
    f.insert(
        "client_broadcasts_per_s_alone".into(),
        load.broadcasts_per_s.round(),
    );
    f.insert(
        "client_broadcasts_per_s_with_writer".into(),
        both.broadcasts_per_s.round(),
    );
    f.insert(
        "relay2_receiver_per_s_alone".into(),
        load.received_per_s[1].round(),
    );
    f.insert(
        "relay_frames_dropped_per_s_at_max".into(),
        (load.dropped / secs as f64).round(),
    );
    f.insert("sql_broadcasts_per_s".into(), sql_rate.round());
    f.insert("sql_notify_lock_share".into(), round3(sql_lock));
    let show = |p: &Phase| {
        json!({
            "inserts_per_s": p.inserts_per_s.round(),
            "writer_notify_lock_share": round3(p.notify_lock_share),
            "broadcasts_acked_per_s": p.broadcasts_per_s.round(),
            "received_per_s_per_receiver_relay1": p.received_per_s[0].round(),
            "received_per_s_per_receiver_relay2": p.received_per_s[1].round(),
            "broadcast_errors": p.errors,
            "relay1_cores": round3(p.relay_cores), "relay2_cores": round3(p.relay2_cores),
            "postgres_cores": round3(p.postgres_cores),
            "frames_dropped_by_relays": p.dropped,
            "writer_time_by_state": p.writer_states,
        })
    };
    let detail = json!({
        "seconds_per_phase": secs, "senders": opts.senders, "in_flight_per_sender": opts.in_flight,
        "writer_alone_before": show(&alone1), "broadcasts_alone": show(&load),
        "writer_and_broadcasts": show(&both),
        "writer_and_paced_broadcasts": show(&paced),
        "paced_broadcasts_per_s": PACED,
        "writer_alone_after": show(&alone2),
        "sql_relay_broadcast": {"backends": 4, "per_s": sql_rate.round(), "notify_lock_share": round3(sql_lock)},
    });
    eprintln!("broadcast ceiling: {detail}");
    Ok((f, detail))
}

/// One phase: a captured-insert writer and/or closed-loop broadcasters on
/// relay 1 (each keeping `in_flight` broadcasts unacknowledged), with two
/// receivers on each relay counting what arrives.
#[allow(clippy::too_many_arguments)]
async fn phase(
    env: &Env,
    relay2: &RelayProcess,
    project: &str,
    table: &str,
    secs: u64,
    writer: bool,
    load: Load,
    opts: &Options,
) -> anyhow::Result<Phase> {
    let broadcasts = load != Load::None;
    let stop = CancellationToken::new();
    let received = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let mut receivers = Vec::new();
    if broadcasts {
        for k in 0..4usize {
            let addr = if k % 2 == 0 { env.addr() } else { relay2.addr };
            let ws = subscribed(env, addr, &format!("r{k}"), project).await?;
            let (received, stop) = (received.clone(), stop.clone());
            receivers.push(tokio::spawn(async move {
                let (_, mut rx) = ws.split();
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        m = rx.next() => match m {
                            Some(Ok(Message::Text(t))) if t.starts_with("{\"type\":\"broadcast\"") => {
                                received[k % 2].fetch_add(1, Relaxed);
                            }
                            Some(Ok(_)) => {}
                            _ => break,
                        },
                    }
                }
            }));
        }
    }
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    if broadcasts {
        for s in 0..opts.senders {
            let ws = subscribed(env, env.addr(), &format!("s{s}"), project).await?;
            let pace = match load {
                Load::Paced(rate) => {
                    Some(Duration::from_secs_f64(opts.senders as f64 / rate as f64))
                }
                _ => None,
            };
            senders.push(tokio::spawn(closed_loop(
                ws,
                project.to_string(),
                opts.in_flight,
                pace,
                acked.clone(),
                errors.clone(),
                stop.clone(),
            )));
        }
    }
    // A second of warm-up, then the window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let end = Instant::now() + Duration::from_secs(secs);
    let cpu = env.cpu_meter()?;
    let relay2_cpu = relay2.cpu_seconds();
    let (acked0, recv0) = (
        acked.load(Relaxed),
        [received[0].load(Relaxed), received[1].load(Relaxed)],
    );
    let dropped0 = dropped(env.addr()).await? + dropped(relay2.addr).await?;
    let t0 = Instant::now();
    let mut result = Phase::default();
    if writer {
        let sampler = tokio::spawn(sample_waits(env.client().await?, end));
        // The writer runs on a thread and runtime of its own, so it does
        // not queue behind the load generator's tasks in this process.
        let (url, sql) = (
            env.url.clone(),
            format!("INSERT INTO {table} (project_id, body) VALUES ($1, $2)"),
        );
        let thread = std::thread::spawn(move || -> anyhow::Result<u64> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut config: tokio_postgres::Config = url.parse()?;
                config.application_name(WRITER_APP);
                let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                let stmt = client.prepare(&sql).await?;
                let body = "z".repeat(150);
                let mut n = 0u64;
                while Instant::now() < end {
                    client.execute(&stmt, &[&"w", &body]).await?;
                    n += 1;
                }
                Ok(n)
            })
        });
        let n = tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the writer thread panicked"))??;
        result.inserts_per_s = n as f64 / t0.elapsed().as_secs_f64();
        let waits = sampler.await??;
        result.notify_lock_share = waits.get(NOTIFY_LOCK_WAIT).copied().unwrap_or(0.0);
        result.writer_states = waits;
    } else {
        tokio::time::sleep_until(end.into()).await;
    }
    let window = t0.elapsed().as_secs_f64();
    result.broadcasts_per_s = (acked.load(Relaxed) - acked0) as f64 / window;
    for k in 0..2 {
        // Two receivers on each relay.
        result.received_per_s[k] = (received[k].load(Relaxed) - recv0[k]) as f64 / window / 2.0;
    }
    let cores = cpu.cores(window)?;
    result.relay_cores = cores.relay;
    result.postgres_cores = cores.postgres;
    result.relay2_cores = (relay2.cpu_seconds() - relay2_cpu) / window;
    result.dropped = dropped(env.addr()).await? + dropped(relay2.addr).await? - dropped0;
    stop.cancel();
    for s in senders {
        s.await??;
    }
    for r in receivers {
        r.await?;
    }
    result.errors = errors.load(Relaxed);
    Ok(result)
}

/// Keeps `in_flight` broadcasts with an id outstanding until `stop`, or
/// with `pace`, sends one every `pace` (at most `in_flight` outstanding);
/// counts acknowledgements and errors.
async fn closed_loop(
    ws: ws::Ws,
    project: String,
    in_flight: usize,
    pace: Option<Duration>,
    acked: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let (mut tx, mut rx) = ws.split();
    let mut n = 0u64;
    let frame = |n: u64| {
        let f = json!({"action": "broadcast", "project_id": project, "event": "load",
                       "payload": {"t": now_us(), "body": "x".repeat(100)}, "id": n.to_string()});
        Message::Text(f.to_string().into())
    };
    if pace.is_none() {
        for _ in 0..in_flight {
            tx.send(frame(n)).await?;
            n += 1;
        }
    }
    let mut tick = tokio::time::interval(pace.unwrap_or(Duration::from_secs(3600)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut answered = 0u64;
    loop {
        let m = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick(), if pace.is_some() => {
                if n - answered < in_flight as u64 {
                    tx.send(frame(n)).await?;
                    n += 1;
                }
                continue;
            }
            m = rx.next() => m,
        };
        match m {
            Some(Ok(Message::Text(t))) => {
                if t.starts_with("{\"type\":\"broadcast_ack\"") {
                    acked.fetch_add(1, Relaxed);
                } else if t.contains("\"type\":\"error\"") {
                    errors.fetch_add(1, Relaxed);
                } else {
                    continue;
                }
                answered += 1;
                if pace.is_none() {
                    tx.send(frame(n)).await?;
                    n += 1;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("a sender's connection ended"),
        }
    }
    Ok(())
}

/// `relay.broadcast` from 4 backends in autocommit, as fast as they go:
/// one notifying commit per broadcast. Returns broadcasts/s and the share
/// of their time queued on the NOTIFY lock.
async fn sql_broadcasts(env: &Env, project: &str, secs: u64) -> anyhow::Result<(f64, f64)> {
    let end = Instant::now() + Duration::from_secs(secs);
    let sampler = tokio::spawn(sample_waits(env.client().await?, end));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let client = env.client_named(WRITER_APP).await?;
        let project = project.to_string();
        tasks.push(tokio::spawn(async move {
            let stmt = client
                .prepare("SELECT relay.broadcast($1, 'sql', jsonb_build_object('t', $2::bigint))")
                .await?;
            let mut n = 0u64;
            while Instant::now() < end {
                client.execute(&stmt, &[&project, &(n as i64)]).await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let t0 = Instant::now();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let rate = total as f64 / t0.elapsed().as_secs_f64();
    let waits = sampler.await??;
    Ok((rate, waits.get(NOTIFY_LOCK_WAIT).copied().unwrap_or(0.0)))
}

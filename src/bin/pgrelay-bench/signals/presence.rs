//! Presence across two relays: how soon watchers on relay 2 see a join,
//! an update and a leave made on relay 1; and what a present connection
//! costs a relay's memory beyond an idle subscribed one.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use testkit::process::RelayProcess;
use testkit::{now_us, ws};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::broadcast::{seed, subscribed};
use super::{limits, round3, Figures, Options};
use crate::env::Env;
use crate::stats::{latency_histogram, percentiles};
use crate::subscriber::SUBSCRIBE_WAIT;

const KINDS: [&str; 3] = ["join", "update", "leave"];
const WATCHERS: usize = 10;

/// Subscribes with `"presence":true` and returns the socket once the
/// `subscribed` frame came (the snapshot follows).
async fn watching(
    env: &Env,
    addr: SocketAddr,
    user: &str,
    project: &str,
) -> anyhow::Result<ws::Ws> {
    let mut ws = ws::connect(addr, &env.token(user)?).await?;
    ws::send_json(
        &mut ws,
        &json!({"action": "subscribe", "project_id": project, "presence": true}),
    )
    .await?;
    loop {
        match ws::next_json(&mut ws, SUBSCRIBE_WAIT).await? {
            Some(f) if f["type"] == "subscribed" => return Ok(ws),
            Some(f) if f["type"] == "error" => anyhow::bail!("subscribing {user}: {f}"),
            Some(_) => continue,
            None => anyhow::bail!("{user} was not subscribed within {SUBSCRIBE_WAIT:?}"),
        }
    }
}

/// Send times and arrivals of every change, by kind and user.
struct Ledger {
    sent: Vec<Vec<AtomicU64>>,
    last: Vec<Vec<AtomicU64>>,
    seen: Vec<Vec<AtomicU64>>,
}

/// `presence_users` users on relay 1 join, then update, then leave, paced
/// at `presence_rate` changes/s; `WATCHERS` watchers on relay 2.
pub async fn latency(
    env: &Env,
    relay2: &RelayProcess,
    project: &str,
    opts: &Options,
) -> anyhow::Result<(Figures, Value)> {
    let n = opts.presence_users;
    let users: Vec<String> = (0..n)
        .map(|i| format!("a{i}"))
        .chain((0..WATCHERS).map(|i| format!("w{i}")))
        .collect();
    seed(env, project, &users).await?;
    let grid = || {
        (0..3)
            .map(|_| (0..n).map(|_| AtomicU64::new(0)).collect())
            .collect()
    };
    let ledger = Arc::new(Ledger {
        sent: grid(),
        last: grid(),
        seen: grid(),
    });
    let stop = CancellationToken::new();
    let hists = Arc::new(Mutex::new(vec![latency_histogram()?; 3]));
    let mut watchers = Vec::new();
    for w in 0..WATCHERS {
        let ws = watching(env, relay2.addr, &format!("w{w}"), project).await?;
        watchers.push(tokio::spawn(watcher(
            ws,
            ledger.clone(),
            hists.clone(),
            stop.clone(),
        )));
    }
    let mut actors = Vec::new();
    for u in 0..n {
        let ws = subscribed(env, env.addr(), &format!("a{u}"), project).await?;
        let (tx, mut rx) = ws.split();
        let stop = stop.clone();
        // Replies (presence_joined, presence_left) are not timed.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    m = rx.next() => if !matches!(m, Some(Ok(_))) { break },
                }
            }
        });
        actors.push(tx);
    }
    let interval = Duration::from_secs_f64(1.0 / opts.presence_rate as f64);
    for (k, kind) in KINDS.iter().enumerate() {
        let mut tick = tokio::time::interval(interval);
        for (u, tx) in actors.iter_mut().enumerate() {
            tick.tick().await;
            let t = now_us();
            ledger.sent[k][u].store(t, Relaxed);
            let frame = match *kind {
                "leave" => json!({"action": "presence_leave", "project_id": project}),
                _ => json!({"action": "presence", "project_id": project,
                            "state": {"status": kind, "t": t}}),
            };
            tx.send(Message::Text(frame.to_string().into())).await?;
        }
        // Every watcher has every change of this kind before the next kind
        // starts, or 30 s passed.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && ledger.seen[k]
                .iter()
                .any(|s| s.load(Relaxed) < WATCHERS as u64)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stop.cancel();
    let mut resyncs = 0;
    for w in watchers {
        resyncs += w.await??;
    }
    drop(actors);
    let hists = hists
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let mut f = Figures::new();
    let mut detail = serde_json::Map::new();
    let ms = |h: &Histogram<u64>, q: f64| round3(h.value_at_quantile(q) as f64 / 1000.0);
    for (k, kind) in KINDS.iter().enumerate() {
        let mut last_h = latency_histogram()?;
        let mut missing = 0u64;
        for u in 0..n {
            if ledger.seen[k][u].load(Relaxed) < WATCHERS as u64 {
                missing += 1;
                continue;
            }
            let d = ledger.last[k][u]
                .load(Relaxed)
                .saturating_sub(ledger.sent[k][u].load(Relaxed));
            last_h.record(d.max(1))?;
        }
        f.insert(format!("{kind}_to_last_p50_ms"), ms(&last_h, 0.5));
        f.insert(format!("{kind}_to_last_p99_ms"), ms(&last_h, 0.99));
        f.insert(format!("{kind}_per_watcher_p99_ms"), ms(&hists[k], 0.99));
        f.insert(format!("{kind}_not_seen_by_all"), missing as f64);
        detail.insert(
            (*kind).into(),
            json!({"to_last_watcher": percentiles(&last_h), "per_watcher": percentiles(&hists[k]),
                   "changes_not_seen_by_every_watcher": missing}),
        );
    }
    detail.insert("users".into(), n.into());
    detail.insert("watchers_on_relay2".into(), WATCHERS.into());
    detail.insert("changes_per_s".into(), opts.presence_rate.into());
    detail.insert("snapshots_after_the_first".into(), resyncs.into());
    let detail = Value::Object(detail);
    eprintln!("presence latency: {detail}");
    Ok((f, detail))
}

/// A watcher: times each user-level diff about an actor (`a<N>`); returns
/// how many snapshots came after the first.
async fn watcher(
    ws: ws::Ws,
    ledger: Arc<Ledger>,
    hists: Arc<Mutex<Vec<Histogram<u64>>>>,
    stop: CancellationToken,
) -> anyhow::Result<u64> {
    let (_tx, mut rx) = ws.split();
    let mut local = vec![latency_histogram()?; 3];
    let mut snapshots = 0u64;
    loop {
        let m = tokio::select! {
            biased;
            m = rx.next() => m,
            _ = stop.cancelled() => break,
        };
        let text = match m {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => break,
        };
        let now = now_us();
        let f: Value = serde_json::from_str(&text)?;
        match f["type"].as_str() {
            Some("presence_state") => snapshots += 1,
            Some("presence") => {
                let (Some(event), Some(user)) = (f["event"].as_str(), f["user_id"].as_str()) else {
                    continue;
                };
                let Some(k) = KINDS.iter().position(|k| *k == event) else {
                    continue;
                };
                let Some(u) = user.strip_prefix('a').and_then(|u| u.parse::<usize>().ok()) else {
                    continue;
                };
                let Some(sent) = ledger.sent[k].get(u).map(|s| s.load(Relaxed)) else {
                    continue;
                };
                if sent == 0 {
                    continue;
                }
                local[k].record(now.saturating_sub(sent).max(1))?;
                ledger.last[k][u].fetch_max(now, Relaxed);
                ledger.seen[k][u].fetch_add(1, Relaxed);
            }
            _ => {}
        }
    }
    let mut hists = hists.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    for (h, l) in hists.iter_mut().zip(&local) {
        h.add(l)?;
    }
    Ok(snapshots.saturating_sub(1))
}

/// RSS of a fresh relay with `present` idle subscribed connections, then
/// of another fresh relay with as many connections that watch presence and
/// have joined it (spread over `present_projects` projects, one user per
/// connection), once every one has seen all its project's members.
pub async fn memory(env: &Env, prefix: &str, opts: &Options) -> anyhow::Result<(Figures, Value)> {
    let count = opts.present;
    let projects = opts.present_projects.max(1);
    let c = env.client().await?;
    c.execute(
        "INSERT INTO chat.projects (id, name) SELECT $1 || g, 'presence ' || g FROM generate_series(0, $2::int - 1) g",
        &[&prefix, &(projects as i32)],
    )
    .await?;
    c.execute(
        "INSERT INTO chat.project_members (project_id, user_id)
         SELECT $1 || (g % $2::int), $1 || 'm' || g FROM generate_series(0, $3::int - 1) g",
        &[&prefix, &(projects as i32), &(count as i32)],
    )
    .await?;
    let idle = crowd(env, prefix, count, projects, false).await?;
    let present = crowd(env, prefix, count, projects, true).await?;
    let per_idle = idle.added_kib / count as f64;
    let per_present = present.added_kib / count as f64;
    let mut f = Figures::new();
    f.insert("idle_kib_per_connection".into(), round3(per_idle));
    f.insert("present_kib_per_connection".into(), round3(per_present));
    f.insert(
        "present_minus_idle_kib_per_connection".into(),
        round3(per_present - per_idle),
    );
    f.insert("present_converged_s".into(), round3(present.converged_s));
    let show = |c: &Crowd| {
        json!({"rss_kib_before": c.before, "rss_kib_after": c.after,
               "kib_per_connection": round3(c.added_kib / count as f64),
               "connect_s": round3(c.connect_s), "converged_s": round3(c.converged_s),
               "converged_connections": c.converged})
    };
    let detail = json!({
        "connections": count, "projects": projects, "members_per_project": count / projects,
        "idle_subscribed": show(&idle), "present_and_watching": show(&present),
        "present_minus_idle_kib_per_connection": round3(per_present - per_idle),
    });
    eprintln!("presence memory: {detail}");
    Ok((f, detail))
}

struct Crowd {
    before: u64,
    after: u64,
    added_kib: f64,
    connect_s: f64,
    converged_s: f64,
    converged: u64,
}

/// `count` connections on a fresh relay, idle or present.
async fn crowd(
    env: &Env,
    prefix: &str,
    count: usize,
    projects: usize,
    present: bool,
) -> anyhow::Result<Crowd> {
    let relay = env.spawn_relay(&limits()).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = relay.rss_kib();
    let ready = Arc::new(AtomicU64::new(0));
    let converged = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    let mut i = 0;
    while i < count {
        let batch = (count - i).min(200);
        for g in i..i + batch {
            let project = format!("{prefix}{}", g % projects);
            // Members per project: those with the same remainder.
            let members = (count - g % projects).div_ceil(projects);
            tasks.push(tokio::spawn(member(
                relay.addr,
                env.token(&format!("{prefix}m{g}"))?,
                project,
                present,
                members,
                ready.clone(),
                converged.clone(),
                stop.clone(),
            )));
        }
        i += batch;
        let deadline = Instant::now() + SUBSCRIBE_WAIT;
        while ready.load(Relaxed) < i as u64 {
            if Instant::now() > deadline {
                anyhow::bail!("only {} of {i} connections ready", ready.load(Relaxed));
            }
            // A task that failed shows here rather than as a timeout.
            if let Some(k) = tasks.iter().position(|t| t.is_finished()) {
                tasks.swap_remove(k).await??;
                anyhow::bail!("a connection ended while the crowd was gathering");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let connect_s = t0.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(180);
    if present {
        while converged.load(Relaxed) < count as u64 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let converged_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = relay.rss_kib();
    let converged_n = converged.load(Relaxed);
    stop.cancel();
    for t in tasks {
        t.await??;
    }
    relay.terminate()?;
    if present && converged_n < count as u64 {
        anyhow::bail!(
            "only {converged_n} of {count} present connections saw all their project's members within 180 s"
        );
    }
    Ok(Crowd {
        before,
        after,
        added_kib: after.saturating_sub(before) as f64,
        connect_s,
        converged_s,
        converged: converged_n,
    })
}

/// One connection of the memory part: subscribes (watching presence and
/// joining it with a small state when `present`), then reads until `stop`,
/// keeping its project's members from snapshots and diffs.
#[allow(clippy::too_many_arguments)]
async fn member(
    addr: SocketAddr,
    token: String,
    project: String,
    present: bool,
    members: usize,
    ready: Arc<AtomicU64>,
    converged: Arc<AtomicU64>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut ws = ws::connect(addr, &token).await?;
    ws::send_json(
        &mut ws,
        &json!({"action": "subscribe", "project_id": project, "presence": present}),
    )
    .await?;
    loop {
        match ws::next_json(&mut ws, SUBSCRIBE_WAIT).await? {
            Some(f) if f["type"] == "subscribed" => break,
            Some(f) if f["type"] == "error" => anyhow::bail!("subscribing: {f}"),
            Some(_) => continue,
            None => anyhow::bail!("not subscribed within {SUBSCRIBE_WAIT:?}"),
        }
    }
    if present {
        ws::send_json(
            &mut ws,
            &json!({"action": "presence", "project_id": project,
                    "state": {"status": "online", "device": "bench"}}),
        )
        .await?;
    }
    ready.fetch_add(1, Relaxed);
    let mut known: HashSet<String> = HashSet::new();
    let mut done = false;
    loop {
        let m = tokio::select! {
            biased;
            m = ws.next() => m,
            _ = stop.cancelled() => break,
        };
        let text = match m {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("the relay ended a connection"),
        };
        if !present {
            continue;
        }
        let f: Value = serde_json::from_str(&text)?;
        match f["type"].as_str() {
            Some("presence_state") => {
                known = f["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m["user_id"].as_str().map(str::to_string))
                    .collect();
            }
            Some("presence") => {
                let Some(user) = f["user_id"].as_str() else {
                    continue;
                };
                if f["event"] == "leave" {
                    known.remove(user);
                } else {
                    known.insert(user.to_string());
                }
            }
            Some("error") => anyhow::bail!("error frame: {f}"),
            _ => continue,
        }
        let now_done = known.len() >= members;
        if now_done != done {
            if now_done {
                converged.fetch_add(1, Relaxed);
            } else {
                converged.fetch_sub(1, Relaxed);
            }
            done = now_done;
        }
    }
    Ok(())
}

//! What capture costs writers: inserts per second into an uncaptured
//! table, one whose trigger only notifies (the floor of any NOTIFY-based
//! design) and a captured one, with 1 and 8 writers, and where the writers'
//! time goes; then one UPDATE of 10,000 rows, timed until the last
//! subscriber has the last event.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use testkit::ws;
use tokio_postgres::Client;
use tokio_tungstenite::tungstenite::Message;

use crate::env::Env;
use crate::report::{machine, Outcome};
use crate::subscriber::{seq_of, SUBSCRIBE_WAIT};

pub async fn run(env: &Env, seconds: u64) -> anyhow::Result<Outcome> {
    let c = env.client().await?;
    c.batch_execute(
        "CREATE SCHEMA bench;
         CREATE TABLE bench.captured (id bigserial PRIMARY KEY, project_id text NOT NULL, body text NOT NULL);
         CREATE TABLE bench.plain    (id bigserial PRIMARY KEY, project_id text NOT NULL, body text NOT NULL);
         -- The floor of any NOTIFY-based design: no event log, no counter,
         -- just one small notice per row, like the one capture sends.
         CREATE TABLE bench.notified (id bigserial PRIMARY KEY, project_id text NOT NULL, body text NOT NULL);
         CREATE FUNCTION bench.notify_row() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_notify('bench_floor', json_build_object('id', NEW.id, 'project_id', NEW.project_id)::text);
             RETURN NULL;
         END $$;
         CREATE TRIGGER notify_row AFTER INSERT ON bench.notified FOR EACH ROW EXECUTE FUNCTION bench.notify_row();
         SELECT relay.enable('bench.captured', 'row');",
    )
    .await?;
    let mut rows = BTreeMap::new();
    let mut states = BTreeMap::new();
    for writers in [1usize, 8] {
        for table in ["bench.plain", "bench.notified", "bench.captured"] {
            let end = Instant::now() + Duration::from_secs(seconds);
            let sampler = tokio::spawn(sample_waits(env.client().await?, end));
            let mut tasks = Vec::new();
            for w in 0..writers {
                let client = env.client_named(WRITER_APP).await?;
                let sql = format!("INSERT INTO {table} (project_id, body) VALUES ($1, $2)");
                tasks.push(tokio::spawn(async move {
                    let stmt = client.prepare(&sql).await?;
                    let body = "z".repeat(150);
                    let project = format!("p{}", w % 8 + 1);
                    let mut n = 0u64;
                    while Instant::now() < end {
                        client.execute(&stmt, &[&project, &body]).await?;
                        n += 1;
                    }
                    anyhow::Ok(n)
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await??;
            }
            rows.insert(format!("{table}/{writers}"), total as f64 / seconds as f64);
            states.insert(format!("{table}/{writers}"), sampler.await??);
        }
    }
    let notify_lock = |k: &str| {
        states
            .get(k)
            .and_then(|w: &BTreeMap<String, f64>| w.get(NOTIFY_LOCK_WAIT))
            .copied()
            .unwrap_or(0.0)
    };
    let get = |k: &str| rows.get(k).copied().unwrap_or(0.0);
    let r1 = get("bench.captured/1") / get("bench.plain/1").max(1.0);
    let r8 = get("bench.captured/8") / get("bench.plain/8").max(1.0);
    let n1 = get("bench.captured/1") / get("bench.notified/1").max(1.0);
    let n8 = get("bench.captured/8") / get("bench.notified/8").max(1.0);

    // A 10,000-row statement, timed until the last subscriber has the last
    // event.
    c.execute(
        "INSERT INTO chat.projects (id, name) VALUES ('bulk', 'bulk');
",
        &[],
    )
    .await
    .ok();
    let subscribers = 10;
    c.execute(
        "INSERT INTO chat.project_members (project_id, user_id) SELECT 'bulk', 'u' || g FROM generate_series(1, $1::int) g",
        &[&subscribers],
    )
    .await?;
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body) SELECT 'bulk', 'w', 'r' || g FROM generate_series(1, 10000) g",
        &[],
    )
    .await?;
    let mut clients = Vec::new();
    for u in 1..=subscribers {
        let mut ws = ws::connect(env.addr(), &env.token(&format!("u{u}"))?).await?;
        let subscribed = ws::subscribe(&mut ws, "bulk", None, SUBSCRIBE_WAIT).await?;
        let latest = subscribed["seq"].as_u64().unwrap_or(0);
        clients.push((ws, latest));
    }
    let t0 = Instant::now();
    c.execute(
        "UPDATE chat.messages SET status = 'delivered' WHERE project_id = 'bulk'",
        &[],
    )
    .await?;
    let statement_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let waits = clients.into_iter().map(|(mut ws, latest)| async move {
        let target = latest + 10_000;
        while let Some(m) = ws.next().await {
            if let Message::Text(t) = m? {
                if seq_of(&t).is_some_and(|s| s >= target) {
                    break;
                }
            }
        }
        anyhow::Ok(())
    });
    for r in futures_util::future::join_all(waits).await {
        r?;
    }
    let all_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let name = "write-cost".to_string();
    let json = json!({
        "scenario": "write_cost", "seconds_per_run": seconds,
        "inserts_per_s": rows,
        "captured_over_plain_1_writer": (r1 * 1000.0).round() / 1000.0,
        "captured_over_plain_8_writers": (r8 * 1000.0).round() / 1000.0,
        "captured_over_notify_only_1_writer": (n1 * 1000.0).round() / 1000.0,
        "captured_over_notify_only_8_writers": (n8 * 1000.0).round() / 1000.0,
        "writer_time_by_state": states,
        "update_10000_rows_statement_ms": statement_ms.round(),
        "update_10000_rows_until_last_of_10_subscribers_ms": all_ms.round(),
        "machine": machine(),
    });
    let markdown = format!(
        "### Write cost (synchronous_commit = off)\n\n\
         | writers | uncaptured inserts/s | NOTIFY only | captured inserts/s | captured / uncaptured | captured / NOTIFY only |\n\
         | --- | --- | --- | --- | --- | --- |\n\
         | 1 | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |\n| 8 | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |\n\n\
         With 8 writers, the share of writer time spent waiting for NOTIFY's database-wide commit lock \
         (`Lock:object`, sampled from pg_stat_activity every 20 ms): {:.0}% with NOTIFY only, {:.0}% captured, \
         {:.0}% uncaptured.\n\n\
         One UPDATE of 10,000 rows: the statement took {statement_ms:.0} ms; the last of 10 subscribers had the \
         last of the 10,000 events after {all_ms:.0} ms.\n",
        get("bench.plain/1"),
        get("bench.notified/1"),
        get("bench.captured/1"),
        r1,
        n1,
        get("bench.plain/8"),
        get("bench.notified/8"),
        get("bench.captured/8"),
        r8,
        n8,
        notify_lock("bench.notified/8") * 100.0,
        notify_lock("bench.captured/8") * 100.0,
        notify_lock("bench.plain/8") * 100.0,
    );
    Ok(Outcome {
        name,
        json,
        markdown,
        svg: None,
    })
}

/// The application_name of write-cost writers, so the sampler sees only them.
pub const WRITER_APP: &str = "pgrelay_bench_writer";
/// What pg_stat_activity shows for a backend queued on NOTIFY's lock: at
/// commit, a transaction that notified takes a heavyweight lock on
/// database 0, so notifying commits run one at a time, cluster-wide.
pub const NOTIFY_LOCK_WAIT: &str = "Lock:object";

/// Samples what the writers' backends are doing every 20 ms until `end`:
/// the share of samples per state (`CPU` when active and not waiting,
/// `client` when idle between statements, else the wait event).
pub async fn sample_waits(c: Client, end: Instant) -> anyhow::Result<BTreeMap<String, f64>> {
    let stmt = c
        .prepare(
            "SELECT CASE WHEN state = 'idle' THEN 'client'
                         WHEN wait_event IS NULL THEN 'CPU'
                         ELSE wait_event_type || ':' || wait_event END
             FROM pg_stat_activity WHERE application_name = $1",
        )
        .await?;
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut total = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while Instant::now() < end {
        tick.tick().await;
        for row in c.query(&stmt, &[&WRITER_APP]).await? {
            *counts.entry(row.get(0)).or_default() += 1;
            total += 1;
        }
    }
    Ok(counts
        .into_iter()
        .map(|(k, n)| {
            (
                k,
                (n as f64 / total.max(1) as f64 * 1000.0).round() / 1000.0,
            )
        })
        .collect())
}

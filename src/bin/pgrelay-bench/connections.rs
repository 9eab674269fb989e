//! Idle subscribed WebSockets: the relay's resident memory per connection,
//! and how fast connections are opened and subscribed.

use std::time::{Duration, Instant};

use serde_json::json;
use testkit::ws;

use crate::env::Env;
use crate::report::{machine, Outcome};
use crate::subscriber::SUBSCRIBE_WAIT;

pub async fn run(env: &Env, count: usize) -> anyhow::Result<Outcome> {
    let users: Vec<String> = (0..100).map(|i| format!("u{i}")).collect();
    env.seed_projects(100, &users).await?;
    let tokens: Vec<String> = users
        .iter()
        .map(|u| env.token(u))
        .collect::<anyhow::Result<_>>()?;
    let rss_before = env.relay.rss_kib();
    let t0 = Instant::now();
    let mut sockets = Vec::with_capacity(count);
    let mut i = 0;
    while i < count {
        let batch = (count - i).min(200);
        let futs = (i..i + batch).map(|k| {
            let token = &tokens[k % 100];
            let project = format!("p{}", k % 100 + 1);
            async move {
                let mut ws = ws::connect(env.addr(), token).await?;
                // Wait for `subscribed`, so the subscription really exists.
                ws::subscribe(&mut ws, &project, None, SUBSCRIBE_WAIT).await?;
                anyhow::Ok(ws)
            }
        });
        for ws in futures_util::future::join_all(futs).await {
            sockets.push(ws?);
        }
        i += batch;
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = env.relay.rss_kib();
    let per_conn = (rss_after.saturating_sub(rss_before)) as f64 / count as f64;
    drop(sockets);
    let name = format!("connections-{count}");
    let json = json!({
        "scenario": "connections", "connections": count,
        "relay_rss_kib_before": rss_before, "relay_rss_kib_after": rss_after,
        "kib_per_connection": (per_conn * 100.0).round() / 100.0,
        "connect_and_subscribe_per_s": (count as f64 / connect_secs).round(),
        "machine": machine(),
    });
    let markdown = format!(
        "### Connections: {count} idle subscribed WebSockets\n\n\
         Relay RSS {rss_before} KiB before, {rss_after} KiB after: **{per_conn:.1} KiB per connection**; \
         {:.0} connections (handshake + subscribe) per second.\n",
        count as f64 / connect_secs
    );
    Ok(Outcome {
        name,
        json,
        markdown,
        svg: None,
    })
}

//! G10: a subscription narrowed to some resources gets exactly their
//! events, in order, once each, and a `skipped` frame for every range it
//! did not get, so that a gap still means loss (G3 for the filtered view):
//! live, across a resume, a relay restart and a trim `reset`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio_postgres::Client;

/// A second tracked table, `task`, beside chat's `message`.
async fn track_tasks(c: &Client) {
    c.batch_execute(
        "CREATE TABLE public.tasks (id bigserial PRIMARY KEY, project_id text NOT NULL, title text);
         SELECT relay.enable('public.tasks', 'task', 'project_id', 'id');",
    )
    .await
    .expect("tracking public.tasks");
}

/// `n` rounds of one message and two tasks in `project`, each its own
/// transaction.
async fn write_mix(c: &Client, project: &str, n: usize) {
    for i in 0..n {
        c.execute(
            "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ($1, 'ann', $2)",
            &[&project, &format!("m{i}")],
        )
        .await
        .expect("a message");
        c.execute(
            "INSERT INTO public.tasks (project_id, title) VALUES ($1, $2), ($1, $3)",
            &[&project, &format!("t{i}a"), &format!("t{i}b")],
        )
        .await
        .expect("two tasks");
    }
}

async fn latest_seq(c: &Client, project: &str) -> u64 {
    let seq: i64 = c
        .query_one(
            "SELECT coalesce(max(seq), 0) FROM relay.events WHERE scope = $1",
            &[&project],
        )
        .await
        .expect("latest seq")
        .get(0);
    seq as u64
}

/// What a filtered client sees of `project`, checked as the SDK checks it:
/// from `cursor`, every next frame of the project is an event at cursor + 1
/// of one of `resources`, or a `skipped` range starting at the cursor;
/// reads until the cursor reaches `last` and returns the events' seqs and
/// the cursor (seq, timestamp) it ended on.
async fn read_view(
    client: &mut WsClient,
    project: &str,
    resources: &[&str],
    mut cursor: u64,
    last: u64,
) -> (Vec<u64>, Value) {
    let mut seqs = Vec::new();
    let mut timestamp = Value::Null;
    while cursor < last {
        let f = client.next_json(10).await;
        if f["project_id"] != project {
            continue;
        }
        match f["type"].as_str() {
            Some("cache_invalidate") => {
                let seq = f["seq"].as_u64().expect("seq");
                assert_eq!(seq, cursor + 1, "a gap before event {seq}: {f}");
                let resource = f["resource"].as_str().expect("resource");
                assert!(
                    resources.contains(&resource),
                    "{resource} is not in the view: {f}"
                );
                seqs.push(seq);
                cursor = seq;
                timestamp = f["timestamp"].clone();
            }
            Some("skipped") => {
                assert_eq!(
                    f["after"].as_u64(),
                    Some(cursor),
                    "a skip that does not start at the cursor: {f}"
                );
                let seq = f["seq"].as_u64().expect("seq");
                assert!(seq > cursor, "{f}");
                assert!(f["timestamp"].is_string(), "a skip names its event: {f}");
                cursor = seq;
                timestamp = f["timestamp"].clone();
            }
            _ => panic!("unexpected frame in the view of {project}: {f}"),
        }
    }
    assert_eq!(cursor, last, "the view ends at the latest event");
    (seqs, json!({"seq": cursor, "timestamp": timestamp}))
}

/// The seqs of `resource`'s events in `project` after `after`, from the log.
async fn seqs_of(c: &Client, project: &str, resources: &[&str], after: u64) -> Vec<u64> {
    let names: Vec<String> = resources.iter().map(|r| r.to_string()).collect();
    c.query(
        "SELECT seq FROM relay.events WHERE scope = $1 AND resource = ANY($2) AND seq > $3 ORDER BY seq",
        &[&project, &names, &(after as i64)],
    )
    .await
    .expect("the log")
    .iter()
    .map(|r| r.get::<_, i64>(0) as u64)
    .collect()
}

async fn subscribe_view(client: &mut WsClient, request: Value) -> Value {
    client.send_json(request.clone()).await;
    let f = client.next_json(10).await;
    assert_eq!(f["type"], "subscribed", "{request} -> {f}");
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_and_unfiltered_subscriptions_on_one_connection_get_exactly_their_view() {
    let db = TestDb::new().await;
    let c = db.client().await;
    track_tasks(&c).await;
    for p in ["p1", "p2", "p3"] {
        seed_project(&c, p, &["ann"]).await;
    }
    let relay = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let mut starts = Vec::new();
    for (p, resources) in [("p1", json!(["message"])), ("p2", json!(["task"]))] {
        let f = subscribe_view(
            &mut ann,
            json!({"action": "subscribe", "project_id": p, "resources": resources}),
        )
        .await;
        assert_eq!(f["resources"], resources, "{f}");
        assert_eq!(f["untracked"], json!([]), "{f}");
        starts.push(f["seq"].as_u64().expect("seq"));
    }
    let p3 = ann.subscribe("p3", None).await["seq"]
        .as_u64()
        .expect("seq");
    for p in ["p1", "p2", "p3"] {
        write_mix(&c, p, 20).await;
    }
    // One reader: the three views interleave on one socket.
    let mut views: Vec<(Vec<u64>, u64)> = vec![
        (Vec::new(), starts[0]),
        (Vec::new(), starts[1]),
        (Vec::new(), p3),
    ];
    let last: Vec<u64> = vec![
        latest_seq(&c, "p1").await,
        latest_seq(&c, "p2").await,
        latest_seq(&c, "p3").await,
    ];
    let allowed: [&[&str]; 3] = [
        &["message"],
        &["task"],
        &["message", "task", "project", "project_member"],
    ];
    while views
        .iter()
        .zip(&last)
        .any(|((_, cursor), last)| cursor < last)
    {
        let f = ann.next_json(10).await;
        let i = match f["project_id"].as_str() {
            Some("p1") => 0,
            Some("p2") => 1,
            Some("p3") => 2,
            _ => panic!("{f}"),
        };
        let (seqs, cursor) = &mut views[i];
        match f["type"].as_str() {
            Some("cache_invalidate") => {
                let seq = f["seq"].as_u64().expect("seq");
                assert_eq!(seq, *cursor + 1, "a gap: {f}");
                assert!(
                    allowed[i].contains(&f["resource"].as_str().unwrap_or("")),
                    "{f}"
                );
                seqs.push(seq);
                *cursor = seq;
            }
            Some("skipped") => {
                assert_ne!(i, 2, "the unfiltered view skips nothing: {f}");
                assert_eq!(f["after"].as_u64(), Some(*cursor), "{f}");
                *cursor = f["seq"].as_u64().expect("seq");
            }
            _ => panic!("{f}"),
        }
    }
    assert_eq!(views[0].0, seqs_of(&c, "p1", &["message"], starts[0]).await);
    assert_eq!(views[1].0, seqs_of(&c, "p2", &["task"], starts[1]).await);
    assert_eq!(views[0].0.len(), 20);
    assert_eq!(views[1].0.len(), 40);
    assert_eq!(views[2].0.len(), 60, "the unfiltered view gets everything");
    assert!(
        ann.try_next_json(Duration::from_millis(300))
            .await
            .is_none(),
        "nothing after the views ended"
    );
    relay.shutdown().await;
}

/// ann, on a new connection, resumes the `message` view of `p` from
/// `cursor`: exactly the `messages` messages written since, every other seq
/// skipped; returns the cursor the view ends on.
async fn resume_view(
    c: &Client,
    addr: std::net::SocketAddr,
    view: &Value,
    cursor: &Value,
    messages: usize,
) -> Value {
    let mut ann = WsClient::connect(addr, "ann").await;
    let mut resume = view.clone();
    resume["since_seq"] = cursor["seq"].clone();
    resume["since_timestamp"] = cursor["timestamp"].clone();
    subscribe_view(&mut ann, resume).await;
    let at = cursor["seq"].as_u64().expect("seq");
    let last = latest_seq(c, "p").await;
    let (seqs, cursor) = read_view(&mut ann, "p", &["message"], at, last).await;
    assert_eq!(seqs, seqs_of(c, "p", &["message"], at).await);
    assert_eq!(seqs.len(), messages);
    cursor
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_view_resumes_across_a_reconnect_and_a_relay_restart() {
    let db = TestDb::new().await;
    let c = db.client().await;
    track_tasks(&c).await;
    seed_project(&c, "p", &["ann"]).await;
    let relay = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let view = json!({"action": "subscribe", "project_id": "p", "resources": ["message"]});
    let start = subscribe_view(&mut ann, view.clone()).await["seq"]
        .as_u64()
        .expect("seq");
    write_mix(&c, "p", 10).await;
    let last = latest_seq(&c, "p").await;
    let (first, cursor) = read_view(&mut ann, "p", &["message"], start, last).await;
    assert_eq!(first, seqs_of(&c, "p", &["message"], start).await);
    drop(ann);

    // Written while away, then a resume from the cursor the view ended on
    // (which may name a skipped event, not a message).
    write_mix(&c, "p", 10).await;
    let cursor = resume_view(&c, relay.addr, &view, &cursor, 10).await;

    // The relay restarts; more is written meanwhile; resume again.
    relay.shutdown().await;
    write_mix(&c, "p", 5).await;
    let relay = start_relay(relay_config(&db.url)).await;
    resume_view(&c, relay.addr, &view, &cursor, 5).await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_view_behind_trimmed_history_gets_a_reset_then_only_its_resources() {
    let db = TestDb::new().await;
    let c = db.client().await;
    track_tasks(&c).await;
    seed_project(&c, "old", &["ann"]).await;
    write_mix(&c, "old", 20).await;
    c.batch_execute(
        "UPDATE relay.events SET created_at = created_at - interval '1 day' WHERE scope = 'old';
         SELECT relay.trim(10, '1 hour', 1000);",
    )
    .await
    .expect("aging and trimming");
    let latest = latest_seq(&c, "old").await;
    let relay = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    subscribe_view(
        &mut ann,
        json!({"action": "subscribe", "project_id": "old", "resources": ["task"], "since_seq": 3}),
    )
    .await;
    let reset = ann.next_json(10).await;
    assert_eq!(reset["type"], "reset", "{reset}");
    assert_eq!(reset["reason"], "history_trimmed");
    assert_eq!(reset["seq"].as_u64(), Some(latest));
    write_mix(&c, "old", 3).await;
    let last = latest_seq(&c, "old").await;
    let (seqs, _) = read_view(&mut ann, "old", &["task"], latest, last).await;
    assert_eq!(seqs, seqs_of(&c, "old", &["task"], latest).await);
    assert_eq!(seqs.len(), 6);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_may_name_a_resource_nobody_tracks_yet_and_a_bad_one_changes_nothing() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann"]).await;
    let relay = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let f = subscribe_view(
        &mut ann,
        json!({"action": "subscribe", "project_id": "p", "resources": ["message", "note"]}),
    )
    .await;
    assert_eq!(f["untracked"], json!(["note"]), "{f}");
    let start = f["seq"].as_u64().expect("seq");

    // Malformed filters are refused and leave the subscription as it was.
    for resources in [
        json!([]),
        json!("message"),
        json!([1]),
        json!(["no spaces"]),
    ] {
        ann.send_json(json!({"action": "subscribe", "project_id": "p", "resources": resources}))
            .await;
        let e = ann.next_json(5).await;
        assert_eq!(e["code"], "bad_request", "{resources}: {e}");
        assert_eq!(e["project_id"], "p", "{e}");
    }

    // The table is tracked later: its events reach the view, as do
    // messages; nothing else does.
    c.batch_execute(
        "CREATE TABLE public.notes (id bigserial PRIMARY KEY, project_id text NOT NULL, body text);
         SELECT relay.enable('public.notes', 'note', 'project_id', 'id');
         INSERT INTO public.notes (project_id, body) VALUES ('p', 'first note');
         INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('p', 'ann', 'hi');
         INSERT INTO chat.project_members (project_id, user_id) VALUES ('p', 'bob');",
    )
    .await
    .expect("tracking notes, writing");
    let last = latest_seq(&c, "p").await;
    let (seqs, _) = read_view(&mut ann, "p", &["message", "note"], start, last).await;
    assert_eq!(seqs, seqs_of(&c, "p", &["message", "note"], start).await);
    assert_eq!(seqs.len(), 2);
    relay.shutdown().await;
}

//! G9: broadcasts and presence across relays, through Postgres only. Two
//! relays on one database (in process, and as `pgrelay serve` processes
//! where one is killed), real WebSocket clients, the SQL surface.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Reads frames until one of type `kind` arrives; panics after `secs`.
/// Frames of other types are skipped.
async fn next_of(client: &mut WsClient, kind: &str, secs: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.try_next_json(left).await {
            Some(f) if f["type"] == kind => return f,
            Some(_) => continue,
            None => panic!("no {kind} frame within {secs} s"),
        }
    }
}

/// Nothing of type `kind` arrives within `wait` (other frames are
/// skipped).
async fn none_of(client: &mut WsClient, kind: &str, wait: Duration, who: &str) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.try_next_json(left).await {
            Some(f) if f["type"] == kind => panic!("{who} received {f}"),
            Some(_) => continue,
            None => return,
        }
    }
}

async fn subscribe_with_presence(client: &mut WsClient, project: &str) -> Value {
    client
        .send_json(json!({"action": "subscribe", "project_id": project, "presence": true}))
        .await;
    let subscribed = client.next_json(10).await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    let snapshot = next_of(client, "presence_state", 10).await;
    assert_eq!(snapshot["project_id"], project, "{snapshot}");
    snapshot
}

/// Reads frames until one of each of `kinds` arrived, in any order
/// (others are skipped); returns them in the order of `kinds`.
async fn all_of(client: &mut WsClient, kinds: &[&str], secs: u64) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut found: Vec<Option<Value>> = vec![None; kinds.len()];
    while found.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(f) = client.try_next_json(left).await else {
            panic!("within {secs} s, of {kinds:?} only {found:?} arrived");
        };
        if let Some(i) = kinds
            .iter()
            .position(|k| f["type"] == *k)
            .filter(|&i| found[i].is_none())
        {
            found[i] = Some(f);
        }
    }
    found.into_iter().flatten().collect()
}

/// The users a snapshot lists, with their connection counts.
fn members(snapshot: &Value) -> Vec<(String, usize)> {
    snapshot["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["user_id"].as_str().expect("user_id").to_string(),
                m["connections"].as_array().map_or(0, Vec::len),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_reaches_every_member_on_every_relay_and_no_one_else() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann", "bob", "cid"]).await;
    seed_project(&c, "q", &["eve"]).await;
    let r1 = start_relay(relay_config(&db.url)).await;
    let r2 = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(r1.addr, "ann").await;
    let mut cid = WsClient::connect(r1.addr, "cid").await;
    let mut bob = WsClient::connect(r2.addr, "bob").await;
    let mut eve = WsClient::connect(r2.addr, "eve").await;
    ann.subscribe("p", None).await;
    cid.subscribe("p", None).await;
    bob.subscribe("p", None).await;
    eve.subscribe("q", None).await;

    // eve is no member of p: she may neither send to it nor subscribe.
    eve.send_json(json!({"action": "broadcast", "project_id": "p", "event": "spam"}))
        .await;
    let refused = eve.next_json(5).await;
    assert_eq!(refused["code"], "not_subscribed", "{refused}");
    assert_eq!(refused["project_id"], "p", "{refused}");
    eve.send_json(json!({"action": "subscribe", "project_id": "p"}))
        .await;
    assert_eq!(eve.next_json(5).await["code"], "forbidden");

    // A forged "from" is ignored: the relay stamps the token's user.
    let sent = Instant::now();
    ann.send_json(
        json!({"action": "broadcast", "project_id": "p", "event": "typing",
                         "payload": {"draft": "hel"}, "from": "bob", "id": "b1"}),
    )
    .await;
    let ack = next_of(&mut ann, "broadcast_ack", 5).await;
    assert_eq!(
        ack,
        json!({"type": "broadcast_ack", "project_id": "p", "id": "b1"})
    );
    for (who, client) in [("cid on relay 1", &mut cid), ("bob on relay 2", &mut bob)] {
        let got = next_of(client, "broadcast", 5).await;
        assert_eq!(
            got,
            json!({"type": "broadcast", "project_id": "p", "event": "typing", "from": "ann",
                   "payload": {"draft": "hel"}}),
            "{who}"
        );
    }
    println!(
        "a broadcast reached both relays' subscribers in {:?}",
        sent.elapsed()
    );
    // Not the sender (without "self"), not a non-member.
    none_of(&mut ann, "broadcast", Duration::from_millis(500), "ann").await;
    none_of(&mut eve, "broadcast", Duration::from_millis(100), "eve").await;

    // "self": the sender hears it too.
    ann.send_json(
        json!({"action": "broadcast", "project_id": "p", "event": "cursor",
                         "payload": [1, 2], "self": true}),
    )
    .await;
    for client in [&mut ann, &mut cid, &mut bob] {
        let got = next_of(client, "broadcast", 5).await;
        assert_eq!(got["event"], "cursor");
        assert_eq!(got["payload"], json!([1, 2]));
    }

    // From SQL, on any relay: `from` is null (the server).
    c.execute(
        "SELECT relay.broadcast('p', 'ring', '{\"call\": 7}'::jsonb)",
        &[],
    )
    .await
    .expect("relay.broadcast");
    for client in [&mut ann, &mut cid, &mut bob] {
        let got = next_of(client, "broadcast", 5).await;
        assert_eq!(got["event"], "ring");
        assert_eq!(got["from"], Value::Null);
        assert_eq!(got["payload"]["call"], 7);
    }
    none_of(&mut eve, "broadcast", Duration::from_millis(300), "eve").await;

    // Over the limit: a clear error, and it reaches no one.
    let big = "x".repeat(7_000);
    ann.send_json(
        json!({"action": "broadcast", "project_id": "p", "event": "big",
                         "payload": big, "id": "b2"}),
    )
    .await;
    let too_large = next_of(&mut ann, "error", 5).await;
    assert_eq!(too_large["code"], "too_large", "{too_large}");
    assert_eq!(too_large["id"], "b2", "{too_large}");
    let sql_err = c
        .execute(
            "SELECT relay.broadcast('p', 'big', to_jsonb(repeat('x', 7000)))",
            &[],
        )
        .await
        .expect_err("a payload over the limit is refused");
    let message = sql_err.as_db_error().map(|e| e.message().to_string());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("at most 6144")),
        "{sql_err:?}"
    );
    none_of(&mut bob, "broadcast", Duration::from_millis(300), "bob").await;

    // A revoked member stops receiving at once, without reconnecting.
    c.execute(
        "DELETE FROM chat.project_members WHERE project_id = 'p' AND user_id = 'bob'",
        &[],
    )
    .await
    .expect("revoking bob");
    let ended = next_of(&mut bob, "error", 5).await;
    assert_eq!(ended["code"], "forbidden", "{ended}");
    ann.send_json(json!({"action": "broadcast", "project_id": "p", "event": "after"}))
        .await;
    assert_eq!(next_of(&mut cid, "broadcast", 5).await["event"], "after");
    none_of(&mut bob, "broadcast", Duration::from_millis(500), "bob").await;
    bob.send_json(json!({"action": "broadcast", "project_id": "p", "event": "x"}))
        .await;
    assert_eq!(
        next_of(&mut bob, "error", 5).await["code"],
        "not_subscribed"
    );

    let metrics = http_get(r1.addr, "/metrics").await;
    for line in [
        "pgrelay_broadcasts_in_total 3",
        "pgrelay_broadcasts_refused_total 1",
    ] {
        assert!(metrics.contains(line), "{line} missing in\n{metrics}");
    }
    r1.shutdown().await;
    r2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_joins_updates_and_leaves_across_relays_with_several_tabs() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann", "bob"]).await;
    let r1 = start_relay(relay_config(&db.url)).await;
    let r2 = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(r1.addr, "ann").await;
    let mut bob = WsClient::connect(r2.addr, "bob").await;
    assert_eq!(members(&subscribe_with_presence(&mut ann, "p").await), []);
    assert_eq!(members(&subscribe_with_presence(&mut bob, "p").await), []);

    let sent = Instant::now();
    ann.send_json(json!({"action": "presence", "project_id": "p", "state": {"status": "online"}}))
        .await;
    // The reply and the diff come by different paths, in either order.
    let own = all_of(&mut ann, &["presence_joined", "presence"], 5).await;
    let ann_tab1 = own[0]["connection"]
        .as_str()
        .expect("connection")
        .to_string();
    // The watcher that joined sees itself too.
    assert_eq!(own[1]["event"], "join", "{}", own[1]);
    let seen = next_of(&mut bob, "presence", 5).await;
    println!("a join was seen on the other relay in {:?}", sent.elapsed());
    assert_eq!(
        seen,
        json!({"type": "presence", "project_id": "p", "event": "join", "user_id": "ann",
               "connections": [{"connection": ann_tab1, "state": {"status": "online"}}]})
    );

    // A second tab of ann, on the other relay: one user, two connections.
    let mut ann2 = WsClient::connect(r2.addr, "ann").await;
    let snapshot = subscribe_with_presence(&mut ann2, "p").await;
    assert_eq!(members(&snapshot), [("ann".to_string(), 1)]);
    ann2.send_json(json!({"action": "presence", "project_id": "p", "state": {"status": "away"}}))
        .await;
    let update = next_of(&mut bob, "presence", 5).await;
    assert_eq!(update["event"], "update", "{update}");
    assert_eq!(update["user_id"], "ann");
    assert_eq!(update["connections"].as_array().map(Vec::len), Some(2));

    // The database says the same, for backend code and psql.
    let online: Vec<(String, i64)> = c
        .query(
            "SELECT user_id, count(*) FROM relay.presence WHERE scope = 'p' GROUP BY 1",
            &[],
        )
        .await
        .expect("relay.presence")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(online, [("ann".to_string(), 2)]);

    // An update of one tab's state.
    ann.send_json(json!({"action": "presence", "project_id": "p", "state": {"status": "typing"}}))
        .await;
    let update = next_of(&mut bob, "presence", 5).await;
    assert_eq!(update["event"], "update");
    let states: Vec<&Value> = update["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .map(|c| &c["state"]["status"])
        .collect();
    assert!(states.contains(&&json!("typing")), "{update}");

    // One tab closes: still present; the other leaves: gone.
    drop(ann2);
    let update = next_of(&mut bob, "presence", 5).await;
    assert_eq!(update["event"], "update", "{update}");
    assert_eq!(update["connections"].as_array().map(Vec::len), Some(1));
    ann.send_json(json!({"action": "presence_leave", "project_id": "p"}))
        .await;
    let left = next_of(&mut bob, "presence", 5).await;
    assert_eq!(
        left,
        json!({"type": "presence", "project_id": "p", "event": "leave", "user_id": "ann",
               "connections": []})
    );

    // ann watches too: she sees her own diffs (the join, the update, the
    // tab's update and her leave).
    // (Replies come by the writer, diffs by the channel: in either order.)
    let mut diffs = Vec::new();
    let mut left_reply = false;
    while diffs.len() < 4 || !left_reply {
        let f = ann.next_json(5).await;
        match f["type"].as_str() {
            Some("presence") => diffs.push(f["event"].as_str().unwrap_or("?").to_string()),
            Some("presence_left") => left_reply = true,
            _ => {}
        }
    }
    assert_eq!(diffs, ["update", "update", "update", "leave"]);

    // Revocation takes a member out of presence for everyone.
    bob.send_json(json!({"action": "presence", "project_id": "p", "state": {}}))
        .await;
    assert_eq!(next_of(&mut ann, "presence", 5).await["event"], "join");
    c.execute(
        "DELETE FROM chat.project_members WHERE project_id = 'p' AND user_id = 'bob'",
        &[],
    )
    .await
    .expect("revoking bob");
    let left = next_of(&mut ann, "presence", 5).await;
    assert_eq!(left["event"], "leave", "{left}");
    assert_eq!(left["user_id"], "bob");

    // A member who reconnects gets the right snapshot.
    ann.send_json(json!({"action": "presence", "project_id": "p", "state": {"n": 1}}))
        .await;
    next_of(&mut ann, "presence_joined", 5).await;
    drop(ann);
    let mut again = WsClient::connect(r2.addr, "ann").await;
    // ann's only connection went away with her socket.
    let mut snapshot = subscribe_with_presence(&mut again, "p").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !members(&snapshot).is_empty() && Instant::now() < deadline {
        // The leave may still be on its way: then a diff follows.
        let diff = next_of(&mut again, "presence", 5).await;
        assert_eq!(diff["event"], "leave", "{diff}");
        snapshot = json!({"members": []});
    }
    assert_eq!(members(&snapshot), []);
    r1.shutdown().await;
    r2.shutdown().await;
}

/// A `pgrelay serve` process named `relay-a` with this presence timeout,
/// where ann is present in p, as `watcher` (of p's presence) has seen;
/// with ann's connection, which must stay open.
async fn present_on_a_relay_process(
    url: &str,
    timeout: &str,
    watcher: &mut WsClient,
) -> (RelayProcess, WsClient) {
    let flags = ["--presence-timeout", timeout, "--instance", "relay-a"];
    let relay = spawn_relay_process(url, &flags).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    subscribe_with_presence(&mut ann, "p").await;
    ann.send_json(json!({"action": "presence", "project_id": "p", "state": {}}))
        .await;
    assert_eq!(next_of(watcher, "presence", 5).await["event"], "join");
    (relay, ann)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relays_members_leave_within_the_bound_and_a_restart_leaves_no_ghosts() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann", "bob"]).await;
    let timeout = Duration::from_secs(3);
    let mut watcher_config = relay_config(&db.url);
    watcher_config.presence_timeout = timeout;
    let r2 = start_relay(watcher_config).await;
    let mut bob = WsClient::connect(r2.addr, "bob").await;
    subscribe_with_presence(&mut bob, "p").await;

    let (r1, _ann) = present_on_a_relay_process(&db.url, "3s", &mut bob).await;
    // SIGKILL: no goodbye, no lease renewal.
    r1.kill().expect("SIGKILL");
    let killed = Instant::now();
    let left = next_of(&mut bob, "presence", 10).await;
    let took = killed.elapsed();
    assert_eq!(left["event"], "leave", "{left}");
    assert_eq!(left["user_id"], "ann");
    println!("a SIGKILLed relay's member left for everyone after {took:?} (bound {timeout:?})");
    assert!(
        took <= timeout + Duration::from_secs(1),
        "left after {took:?}; the bound is {timeout:?}"
    );

    // Killed again, and restarted at once under the same name: its members
    // go as soon as the new relay starts, long before the lease would run
    // out (here 60 s).
    let (r1, _ann) = present_on_a_relay_process(&db.url, "60s", &mut bob).await;
    r1.kill().expect("SIGKILL");
    let restarted = Instant::now();
    let r1 = spawn_relay_process(&db.url, &["--instance", "relay-a"]).await;
    let left = next_of(&mut bob, "presence", 10).await;
    assert_eq!(left["event"], "leave", "{left}");
    println!(
        "a restarted relay took its predecessor's members away {:?} after it was started",
        restarted.elapsed()
    );
    // No ghosts: not in the database, not in a new watcher's snapshot.
    let present: i64 = c
        .query_one("SELECT count(*) FROM relay.presence WHERE scope = 'p'", &[])
        .await
        .expect("relay.presence")
        .get(0);
    assert_eq!(present, 0);
    let mut late = WsClient::connect(r1.addr, "bob").await;
    assert_eq!(members(&subscribe_with_presence(&mut late, "p").await), []);
    r2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_are_bounded_and_bad_ones_change_nothing() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann", "bob"]).await;
    let mut config = relay_config(&db.url);
    config.project_signals_per_second = 5;
    let relay = start_relay(config).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let mut bob = WsClient::connect(relay.addr, "bob").await;
    ann.subscribe("p", None).await;
    subscribe_with_presence(&mut bob, "p").await;

    for (frame, code) in [
        (
            json!({"action": "broadcast", "project_id": "other", "event": "e"}),
            "not_subscribed",
        ),
        (
            json!({"action": "broadcast", "project_id": "p"}),
            "bad_request",
        ),
        (
            json!({"action": "broadcast", "project_id": "p", "event": ""}),
            "bad_request",
        ),
        (
            json!({"action": "broadcast", "project_id": "p", "event": "e", "self": 1}),
            "bad_request",
        ),
        (
            json!({"action": "presence", "project_id": "p", "state": [1]}),
            "bad_request",
        ),
        (
            json!({"action": "presence", "project_id": "p", "state": {"s": "x".repeat(2000)}}),
            "too_large",
        ),
        (
            json!({"action": "presence", "project_id": "other", "state": {}}),
            "not_subscribed",
        ),
    ] {
        ann.send_json(frame.clone()).await;
        let error = ann.next_json(5).await;
        assert_eq!(error["type"], "error", "{frame} -> {error}");
        assert_eq!(error["code"], code, "{frame} -> {error}");
    }
    // Nothing of that reached bob or the database.
    none_of(&mut bob, "broadcast", Duration::from_millis(300), "bob").await;
    let rows: i64 = c
        .query_one("SELECT count(*) FROM relay.presence", &[])
        .await
        .expect("relay.presence")
        .get(0);
    assert_eq!(rows, 0);

    // The project's rate: 5 per second, 10 at once. 30 sent at once get
    // 10 (or 11, if a token came back meanwhile) acks and the rest refused.
    for i in 0..30 {
        ann.send_json(
            json!({"action": "broadcast", "project_id": "p", "event": "burst",
                             "id": format!("n{i}")}),
        )
        .await;
    }
    let (mut acks, mut limited) = (0, 0);
    while acks + limited < 30 {
        let f = ann.next_json(5).await;
        match (f["type"].as_str(), f["code"].as_str()) {
            (Some("broadcast_ack"), _) => acks += 1,
            (Some("error"), Some("rate_limited")) => limited += 1,
            other => panic!("unexpected {other:?}: {f}"),
        }
    }
    assert!((10..=11).contains(&acks), "{acks} acks, {limited} refused");
    let mut received = 0;
    while let Some(f) = bob.try_next_json(Duration::from_millis(500)).await {
        if f["type"] == "broadcast" {
            received += 1;
        }
    }
    assert_eq!(received, acks, "bob got every accepted broadcast, once");
    relay.shutdown().await;
}

/// Diffs sent while a relay's LISTEN connection is down are lost to it;
/// once it is back, its mirrors load again and every watcher gets a fresh
/// snapshot, so presence converges anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_heals_after_the_listen_connection_comes_back() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann", "bob"]).await;
    let r1 = start_relay(relay_config(&db.url)).await;
    let r2 = start_relay(relay_config(&db.url)).await;
    let mut bob = WsClient::connect(r1.addr, "bob").await;
    subscribe_with_presence(&mut bob, "p").await;
    let mut ann = WsClient::connect(r2.addr, "ann").await;
    ann.subscribe("p", None).await;
    ann.send_json(json!({"action": "presence", "project_id": "p", "state": {"v": 1}}))
        .await;
    assert_eq!(next_of(&mut bob, "presence", 5).await["event"], "join");

    // Every relay's LISTEN connection goes; ann's update is written at once.
    assert_eq!(
        terminate_listeners(&c).await,
        2,
        "both relays' LISTEN connections"
    );
    ann.send_json(json!({"action": "presence", "project_id": "p", "state": {"v": 2}}))
        .await;
    // Whether r1 heard the diff or not, it reloads once LISTEN is proven
    // again and bob gets a snapshot that holds ann's latest state.
    let snapshot = next_of(&mut bob, "presence_state", 15).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut state = snapshot["members"][0]["connections"][0]["state"]["v"].clone();
    while state != json!(2) && Instant::now() < deadline {
        let f = next_of(&mut bob, "presence", 10).await;
        state = f["connections"][0]["state"]["v"].clone();
    }
    assert_eq!(state, json!(2), "bob ends with ann's latest state");
    r1.shutdown().await;
    r2.shutdown().await;
}

/// A relay alive but cut off long enough to lose its lease has its members
/// taken out by another relay's sweep; once it reaches the database again
/// it finds out (the heartbeat's count) and writes them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_lost_its_lease_while_alive_writes_its_members_back() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann", "bob"]).await;
    let mut config = relay_config(&db.url);
    config.presence_timeout = Duration::from_secs(3);
    let r1 = start_relay(config.clone()).await;
    let r2 = start_relay(config).await;
    let mut bob = WsClient::connect(r1.addr, "bob").await;
    subscribe_with_presence(&mut bob, "p").await;
    let mut ann = WsClient::connect(r2.addr, "ann").await;
    ann.subscribe("p", None).await;
    ann.send_json(json!({"action": "presence", "project_id": "p", "state": {}}))
        .await;
    assert_eq!(next_of(&mut bob, "presence", 5).await["event"], "join");

    // As if r2 had missed its renewals: its lease ends and a sweep runs.
    c.batch_execute(
        "UPDATE relay.relays SET expires_at = now() - interval '1 second'
         WHERE relay_id = (SELECT relay_id FROM relay.presence_members WHERE user_id = 'ann');
         SELECT relay.presence_sweep();",
    )
    .await
    .expect("ending r2's lease");
    let left = next_of(&mut bob, "presence", 5).await;
    assert_eq!(left["event"], "leave", "{left}");
    // r2's next heartbeat (every second here) sees the database hold none
    // of its members and writes ann back.
    let back = next_of(&mut bob, "presence", 5).await;
    assert_eq!(back["event"], "join", "{back}");
    assert_eq!(back["user_id"], "ann");
    r1.shutdown().await;
    r2.shutdown().await;
}

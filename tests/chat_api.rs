//! The chat HTTP API over real HTTP and a real Postgres: every endpoint's
//! happy path and error statuses, the races it must survive (idempotent
//! sends, compare-and-swap edits, edits racing a membership removal), keyset
//! paging under inserts, and writes that look the same to subscribers
//! whether they came through the API or psql.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

async fn setup(members: &[&str]) -> (TestDb, tokio_postgres::Client, pgrelay::server::RelayHandle) {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", members).await;
    c.execute(
        "UPDATE chat.project_members SET role = 'owner' WHERE user_id = 'ann'",
        &[],
    )
    .await
    .expect("owner");
    let relay = start_relay(relay_config(&db.url)).await;
    (db, c, relay)
}

fn send_body(text: &str, id: &str) -> String {
    json!({"body": text, "client_generated_id": id}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_happy_path_and_error_statuses() {
    let (_db, c, relay) = setup(&["ann", "bob", "cat"]).await;
    let a = relay.addr;

    // Auth.
    assert_eq!(http_json(a, "GET", "/v1/projects", None, None).await.0, 401);
    let (s, b) = http_json(a, "GET", "/v1/projects", Some("ann"), None).await;
    assert_eq!(s, 200);
    assert_eq!(b["projects"][0]["id"], "p");
    assert_eq!(b["projects"][0]["role"], "owner");

    // Send: 201, then the retry 200 with the same message.
    let (s, first) = http_json(
        a,
        "POST",
        "/v1/projects/p/messages",
        Some("bob"),
        Some(&send_body("hi", "c1")),
    )
    .await;
    assert_eq!(s, 201, "{first}");
    assert_eq!(first["created"], true);
    let (s, again) = http_json(
        a,
        "POST",
        "/v1/projects/p/messages",
        Some("bob"),
        Some(&send_body("hi", "c1")),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(again["message"], first["message"]);
    let id = first["message"]["id"].as_str().expect("id").to_string();
    for (body, field) in [
        (json!({"client_generated_id": "x"}).to_string(), "body"),
        (
            json!({"body": "", "client_generated_id": "x"}).to_string(),
            "body",
        ),
        (json!({"body": "x"}).to_string(), "client_generated_id"),
        (
            json!({"body": 7, "client_generated_id": "x"}).to_string(),
            "body",
        ),
    ] {
        let (s, e) = http_json(
            a,
            "POST",
            "/v1/projects/p/messages",
            Some("bob"),
            Some(&body),
        )
        .await;
        assert_eq!(
            (s, e["error"]["field"].as_str()),
            (400, Some(field)),
            "{body}: {e}"
        );
    }
    assert_eq!(
        http_json(
            a,
            "POST",
            "/v1/projects/p/messages",
            Some("bob"),
            Some("{nope")
        )
        .await
        .1["error"]["code"],
        "bad_json"
    );
    let big = send_body(&"x".repeat(70_000), "big");
    assert_eq!(
        http_json(
            a,
            "POST",
            "/v1/projects/p/messages",
            Some("bob"),
            Some(&big)
        )
        .await
        .0,
        413
    );
    assert_eq!(
        http_json(
            a,
            "POST",
            "/v1/projects/p/messages",
            Some("eve"),
            Some(&send_body("x", "e"))
        )
        .await
        .0,
        403
    );

    // Edit: CAS on version, sender only.
    let patch = |v: i64, text: &str| json!({"body": text, "version": v}).to_string();
    let path = format!("/v1/messages/{id}");
    let (s, e) = http_json(a, "PATCH", &path, Some("bob"), Some(&patch(1, "edited"))).await;
    assert_eq!(s, 200, "{e}");
    assert_eq!(e["message"]["version"], 2);
    assert_eq!(e["message"]["body"], "edited");
    let (s, e) = http_json(a, "PATCH", &path, Some("bob"), Some(&patch(1, "stale"))).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("version_conflict"))
    );
    assert_eq!(
        http_json(a, "PATCH", &path, Some("cat"), Some(&patch(2, "not mine")))
            .await
            .0,
        403
    );
    assert_eq!(
        http_json(
            a,
            "PATCH",
            "/v1/messages/nope",
            Some("bob"),
            Some(&patch(1, "x"))
        )
        .await
        .0,
        404
    );
    let (s, e) = http_json(
        a,
        "PATCH",
        &path,
        Some("bob"),
        Some(&json!({"body": "x"}).to_string()),
    )
    .await;
    assert_eq!((s, e["error"]["field"].as_str()), (400, Some("version")));

    // Marks, unread, latest.
    let (s, u) = http_json(a, "GET", "/v1/projects/p/unread", Some("cat"), None).await;
    assert_eq!((s, u["unread"].as_i64()), (200, Some(1)));
    let (s, l) = http_json(a, "GET", "/v1/projects/p/latest_seq", Some("cat"), None).await;
    assert_eq!((s, l["latest_seq"].as_i64()), (200, Some(1)));
    let (s, m) = http_json(
        a,
        "POST",
        "/v1/projects/p/delivered",
        Some("cat"),
        Some(r#"{"up_to_seq":1}"#),
    )
    .await;
    assert_eq!((s, m["changed"].as_i64()), (200, Some(1)));
    let (s, m) = http_json(
        a,
        "POST",
        "/v1/projects/p/read",
        Some("cat"),
        Some(r#"{"up_to_seq":1}"#),
    )
    .await;
    assert_eq!((s, m["changed"].as_i64()), (200, Some(1)));
    assert_eq!(
        http_json(a, "GET", "/v1/projects/p/unread", Some("cat"), None)
            .await
            .1["unread"],
        0
    );
    let (s, e) = http_json(a, "POST", "/v1/projects/p/read", Some("cat"), Some(r#"{}"#)).await;
    assert_eq!((s, e["error"]["field"].as_str()), (400, Some("up_to_seq")));
    assert_eq!(
        http_json(a, "GET", "/v1/projects/p/unread", Some("eve"), None)
            .await
            .0,
        403
    );

    // Pages.
    let (s, page) = http_json(
        a,
        "GET",
        "/v1/projects/p/messages?limit=10",
        Some("cat"),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(1));
    assert_eq!(page["has_more"], false);
    for q in ["limit=0", "limit=201", "limit=x", "before_seq=-1"] {
        let (s, e) = http_json(
            a,
            "GET",
            &format!("/v1/projects/p/messages?{q}"),
            Some("cat"),
            None,
        )
        .await;
        assert_eq!(s, 400, "{q}: {e}");
        assert!(e["error"]["field"].is_string());
    }

    // Delete: CAS, sender or owner, then gone.
    assert_eq!(
        http_json(a, "DELETE", &format!("{path}?version=1"), Some("bob"), None)
            .await
            .0,
        409
    );
    assert_eq!(
        http_json(a, "DELETE", &path, Some("cat"), None).await.0,
        403
    );
    let (s, d) = http_json(a, "DELETE", &format!("{path}?version=2"), Some("ann"), None).await;
    assert_eq!(s, 200, "the owner may delete: {d}");
    assert!(d["message"]["deleted_at"].is_string());
    assert_eq!(
        http_json(a, "DELETE", &path, Some("bob"), None).await.0,
        404
    );

    // Routing.
    assert_eq!(
        http_json(a, "GET", "/v1/nothing", Some("ann"), None)
            .await
            .0,
        404
    );
    assert_eq!(
        http_json(a, "PUT", "/v1/projects", Some("ann"), None)
            .await
            .0,
        405
    );

    // A 500 says nothing of its cause.
    c.batch_execute("DROP FUNCTION chat.unread_count(text, text)")
        .await
        .expect("break it");
    let (s, e) = http_json(a, "GET", "/v1/projects/p/unread", Some("cat"), None).await;
    assert_eq!(s, 500);
    assert_eq!(
        e,
        json!({"error": {"code": "internal", "message": "internal error"}})
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests_get_429() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann"]).await;
    let mut config = relay_config(&db.url);
    // A burst of 2, then one request a second: 8 requests in well under a
    // second are 2 answered and 6 refused, in that order.
    config.api_requests_per_second = 1;
    let relay = start_relay(config).await;
    let mut statuses = Vec::new();
    let mut refusal = serde_json::Value::Null;
    let t0 = std::time::Instant::now();
    for _ in 0..8 {
        let (status, body) = http_json(relay.addr, "GET", "/v1/projects", Some("ann"), None).await;
        if status == 429 {
            refusal = body;
        }
        statuses.push(status);
    }
    let took = t0.elapsed();
    assert_eq!(
        statuses,
        [200, 200, 429, 429, 429, 429, 429, 429],
        "a burst of 2, the rest refused (8 requests in {took:?}; a token comes back each second)"
    );
    assert_eq!(refusal["error"]["code"], "rate_limited", "{refusal}");
    // Another user has a budget of their own.
    assert_eq!(
        http_json(relay.addr, "GET", "/v1/projects", Some("bob"), None)
            .await
            .0,
        200
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_retries_make_one_row_one_event_and_one_answer() {
    let (_db, c, relay) = setup(&["ann", "bob"]).await;
    let mut ws = WsClient::connect(relay.addr, "ann").await;
    let start = ws.subscribe("p", None).await["seq"].as_u64().expect("seq");
    let body = send_body("only once", "retry-1");
    let sends: Vec<_> = (0..20)
        .map(|_| {
            http_json(
                relay.addr,
                "POST",
                "/v1/projects/p/messages",
                Some("bob"),
                Some(&body),
            )
        })
        .collect();
    let results = futures_util::future::join_all(sends).await;
    let created = results.iter().filter(|(s, _)| *s == 201).count();
    let replayed = results.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(
        (created, replayed),
        (1, 19),
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    let messages: Vec<&Value> = results.iter().map(|(_, b)| &b["message"]).collect();
    assert!(
        messages.iter().all(|m| *m == messages[0]),
        "all 20 got the same message"
    );
    let rows: i64 = c
        .query_one(
            "SELECT count(*) FROM chat.messages WHERE client_generated_id = 'retry-1'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 1);
    let events = ws.events_until("p", start + 1, 10).await;
    assert_eq!(events, vec![start + 1]);
    assert!(
        ws.try_next_json(Duration::from_millis(500)).await.is_none(),
        "one event, not more"
    );
    println!("idempotency race: 20 concurrent POSTs -> {created} x 201, {replayed} x 200, rows 1, events 1");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_of_one_version_give_exactly_one_success() {
    let (_db, _c, relay) = setup(&["ann", "bob"]).await;
    let (_, sent) = http_json(
        relay.addr,
        "POST",
        "/v1/projects/p/messages",
        Some("bob"),
        Some(&send_body("v1", "e1")),
    )
    .await;
    let path = format!(
        "/v1/messages/{}",
        sent["message"]["id"].as_str().expect("id")
    );
    let edits: Vec<_> = (0..10)
        .map(|i| {
            let body = json!({"body": format!("edit {i}"), "version": 1}).to_string();
            let path = path.clone();
            let addr = relay.addr;
            async move {
                http_json(addr, "PATCH", &path, Some("bob"), Some(&body))
                    .await
                    .0
            }
        })
        .collect();
    let statuses = futures_util::future::join_all(edits).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let conflicts = statuses.iter().filter(|s| **s == 409).count();
    assert_eq!((ok, conflicts), (1, 9), "{statuses:?}");
    println!("CAS race: 10 concurrent edits of version 1 -> {ok} x 200, {conflicts} x 409");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_racing_a_membership_removal_commits_before_it_or_is_refused() {
    let (db, c, relay) = setup(&["ann", "bob"]).await;
    let (_, sent) = http_json(
        relay.addr,
        "POST",
        "/v1/projects/p/messages",
        Some("bob"),
        Some(&send_body("v1", "t1")),
    )
    .await;
    let id = sent["message"]["id"].as_str().expect("id").to_string();

    // Removal first (uncommitted): the edit waits for it, then is refused.
    let mut remover = db.client().await;
    let tx = remover.transaction().await.expect("begin");
    tx.execute(
        "DELETE FROM chat.project_members WHERE project_id = 'p' AND user_id = 'bob'",
        &[],
    )
    .await
    .expect("remove");
    let addr = relay.addr;
    let path = format!("/v1/messages/{id}");
    let edit = tokio::spawn(async move {
        http_json(
            addr,
            "PATCH",
            &path,
            Some("bob"),
            Some(&json!({"body": "late", "version": 1}).to_string()),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!edit.is_finished(), "the edit waits on the removal's lock");
    tx.commit().await.expect("commit removal");
    let (status, _) = edit.await.expect("edit task");
    assert_eq!(status, 403, "an edit after a committed removal is refused");

    // Edit first (uncommitted, by SQL): the removal waits, so the edit
    // commits before it, and its event comes first.
    c.execute(
        "INSERT INTO chat.project_members (project_id, user_id) VALUES ('p', 'bob')",
        &[],
    )
    .await
    .expect("re-add");
    let mut editor = db.client().await;
    let tx = editor.transaction().await.expect("begin");
    tx.query_one("SELECT chat.edit_message($1, 'bob', 'in time', 1)", &[&id])
        .await
        .expect("edit");
    let remove = {
        let remover = db.client().await;
        tokio::spawn(async move {
            remover
                .execute(
                    "DELETE FROM chat.project_members WHERE project_id = 'p' AND user_id = 'bob'",
                    &[],
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !remove.is_finished(),
        "the removal waits on the edit's lock"
    );
    tx.commit().await.expect("commit edit");
    remove.await.expect("remove task").expect("remove");
    let order: Vec<(i64, String)> = c
        .query(
            "SELECT seq, resource FROM relay.events WHERE scope = 'p'
               AND ((resource = 'message' AND action = 'UPDATE') OR (resource = 'project_member' AND action = 'DELETE'))
             ORDER BY seq",
            &[],
        )
        .await
        .expect("events")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let kinds: Vec<&str> = order.iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(
        kinds,
        vec!["project_member", "message", "project_member"],
        "{order:?}"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyset_pages_return_each_message_once_while_new_ones_arrive() {
    let (db, c, relay) = setup(&["ann", "bob"]).await;
    c.execute(
        "INSERT INTO chat.messages (project_id, sender_id, body)
         SELECT 'p', 'bob', 'old ' || g FROM generate_series(1, 1000) g",
        &[],
    )
    .await
    .expect("seed");
    let inserter = {
        let client = db.client().await;
        tokio::spawn(async move {
            for i in 0..200 {
                client
                    .execute(
                        "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('p', 'bob', $1)",
                        &[&format!("new {i}")],
                    )
                    .await
                    .expect("insert");
            }
        })
    };
    let mut seqs = Vec::new();
    let mut before: Option<i64> = None;
    let mut pages = 0;
    loop {
        let path = match before {
            Some(b) => format!("/v1/projects/p/messages?limit=50&before_seq={b}"),
            None => "/v1/projects/p/messages?limit=50".to_string(),
        };
        let (s, page) = http_json(relay.addr, "GET", &path, Some("ann"), None).await;
        assert_eq!(s, 200, "{page}");
        pages += 1;
        let batch: Vec<i64> = page["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["seq"].as_i64().expect("seq"))
            .collect();
        seqs.extend(&batch);
        if page["has_more"] == false {
            break;
        }
        before = page["next_before_seq"].as_i64();
        assert!(before.is_some());
    }
    inserter.await.expect("inserter");
    assert!(
        seqs.windows(2).all(|w| w[0] > w[1]),
        "strictly newest first, no repeats"
    );
    let old: Vec<i64> = seqs.iter().copied().filter(|s| *s <= 1000).collect();
    assert_eq!(
        old,
        (1..=1000).rev().collect::<Vec<_>>(),
        "each of the 1,000 exactly once"
    );
    println!(
        "keyset paging: {pages} pages, {} messages ({} arrived meanwhile), each once, in order",
        seqs.len(),
        seqs.len() - 1000
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_the_api_and_through_psql_look_the_same_to_subscribers() {
    let (_db, c, relay) = setup(&["ann", "bob"]).await;
    let mut ws = WsClient::connect(relay.addr, "ann").await;
    let start = ws.subscribe("p", None).await["seq"].as_u64().expect("seq");
    http_json(
        relay.addr,
        "POST",
        "/v1/projects/p/messages",
        Some("bob"),
        Some(&send_body("by api", "a1")),
    )
    .await;
    c.query_one("SELECT chat.send_message('p', 'bob', 'by psql', 'q1')", &[])
        .await
        .expect("send by SQL");
    let api = ws.next_json(10).await;
    let sql = ws.next_json(10).await;
    assert_eq!(api["seq"], start + 1);
    assert_eq!(sql["seq"], start + 2);
    let keys = |v: &Value| {
        let mut k: Vec<String> = v["data"]
            .as_object()
            .expect("data")
            .keys()
            .cloned()
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys(&api), keys(&sql));
    for f in ["type", "resource", "action"] {
        assert_eq!(api[f], sql[f]);
    }
    relay.shutdown().await;
}

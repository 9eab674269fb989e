//! G10: columns chosen in SQL at capture never reach a client. A table
//! tracked with a deny-list, then switched to id-only events while the
//! relay runs: live frames, the notices on the channel and frames read back
//! from the log on a resume carry only what was chosen, and the switch
//! takes effect for the next event with no relay restart.

mod common;

use common::*;
use serde_json::{json, Value};

/// The next frame of `project`, skipping others.
async fn next_event(client: &mut WsClient, project: &str) -> Value {
    loop {
        let f = client.next_json(10).await;
        if f["project_id"] == project {
            assert_eq!(f["type"], "cache_invalidate", "{f}");
            return f;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn left_out_columns_reach_no_frame_notice_or_resume_and_a_new_choice_applies_live() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE public.accounts (id bigserial PRIMARY KEY, project_id text NOT NULL,
                                       name text, pw_hash text);
         SELECT relay.enable('public.accounts', 'account',
                             p_exclude_columns => ARRAY['pw_hash']);",
    )
    .await
    .expect("tracking public.accounts with a deny-list");
    seed_project(&c, "p", &["ann"]).await;
    let channel: String = c
        .query_one("SELECT relay.channel()", &[])
        .await
        .expect("the channel")
        .get(0);
    let mut notices = Notices::listen(&db.url, &channel).await;
    let relay = start_relay(relay_config(&db.url)).await;
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let start = ann.subscribe("p", None).await["seq"].as_u64().expect("seq");

    // Deny-list: the row without its hash.
    c.execute(
        "INSERT INTO public.accounts (project_id, name, pw_hash) VALUES ('p', 'ann', 'SECRET-1')",
        &[],
    )
    .await
    .expect("an account");
    let f = next_event(&mut ann, "p").await;
    assert_eq!(f["seq"].as_u64(), Some(start + 1), "{f}");
    assert_eq!(f["resource"], "account");
    let id = f["id"].clone();
    assert_eq!(
        f["data"],
        json!({"id": id.as_str().and_then(|s| s.parse::<i64>().ok()), "project_id": "p", "name": "ann"}),
        "the deny-list's data: {f}"
    );

    // A change of the hash alone is no event; the next change is start + 2.
    c.batch_execute(
        "UPDATE public.accounts SET pw_hash = 'SECRET-2';
         UPDATE public.accounts SET name = 'ann2';",
    )
    .await
    .expect("two updates");
    let f = next_event(&mut ann, "p").await;
    assert_eq!(f["seq"].as_u64(), Some(start + 2), "{f}");
    assert_eq!(f["action"], "UPDATE");
    assert_eq!(f["data"]["name"], "ann2", "{f}");

    // Id-only from now on, while the relay runs.
    c.batch_execute(
        "SELECT relay.enable('public.accounts', 'account', p_row_data => false);
         INSERT INTO public.accounts (project_id, name, pw_hash) VALUES ('p', 'bob', 'SECRET-3');",
    )
    .await
    .expect("id-only, then an insert");
    let f = next_event(&mut ann, "p").await;
    assert_eq!(f["seq"].as_u64(), Some(start + 3), "{f}");
    assert!(f.get("data").is_none(), "an id-only frame has no data: {f}");
    assert!(f["id"].is_string() && f["action"] == "INSERT", "{f}");

    // The notices of all three: never a secret (they carry no data at all).
    let mut seen = 0;
    while seen < 3 {
        let n = notices.next_json(10).await;
        if n["project_id"] == "p" && n["resource"] == "account" {
            assert!(!n.to_string().contains("SECRET"), "a notice: {n}");
            assert!(n.get("data").is_none(), "a notice: {n}");
            seen += 1;
        }
    }

    // A resume reads the frames back from the log: the same choices.
    let mut again = WsClient::connect(relay.addr, "ann").await;
    again.subscribe("p", Some(start)).await;
    let mut frames = Vec::new();
    for _ in 0..3 {
        frames.push(next_event(&mut again, "p").await);
    }
    let seqs: Vec<u64> = frames.iter().filter_map(|f| f["seq"].as_u64()).collect();
    assert_eq!(seqs, vec![start + 1, start + 2, start + 3]);
    assert!(frames[0]["data"]["name"] == "ann" && frames[0]["data"].get("pw_hash").is_none());
    assert!(frames[2].get("data").is_none(), "{}", frames[2]);
    for f in &frames {
        assert!(!f.to_string().contains("SECRET"), "a resumed frame: {f}");
    }
    relay.shutdown().await;
}

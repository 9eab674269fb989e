//! The dashboard and the alert rules (`ops/`) against the real thing:
//! `promtool` checks and unit-tests the rules, and a real Prometheus
//! (Debian's `prometheus` package) scrapes a real relay, answers every query
//! of the Grafana dashboard with data, and sees "not listening" when the
//! relay's Postgres is stopped.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Both tools come from Debian's `prometheus` package.
const INSTALL: &str =
    "apt-get install -y prometheus (it has both prometheus and promtool; .ci/run installs it)";

/// How long Prometheus may take to start, scrape, or see a change.
const BOUND: Duration = Duration::from_secs(45);

/// What Grafana's variables stand for when a query is sent to Prometheus
/// directly: every relay, and a window of at least four 1 s scrapes.
const VARIABLES: [(&str, &str); 3] = [
    ("$__rate_interval", "1m"),
    ("$__interval", "1m"),
    ("$instance", ".*"),
];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs one of the package's tools; a missing tool fails the test, naming
/// the package.
fn run_tool(tool: &str, args: &[&Path]) -> std::process::Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("`{tool}` could not be run ({e}): {INSTALL}"))
}

#[test]
fn the_alert_rules_pass_promtool_check() {
    let out = run_tool(
        "promtool",
        &[
            Path::new("check"),
            Path::new("rules"),
            &repo("ops/prometheus/alerts.yml"),
        ],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool check rules failed:\n{text}");
    assert!(text.contains("SUCCESS: 7 rules found"), "{text}");
}

#[test]
fn every_alert_fires_in_its_promtool_unit_test_and_not_on_a_healthy_relay() {
    let tests = repo("ops/prometheus/alerts.test.yml");
    let out = run_tool("promtool", &[Path::new("test"), Path::new("rules"), &tests]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool test rules failed:\n{text}");
    // Every rule of alerts.yml has a test case that expects it to fire.
    let rules = std::fs::read_to_string(repo("ops/prometheus/alerts.yml")).expect("alerts.yml");
    let cases = std::fs::read_to_string(&tests).expect("alerts.test.yml");
    let names: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(names.len(), 7, "{names:?}");
    for name in names {
        let firing = cases
            .split(&format!("alertname: {name}\n"))
            .skip(1)
            .any(|case| case.trim_start().starts_with("exp_alerts:\n"));
        assert!(firing, "alerts.test.yml has no case where {name} fires");
    }
}

/// A Prometheus server of the test's own, killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping the relay at `target` every second and
    /// evaluating the real `alerts.yml` every second; returns once it is
    /// ready.
    async fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = dir.path().join("prometheus.yml");
        let rules = repo("ops/prometheus/alerts.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: pgrelay\n    static_configs:\n      - targets: [\"{target}\"]\n",
                rules = rules.display()
            ),
        )
        .expect("writing prometheus.yml");
        let addr = testkit::process::free_addr().expect("a free port");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("a log file");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("`prometheus` could not be run ({e}): {INSTALL}"));
        let mut prometheus = Prometheus { child, addr, dir };
        let t0 = tokio::time::Instant::now();
        loop {
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                panic!(
                    "prometheus exited at start ({status}):\n{}",
                    prometheus.log()
                );
            }
            if get(addr, "/-/ready")
                .await
                .is_some_and(|(code, _)| code == 200)
            {
                return prometheus;
            }
            assert!(
                t0.elapsed() < BOUND,
                "prometheus not ready within {BOUND:?}:\n{}",
                prometheus.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `/api/v1/query`: panics unless Prometheus parsed and ran it; returns
    /// the result vector.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        let (code, body) = get(self.addr, &path)
            .await
            .unwrap_or_else(|| panic!("prometheus did not answer {path}"));
        let answer: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{expr}: not JSON ({e}): {code} {body}"));
        assert_eq!(answer["status"], "success", "{expr}: {code} {answer}");
        answer["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("{expr}: no result vector: {answer}"))
            .clone()
    }

    /// Waits until `expr` returns something, or panics after [`BOUND`].
    async fn wait_for(&self, expr: &str, why: &str) -> Vec<Value> {
        let t0 = tokio::time::Instant::now();
        loop {
            let result = self.query(expr).await;
            if !result.is_empty() {
                return result;
            }
            assert!(
                t0.elapsed() < BOUND,
                "{why}: `{expr}` stayed empty for {BOUND:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `/api/v1/<what>`'s `data`.
    async fn api(&self, what: &str) -> Value {
        let (code, body) = get(self.addr, &format!("/api/v1/{what}"))
            .await
            .unwrap_or_else(|| panic!("prometheus did not answer /api/v1/{what}"));
        let answer: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/api/v1/{what}: not JSON ({e}): {code} {body}"));
        assert_eq!(answer["status"], "success", "/api/v1/{what}: {answer}");
        answer["data"].clone()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.0 GET (so that Prometheus answers without chunking): the
/// status and the body, `None` if nothing answered.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((code, body))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every query of the dashboard, with its panel's title.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo("ops/grafana/dashboards/pgrelay.json"))
        .expect("reading the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a target's expr");
            let title = panel["title"].as_str().expect("a panel's title");
            queries.push((title.to_string(), expr.to_string()));
        }
    }
    queries
}

fn substitute(expr: &str) -> String {
    VARIABLES
        .iter()
        .fold(expr.to_string(), |e, (var, value)| e.replace(var, value))
}

/// Queries whose value the test's traffic makes non-zero: the series the
/// relay always exports (counters and gauges at 0) would return data even
/// if nothing was counted, so these prove the panel shows what happened.
const MOVED: [&str; 13] = [
    "pgrelay_connections{",
    "pgrelay_subscriptions{",
    "rate(pgrelay_events_sent_total",
    "histogram_quantile(0.99,",
    "rate(pgrelay_log_reads_total",
    "rate(pgrelay_log_rows_total",
    "rate(pgrelay_refused_connections_total",
    "rate(pgrelay_client_errors_total",
    "rate(pgrelay_resets_sent_total",
    "rate(pgrelay_revocations_total",
    "rate(pgrelay_broadcasts_in_total",
    "rate(pgrelay_broadcasts_out_total",
    "pgrelay_presence_members{",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus_scraping_a_real_relay() {
    let db = TestDb::new().await;
    let c = db.client().await;
    seed_project(&c, "p", &["ann", "bob", "cid"]).await;
    let relay = start_relay(relay_config(&db.url)).await;
    let prometheus = Prometheus::start(relay.addr).await;
    // Two scrapes before the traffic, so rates have a "before".
    prometheus
        .wait_for(
            "count_over_time(pgrelay_listening[1m]) >= 2",
            "scrapes of the relay",
        )
        .await;

    // Traffic: subscriptions, events, a broadcast, presence, a reset, a
    // refused token, a bad frame, and a revocation.
    let mut ann = WsClient::connect(relay.addr, "ann").await;
    let mut bob = WsClient::connect(relay.addr, "bob").await;
    ann.send_json(json!({"action": "subscribe", "project_id": "p", "presence": true}))
        .await;
    bob.subscribe("p", None).await;
    for i in 0..5 {
        c.execute(
            "INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('p', 'ann', $1)",
            &[&format!("m{i}")],
        )
        .await
        .expect("inserting a message");
    }
    bob.events_until("p", 5, 10).await;
    ann.send_json(json!({"action": "presence", "project_id": "p", "state": {"status": "online"}}))
        .await;
    ann.send_json(json!({"action": "broadcast", "project_id": "p", "event": "typing", "id": "b1"}))
        .await;
    next_frame(&mut bob, "broadcast").await;
    let mut cid = WsClient::connect(relay.addr, "cid").await;
    cid.send_json(json!({"action": "subscribe", "project_id": "p", "since_seq": 1000}))
        .await;
    assert_eq!(next_frame(&mut cid, "reset").await["reason"], "seq_ahead");
    cid.send_json(json!({"action": "no such action"})).await;
    next_frame(&mut cid, "error").await;
    // A bad token is refused over the WebSocket, after the upgrade.
    let mut refused = testkit::ws::connect(relay.addr, "not-a-token")
        .await
        .expect("the upgrade");
    let code = testkit::ws::close_code(&mut refused, Duration::from_secs(10)).await;
    assert!(code.is_some(), "a bad token was not refused");
    c.execute(
        "DELETE FROM chat.project_members WHERE user_id = 'cid'",
        &[],
    )
    .await
    .expect("removing cid from p");
    let ended = next_frame(&mut cid, "error").await;
    assert_eq!(ended["code"], "forbidden", "{ended}");
    // The revocation came last: once Prometheus has it, it has the rest.
    prometheus
        .wait_for(
            "pgrelay_revocations_total{cause=\"membership_event\"} > 0",
            "a scrape after the traffic",
        )
        .await;

    let mut empty = Vec::new();
    let mut still = Vec::new();
    println!("query | result");
    for (panel, expr) in dashboard_queries() {
        let sent = substitute(&expr);
        assert!(!sent.contains('$'), "{panel}: a variable left in {sent}");
        let result = prometheus.query(&sent).await;
        let values: Vec<String> = result
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default();
                format!("{{{labels}}} {}", r["value"][1].as_str().unwrap_or("?"))
            })
            .collect();
        println!("{panel} | {expr} | {}", values.join("; "));
        if result.is_empty() {
            empty.push(format!("{panel}: {sent}"));
        }
        let positive = result.iter().any(|r| {
            r["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)
        });
        if MOVED.iter().any(|m| expr.contains(m)) && !positive {
            still.push(format!("{panel}: {sent} = {values:?}"));
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n{}",
        empty.join("\n")
    );
    assert!(
        still.is_empty(),
        "dashboard queries that did not show the test's traffic:\n{}",
        still.join("\n")
    );
    drop(prometheus);
    relay.shutdown().await;
}

/// The next frame of type `kind` (others skipped), or a panic after 10 s.
async fn next_frame(client: &mut WsClient, kind: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.try_next_json(left).await {
            Some(f) if f["type"] == kind => return f,
            Some(_) => continue,
            None => panic!("no {kind} frame within 10 s"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_listening_alert_turns_true_when_the_relays_postgres_stops() {
    let server = Arc::new(TestServer::dedicated().await);
    let db = server.fresh_db().await;
    let relay = start_relay(relay_config(&db.url)).await;
    let prometheus = Prometheus::start(relay.addr).await;

    // The rule as Prometheus loaded it from alerts.yml.
    let rules = prometheus.api("rules").await;
    let rule = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .find(|r| r["name"] == "PgrelayNotListening")
        .cloned()
        .unwrap_or_else(|| panic!("prometheus did not load PgrelayNotListening: {rules}"));
    let expr = rule["query"]
        .as_str()
        .expect("the rule's query")
        .to_string();

    prometheus
        .wait_for("pgrelay_listening == 1", "a scrape of the listening relay")
        .await;
    assert_eq!(
        prometheus.query(&expr).await,
        Vec::<Value>::new(),
        "{expr} on a healthy relay"
    );

    let s = server.clone();
    tokio::task::spawn_blocking(move || s.pg.stop().expect("stopping postgres"))
        .await
        .expect("stopping postgres");
    wait_healthz_not_listening(relay.addr, BOUND).await;

    let result = prometheus.wait_for(&expr, "the alert's expression").await;
    assert_eq!(result.len(), 1, "{result:?}");
    assert_eq!(
        result[0]["metric"]["instance"],
        relay.addr.to_string(),
        "{result:?}"
    );
    // And the rule itself, as Prometheus evaluates it: pending (its `for:`
    // is a minute, which this test does not wait out).
    let t0 = tokio::time::Instant::now();
    loop {
        let alerts = prometheus.api("alerts").await;
        let state = alerts["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["labels"]["alertname"] == "PgrelayNotListening")
            .map(|a| a["state"].clone());
        if state
            .as_ref()
            .is_some_and(|s| s == "pending" || s == "firing")
        {
            break;
        }
        assert!(
            t0.elapsed() < BOUND,
            "PgrelayNotListening not pending: {alerts}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(prometheus);
    relay.shutdown().await;
}

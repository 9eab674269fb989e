//! The JavaScript client SDK (`clients/js`) through `cargo test`: its Node
//! suites (unit rules; the SDK against this relay binary and a private
//! Postgres; the demo page in headless Chromium) run from here, so the
//! README's one test command covers them. The SDK's test packages are
//! installed (`npm ci`) when missing; missing tools fail the test with
//! what to install; nothing is skipped silently.
//!
//! Also here: the demo mode keeps its token secret with `--data-dir`, so a
//! token printed before a restart still works after it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn package_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js")
}

/// Node's major version, or a panic saying how to install it.
fn node_major() -> u32 {
    let out = Command::new("node")
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "the JavaScript SDK's tests need Node.js 18 or newer (20 recommended), and `node` \
             could not be run ({e}): apt-get install -y nodejs npm"
            )
        });
    let version = String::from_utf8_lossy(&out.stdout);
    version
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("unexpected `node --version` output: {version:?}"))
}

fn chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "the browser tests need Chromium at {} (apt-get install -y chromium, or set CHROMIUM)",
        path.display()
    );
    path
}

/// The SDK's test packages (`playwright-core`, `ws`), installed exactly as
/// `package-lock.json` locks them (`npm ci`) when one is missing or the
/// lockfile changed since the last install, so that `cargo test` alone is
/// the whole set-up; a failed install fails the test with npm's output.
/// The install keeps a copy of the lockfile it installed from
/// (`node_modules/.pgrelay-installed-lock.json`): the next run compares
/// bytes, so a changed lockfile reinstalls once and an unchanged one costs
/// nothing (and needs no network).
fn install_test_packages(dir: &Path) {
    let packages = ["playwright-core", "ws"];
    let lock = std::fs::read(dir.join("package-lock.json"))
        .unwrap_or_else(|e| panic!("reading clients/js/package-lock.json: {e}"));
    let stamp = dir
        .join("node_modules")
        .join(".pgrelay-installed-lock.json");
    let present = packages
        .iter()
        .all(|p| dir.join("node_modules").join(p).exists());
    let current = std::fs::read(&stamp).is_ok_and(|installed| installed == lock);
    if present && current {
        return;
    }
    println!(
        "clients/js/node_modules is {}: running `npm ci` there",
        if present {
            "older than package-lock.json"
        } else {
            "incomplete"
        }
    );
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("the JavaScript SDK's tests need npm, and `npm` could not be run ({e}): apt-get install -y npm")
        });
    assert!(
        out.status.success(),
        "`npm ci` in clients/js failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for package in packages {
        assert!(
            dir.join("node_modules").join(package).exists(),
            "`npm ci` in clients/js did not install {package}"
        );
    }
    std::fs::write(&stamp, &lock).unwrap_or_else(|e| panic!("writing {}: {e}", stamp.display()));
}

/// Longest the three Node suites may take together (they take a minute or
/// two on a loaded 2-core machine): past it node and everything it started
/// are killed and the test fails with their output.
const NODE_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `cmd` in a process group of its own, capturing its output; kills
/// the group (SIGTERM, then SIGKILL) if it runs past `limit`. Returns its
/// exit status (None when killed), stdout and stderr.
fn run_bounded(
    cmd: &mut Command,
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String, String) {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("running node --test: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("its stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("its stderr")));
    let group = Pid::from_raw(child.id() as i32);
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Ok(None) => {
                // SIGTERM first: the harness stops its relays and Postgres.
                let _ = killpg(group, Signal::SIGTERM);
                let grace = Instant::now() + Duration::from_secs(10);
                while Instant::now() < grace && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(200));
                }
                let _ = killpg(group, Signal::SIGKILL);
                let _ = child.wait();
                break None;
            }
            Err(e) => panic!("waiting for node: {e}"),
        }
    };
    // Whatever the group left behind goes too (nothing, when it ended well).
    let _ = killpg(group, Signal::SIGKILL);
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    (status, stdout, stderr)
}

/// What a TAP stream (`node --test --test-reporter=tap`) reports.
#[derive(Debug, Default, PartialEq)]
struct Tap {
    /// `ok` and `not ok` lines, at any depth.
    passed: usize,
    failed: Vec<String>,
    /// Test points with a `# SKIP` or `# TODO` directive.
    skipped_or_todo: Vec<String>,
    /// The run's closing counts (`# tests 12`, `# pass 12`, ...).
    summary: std::collections::BTreeMap<String, u64>,
}

fn parse_tap(stdout: &str) -> Tap {
    let mut tap = Tap::default();
    for line in stdout.lines() {
        let point = line.trim_start();
        let (ok, rest) = if let Some(rest) = point.strip_prefix("not ok ") {
            (false, rest)
        } else if let Some(rest) = point.strip_prefix("ok ") {
            (true, rest)
        } else {
            if let Some((key, n)) = line.strip_prefix("# ").and_then(|l| l.split_once(' ')) {
                if let Ok(n) = n.trim().parse() {
                    tap.summary.insert(key.to_string(), n);
                }
            }
            continue;
        };
        let directive = rest
            .split_once(" # ")
            .map(|(_, d)| d.trim_start().to_ascii_uppercase());
        if directive
            .as_deref()
            .is_some_and(|d| d.starts_with("SKIP") || d.starts_with("TODO"))
        {
            tap.skipped_or_todo.push(point.to_string());
        } else if ok {
            tap.passed += 1;
        } else {
            tap.failed.push(point.to_string());
        }
    }
    tap
}

/// Why a TAP run does not count as every test passed, if it does not.
fn tap_verdict(tap: &Tap) -> Result<(), String> {
    let count = |key: &str| tap.summary.get(key).copied();
    let mut why = Vec::new();
    if !tap.failed.is_empty() {
        why.push(format!("failed: {:?}", tap.failed));
    }
    if !tap.skipped_or_todo.is_empty() {
        why.push(format!(
            "skipped or todo (not allowed): {:?}",
            tap.skipped_or_todo
        ));
    }
    for key in ["fail", "cancelled", "skipped", "todo"] {
        match count(key) {
            Some(0) => {}
            Some(n) => why.push(format!("# {key} {n}")),
            None => why.push(format!("no `# {key}` count in the summary")),
        }
    }
    match (count("tests"), count("pass")) {
        (Some(tests), Some(pass)) if tests > 0 && tests == pass => {}
        (tests, pass) => why.push(format!("# tests {tests:?}, # pass {pass:?}")),
    }
    if tap.passed == 0 {
        why.push("no passing test point".to_string());
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why.join("; "))
    }
}

#[test]
fn the_tap_check_refuses_failures_skips_todos_and_empty_runs() {
    let good = "TAP version 13\n# Subtest: a\nok 1 - a\n  ---\n  ...\n    ok 1 - inner\n1..1\n\
                # tests 1\n# suites 0\n# pass 1\n# fail 0\n# cancelled 0\n# skipped 0\n# todo 0\n";
    assert_eq!(tap_verdict(&parse_tap(good)), Ok(()));
    for (bad, why) in [
        (
            good.replace("ok 1 - a", "ok 1 - a # SKIP no chromium"),
            "a skip",
        ),
        (
            good.replace("ok 1 - inner", "ok 1 - inner # TODO later"),
            "a todo",
        ),
        (good.replace("ok 1 - a", "not ok 1 - a"), "a failure"),
        (good.replace("# skipped 0", "# skipped 1"), "a skip count"),
        (
            good.replace("# pass 1", "# pass 0"),
            "fewer passes than tests",
        ),
        (good.replace("# todo 0\n", ""), "no todo count"),
        (
            "TAP version 13\n1..0\n# tests 0\n# pass 0\n".to_string(),
            "no test",
        ),
        (String::new(), "no output"),
    ] {
        assert!(tap_verdict(&parse_tap(&bad)).is_err(), "{why} passed");
    }
}

#[test]
fn javascript_sdk_suites_pass_against_the_relay_binary() {
    let major = node_major();
    assert!(
        major >= 18,
        "Node.js {major} is too old for the SDK's tests; install 18 or newer (20 recommended)"
    );
    let dir = package_dir();
    install_test_packages(&dir);
    let chromium = chromium();
    let mut cmd = Command::new("node");
    // Node 20 and 21 have a global WebSocket behind this flag (22 on by
    // default); without it the tests use the `ws` package's.
    let flag_ok = Command::new("node")
        .args(["--experimental-websocket", "-e", "0"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if flag_ok {
        cmd.arg("--experimental-websocket");
    }
    // TAP, named: newer Node defaults to another reporter on a terminal.
    cmd.args([
        "--test",
        "--test-reporter=tap",
        "test/unit.test.js",
        "test/relay.test.js",
        "test/browser.test.js",
    ])
    .current_dir(&dir)
    .stdin(Stdio::null())
    .env("PGRELAY_BIN", env!("CARGO_BIN_EXE_pgrelay"))
    .env("CHROMIUM", &chromium);
    let started = Instant::now();
    let (status, stdout, stderr) = run_bounded(&mut cmd, NODE_TIMEOUT);
    let Some(status) = status else {
        panic!("node --test ran past {NODE_TIMEOUT:?} and was killed:\n{stdout}\n{stderr}");
    };
    let tap = parse_tap(&stdout);
    println!(
        "node --test in clients/js ({:.0?}): {} test points passed; {:?}",
        started.elapsed(),
        tap.passed,
        tap.summary
    );
    assert!(
        status.success(),
        "the JavaScript SDK's tests failed ({status}):\n{stdout}\n{stderr}"
    );
    if let Err(why) = tap_verdict(&tap) {
        panic!("the JavaScript SDK's tests did not all pass: {why}\n{stdout}\n{stderr}");
    }
}

/// The SDK's code tables (`clients/js/src/codes.js`), as node loads them:
/// `Close`, `ErrorCode` and `ResetReason`.
fn sdk_code_tables() -> serde_json::Value {
    node_major();
    let script = "import { pathToFileURL } from 'node:url';\n\
        const c = await import(pathToFileURL(process.argv[1]));\n\
        console.log(JSON.stringify({ Close: c.Close, ErrorCode: c.ErrorCode, ResetReason: c.ResetReason }));";
    let out = Command::new("node")
        .args(["--input-type=module", "-e", script])
        .arg(package_dir().join("src/codes.js"))
        .output()
        .unwrap_or_else(|e| panic!("running node on codes.js: {e}"));
    assert!(
        out.status.success(),
        "node could not load clients/js/src/codes.js: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "codes.js printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The values of one table, as text, sorted; fails on a repeated value.
fn values(tables: &serde_json::Value, table: &str) -> Vec<String> {
    let map = tables[table]
        .as_object()
        .unwrap_or_else(|| panic!("codes.js exports no {table} table: {tables}"));
    let mut values: Vec<String> = map
        .values()
        .map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect();
    values.sort();
    let before = values.len();
    values.dedup();
    assert_eq!(values.len(), before, "{table} names a value twice: {map:?}");
    values
}

/// Fails, naming what is missing on which side, unless both hold the same.
fn same_codes(what: &str, sdk: Vec<String>, relay: Vec<String>) {
    let only_relay: Vec<&String> = relay.iter().filter(|c| !sdk.contains(c)).collect();
    let only_sdk: Vec<&String> = sdk.iter().filter(|c| !relay.contains(c)).collect();
    assert!(
        only_relay.is_empty() && only_sdk.is_empty(),
        "{what}: the relay speaks {only_relay:?} which clients/js/src/codes.js lacks, and the SDK \
         lists {only_sdk:?} which the relay never sends (src/relay/protocol.rs)"
    );
}

#[test]
fn the_sdk_knows_exactly_the_codes_the_relay_speaks() {
    use pgrelay::relay::protocol::{close, code, reset_reason};
    let tables = sdk_code_tables();
    // Close codes that are not the relay's: the SDK's own close (1000),
    // a connection lost without a close frame (1006, never on the wire),
    // and the SDK's own ping timeout (4508). Exactly these, under these
    // names, so a relay code cannot hide among them.
    let sdk_only = [
        ("NORMAL", 1000),
        ("ABNORMAL", 1006),
        ("CLIENT_PING_TIMEOUT", 4508),
    ];
    for (name, value) in sdk_only {
        assert_eq!(
            tables["Close"][name], value,
            "codes.js Close.{name} must be {value}"
        );
        assert!(
            !close::ALL.contains(&value),
            "the relay sends {value}, which the SDK takes for its own"
        );
    }
    let sdk_close: Vec<String> = values(&tables, "Close")
        .into_iter()
        .filter(|c| !sdk_only.iter().any(|(_, v)| c == &v.to_string()))
        .collect();
    let text = |all: &[&str]| {
        let mut v: Vec<String> = all.iter().map(|c| c.to_string()).collect();
        v.sort();
        v
    };
    let mut relay_close: Vec<String> = close::ALL.iter().map(u16::to_string).collect();
    relay_close.sort();
    same_codes("close codes", sdk_close, relay_close);
    same_codes("error codes", values(&tables, "ErrorCode"), text(code::ALL));
    same_codes(
        "reset reasons",
        values(&tables, "ResetReason"),
        text(reset_reason::ALL),
    );
}

/// `pgrelay serve` with a private Postgres in `data_dir`; returns the
/// child, its address and its printed demo URL for alice.
fn serve_demo(data_dir: &Path) -> (std::process::Child, String, String) {
    use std::io::{BufRead, BufReader};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(data_dir)
        .env_remove("DATABASE_URL")
        .env_remove("PGRELAY_JWT_SECRET")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting pgrelay serve");
    let stdout = child.stdout.take().expect("its stdout");
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        assert!(
            Instant::now() < deadline,
            "pgrelay serve printed no demo URL in time"
        );
        let line = lines
            .next()
            .expect("pgrelay serve ended before printing the demo URL")
            .expect("reading its output");
        if let Some(url) = line.trim().strip_prefix("demo page as alice: ") {
            break url.to_string();
        }
    };
    // Keep reading (and dropping) its output so it never blocks on a pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr, url)
}

fn stop(mut child: std::process::Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
}

/// The response head and body of `GET path` with a bearer token.
fn get(addr: &str, path: &str, token: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connecting to the relay");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .expect("writing a request");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn status_line(response: &str) -> &str {
    response.lines().next().unwrap_or_default()
}

#[test]
fn demo_tokens_survive_a_restart_on_the_same_data_dir() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data = dir.path().join("data");
    let (first, addr, url) = serve_demo(&data);
    let token = url.split("token=").nth(1).expect("a token in the URL");
    assert!(status_line(&get(&addr, "/v1/projects", token)).contains(" 200 "));
    // The demo page's SDK is served by the relay, as JavaScript.
    let sdk = get(&addr, "/client.js", token);
    let module = get(&addr, "/client/connection.js", token);
    stop(first);
    for response in [&sdk, &module] {
        assert!(status_line(response).contains(" 200 "), "{response}");
        assert!(
            response
                .to_ascii_lowercase()
                .contains("content-type: text/javascript; charset=utf-8"),
            "{response}"
        );
    }
    assert!(sdk.contains("export * from \"./client/index.js\""));
    assert!(module.contains("export class Client"));
    let (second, addr, _) = serve_demo(&data);
    let after = get(&addr, "/v1/projects", token);
    stop(second);
    assert!(
        status_line(&after).contains(" 200 "),
        "a token printed before the restart was refused after it: {}",
        status_line(&after)
    );
}

//! Runs the SQL-level test suite (`sql/tests/*.sql`) with psql, each file
//! against a fresh migrated database, exactly as a user would run it
//! against their own database: `psql -v ON_ERROR_STOP=1 -f FILE URL`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::TestDb;

/// Every file of the SQL suite, by name. It must equal the listing of
/// `sql/tests/*.sql`: a file added there without being named here (or a
/// file named here and gone) fails the test instead of being silently run
/// or silently dropped.
const SQL_TESTS: [&str; 15] = [
    "001_capture.sql",
    "002_rollback_and_scopes.sql",
    "003_copy.sql",
    "004_send_idempotent.sql",
    "005_edit_delete.sql",
    "006_pages.sql",
    "007_unread_and_marks.sql",
    "008_large_row.sql",
    "009_trim.sql",
    "010_enable_disable.sql",
    "011_moves_long_keys_and_cursor_caps.sql",
    "012_any_writer_and_grants.sql",
    "013_divergence.sql",
    "014_signals.sql",
    "015_columns.sql",
];

#[tokio::test(flavor = "multi_thread")]
async fn sql_suite_passes_file_by_file() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sql/tests");
    let mut listed: Vec<String> = std::fs::read_dir(&dir)
        .expect("reading sql/tests")
        .map(|e| e.expect("listing sql/tests").path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .map(|p| {
            p.file_name()
                .expect("a listed file has a name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        SQL_TESTS,
        "the SQL files in {} must be exactly the ones this test names",
        dir.display()
    );
    let files: Vec<PathBuf> = SQL_TESTS.iter().map(|name| dir.join(name)).collect();

    let mut failures = Vec::new();
    for file in &files {
        let db = TestDb::new().await;
        let url = db.url.clone();
        let path = file.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new("psql")
                .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
                .arg(&path)
                .arg(&url)
                .output()
        })
        .await
        .expect("joining psql")
        .expect("running psql (is the PostgreSQL client installed?)");
        let name = file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // A WARNING is how a file says it skipped a check (001_capture.sql
        // without a superuser); this harness runs as a superuser, so nothing
        // may be skipped here.
        if out.status.success() && !stderr.contains("WARNING") {
            println!("ok   {name}");
        } else {
            println!("FAIL {name}");
            failures.push(format!(
                "{name}: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                stderr
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "SQL tests failed:\n{}",
        failures.join("\n")
    );
    println!("{} SQL test files passed", files.len());
}

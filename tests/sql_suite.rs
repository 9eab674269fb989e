//! Runs the SQL-level test suite (`sql/tests/*.sql`) with psql, each file
//! against a fresh migrated database, exactly as a user would run it
//! against their own database: `psql -v ON_ERROR_STOP=1 -f FILE URL`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::TestDb;

#[tokio::test(flavor = "multi_thread")]
async fn sql_suite_passes_file_by_file() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sql/tests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("reading sql/tests")
        .map(|e| e.expect("listing sql/tests").path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 8,
        "expected the SQL suite in {}, found {} files",
        dir.display(),
        files.len()
    );

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
        if out.status.success() {
            println!("ok   {name}");
        } else {
            println!("FAIL {name}");
            failures.push(format!(
                "{name}: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
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

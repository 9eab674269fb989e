//! A real PgBouncer (the Debian package) in front of the test server,
//! started by the test as the `postgres` user on a free port, with two
//! entries per database: `<db>_tx` in transaction mode and `<db>_session`
//! in session mode. Dropping it stops it.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::unistd::{Uid, User};

pub struct PgBouncer {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

/// The pgbouncer binary: on PATH, else where Debian puts it.
fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("pgbouncer").is_file() {
                return dir.join("pgbouncer");
            }
        }
    }
    let debian = PathBuf::from("/usr/sbin/pgbouncer");
    assert!(
        debian.is_file(),
        "pgbouncer is not installed (apt-get install -y pgbouncer; .ci/run does)"
    );
    debian
}

impl PgBouncer {
    /// Starts PgBouncer for `databases` of the Postgres on `pg_port`.
    pub async fn start(pg_port: u16, databases: &[&str]) -> PgBouncer {
        let dir = tempfile::Builder::new()
            .prefix("pgrelay-pgbouncer-")
            .tempdir()
            .expect("a directory for pgbouncer");
        let run_as = Uid::effective().is_root().then(|| {
            let user = User::from_name("postgres")
                .expect("looking up the postgres user")
                .expect("a postgres user (the postgresql package makes it)");
            (user.uid, user.gid)
        });
        if let Some((uid, gid)) = run_as {
            nix::unistd::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        }
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let mut entries = String::new();
            for db in databases {
                entries.push_str(&format!(
                    "{db}_tx = host=127.0.0.1 port={pg_port} dbname={db} pool_mode=transaction\n\
                     {db}_session = host=127.0.0.1 port={pg_port} dbname={db} pool_mode=session\n"
                ));
            }
            let d = dir.path().display();
            let ini = format!(
                "[databases]\n{entries}\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir =\nauth_type = trust\nauth_file = {d}/userlist.txt\n\
                 pool_mode = transaction\nmax_client_conn = 500\ndefault_pool_size = 8\n\
                 logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\nadmin_users = postgres\n"
            );
            std::fs::write(dir.path().join("pgbouncer.ini"), ini).expect("writing pgbouncer.ini");
            std::fs::write(dir.path().join("userlist.txt"), "\"postgres\" \"\"\n")
                .expect("writing userlist.txt");
            let mut cmd = Command::new(binary());
            cmd.arg(dir.path().join("pgbouncer.ini"))
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Some((uid, gid)) = run_as {
                cmd.uid(uid.as_raw()).gid(gid.as_raw());
            }
            // SAFETY: prctl only; async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                        .map_err(std::io::Error::from)
                });
            }
            let mut child = cmd.spawn().expect("starting pgbouncer");
            let mut bouncer = None;
            for _ in 0..100 {
                if let Ok(Some(status)) = child.try_wait() {
                    last_error = format!("pgbouncer exited: {status}; log: {}", log(&dir));
                    break;
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    bouncer = Some(port);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            match bouncer {
                Some(port) => return PgBouncer { port, child, dir },
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        panic!("pgbouncer did not start: {last_error}");
    }

    /// A URL of database `db` through the pooler, in `mode` ("tx" or
    /// "session").
    pub fn url(&self, db: &str, mode: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}_{mode}", self.port)
    }

    /// PgBouncer's log, for diagnosis.
    pub fn log(&self) -> String {
        log(&self.dir)
    }
}

fn log(dir: &tempfile::TempDir) -> String {
    std::fs::read_to_string(dir.path().join("pgbouncer.log")).unwrap_or_default()
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

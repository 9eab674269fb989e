//! A private PostgreSQL cluster started from the local server binaries.
//!
//! `pgrelay serve` without `DATABASE_URL` and every test binary run one of
//! these, so neither needs a server set up beforehand. Nothing is
//! downloaded: we use `initdb` and `postgres` from `PATH`, then from
//! `/usr/lib/postgresql/*/bin`, and say what to install when neither has
//! them.
//!
//! Three details matter and are easy to get wrong:
//! - Postgres refuses to run as root, so as root we run it as the
//!   `postgres` user, in a directory that user owns.
//! - The server must not outlive us, even when we are killed: it is
//!   spawned with a parent-death signal from a thread that lives as long as
//!   the process, so test binaries (whose statics are never dropped) leave
//!   no server behind.
//! - It listens on 127.0.0.1 only, on a free port picked at start; the
//!   Unix socket lives in our own directory.
//!
//! A running server can also give a hot standby of itself
//! ([`PgServer::start_standby`], `pg_basebackup -R`), for the failover and
//! read-replica tests.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Gid, Pid, Uid, User};

/// How long a start may take before we give up and show the server log.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a private cluster could not be started or controlled.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedPgError {
    #[error(
        "PostgreSQL server binaries (initdb, postgres) were not found on PATH or under \
         /usr/lib/postgresql/*/bin; install them (Debian/Ubuntu: `apt-get install postgresql`) \
         or set DATABASE_URL to use an existing server"
    )]
    BinariesNotFound,
    #[error(
        "running as root, but there is no `postgres` user to run the server as \
         (Postgres refuses to run as root); install the postgresql package or create the user"
    )]
    NoPostgresUser,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed ({status}); its output:\n{output}")]
    Command {
        what: String,
        status: String,
        output: String,
    },
    #[error("postgres did not become ready within {seconds}s; last lines of its log:\n{log}")]
    StartTimeout { seconds: u64, log: String },
    #[error("postgres exited during start ({status}); last lines of its log:\n{log}")]
    ExitedDuringStart { status: String, log: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> EmbeddedPgError {
    let what = what.into();
    move |source| EmbeddedPgError::Io { what, source }
}

/// How to run the cluster.
#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    /// Keep the cluster here (created on first use, reused after). `None`
    /// means a fresh temporary directory, removed on drop.
    pub data_dir: Option<PathBuf>,
    /// Extra server settings, passed as `-c name=value`.
    pub settings: Vec<(String, String)>,
}

impl PgOptions {
    /// Settings for throwaway test clusters: durability off (tests restart
    /// the server but never crash the machine), room for many connections.
    pub fn for_tests() -> Self {
        let settings = [
            ("fsync", "off"),
            ("synchronous_commit", "off"),
            ("full_page_writes", "off"),
            ("max_connections", "300"),
            ("shared_buffers", "128MB"),
        ];
        PgOptions {
            data_dir: None,
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

/// A running private cluster. Dropping it shuts the server down.
pub struct PgServer {
    /// Directory holding initdb, postgres and friends.
    bin_dir: PathBuf,
    /// The cluster's data directory.
    data_dir: PathBuf,
    /// Holds the socket directory and the log; the data directory too,
    /// unless the caller chose one. Removed on drop.
    work: tempfile::TempDir,
    port: u16,
    /// Uid/gid to run the server as (the `postgres` user when we are root).
    run_as: Option<(Uid, Gid)>,
    settings: Vec<(String, String)>,
    /// The postmaster, while it runs. A mutex so tests sharing one server
    /// can stop and restart it through `&self`.
    child: Mutex<Option<Child>>,
}

impl PgServer {
    /// Initialises (if needed) and starts a cluster on a free port.
    pub fn start(options: PgOptions) -> Result<Self, EmbeddedPgError> {
        let bin_dir = find_bin_dir()?;
        let run_as = server_user()?;
        sweep_abandoned_work_dirs();
        let work = tempfile::Builder::new()
            .prefix("pgrelay-pg-")
            .tempdir()
            .map_err(io_err("creating a temporary directory"))?;
        give_to(work.path(), run_as)?;
        let data_dir = match options.data_dir {
            Some(dir) => {
                fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
                let dir = dir
                    .canonicalize()
                    .map_err(io_err(format!("resolving {}", dir.display())))?;
                give_to(&dir, run_as)?;
                dir
            }
            None => work.path().join("data"),
        };
        let server = PgServer {
            bin_dir,
            data_dir,
            work,
            port: 0,
            run_as,
            settings: options.settings,
            child: Mutex::new(None),
        };
        if !server.data_dir.join("PG_VERSION").exists() {
            server.initdb()?;
        }
        server.boot_on_free_port()
    }

    /// The port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's process id while it runs (benchmarks sum the CPU
    /// time of its process tree).
    pub fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Child::id)
    }

    /// A connection URL for `database` as the `postgres` superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{}", self.port, database)
    }

    /// The server log, for diagnosing failures.
    pub fn log_path(&self) -> PathBuf {
        self.work.path().join("postgres.log")
    }

    /// Fast shutdown: clients are disconnected, the server stops cleanly.
    /// Used by tests to simulate an outage.
    pub fn stop(&self) -> Result<(), EmbeddedPgError> {
        self.signal_and_wait(Signal::SIGINT)
    }

    /// Immediate shutdown, as close to a crash as Postgres allows.
    pub fn crash(&self) -> Result<(), EmbeddedPgError> {
        self.signal_and_wait(Signal::SIGQUIT)
    }

    /// Starts the server again on the same port and data directory.
    pub fn restart(&self) -> Result<(), EmbeddedPgError> {
        self.signal_and_wait(Signal::SIGINT)?;
        self.boot(self.port)
    }

    /// Starts the server again after [`stop`](Self::stop) or
    /// [`crash`](Self::crash), on the same port.
    pub fn start_again(&self) -> Result<(), EmbeddedPgError> {
        self.boot(self.port)
    }

    /// A hot standby of this server: `pg_basebackup -R` (which writes
    /// `primary_conninfo` and `standby.signal`) into a fresh directory,
    /// started with `options` on a free port; it streams from this server
    /// from then on. The settings must not be below the primary's where
    /// a standby needs that (`max_connections` and the like).
    pub fn start_standby(&self, options: PgOptions) -> Result<PgServer, EmbeddedPgError> {
        let work = tempfile::Builder::new()
            .prefix("pgrelay-pg-standby-")
            .tempdir()
            .map_err(io_err("creating a temporary directory"))?;
        give_to(work.path(), self.run_as)?;
        let data_dir = work.path().join("data");
        let mut cmd = self.command("pg_basebackup");
        cmd.arg("-D").arg(&data_dir).args([
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-p",
        ]);
        cmd.arg(self.port.to_string());
        let out = cmd.output().map_err(io_err("running pg_basebackup"))?;
        if !out.status.success() {
            return Err(EmbeddedPgError::Command {
                what: "pg_basebackup".into(),
                status: out.status.to_string(),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        let standby = PgServer {
            bin_dir: self.bin_dir.clone(),
            data_dir,
            work,
            port: 0,
            run_as: self.run_as,
            settings: options.settings,
            child: Mutex::new(None),
        };
        standby.boot_on_free_port()
    }

    fn initdb(&self) -> Result<(), EmbeddedPgError> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(&self.data_dir).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        let out = cmd.output().map_err(io_err("running initdb"))?;
        if !out.status.success() {
            return Err(EmbeddedPgError::Command {
                what: "initdb".into(),
                status: out.status.to_string(),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(())
    }

    /// Picks a free port and boots; another process can grab the port
    /// between our probe and the server's bind, so a few tries are allowed.
    fn boot_on_free_port(mut self) -> Result<Self, EmbeddedPgError> {
        let mut last = None;
        for _ in 0..5 {
            self.port = free_port()?;
            match self.boot(self.port) {
                Ok(()) => return Ok(self),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(EmbeddedPgError::StartTimeout {
            seconds: 0,
            log: String::new(),
        }))
    }

    fn boot(&self, port: u16) -> Result<(), EmbeddedPgError> {
        let mut child_slot = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if child_slot.is_some() {
            return Ok(());
        }
        let log_path = self.log_path();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(format!("opening {}", log_path.display())))?;
        let log_start = log
            .metadata()
            .map_err(io_err("reading the log's size"))?
            .len();
        give_to(&log_path, self.run_as)?;
        let log_err = log
            .try_clone()
            .map_err(io_err("duplicating the log handle"))?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(self.work.path())
            .args(["-c", "listen_addresses=127.0.0.1"]);
        for (name, value) in &self.settings {
            cmd.arg("-c").arg(format!("{name}={value}"));
        }
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        // Our own process group: a Ctrl-C in the terminal reaches us, and we
        // stop the server in order, instead of both racing.
        cmd.process_group(0);
        // SAFETY: the closure only calls prctl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGINT).map_err(io::Error::from)
            });
        }
        let mut child = spawn_from_keeper(cmd).map_err(io_err("starting postgres"))?;

        let pid_file = self.data_dir.join("postmaster.pid");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().map_err(io_err("waiting for postgres"))? {
                return Err(EmbeddedPgError::ExitedDuringStart {
                    status: status.to_string(),
                    log: tail(&log_path, log_start),
                });
            }
            if postmaster_ready(&pid_file, child.id()) {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(EmbeddedPgError::StartTimeout {
                    seconds: START_TIMEOUT.as_secs(),
                    log: tail(&log_path, log_start),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        *child_slot = Some(child);
        Ok(())
    }

    fn signal_and_wait(&self, signal: Signal) -> Result<(), EmbeddedPgError> {
        let mut child_slot = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut child) = child_slot.take() else {
            return Ok(());
        };
        let pid = Pid::from_raw(child.id() as i32);
        // ESRCH means it already exited; wait() below reaps it either way.
        let _ = kill(pid, signal);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if child
                .try_wait()
                .map_err(io_err("waiting for postgres to stop"))?
                .is_some()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.current_dir(self.work.path());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        // Settings of the caller's environment must not leak into ours.
        for var in ["PGDATA", "PGPORT", "PGHOST", "PGOPTIONS"] {
            cmd.env_remove(var);
        }
        cmd
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.signal_and_wait(Signal::SIGINT);
    }
}

/// Spawns every server from one thread that lives as long as the process.
/// The parent-death signal fires when the *thread* that forked the child
/// exits, so spawning from a short-lived thread (a test's) would kill the
/// server as soon as that test ended.
fn spawn_from_keeper(cmd: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static KEEPER: OnceLock<Result<Mutex<mpsc::Sender<Request>>, String>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("pg-keeper".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .map(|_| Mutex::new(tx))
            .map_err(|e| e.to_string())
    });
    let keeper = keeper
        .as_ref()
        .map_err(|e| io::Error::other(format!("cannot start the pg-keeper thread: {e}")))?;
    let (reply_tx, reply_rx) = mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("the pg-keeper thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the pg-keeper thread is gone"))?
}

/// The postmaster writes its status into the last line of postmaster.pid;
/// "ready" means it accepts connections (Postgres 10+), "standby" that a
/// hot standby accepts read-only ones.
fn postmaster_ready(pid_file: &Path, pid: u32) -> bool {
    let Ok(text) = fs::read_to_string(pid_file) else {
        return false;
    };
    let mut lines = text.lines();
    lines.next().map(str::trim) == Some(pid.to_string().as_str())
        && matches!(
            text.lines().nth(7).map(str::trim),
            Some("ready" | "standby")
        )
}

/// The directory holding initdb and postgres: `PGRELAY_PG_BIN`, then the
/// one of `initdb` on PATH, then the newest `/usr/lib/postgresql/*/bin`.
fn find_bin_dir() -> Result<PathBuf, EmbeddedPgError> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("PGRELAY_PG_BIN").map(PathBuf::from) {
        if has_both(&dir) {
            return Ok(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if initdb.is_file() {
                // Symlinks in /usr/local/bin point into the real bin dir,
                // where postgres sits next to initdb.
                if let Some(real) = initdb
                    .canonicalize()
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                {
                    if has_both(&real) {
                        return Ok(real);
                    }
                }
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_both(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or(EmbeddedPgError::BinariesNotFound)
}

/// `Some(postgres uid/gid)` when we are root, `None` otherwise.
fn server_user() -> Result<Option<(Uid, Gid)>, EmbeddedPgError> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    match User::from_name("postgres") {
        Ok(Some(user)) => Ok(Some((user.uid, user.gid))),
        _ => Err(EmbeddedPgError::NoPostgresUser),
    }
}

/// Hands a path we created to the server's user.
fn give_to(path: &Path, run_as: Option<(Uid, Gid)>) -> Result<(), EmbeddedPgError> {
    if let Some((uid, gid)) = run_as {
        nix::unistd::chown(path, Some(uid), Some(gid)).map_err(|e| {
            io_err(format!("giving {} to the postgres user", path.display()))(e.into())
        })?;
    }
    Ok(())
}

fn free_port() -> Result<u16, EmbeddedPgError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("finding a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("finding a free port"))?
        .port();
    Ok(port)
}

/// The last lines the server logged since `from`, for error messages.
fn tail(path: &Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = fs::File::open(path) {
        let _ = file.seek(SeekFrom::Start(from));
        let _ = file.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Removes the work directories of private servers whose owner died
/// without dropping its `PgServer` (a killed `pgrelay serve`, a test binary
/// whose shared server lives in a static): the postmaster went with its
/// parent, but its directory stayed, about 250 MiB each. A directory is
/// abandoned when it is older than ten minutes (never one being set up) and
/// no live postmaster holds it (its `postmaster.pid` names no running
/// process, or a zombie). Errors are ignored: this is housekeeping.
fn sweep_abandoned_work_dirs() {
    const GRACE: Duration = Duration::from_secs(600);
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("pgrelay-pg-"));
        let old_enough = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > GRACE);
        if is_ours && old_enough && !postmaster_alive(&path) {
            tracing::debug!(dir = %path.display(), "removing an abandoned private server directory");
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// Whether a running, non-zombie postmaster holds the work directory
/// `work`: one named by its data directory's `postmaster.pid`, or by the
/// lock file of its socket (which is in `work` even when the data
/// directory is elsewhere).
fn postmaster_alive(work: &Path) -> bool {
    let mut pid_files = vec![work.join("data").join("postmaster.pid")];
    if let Ok(entries) = fs::read_dir(work) {
        pid_files.extend(entries.flatten().map(|e| e.path()).filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".s.PGSQL.") && n.ends_with(".lock"))
        }));
    }
    pid_files.iter().any(|f| pid_file_alive(f))
}

/// Whether the PID on the first line of `file` is a running, non-zombie
/// process.
fn pid_file_alive(file: &Path) -> bool {
    let Ok(text) = fs::read_to_string(file) else {
        return false;
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok())
    else {
        return false;
    };
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

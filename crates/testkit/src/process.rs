//! A relay as a child process, so that its memory and CPU are its own and
//! can be measured apart from the clients that load it; and what `/proc`
//! says of a process.

use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use crate::{http, Error, Result};

/// A relay child process serving on `addr`. Dropping it kills the process.
pub struct RelayProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

/// A free 127.0.0.1 port, for a child to listen on.
pub fn free_addr() -> Result<SocketAddr> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(([127, 0, 0, 1], port).into())
}

impl RelayProcess {
    /// Spawns `command` (a relay told to listen on `addr`) and waits up to
    /// ten seconds until its `/healthz` answers 200, which the relay does
    /// only while it LISTENs.
    pub async fn spawn(command: &mut Command, addr: SocketAddr) -> Result<RelayProcess> {
        let child = command.spawn()?;
        let mut relay = RelayProcess { child, addr };
        for _ in 0..200 {
            if let Some(status) = relay.child.try_wait()? {
                return Err(Error::Process(format!("exited at start: {status}")));
            }
            if http::get(addr, "/healthz")
                .await
                .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
            {
                return Ok(relay);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(Error::Process(format!(
            "did not become healthy on {addr} within 10 s"
        )))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the relay process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// CPU seconds the relay process has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// SIGTERM (a graceful shutdown), then the exit status.
    pub fn terminate(mut self) -> Result<ExitStatus> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .map_err(|e| Error::Process(format!("could not be sent SIGTERM: {e}")))?;
        Ok(self.child.wait()?)
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process, in KiB (0 if it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    // utime and stime: the 14th and 15th fields of the whole line.
    let f = stat_fields(pid);
    (stat_ticks(&f, 11) + stat_ticks(&f, 12)) / TICKS_PER_SECOND
}

/// CPU seconds used by Postgres: every live `postgres` process, plus what
/// the postmaster's exited children used (its cutime and cstime), so
/// backends that come and go are still counted.
pub fn postgres_cpu_seconds() -> f64 {
    let comm = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let mut ticks = 0.0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if comm(&pid.to_string()).trim() != "postgres" {
                continue;
            }
            let f = stat_fields(pid);
            ticks += stat_ticks(&f, 11) + stat_ticks(&f, 12);
            let parent = f.get(1).cloned().unwrap_or_default();
            if comm(&parent).trim() != "postgres" {
                ticks += stat_ticks(&f, 13) + stat_ticks(&f, 14);
            }
        }
    }
    ticks / TICKS_PER_SECOND
}

/// Linux's USER_HZ, the unit of /proc/PID/stat's times.
const TICKS_PER_SECOND: f64 = 100.0;

/// The fields of /proc/PID/stat after the command name.
fn stat_fields(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, r)| r.to_string()))
        .map(|r| r.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

fn stat_ticks(fields: &[String], i: usize) -> f64 {
    fields
        .get(i)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

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

    /// Resident memory of the relay process, in KiB. Panics (naming the
    /// process and the reason) when it cannot be read: a memory bound
    /// measured against a made-up figure would pass whatever the relay did.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.pid();
        rss_kib(pid).unwrap_or_else(|e| panic!("resident memory of relay pid {pid}: {e}"))
    }

    /// CPU seconds the relay process has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// SIGKILL: the relay dies with no goodbye (no close frames, no
    /// lease ended), as in a crash or an OOM kill; returns once it is gone.
    pub fn kill(mut self) -> Result<ExitStatus> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(|e| Error::Process(format!("could not be sent SIGKILL: {e}")))?;
        Ok(self.child.wait()?)
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

/// Resident memory of a process, in KiB: an error when `/proc/PID/status`
/// cannot be read or has no parsable `VmRSS:` line (an exited process, a
/// kernel thread, not Linux), never a made-up 0.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)
        .map_err(|e| Error::Process(format!("reading {path}: {e}")))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| Error::Process(format!("{path} has no VmRSS line")))?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| Error::Process(format!("{path}: unparsable {line:?}")))?;
    if kib == 0 {
        return Err(Error::Process(format!("{path}: VmRSS is 0 ({line:?})")));
    }
    Ok(kib)
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    // utime and stime: the 14th and 15th fields of the whole line.
    let f = stat_fields(pid);
    (stat_ticks(&f, 11) + stat_ticks(&f, 12)) / TICKS_PER_SECOND
}

/// CPU seconds used by one Postgres server: its postmaster, the live
/// children, and the children that have exited (the postmaster's cutime
/// and cstime); apart from any other server on the machine, such as a
/// standby of it.
pub fn server_cpu_seconds(postmaster: u32) -> f64 {
    let own = stat_fields(postmaster);
    let mut ticks = (11..=14).map(|i| stat_ticks(&own, i)).sum::<f64>();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let f = stat_fields(pid);
            if f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(postmaster) {
                ticks += stat_ticks(&f, 11) + stat_ticks(&f, 12);
            }
        }
    }
    ticks / TICKS_PER_SECOND
}

/// Busy CPU seconds of the whole machine since boot, from the first line
/// of `/proc/stat` (user, nice, system, irq, softirq and steal; guest time
/// is inside user already): with the processes' own, what the rest of a
/// shared machine used.
pub fn machine_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| Error::ProcStat("no cpu line".into()))?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse::<f64>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::ProcStat(format!("unparsable line {line:?}")))?;
    if ticks.len() < 8 {
        return Err(Error::ProcStat(format!("short line {line:?}")));
    }
    // user nice system idle iowait irq softirq steal
    let busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7];
    Ok(busy / TICKS_PER_SECOND)
}

/// Linux's USER_HZ, the unit of /proc/PID/stat's and /proc/stat's times.
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

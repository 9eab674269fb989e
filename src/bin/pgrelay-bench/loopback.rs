//! What a crowd of loopback clients needs from this machine: source
//! addresses and open files.
//!
//! Loopback gives about 28,000 ephemeral ports per source address, and
//! every 127.0.0.x address works as a source without configuration, so a
//! crowd is spread over 127.0.0.2, .3, ... Every connection is one open
//! file in the bench and one in the relay; [`check_open_files`] fails a
//! run that could not hold its crowd before anything is opened (`main`
//! has already raised the limits as far as this process may).

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{bail, Context};

use crate::env::Env;

/// Files each process needs besides the crowd's sockets (Postgres
/// connections, the listener, probes, the runtimes' own).
const SPARE_FILES: u64 = 200;

/// The source address of client `k` when each address takes `per_source`
/// clients: 127.0.0.2 for the first `per_source`, then .3, ...
pub fn source(k: usize, per_source: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (k / per_source.max(1)) as u8))
}

/// How many source addresses `count` clients take at `per_source` each;
/// an error past 127.0.0.251.
pub fn sources(count: usize, per_source: usize) -> anyhow::Result<usize> {
    let sources = count.div_ceil(per_source.max(1));
    if sources > 250 {
        bail!("{count} clients at {per_source} per source address need more than 127.0.0.2..251");
    }
    Ok(sources)
}

/// Fails before opening anything when the bench or the relay could not
/// hold `count` sockets: a run that dies at the limit midway says less.
/// Both ends of every loopback connection are a file, one in each process.
pub fn check_open_files(env: &Env, count: usize) -> anyhow::Result<()> {
    let need = count as u64 + SPARE_FILES;
    for (who, pid) in [
        ("the bench", std::process::id()),
        ("the relay", env.relay.pid()),
    ] {
        let (soft, hard) = open_files_limit(pid)?;
        if soft < need {
            bail!(
                "{count} connections need {need} open files in {who} (pid {pid}); its RLIMIT_NOFILE \
                 is {soft} (hard {hard}), and raising the hard limit needs root with \
                 CAP_SYS_RESOURCE (or run under `prlimit --nofile={need}`); at most {} \
                 connections fit",
                soft.saturating_sub(SPARE_FILES)
            );
        }
    }
    Ok(())
}

/// A process's RLIMIT_NOFILE (soft, hard), from `/proc/PID/limits`.
fn open_files_limit(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/limits");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .with_context(|| format!("{path} has no open-files line"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    let mut next = || -> anyhow::Result<u64> {
        let field = fields.next().context("short open-files line")?;
        Ok(field.parse().unwrap_or(u64::MAX)) // "unlimited"
    };
    Ok((next()?, next()?))
}

/// Bytes waiting in the receive queues of every established connection
/// to port `relay_port` (the crowd's client ends; the relay's ends have
/// the relay as local port): what the clients have not read yet, from
/// `/proc/net/tcp`.
pub fn unread_by_clients(relay_port: u16) -> anyhow::Result<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").context("reading /proc/net/tcp")?;
    let want = format!(":{relay_port:04X}");
    let mut unread = 0;
    for line in table.lines().skip(1) {
        // sl local rem st tx_queue:rx_queue ...
        let mut fields = line.split_whitespace().skip(2);
        let (Some(remote), Some(state), Some(queues)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if state != "01" || !remote.ends_with(&want) {
            continue;
        }
        let rx = queues.split_once(':').map(|(_, rx)| rx).unwrap_or("0");
        unread += u64::from_str_radix(rx, 16)
            .with_context(|| format!("unparsable queue {queues:?} in /proc/net/tcp"))?;
    }
    Ok(unread)
}

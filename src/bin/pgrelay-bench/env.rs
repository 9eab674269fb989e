//! What every scenario runs against: a private Postgres with a migrated
//! `bench` database and a relay process, plus the database clients and the
//! CPU meter the scenarios use.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pgrelay::auth::Authenticator;
use pgrelay::db::embedded::{PgOptions, PgServer};
use testkit::process::{free_addr, machine_busy_seconds, server_cpu_seconds, RelayProcess};
use tokio_postgres::{Client, NoTls};

use crate::relay::SECRET;

/// A private Postgres, a migrated database and a relay process; for
/// `replicas`, also a streaming standby the relays read the log from.
pub struct Env {
    /// Declared before the servers, so a failed run stops the relay first.
    pub relay: RelayProcess,
    /// Declared before `pg`: the standby stops before its primary.
    standby: Option<PgServer>,
    pg: PgServer,
    pub url: String,
    replica_url: Option<String>,
    auth: Authenticator,
}

impl Env {
    pub async fn start() -> anyhow::Result<Env> {
        Env::start_with(&crate::relay::Limits::default()).await
    }

    /// [`Env::start`], the relay running with `limits`.
    pub async fn start_with(limits: &crate::relay::Limits) -> anyhow::Result<Env> {
        Env::start_full(limits, false).await
    }

    /// [`Env::start`] with a hot standby (`pg_basebackup -R`) that this
    /// relay and every one [`Env::spawn_relay`] starts read the log from.
    pub async fn start_with_standby(limits: &crate::relay::Limits) -> anyhow::Result<Env> {
        Env::start_full(limits, true).await
    }

    async fn start_full(limits: &crate::relay::Limits, standby: bool) -> anyhow::Result<Env> {
        let mut options = PgOptions::for_tests();
        // Durable but not waiting for fsync per commit: this disk's fsync
        // otherwise caps every scenario near 450 commits/s.
        // With a standby, WAL it has yet to stream is kept for it.
        let keep_wal: &[(&str, &str)] = if standby {
            &[("wal_keep_size", "512MB")]
        } else {
            &[]
        };
        options.settings = settings(keep_wal);
        let pg = tokio::task::spawn_blocking(move || PgServer::start(options)).await??;
        let (admin, conn) = tokio_postgres::connect(&pg.url("postgres"), NoTls).await?;
        tokio::spawn(conn);
        admin.batch_execute("CREATE DATABASE bench").await?;
        let url = pg.url("bench");
        pgrelay::db::schema::migrate(&url, pgrelay::db::schema::Apps::WITH_CHAT).await?;
        let standby = match standby {
            false => None,
            true => Some(tokio::task::block_in_place(|| {
                pg.start_standby(PgOptions {
                    data_dir: None,
                    settings: settings(&[]),
                })
            })?),
        };
        let replica_url = standby.as_ref().map(|s| s.url("bench"));
        let relay = spawn_relay(&url, replica_url.as_deref(), limits).await?;
        Ok(Env {
            relay,
            standby,
            pg,
            url,
            replica_url,
            auth: Authenticator::hs256(SECRET.as_bytes(), Duration::ZERO),
        })
    }

    /// Another relay process on the same database (this binary's hidden
    /// `relay` mode, as [`Env::start`]'s).
    pub async fn spawn_relay(&self, limits: &crate::relay::Limits) -> anyhow::Result<RelayProcess> {
        spawn_relay(&self.url, self.replica_url.as_deref(), limits).await
    }

    /// CPU seconds the primary's processes have used so far (not the
    /// standby's).
    pub fn primary_cpu_seconds(&self) -> anyhow::Result<f64> {
        let pid = self.pg.pid().context("the primary's postmaster pid")?;
        Ok(server_cpu_seconds(pid))
    }

    /// CPU seconds the standby's processes have used so far; 0 without one.
    pub fn standby_cpu_seconds(&self) -> anyhow::Result<f64> {
        match &self.standby {
            None => Ok(0.0),
            Some(s) => Ok(server_cpu_seconds(
                s.pid().context("the standby's postmaster pid")?,
            )),
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.relay.addr
    }

    /// A token for `user`, valid for longer than any run.
    pub fn token(&self, user: &str) -> anyhow::Result<String> {
        Ok(self.auth.issue(user, Duration::from_secs(3600))?)
    }

    /// A token for each of `users`, in order, shared by the clients.
    pub fn tokens(&self, users: &[String]) -> anyhow::Result<Arc<[String]>> {
        Ok(users
            .iter()
            .map(|u| self.token(u))
            .collect::<anyhow::Result<Vec<_>>>()?
            .into())
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        self.client_named("pgrelay_bench").await
    }

    /// A client that pg_stat_activity shows under `application_name`.
    pub async fn client_named(&self, application_name: &str) -> anyhow::Result<Client> {
        let mut config: tokio_postgres::Config = self.url.parse()?;
        config.application_name(application_name);
        let (c, conn) = config.connect(NoTls).await?;
        tokio::spawn(conn);
        Ok(c)
    }

    /// Projects `p1`..`pN`, each with every one of `members`.
    pub async fn seed_projects(&self, projects: usize, members: &[String]) -> anyhow::Result<()> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO chat.projects (id, name) SELECT 'p' || g, 'bench ' || g FROM generate_series(1, $1::int) g",
            &[&(projects as i32)],
        )
        .await?;
        c.execute(
            "INSERT INTO chat.project_members (project_id, user_id)
             SELECT 'p' || g, u FROM generate_series(1, $1::int) g, unnest($2::text[]) u",
            &[&(projects as i32), &members],
        )
        .await?;
        Ok(())
    }

    /// Starts measuring the CPU of the relay, of this run's Postgres (the
    /// primary alone, not other servers on the machine), of this bench
    /// process and of the whole machine, from now on.
    pub fn cpu_meter(&self) -> anyhow::Result<CpuMeter<'_>> {
        Ok(CpuMeter {
            env: self,
            start: self.cpu_now()?,
        })
    }

    fn cpu_now(&self) -> anyhow::Result<Cores> {
        Ok(Cores {
            relay: self.relay.cpu_seconds(),
            postgres: self.primary_cpu_seconds()?,
            bench: testkit::process::cpu_seconds(std::process::id()),
            machine: machine_busy_seconds()?,
        })
    }

    /// Stops the relay (SIGTERM, a graceful shutdown), then Postgres.
    pub fn stop(self) -> anyhow::Result<()> {
        let Env {
            relay, standby, pg, ..
        } = self;
        relay.terminate()?;
        drop(standby);
        drop(pg);
        Ok(())
    }
}

/// The server settings of the bench's Postgres, with `extra`.
fn settings(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    [
        ("synchronous_commit", "off"),
        ("max_connections", "300"),
        ("shared_buffers", "256MB"),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// This binary in its hidden `relay` mode against `url` (reading the log
/// from `replica_url` when given), once healthy.
async fn spawn_relay(
    url: &str,
    replica_url: Option<&str>,
    limits: &crate::relay::Limits,
) -> anyhow::Result<RelayProcess> {
    let addr = free_addr()?;
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args([
            "relay",
            "--database-url",
            url,
            "--listen",
            &addr.to_string(),
        ])
        .args(limits.args())
        .args(replica_url.into_iter().flat_map(|r| ["--replica-url", r]))
        .env("RUST_LOG", "warn");
    Ok(RelayProcess::spawn(&mut command, addr).await?)
}

/// CPU used since [`Env::cpu_meter`], each part apart: on a shared
/// machine, what the rest used (`machine` less the three) tells a quiet
/// run from a contended one.
pub struct CpuMeter<'a> {
    env: &'a Env,
    start: Cores,
}

/// CPU seconds, or cores once divided by a window.
#[derive(Clone, Copy, Debug)]
pub struct Cores {
    pub relay: f64,
    pub postgres: f64,
    pub bench: f64,
    /// Every CPU of the machine, busy (not idle or waiting on I/O).
    pub machine: f64,
}

impl Cores {
    /// What neither the relay, nor this run's Postgres, nor the bench used.
    pub fn others(&self) -> f64 {
        (self.machine - self.relay - self.postgres - self.bench).max(0.0)
    }
}

impl CpuMeter<'_> {
    /// Cores used on average over a window of `seconds`.
    pub fn cores(&self, seconds: f64) -> anyhow::Result<Cores> {
        let now = self.env.cpu_now()?;
        let per_s = |a: f64, b: f64| (a - b) / seconds;
        Ok(Cores {
            relay: per_s(now.relay, self.start.relay),
            postgres: per_s(now.postgres, self.start.postgres),
            bench: per_s(now.bench, self.start.bench),
            machine: per_s(now.machine, self.start.machine),
        })
    }
}

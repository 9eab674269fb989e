//! `pgrelay doctor`: is this deployment right? An installation can be
//! quietly wrong (the default deny-all rule, a capture trigger dropped by
//! an app's migration, the relay's role without its grants, LISTEN behind a
//! transaction pooler, a standby the relay cannot see streaming, a notice
//! queue held by a forgotten listener, a log nobody trims) and each of
//! these used to be found by reading logs after users complained.
//!
//! Each check answers ok, warn or fail, and every warn or fail carries the
//! command or SQL that fixes it. The doctor reads only: it applies no
//! migration and no fix. The one thing it sends is a NOTIFY on a private
//! channel, to prove LISTEN from another session as the relay does; a
//! notice is not data and nothing stores it.
//!
//! The checks, by group: [`database`] (connection, migrations, grants,
//! channel), [`rule`] (`relay.authorize`), [`capture`] (triggers and
//! membership declarations), [`notices`] (LISTEN proof and the notice
//! queue), [`replicas`], [`eventlog`] (size and retention) and [`relay`] (a
//! running relay's `/healthz`).

mod capture;
mod database;
mod eventlog;
mod notices;
mod relay;
mod replicas;
mod rule;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::{Client, NoTls};

use crate::config::RelayConfig;
use crate::db::connect::{self, ConnectError, PoolOptions};
use crate::db::pool::{DbError, Statements};
use crate::db::schema::Apps;
use crate::metrics::Metrics;
use crate::relay::log::{EventLog, LogError};

/// What the doctor checks with: the relay's own settings, and its own.
#[derive(Clone)]
pub struct DoctorConfig {
    /// As `serve` would run: URLs, channel, timeouts, replicas, retention.
    pub relay: RelayConfig,
    /// The apps whose migrations are expected.
    pub apps: Apps,
    /// A running relay (`http://host:port`) whose `/healthz` is read too.
    pub relay_url: Option<String>,
    /// How long the LISTEN proof waits for its notice.
    pub listen_timeout: Duration,
    /// Notice-queue usage (0 to 1) from which the doctor warns; it fails
    /// from `max(this, 0.5)`.
    pub queue_warn: f64,
}

/// A check's verdict. Ordered: the worst wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    /// What was found, in one sentence or a few.
    pub summary: String,
    /// The command or SQL that fixes a warn or fail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: impl Into<String>, summary: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Ok,
            summary: summary.into(),
            fix: None,
        }
    }

    fn warn(name: impl Into<String>, summary: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Warn,
            summary: summary.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(name: impl Into<String>, summary: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Fail,
            summary: summary.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Every check's verdict, in the order they ran.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The worst of the checks.
    pub status: Status,
    pub checks: Vec<Check>,
}

impl Report {
    fn new(checks: Vec<Check>) -> Report {
        Report {
            status: checks.iter().map(|c| c.status).max().unwrap_or(Status::Ok),
            checks,
        }
    }

    /// For a person: one line per check, each fix indented below it.
    pub fn to_text(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            let _ = writeln!(
                out,
                "{:<4}  {:<width$}  {}",
                c.status.label(),
                c.name,
                c.summary
            );
            if let Some(fix) = &c.fix {
                let indent = " ".repeat(width + 8);
                for (i, line) in fix.lines().enumerate() {
                    let lead = if i == 0 { "fix: " } else { "     " };
                    let _ = writeln!(out, "{indent}{lead}{line}");
                }
            }
        }
        let (warns, fails) = self.checks.iter().fold((0, 0), |(w, f), c| match c.status {
            Status::Warn => (w + 1, f),
            Status::Fail => (w, f + 1),
            Status::Ok => (w, f),
        });
        let _ = writeln!(
            out,
            "{} checks: {} ok, {warns} warn, {fails} fail",
            self.checks.len(),
            self.checks.len() - warns - fails
        );
        out
    }
}

/// Why a check could not be made; it then fails with this as its reason.
#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Pool(#[from] DbError),
    #[error("{0}")]
    Log(#[from] LogError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// What the checks share: a connection of the doctor's own for catalog
/// queries (unnamed statements, so a transaction pooler passes them), and
/// a pool like the relay's for what the relay itself runs.
struct Probe<'a> {
    config: &'a DoctorConfig,
    client: Client,
    log: EventLog,
}

impl Probe<'_> {
    /// One catalog query, bounded by the query timeout.
    async fn query(
        &self,
        sql: &str,
        params: &[(
            &(dyn tokio_postgres::types::ToSql + Sync),
            tokio_postgres::types::Type,
        )],
    ) -> Result<Vec<tokio_postgres::Row>, CheckError> {
        let timeout = self.config.relay.query_timeout;
        tokio::time::timeout(timeout, self.client.query_typed(sql, params))
            .await
            .map_err(|_| CheckError::Timeout(timeout))?
            .map_err(CheckError::from)
    }
}

/// Opens the doctor's own connection to `url`.
async fn connect_client(url: &str) -> Result<Client, CheckError> {
    let config = connect::config(url, "pgrelay-doctor")?;
    let wait = connect::CONNECT_TIMEOUT * 2;
    let (client, connection) = tokio::time::timeout(wait, config.connect(NoTls))
        .await
        .map_err(|_| CheckError::Timeout(wait))?
        .map_err(ConnectError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "doctor connection ended");
        }
    });
    Ok(client)
}

/// Runs every check and returns the report; never writes to the database.
pub async fn run(config: &DoctorConfig) -> Report {
    let relay = &config.relay;
    let mut checks = Vec::new();
    let client = match connect_client(&relay.database_url).await {
        Ok(client) => client,
        Err(e) => {
            checks.push(Check::fail(
                "database",
                format!("cannot connect with DATABASE_URL: {e}", e = why(&e)),
                "check DATABASE_URL (host, port, database, role, password) and that the server accepts \
                 this client (pg_hba.conf)",
            ));
            if let Some(url) = &config.relay_url {
                checks.push(relay::check(url).await);
            }
            return Report::new(checks);
        }
    };
    let statements = if relay.transaction_pooler {
        Statements::Unnamed
    } else {
        Statements::Prepared
    };
    let pool = match connect::pool(
        &relay.database_url,
        &PoolOptions {
            name: "doctor".into(),
            size: 2,
            query_timeout: relay.query_timeout,
            statements,
        },
    ) {
        Ok(pool) => pool,
        Err(e) => {
            checks.push(Check::fail(
                "database",
                format!("cannot build a pool for DATABASE_URL: {e}", e = why(&e)),
                "check DATABASE_URL",
            ));
            return Report::new(checks);
        }
    };
    let log = EventLog::new(
        pool,
        Arc::new(Metrics::default()),
        &relay.membership_resources,
    );
    let probe = Probe {
        config,
        client,
        log,
    };
    let (database, installed) = database::connection(&probe).await;
    checks.push(database);
    if installed {
        checks.push(database::migrations(&probe).await);
        checks.push(database::grants(&probe).await);
        checks.push(rule::check(&probe).await);
        checks.push(capture::triggers(&probe).await);
        checks.push(capture::membership(&probe).await);
        checks.push(database::channel(&probe).await);
    }
    checks.push(notices::listen(&probe).await);
    checks.extend(replicas::check(&probe).await);
    checks.push(notices::queue(&probe).await);
    if installed {
        checks.push(eventlog::check(&probe).await);
    }
    if let Some(url) = &config.relay_url {
        checks.push(relay::check(url).await);
    }
    for c in &checks {
        tracing::debug!(check = %c.name, status = c.status.label(), summary = %c.summary, "doctor check");
    }
    Report::new(checks)
}

/// An error with its causes: tokio-postgres says only "db error" until
/// its source (the server's message) is shown.
fn why(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// A string as an SQL literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A name as an SQL identifier, always quoted.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_check_is_the_report_status_and_fixes_are_indented() {
        let report = Report::new(vec![
            Check::ok("database", "fine"),
            Check::warn("queue", "filling", "SELECT 1;\nSELECT 2;"),
        ]);
        assert_eq!(report.status, Status::Warn);
        let text = report.to_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "ok    database  fine");
        assert_eq!(lines[1], "warn  queue     filling");
        assert_eq!(lines[2], "                fix: SELECT 1;");
        assert_eq!(lines[3], "                     SELECT 2;");
        assert_eq!(lines[4], "2 checks: 1 ok, 1 warn, 0 fail");
        let failing = Report::new(vec![Check::fail("a", "x", "y"), Check::warn("b", "x", "y")]);
        assert_eq!(failing.status, Status::Fail);
        let json = serde_json::to_value(&failing).unwrap_or_default();
        assert_eq!(json["status"], "fail");
        assert_eq!(json["checks"][1]["status"], "warn");
        assert_eq!(json["checks"][0]["fix"], "y");
        assert!(Report::new(vec![Check::ok("a", "b")]).checks[0]
            .fix
            .is_none());
    }

    #[test]
    fn literals_and_identifiers_are_quoted() {
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
    }
}

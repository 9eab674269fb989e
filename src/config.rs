//! The settings: [`ServeArgs`] is what `pgrelay serve` takes from its
//! flags and the environment (each documented in
//! `docs/configuration.md`), [`RelayConfig`] is what a relay runs with.
//! The binary only parses; the library, and the tests, take a
//! `RelayConfig`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::Parser;

use crate::auth::AuthConfig;
use crate::db::schema::Apps;
use crate::jwks::{JwksConfig, JwksSource};
use crate::retention::RetentionConfig;

/// A setting that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ConfigError {
    fn read(path: &Path, source: std::io::Error) -> Self {
        ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Everything a relay needs to know. Defaults are the documented ones.
#[derive(Clone)]
pub struct RelayConfig {
    /// The primary, for log reads, authorization and the API; may go
    /// through a pooler (`DATABASE_URL`).
    pub database_url: String,
    /// A direct connection (or a session-mode pooler) for LISTEN and the
    /// session-level locks of retention; `DATABASE_URL` when `None`
    /// (`PGRELAY_LISTEN_DATABASE_URL`).
    pub listen_database_url: Option<String>,
    /// `DATABASE_URL` goes through a transaction-mode pooler: the pool
    /// sends unnamed statements and makes no session settings
    /// (`PGRELAY_TRANSACTION_POOLER`).
    pub transaction_pooler: bool,
    /// Deadline of every query the relay issues; a connection that misses
    /// it is discarded (`PGRELAY_QUERY_TIMEOUT`).
    pub query_timeout: Duration,
    /// Hot standbys for live and catch-up log reads
    /// (`PGRELAY_READ_REPLICA_URLS`).
    pub replica_urls: Vec<String>,
    /// Longest wait for a standby behind what a notice announced, before
    /// the primary is read (`PGRELAY_REPLICA_WAIT`).
    pub replica_wait: Duration,
    /// The NOTIFY channel (`PGRELAY_CHANNEL`).
    pub channel: String,
    /// How client tokens are checked.
    pub auth: AuthConfig,
    /// Resources whose events change membership, in addition to those the
    /// database declares (`relay.enable(..., p_grants_membership => true)`):
    /// subscribers of the scope are re-authorized after each (G4).
    pub membership_resources: Vec<String>,
    /// Every subscription is re-authorized this often, for rules that read
    /// tables nobody tracks; `None` turns the schedule off.
    pub reauthorize_interval: Option<Duration>,
    /// Longest a call of the app's `relay.authorize` may take; past it the
    /// subscriptions it was asked for end with `authorize_failed`.
    pub authorize_timeout: Duration,
    /// WebSocket ping period.
    pub ping_interval: Duration,
    /// A peer silent (or accepting no bytes) this long is closed.
    pub pong_timeout: Duration,
    /// Largest inbound WebSocket message.
    pub max_frame_bytes: usize,
    pub max_subscriptions_per_connection: usize,
    /// Open WebSockets per user; more are closed with 4029.
    pub max_connections_per_user: usize,
    /// Client frames per second per connection (twice that in a burst).
    pub max_frames_per_second: u32,
    /// Browser origins allowed to connect; empty allows any. Requests
    /// without an Origin header (non-browsers) are always allowed.
    pub allowed_origins: Vec<String>,
    pub max_concurrent_backfills: usize,
    /// Catch-up data (batches read from the log for clients behind the
    /// ring, not yet written) all sessions may hold together, in bytes.
    pub catchup_budget_bytes: usize,
    /// Open TCP connections, HTTP and WebSocket; more get 503.
    pub max_connections: usize,
    /// Connections not (yet) upgraded to a WebSocket (reading a request,
    /// being answered, idle between requests); more get 503.
    pub max_pending_connections: usize,
    /// Time for a request head to arrive (and for the next one on an idle
    /// keep-alive connection), for a `/v1` body, and for an upgrade to
    /// complete after its 101.
    pub http_read_timeout: Duration,
    /// Time for the first WebSocket frame after the upgrade.
    pub first_frame_timeout: Duration,
    /// HTTP API requests per second per user (twice that in a burst).
    pub api_requests_per_second: u32,
    /// Database connections for reads (not counting the LISTEN one).
    pub pool_size: usize,
    /// Per-scope limits of one log read.
    pub read_rows: i32,
    pub read_bytes: i64,
    /// Per-topic ring of recent frames.
    pub ring_frames: usize,
    pub ring_bytes: usize,
    /// Resync period while the LISTEN connection is down.
    pub poll_interval: Duration,
    /// Safety-net resync period while it is up.
    pub resync_interval: Duration,
    /// How often the LISTEN connection re-proves itself.
    pub probe_interval: Duration,
    /// How long shutdown waits for clients to take their close frames.
    pub shutdown_grace: Duration,
    /// Trimming of the event log; `None` leaves the log untrimmed.
    pub retention: Option<RetentionConfig>,
    /// A dead relay's presence members leave within this, for everyone
    /// (`PGRELAY_PRESENCE_TIMEOUT`).
    pub presence_timeout: Duration,
    /// Connections listed in one presence snapshot, at most.
    pub presence_snapshot_max: usize,
    /// Broadcasts and presence changes per second one project's clients
    /// may send through this relay, together; twice that in a burst
    /// (`PGRELAY_PROJECT_SIGNALS_PER_SECOND`).
    pub project_signals_per_second: u32,
    /// Where this relay runs (`PGRELAY_INSTANCE`; `serve` defaults to the
    /// host name and listen address): a relay that starts with the name of
    /// a dead one takes its presence members away at once. `None`: a name
    /// of its own, so a predecessor's members leave when its lease runs out.
    pub instance: Option<String>,
}

impl RelayConfig {
    pub fn new(database_url: impl Into<String>, jwt_secret: impl Into<Vec<u8>>) -> Self {
        RelayConfig {
            database_url: database_url.into(),
            listen_database_url: None,
            transaction_pooler: false,
            query_timeout: Duration::from_secs(5),
            replica_urls: Vec::new(),
            replica_wait: Duration::from_millis(50),
            channel: "cache_invalidate".into(),
            auth: AuthConfig {
                hs256_secret: Some(jwt_secret.into()),
                leeway: Duration::from_secs(5),
                ..AuthConfig::default()
            },
            membership_resources: Vec::new(),
            reauthorize_interval: Some(Duration::from_secs(60)),
            authorize_timeout: Duration::from_secs(2),
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(45),
            max_frame_bytes: 64 * 1024,
            max_subscriptions_per_connection: 100,
            max_connections_per_user: 32,
            max_frames_per_second: 50,
            allowed_origins: Vec::new(),
            max_concurrent_backfills: 8,
            catchup_budget_bytes: 64 << 20,
            max_connections: 10_000,
            max_pending_connections: 1_024,
            http_read_timeout: Duration::from_secs(10),
            first_frame_timeout: Duration::from_secs(10),
            api_requests_per_second: 50,
            pool_size: 16,
            read_rows: 500,
            read_bytes: 4 << 20,
            ring_frames: 4096,
            ring_bytes: 16 << 20,
            poll_interval: Duration::from_millis(500),
            resync_interval: Duration::from_secs(10),
            probe_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
            retention: Some(RetentionConfig::default()),
            presence_timeout: Duration::from_secs(15),
            presence_snapshot_max: 1_000,
            project_signals_per_second: 100,
            instance: None,
        }
    }

    /// Where LISTEN and the relay's session-level locks go.
    pub fn session_database_url(&self) -> &str {
        self.listen_database_url
            .as_deref()
            .unwrap_or(&self.database_url)
    }
}

/// The settings of `pgrelay serve`, each a flag and an environment
/// variable; `docs/configuration.md` lists them.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Database to use; without it a private Postgres is started. May go
    /// through a pooler (see PGRELAY_TRANSACTION_POOLER); a multi-host
    /// URL with target_session_attrs=read-write follows a failover.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// A direct connection to the primary (or a session-mode pooler) for
    /// LISTEN, retention's lock and migrations, when DATABASE_URL goes
    /// through a transaction-mode pooler. Default: DATABASE_URL.
    #[arg(long, env = "PGRELAY_LISTEN_DATABASE_URL")]
    pub listen_database_url: Option<String>,
    /// DATABASE_URL goes through a transaction-mode pooler (PgBouncer
    /// pool_mode=transaction): send unnamed statements, make no session
    /// settings.
    #[arg(
        long,
        env = "PGRELAY_TRANSACTION_POOLER",
        value_parser = BoolishValueParser::new(),
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true"
    )]
    pub transaction_pooler: bool,
    /// Deadline of every query; a connection that misses it is closed.
    #[arg(long, env = "PGRELAY_QUERY_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub query_timeout: Duration,
    /// How often the LISTEN connection proves itself.
    #[arg(long, env = "PGRELAY_PROBE_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub probe_interval: Duration,
    /// Hot standbys of the primary for reading the event log, separated by
    /// `;` (LISTEN, authorization, the API and writes stay on the primary).
    #[arg(long, env = "PGRELAY_READ_REPLICA_URLS", value_delimiter = ';')]
    pub read_replica_urls: Vec<String>,
    /// Longest wait for a standby that lags behind a notice before the
    /// primary is read instead.
    #[arg(long, env = "PGRELAY_REPLICA_WAIT", default_value = "50ms", value_parser = parse_duration)]
    pub replica_wait: Duration,
    /// How often subscribed projects are read while LISTEN is not proven.
    #[arg(long, env = "PGRELAY_POLL_INTERVAL", default_value = "500ms", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// Where the private Postgres keeps its data; a temporary directory
    /// (removed on exit) when not set.
    #[arg(long, env = "PGRELAY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address and port to serve on.
    #[arg(long, env = "PGRELAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// HS256 secret for client tokens (at least 16 bytes). With
    /// DATABASE_URL a secret or a public key is required; the private demo
    /// mode makes a random secret and prints tokens.
    #[arg(long, env = "PGRELAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// File holding the HS256 secret (trailing newline ignored).
    #[arg(long, env = "PGRELAY_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key (RSA for RS256, P-256 for ES256) to verify tokens.
    #[arg(long, env = "PGRELAY_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// Clock-skew allowance on exp and nbf.
    #[arg(long, env = "PGRELAY_JWT_LEEWAY", default_value = "5s", value_parser = parse_duration)]
    pub jwt_leeway: Duration,
    /// Required `aud` claim, if any.
    #[arg(long, env = "PGRELAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Required `iss` claim, if any.
    #[arg(long, env = "PGRELAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// URL of an identity provider's JWKS: tokens signed by its keys
    /// (RS256, ES256, EdDSA, ...) are accepted, the key picked by `kid`.
    #[arg(long, env = "PGRELAY_JWT_JWKS_URL", conflicts_with = "jwt_oidc_issuer")]
    pub jwt_jwks_url: Option<String>,
    /// An OIDC issuer URL: its discovery document names the JWKS, and
    /// `iss` must be this issuer unless PGRELAY_JWT_ISSUER says otherwise.
    #[arg(long, env = "PGRELAY_JWT_OIDC_ISSUER")]
    pub jwt_oidc_issuer: Option<String>,
    /// How often the JWKS is fetched again: the longest a key the provider
    /// removed keeps working.
    #[arg(long, env = "PGRELAY_JWT_JWKS_REFRESH", default_value = "5m", value_parser = parse_duration)]
    pub jwt_jwks_refresh: Duration,
    /// At most one JWKS fetch per this interval for tokens naming an
    /// unknown `kid`; also the first retry after a failed fetch.
    #[arg(long, env = "PGRELAY_JWT_JWKS_MIN_FETCH_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub jwt_jwks_min_fetch_interval: Duration,
    /// Deadline of one JWKS fetch (discovery included).
    #[arg(long, env = "PGRELAY_JWT_JWKS_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub jwt_jwks_timeout: Duration,
    /// Largest inbound WebSocket frame, in bytes.
    #[arg(long, env = "PGRELAY_MAX_FRAME_BYTES", default_value_t = 65_536)]
    pub max_frame_bytes: usize,
    /// Subscriptions per connection.
    #[arg(long, env = "PGRELAY_MAX_SUBSCRIPTIONS", default_value_t = 100)]
    pub max_subscriptions: usize,
    /// Open connections per user.
    #[arg(long, env = "PGRELAY_MAX_CONNECTIONS_PER_USER", default_value_t = 32)]
    pub max_connections_per_user: usize,
    /// Client frames per second per connection (twice that in a burst).
    #[arg(long, env = "PGRELAY_MAX_FRAMES_PER_SECOND", default_value_t = 50)]
    pub max_frames_per_second: u32,
    /// Concurrent catch-up reads of the event log.
    #[arg(long, env = "PGRELAY_MAX_BACKFILLS", default_value_t = 8)]
    pub max_backfills: usize,
    /// Catch-up data all lagging clients may hold together (batches read
    /// from the log, not yet written), e.g. 64MiB.
    #[arg(long, env = "PGRELAY_CATCHUP_BUDGET", default_value = "64MiB", value_parser = parse_bytes)]
    pub catchup_budget: usize,
    /// Open TCP connections (HTTP and WebSocket); more get 503.
    #[arg(long, env = "PGRELAY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Connections not (yet) upgraded to a WebSocket; more get 503.
    #[arg(long, env = "PGRELAY_MAX_PENDING_CONNECTIONS", default_value_t = 1_024)]
    pub max_pending_connections: usize,
    /// Time for a request head (and an idle keep-alive connection's next
    /// one), a /v1 body, and an upgrade after its 101.
    #[arg(long, env = "PGRELAY_HTTP_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http_read_timeout: Duration,
    /// Time for a WebSocket's first frame after the upgrade.
    #[arg(long, env = "PGRELAY_FIRST_FRAME_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub first_frame_timeout: Duration,
    /// Comma-separated browser origins allowed to connect (default: any).
    #[arg(long, env = "PGRELAY_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// HTTP API requests per second per user (twice that in a burst).
    #[arg(long, env = "PGRELAY_API_REQUESTS_PER_SECOND", default_value_t = 50)]
    pub api_requests_per_second: u32,
    /// Newest events kept per project by the retention job, however old.
    #[arg(long, env = "PGRELAY_RETENTION_KEEP_MIN", default_value_t = 1000)]
    pub retention_keep_min: i32,
    /// Events younger than this are never trimmed.
    #[arg(long, env = "PGRELAY_RETENTION_MIN_AGE", default_value = "1d", value_parser = parse_duration)]
    pub retention_min_age: Duration,
    /// How often the retention job runs.
    #[arg(long, env = "PGRELAY_RETENTION_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub retention_interval: Duration,
    /// Never trim the event log.
    ///
    /// Like every yes/no setting, it takes `1`/`0`, `true`/`false`,
    /// `yes`/`no` or `on`/`off`, and a bare `--no-retention` means yes.
    #[arg(
        long,
        env = "PGRELAY_NO_RETENTION",
        value_parser = BoolishValueParser::new(),
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true"
    )]
    pub no_retention: bool,
    /// Comma-separated resources whose events change membership, in
    /// addition to those the database declares (`relay.enable(...,
    /// p_grants_membership => true)`); not needed for safety.
    #[arg(long, env = "PGRELAY_MEMBERSHIP_RESOURCES", value_delimiter = ',')]
    pub membership_resources: Vec<String>,
    /// Re-authorize every subscription this often (0 turns it off), for
    /// rules that read tables nobody tracks.
    #[arg(long, env = "PGRELAY_REAUTHORIZE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub reauthorize_interval: Duration,
    /// Longest one call of `relay.authorize` may take.
    #[arg(long, env = "PGRELAY_AUTHORIZE_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub authorize_timeout: Duration,
    #[command(flatten)]
    pub apps: AppsArgs,
    /// The NOTIFY channel the capture triggers use.
    #[arg(long, env = "PGRELAY_CHANNEL", default_value = "cache_invalidate")]
    pub channel: String,
    /// A relay that dies (killed, cut off) has its presence members leave
    /// within this, for everyone (at least 3s).
    #[arg(long, env = "PGRELAY_PRESENCE_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub presence_timeout: Duration,
    /// Broadcasts and presence changes per second one project's clients
    /// may send through this relay, together (twice that in a burst).
    #[arg(
        long,
        env = "PGRELAY_PROJECT_SIGNALS_PER_SECOND",
        default_value_t = 100
    )]
    pub project_signals_per_second: u32,
    /// This relay's name for presence (default: host name and listen
    /// address). A relay that restarts under the same name takes its dead
    /// predecessor's presence members away at once.
    #[arg(long, env = "PGRELAY_INSTANCE")]
    pub instance: Option<String>,
}

impl Default for ServeArgs {
    fn default() -> Self {
        // The same defaults as the flags, environment included.
        ServeArgs::parse_from(["serve"])
    }
}

#[derive(Parser)]
struct ServeOnly {
    #[command(flatten)]
    args: ServeArgs,
}

impl ServeArgs {
    /// Parses serve's flags alone (and the environment), as the binary
    /// would; `argv[0]` is the program name.
    pub fn parse_from<const N: usize>(argv: [&str; N]) -> Self {
        ServeOnly::parse_from(argv).args
    }

    /// The keys client tokens are checked with: an HS256 secret (from the
    /// flag or its file) and a PEM public key, as configured. Both `None`
    /// means none was configured.
    pub fn token_keys(&self) -> Result<(Option<String>, Option<Vec<u8>>), ConfigError> {
        let secret = match (&self.jwt_secret, &self.jwt_secret_file) {
            (Some(s), _) if !s.is_empty() => Some(s.clone()),
            (_, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::read(path, e))?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            ),
            _ => None,
        };
        let public_key = match &self.jwt_public_key_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| ConfigError::read(path, e))?),
            None => None,
        };
        Ok((secret, public_key))
    }

    /// Where the identity provider's keys come from, if anywhere.
    pub fn jwks_config(&self) -> Option<JwksConfig> {
        let nonempty = |s: &Option<String>| s.as_ref().filter(|s| !s.trim().is_empty()).cloned();
        let source = match (
            nonempty(&self.jwt_jwks_url),
            nonempty(&self.jwt_oidc_issuer),
        ) {
            (Some(url), _) => JwksSource::Url(url),
            (None, Some(issuer)) => JwksSource::Issuer(issuer),
            (None, None) => return None,
        };
        Some(JwksConfig {
            refresh_interval: self.jwt_jwks_refresh.max(Duration::from_secs(1)),
            // Also the first retry after a failure: never a busy loop.
            min_fetch_interval: self.jwt_jwks_min_fetch_interval.max(Duration::from_secs(1)),
            fetch_timeout: self.jwt_jwks_timeout.max(Duration::from_millis(100)),
            ..JwksConfig::new(source)
        })
    }

    /// The relay's configuration for `database_url`, with tokens checked by
    /// `secret` and/or `public_key`.
    pub fn relay_config(
        &self,
        database_url: String,
        secret: Option<String>,
        public_key: Option<Vec<u8>>,
    ) -> RelayConfig {
        let mut config = RelayConfig::new(database_url, Vec::new());
        config.auth = AuthConfig {
            hs256_secret: secret.map(String::into_bytes),
            public_key_pem: public_key,
            leeway: self.jwt_leeway,
            audience: self.jwt_audience.clone(),
            issuer: self.jwt_issuer.clone(),
            jwks: self.jwks_config(),
        };
        config.channel = self.channel.clone();
        config.listen_database_url = self.listen_database_url.clone();
        config.transaction_pooler = self.transaction_pooler;
        config.query_timeout = self.query_timeout;
        config.probe_interval = self.probe_interval;
        config.poll_interval = self.poll_interval;
        config.replica_urls = self
            .read_replica_urls
            .iter()
            .filter(|u| !u.trim().is_empty())
            .cloned()
            .collect();
        config.replica_wait = self.replica_wait;
        config.max_frame_bytes = self.max_frame_bytes;
        config.max_subscriptions_per_connection = self.max_subscriptions;
        config.max_connections_per_user = self.max_connections_per_user;
        config.max_frames_per_second = self.max_frames_per_second;
        config.max_concurrent_backfills = self.max_backfills;
        config.catchup_budget_bytes = self.catchup_budget;
        config.max_connections = self.max_connections;
        config.max_pending_connections = self.max_pending_connections;
        config.http_read_timeout = self.http_read_timeout;
        config.first_frame_timeout = self.first_frame_timeout;
        config.allowed_origins = self.allowed_origins.clone();
        config.membership_resources = self.membership_resources.clone();
        config.reauthorize_interval =
            (!self.reauthorize_interval.is_zero()).then_some(self.reauthorize_interval);
        config.authorize_timeout = self.authorize_timeout;
        config.api_requests_per_second = self.api_requests_per_second;
        config.presence_timeout = self.presence_timeout.max(Duration::from_secs(3));
        config.project_signals_per_second = self.project_signals_per_second;
        config.instance = Some(self.instance.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".into());
            format!("{host}/{}", self.listen)
        }));
        config.retention = (!self.no_retention).then(|| RetentionConfig {
            interval: self.retention_interval,
            keep_min: self.retention_keep_min,
            min_age: self.retention_min_age,
            ..RetentionConfig::default()
        });
        config
    }
}

/// Which apps to install beside the `relay` engine; the same flag for
/// `serve`, `migrate` and `sql`.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct AppsArgs {
    /// Also install the `chat` reference app (its tables, functions, rule
    /// and the `/v1` API). Without DATABASE_URL the private demo database
    /// always has it.
    #[arg(
        long,
        env = "PGRELAY_CHAT",
        value_parser = BoolishValueParser::new(),
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true"
    )]
    pub chat: bool,
}

impl AppsArgs {
    pub fn apps(&self) -> Apps {
        Apps { chat: self.chat }
    }
}

/// Durations as people write them: `500ms`, `90s`, `30m`, `1h`, `7d` (a
/// bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 90s, 30m, 1h or 7d"))?;
    if unit == "ms" {
        return Ok(Duration::from_millis(n));
    }
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("unknown unit {unit:?}; use ms, s, m, h or d")),
    };
    n.checked_mul(scale)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long a duration"))
}

/// Sizes as people write them: `65536`, `512KiB`, `64MiB`, `1GiB` (a bare
/// number is bytes; `K`, `M`, `G` and `KB`, `MB`, `GB` are read as binary
/// units too).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: usize = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 65536, 512KiB or 64MiB"))?;
    let scale: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("unknown unit {unit:?}; use KiB, MiB or GiB")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{s:?} is too large a size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_overflow_is_refused() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("64M"), Ok(64 << 20));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        // As docs/configuration.md says: B, decimal-looking units read as
        // binary, any case, a space allowed; no fractions.
        assert_eq!(parse_bytes("100B"), Ok(100));
        assert_eq!(parse_bytes("64MB"), Ok(64 << 20));
        assert_eq!(parse_bytes("64 mib"), Ok(64 << 20));
        assert_eq!(parse_bytes("2kb"), Ok(2 << 10));
        assert!(parse_bytes("1.5GiB").is_err());
        assert!(parse_bytes("1TiB").is_err());
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
        assert!(parse_bytes("99999999999999999999GiB").is_err());
        assert_eq!(ServeArgs::parse_from(["serve"]).catchup_budget, 64 << 20);
    }

    #[test]
    fn durations_parse_and_overflow_is_refused() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        assert!(parse_duration("999999999999999999d").is_err());
    }

    #[test]
    fn boolean_settings_take_what_people_write() {
        for yes in ["1", "true", "yes", "on", "TRUE", "y", "t"] {
            let args = ServeOnly::try_parse_from(["serve", &format!("--no-retention={yes}")])
                .map(|o| o.args.no_retention);
            assert!(matches!(args, Ok(true)), "{yes}: {args:?}");
        }
        for no in ["0", "false", "no", "off", "n", "F"] {
            let args = ServeOnly::try_parse_from(["serve", &format!("--no-retention={no}")])
                .map(|o| o.args.no_retention);
            assert!(matches!(args, Ok(false)), "{no}: {args:?}");
        }
        let bare =
            ServeOnly::try_parse_from(["serve", "--no-retention"]).map(|o| o.args.no_retention);
        assert!(matches!(bare, Ok(true)), "{bare:?}");
        assert!(ServeOnly::try_parse_from(["serve", "--no-retention=maybe"]).is_err());
        // The other yes/no settings docs/configuration.md names.
        let both = ServeOnly::try_parse_from(["serve", "--transaction-pooler", "--chat=on"])
            .map(|o| (o.args.transaction_pooler, o.args.apps.chat));
        assert!(matches!(both, Ok((true, true))), "{both:?}");
        let neither = ServeOnly::try_parse_from(["serve", "--transaction-pooler=no", "--chat=0"])
            .map(|o| (o.args.transaction_pooler, o.args.apps.chat));
        assert!(matches!(neither, Ok((false, false))), "{neither:?}");
        let absent = ServeOnly::try_parse_from(["serve"]).map(|o| {
            (
                o.args.transaction_pooler,
                o.args.apps.chat,
                o.args.no_retention,
            )
        });
        assert!(matches!(absent, Ok((false, false, false))), "{absent:?}");
    }
}

//! Counters and gauges for `/metrics`, in the Prometheus text format.
//!
//! Hand-rolled on atomics rather than a global recorder: several relays can
//! run in one process (the tests do), each with its own numbers, and an
//! increment on the delivery path is one relaxed atomic add.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Upper bounds (seconds) of the commit-to-send delay histogram.
const DELAY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `reason` label values of `pgrelay_resets_sent_total`: the relay's
/// reset reasons (`relay::protocol::reset_reason::ALL`, which a test holds
/// this to), listed here so that metrics imports nothing from the relay.
const RESET_REASONS: [&str; 3] = ["history_trimmed", "seq_ahead", "history_diverged"];

/// Observations of one batch, gathered without atomics and added to a
/// [`Histogram`] at once.
#[derive(Default)]
pub struct Tally {
    buckets: [u64; DELAY_BUCKETS.len()],
    count: u64,
    sum_us: u64,
}

impl Tally {
    pub fn observe_us(&mut self, micros: u64) {
        let secs = micros as f64 / 1e6;
        if let Some(i) = DELAY_BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum_us += micros;
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// A Prometheus histogram with fixed buckets, lock-free.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; DELAY_BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds, to stay an integer.
    sum_us: AtomicU64,
}

impl Histogram {
    /// Adds what a [`Tally`] gathered: one atomic add per bucket it
    /// touched, so a batch of deliveries does not take three shared cache
    /// lines per event.
    pub fn add(&self, tally: &Tally) {
        if tally.count == 0 {
            return;
        }
        for (bucket, &n) in self.buckets.iter().zip(&tally.buckets) {
            if n > 0 {
                bucket.fetch_add(n, Relaxed);
            }
        }
        self.count.fetch_add(tally.count, Relaxed);
        self.sum_us.fetch_add(tally.sum_us, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in DELAY_BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Why a subscription's authorization is asked again (G4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecheckCause {
    /// An event of a resource that grants membership was sent.
    MembershipEvent = 0,
    /// The periodic safety net.
    Schedule = 1,
}

impl RecheckCause {
    pub const ALL: [RecheckCause; 2] = [RecheckCause::MembershipEvent, RecheckCause::Schedule];

    fn label(self) -> &'static str {
        match self {
            RecheckCause::MembershipEvent => "membership_event",
            RecheckCause::Schedule => "schedule",
        }
    }
}

/// Everything the relay counts. Field names are the metric names without
/// the `pgrelay_` prefix.
#[derive(Default)]
pub struct Metrics {
    /// Open WebSocket connections.
    pub connections: AtomicI64,
    /// Active subscriptions over all connections.
    pub subscriptions: AtomicI64,
    /// Notices received on the channel (ours and foreign).
    pub notices_received: AtomicU64,
    /// Notices that were not valid pgrelay notices; ignored.
    pub foreign_notices: AtomicU64,
    /// Valid-looking notices naming a seq the log did not confirm.
    pub unconfirmed_notices: AtomicU64,
    /// Event frames written to clients.
    pub events_sent: AtomicU64,
    /// Reads of the event log (live fetch and catch-up).
    pub log_reads: AtomicU64,
    /// Rows returned by those reads.
    pub log_rows: AtomicU64,
    /// Failed reads of the event log.
    pub log_errors: AtomicU64,
    /// Subscriptions currently fed from the log because they fell behind.
    pub catchup_subscribers: AtomicI64,
    /// Events found by a resync read (after a reconnect, in poll mode or
    /// by the safety-net resync) rather than announced by a notice.
    pub gaps_filled: AtomicU64,
    /// Times the LISTEN connection was (re)established and proven.
    pub listener_reconnects: AtomicU64,
    /// 1 while LISTENing with a proven connection.
    pub listening: AtomicI64,
    /// `reset` frames sent, over all reasons (tests read it directly).
    pub resets_sent: AtomicU64,
    /// `reset` frames sent, by reason (indexed like [`RESET_REASONS`]), so
    /// an operator tells trimmed history (clients offline too long) from
    /// lost history (a failover or restore).
    pub resets_by_reason: [AtomicU64; RESET_REASONS.len()],
    /// Topics whose ring the event log disowned (it lost history the
    /// relay had read: a failover or a restore).
    pub divergences: AtomicU64,
    /// Database connections discarded because a query missed its deadline.
    pub db_timeouts: AtomicU64,
    /// Log reads answered by a hot standby.
    pub replica_reads: AtomicU64,
    /// Reads that waited for a standby behind the seq a notice announced.
    pub replica_lag_waits: AtomicU64,
    /// Reads sent to the primary after a standby was behind (past the
    /// wait), failed, or disowned a cursor.
    pub replica_fallbacks: AtomicU64,
    /// Client frames refused with an `error` frame.
    pub client_errors: AtomicU64,
    /// Subscriptions ended because a re-check found access revoked, by
    /// cause (indexed by `RecheckCause`); [`Metrics::revocations_total`]
    /// sums them.
    pub revocations_by_cause: [AtomicU64; RecheckCause::ALL.len()],
    /// Subscriptions re-authorized, by cause.
    pub reauthorizations: [AtomicU64; RecheckCause::ALL.len()],
    /// Subscriptions ended because the app's rule raised or timed out.
    pub authorize_failures: AtomicU64,
    /// Connections refused (bad token, limits, origin).
    pub refused_connections: AtomicU64,
    /// 1 while this relay holds the trim lock.
    pub retention_leader: AtomicI64,
    /// Trim runs started by this relay.
    pub retention_runs: AtomicU64,
    /// Events deleted from the log by this relay's trim runs.
    pub events_trimmed: AtomicU64,
    /// When this relay's last trim run ended without error, seconds since
    /// the epoch (0: none yet). The one figure that tells "retention stopped"
    /// (a lost grant, a failing `relay.trim`) from "nothing to trim".
    pub retention_last_success_unix: AtomicI64,
    /// Set by the retention job when it starts: with retention off
    /// (`PGRELAY_NO_RETENTION`) the timestamp above is not rendered, so an
    /// alert on it does not fire for a choice.
    pub retention_enabled: AtomicBool,
    /// Age of the oldest event kept in the log, in milliseconds, as of
    /// this relay's last trim run (0 before one, or with an empty log).
    pub oldest_event_age_ms: AtomicI64,
    /// Commit-to-send delay of event frames.
    pub delivery_delay: Histogram,
    /// Size of the relay-wide catch-up budget, in bytes.
    pub catchup_budget_bytes: AtomicI64,
    /// Catch-up bytes reserved right now (batches read from the log and
    /// not yet written).
    pub catchup_bytes: AtomicI64,
    /// Catch-up reads that waited because the budget was spent.
    pub catchup_deferred: AtomicU64,
    /// Times a session found its socket full and waited for it to drain
    /// (letting go of the frames it had not written: they are read again
    /// once the socket drains).
    pub socket_full: AtomicU64,
    /// Sessions waiting right now for their socket to drain.
    pub sessions_waiting: AtomicI64,
    /// Open TCP connections (HTTP and WebSocket).
    pub tcp_connections: AtomicI64,
    /// Connections not (yet) upgraded to a WebSocket.
    pub pending_connections: AtomicI64,
    /// Connections refused with 503 because a connection cap was reached.
    pub over_capacity: AtomicU64,
    /// Connections closed because a stage took too long, by stage.
    pub timeouts: Timeouts,
    /// Broadcasts and presence (G9).
    pub signals: SignalMetrics,
    /// The identity provider's keys (`PGRELAY_JWT_JWKS_URL`); shared with
    /// the fetcher, which is built before the relay.
    pub jwks: Arc<JwksMetrics>,
}

/// What the relay counts of its JWKS fetches; rendered only when a JWKS
/// is configured (after the first fetch).
#[derive(Default)]
pub struct JwksMetrics {
    /// Fetches started (at start, on the schedule, for an unknown `kid`).
    pub fetches: AtomicU64,
    /// Fetches that gave no usable key set (the last good one was kept).
    pub fetch_failures: AtomicU64,
    /// Tokens refused because no key of the set had their `kid`, even
    /// after the refresh it may start.
    pub unknown_kid: AtomicU64,
    /// Keys in the current set.
    pub keys: AtomicI64,
    /// When the last successful fetch ended, seconds since the epoch.
    pub last_success_unix: AtomicI64,
}

impl JwksMetrics {
    fn render(&self, out: &mut String) {
        if self.fetches.load(Relaxed) == 0 {
            return;
        }
        for (name, value, help) in [
            (
                "jwks_keys",
                &self.keys,
                "Signature keys in the JWKS set in use.",
            ),
            (
                "jwks_last_success_timestamp_seconds",
                &self.last_success_unix,
                "When the JWKS was last fetched successfully (0: never).",
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP pgrelay_{name} {help}\n# TYPE pgrelay_{name} gauge\npgrelay_{name} {}",
                value.load(Relaxed)
            );
        }
        for (name, value, help) in [
            (
                "jwks_fetches_total",
                &self.fetches,
                "JWKS fetches started (at start, on the schedule, for an unknown kid).",
            ),
            (
                "jwks_fetch_failures_total",
                &self.fetch_failures,
                "JWKS fetches that failed; the last good keys were kept.",
            ),
            (
                "jwks_unknown_kid_total",
                &self.unknown_kid,
                "Tokens refused because the JWKS had no key with their kid.",
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP pgrelay_{name} {help}\n# TYPE pgrelay_{name} counter\npgrelay_{name} {}",
                value.load(Relaxed)
            );
        }
    }
}

/// What the relay counts of ephemeral signals (G9).
#[derive(Default)]
pub struct SignalMetrics {
    /// Broadcasts this relay's clients sent that the database took.
    pub broadcasts_in: AtomicU64,
    /// Broadcasts refused: rate, size, the database (each also answered
    /// with an error frame).
    pub broadcasts_refused: AtomicU64,
    /// Broadcast frames written to this relay's clients.
    pub broadcasts_out: AtomicU64,
    /// Broadcast frames dropped because a client's signal queue was full.
    pub broadcasts_dropped: AtomicU64,
    /// Notices received on the signal channel.
    pub signal_notices: AtomicU64,
    /// Connections present (in some scope's presence) through this relay.
    pub presence_members: AtomicI64,
    /// Presence joins, updates and leaves this relay wrote.
    pub presence_changes: AtomicU64,
    /// Members of dead relays this relay's sweeps took out of presence.
    pub presence_expiries: AtomicU64,
    /// Presence snapshots sent to clients.
    pub presence_snapshots: AtomicU64,
}

impl SignalMetrics {
    fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP pgrelay_presence_members Connections present in some project's presence through this relay.\n\
             # TYPE pgrelay_presence_members gauge\npgrelay_presence_members {}",
            self.presence_members.load(Relaxed)
        );
        for (name, value, help) in [
            (
                "broadcasts_in_total",
                &self.broadcasts_in,
                "Broadcasts from this relay's clients that the database took.",
            ),
            (
                "broadcasts_refused_total",
                &self.broadcasts_refused,
                "Broadcasts refused (rate, size, subscription, database), each answered with an error.",
            ),
            (
                "broadcasts_out_total",
                &self.broadcasts_out,
                "Broadcast frames written to clients.",
            ),
            (
                "broadcasts_dropped_total",
                &self.broadcasts_dropped,
                "Broadcast frames dropped because a client's signal queue was full (at most once).",
            ),
            (
                "signal_notices_total",
                &self.signal_notices,
                "Notices received on the signal channel (broadcasts and presence diffs of every relay).",
            ),
            (
                "presence_changes_total",
                &self.presence_changes,
                "Presence joins, updates and leaves this relay wrote to the database.",
            ),
            (
                "presence_expiries_total",
                &self.presence_expiries,
                "Members of relays whose lease ran out, taken out of presence by this relay.",
            ),
            (
                "presence_snapshots_total",
                &self.presence_snapshots,
                "Presence snapshots sent to clients.",
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP pgrelay_{name} {help}\n# TYPE pgrelay_{name} counter\npgrelay_{name} {}",
                value.load(Relaxed)
            );
        }
    }
}

/// Connections closed for taking too long, one counter per stage.
#[derive(Default)]
pub struct Timeouts {
    /// The request head (or, on an idle keep-alive connection, the next
    /// one) did not arrive in time.
    pub head: AtomicU64,
    /// A `/v1` request body did not arrive in time.
    pub body: AtomicU64,
    /// The upgrade did not complete in time after the 101 response.
    pub upgrade: AtomicU64,
    /// No frame arrived in time after the upgrade.
    pub first_frame: AtomicU64,
    /// An HTTP response was not taken by the peer in time.
    pub write: AtomicU64,
}

impl Timeouts {
    fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP pgrelay_timeouts_total Connections closed because a stage took too long.\n\
             # TYPE pgrelay_timeouts_total counter"
        );
        for (stage, value) in [
            ("head", &self.head),
            ("body", &self.body),
            ("upgrade", &self.upgrade),
            ("first_frame", &self.first_frame),
            ("write", &self.write),
        ] {
            let _ = writeln!(
                out,
                "pgrelay_timeouts_total{{stage=\"{stage}\"}} {}",
                value.load(Relaxed)
            );
        }
    }
}

impl Metrics {
    pub fn reauthorized(&self, cause: RecheckCause, subscriptions: usize) {
        self.reauthorizations[cause as usize].fetch_add(subscriptions as u64, Relaxed);
    }

    pub fn revoked(&self, cause: RecheckCause) {
        self.revocations_by_cause[cause as usize].fetch_add(1, Relaxed);
    }

    /// Counts one `reset` frame sent for `reason` (one of
    /// `relay::protocol::reset_reason`).
    pub fn reset_sent(&self, reason: &str) {
        self.resets_sent.fetch_add(1, Relaxed);
        if let Some(i) = RESET_REASONS.iter().position(|r| *r == reason) {
            self.resets_by_reason[i].fetch_add(1, Relaxed);
        }
    }

    /// Subscriptions ended because a re-check found access revoked, over
    /// all causes.
    pub fn revocations_total(&self) -> u64 {
        self.revocations_by_cause
            .iter()
            .map(|c| c.load(Relaxed))
            .sum()
    }

    /// The Prometheus text exposition. `queue_usage` is
    /// `pg_notification_queue_usage()`, read at scrape time.
    pub fn render(&self, queue_usage: Option<f64>) -> String {
        let mut out = String::with_capacity(4096);
        let gauges: [(&str, &AtomicI64, &str); 10] = [
            (
                "sessions_waiting",
                &self.sessions_waiting,
                "Sessions waiting now for their socket to drain, holding no frames.",
            ),
            (
                "catchup_budget_bytes",
                &self.catchup_budget_bytes,
                "Size of the relay-wide budget for catch-up data, in bytes.",
            ),
            (
                "catchup_bytes",
                &self.catchup_bytes,
                "Catch-up bytes held now: batches read from the log and not yet written.",
            ),
            (
                "tcp_connections",
                &self.tcp_connections,
                "Open TCP connections, HTTP and WebSocket.",
            ),
            (
                "pending_connections",
                &self.pending_connections,
                "Connections not (yet) upgraded to a WebSocket.",
            ),
            (
                "retention_leader",
                &self.retention_leader,
                "1 while this relay is the one trimming the event log.",
            ),
            (
                "connections",
                &self.connections,
                "Open WebSocket connections.",
            ),
            (
                "subscriptions",
                &self.subscriptions,
                "Active subscriptions.",
            ),
            (
                "catchup_subscribers",
                &self.catchup_subscribers,
                "Subscriptions being fed from the event log because they fell behind.",
            ),
            (
                "listening",
                &self.listening,
                "1 while the LISTEN connection is up and proven.",
            ),
        ];
        for (name, value, help) in gauges {
            let _ = writeln!(
                out,
                "# HELP pgrelay_{name} {help}\n# TYPE pgrelay_{name} gauge\npgrelay_{name} {}",
                value.load(Relaxed)
            );
        }
        let by_cause: [(&str, &[AtomicU64; 2], &str); 2] = [
            (
                "revocations_total",
                &self.revocations_by_cause,
                "Subscriptions ended because a re-check found access revoked.",
            ),
            (
                "reauthorizations_total",
                &self.reauthorizations,
                "Subscriptions whose authorization was asked again.",
            ),
        ];
        for (name, values, help) in by_cause {
            let _ = writeln!(
                out,
                "# HELP pgrelay_{name} {help}\n# TYPE pgrelay_{name} counter"
            );
            for cause in RecheckCause::ALL {
                let _ = writeln!(
                    out,
                    "pgrelay_{name}{{cause=\"{}\"}} {}",
                    cause.label(),
                    values[cause as usize].load(Relaxed)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP pgrelay_resets_sent_total Reset frames sent, by reason.\n\
             # TYPE pgrelay_resets_sent_total counter"
        );
        for (reason, value) in RESET_REASONS.iter().zip(&self.resets_by_reason) {
            let _ = writeln!(
                out,
                "pgrelay_resets_sent_total{{reason=\"{reason}\"}} {}",
                value.load(Relaxed)
            );
        }
        let counters: [(&str, &AtomicU64, &str); 22] = [
            (
                "catchup_deferred_total",
                &self.catchup_deferred,
                "Catch-up reads that waited because the catch-up budget was spent.",
            ),
            (
                "socket_full_total",
                &self.socket_full,
                "Times a session found its socket full and waited for it to drain.",
            ),
            (
                "over_capacity_total",
                &self.over_capacity,
                "Connections refused with 503 because a connection cap was reached.",
            ),
            (
                "replica_reads_total",
                &self.replica_reads,
                "Event-log reads answered by a hot standby.",
            ),
            (
                "replica_lag_waits_total",
                &self.replica_lag_waits,
                "Reads that waited for a standby behind the seq a notice announced.",
            ),
            (
                "replica_fallbacks_total",
                &self.replica_fallbacks,
                "Reads made on the primary because a standby was behind past the wait, failed, or disowned a cursor.",
            ),
            (
                "divergences_total",
                &self.divergences,
                "Scopes whose history in the relay the event log no longer held (failover or restore); their subscribers were checked and reset where needed.",
            ),
            (
                "db_timeouts_total",
                &self.db_timeouts,
                "Database connections closed because a query got no answer within the query timeout.",
            ),
            (
                "retention_runs_total",
                &self.retention_runs,
                "Trim runs of the event log started by this relay.",
            ),
            (
                "events_trimmed_total",
                &self.events_trimmed,
                "Events deleted from the log by this relay's trim runs.",
            ),
            (
                "authorize_failures_total",
                &self.authorize_failures,
                "Subscriptions ended because relay.authorize raised or timed out.",
            ),
            (
                "refused_connections_total",
                &self.refused_connections,
                "Connections refused: bad token, limits or origin.",
            ),
            (
                "notices_received_total",
                &self.notices_received,
                "Notices received on the channel.",
            ),
            (
                "foreign_notices_total",
                &self.foreign_notices,
                "Notices on the channel that were not pgrelay's; ignored.",
            ),
            (
                "unconfirmed_notices_total",
                &self.unconfirmed_notices,
                "Notices naming a seq the event log did not hold.",
            ),
            (
                "events_sent_total",
                &self.events_sent,
                "Event frames written to clients.",
            ),
            (
                "log_reads_total",
                &self.log_reads,
                "Reads of the event log.",
            ),
            (
                "log_rows_total",
                &self.log_rows,
                "Rows returned by reads of the event log.",
            ),
            (
                "log_errors_total",
                &self.log_errors,
                "Failed reads of the event log.",
            ),
            (
                "gaps_filled_total",
                &self.gaps_filled,
                "Events found by resync reads rather than announced by a notice.",
            ),
            (
                "listener_reconnects_total",
                &self.listener_reconnects,
                "Times the LISTEN connection was established and proven.",
            ),
            (
                "client_errors_total",
                &self.client_errors,
                "Client frames answered with an error frame.",
            ),
        ];
        for (name, value, help) in counters {
            let _ = writeln!(
                out,
                "# HELP pgrelay_{name} {help}\n# TYPE pgrelay_{name} counter\npgrelay_{name} {}",
                value.load(Relaxed)
            );
        }
        self.timeouts.render(&mut out);
        self.signals.render(&mut out);
        self.jwks.render(&mut out);
        self.delivery_delay.render(
            &mut out,
            "pgrelay_delivery_delay_seconds",
            "Delay from an event's capture in the database to its send to a client.",
        );
        let _ = writeln!(
            out,
            "# HELP pgrelay_oldest_event_age_seconds Age of the oldest event kept in the log, as of the last trim run.\n\
             # TYPE pgrelay_oldest_event_age_seconds gauge\npgrelay_oldest_event_age_seconds {}",
            self.oldest_event_age_ms.load(Relaxed) as f64 / 1000.0
        );
        if self.retention_enabled.load(Relaxed) {
            let _ = writeln!(
                out,
                "# HELP pgrelay_retention_last_success_timestamp_seconds When this relay's last trim run succeeded (0: none yet).\n\
                 # TYPE pgrelay_retention_last_success_timestamp_seconds gauge\n\
                 pgrelay_retention_last_success_timestamp_seconds {}",
                self.retention_last_success_unix.load(Relaxed)
            );
        }
        if let Some(usage) = queue_usage {
            let _ = writeln!(
                out,
                "# HELP pgrelay_notification_queue_usage pg_notification_queue_usage() of the database.\n\
                 # TYPE pgrelay_notification_queue_usage gauge\npgrelay_notification_queue_usage {usage}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        let mut tally = Tally::default();
        tally.observe_us(300); // 0.3 ms
        tally.observe_us(3_000); // 3 ms
        tally.observe_us(60_000_000); // beyond the last bucket
        m.delivery_delay.add(&tally);
        let text = m.render(Some(0.0));
        assert!(text.contains("pgrelay_delivery_delay_seconds_bucket{le=\"0.0005\"} 1"));
        assert!(text.contains("pgrelay_delivery_delay_seconds_bucket{le=\"0.005\"} 2"));
        assert!(text.contains("pgrelay_delivery_delay_seconds_bucket{le=\"10\"} 2"));
        assert!(text.contains("pgrelay_delivery_delay_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("pgrelay_delivery_delay_seconds_count 3"));
        assert!(text.contains("pgrelay_notification_queue_usage 0"));
    }

    #[test]
    fn resets_are_labelled_with_every_reason_the_relay_sends() {
        assert_eq!(RESET_REASONS, crate::relay::protocol::reset_reason::ALL);
        let m = Metrics::default();
        m.reset_sent(crate::relay::protocol::reset_reason::SEQ_AHEAD);
        let text = m.render(None);
        assert!(text.contains("pgrelay_resets_sent_total{reason=\"seq_ahead\"} 1"));
        assert!(text.contains("pgrelay_resets_sent_total{reason=\"history_trimmed\"} 0"));
        assert_eq!(m.resets_sent.load(Relaxed), 1);
    }

    #[test]
    fn retention_timestamp_only_where_retention_runs() {
        let m = Metrics::default();
        let name = "pgrelay_retention_last_success_timestamp_seconds";
        assert!(!m.render(None).contains(name));
        m.retention_enabled.store(true, Relaxed);
        m.retention_last_success_unix.store(1_700_000_000, Relaxed);
        assert!(m.render(None).contains(&format!("\n{name} 1700000000\n")));
    }

    #[test]
    fn every_line_is_a_comment_or_a_sample() {
        let m = Metrics::default();
        // The JWKS lines are rendered only once a JWKS was fetched, the
        // retention timestamp only where retention runs.
        m.jwks.fetches.store(1, Relaxed);
        m.retention_enabled.store(true, Relaxed);
        let text = m.render(Some(0.0));
        for line in text.lines() {
            assert!(
                line.starts_with("# HELP pgrelay_")
                    || line.starts_with("# TYPE pgrelay_")
                    || line.starts_with("pgrelay_"),
                "not exposition format: {line:?}"
            );
        }
        assert!(text.contains("# TYPE pgrelay_presence_members gauge\npgrelay_presence_members 0"));
        assert!(text
            .contains("# TYPE pgrelay_jwks_fetches_total counter\npgrelay_jwks_fetches_total 1"));
    }
}

//! Presence (G9): who is online in a project, with a small state per
//! connection, the same on every relay.
//!
//! The truth is in Postgres (`migrations/relay/V5__signals.sql`): one row
//! per present connection in `relay.presence_members`, one lease per
//! running relay in `relay.relays`. Nothing else is shared between relays.
//!
//! - **Writes.** Sessions leave their joins, updates and leaves in one
//!   map, the last change of each connection only (so it is bounded by the
//!   connections present, whatever they send), which one writer task
//!   applies in batches (`relay.presence_apply`, one transaction and one
//!   NOTIFY commit per batch) and retries until the database takes them. Each changed row gets a new version and
//!   sends a diff on the signal channel.
//! - **Leases.** The writer renews this relay's lease every third of
//!   `timeout` and sweeps (`relay.presence_sweep`): members of relays whose
//!   lease ran out (killed, partitioned) leave, by whichever relay sweeps
//!   first. A relay that lost its lease while alive, or whose rows were
//!   swept, finds out from the heartbeat's count and writes its members
//!   again.
//! - **Mirrors.** For each scope that a client here watches, the relay
//!   keeps a mirror of its members: loaded from the table, then kept by
//!   the diffs every relay's writes send, applied in version order. A diff
//!   that arrives while a mirror loads waits and is applied after, unless
//!   the load already holds it (its version); members that left stay as
//!   tombstones for a while, so a late diff cannot bring them back.
//!   Watchers get a snapshot first, then user-level diffs: `join` (first
//!   connection of a user), `update`, `leave` (last connection gone), each
//!   with the user's connections as they now stand, so applying one twice
//!   changes nothing.
//! - **Healing.** When the LISTEN connection comes back (diffs may have
//!   been missed), every mirror is loaded again and its watchers get a
//!   fresh snapshot.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_postgres::types::Type;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use crate::db::pool::BoundedPool;
use crate::metrics::Metrics;
use crate::relay::mailbox::{Kind, Mailbox};
use crate::relay::protocol;

/// How a relay takes part in presence.
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// This process's id: random at each start.
    pub relay_id: String,
    /// Where it runs (host and listen address, or `PGRELAY_INSTANCE`): a
    /// relay that starts where a dead one ran ends its lease at once.
    pub instance: String,
    /// A dead relay's members leave within this (`PGRELAY_PRESENCE_TIMEOUT`).
    pub timeout: Duration,
    /// Most connections listed in one snapshot.
    pub max_snapshot_connections: usize,
}

/// Diffs held for one mirror while it loads; past that the load starts
/// again (it will hold them).
const MAX_BUFFERED: usize = 10_000;
/// How long a mirror keeps a member that left.
const TOMBSTONE_TTL: Duration = Duration::from_secs(120);
const RETRY: Duration = Duration::from_millis(500);

/// One change of a member row, as the diff on the signal channel says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    pub scope: String,
    pub connection: String,
    pub user: String,
    pub version: i64,
    /// The state's JSON text; `None`: the connection left.
    pub state: Option<String>,
}

/// A member row: (scope, this relay's connection number).
type Key = (Arc<str>, u64);

#[derive(Debug)]
struct Member {
    user: Arc<str>,
    version: i64,
    state: Option<String>,
    left_at: Option<Instant>,
}

/// One scope's members as this relay knows them.
#[derive(Default)]
struct Mirror {
    loaded: bool,
    /// Bumped when a load starts over: an older load's answer is dropped.
    load_gen: u64,
    members: HashMap<Arc<str>, Member>,
    /// User -> their present connections.
    users: HashMap<Arc<str>, BTreeSet<Arc<str>>>,
    /// Subscription id -> the session that watches.
    watchers: HashMap<u64, Arc<Mailbox>>,
    /// Diffs that arrived while loading.
    buffered: Vec<Diff>,
}

/// The presence of every scope, for one relay.
pub struct Presence {
    config: PresenceConfig,
    pool: BoundedPool,
    metrics: Arc<Metrics>,
    /// The last change of each member row not yet stored.
    pending: Mutex<HashMap<Key, Pending>>,
    write_wake: Notify,
    mirrors: Mutex<HashMap<Arc<str>, Mirror>>,
    load_wake: Notify,
}

impl Presence {
    pub fn new(config: PresenceConfig, pool: BoundedPool, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Presence {
            config,
            pool,
            metrics,
            pending: Mutex::new(HashMap::new()),
            write_wake: Notify::new(),
            mirrors: Mutex::new(HashMap::new()),
            load_wake: Notify::new(),
        })
    }

    pub fn relay_id(&self) -> &str {
        &self.config.relay_id
    }

    /// How members lists name connection `conn` of this relay.
    pub fn connection_key(&self, conn: u64) -> String {
        format!("{}-{conn}", self.config.relay_id)
    }

    fn mirrors(&self) -> MutexGuard<'_, HashMap<Arc<str>, Mirror>> {
        self.mirrors.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins `scope` with `state` (or updates it), or leaves (`None`).
    /// `reply` gets `presence_joined` or `presence_left` once stored.
    pub fn set(
        &self,
        scope: &str,
        conn: u64,
        user: &str,
        state: Option<String>,
        reply: Option<Arc<Mailbox>>,
    ) {
        // After shutdown the lease ends with every member, so a change
        // left here then is moot.
        let key = (Arc::from(scope), conn);
        let mut pending = self.pending();
        let entry = pending.entry(key).or_insert_with(|| Pending {
            user: Arc::from(user),
            state: None,
            replies: Vec::new(),
        });
        entry.state = state;
        entry.replies.extend(reply);
        drop(pending);
        self.write_wake.notify_one();
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<Key, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscription `sub` of the session behind `mailbox` watches `scope`:
    /// a snapshot now (or once loaded), then diffs.
    pub fn watch(&self, scope: &str, sub: u64, mailbox: Arc<Mailbox>) {
        let scope: Arc<str> = Arc::from(scope);
        let mut mirrors = self.mirrors();
        let mirror = mirrors.entry(scope.clone()).or_default();
        if mirror.loaded {
            let frame = snapshot(&scope, mirror, self.config.max_snapshot_connections);
            mailbox.push(&scope, Kind::Presence, frame);
            self.metrics
                .signals
                .presence_snapshots
                .fetch_add(1, Relaxed);
        }
        mirror.watchers.insert(sub, mailbox);
        let load = !mirror.loaded;
        drop(mirrors);
        if load {
            self.load_wake.notify_one();
        }
    }

    /// Subscription `sub` no longer watches `scope`; the mirror goes with
    /// its last watcher.
    pub fn unwatch(&self, scope: &str, sub: u64) {
        let mut mirrors = self.mirrors();
        if let Some(mirror) = mirrors.get_mut(scope) {
            mirror.watchers.remove(&sub);
            if mirror.watchers.is_empty() {
                mirrors.remove(scope);
            }
        }
    }

    /// A fresh snapshot of `scope`, for a watcher whose diffs were
    /// summarized; `None` while loading (the load sends one).
    pub fn snapshot_frame(&self, scope: &Arc<str>) -> Option<Utf8Bytes> {
        let mirrors = self.mirrors();
        let mirror = mirrors.get(scope).filter(|m| m.loaded)?;
        self.metrics
            .signals
            .presence_snapshots
            .fetch_add(1, Relaxed);
        Some(snapshot(
            scope,
            mirror,
            self.config.max_snapshot_connections,
        ))
    }

    /// A diff from the signal channel (any relay's, ours included).
    pub fn on_diff(&self, diff: Diff) {
        let mut mirrors = self.mirrors();
        let Some(scope) = mirrors
            .get_key_value(diff.scope.as_str())
            .map(|(scope, _)| scope.clone())
        else {
            return;
        };
        let Some(mirror) = mirrors.get_mut(&scope) else {
            return;
        };
        if !mirror.loaded {
            if mirror.buffered.len() >= MAX_BUFFERED {
                mirror.buffered.clear();
                mirror.load_gen += 1;
                drop(mirrors);
                self.load_wake.notify_one();
                return;
            }
            mirror.buffered.push(diff);
            return;
        }
        if let Some(frame) = mirror.apply(diff) {
            let frame = Utf8Bytes::from(frame);
            for watcher in mirror.watchers.values() {
                watcher.push(&scope, Kind::Presence, frame.clone());
            }
        }
    }

    /// Diffs may have been missed (the LISTEN connection was lost): every
    /// mirror loads again and its watchers get a fresh snapshot.
    pub fn reload_all(&self) {
        let mut mirrors = self.mirrors();
        if mirrors.is_empty() {
            return;
        }
        for mirror in mirrors.values_mut() {
            mirror.loaded = false;
            mirror.load_gen += 1;
        }
        drop(mirrors);
        self.load_wake.notify_one();
    }

    /// The writer and the mirrors' loader, until shutdown; at shutdown this
    /// relay's lease ends and its members leave at once.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let loader = self.clone().run_loader(shutdown.clone());
        let writer = self.clone().run_writer(shutdown);
        tokio::join!(loader, writer);
    }

    async fn run_writer(self: Arc<Self>, shutdown: CancellationToken) {
        let mut writer = Writer::default();
        let mut heartbeat = tokio::time::interval(self.config.timeout / 3);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry_at: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = heartbeat.tick() => self.heartbeat(&mut writer).await,
                _ = self.write_wake.notified() => {}
                _ = sleep_until_opt(retry_at) => retry_at = None,
            }
            if retry_at.is_some() {
                continue;
            }
            let batch = std::mem::take(&mut *self.pending());
            if batch.is_empty() {
                continue;
            }
            if let Err((e, batch)) = self.apply(batch, &mut writer).await {
                tracing::warn!(error = %e, pending = batch.len(), "writing presence failed; retrying");
                // Put back what no newer change replaced.
                let mut pending = self.pending();
                for (key, mut old) in batch {
                    match pending.get_mut(&key) {
                        Some(newer) => {
                            old.replies.append(&mut newer.replies);
                            newer.replies = old.replies;
                        }
                        None => {
                            pending.insert(key, old);
                        }
                    }
                }
                retry_at = Some(Instant::now() + RETRY);
            }
        }
        match self
            .pool
            .query(
                "SELECT relay.relay_stop($1)",
                &[(&self.config.relay_id, Type::TEXT)],
            )
            .await
        {
            Ok(_) => tracing::debug!("presence lease ended; this relay's members left"),
            Err(e) => {
                tracing::warn!(error = %e, "could not end the presence lease; its members leave when it runs out")
            }
        }
        self.metrics.signals.presence_members.store(0, Relaxed);
    }

    /// Renews the lease, writes every member again when the database does
    /// not hold what this relay holds, and sweeps dead relays' members.
    async fn heartbeat(&self, writer: &mut Writer) {
        // The lease outlives two missed beats, and a sweep comes at most
        // one beat after it ran out: a dead relay's members leave within
        // `timeout`.
        let ttl = (self.config.timeout * 2 / 3).as_secs_f64();
        let held = self
            .pool
            .query(
                "SELECT relay.relay_heartbeat($1, $2, make_interval(secs => $3))",
                &[
                    (&self.config.relay_id, Type::TEXT),
                    (&self.config.instance, Type::TEXT),
                    (&ttl, Type::FLOAT8),
                ],
            )
            .await;
        match held {
            Ok(rows) => {
                let held: i64 = rows.first().map_or(0, |r| r.get(0));
                let settled = self.pending().is_empty();
                if settled && held != writer.present.len() as i64 {
                    tracing::info!(
                        held,
                        present = writer.present.len(),
                        "the database's presence of this relay differs from its own; writing it again"
                    );
                    let mut pending = self.pending();
                    for (key, (user, state)) in &writer.present {
                        pending.entry(key.clone()).or_insert_with(|| Pending {
                            user: user.clone(),
                            state: Some(state.clone()),
                            replies: Vec::new(),
                        });
                    }
                    drop(pending);
                    self.write_wake.notify_one();
                }
            }
            Err(e) => tracing::warn!(error = %e, "renewing the presence lease failed"),
        }
        match self.pool.query("SELECT relay.presence_sweep()", &[]).await {
            Ok(rows) => {
                let left: i32 = rows.first().map_or(0, |r| r.get(0));
                if left > 0 {
                    tracing::info!(
                        members = left,
                        "members of relays whose lease ran out left presence"
                    );
                    self.metrics
                        .signals
                        .presence_expiries
                        .fetch_add(left as u64, Relaxed);
                }
            }
            Err(e) => tracing::warn!(error = %e, "sweeping presence failed"),
        }
        self.purge_tombstones();
    }

    /// Stores `batch`; on failure hands it back.
    async fn apply(
        &self,
        batch: HashMap<Key, Pending>,
        writer: &mut Writer,
    ) -> Result<(), (crate::db::pool::DbError, HashMap<Key, Pending>)> {
        let mut scopes = Vec::with_capacity(batch.len());
        let mut connections = Vec::with_capacity(batch.len());
        let mut users = Vec::with_capacity(batch.len());
        let mut states = Vec::with_capacity(batch.len());
        for ((scope, conn), pending) in &batch {
            scopes.push(scope.as_ref());
            connections.push(self.connection_key(*conn));
            users.push(pending.user.as_ref());
            states.push(pending.state.as_deref());
        }
        let stored = self
            .pool
            .query(
                "SELECT relay.presence_apply($1, $2, $3, $4, $5::text[]::jsonb[])",
                &[
                    (&self.config.relay_id, Type::TEXT),
                    (&scopes, Type::TEXT_ARRAY),
                    (&connections, Type::TEXT_ARRAY),
                    (&users, Type::TEXT_ARRAY),
                    (&states, Type::TEXT_ARRAY),
                ],
            )
            .await;
        drop((scopes, connections, users, states));
        if let Err(e) = stored {
            return Err((e, batch));
        }
        self.metrics
            .signals
            .presence_changes
            .fetch_add(batch.len() as u64, Relaxed);
        for ((scope, conn), pending) in batch {
            let frame = match &pending.state {
                Some(_) => protocol::presence_joined_frame(&scope, &self.connection_key(conn)),
                None => protocol::presence_left_frame(&scope),
            };
            let frame = Utf8Bytes::from(frame);
            for reply in &pending.replies {
                reply.push(&scope, Kind::Reply, frame.clone());
            }
            match pending.state {
                Some(state) => {
                    writer.present.insert((scope, conn), (pending.user, state));
                }
                None => {
                    writer.present.remove(&(scope, conn));
                }
            }
        }
        self.metrics
            .signals
            .presence_members
            .store(writer.present.len() as i64, Relaxed);
        Ok(())
    }

    fn purge_tombstones(&self) {
        let now = Instant::now();
        for mirror in self.mirrors().values_mut() {
            mirror.members.retain(|_, m| {
                m.left_at
                    .is_none_or(|at| now.duration_since(at) < TOMBSTONE_TTL)
            });
        }
    }

    async fn run_loader(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.load_wake.notified() => {}
            }
            loop {
                let wanted: Vec<(Arc<str>, u64)> = {
                    let mut mirrors = self.mirrors();
                    mirrors
                        .iter_mut()
                        .filter(|(_, m)| !m.loaded)
                        .map(|(scope, m)| {
                            // What arrived before the read starts is in
                            // what it reads.
                            m.buffered.clear();
                            (scope.clone(), m.load_gen)
                        })
                        .collect()
                };
                if wanted.is_empty() {
                    break;
                }
                let scopes: Vec<&str> = wanted.iter().map(|(s, _)| s.as_ref()).collect();
                let rows = self
                    .pool
                    .query(
                        "SELECT scope, connection, user_id, version, state::text \
                         FROM relay.presence_rows($1)",
                        &[(&scopes, Type::TEXT_ARRAY)],
                    )
                    .await;
                let rows = match rows {
                    Ok(rows) => rows,
                    Err(e) => {
                        tracing::warn!(error = %e, scopes = wanted.len(), "loading presence failed; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(RETRY) => continue,
                        }
                    }
                };
                let mut by_scope: HashMap<String, Vec<Diff>> = HashMap::new();
                for row in rows {
                    let scope: String = row.get(0);
                    by_scope.entry(scope.clone()).or_default().push(Diff {
                        scope,
                        connection: row.get(1),
                        user: row.get(2),
                        version: row.get(3),
                        state: row.get(4),
                    });
                }
                let mut mirrors = self.mirrors();
                for (scope, gen) in wanted {
                    let Some(mirror) = mirrors.get_mut(&scope) else {
                        continue;
                    };
                    if mirror.loaded || mirror.load_gen != gen {
                        continue;
                    }
                    mirror.load(by_scope.remove(scope.as_ref()).unwrap_or_default());
                    let frame = snapshot(&scope, mirror, self.config.max_snapshot_connections);
                    for watcher in mirror.watchers.values() {
                        watcher.push(&scope, Kind::Presence, frame.clone());
                        self.metrics
                            .signals
                            .presence_snapshots
                            .fetch_add(1, Relaxed);
                    }
                }
            }
        }
    }
}

/// What one pending change of a member row comes to.
struct Pending {
    user: Arc<str>,
    state: Option<String>,
    replies: Vec<Arc<Mailbox>>,
}

/// The writer's own state: this relay's present connections, what the
/// database must hold for it ((scope, connection) -> (user, state)).
#[derive(Default)]
struct Writer {
    present: HashMap<Key, (Arc<str>, String)>,
}

impl Mirror {
    /// Starts again from the table's rows, then applies what arrived
    /// meanwhile.
    fn load(&mut self, rows: Vec<Diff>) {
        self.members.clear();
        self.users.clear();
        for row in rows {
            self.set(row);
        }
        let mut buffered = std::mem::take(&mut self.buffered);
        buffered.sort_by_key(|d| d.version);
        for diff in buffered {
            let _ = self.apply(diff);
        }
        self.loaded = true;
    }

    /// Records `diff` if it is newer than what the mirror holds for its
    /// connection; returns the user's previous connection count, or `None`
    /// when the diff is stale.
    fn set(&mut self, diff: Diff) -> Option<(Arc<str>, usize)> {
        let connection: Arc<str> = Arc::from(diff.connection);
        if self
            .members
            .get(&connection)
            .is_some_and(|known| known.version >= diff.version)
        {
            return None;
        }
        let user: Arc<str> = self
            .users
            .get_key_value(diff.user.as_str())
            .map(|(u, _)| u.clone())
            .unwrap_or_else(|| Arc::from(diff.user));
        let before = self.users.get(&user).map_or(0, BTreeSet::len);
        if let Some(known) = self.members.get(&connection) {
            if known.state.is_some() {
                let known_user = known.user.clone();
                if let Some(conns) = self.users.get_mut(&known_user) {
                    conns.remove(&connection);
                    if conns.is_empty() {
                        self.users.remove(&known_user);
                    }
                }
            }
        }
        if diff.state.is_some() {
            self.users
                .entry(user.clone())
                .or_default()
                .insert(connection.clone());
        }
        let left_at = diff.state.is_none().then(Instant::now);
        self.members.insert(
            connection,
            Member {
                user: user.clone(),
                version: diff.version,
                state: diff.state,
                left_at,
            },
        );
        Some((user, before))
    }

    /// Applies a diff; returns the frame watchers get, if anything they
    /// see changed.
    fn apply(&mut self, diff: Diff) -> Option<String> {
        let scope = diff.scope.clone();
        let (user, before) = self.set(diff)?;
        let after = self.users.get(&user).map_or(0, BTreeSet::len);
        let event = match (before, after) {
            (0, 0) => return None,
            (0, _) => "join",
            (_, 0) => "leave",
            _ => "update",
        };
        let mut frame = format!(
            r#"{{"type":"presence","project_id":{},"event":"{event}","user_id":{},"connections":"#,
            quote(&scope),
            quote(&user)
        );
        self.write_connections(&user, &mut frame, usize::MAX);
        frame.push('}');
        Some(frame)
    }

    /// `[{"connection":..,"state":..},..]` of `user`, at most `max`;
    /// returns how many were written.
    fn write_connections(&self, user: &str, out: &mut String, max: usize) -> usize {
        out.push('[');
        let mut written = 0;
        if let Some(conns) = self.users.get(user) {
            for conn in conns.iter().take(max) {
                let Some(state) = self.members.get(conn).and_then(|m| m.state.as_deref()) else {
                    continue;
                };
                if written > 0 {
                    out.push(',');
                }
                out.push_str(&format!(
                    r#"{{"connection":{},"state":{state}}}"#,
                    quote(conn)
                ));
                written += 1;
            }
        }
        out.push(']');
        written
    }
}

/// `{"type":"presence_state","project_id":..,"members":[{"user_id":..,
/// "connections":[..]},..],"truncated":..}`: users in order of their ids,
/// at most `max` connections in all.
fn snapshot(scope: &str, mirror: &Mirror, max: usize) -> Utf8Bytes {
    let users: BTreeMap<&str, usize> = mirror
        .users
        .iter()
        .map(|(u, c)| (u.as_ref(), c.len()))
        .collect();
    let mut out = format!(
        r#"{{"type":"presence_state","project_id":{},"members":["#,
        quote(scope)
    );
    let mut left = max;
    let mut truncated = false;
    for (i, (user, count)) in users.iter().enumerate() {
        if left == 0 {
            truncated = true;
            break;
        }
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(r#"{{"user_id":{},"connections":"#, quote(user)));
        let written = mirror.write_connections(user, &mut out, left);
        truncated |= written < *count;
        left -= written;
        out.push('}');
    }
    out.push_str(&format!(r#"],"truncated":{truncated}}}"#));
    Utf8Bytes::from(out)
}

fn quote(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diff(conn: &str, user: &str, version: i64, state: Option<&str>) -> Diff {
        Diff {
            scope: "p".into(),
            connection: conn.into(),
            user: user.into(),
            version,
            state: state.map(str::to_string),
        }
    }

    fn frame(f: Option<String>) -> Value {
        serde_json::from_str(&f.expect("a frame")).expect("valid JSON")
    }

    #[test]
    fn diffs_speak_of_users_and_carry_their_connections() {
        let mut m = Mirror {
            loaded: true,
            ..Mirror::default()
        };
        let join = frame(m.apply(diff("r-1", "ann", 1, Some(r#"{"tab":1}"#))));
        assert_eq!(join["event"], "join");
        assert_eq!(join["connections"][0]["state"]["tab"], 1);
        // A second tab of the same user is an update listing both.
        let second = frame(m.apply(diff("r-2", "ann", 2, Some(r#"{"tab":2}"#))));
        assert_eq!(second["event"], "update");
        assert_eq!(second["connections"].as_array().map(Vec::len), Some(2));
        // A stale diff (older version) changes nothing.
        assert_eq!(m.apply(diff("r-1", "ann", 1, None)), None);
        let one_left = frame(m.apply(diff("r-1", "ann", 3, None)));
        assert_eq!(one_left["event"], "update");
        assert_eq!(one_left["connections"].as_array().map(Vec::len), Some(1));
        let gone = frame(m.apply(diff("r-2", "ann", 4, None)));
        assert_eq!(gone["event"], "leave");
        assert_eq!(gone["connections"], serde_json::json!([]));
        // A late join of a connection that already left is not a ghost.
        assert_eq!(m.apply(diff("r-2", "ann", 2, Some("{}"))), None);
        assert!(m.users.is_empty());
    }

    #[test]
    fn a_load_keeps_the_newer_of_the_table_and_what_arrived_meanwhile() {
        // Arrived while loading: a join the table already shows as left,
        // and a join newer than the table.
        let mut m = Mirror {
            buffered: vec![
                diff("r-1", "ann", 1, Some("{}")),
                diff("r-3", "cid", 9, Some("{}")),
            ],
            ..Mirror::default()
        };
        m.load(vec![
            diff("r-1", "ann", 2, None),
            diff("r-2", "bob", 5, Some(r#"{"a":1}"#)),
        ]);
        assert!(m.loaded);
        let users: BTreeSet<&str> = m.users.keys().map(|u| u.as_ref()).collect();
        assert_eq!(users, BTreeSet::from(["bob", "cid"]));
        let snap: Value =
            serde_json::from_str(&snapshot("p", &m, 10)).expect("valid snapshot JSON");
        assert_eq!(snap["members"][0]["user_id"], "bob");
        assert_eq!(snap["members"][0]["connections"][0]["state"]["a"], 1);
        assert_eq!(snap["truncated"], false);
        let small: Value = serde_json::from_str(&snapshot("p", &m, 1)).expect("valid JSON");
        assert_eq!(small["truncated"], true);
        assert_eq!(small["members"].as_array().map(Vec::len), Some(1));
    }
}

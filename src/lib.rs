//! pgrelay: every change to a Postgres table reaches the right WebSocket
//! clients, in order, exactly once, whichever program wrote the row.
//!
//! # Layout
//!
//! The database does the capturing; this crate installs it and relays it. Data moves in this order:
//!
//! - `migrations/` (SQL, installed by [`schema`]): triggers give every
//!   change of a tracked table a per-scope `seq`, append it to the event
//!   log `relay.events` and ring a small `pg_notify` doorbell.
//! - [`schema`]: the embedded migrations and the install SQL for psql.
//! - [`embedded_pg`]: a private Postgres from the local server binaries,
//!   for `pgrelay serve` without `DATABASE_URL` and for the tests.
//! - [`listener`]: the one LISTEN connection; turns notices into hints
//!   (scope, seq), proves itself with a self-addressed probe, reconnects.
//! - [`log`]: reads frames from the event log, the only source of what is
//!   sent; live delivery, resume and gap fill share it.
//! - [`hub`]: scope -> topic (ring of recent frames) -> subscribers; the
//!   fetcher that reads many dirty topics per query; the poller.
//! - [`session`]: one WebSocket: subscriptions, cursors, catch-up from the
//!   log for clients that fall behind.
//! - [`protocol`]: client frames in, control frames out, close codes.
//! - [`auth`]: JWT verification; [`http`]: routes; [`api`]: the chat
//!   HTTP API over the `chat` SQL functions; [`metrics`]: counters for
//!   `/metrics`; [`server`]: wiring and shutdown.
//! - [`retention`]: trims the event log on a schedule, one relay at a time.
//! - [`demo`]: the demo project seeded into a private database.
//!
//! See `DESIGN.md` of the project for the guarantees (G1 to G7) each layer
//! upholds.

pub mod api;
pub mod auth;
pub mod demo;
pub mod embedded_pg;
pub mod http;
pub mod hub;
pub mod listener;
pub mod log;
pub mod metrics;
pub mod protocol;
pub mod retention;
pub mod schema;
pub mod server;
pub mod session;

//! pgrelay: every change to a Postgres table reaches the right WebSocket
//! clients, in order, exactly once, whichever program wrote the row.
//!
//! # Layout
//!
//! The database does the capturing; this crate installs it and relays it.
//! The folders follow an event's path, from the table to the socket:
//!
//! - `migrations/` (SQL): triggers give every change of a tracked table a
//!   per-scope `seq`, append it to the event log `relay.events` and ring a
//!   small `pg_notify` doorbell.
//! - [`db`]: what installs and runs Postgres. [`db::schema`] embeds the
//!   migrations and prints the install SQL; [`db::embedded`] runs a
//!   private Postgres from the local server binaries (for `pgrelay serve`
//!   without `DATABASE_URL`, and for the tests); [`db::demo`] seeds the
//!   demo project; [`db::connect`] opens every connection (pool, LISTEN,
//!   single) with the same policy (timeouts, keepalives); [`db::pool`]
//!   bounds every pooled query in time and discards a connection that
//!   misses its deadline.
//! - [`relay`]: the delivery path, in order.
//!   - [`relay::listener`]: the one LISTEN connection; turns notices into
//!     hints (scope, seq), proves itself, reconnects.
//!   - [`relay::log`]: reads frames from the event log, the only source of
//!     what is sent; live delivery, resume and gap fill share it.
//!   - [`relay::hub`]: scope -> topic (ring of recent frames) ->
//!     subscribers; the fetcher that reads many dirty topics per query; the
//!     poller.
//!   - [`relay::session`]: one WebSocket: subscriptions, cursors, catch-up
//!     from the log for clients that fall behind, written only while the
//!     socket takes bytes. [`relay::budget`] bounds the catch-up data all
//!     sessions hold together.
//!   - [`relay::protocol`]: client frames in, control frames out, close
//!     codes.
//! - [`http`]: the edges. The router and accept loop (HTTP/1.1, with a
//!   time limit on the request head), [`http::connection`] (the connection
//!   caps, the 503 beyond them, the deadline on untaken responses),
//!   [`http::websocket`]
//!   (the `/ws` handshake), [`http::api`] (the chat API under `/v1`),
//!   [`http::demo`] (the page at `/`), [`http::sdk`] (the JavaScript client
//!   SDK of `clients/js` at `/client.js`), and the helpers every route shares
//!   ([`http::request`], [`http::response`]).
//! - Beside the path: [`auth`] (token verification, nothing of HTTP),
//!   [`jwks`] (an identity provider's keys, fetched and refreshed),
//!   [`config`] (every setting), [`metrics`] (counters for `/metrics`),
//!   [`retention`] (trims the log, one relay at a time), and [`server`],
//!   which wires one relay together and shuts it down in order.
//! - [`doctor`]: `pgrelay doctor`, which checks a deployment (database,
//!   rule, triggers, LISTEN path, replicas, queue, log) and reads only; it
//!   uses `db`, `relay` and `retention` as the relay does.
//!
//! Imports only point down this list or sideways within a folder: `relay`
//! and `http` use `db`, `auth`, `metrics`; `http` uses `relay`; nothing
//! below uses `http` or `server`.
//!
//! See `DESIGN.md` of the project for the guarantees (G1 to G8) each layer
//! upholds; `tests/` names its files after them (`g1_capture.rs` ..
//! `g7_bounded_and_bad_input.rs`, with `tests/common/` the harness).
//!
//! Around the library: `src/main.rs` (the command line: parse, then call
//! the library), `src/bin/pgrelay-bench/` (the benchmarks, one file per
//! scenario) and `crates/testkit` (the relay's clients from the outside:
//! WebSocket, LISTEN, HTTP, a relay child process), which the benchmarks
//! and `tests/common/` share.

pub mod auth;
pub mod config;
pub mod db;
pub mod doctor;
pub mod http;
pub mod jwks;
pub mod metrics;
pub mod relay;
pub mod retention;
pub mod server;

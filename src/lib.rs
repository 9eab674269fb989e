//! pgrelay: every change to a Postgres table reaches the right WebSocket
//! clients, in order, exactly once, whichever program wrote the row.
//!
//! # Layout
//!
//! The database does the capturing; this crate installs it and, in later
//! layers, relays it. Data moves in this order:
//!
//! - `migrations/` (SQL, installed by [`schema`]): triggers give every
//!   change of a tracked table a per-scope `seq`, append it to the event
//!   log `relay.events` and ring a small `pg_notify` doorbell.
//! - [`schema`]: the embedded migrations and the install SQL for psql.
//! - [`embedded_pg`]: a private Postgres from the local server binaries,
//!   for `pgrelay serve` without `DATABASE_URL` and for the tests.
//! - [`demo`]: the demo project seeded into a private database.
//!
//! See `DESIGN.md` of the project for the guarantees (G1 to G7) each layer
//! upholds.

pub mod demo;
pub mod embedded_pg;
pub mod schema;

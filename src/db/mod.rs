//! What installs and runs Postgres: the SQL the relay installs
//! ([`schema`]), the private server for running without `DATABASE_URL`
//! and for the tests ([`embedded`]), the demo project seeded into it
//! ([`demo`]), the one place that opens connections ([`connect`]), the
//! pool whose every query is bounded in time ([`pool`]), and connection
//! strings with their passwords hidden, for logs ([`redact`]).

pub mod connect;
pub mod demo;
pub mod embedded;
pub mod pool;
pub mod redact;
pub mod schema;

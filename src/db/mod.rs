//! What installs and runs Postgres: the SQL the relay installs
//! ([`schema`]), the private server for running without `DATABASE_URL`
//! and for the tests ([`embedded`]), the demo project seeded into it
//! ([`demo`]), and the one place that opens connections ([`connect`]).

pub mod connect;
pub mod demo;
pub mod embedded;
pub mod schema;

//! The delivery path, in the order an event takes it: a notice arrives on
//! the [`listener`], its frames are read from the event [`log`], the
//! [`hub`] decides who gets them, each [`session`] writes them to one
//! socket, in the frames of the [`protocol`]. Beside them, the [`budget`]
//! bounds the catch-up data all sessions hold together, and [`rate`] says
//! how many per second.
//!
//! Ephemeral signals (G9) take another path, through the database: a
//! client's broadcast goes out on the [`signal`] channel and comes back to
//! every relay's [`hub`]; [`presence`] keeps who is online in Postgres and
//! a mirror of it here; both reach a session through its [`mailbox`].

pub mod budget;
pub mod hub;
pub mod listener;
pub mod log;
pub mod mailbox;
pub mod presence;
pub mod protocol;
pub mod rate;
pub mod session;
pub mod signal;

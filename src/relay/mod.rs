//! The delivery path, in the order an event takes it: a notice arrives on
//! the [`listener`], its frames are read from the event [`log`], the
//! [`hub`] decides who gets them, each [`session`] writes them to one
//! socket, in the frames of the [`protocol`]. Beside them, the [`budget`]
//! bounds the catch-up data all sessions hold together.

pub mod budget;
pub mod hub;
pub mod listener;
pub mod log;
pub mod protocol;
pub mod session;

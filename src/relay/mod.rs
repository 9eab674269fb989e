//! The delivery path, in the order an event takes it: a notice arrives on
//! the [`listener`], its frames are read from the event [`log`], the
//! [`hub`] decides who gets them, each [`session`] writes them to one
//! socket, in the frames of the [`protocol`].

pub mod hub;
pub mod listener;
pub mod log;
pub mod protocol;
pub mod session;

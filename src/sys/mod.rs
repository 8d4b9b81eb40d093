//! Thin, checked wrappers of the system facilities the rest builds on: sealed memory files and
//! their mappings, UNIX sockets made safely.

pub mod memfd;
pub mod socket;

//! Thin, checked wrappers of the system facilities the rest builds on: sealed memory files and
//! their mappings, UNIX sockets made safely, the monotonic clock, absolute-time timers and
//! wake-up eventfds.

pub mod clock;
pub mod eventfd;
pub mod memfd;
pub mod socket;
pub mod timerfd;

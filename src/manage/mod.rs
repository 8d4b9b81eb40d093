//! Management: the instance manager (types, capacity, lifecycle), the mdev-shaped FUSE tree, the
//! daemon, and the control endpoints of instances and of the daemon.

pub mod control;
pub mod daemon;
pub mod manager;
pub mod mdevfs;

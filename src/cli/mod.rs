//! What the command line does beyond parsing: the type catalog commands, lock files of user
//! types, `serve`, and the libvirt XML of an instance.

pub mod catalog_cmd;
pub mod libvirt_cmd;
pub mod lock;
pub mod serve;

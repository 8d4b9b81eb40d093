//! What the command line does beyond parsing: the type catalog commands, lock files of user
//! types, and `serve`.

pub mod catalog_cmd;
pub mod lock;
pub mod serve;

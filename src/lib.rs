//! vgpu-emu: emulated mediated vGPU devices served to VMs over vfio-user.
//!
//! Data flows socket -> [`vfio_user::server`] -> [`instance`] -> `vgpu_model` and back; the
//! server never interprets a register and the model never sees a socket.
//!
//! - [`vfio_user`]: wire format, descriptors, the server, DMA maps, interrupts
//! - [`instance`]: a served device and what it reports
//! - [`manage`]: the manager, the mdev tree, the daemon, control endpoints
//! - [`display`]: frames out of an instance (PNG; the RFB protocol and encoders, not yet served)
//! - [`sys`]: sealed memfds and mappings, sockets
//! - [`cli`]: the catalog commands, lock files, `serve`
//!
//! The modules are also re-exported at the top level under their own names
//! (`vgpu_emu::server`, `vgpu_emu::memfd`, ...), the paths tests, benchmarks and fuzz targets use.

pub mod cli;
pub mod display;
pub mod error;
pub mod instance;
pub mod integrate;
pub mod manage;
pub mod ratelimit;
pub mod sys;
pub mod vfio_user;

pub use cli::{catalog_cmd, lock, serve};
pub use manage::{control, daemon, manager, mdevfs};
pub use sys::{memfd, socket};
pub use vfio_user::{dma, irq, protocol, scm, server};

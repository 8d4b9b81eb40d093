//! vgpu-emu: emulated mediated vGPU devices served to VMs over vfio-user.
//!
//! Data flows socket -> [`server`] -> [`instance`] -> `vgpu_model` and back; the server never
//! interprets a register and the model never sees a socket.

pub mod catalog_cmd;
pub mod control;
pub mod daemon;
pub mod display;
pub mod dma;
pub mod error;
pub mod instance;
pub mod irq;
pub mod lock;
pub mod manager;
pub mod mdevfs;
pub mod memfd;
pub mod protocol;
pub mod ratelimit;
pub mod scm;
pub mod serve;
pub mod server;
pub mod socket;

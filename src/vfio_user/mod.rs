//! The vfio-user side: the wire format, descriptor passing, the server and its per-client state
//! (DMA maps, interrupt eventfds).

pub mod dma;
pub mod irq;
pub mod protocol;
pub mod scm;
pub mod server;

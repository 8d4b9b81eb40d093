//! The `virtio-gpu` personality (multi-head; the M60 family): a virtio-pci modern device that
//! stock Linux `virtio_gpu` drives, one connector per head.
//!
//! - [`transport`]: virtio-pci capabilities, common configuration, ISR, notifications, device
//!   configuration, the MSI-X BAR, and the split virtqueues.
//! - [`protocol`]: the wire format: requests decoded into a typed [`Command`], responses
//!   encoded, `VIRTIO_GPU_RESP_ERR_*` as [`ErrorCode`].
//! - [`resources`]: 2D resources, guest-memory blobs, backings and the memory budget.
//! - [`commands`]: the GPU itself: commands executed against resources, scanouts, cursors,
//!   EDIDs and display info; what each head shows ([`HeadSource`]).
//!
//! The transport hands [`Gpu`] each request as the bytes of a descriptor chain's
//! device-readable part and writes back the [`Completion`]'s response.

pub mod commands;
pub mod protocol;
pub mod resources;
pub mod transport;

pub use commands::{
    Completion, Cursor, Gpu, HeadCounters, HeadSource, HeadStatus, MemoryStatus, MAX_REQUEST,
};
pub use protocol::{Command, DecodeError, ErrorCode};
pub use resources::Backing;
pub use transport::Transport;

#[cfg(test)]
mod transport_tests;

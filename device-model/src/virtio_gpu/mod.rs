//! The `virtio-gpu` personality (multi-head; the M60 family): a virtio-pci modern device that
//! stock Linux `virtio_gpu` drives, one connector per head.
//!
//! - [`transport`]: virtio-pci capabilities, common configuration, ISR, notifications, device
//!   configuration, the MSI-X BAR, and the split virtqueues.
//! - [`commands`]: the GPU itself: control- and cursor-queue requests decoded into typed
//!   commands and executed (resources, backing, scanouts, blobs, cursor, EDID, display info).
//!
//! The transport hands [`Gpu`] each request as the bytes of a descriptor chain's
//! device-readable part and writes back the [`Completion`]'s response.

pub mod commands;
pub mod transport;

pub use commands::{Completion, Gpu, HeadSource, MAX_REQUEST};
pub use transport::Transport;

#[cfg(test)]
mod transport_tests;

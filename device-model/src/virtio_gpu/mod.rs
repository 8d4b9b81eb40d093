//! The `virtio-gpu` personality (multi-head; the M60 family): a virtio-pci modern device that
//! stock Linux `virtio_gpu` drives, one connector per head.
//!
//! - [`commands`]: the GPU itself: control- and cursor-queue requests decoded into typed
//!   commands and executed (resources, backing, scanouts, blobs, cursor, EDID, display info).
//!
//! The transport (virtio-pci capabilities, common configuration, queues, notifications,
//! interrupts) hands [`Gpu`] each request as the bytes of a descriptor chain's device-readable
//! part and writes back the [`Completion`]'s response.

pub mod commands;

pub use commands::{Completion, Gpu, HeadSource, MAX_REQUEST};

//! The GPU behind the queues. (Interface stub: every request is answered ERR_UNSPEC until the
//! command set lands.)

use std::sync::Arc;

use vm_memory::GuestMemory;

use crate::bus::GuestRam;
use crate::catalog::VgpuType;
use crate::scanout::{Frame, NotDisplaying};

/// Largest device-readable part of one request the transport gathers (header, payload and
/// backing entries); a longer chain is answered ERR_INVALID_PARAMETER without being read.
pub const MAX_REQUEST: usize = 1 << 20;

const RESP_ERR_UNSPEC: u32 = 0x1200;

/// What one request produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// The response (a `virtio_gpu_ctrl_hdr` first) for the chain's device-writable part.
    pub response: Vec<u8>,
    /// The request carried VIRTIO_GPU_FLAG_FENCE: its fence id.
    pub fence: Option<u64>,
}

/// What a head shows, held so a frame can be copied without holding the device.
#[derive(Clone, Debug)]
pub enum HeadSource {
    /// A host-side 2D resource (copy-on-write: a later transfer never waits for a copy).
    Host {
        /// The resource's pixels.
        pixels: Arc<Vec<u8>>,
        /// Bytes per resource row.
        stride: u32,
        /// Visible rectangle inside the resource.
        x: u32,
        /// Visible rectangle inside the resource.
        y: u32,
        /// Visible width.
        width: u32,
        /// Visible height.
        height: u32,
    },
    /// A guest-memory blob.
    Guest {
        /// Guest RAM.
        mem: Arc<GuestRam>,
    },
}

impl HeadSource {
    /// Copies the visible image.
    pub fn capture(&self) -> Frame {
        unimplemented!("stub")
    }
}

/// The GPU of one instance.
#[derive(Debug)]
pub struct Gpu {
    num_scanouts: u32,
}

impl Gpu {
    /// A GPU for `ty` (heads, budget, EDIDs) of instance `uuid`.
    pub fn new(ty: &VgpuType, _uuid: &[u8; 16]) -> Gpu {
        Gpu {
            num_scanouts: ty.num_heads,
        }
    }

    /// `num_scanouts` of the device configuration.
    pub fn num_scanouts(&self) -> u32 {
        self.num_scanouts
    }

    /// Pending `events_read` bits (VIRTIO_GPU_EVENT_DISPLAY).
    pub fn events_read(&self) -> u32 {
        0
    }

    /// The guest wrote `events_clear`.
    pub fn events_clear(&mut self, _bits: u32) {}

    /// Executes one control-queue request.
    pub fn control<M: GuestMemory>(&mut self, _mem: &M, _request: &[u8]) -> Completion {
        Completion {
            response: unspec(),
            fence: None,
        }
    }

    /// Executes one cursor-queue request.
    pub fn cursor<M: GuestMemory>(&mut self, _mem: &M, _request: &[u8]) -> Completion {
        Completion::default()
    }

    /// Device reset: drops every resource, scanout and pending fence.
    pub fn reset(&mut self) {}

    /// Head `head`'s EDID.
    pub fn edid(&self, _head: u32) -> Option<&[u8]> {
        None
    }

    /// What head `head` shows.
    pub fn head(
        &self,
        head: u32,
        _mem: Option<&Arc<GuestRam>>,
    ) -> Result<HeadSource, NotDisplaying> {
        if head >= self.num_scanouts {
            return Err(NotDisplaying::NoSuchHead(head));
        }
        Err(NotDisplaying::Disabled)
    }
}

fn unspec() -> Vec<u8> {
    let mut r = vec![0u8; 24];
    r[..4].copy_from_slice(&RESP_ERR_UNSPEC.to_le_bytes());
    r
}

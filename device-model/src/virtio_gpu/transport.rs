//! The virtio-pci modern transport of the virtio-gpu personality (virtio 1.2, section 4.1):
//! capabilities, common configuration, ISR, notifications, device configuration, the MSI-X
//! BAR, and the two split virtqueues walked with `virtio-queue`.
//!
//! BAR4 (64-bit prefetchable, 16 KiB, trapped), one structure per 4 KiB page:
//!
//! ```text
//!  0x0000  common configuration (struct virtio_pci_common_cfg), 0x3c bytes
//!  0x1000  ISR status, 1 byte, read-to-clear: bit 0 queue interrupt, bit 1 config change
//!  0x2000  device configuration (struct virtio_gpu_config), 16 bytes
//!  0x3000  notifications: queue n at 0x3000 + 4 * n (notify_off n, multiplier 4)
//!  elsewhere reads 0, writes ignored
//! ```
//!
//! Common configuration (RO: read-only, RW: read/write; natural-width access):
//!
//! ```text
//!  0x00 device_feature_select  u32 RW     0x04 device_feature   u32 RO
//!  0x08 driver_feature_select  u32 RW     0x0c driver_feature   u32 RW
//!  0x10 config_msix_vector     u16 RW     0x12 num_queues       u16 RO (2)
//!  0x14 device_status          u8  RW     0x15 config_generation u8 RO
//!  0x16 queue_select           u16 RW     0x18 queue_size       u16 RW (max 256)
//!  0x1a queue_msix_vector      u16 RW     0x1c queue_enable     u16 RW (1 only)
//!  0x1e queue_notify_off       u16 RO     0x20 queue_desc       u64 RW
//!  0x28 queue_driver           u64 RW     0x30 queue_device     u64 RW
//!  0x38 queue_notify_data      u16 RO 0   0x3a queue_reset      u16 RO 0 (not offered)
//! ```
//!
//! Reads have no side effects (except ISR) and may use any width: they return the bytes of
//! the register image. Writes must hit a field at its start with its width (a 64-bit field
//! also as two 32-bit halves); anything else is ignored and counted.
//!
//! BAR1 (4 KiB): the MSI-X table (3 vectors: config, controlq, cursorq) at 0x000 and its
//! pending-bit array at 0x800. QEMU emulates the table and masking itself; what reaches us of
//! the table is kept as plain storage, and the PBA reads as no vector pending (the model
//! signals vectors through [`InterruptSink`] and never holds one back).
//!
//! Queues are served inline on the notify write (the kick): each available chain's
//! device-readable part is gathered (at most [`MAX_REQUEST`] bytes; longer is answered
//! `VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER` unread), handed to [`Gpu`], and the response written
//! into the device-writable part (what fits). A ring the device cannot walk (rings outside
//! guest memory, a descriptor loop, an invalid indirect table, a head index out of range) puts
//! the device into DEVICE_NEEDS_RESET: it raises the configuration interrupt and serves no
//! queue until the driver resets it.
//!
//! Without guest memory (no client, or before its DMA maps arrive) a kick is remembered and
//! served when memory is attached; so is a kick before DRIVER_OK (the device must not use the
//! rings before it).
//!
//! The frame-rate limiter ([`crate::frl`]) paces fenced RESOURCE_FLUSHes: while it is active
//! (knob on, FRL not 0, a clock attached), a control-queue chain whose request is a fenced
//! RESOURCE_FLUSH is answered at once but not put in the used ring: it is held until the next
//! tick ([`Transport::frl_tick`]). Every later fenced request of the control queue is held
//! behind it (Linux signals all earlier fences when a later one completes, so fences complete
//! in submission order, which is fence-id order for Linux); requests without a fence complete
//! at once (the used ring may be out of order), and the cursor queue is never held. At most
//! the control queue's size of chains are held; beyond, the queue is served again after a tick.
//! Turning the knob off completes what is held at once; a reset, a ring failure and losing
//! guest memory drop it without completing it.

use std::collections::VecDeque;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_bindings::virtio_gpu::{VIRTIO_GPU_F_EDID, VIRTIO_GPU_F_RESOURCE_BLOB};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::commands::{Completion, Gpu, MAX_REQUEST};
use crate::bus::{Clock, GuestRam, InterruptSink, NullInterrupts};
use crate::catalog::{BarKind, VgpuType};
use crate::frl::{HeadFrames, Held, Limiter};
use crate::pci::{self, Capability, VendorCapability, CAP_ID_VENDOR};

/// Feature bits the device offers (guest ABI: part of the type version).
pub mod feature {
    use super::*;
    /// VIRTIO_GPU_F_EDID: GET_EDID per head.
    pub const EDID: u64 = 1 << VIRTIO_GPU_F_EDID;
    /// VIRTIO_GPU_F_RESOURCE_BLOB: guest-memory blob resources.
    pub const RESOURCE_BLOB: u64 = 1 << VIRTIO_GPU_F_RESOURCE_BLOB;
    /// VIRTIO_F_RING_INDIRECT_DESC: indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;
    /// VIRTIO_F_VERSION_1: a modern (non-legacy) device.
    pub const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
    /// Everything offered. Never VIRGL, ACCESS_PLATFORM, packed rings or EVENT_IDX.
    pub const OFFERED: u64 = EDID | RESOURCE_BLOB | RING_INDIRECT_DESC | VERSION_1;
}

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    use super::*;
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = VIRTIO_CONFIG_S_DRIVER as u8;
    /// The driver is ready: the device may use the queues.
    pub const DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
    /// The device hit an error it cannot recover from without a reset.
    pub const NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
    /// The driver gave up on the device.
    pub const FAILED: u8 = VIRTIO_CONFIG_S_FAILED as u8;
    /// Bits the driver sets.
    pub const DRIVER_BITS: u8 = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | FAILED;
}

/// BAR4 layout.
pub mod layout {
    /// Common configuration.
    pub const COMMON: u64 = 0x0000;
    /// Bytes of common configuration (through `queue_reset`).
    pub const COMMON_LEN: u64 = 0x3c;
    /// ISR status.
    pub const ISR: u64 = 0x1000;
    /// Bytes of ISR status.
    pub const ISR_LEN: u64 = 1;
    /// Device configuration.
    pub const DEVICE: u64 = 0x2000;
    /// Bytes of device configuration (`struct virtio_gpu_config`).
    pub const DEVICE_LEN: u64 = 16;
    /// Notifications.
    pub const NOTIFY: u64 = 0x3000;
    /// Bytes between two queues' notify addresses.
    pub const NOTIFY_MULTIPLIER: u32 = 4;
    /// Bytes of the notify structure.
    pub const NOTIFY_LEN: u64 = super::NUM_QUEUES as u64 * NOTIFY_MULTIPLIER as u64;
    /// Size of one structure's page.
    pub const PAGE: u64 = 0x1000;
    /// MSI-X table offset in BAR1.
    pub const MSIX_TABLE: u32 = 0x000;
    /// MSI-X pending-bit array offset in BAR1.
    pub const MSIX_PBA: u32 = 0x800;
}

/// virtio-pci capability `cfg_type` values (virtio 1.2, section 4.1.4).
pub mod cfg_type {
    /// Common configuration.
    pub const COMMON: u8 = 1;
    /// Notifications.
    pub const NOTIFY: u8 = 2;
    /// ISR status.
    pub const ISR: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE: u8 = 4;
    /// PCI configuration access window.
    pub const PCI_CFG: u8 = 5;
}

/// Queues: controlq and cursorq.
pub const NUM_QUEUES: usize = 2;
/// Largest queue size the device offers.
pub const MAX_QUEUE_SIZE: u16 = 256;
/// MSI-X vectors: 0 config changes, 1 controlq, 2 cursorq (what Linux assigns).
pub const MSIX_VECTORS: u16 = 3;
/// "No vector" in config_msix_vector / queue_msix_vector.
pub const NO_VECTOR: u16 = 0xffff;
/// Descriptors one chain may have (a longer chain is treated like a loop).
pub const MAX_CHAIN_DESCRIPTORS: usize = 4096;
/// Notices held for the server before older ones are dropped.
pub const MAX_NOTICES: usize = 16;
/// Fenced completions [`Transport::take_fence_log`] keeps between two calls.
pub const FENCE_LOG: usize = 4096;
/// Index of the PCI_CFG capability in [`capabilities`].
pub const PCI_CFG_CAP_INDEX: usize = 4;
/// Bytes of the PCI_CFG capability before its data window.
pub const PCI_CFG_DATA: usize = 16;

const RESP_ERR_UNSPEC: u32 = 0x1200;
const RESP_ERR_INVALID_PARAMETER: u32 = 0x1205;
const MSIX_TABLE_BYTES: usize = MSIX_VECTORS as usize * 16;

/// The capability chain of a virtio-gpu type, in config-space order:
///
/// ```text
///  0x40 COMMON_CFG  0x50 ISR_CFG  0x60 DEVICE_CFG  0x70 NOTIFY_CFG (20 bytes)
///  0x84 PCI_CFG (20 bytes; bar, offset, length and data RW)  0x98 MSI-X (12 bytes)
///  0xa4 type identity (virtio vendor data, 44 bytes)
/// ```
///
/// Each virtio capability (`struct virtio_pci_cap`): +0 0x09, +1 next, +2 length, +3
/// cfg_type, +4 bar, +5 id 0, +6 padding, +8 offset u32, +12 length u32; the notify one adds
/// +16 notify_off_multiplier u32, the PCI_CFG one +16 pci_cfg_data[4].
pub fn capabilities(ty: &VgpuType) -> Vec<Capability> {
    let bar_of = |kind| {
        ty.bars
            .iter()
            .find(|b| b.kind == kind)
            .map_or(0, |b| b.index)
    };
    let virtio_bar = bar_of(BarKind::Virtio);
    let cap = |kind: u8, len: u8, offset: u64, length: u64| {
        let mut c = vec![0u8; usize::from(len)];
        c[0] = CAP_ID_VENDOR;
        c[2] = len;
        c[3] = kind;
        c[4] = virtio_bar;
        c[8..12].copy_from_slice(&(offset as u32).to_le_bytes());
        c[12..16].copy_from_slice(&(length as u32).to_le_bytes());
        c
    };
    let mut notify = cap(cfg_type::NOTIFY, 20, layout::NOTIFY, layout::NOTIFY_LEN);
    notify[16..20].copy_from_slice(&layout::NOTIFY_MULTIPLIER.to_le_bytes());
    let mut pci_cfg = Capability {
        bytes: cap(cfg_type::PCI_CFG, 20, 0, 0),
        wmask: vec![0u8; 20],
    };
    pci_cfg.bytes[4] = 0;
    pci_cfg.wmask[4] = 0xff;
    pci_cfg.wmask[8..20].fill(0xff);
    vec![
        Capability::read_only(cap(
            cfg_type::COMMON,
            16,
            layout::COMMON,
            layout::COMMON_LEN,
        )),
        Capability::read_only(cap(cfg_type::ISR, 16, layout::ISR, layout::ISR_LEN)),
        Capability::read_only(cap(
            cfg_type::DEVICE,
            16,
            layout::DEVICE,
            layout::DEVICE_LEN,
        )),
        Capability::read_only(notify),
        pci_cfg,
        pci::msix_capability(
            MSIX_VECTORS,
            bar_of(BarKind::Msix),
            layout::MSIX_TABLE,
            layout::MSIX_PBA,
        ),
        VendorCapability::virtio(ty),
    ]
}

/// One virtqueue's registers and, once enabled, its `virtio-queue` state.
#[derive(Debug)]
struct VirtQueue {
    size: u16,
    msix_vector: u16,
    desc: u64,
    driver: u64,
    device: u64,
    /// Built from the registers when the driver writes queue_enable = 1.
    queue: Option<Queue>,
    /// Kicked but not served yet (no memory, or before DRIVER_OK).
    pending: bool,
}

impl VirtQueue {
    fn new() -> Self {
        VirtQueue {
            size: MAX_QUEUE_SIZE,
            msix_vector: NO_VECTOR,
            desc: 0,
            driver: 0,
            device: 0,
            queue: None,
            pending: false,
        }
    }
}

/// Transport counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportCounters {
    /// Register writes with no effect (read-only field, odd width or offset, refused value).
    pub ignored_writes: u64,
    /// Notify writes.
    pub kicks: u64,
    /// Descriptor chains served.
    pub chains: u64,
    /// Interrupts signalled.
    pub interrupts: u64,
    /// Times the device entered DEVICE_NEEDS_RESET.
    pub needs_reset: u64,
}

/// The virtio-pci transport and the GPU behind it.
#[derive(Debug)]
pub struct Transport {
    gpu: Gpu,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_msix_vector: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: [VirtQueue; NUM_QUEUES],
    isr: u8,
    last_events: u32,
    msix_table: [u8; MSIX_TABLE_BYTES],
    mem: Option<Arc<GuestRam>>,
    irq: Arc<dyn InterruptSink>,
    notices: Notices,
    counters: TransportCounters,
    limiter: Limiter,
    /// Fenced control requests served since the transport was created.
    fence_seq: u64,
    /// (order, fence id) of fenced control completions, when recording (fuzzing).
    fence_log: Option<Vec<(u64, u64)>>,
}

/// Notices for the server to log: bounded, oldest kept, the rest counted.
#[derive(Debug, Default)]
struct Notices {
    list: VecDeque<String>,
    dropped: u64,
}

impl Notices {
    fn push(&mut self, text: String) {
        if self.list.len() >= MAX_NOTICES {
            self.dropped += 1;
        } else {
            self.list.push_back(text);
        }
    }

    fn take(&mut self) -> Vec<String> {
        let mut out: Vec<String> = self.list.drain(..).collect();
        if self.dropped > 0 {
            out.push(format!("{} more virtio-gpu notices dropped", self.dropped));
            self.dropped = 0;
        }
        out
    }
}

/// Why a chain could not be served: the ring is broken, the device needs a reset.
#[derive(Debug)]
enum RingError {
    Unreachable,
    Misaligned,
    Queue(virtio_queue::Error),
    BadChain(u16),
    TooLong(u16),
}

impl std::fmt::Display for RingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingError::Unreachable => f.write_str(
                "ring is outside mapped guest memory (only guest RAM shared with a file that \
                 cannot shrink is mapped: QEMU's memory-backend-memfd with share=on)",
            ),
            RingError::Misaligned => f.write_str("ring address breaks the alignment rules"),
            RingError::Queue(e) => write!(f, "ring is invalid ({e})"),
            RingError::BadChain(head) => write!(
                f,
                "chain at descriptor {head} cannot be walked (a loop, an index or an indirect \
                 table out of range, or memory outside guest RAM)"
            ),
            RingError::TooLong(head) => write!(
                f,
                "chain at descriptor {head} has more than {MAX_CHAIN_DESCRIPTORS} descriptors"
            ),
        }
    }
}

fn queue_name(q: usize) -> &'static str {
    if q == 0 {
        "controlq"
    } else {
        "cursorq"
    }
}

impl Transport {
    /// The transport of an instance of `ty` (`uuid` for the GPU's EDID serials), with no guest
    /// memory and no interrupts attached.
    pub fn new(ty: &VgpuType, uuid: &[u8; 16]) -> Self {
        let gpu = Gpu::new(ty, uuid);
        let limiter = Limiter::new(ty.frl, gpu.num_scanouts());
        Transport {
            gpu,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_msix_vector: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: [VirtQueue::new(), VirtQueue::new()],
            isr: 0,
            last_events: 0,
            msix_table: Self::msix_reset_table(),
            mem: None,
            irq: Arc::new(NullInterrupts),
            notices: Notices::default(),
            counters: TransportCounters::default(),
            limiter,
            fence_seq: 0,
            fence_log: None,
        }
    }

    fn msix_reset_table() -> [u8; MSIX_TABLE_BYTES] {
        let mut t = [0u8; MSIX_TABLE_BYTES];
        // Vector control: masked at reset (PCI 3.0, 6.8.2.9).
        for entry in t.chunks_exact_mut(16) {
            entry[12] = 1;
        }
        t
    }

    /// The GPU.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The device status register.
    pub fn device_status(&self) -> u8 {
        self.status
    }

    /// Negotiated (driver-accepted) features.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Counters.
    pub fn counters(&self) -> TransportCounters {
        self.counters
    }

    /// The size of queue `q` once the driver enabled it.
    pub fn queue_size(&self, q: usize) -> Option<u16> {
        self.queues.get(q)?.queue.as_ref().map(|queue| queue.size())
    }

    /// Guest memory from now on (`None`: the client went away). Kicks remembered while there
    /// was none are served now.
    /// Losing memory drops the completions the limiter held, without completing them.
    pub fn attach_memory(&mut self, mem: Option<Arc<GuestRam>>) {
        if mem.is_none() {
            self.limiter.discard();
        }
        self.mem = mem;
        self.serve_pending();
    }

    /// Gives the frame-rate limiter its clock (tick 0 is now). What it held on another clock
    /// is completed first.
    pub fn attach_clock(&mut self, clock: Arc<dyn Clock>) {
        let held = self.limiter.release_all();
        self.complete_held(held);
        self.limiter.attach_clock(clock);
    }

    /// The limiter's knob: off completes at once whatever is held, and holds nothing more.
    pub fn set_frame_rate_limiter(&mut self, on: bool) {
        self.limiter.set_enabled(on);
        if !on {
            let held = self.limiter.release_all();
            self.complete_held(held);
        }
    }

    /// Whether the limiter's knob is on.
    pub fn frame_rate_limiter(&self) -> bool {
        self.limiter.enabled()
    }

    /// The limiter (its clock, grid and held completions).
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// When [`Transport::frl_tick`] next has something to complete (`None`: nothing held).
    pub fn frl_deadline(&self) -> Option<std::time::Duration> {
        self.limiter.deadline()
    }

    /// Completes, in order, what the limiter held for the ticks up to now, with one interrupt.
    /// Returns how many.
    pub fn frl_tick(&mut self) -> usize {
        let due = self.limiter.release_due();
        self.complete_held(due)
    }

    /// The limiter's per-head counters.
    pub fn frl_counters(&self) -> Vec<HeadFrames> {
        self.limiter.counters()
    }

    /// Starts (or stops) recording the fenced control completions for
    /// [`Transport::take_fence_log`] (the fuzz harness checks their order).
    #[doc(hidden)]
    pub fn record_fences(&mut self, on: bool) {
        self.fence_log = on.then(Vec::new);
    }

    /// Takes the (order, fence id) of the fenced control requests completed since the last
    /// call, in completion order (at most [`FENCE_LOG`]; empty unless recording).
    #[doc(hidden)]
    pub fn take_fence_log(&mut self) -> Vec<(u64, u64)> {
        self.fence_log
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Puts completions the limiter released into the control queue's used ring, then signals
    /// its vector once (if the driver wants it), and serves the queue if it waited for room.
    fn complete_held(&mut self, held: Vec<Held>) -> usize {
        if held.is_empty() {
            return 0;
        }
        let Some(mem) = self.mem.clone() else {
            return 0;
        };
        let Some(queue) = self.queues[0].queue.as_mut() else {
            return 0;
        };
        let mut used = 0usize;
        let mut broken = None;
        for h in &held {
            if queue.add_used(&*mem, h.desc, h.len).is_err() {
                broken = Some(RingError::BadChain(h.desc));
                break;
            }
            used += 1;
            log_fence(&mut self.fence_log, h.seq, h.fence);
        }
        let notify = if used > 0 {
            queue.needs_notification(&*mem).map_err(RingError::Queue)
        } else {
            Ok(false)
        };
        self.counters.chains += used as u64;
        match (broken, notify) {
            (Some(e), _) | (None, Err(e)) => self.fail(0, &e),
            (None, Ok(notify)) => {
                if notify {
                    self.isr |= 1;
                    self.signal(self.queues[0].msix_vector);
                }
                if self.queues[0].pending {
                    self.serve_pending();
                }
            }
        }
        used
    }

    /// Where interrupts go from now on.
    pub fn attach_interrupts(&mut self, irq: Arc<dyn InterruptSink>) {
        self.irq = irq;
    }

    /// Takes the notices gathered since the last call (at most [`MAX_NOTICES`], oldest first;
    /// a line says how many were dropped in between).
    pub fn take_notices(&mut self) -> Vec<String> {
        self.notices.take()
    }

    fn notice(&mut self, text: String) {
        self.notices.push(text);
    }

    /// Device reset (status 0, or a function reset): queues, features, ISR, vectors and the
    /// GPU's resources. Memory and interrupt attachments stay.
    /// Completions the limiter held are dropped without being completed.
    pub fn reset(&mut self) {
        self.limiter.discard();
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.config_msix_vector = NO_VECTOR;
        self.status = 0;
        self.queue_select = 0;
        self.queues = [VirtQueue::new(), VirtQueue::new()];
        self.isr = 0;
        self.last_events = 0;
        self.gpu.reset();
    }

    /// A function reset also clears the MSI-X table storage.
    pub fn function_reset(&mut self) {
        self.reset();
        self.msix_table = Self::msix_reset_table();
    }

    /// The device configuration image (`struct virtio_gpu_config`).
    pub fn device_config(&self) -> [u8; layout::DEVICE_LEN as usize] {
        let mut c = [0u8; layout::DEVICE_LEN as usize];
        c[0..4].copy_from_slice(&self.gpu.events_read().to_le_bytes());
        // events_clear (+4) reads 0; num_capsets (+12) is 0: no 3D.
        c[8..12].copy_from_slice(&self.gpu.num_scanouts().to_le_bytes());
        c
    }

    fn common_image(&self) -> [u8; layout::COMMON_LEN as usize] {
        let mut c = [0u8; layout::COMMON_LEN as usize];
        let device_feature = match self.device_feature_select {
            0 => feature::OFFERED as u32,
            1 => (feature::OFFERED >> 32) as u32,
            _ => 0,
        };
        let driver_feature = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        c[0x00..0x04].copy_from_slice(&self.device_feature_select.to_le_bytes());
        c[0x04..0x08].copy_from_slice(&device_feature.to_le_bytes());
        c[0x08..0x0c].copy_from_slice(&self.driver_feature_select.to_le_bytes());
        c[0x0c..0x10].copy_from_slice(&driver_feature.to_le_bytes());
        c[0x10..0x12].copy_from_slice(&self.config_msix_vector.to_le_bytes());
        c[0x12..0x14].copy_from_slice(&(NUM_QUEUES as u16).to_le_bytes());
        c[0x14] = self.status;
        c[0x15] = self.config_generation;
        c[0x16..0x18].copy_from_slice(&self.queue_select.to_le_bytes());
        if let Some(q) = self.queues.get(usize::from(self.queue_select)) {
            c[0x18..0x1a].copy_from_slice(&q.size.to_le_bytes());
            c[0x1a..0x1c].copy_from_slice(&q.msix_vector.to_le_bytes());
            c[0x1c..0x1e].copy_from_slice(&u16::from(q.queue.is_some()).to_le_bytes());
            c[0x1e..0x20].copy_from_slice(&self.queue_select.to_le_bytes());
            c[0x20..0x28].copy_from_slice(&q.desc.to_le_bytes());
            c[0x28..0x30].copy_from_slice(&q.driver.to_le_bytes());
            c[0x30..0x38].copy_from_slice(&q.device.to_le_bytes());
        }
        // A selected queue that does not exist reads queue_size 0 (virtio 1.2, 4.1.4.3.1).
        c
    }

    /// Reads BAR4 (the caller checked the range is inside the BAR).
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let page = offset & !(layout::PAGE - 1);
        let at = (offset - page) as usize;
        let copy = |src: &[u8], data: &mut [u8]| {
            for (i, b) in data.iter_mut().enumerate() {
                *b = at
                    .checked_add(i)
                    .and_then(|j| src.get(j))
                    .copied()
                    .unwrap_or(0);
            }
        };
        match page {
            layout::COMMON => copy(&self.common_image(), data),
            // Read-to-clear (virtio 1.2, 4.1.4.5).
            layout::ISR if at == 0 && !data.is_empty() => {
                data[0] = self.isr;
                self.isr = 0;
            }
            layout::DEVICE => copy(&self.device_config(), data),
            _ => {}
        }
    }

    /// Writes BAR4 (the caller checked the range is inside the BAR). Returns how many writes
    /// had no effect.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        let page = offset & !(layout::PAGE - 1);
        let at = offset - page;
        let done = match page {
            layout::COMMON => self.write_common(at, data),
            layout::DEVICE => self.write_device_config(at, data),
            layout::NOTIFY => self.notify(at, data),
            _ => false,
        };
        if done {
            0
        } else {
            self.counters.ignored_writes += 1;
            1
        }
    }

    fn write_device_config(&mut self, at: u64, data: &[u8]) -> bool {
        // events_clear, u32, write-1-to-clear into events_read.
        if at != 4 || data.len() != 4 {
            return false;
        }
        let bits = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.gpu.events_clear(bits);
        self.check_events();
        true
    }

    fn notify(&mut self, at: u64, data: &[u8]) -> bool {
        let q = (at / u64::from(layout::NOTIFY_MULTIPLIER)) as usize;
        if q >= NUM_QUEUES || data.is_empty() {
            return false;
        }
        self.counters.kicks += 1;
        self.queues[q].pending = true;
        self.serve_pending();
        true
    }

    fn write_common(&mut self, at: u64, data: &[u8]) -> bool {
        let value = match *data {
            [a] => u64::from(a),
            [a, b] => u64::from(u16::from_le_bytes([a, b])),
            [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
            [a, b, c, d, e, f, g, h] => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
            _ => return false,
        };
        let width = data.len();
        let qi = usize::from(self.queue_select);
        match (at, width) {
            (0x00, 4) => self.device_feature_select = value as u32,
            (0x08, 4) => self.driver_feature_select = value as u32,
            (0x0c, 4) => return self.write_driver_features(value as u32),
            (0x10, 2) => self.config_msix_vector = Self::vector(value as u16),
            (0x14, 1) => return self.write_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (0x1a, 2) => match self.queues.get_mut(qi) {
                // "A vector the device cannot use reads back NO_VECTOR" (4.1.5.1.2).
                Some(q) => q.msix_vector = Self::vector(value as u16),
                None => return false,
            },
            (0x18, 2) => {
                let size = value as u16;
                match self.queues.get_mut(qi) {
                    Some(q)
                        if q.queue.is_none()
                            && size.is_power_of_two()
                            && size <= MAX_QUEUE_SIZE =>
                    {
                        q.size = size
                    }
                    _ => return false,
                }
            }
            (0x1c, 2) => return value == 1 && self.enable_queue(qi),
            (0x20 | 0x28 | 0x30, 4 | 8) | (0x24 | 0x2c | 0x34, 4) => {
                let Some(q) = self.queues.get_mut(qi) else {
                    return false;
                };
                // "The driver MUST configure the other virtqueue fields before enabling the
                // virtqueue" (4.1.4.3.2): an enabled queue's addresses are fixed until reset.
                if q.queue.is_some() {
                    return false;
                }
                let field = match at & !7 {
                    0x20 => &mut q.desc,
                    0x28 => &mut q.driver,
                    _ => &mut q.device,
                };
                *field = match (at & 4, width) {
                    (0, 8) => value,
                    (0, _) => (*field & !0xffff_ffff) | value,
                    _ => (*field & 0xffff_ffff) | (value << 32),
                };
            }
            _ => return false,
        }
        true
    }

    fn vector(v: u16) -> u16 {
        if v < MSIX_VECTORS {
            v
        } else {
            NO_VECTOR
        }
    }

    fn write_driver_features(&mut self, value: u32) -> bool {
        // "The driver MUST NOT change the features after FEATURES_OK" (3.1.1).
        if self.status & status::FEATURES_OK != 0 {
            return false;
        }
        match self.driver_feature_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => return value == 0,
        }
        true
    }

    /// The device status state machine (virtio 1.2, 2.1 and 3.1.1).
    fn write_status(&mut self, value: u8) -> bool {
        if value == 0 {
            // "Writing 0 into this field resets the device."
            self.reset();
            return true;
        }
        let old = self.status;
        let mut new = (value & status::DRIVER_BITS) | (old & status::NEEDS_RESET);
        // "The driver MUST NOT clear a device status bit."
        if old & status::DRIVER_BITS & !new != 0 {
            return false;
        }
        let mut accepted = true;
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            // "If the device does not support all the features the driver accepted it leaves
            // FEATURES_OK clear" (3.1.1 step 5-6); a modern-only device also needs VERSION_1.
            let ok = self.driver_features & !feature::OFFERED == 0
                && self.driver_features & feature::VERSION_1 != 0
                && new & (status::ACKNOWLEDGE | status::DRIVER)
                    == status::ACKNOWLEDGE | status::DRIVER;
            if !ok {
                new &= !status::FEATURES_OK;
                accepted = false;
                self.notice(format!(
                    "driver features {:#x} refused (offered {:#x}): FEATURES_OK stays clear",
                    self.driver_features,
                    feature::OFFERED
                ));
            }
        }
        if new & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
            // DRIVER_OK without a feature negotiation is not a state the device enters.
            new &= !status::DRIVER_OK;
            accepted = false;
        }
        self.status = new;
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            self.serve_pending();
        }
        accepted
    }

    fn enable_queue(&mut self, qi: usize) -> bool {
        let Some(q) = self.queues.get_mut(qi) else {
            return false;
        };
        if q.queue.is_some() {
            return false;
        }
        let Ok(mut queue) = Queue::new(MAX_QUEUE_SIZE) else {
            return false;
        };
        let set = queue
            .try_set_size(q.size)
            .and_then(|()| queue.try_set_desc_table_address(GuestAddress(q.desc)))
            .and_then(|()| queue.try_set_avail_ring_address(GuestAddress(q.driver)))
            .and_then(|()| queue.try_set_used_ring_address(GuestAddress(q.device)));
        queue.set_ready(true);
        q.queue = Some(queue);
        if set.is_err() {
            self.fail(qi, &RingError::Misaligned);
        }
        true
    }

    /// Enters DEVICE_NEEDS_RESET: no queue is served until the driver resets the device, which
    /// learns of it from the configuration interrupt (virtio 1.2, 2.1.2).
    fn fail(&mut self, qi: usize, why: &RingError) {
        if self.status & status::NEEDS_RESET == 0 {
            self.counters.needs_reset += 1;
            let (desc, driver, device) = self
                .queues
                .get(qi)
                .map_or((0, 0, 0), |q| (q.desc, q.driver, q.device));
            self.notice(format!(
                "{} (descriptors {desc:#x}, driver ring {driver:#x}, device ring {device:#x}): \
                 {why}; device needs reset",
                queue_name(qi)
            ));
            self.status |= status::NEEDS_RESET;
            self.config_changed();
        }
        // Nothing more is used on a broken device: what the limiter held is dropped.
        self.limiter.discard();
        for q in &mut self.queues {
            q.pending = false;
        }
    }

    fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.isr |= 2;
        self.signal(self.config_msix_vector);
    }

    fn signal(&mut self, vector: u16) {
        if vector < MSIX_VECTORS {
            self.counters.interrupts += 1;
            self.irq.signal_msix(vector);
        }
    }

    /// New display events (hotplug) raise the configuration interrupt.
    fn check_events(&mut self) {
        let events = self.gpu.events_read();
        let new = events & !self.last_events;
        self.last_events = events;
        if new != 0 {
            self.config_changed();
        }
    }

    fn serve_pending(&mut self) {
        if self.status & status::DRIVER_OK == 0 || self.status & status::NEEDS_RESET != 0 {
            return;
        }
        let Some(mem) = self.mem.clone() else {
            return;
        };
        for qi in 0..NUM_QUEUES {
            if self.queues[qi].pending && self.queues[qi].queue.is_some() {
                self.queues[qi].pending = false;
                if let Err(e) = self.serve_queue(qi, &mem) {
                    self.fail(qi, &e);
                    break;
                }
            }
        }
        self.check_events();
    }

    /// Serves at most the queue's size of chains (a guest refilling the ring as fast as we
    /// drain it cannot keep us here), then signals the queue's vector if anything was used.
    fn serve_queue(&mut self, qi: usize, mem: &GuestRam) -> Result<(), RingError> {
        let Some(queue) = self.queues[qi].queue.as_mut() else {
            return Ok(());
        };
        let size = u64::from(queue.size());
        let reachable = |addr: u64, len: u64, access| {
            addr.checked_add(len).is_some()
                && mem.check_range(GuestAddress(addr), len as usize, access)
        };
        // The whole rings, as the driver laid them out (virtio 1.2, 2.7): descriptor table
        // 16 bytes an entry, driver ring 6 + 2 an entry, device ring 6 + 8 an entry.
        if !reachable(queue.desc_table(), 16 * size, Permissions::Read)
            || !reachable(queue.avail_ring(), 6 + 2 * size, Permissions::Read)
            || !reachable(queue.used_ring(), 6 + 8 * size, Permissions::Write)
        {
            return Err(RingError::Unreachable);
        }
        let mut used = 0u32;
        let mut full = false;
        for _ in 0..size {
            if qi == 0 && self.limiter.held() >= usize::from(queue.size()) {
                // The limiter holds as many chains as the ring has: the rest waits for a tick.
                full = true;
                break;
            }
            // A fresh iterator per chain re-reads the driver's index (and checks it is at
            // most a ring ahead of us), as `pop_descriptor_chain` does, without its logging.
            let Some(chain) = queue.iter(mem).map_err(RingError::Queue)?.next() else {
                break;
            };
            let head = chain.head_index();
            let (len, done) = serve_chain(&mut self.gpu, qi, chain, mem, &mut self.notices)?;
            if let (0, Some(fence)) = (qi, done.fence) {
                let seq = self.fence_seq;
                self.fence_seq = seq.wrapping_add(1);
                let flush = done.is_flush();
                if flush {
                    self.limiter.submitted(done.flushed_heads);
                }
                if self.limiter.active() && (flush || self.limiter.held() > 0) {
                    self.limiter.hold(head, len, fence, done.flushed_heads, seq);
                    continue;
                }
                if flush {
                    self.limiter.presented_now(done.flushed_heads);
                }
                log_fence(&mut self.fence_log, seq, fence);
            } else if qi == 0 && done.is_flush() {
                // An unfenced flush (a guest on ordinary 2D buffers): a frame the guest does
                // not wait for, presented at once; counted all the same.
                self.limiter.submitted(done.flushed_heads);
                self.limiter.presented_now(done.flushed_heads);
            }
            queue
                .add_used(mem, head, len)
                .map_err(|_| RingError::BadChain(head))?;
            used += 1;
        }
        if full {
            self.queues[qi].pending = true;
        }
        let Some(queue) = self.queues[qi].queue.as_mut() else {
            return Ok(());
        };
        self.counters.chains += u64::from(used);
        if used > 0 && queue.needs_notification(mem).map_err(RingError::Queue)? {
            self.isr |= 1;
            let vector = self.queues[qi].msix_vector;
            self.signal(vector);
        }
        Ok(())
    }

    /// Reads BAR1 (MSI-X table storage and the PBA).
    pub fn msix_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| self.msix_table.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Writes BAR1: table bytes are stored, everything else (the PBA is read-only) ignored.
    /// Returns how many writes had no effect.
    pub fn msix_write(&mut self, offset: u64, data: &[u8]) -> u32 {
        let Some(dst) = usize::try_from(offset)
            .ok()
            .and_then(|at| self.msix_table.get_mut(at..at.checked_add(data.len())?))
        else {
            self.counters.ignored_writes += 1;
            return 1;
        };
        dst.copy_from_slice(data);
        0
    }
}

fn log_fence(log: &mut Option<Vec<(u64, u64)>>, seq: u64, fence: u64) {
    if let Some(log) = log {
        if log.len() < FENCE_LOG {
            log.push((seq, fence));
        }
    }
}

/// Serves one chain: gathers its device-readable part, runs the request, writes the response
/// into its device-writable part. Returns the bytes written and what the request was (its
/// response taken); a chain that cannot be walked is a [`RingError`].
fn serve_chain(
    gpu: &mut Gpu,
    qi: usize,
    chain: virtio_queue::DescriptorChain<&GuestRam>,
    mem: &GuestRam,
    notices: &mut Notices,
) -> Result<(u32, Completion), RingError> {
    let head = chain.head_index();
    let mut readable: Vec<(GuestAddress, u32)> = Vec::new();
    let mut writable: Vec<(GuestAddress, u32)> = Vec::new();
    let mut count = 0usize;
    let mut last_has_next = true;
    for desc in chain {
        count += 1;
        if count > MAX_CHAIN_DESCRIPTORS {
            return Err(RingError::TooLong(head));
        }
        last_has_next = desc.has_next();
        if desc.is_write_only() {
            writable.push((desc.addr(), desc.len()));
        } else {
            readable.push((desc.addr(), desc.len()));
        }
    }
    // `virtio-queue` ends a chain it cannot follow (loop, index out of range, unreadable
    // descriptor, bad indirect table) early: the last descriptor it gave still says NEXT.
    if count == 0 || last_has_next {
        return Err(RingError::BadChain(head));
    }
    let total: u64 = readable.iter().map(|&(_, len)| u64::from(len)).sum();
    let mut done = Completion::default();
    let response = if total > MAX_REQUEST as u64 {
        error_response(RESP_ERR_INVALID_PARAMETER)
    } else {
        let mut request = vec![0u8; total as usize];
        let mut at = 0usize;
        let mut ok = true;
        for &(addr, len) in &readable {
            let end = at + len as usize;
            if mem.read_slice(&mut request[at..end], addr).is_err() {
                ok = false;
                break;
            }
            at = end;
        }
        if ok {
            done = if qi == 0 {
                gpu.control(mem, &request)
            } else {
                gpu.cursor(mem, &request)
            };
            std::mem::take(&mut done.response)
        } else {
            notices.push(format!(
                "{}: request at descriptor {head} is outside guest memory; answered ERR_UNSPEC",
                queue_name(qi)
            ));
            error_response(RESP_ERR_UNSPEC)
        }
    };
    let mut written = 0usize;
    for &(addr, len) in &writable {
        let rest = &response[written..];
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(len as usize);
        if mem.write_slice(&rest[..n], addr).is_err() {
            break;
        }
        written += n;
    }
    Ok((written as u32, done))
}

/// A bare `virtio_gpu_ctrl_hdr` carrying error `code`.
fn error_response(code: u32) -> Vec<u8> {
    let mut r = vec![0u8; 24];
    r[..4].copy_from_slice(&code.to_le_bytes());
    r
}

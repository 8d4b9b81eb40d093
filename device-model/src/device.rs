//! One vGPU instance as the guest sees it: regions, register accesses, reset and saved state,
//! for either personality (bochs: VRAM and BAR2 registers; virtio-gpu: the virtio-pci
//! transport and the GPU behind it, no VRAM).
//!
//! Region indexes follow VFIO's PCI layout (BAR0-5 = 0-5, ROM = 6, config = 7, VGA = 8), so the
//! server passes indexes through unchanged. Every access enters through [`Device::read`] or
//! [`Device::write`], which check the region and range before anything else runs: a request
//! outside a region is refused with an [`AccessError`], never served from outside it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bochs::{self, BochsRegs, BochsState};
use crate::bus::{GuestRam, InterruptSink};
use crate::catalog::{BarKind, Personality, VgpuType};
use crate::pci::{ConfigSpace, ConfigSpaceState, VendorCapability, CONFIG_SPACE_SIZE};
use crate::scanout::{Frame, NotDisplaying, Scanout};
use crate::virtio_gpu::transport::{self, Transport, PCI_CFG_CAP_INDEX, PCI_CFG_DATA};
use crate::virtio_gpu::HeadSource;
use crate::vram::{Vram, VramRead};

/// VFIO region index of config space.
pub const CONFIG_REGION: u32 = 7;
/// Number of VFIO PCI region indexes (BAR0-5, ROM, config, VGA).
pub const NUM_REGIONS: u32 = 9;
/// Number of VFIO PCI IRQ indexes (INTx, MSI, MSI-X, ERR, REQ).
pub const NUM_IRQS: u32 = 5;
/// Version of the [`DeviceState`] layout.
pub const STATE_FORMAT: u32 = 1;
/// Notices [`Device::take_notices`] returns at most per call (beyond: one line counts them).
pub const MAX_NOTICES: usize = transport::MAX_NOTICES;

/// Region capability flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize)]
pub struct RegionFlags {
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Has mmap-able areas (backed by the VRAM file).
    pub mmap: bool,
}

/// An mmap-able window of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MmapArea {
    /// Offset in the region.
    pub offset: u64,
    /// Length.
    pub size: u64,
}

/// One region as a VFIO client sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RegionInfo {
    /// VFIO region index.
    pub index: u32,
    /// Size in bytes (0: not implemented).
    pub size: u64,
    /// Access flags.
    pub flags: RegionFlags,
    /// Sparse mmap areas; trapped registers are never inside one.
    pub mmap_areas: Vec<MmapArea>,
}

/// Why an access was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The region index does not exist or has size 0.
    #[error("region {0} does not exist")]
    NoSuchRegion(u32),
    /// The range is not inside the region.
    #[error("access of {len} bytes at {offset:#x} is outside region {region} ({size} bytes)")]
    OutOfRange {
        /// Region index.
        region: u32,
        /// Start offset.
        offset: u64,
        /// Length.
        len: usize,
        /// Region size.
        size: u64,
    },
}

/// Why a device could not be built or restored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// No device model for the personality in this build.
    #[error(
        "personality `{0}` is not implemented yet; it can be listed and described, not served"
    )]
    UnimplementedPersonality(Personality),
    /// The VRAM backing has the wrong size.
    #[error("VRAM backing is {got} bytes; type {ty} needs {want}")]
    VramSize {
        /// Type key.
        ty: String,
        /// Needed.
        want: u64,
        /// Given.
        got: u64,
    },
    /// A personality with VRAM was given none.
    #[error("type {0} needs VRAM and was given none")]
    NoVram(String),
    /// A personality without VRAM was given some.
    #[error("type {0} has no VRAM; none may be given")]
    UnexpectedVram(String),
    /// Saved state does not fit this device.
    #[error("saved state does not fit this device: {0}")]
    State(String),
}

/// Access counters (what `status` reports).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessCounters {
    /// Config-space reads.
    pub config_reads: u64,
    /// Config-space writes.
    pub config_writes: u64,
    /// Trapped register reads.
    pub register_reads: u64,
    /// Trapped register writes.
    pub register_writes: u64,
    /// Register writes that had no effect (read-only, unassigned, invalid value).
    pub ignored_writes: u64,
    /// VRAM accesses that trapped (not through the mmap).
    pub vram_accesses: u64,
    /// Accesses refused as outside a region.
    pub refused: u64,
    /// Device resets.
    pub resets: u64,
}

/// Saved device state (VRAM is not included: it lives in its own backing).
///
/// virtio-gpu: only the config space and the device status are saved; a device whose driver
/// has started (status not 0: negotiated features, live queues, GPU resources) cannot be
/// saved faithfully, and [`Device::restore`] refuses such a state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// [`STATE_FORMAT`].
    pub format: u32,
    /// Type name.
    pub type_name: String,
    /// Type version.
    pub type_version: u32,
    /// Config space.
    pub config: ConfigSpaceState,
    /// Personality registers (bochs; the default on virtio-gpu).
    pub bochs: BochsState,
    /// virtio-gpu transport (absent on bochs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtio_gpu: Option<VirtioGpuState>,
}

/// Saved virtio-gpu transport state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioGpuState {
    /// The device status register (only 0 can be restored).
    pub device_status: u8,
}

/// What a head shows, held so a frame can be copied without the device (and outside the
/// instance lock).
#[derive(Clone, Debug)]
pub enum HeadImage {
    /// bochs: where the image lies in VRAM; copy it from a view of the VRAM.
    Vram(Scanout),
    /// virtio-gpu: a host resource or guest-memory blob, holding what it needs.
    Gpu(HeadSource),
}

impl HeadImage {
    /// Copies the image. A [`HeadImage::Vram`] needs `vram` (the device's VRAM or a view of
    /// it) and is `None` without; a [`HeadImage::Gpu`] ignores it.
    pub fn capture(&self, vram: Option<&dyn VramRead>) -> Option<Frame> {
        match self {
            HeadImage::Vram(s) => vram.map(|v| Frame::capture(s, v)),
            HeadImage::Gpu(source) => Some(source.capture()),
        }
    }

    /// The visible image's width and height, in pixels.
    pub fn size(&self) -> (u32, u32) {
        match self {
            HeadImage::Vram(s) => (s.width, s.height),
            HeadImage::Gpu(source) => source.size(),
        }
    }
}

/// The personality behind the config space.
#[derive(Debug)]
enum Model {
    Bochs {
        regs: Box<BochsRegs>,
        vram: Box<dyn Vram>,
    },
    VirtioGpu(Box<Transport>),
}

/// A vGPU device instance.
#[derive(Debug)]
pub struct Device {
    ty: VgpuType,
    config: ConfigSpace,
    model: Model,
    mem: Option<Arc<GuestRam>>,
    counters: AccessCounters,
    /// The frame-rate limiter's knob (kept here too: bochs has no limiter to ask).
    frl_on: bool,
}

impl Device {
    /// An instance of `ty` with the instance `uuid` (EDID serials) and, for a personality with
    /// VRAM (bochs), `vram` of exactly the type's framebuffer size. virtio-gpu has no VRAM
    /// (its framebuffer is a resource budget in guest memory): `vram` must be `None`.
    pub fn new(
        ty: &VgpuType,
        uuid: &[u8; 16],
        vram: Option<Box<dyn Vram>>,
    ) -> Result<Self, DeviceError> {
        let (caps, model) = match (ty.personality, vram) {
            (Personality::Bochs, None) => return Err(DeviceError::NoVram(ty.key())),
            (Personality::Bochs, Some(vram)) => {
                if vram.size() != ty.framebuffer {
                    return Err(DeviceError::VramSize {
                        ty: ty.key(),
                        want: ty.framebuffer,
                        got: vram.size(),
                    });
                }
                (
                    vec![VendorCapability::bochs(ty)],
                    Model::Bochs {
                        regs: Box::new(BochsRegs::new(ty, uuid)),
                        vram,
                    },
                )
            }
            (Personality::VirtioGpu, Some(_)) => return Err(DeviceError::UnexpectedVram(ty.key())),
            (Personality::VirtioGpu, None) => (
                transport::capabilities(ty),
                Model::VirtioGpu(Box::new(Transport::new(ty, uuid))),
            ),
        };
        Ok(Device {
            ty: ty.clone(),
            config: ConfigSpace::new(ty, &caps),
            model,
            mem: None,
            counters: AccessCounters::default(),
            frl_on: true,
        })
    }

    /// Gives the device guest RAM (`None`: the client is gone). bochs never touches guest RAM.
    /// virtio-gpu: queue notifications that arrived without memory are served now.
    pub fn attach_memory(&mut self, mem: Option<Arc<GuestRam>>) {
        self.mem = mem.clone();
        if let Model::VirtioGpu(t) = &mut self.model {
            t.attach_memory(mem);
        }
    }

    /// Gives the device the way to raise MSI-X vectors (the default drops them).
    pub fn attach_interrupts(&mut self, irq: Arc<dyn InterruptSink>) {
        if let Model::VirtioGpu(t) = &mut self.model {
            t.attach_interrupts(irq);
        }
    }

    /// Gives the frame-rate limiter its clock (the server's CLOCK_MONOTONIC; a manual clock in
    /// tests); its tick 0 is the clock's now. Until then the limiter holds nothing. bochs has
    /// no fence to hold: its FRL only bounds how often viewers sample the head.
    pub fn attach_clock(&mut self, clock: Arc<dyn crate::bus::Clock>) {
        if let Model::VirtioGpu(t) = &mut self.model {
            t.attach_clock(clock);
        }
    }

    /// The runtime knob (not guest ABI): with the limiter off, fenced completions are not held,
    /// and turning it off completes at once whatever is held.
    pub fn set_frame_rate_limiter(&mut self, on: bool) {
        self.frl_on = on;
        if let Model::VirtioGpu(t) = &mut self.model {
            t.set_frame_rate_limiter(on);
        }
    }

    /// Whether the limiter is on.
    pub fn frame_rate_limiter(&self) -> bool {
        self.frl_on
    }

    /// When the limiter next needs [`Device::frl_tick`], on the attached clock (an absolute
    /// time: tick `k` is at `origin + k / frl`), or `None` while it holds nothing.
    pub fn frl_deadline(&self) -> Option<std::time::Duration> {
        match &self.model {
            Model::VirtioGpu(t) => t.frl_deadline(),
            Model::Bochs { .. } => None,
        }
    }

    /// Runs the limiter's tick: completes (in fence order, on every head) what it held for the
    /// ticks up to now on the attached clock. Returns how many completions it released.
    pub fn frl_tick(&mut self) -> usize {
        match &mut self.model {
            Model::VirtioGpu(t) => t.frl_tick(),
            Model::Bochs { .. } => 0,
        }
    }

    /// Frame-rate-limiter counters per head (empty for a personality without fences).
    pub fn frl_counters(&self) -> Vec<crate::frl::HeadFrames> {
        match &self.model {
            Model::VirtioGpu(t) => t.frl_counters(),
            Model::Bochs { .. } => Vec::new(),
        }
    }

    /// Starts recording the fenced control completions for [`Device::take_fence_log`] (the
    /// fuzz harness checks their order; virtio-gpu only).
    #[doc(hidden)]
    pub fn record_fences(&mut self, on: bool) {
        if let Model::VirtioGpu(t) = &mut self.model {
            t.record_fences(on);
        }
    }

    /// (order, fence id) of the fenced control requests completed since the last call.
    #[doc(hidden)]
    pub fn take_fence_log(&mut self) -> Vec<(u64, u64)> {
        match &mut self.model {
            Model::VirtioGpu(t) => t.take_fence_log(),
            Model::Bochs { .. } => Vec::new(),
        }
    }

    /// MSI-X vectors the device has (0: none, bochs).
    pub fn msix_vectors(&self) -> u32 {
        match self.model {
            Model::Bochs { .. } => 0,
            Model::VirtioGpu(_) => u32::from(transport::MSIX_VECTORS),
        }
    }

    /// Takes what the device noticed since the last call that the server should log (a guest
    /// broke a ring, features were refused). At most [`MAX_NOTICES`] lines and one counting
    /// the dropped rest; the model itself logs nothing.
    pub fn take_notices(&mut self) -> Vec<String> {
        match &mut self.model {
            Model::Bochs { .. } => Vec::new(),
            Model::VirtioGpu(t) => t.take_notices(),
        }
    }

    /// The virtio-gpu transport (`None` on bochs).
    pub fn virtio_gpu(&self) -> Option<&Transport> {
        match &self.model {
            Model::VirtioGpu(t) => Some(t),
            Model::Bochs { .. } => None,
        }
    }

    /// The type this device was built from.
    pub fn vgpu_type(&self) -> &VgpuType {
        &self.ty
    }

    /// Region `index`, or `None` when out of range.
    pub fn region_info(&self, index: u32) -> Option<RegionInfo> {
        if index >= NUM_REGIONS {
            return None;
        }
        let mut info = RegionInfo {
            index,
            size: 0,
            flags: RegionFlags::default(),
            mmap_areas: Vec::new(),
        };
        let rw = RegionFlags {
            read: true,
            write: true,
            mmap: false,
        };
        if index == CONFIG_REGION {
            info.size = CONFIG_SPACE_SIZE as u64;
            info.flags = rw;
        } else if let Some(bar) = self.ty.bars.iter().find(|b| u32::from(b.index) == index) {
            info.size = bar.size;
            info.flags = rw;
            // Only VRAM is mmap-able: trapped registers (bochs BAR2, virtio-gpu BAR1 and
            // BAR4) never are, and virtio-gpu has no mmap-able region at all.
            if bar.kind == BarKind::Vram {
                info.flags.mmap = true;
                info.mmap_areas.push(MmapArea {
                    offset: 0,
                    size: bar.size,
                });
            }
        }
        Some(info)
    }

    /// Every region index 0..[`NUM_REGIONS`].
    pub fn regions(&self) -> Vec<RegionInfo> {
        (0..NUM_REGIONS)
            .filter_map(|i| self.region_info(i))
            .collect()
    }

    /// Checks that an access of `len` bytes at `offset` lies inside `region`, without side
    /// effects: a batch (REGION_WRITE_MULTI) is validated whole before any of it applies.
    pub fn validate(&self, region: u32, offset: u64, len: usize) -> Result<(), AccessError> {
        let size = match self.region_info(region) {
            Some(r) if r.size > 0 => r.size,
            _ => return Err(AccessError::NoSuchRegion(region)),
        };
        let inside = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size);
        if !inside {
            return Err(AccessError::OutOfRange {
                region,
                offset,
                len,
                size,
            });
        }
        Ok(())
    }

    fn target(&self, region: u32) -> BarTarget {
        if region == CONFIG_REGION {
            return BarTarget::Config;
        }
        match self
            .ty
            .bars
            .iter()
            .find(|b| u32::from(b.index) == region)
            .map(|b| b.kind)
        {
            Some(BarKind::Vram) => BarTarget::Vram,
            Some(BarKind::Msix) => BarTarget::Msix,
            Some(BarKind::Virtio) => BarTarget::Virtio,
            _ => BarTarget::Registers,
        }
    }

    fn check(&mut self, region: u32, offset: u64, len: usize) -> Result<BarTarget, AccessError> {
        if let Err(e) = self.validate(region, offset, len) {
            self.counters.refused += 1;
            return Err(e);
        }
        Ok(self.target(region))
    }

    /// Reads `data.len()` bytes of region `region` at `offset`.
    pub fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), AccessError> {
        let target = self.check(region, offset, data.len())?;
        self.read_target(target, offset, data);
        Ok(())
    }

    /// Reads a checked range.
    fn read_target(&mut self, target: BarTarget, offset: u64, data: &mut [u8]) {
        match (target, &mut self.model) {
            (BarTarget::Config, _) => {
                self.counters.config_reads += 1;
                // `check` bounded the range to the 256-byte space.
                if let Some(window) = self.pci_cfg_window() {
                    if overlaps(offset, data.len(), window, 4) {
                        self.pci_cfg_access(window, false);
                    }
                }
                self.config.read(offset as usize, data);
            }
            (BarTarget::Vram, Model::Bochs { vram, .. }) => {
                self.counters.vram_accesses += 1;
                vram.read(offset, data);
            }
            (BarTarget::Registers, Model::Bochs { regs, .. }) => {
                self.counters.register_reads += 1;
                regs.read(offset, data);
            }
            (BarTarget::Msix, Model::VirtioGpu(t)) => {
                self.counters.register_reads += 1;
                t.msix_read(offset, data);
            }
            (BarTarget::Virtio, Model::VirtioGpu(t)) => {
                self.counters.register_reads += 1;
                t.read(offset, data);
            }
            // A BAR kind the personality does not have (the catalog derives BARs from the
            // personality, so this is unreachable); reads as zeros.
            _ => data.fill(0),
        }
    }

    /// Writes `data` to region `region` at `offset`.
    pub fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        let target = self.check(region, offset, data.len())?;
        self.write_target(target, offset, data);
        Ok(())
    }

    /// Writes a checked range.
    fn write_target(&mut self, target: BarTarget, offset: u64, data: &[u8]) {
        match (target, &mut self.model) {
            (BarTarget::Config, _) => {
                self.counters.config_writes += 1;
                self.config.write(offset as usize, data);
                if let Some(window) = self.pci_cfg_window() {
                    if overlaps(offset, data.len(), window, 4) {
                        self.pci_cfg_access(window, true);
                    }
                }
            }
            (BarTarget::Vram, Model::Bochs { vram, .. }) => {
                self.counters.vram_accesses += 1;
                vram.write(offset, data);
            }
            (BarTarget::Registers, Model::Bochs { regs, .. }) => {
                self.counters.register_writes += 1;
                self.counters.ignored_writes += u64::from(regs.write(offset, data));
            }
            (BarTarget::Msix, Model::VirtioGpu(t)) => {
                self.counters.register_writes += 1;
                self.counters.ignored_writes += u64::from(t.msix_write(offset, data));
            }
            (BarTarget::Virtio, Model::VirtioGpu(t)) => {
                self.counters.register_writes += 1;
                self.counters.ignored_writes += u64::from(t.write(offset, data));
            }
            _ => self.counters.ignored_writes += 1,
        }
    }

    /// The data window of the virtio PCI_CFG capability (virtio-gpu only).
    fn pci_cfg_window(&self) -> Option<u64> {
        match self.model {
            Model::VirtioGpu(_) => self
                .config
                .capability_offset(PCI_CFG_CAP_INDEX)
                .map(|cap| (cap + PCI_CFG_DATA) as u64),
            Model::Bochs { .. } => None,
        }
    }

    /// An access through the PCI_CFG window (virtio 1.2, 4.1.4.9): the capability's `bar`,
    /// `offset` and `length` (1, 2 or 4, offset aligned to it) select a BAR range, and
    /// `pci_cfg_data` is read from or written to it. Anything else does nothing.
    fn pci_cfg_access(&mut self, window: u64, write: bool) {
        let cap = window as usize - PCI_CFG_DATA;
        let b = self.config.bytes();
        let bar = b[cap + 4];
        let offset = u32::from_le_bytes([b[cap + 8], b[cap + 9], b[cap + 10], b[cap + 11]]);
        let length = u32::from_le_bytes([b[cap + 12], b[cap + 13], b[cap + 14], b[cap + 15]]);
        let len = match length {
            1 | 2 | 4 if offset.is_multiple_of(length) => length as usize,
            _ => return,
        };
        let region = u32::from(bar);
        if region == CONFIG_REGION || self.validate(region, u64::from(offset), len).is_err() {
            return;
        }
        let target = self.target(region);
        if write {
            let mut data = [0u8; 4];
            data[..len].copy_from_slice(&self.config.bytes()[window as usize..][..len]);
            self.write_target(target, u64::from(offset), &data[..len]);
        } else {
            let mut data = [0u8; 4];
            self.read_target(target, u64::from(offset), &mut data[..len]);
            self.config.set_bytes(window as usize, &data);
        }
    }

    /// Device reset (a function reset: vfio-user DEVICE_RESET): registers and config space to
    /// power-on values. bochs VRAM keeps its contents (as real VRAM does across a function
    /// reset); virtio-gpu drops its queues, negotiated features and GPU resources.
    pub fn reset(&mut self) {
        self.config.reset();
        match &mut self.model {
            Model::Bochs { regs, .. } => regs.reset(),
            Model::VirtioGpu(t) => t.function_reset(),
        }
        self.counters.resets += 1;
    }

    /// What head `head` shows, as VRAM geometry (bochs). virtio-gpu heads have no VRAM
    /// scanout: use [`Device::head_source`].
    pub fn scanout(&self, head: u32) -> Result<Scanout, NotDisplaying> {
        if head >= self.ty.num_heads {
            return Err(NotDisplaying::NoSuchHead(head));
        }
        let Model::Bochs { regs, vram } = &self.model else {
            return Err(NotDisplaying::Disabled);
        };
        let s = regs.scanout()?;
        // Defence in depth: the register model already guarantees this.
        let end = s.offset + u64::from(s.stride) * u64::from(s.height);
        if end > vram.size() {
            return Err(NotDisplaying::PastVram {
                end,
                vram: vram.size(),
            });
        }
        Ok(s)
    }

    /// What head `head` shows, for either personality, as something a frame can be copied
    /// from after the device is released: bochs gives the scanout (copy it from a VRAM view),
    /// virtio-gpu the GPU's source for the head (which holds its pixels or guest RAM).
    pub fn head_source(&self, head: u32) -> Result<HeadImage, NotDisplaying> {
        match &self.model {
            Model::Bochs { .. } => self.scanout(head).map(HeadImage::Vram),
            Model::VirtioGpu(t) => t.gpu().head(head, self.mem.as_ref()).map(HeadImage::Gpu),
        }
    }

    /// What changed on head `head` since generation `since`, as the device knows it, and the
    /// generation to ask from next time (each viewer keeps its own; 0: nothing seen yet).
    /// virtio-gpu: the guest's flush rectangles ([`Gpu::damage_since`](crate::virtio_gpu::Gpu::damage_since)).
    /// `None` on bochs, whose guest writes VRAM without telling anyone (hash the frames with a
    /// [`DamageTracker`](crate::damage::DamageTracker)), and for a head that does not exist.
    pub fn head_damage(&self, head: u32, since: u64) -> Option<(crate::damage::Damage, u64)> {
        match &self.model {
            Model::VirtioGpu(t) => t.gpu().damage_since(head, since),
            Model::Bochs { .. } => None,
        }
    }

    /// Copies head `head`'s visible image.
    pub fn capture(&self, head: u32) -> Result<Frame, NotDisplaying> {
        let source = self.head_source(head)?;
        let vram: Option<&dyn VramRead> = match &self.model {
            Model::Bochs { vram, .. } => Some(vram.as_ref()),
            Model::VirtioGpu(_) => None,
        };
        source.capture(vram).ok_or(NotDisplaying::Disabled)
    }

    /// The VRAM backing (`None`: virtio-gpu has no VRAM).
    pub fn vram(&self) -> Option<&dyn Vram> {
        match &self.model {
            Model::Bochs { vram, .. } => Some(vram.as_ref()),
            Model::VirtioGpu(_) => None,
        }
    }

    /// Whether the guest blanked the display through the VGA attribute index (bochs).
    pub fn blanked(&self) -> bool {
        match &self.model {
            Model::Bochs { regs, .. } => regs.blanked(),
            Model::VirtioGpu(_) => false,
        }
    }

    /// The EDID of head 0 (empty when the GPU has none).
    pub fn edid(&self) -> &[u8] {
        self.head_edid(0).unwrap_or(&[])
    }

    /// The EDID of head `head`.
    pub fn head_edid(&self, head: u32) -> Option<&[u8]> {
        match &self.model {
            Model::Bochs { regs, .. } => (head == 0).then_some(&regs.edid()[..]),
            Model::VirtioGpu(t) => t.gpu().edid(head),
        }
    }

    /// The config space.
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// A DISPI register as the guest reads it (for status displays; 0 on virtio-gpu).
    pub fn dispi(&self, index: usize) -> u16 {
        match &self.model {
            Model::Bochs { regs, .. } => regs.dispi(index),
            Model::VirtioGpu(_) => 0,
        }
    }

    /// Access counters.
    pub fn counters(&self) -> AccessCounters {
        self.counters
    }

    /// The state to save.
    pub fn state(&self) -> DeviceState {
        let (bochs, virtio_gpu) = match &self.model {
            Model::Bochs { regs, .. } => (regs.state(), None),
            Model::VirtioGpu(t) => (
                BochsState::default(),
                Some(VirtioGpuState {
                    device_status: t.device_status(),
                }),
            ),
        };
        DeviceState {
            format: STATE_FORMAT,
            type_name: self.ty.name.clone(),
            type_version: self.ty.version,
            config: self.config.state(),
            bochs,
            virtio_gpu,
        }
    }

    /// Restores saved state taken from a device of the same type version. virtio-gpu: only a
    /// state saved while the driver had not started (device status 0); the transport is reset.
    pub fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        if state.format != STATE_FORMAT {
            return Err(DeviceError::State(format!(
                "state format {} (this build reads {STATE_FORMAT})",
                state.format
            )));
        }
        if state.type_name != self.ty.name || state.type_version != self.ty.version {
            return Err(DeviceError::State(format!(
                "state is of {}@{}, device is {}",
                state.type_name,
                state.type_version,
                self.ty.key()
            )));
        }
        if let Model::VirtioGpu(_) = self.model {
            match &state.virtio_gpu {
                Some(v) if v.device_status == 0 => {}
                Some(v) => {
                    return Err(DeviceError::State(format!(
                        "virtio-gpu state with device status {:#x}: live queues and resources \
                         are not saved",
                        v.device_status
                    )))
                }
                None => {
                    return Err(DeviceError::State(
                        "state has no virtio-gpu transport".to_string(),
                    ))
                }
            }
        }
        self.config
            .restore(&state.config)
            .map_err(DeviceError::State)?;
        match &mut self.model {
            Model::Bochs { regs, .. } => regs.restore(&state.bochs),
            Model::VirtioGpu(t) => t.reset(),
        }
        Ok(())
    }

    /// Reads the whole register BAR as a guest would see it at power-on (for the ABI
    /// fingerprint and `vgpu-emu diff`), then resets the registers. bochs: BAR2; virtio-gpu:
    /// BAR4 (common configuration with feature select 0, ISR, device configuration).
    pub fn register_image(&mut self) -> Vec<u8> {
        match &mut self.model {
            Model::Bochs { regs, .. } => {
                let mut image = vec![0u8; bochs::MMIO_SIZE as usize];
                regs.read(0, &mut image);
                regs.reset();
                image
            }
            Model::VirtioGpu(t) => {
                let size = self
                    .ty
                    .bars
                    .iter()
                    .find(|b| b.kind == BarKind::Virtio)
                    .map_or(0, |b| b.size as usize);
                let mut image = vec![0u8; size];
                let page = transport::layout::PAGE as usize;
                for (i, chunk) in image.chunks_mut(page).enumerate() {
                    t.read((i * page) as u64, chunk);
                }
                t.function_reset();
                image
            }
        }
    }
}

fn overlaps(offset: u64, len: usize, start: u64, size: u64) -> bool {
    offset < start + size && start < offset.saturating_add(len as u64)
}

#[derive(Clone, Copy)]
enum BarTarget {
    Config,
    Vram,
    Registers,
    Msix,
    Virtio,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bochs::{dispi, DISPI_OFFSET};
    use crate::catalog::Catalog;
    use crate::vram::VecVram;

    fn device(name: &str) -> Device {
        let c = Catalog::builtin().unwrap();
        let ty = c.resolve(name).unwrap();
        Device::new(
            ty,
            &[1; 16],
            Some(Box::new(VecVram::new(ty.framebuffer as usize))),
        )
        .unwrap()
    }

    #[test]
    fn regions_match_the_bar_layout() {
        let d = device("EMU-64M");
        let r = d.regions();
        assert_eq!(r.len(), NUM_REGIONS as usize);
        assert_eq!(r[0].size, 64 << 20);
        assert!(r[0].flags.mmap);
        assert_eq!(
            r[0].mmap_areas,
            vec![MmapArea {
                offset: 0,
                size: 64 << 20
            }]
        );
        assert_eq!(
            (r[2].size, r[2].flags.mmap, r[2].mmap_areas.len()),
            (4096, false, 0)
        );
        assert_eq!(r[7].size, 256);
        for i in [1, 3, 4, 5, 6, 8] {
            assert_eq!(r[i].size, 0, "region {i}");
        }
        assert!(d.region_info(NUM_REGIONS).is_none());
    }

    #[test]
    fn refuses_accesses_outside_regions() {
        let mut d = device("EMU-16M");
        let mut b = [0u8; 4];
        assert_eq!(d.read(9, 0, &mut b), Err(AccessError::NoSuchRegion(9)));
        assert_eq!(d.read(1, 0, &mut b), Err(AccessError::NoSuchRegion(1)));
        assert!(matches!(
            d.read(2, 4094, &mut b),
            Err(AccessError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.write(7, 253, &b),
            Err(AccessError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.write(0, u64::MAX - 1, &b),
            Err(AccessError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.read(0, 16 << 20, &mut b),
            Err(AccessError::OutOfRange { .. })
        ));
        assert_eq!(d.counters().refused, 6);
        assert!(d.read(0, (16 << 20) - 4, &mut b).is_ok());
    }

    #[test]
    fn vram_only_where_the_personality_has_it() {
        let c = Catalog::builtin().unwrap();
        let m60 = c.resolve("M60-2Q").unwrap();
        assert!(matches!(
            Device::new(m60, &[0; 16], Some(Box::new(VecVram::new(4096)))),
            Err(DeviceError::UnexpectedVram(_))
        ));
        assert!(Device::new(m60, &[0; 16], None).is_ok());
        let t = c.resolve("EMU-16M").unwrap();
        assert!(matches!(
            Device::new(t, &[0; 16], Some(Box::new(VecVram::new(4096)))),
            Err(DeviceError::VramSize { .. })
        ));
        assert!(matches!(
            Device::new(t, &[0; 16], None),
            Err(DeviceError::NoVram(_))
        ));
    }

    #[test]
    fn vram_through_bar0_and_capture() {
        let mut d = device("EMU-16M");
        for (i, v) in [
            (dispi::BPP, 32u16),
            (dispi::XRES, 64),
            (dispi::YRES, 64),
            (dispi::ENABLE, 0x41),
        ] {
            d.write(2, DISPI_OFFSET + 2 * i as u64, &v.to_le_bytes())
                .unwrap();
        }
        let pattern: Vec<u8> = (0..64 * 64 * 4).map(|i| (i % 251) as u8).collect();
        d.write(0, 0, &pattern).unwrap();
        let f = d.capture(0).unwrap();
        assert_eq!(f.data, pattern);
        assert_eq!(d.capture(1), Err(NotDisplaying::NoSuchHead(1)));
    }

    #[test]
    fn reset_keeps_vram_and_clears_registers() {
        let mut d = device("EMU-16M");
        d.write(0, 100, &[9]).unwrap();
        d.write(2, DISPI_OFFSET + 2, &640u16.to_le_bytes()).unwrap();
        d.write(7, 4, &[6, 0]).unwrap();
        d.reset();
        let mut b = [0u8; 2];
        d.read(2, DISPI_OFFSET + 2, &mut b).unwrap();
        assert_eq!(b, [0, 0]);
        assert_eq!(d.config().command(), 0);
        let mut v = [0u8; 1];
        d.read(0, 100, &mut v).unwrap();
        assert_eq!(v, [9]);
        assert_eq!(d.counters().resets, 1);
    }

    #[test]
    fn state_round_trips_and_refuses_other_types() {
        let mut d = device("EMU-16M");
        d.write(2, DISPI_OFFSET + 2, &800u16.to_le_bytes()).unwrap();
        d.write(7, 4, &[2, 0]).unwrap();
        let s = d.state();
        let json = serde_json::to_string(&s).unwrap();
        let back: DeviceState = serde_json::from_str(&json).unwrap();
        let mut fresh = device("EMU-16M");
        fresh.restore(&back).unwrap();
        assert_eq!(fresh.state(), s);
        assert_eq!(fresh.dispi(dispi::XRES), 800);
        let mut other = device("EMU-64M");
        assert!(matches!(other.restore(&s), Err(DeviceError::State(_))));
        let mut bad = s.clone();
        bad.format = 99;
        assert!(matches!(fresh.restore(&bad), Err(DeviceError::State(_))));
    }

    #[test]
    fn head_damage_is_the_gpus_and_unknown_on_bochs() {
        use crate::damage::Damage;
        let d = device("EMU-16M");
        assert_eq!(d.head_damage(0, 0), None);
        let c = Catalog::builtin().unwrap();
        let g = Device::new(c.resolve("M60-2Q").unwrap(), &[1; 16], None).unwrap();
        assert_eq!(g.head_damage(0, 0), Some((Damage::Full, 1)));
        assert_eq!(g.head_damage(g.vgpu_type().num_heads, 0), None);
    }
}

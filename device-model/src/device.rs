//! One vGPU instance as the guest sees it: regions, register accesses, reset and saved state.
//!
//! Region indexes follow VFIO's PCI layout (BAR0-5 = 0-5, ROM = 6, config = 7, VGA = 8), so the
//! server passes indexes through unchanged. Every access enters through [`Device::read`] or
//! [`Device::write`], which check the region and range before anything else runs: a request
//! outside a region is refused with an [`AccessError`], never served from outside it.

use serde::{Deserialize, Serialize};

use crate::bochs::{self, BochsRegs, BochsState};
use crate::catalog::{BarKind, Personality, VgpuType};
use crate::pci::{ConfigSpace, ConfigSpaceState, CONFIG_SPACE_SIZE};
use crate::scanout::{Frame, NotDisplaying, Scanout};
use crate::vram::Vram;

/// VFIO region index of config space.
pub const CONFIG_REGION: u32 = 7;
/// Number of VFIO PCI region indexes (BAR0-5, ROM, config, VGA).
pub const NUM_REGIONS: u32 = 9;
/// Number of VFIO PCI IRQ indexes (INTx, MSI, MSI-X, ERR, REQ).
pub const NUM_IRQS: u32 = 5;
/// Version of the [`DeviceState`] layout.
pub const STATE_FORMAT: u32 = 1;

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
    /// Personality registers.
    pub bochs: BochsState,
}

/// A vGPU device instance.
#[derive(Debug)]
pub struct Device {
    ty: VgpuType,
    config: ConfigSpace,
    regs: BochsRegs,
    vram: Box<dyn Vram>,
    counters: AccessCounters,
}

impl Device {
    /// An instance of `ty` with VRAM `vram` (exactly the type's framebuffer size) and the
    /// instance `uuid` (EDID serial).
    pub fn new(ty: &VgpuType, uuid: &[u8; 16], vram: Box<dyn Vram>) -> Result<Self, DeviceError> {
        if ty.personality != Personality::Bochs {
            return Err(DeviceError::UnimplementedPersonality(ty.personality));
        }
        if vram.size() != ty.framebuffer {
            return Err(DeviceError::VramSize {
                ty: ty.key(),
                want: ty.framebuffer,
                got: vram.size(),
            });
        }
        Ok(Device {
            ty: ty.clone(),
            config: ConfigSpace::new(ty),
            regs: BochsRegs::new(ty, uuid),
            vram,
            counters: AccessCounters::default(),
        })
    }

    /// Gives the device guest RAM (`None`: the client is gone). (Placeholder until the
    /// virtio-gpu transport lands; bochs never touches guest RAM.)
    pub fn attach_memory(&mut self, _mem: Option<std::sync::Arc<crate::bus::GuestRam>>) {}

    /// Gives the device the way to raise MSI-X vectors. (Placeholder, as above.)
    pub fn attach_interrupts(&mut self, _irq: std::sync::Arc<dyn crate::bus::InterruptSink>) {}

    /// MSI-X vectors the device has (0: none).
    pub fn msix_vectors(&self) -> u32 {
        0
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

    fn check(&mut self, region: u32, offset: u64, len: usize) -> Result<BarTarget, AccessError> {
        if let Err(e) = self.validate(region, offset, len) {
            self.counters.refused += 1;
            return Err(e);
        }
        Ok(if region == CONFIG_REGION {
            BarTarget::Config
        } else {
            match self
                .ty
                .bars
                .iter()
                .find(|b| u32::from(b.index) == region)
                .map(|b| b.kind)
            {
                Some(BarKind::Vram) => BarTarget::Vram,
                _ => BarTarget::Registers,
            }
        })
    }

    /// Reads `data.len()` bytes of region `region` at `offset`.
    pub fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), AccessError> {
        match self.check(region, offset, data.len())? {
            BarTarget::Config => {
                self.counters.config_reads += 1;
                // `check` bounded the range to the 256-byte space.
                self.config.read(offset as usize, data);
            }
            BarTarget::Vram => {
                self.counters.vram_accesses += 1;
                self.vram.read(offset, data);
            }
            BarTarget::Registers => {
                self.counters.register_reads += 1;
                self.regs.read(offset, data);
            }
        }
        Ok(())
    }

    /// Writes `data` to region `region` at `offset`.
    pub fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        match self.check(region, offset, data.len())? {
            BarTarget::Config => {
                self.counters.config_writes += 1;
                self.config.write(offset as usize, data);
            }
            BarTarget::Vram => {
                self.counters.vram_accesses += 1;
                self.vram.write(offset, data);
            }
            BarTarget::Registers => {
                self.counters.register_writes += 1;
                self.counters.ignored_writes += u64::from(self.regs.write(offset, data));
            }
        }
        Ok(())
    }

    /// Device reset: registers and config space to power-on values; VRAM keeps its contents
    /// (as real VRAM does across a function reset).
    pub fn reset(&mut self) {
        self.config.reset();
        self.regs.reset();
        self.counters.resets += 1;
    }

    /// What head `head` shows, or why nothing.
    pub fn scanout(&self, head: u32) -> Result<Scanout, NotDisplaying> {
        if head >= self.ty.num_heads {
            return Err(NotDisplaying::NoSuchHead(head));
        }
        let s = self.regs.scanout()?;
        // Defence in depth: the register model already guarantees this.
        if s.offset + u64::from(s.stride) * u64::from(s.height) > self.vram.size() {
            return Err(NotDisplaying::PastVram {
                end: s.offset + u64::from(s.stride) * u64::from(s.height),
                vram: self.vram.size(),
            });
        }
        Ok(s)
    }

    /// Copies head `head`'s visible image out of VRAM.
    pub fn capture(&self, head: u32) -> Result<Frame, NotDisplaying> {
        let s = self.scanout(head)?;
        Ok(Frame::capture(&s, self.vram.as_ref()))
    }

    /// The VRAM backing.
    pub fn vram(&self) -> &dyn Vram {
        self.vram.as_ref()
    }

    /// Whether the guest blanked the display through the VGA attribute index.
    pub fn blanked(&self) -> bool {
        self.regs.blanked()
    }

    /// The EDID of head 0.
    pub fn edid(&self) -> &[u8] {
        self.regs.edid()
    }

    /// The config space.
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// A DISPI register as the guest reads it (for status displays).
    pub fn dispi(&self, index: usize) -> u16 {
        self.regs.dispi(index)
    }

    /// Access counters.
    pub fn counters(&self) -> AccessCounters {
        self.counters
    }

    /// The state to save.
    pub fn state(&self) -> DeviceState {
        DeviceState {
            format: STATE_FORMAT,
            type_name: self.ty.name.clone(),
            type_version: self.ty.version,
            config: self.config.state(),
            bochs: self.regs.state(),
        }
    }

    /// Restores saved state taken from a device of the same type version.
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
        self.config
            .restore(&state.config)
            .map_err(DeviceError::State)?;
        self.regs.restore(&state.bochs);
        Ok(())
    }

    /// Reads the whole register BAR as a guest would see it at power-on (for the ABI
    /// fingerprint and `vgpu-emu diff`), then resets the registers.
    pub fn register_image(&mut self) -> Vec<u8> {
        let mut image = vec![0u8; bochs::MMIO_SIZE as usize];
        self.regs.read(0, &mut image);
        self.regs.reset();
        image
    }
}

enum BarTarget {
    Config,
    Vram,
    Registers,
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
            Box::new(VecVram::new(ty.framebuffer as usize)),
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
    fn unimplemented_personality_and_wrong_vram_are_errors() {
        let c = Catalog::builtin().unwrap();
        let m60 = c.resolve("M60-2Q").unwrap();
        assert!(matches!(
            Device::new(m60, &[0; 16], Box::new(VecVram::new(4096))),
            Err(DeviceError::UnimplementedPersonality(
                Personality::VirtioGpu
            ))
        ));
        let t = c.resolve("EMU-16M").unwrap();
        assert!(matches!(
            Device::new(t, &[0; 16], Box::new(VecVram::new(4096))),
            Err(DeviceError::VramSize { .. })
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
}

//! PCI type-0 configuration space (PCI Local Bus Specification 3.0, section 6).
//!
//! The space is a register map held as data: a reset image, a guest-writable mask and a
//! write-1-to-clear mask, one byte each per config byte. A guest write to byte `i` becomes
//!
//! ```text
//!   new = (old & !wmask) | (val & wmask)        plain read/write bits
//!   new = new & !(val & w1cmask)                 RW1C bits (Status error bits)
//! ```
//!
//! so read-only fields stay read-only, the Command register keeps only its writable bits, and
//! Status error bits clear when written with 1. BAR sizing falls out of the masks: a BAR's
//! writable bits are its address bits above the size, so writing all-ones reads back the size
//! mask with the read-only type bits.
//!
//! ```text
//!  0x00 vendor ID (RO)        0x02 device ID (RO)
//!  0x04 command (RW: mem, master, parity, SERR, INTx disable)
//!  0x06 status (RO cap-list bit 4; RW1C bits 8, 11-15)
//!  0x08 revision (RO)         0x09 class code (RO, 3 bytes)
//!  0x0c cache line (RW)       0x0d latency (RO 0)  0x0e header type 0 (RO)  0x0f BIST (RO 0)
//!  0x10-0x27 BAR0-5 (address bits RW; type bits RO)
//!  0x2c subsystem vendor (RO) 0x2e subsystem ID (RO)
//!  0x30 expansion ROM (RO 0: none)
//!  0x34 capabilities pointer (RO)
//!  0x3c interrupt line (RW)   0x3d interrupt pin (RO)  0x3e min grant, 0x3f max latency (RO 0)
//!  0x40 the capability chain of the personality, see [`Capability`]:
//!       bochs       0x40 vendor-specific type identity ([`VendorCapability`], bochs layout)
//!       virtio-gpu  virtio-pci capabilities, MSI-X, type identity (see
//!                   `virtio_gpu::transport`)
//! ```

use serde::{Deserialize, Serialize};

use crate::catalog::{BarSpec, VgpuType};

/// Size of the conventional config space.
pub const CONFIG_SPACE_SIZE: usize = 256;

/// Command register bits.
pub mod command {
    /// Memory space enable.
    pub const MEMORY: u16 = 1 << 1;
    /// Bus master enable.
    pub const MASTER: u16 = 1 << 2;
    /// Parity error response.
    pub const PARITY: u16 = 1 << 6;
    /// SERR# enable.
    pub const SERR: u16 = 1 << 8;
    /// INTx emulation disable.
    pub const INTX_DISABLE: u16 = 1 << 10;
    /// Every bit a guest may set.
    pub const WRITABLE: u16 = MEMORY | MASTER | PARITY | SERR | INTX_DISABLE;
}

/// Status register bits.
pub mod status {
    /// A capability list is present.
    pub const CAP_LIST: u16 = 1 << 4;
    /// Master data parity error.
    pub const MASTER_PARITY: u16 = 1 << 8;
    /// Signaled target abort.
    pub const SIG_TARGET_ABORT: u16 = 1 << 11;
    /// Received target abort.
    pub const RCV_TARGET_ABORT: u16 = 1 << 12;
    /// Received master abort.
    pub const RCV_MASTER_ABORT: u16 = 1 << 13;
    /// Signaled system error.
    pub const SIG_SYSTEM_ERROR: u16 = 1 << 14;
    /// Detected parity error.
    pub const DETECTED_PARITY: u16 = 1 << 15;
    /// Every write-1-to-clear bit.
    pub const RW1C: u16 = MASTER_PARITY
        | SIG_TARGET_ABORT
        | RCV_TARGET_ABORT
        | RCV_MASTER_ABORT
        | SIG_SYSTEM_ERROR
        | DETECTED_PARITY;
}

/// Config-space offsets.
pub mod offset {
    /// Vendor ID.
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID.
    pub const DEVICE_ID: usize = 0x02;
    /// Command.
    pub const COMMAND: usize = 0x04;
    /// Status.
    pub const STATUS: usize = 0x06;
    /// Revision ID.
    pub const REVISION: usize = 0x08;
    /// Class code (prog-if at 0x09, sub-class 0x0a, base class 0x0b).
    pub const CLASS: usize = 0x09;
    /// Cache line size.
    pub const CACHE_LINE: usize = 0x0c;
    /// Header type.
    pub const HEADER_TYPE: usize = 0x0e;
    /// BAR0; BAR n is at `BAR0 + 4 * n`.
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID.
    pub const SUBSYSTEM_VENDOR: usize = 0x2c;
    /// Subsystem ID.
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// Capabilities pointer.
    pub const CAP_POINTER: usize = 0x34;
    /// Interrupt line.
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// Interrupt pin.
    pub const INTERRUPT_PIN: usize = 0x3d;
}

/// Capability ID of a vendor-specific capability.
pub const CAP_ID_VENDOR: u8 = 0x09;
/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Where the capability chain starts (the vendor capability of bochs lives here).
pub const VENDOR_CAP_OFFSET: usize = 0x40;
/// The virtio-pci `cfg_type` of a vendor data capability (virtio 1.2+, `struct
/// virtio_pci_vndr_data`): virtio drivers skip it.
pub const VIRTIO_PCI_CAP_VENDOR_CFG: u8 = 9;
/// The `vendor_id` our virtio vendor data capability carries (the spec forbids 0x1af4 there;
/// 0x1234 is the vendor of the bochs personality, so one id names our identity format).
pub const IDENTITY_VENDOR_ID: u16 = 0x1234;

/// One capability of a chain: its bytes from the capability ID on (the chain fills in the
/// `next` byte at +1) and a guest-writable mask of the same length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capability {
    /// The capability's bytes; `bytes[0]` is the capability ID.
    pub bytes: Vec<u8>,
    /// Bits the guest may write, per byte (empty: read-only).
    pub wmask: Vec<u8>,
}

impl Capability {
    /// A read-only capability.
    pub fn read_only(bytes: Vec<u8>) -> Self {
        Capability {
            bytes,
            wmask: Vec::new(),
        }
    }
}

/// The MSI-X capability (PCI Local Bus 3.0, section 6.8.2): `vectors` entries, the table at
/// `table_offset` of BAR `bir` and the pending-bit array at `pba_offset` of the same BAR.
///
/// ```text
///  +0 cap ID 0x11  +1 next
///  +2 message control: bits 10:0 table size - 1 (RO), bit 14 function mask (RW),
///     bit 15 MSI-X enable (RW)
///  +4 table offset | BIR (bits 2:0)     +8 PBA offset | BIR
/// ```
pub fn msix_capability(vectors: u16, bir: u8, table_offset: u32, pba_offset: u32) -> Capability {
    let mut bytes = vec![0u8; 12];
    bytes[0] = CAP_ID_MSIX;
    let control = vectors.saturating_sub(1) & 0x7ff;
    bytes[2..4].copy_from_slice(&control.to_le_bytes());
    bytes[4..8].copy_from_slice(&(table_offset | u32::from(bir & 7)).to_le_bytes());
    bytes[8..12].copy_from_slice(&(pba_offset | u32::from(bir & 7)).to_le_bytes());
    let mut wmask = vec![0u8; 12];
    wmask[3] = 0xc0;
    Capability { bytes, wmask }
}

/// The vendor-specific capability that tells a guest exactly which type version it got, in
/// one of two layouts.
///
/// bochs (layout 1, released: never changes):
///
/// ```text
///  +0  cap ID 0x09   +1 next (0)   +2 length (40)   +3 layout version (1)
///  +4  type version, u32 little-endian
///  +8  type name, ASCII, NUL-padded to 32 bytes
/// ```
///
/// virtio-gpu: a virtio vendor data capability (virtio 1.2 `struct virtio_pci_vndr_data`,
/// `cfg_type` 9), which virtio drivers skip. The bochs layout would read as a virtio
/// capability there (its +3 byte is a virtio `cfg_type`: 1 = common configuration).
///
/// ```text
///  +0  cap ID 0x09   +1 next   +2 length (44)   +3 cfg_type 9 (VIRTIO_PCI_CAP_VENDOR_CFG)
///  +4  vendor_id 0x1234, u16   +6 layout version (2)   +7 reserved (0)
///  +8  type version, u32 little-endian
///  +12 type name, ASCII, NUL-padded to 32 bytes
/// ```
#[derive(Debug)]
pub struct VendorCapability;

impl VendorCapability {
    /// Length in bytes (bochs layout).
    pub const LEN: usize = 40;
    /// Layout version of the bochs layout.
    pub const LAYOUT: u8 = 1;
    /// Length in bytes of the virtio layout.
    pub const VIRTIO_LEN: usize = 44;
    /// Layout version of the virtio layout.
    pub const VIRTIO_LAYOUT: u8 = 2;

    fn encode(ty: &VgpuType) -> [u8; Self::LEN] {
        let mut c = [0u8; Self::LEN];
        c[0] = CAP_ID_VENDOR;
        c[1] = 0;
        c[2] = Self::LEN as u8;
        c[3] = Self::LAYOUT;
        c[4..8].copy_from_slice(&ty.version.to_le_bytes());
        let name = ty.name.as_bytes();
        let n = name.len().min(32);
        c[8..8 + n].copy_from_slice(&name[..n]);
        c
    }

    /// The bochs layout as a chain element.
    pub fn bochs(ty: &VgpuType) -> Capability {
        Capability::read_only(Self::encode(ty).to_vec())
    }

    /// The virtio layout as a chain element.
    pub fn virtio(ty: &VgpuType) -> Capability {
        let mut c = vec![0u8; Self::VIRTIO_LEN];
        c[0] = CAP_ID_VENDOR;
        c[2] = Self::VIRTIO_LEN as u8;
        c[3] = VIRTIO_PCI_CAP_VENDOR_CFG;
        c[4..6].copy_from_slice(&IDENTITY_VENDOR_ID.to_le_bytes());
        c[6] = Self::VIRTIO_LAYOUT;
        c[8..12].copy_from_slice(&ty.version.to_le_bytes());
        let name = ty.name.as_bytes();
        let n = name.len().min(32);
        c[12..12 + n].copy_from_slice(&name[..n]);
        Capability::read_only(c)
    }

    /// Decodes (type name, version) from a config space image, walking the capability list
    /// (either layout).
    pub fn find(config: &[u8]) -> Option<(String, u32)> {
        let decode = |c: &[u8]| {
            let version = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            let name = c[4..].split(|&b| b == 0).next().unwrap_or_default();
            (String::from_utf8_lossy(name).into_owned(), version)
        };
        walk_capabilities(config)
            .into_iter()
            .filter(|&(id, _)| id == CAP_ID_VENDOR)
            .find_map(|(_, at)| {
                let c = config.get(at..)?;
                if c.get(2) == Some(&(Self::LEN as u8)) && c.get(3) == Some(&Self::LAYOUT) {
                    Some(decode(c.get(4..Self::LEN)?))
                } else if c.get(3) == Some(&VIRTIO_PCI_CAP_VENDOR_CFG)
                    && c.get(4..6) == Some(&IDENTITY_VENDOR_ID.to_le_bytes()[..])
                    && c.get(6) == Some(&Self::VIRTIO_LAYOUT)
                {
                    Some(decode(c.get(8..Self::VIRTIO_LEN)?))
                } else {
                    None
                }
            })
    }
}

/// Walks the capability list of a config image: (capability ID, offset) pairs. Stops on a loop
/// or a pointer outside the space.
pub fn walk_capabilities(config: &[u8]) -> Vec<(u8, usize)> {
    let mut caps = Vec::new();
    let has_list = config
        .get(offset::STATUS)
        .is_some_and(|s| u16::from(*s) & status::CAP_LIST != 0);
    if !has_list {
        return caps;
    }
    let mut ptr = usize::from(config.get(offset::CAP_POINTER).copied().unwrap_or(0) & 0xfc);
    while ptr >= 0x40 && ptr + 1 < config.len() && caps.len() < 48 {
        if caps.iter().any(|&(_, at)| at == ptr) {
            break;
        }
        caps.push((config[ptr], ptr));
        ptr = usize::from(config[ptr + 1] & 0xfc);
    }
    caps
}

/// A PCI type-0 configuration space.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    reset: [u8; CONFIG_SPACE_SIZE],
    wmask: [u8; CONFIG_SPACE_SIZE],
    w1cmask: [u8; CONFIG_SPACE_SIZE],
    caps: Vec<usize>,
}

/// Saved config space: the current bytes (the masks follow from the type).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSpaceState {
    /// The 256 config bytes.
    pub bytes: Vec<u8>,
}

impl ConfigSpace {
    /// The config space of an instance of `ty` with the personality's capability chain
    /// `caps`, placed in order from [`VENDOR_CAP_OFFSET`], each at a dword boundary. A chain
    /// that does not fit the 256-byte space is cut at the first capability that does not fit.
    pub fn new(ty: &VgpuType, caps: &[Capability]) -> Self {
        let mut cs = ConfigSpace {
            bytes: [0; CONFIG_SPACE_SIZE],
            reset: [0; CONFIG_SPACE_SIZE],
            wmask: [0; CONFIG_SPACE_SIZE],
            w1cmask: [0; CONFIG_SPACE_SIZE],
            caps: Vec::new(),
        };
        let p = &ty.pci;
        cs.put16(offset::VENDOR_ID, p.vendor);
        cs.put16(offset::DEVICE_ID, p.device);
        cs.bytes[offset::REVISION] = p.revision;
        cs.bytes[offset::CLASS..offset::CLASS + 3].copy_from_slice(&p.class.to_le_bytes()[..3]);
        cs.bytes[offset::HEADER_TYPE] = 0;
        cs.put16(offset::SUBSYSTEM_VENDOR, p.subsystem_vendor);
        cs.put16(offset::SUBSYSTEM_ID, p.subsystem_device);
        cs.bytes[offset::INTERRUPT_PIN] = 0;

        cs.wmask[offset::COMMAND..offset::COMMAND + 2]
            .copy_from_slice(&command::WRITABLE.to_le_bytes());
        cs.w1cmask[offset::STATUS..offset::STATUS + 2].copy_from_slice(&status::RW1C.to_le_bytes());
        cs.wmask[offset::CACHE_LINE] = 0xff;
        cs.wmask[offset::INTERRUPT_LINE] = 0xff;

        for bar in &ty.bars {
            cs.add_bar(bar);
        }

        cs.add_capabilities(caps);

        cs.reset = cs.bytes;
        cs
    }

    fn add_capabilities(&mut self, caps: &[Capability]) {
        let mut at = VENDOR_CAP_OFFSET;
        let mut prev_next: Option<usize> = None;
        for cap in caps {
            let len = cap.bytes.len();
            if len < 2 || at + len > CONFIG_SPACE_SIZE {
                break;
            }
            self.bytes[at..at + len].copy_from_slice(&cap.bytes);
            self.bytes[at + 1] = 0;
            for (i, &m) in cap.wmask.iter().take(len).enumerate() {
                self.wmask[at + i] = m;
            }
            match prev_next {
                Some(p) => self.bytes[p] = at as u8,
                None => {
                    self.bytes[offset::CAP_POINTER] = at as u8;
                    self.put16(offset::STATUS, status::CAP_LIST);
                }
            }
            prev_next = Some(at + 1);
            self.caps.push(at);
            at = (at + len + 3) & !3;
        }
    }

    /// Where the `index`th capability of the chain given to [`ConfigSpace::new`] lies.
    pub fn capability_offset(&self, index: usize) -> Option<usize> {
        self.caps.get(index).copied()
    }

    /// Sets bytes as the device (not the guest) does, bypassing the masks; the range is
    /// clamped to the space.
    pub(crate) fn set_bytes(&mut self, at: usize, data: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(at..at.saturating_add(data.len())) {
            dst.copy_from_slice(data);
        }
    }

    fn put16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn add_bar(&mut self, bar: &BarSpec) {
        let at = offset::BAR0 + 4 * usize::from(bar.index);
        // Memory BAR type bits: bit 0 = 0 (memory), bits 2:1 = 10b for 64-bit, bit 3 prefetch.
        let flags: u32 =
            (if bar.is_64bit { 0b100 } else { 0 }) | (if bar.prefetchable { 0b1000 } else { 0 });
        let addr_mask: u64 = !(bar.size.max(16) - 1);
        self.bytes[at..at + 4].copy_from_slice(&flags.to_le_bytes());
        let low = (addr_mask as u32) & 0xffff_fff0;
        self.wmask[at..at + 4].copy_from_slice(&low.to_le_bytes());
        if bar.is_64bit {
            let high = (addr_mask >> 32) as u32;
            self.wmask[at + 4..at + 8].copy_from_slice(&high.to_le_bytes());
        }
    }

    /// Reads `data.len()` bytes at `offset`. Returns false (and fills nothing) when the range
    /// is outside the space.
    pub fn read(&self, offset: usize, data: &mut [u8]) -> bool {
        match offset
            .checked_add(data.len())
            .filter(|&end| end <= CONFIG_SPACE_SIZE)
        {
            Some(end) => {
                data.copy_from_slice(&self.bytes[offset..end]);
                true
            }
            None => false,
        }
    }

    /// Writes `data` at `offset` through the masks. Returns false (and writes nothing) when
    /// the range is outside the space.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> bool {
        let Some(end) = offset
            .checked_add(data.len())
            .filter(|&e| e <= CONFIG_SPACE_SIZE)
        else {
            return false;
        };
        for (i, &val) in (offset..end).zip(data) {
            let old = self.bytes[i];
            let mut new = (old & !self.wmask[i]) | (val & self.wmask[i]);
            new &= !(val & self.w1cmask[i]);
            self.bytes[i] = new;
        }
        true
    }

    /// Back to the reset image.
    pub fn reset(&mut self) {
        self.bytes = self.reset;
    }

    /// The current bytes.
    pub fn bytes(&self) -> &[u8; CONFIG_SPACE_SIZE] {
        &self.bytes
    }

    /// The reset image (part of the ABI fingerprint).
    pub fn reset_image(&self) -> &[u8; CONFIG_SPACE_SIZE] {
        &self.reset
    }

    /// The Command register.
    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[offset::COMMAND], self.bytes[offset::COMMAND + 1]])
    }

    /// The Status register.
    pub fn status(&self) -> u16 {
        u16::from_le_bytes([self.bytes[offset::STATUS], self.bytes[offset::STATUS + 1]])
    }

    /// Sets Status bits as the device would on an error (for RW1C bits).
    pub fn set_status(&mut self, bits: u16) {
        let s = self.status() | bits;
        self.put16(offset::STATUS, s);
    }

    /// The address programmed into BAR `index` (a 64-bit BAR combines two slots).
    pub fn bar_address(&self, bar: &BarSpec) -> u64 {
        let at = offset::BAR0 + 4 * usize::from(bar.index);
        let dword = |o: usize| {
            u32::from_le_bytes([
                self.bytes[o],
                self.bytes[o + 1],
                self.bytes[o + 2],
                self.bytes[o + 3],
            ])
        };
        let low = u64::from(dword(at) & 0xffff_fff0);
        if bar.is_64bit {
            low | u64::from(dword(at + 4)) << 32
        } else {
            low
        }
    }

    /// The state to save.
    pub fn state(&self) -> ConfigSpaceState {
        ConfigSpaceState {
            bytes: self.bytes.to_vec(),
        }
    }

    /// Restores saved bytes. Read-only bytes must match this type's reset image: a state from
    /// another type is refused.
    pub fn restore(&mut self, state: &ConfigSpaceState) -> Result<(), String> {
        if state.bytes.len() != CONFIG_SPACE_SIZE {
            return Err(format!(
                "config space state is {} bytes, expected {CONFIG_SPACE_SIZE}",
                state.bytes.len()
            ));
        }
        for i in 0..CONFIG_SPACE_SIZE {
            let ro = !(self.wmask[i] | self.w1cmask[i]);
            // Status error bits may be set by the device at run time.
            if (state.bytes[i] ^ self.reset[i]) & ro != 0 {
                return Err(format!(
                    "config space byte {i:#04x} is read-only and differs"
                ));
            }
        }
        self.bytes.copy_from_slice(&state.bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;

    fn space(name: &str) -> (ConfigSpace, VgpuType) {
        let c = Catalog::builtin().unwrap();
        let ty = c.resolve(name).unwrap().clone();
        (ConfigSpace::new(&ty, &[VendorCapability::bochs(&ty)]), ty)
    }

    fn r32(cs: &ConfigSpace, at: usize) -> u32 {
        let mut b = [0u8; 4];
        assert!(cs.read(at, &mut b));
        u32::from_le_bytes(b)
    }

    fn r16(cs: &ConfigSpace, at: usize) -> u16 {
        let mut b = [0u8; 2];
        assert!(cs.read(at, &mut b));
        u16::from_le_bytes(b)
    }

    #[test]
    fn identity_matches_type() {
        let (cs, ty) = space("EMU-64M");
        assert_eq!(r16(&cs, offset::VENDOR_ID), 0x1234);
        assert_eq!(r16(&cs, offset::DEVICE_ID), 0x1111);
        assert_eq!(r32(&cs, 0x08), 0x0380_0002, "class 038000, revision 2");
        assert_eq!(r16(&cs, offset::SUBSYSTEM_VENDOR), ty.pci.subsystem_vendor);
        assert_eq!(r16(&cs, offset::SUBSYSTEM_ID), ty.pci.subsystem_device);
        assert_eq!(cs.bytes()[offset::HEADER_TYPE], 0);
        assert_eq!(cs.bytes()[offset::INTERRUPT_PIN], 0);
    }

    #[test]
    fn bar_sizing_32bit() {
        let (mut cs, _) = space("EMU-64M");
        assert_eq!(r32(&cs, 0x10), 0x8, "prefetchable 32-bit memory");
        assert!(cs.write(0x10, &[0xff; 4]));
        assert_eq!(r32(&cs, 0x10), !(64u32 << 20).wrapping_sub(1) | 0x8);
        assert!(cs.write(0x18, &[0xff; 4]));
        assert_eq!(r32(&cs, 0x18), 0xffff_f000, "BAR2: 4 KiB, non-prefetchable");
        for bar in [0x14, 0x1c, 0x20, 0x24, 0x30] {
            assert!(cs.write(bar, &[0xff; 4]));
            assert_eq!(r32(&cs, bar), 0, "unimplemented BAR {bar:#x} reads 0");
        }
        assert!(cs.write(0x10, &0xe000_0000u32.to_le_bytes()));
        let ty = Catalog::builtin()
            .unwrap()
            .resolve("EMU-64M")
            .unwrap()
            .clone();
        assert_eq!(cs.bar_address(&ty.bars[0]), 0xe000_0000);
    }

    #[test]
    fn bar_sizing_64bit() {
        let (mut cs, ty) = space("EMU-1G");
        assert_eq!(r32(&cs, 0x10), 0xc, "prefetchable 64-bit memory");
        assert!(cs.write(0x10, &[0xff; 8]));
        assert_eq!(r32(&cs, 0x10), 0xc000_000c);
        assert_eq!(r32(&cs, 0x14), 0xffff_ffff);
        assert!(cs.write(0x10, &0x0000_0008_4000_0000u64.to_le_bytes()));
        assert_eq!(cs.bar_address(&ty.bars[0]), 0x8_4000_0000);
    }

    #[test]
    fn read_only_fields_stay() {
        let (mut cs, _) = space("EMU-16M");
        let before = *cs.bytes();
        for at in [
            0x00, 0x02, 0x08, 0x0e, 0x2c, 0x2e, 0x34, 0x3d, 0x40, 0x44, 0x48,
        ] {
            assert!(cs.write(at, &[0xa5, 0x5a]));
            assert_eq!(cs.bytes()[at..at + 2], before[at..at + 2], "offset {at:#x}");
        }
    }

    #[test]
    fn command_keeps_writable_bits_only() {
        let (mut cs, _) = space("EMU-16M");
        assert!(cs.write(offset::COMMAND, &0xffffu16.to_le_bytes()));
        assert_eq!(cs.command(), command::WRITABLE);
        assert_eq!(cs.command() & 1, 0, "no I/O BARs: I/O enable is read-only");
        assert!(cs.write(offset::COMMAND, &[0, 0]));
        assert_eq!(cs.command(), 0);
    }

    #[test]
    fn status_is_rw1c() {
        let (mut cs, _) = space("EMU-16M");
        assert_eq!(cs.status(), status::CAP_LIST);
        cs.set_status(status::RCV_MASTER_ABORT | status::DETECTED_PARITY);
        // Writing 0 keeps them; writing 1 to one clears only that one; cap-list stays.
        assert!(cs.write(offset::STATUS, &[0, 0]));
        assert_eq!(
            cs.status(),
            status::CAP_LIST | status::RCV_MASTER_ABORT | status::DETECTED_PARITY
        );
        assert!(cs.write(offset::STATUS, &status::RCV_MASTER_ABORT.to_le_bytes()));
        assert_eq!(cs.status(), status::CAP_LIST | status::DETECTED_PARITY);
        assert!(cs.write(offset::STATUS, &0xffffu16.to_le_bytes()));
        assert_eq!(cs.status(), status::CAP_LIST);
        // A 32-bit write to Command+Status (how Linux writes both) clears status too.
        cs.set_status(status::SIG_SYSTEM_ERROR);
        assert!(cs.write(
            offset::COMMAND,
            &(u32::from(status::SIG_SYSTEM_ERROR) << 16 | 0x6).to_le_bytes()
        ));
        assert_eq!((cs.command(), cs.status()), (0x6, status::CAP_LIST));
    }

    #[test]
    fn capability_list_walks_to_the_vendor_cap() {
        let (cs, ty) = space("EMU-256M");
        assert_eq!(walk_capabilities(cs.bytes()), vec![(CAP_ID_VENDOR, 0x40)]);
        assert_eq!(
            VendorCapability::find(cs.bytes()),
            Some((ty.name.clone(), ty.version))
        );
    }

    #[test]
    fn out_of_range_access_is_refused() {
        let (mut cs, _) = space("EMU-16M");
        let mut b = [0u8; 4];
        assert!(!cs.read(254, &mut b));
        assert!(!cs.write(usize::MAX - 1, &b));
        assert!(cs.read(252, &mut b));
    }

    #[test]
    fn reset_and_restore() {
        let (mut cs, _) = space("EMU-16M");
        assert!(cs.write(0x10, &[0xff; 4]));
        assert!(cs.write(offset::COMMAND, &[0x06, 0]));
        let saved = cs.state();
        cs.reset();
        assert_eq!(cs.command(), 0);
        cs.restore(&saved).unwrap();
        assert_eq!(cs.command(), 6);
        let mut foreign = saved.clone();
        foreign.bytes[0] ^= 1;
        assert!(cs.restore(&foreign).is_err());
        assert!(cs.restore(&ConfigSpaceState { bytes: vec![0; 3] }).is_err());
    }
}

//! The `bochs` personality: BAR2 registers of QEMU's bochs-display ABI, as Linux `bochs-drm`
//! and OVMF's QemuVideoDxe drive them through MMIO alone (no legacy VGA, no option ROM).
//!
//! BAR2 (4 KiB, trapped):
//!
//! ```text
//!  0x000-0x3ff  EDID: 128-byte block, zeros after; RO, any access size
//!  0x400-0x41f  VGA ports 0x3c0-0x3df, 8-bit each (a 16-bit access is two ports)
//!               0x3c0 attribute index/data flip-flop; index bit 0x20 = palette access (unblank)
//!               0x3c1 attribute data read       0x3c2 misc output write   0x3cc misc read
//!               0x3da input status 1: reading resets the flip-flop (retrace bits toggle)
//!  0x500-0x515  DISPI registers, 16-bit, at 0x500 + index * 2:
//!               0 ID (RO 0xB0C5)   1 XRES   2 YRES   3 BPP   4 ENABLE   5 BANK
//!               6 VIRT_WIDTH   7 VIRT_HEIGHT   8 X_OFFSET   9 Y_OFFSET
//!               10 VIDEO_MEMORY_64K (RO: VRAM / 64 KiB)
//!  0x600        QEMU extension size, 32-bit RO: 8
//!  0x604        framebuffer byte order, 32-bit: 0x1e1e1e1e little, 0xbebebebe big
//!  elsewhere    reads 0, writes ignored
//! ```
//!
//! ENABLE bits: 0x01 enabled, 0x02 get-caps (XRES/YRES/BPP read the maxima), 0x20 8-bit DAC,
//! 0x40 linear framebuffer, 0x80 no-clear-memory. Registers hold what the guest writes (as
//! bochs-display does); validity is judged when the scanout is computed, never when written.

use serde::{Deserialize, Serialize};

use crate::catalog::{Resolution, VgpuType};
use crate::edid;
use crate::scanout::{NotDisplaying, PixelFormat, Scanout};

/// Size of the register BAR.
pub const MMIO_SIZE: u64 = 4096;
/// EDID window.
pub const EDID_OFFSET: u64 = 0x000;
/// End of the EDID window.
pub const EDID_END: u64 = 0x400;
/// VGA port window (port 0x3c0 at 0x400).
pub const VGA_OFFSET: u64 = 0x400;
/// Ports in the VGA window.
pub const VGA_PORTS: usize = 0x20;
/// DISPI register window.
pub const DISPI_OFFSET: u64 = 0x500;
/// QEMU extension registers.
pub const QEXT_OFFSET: u64 = 0x600;
/// Bytes of QEMU extension registers.
pub const QEXT_SIZE: u32 = 8;
/// Byte-order magic: little-endian framebuffer.
pub const LITTLE_ENDIAN_MAGIC: u32 = 0x1e1e_1e1e;
/// Byte-order magic: big-endian framebuffer.
pub const BIG_ENDIAN_MAGIC: u32 = 0xbebe_bebe;

/// DISPI register indexes and values.
pub mod dispi {
    /// Version ID.
    pub const ID: usize = 0;
    /// Horizontal resolution.
    pub const XRES: usize = 1;
    /// Vertical resolution.
    pub const YRES: usize = 2;
    /// Bits per pixel.
    pub const BPP: usize = 3;
    /// Enable flags.
    pub const ENABLE: usize = 4;
    /// Bank (legacy banked window; stored only).
    pub const BANK: usize = 5;
    /// Virtual width in pixels (the stride).
    pub const VIRT_WIDTH: usize = 6;
    /// Virtual height in lines.
    pub const VIRT_HEIGHT: usize = 7;
    /// Horizontal pan in pixels.
    pub const X_OFFSET: usize = 8;
    /// Vertical pan in lines.
    pub const Y_OFFSET: usize = 9;
    /// VRAM size in 64 KiB units (RO).
    pub const VIDEO_MEMORY_64K: usize = 10;
    /// Number of DISPI registers.
    pub const COUNT: usize = 11;
    /// Registers that hold guest-written values (all but VIDEO_MEMORY_64K).
    pub const STORED: usize = 10;
    /// The ID this device reports.
    pub const ID5: u16 = 0xb0c5;
    /// ENABLE: display on.
    pub const ENABLED: u16 = 0x01;
    /// ENABLE: reads of XRES/YRES/BPP return the maxima.
    pub const GETCAPS: u16 = 0x02;
    /// ENABLE: linear framebuffer.
    pub const LFB_ENABLED: u16 = 0x40;
}

/// VGA attribute-controller and port latches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VgaState {
    /// Attribute index register (bit 0x20 = palette access source: display unblanked).
    pub ar_index: u8,
    /// The 0x3c0 flip-flop: the next write to 0x3c0 is data (true) or an index (false).
    pub ar_flip_flop: bool,
    /// Attribute data registers (index & 0x1f).
    pub ar: [u8; 32],
    /// Misc output register.
    pub misc: u8,
    /// Input status 1 (retrace bits toggle on each read).
    pub st01: u8,
    /// Latches of the other ports (read back what was written).
    pub ports: [u8; VGA_PORTS],
}

/// Saved register state of a bochs personality.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BochsState {
    /// DISPI registers 0-9 as written.
    pub dispi: [u16; dispi::STORED],
    /// Byte-order register set to big endian.
    pub big_endian: bool,
    /// VGA ports.
    pub vga: VgaState,
}

/// One register of the BAR2 map: where it starts and how wide it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Edid(usize),
    Vga(usize),
    Dispi(usize),
    QextSize,
    QextByteOrder,
    Unassigned,
}

impl Reg {
    fn at(offset: u64) -> (Reg, u64, u64) {
        match offset {
            o if o < EDID_END => (Reg::Edid(o as usize), o, 1),
            o if (VGA_OFFSET..VGA_OFFSET + VGA_PORTS as u64).contains(&o) => {
                (Reg::Vga((o - VGA_OFFSET) as usize), o, 1)
            }
            o if (DISPI_OFFSET..DISPI_OFFSET + 2 * dispi::COUNT as u64).contains(&o) => {
                let index = ((o - DISPI_OFFSET) / 2) as usize;
                (Reg::Dispi(index), DISPI_OFFSET + 2 * index as u64, 2)
            }
            o if (QEXT_OFFSET..QEXT_OFFSET + 4).contains(&o) => (Reg::QextSize, QEXT_OFFSET, 4),
            o if (QEXT_OFFSET + 4..QEXT_OFFSET + 8).contains(&o) => {
                (Reg::QextByteOrder, QEXT_OFFSET + 4, 4)
            }
            o => (Reg::Unassigned, o, 1),
        }
    }
}

/// The BAR2 register block of one bochs head.
#[derive(Clone, Debug)]
pub struct BochsRegs {
    state: BochsState,
    edid: [u8; edid::EDID_BLOCK],
    vram_size: u64,
    max_resolution: Resolution,
}

impl BochsRegs {
    /// Registers of an instance of `ty` with the given UUID (the EDID serial).
    pub fn new(ty: &VgpuType, uuid: &[u8; 16]) -> Self {
        BochsRegs {
            state: BochsState::default(),
            edid: edid::generate(ty, uuid),
            vram_size: ty.framebuffer,
            max_resolution: ty.max_resolution,
        }
    }

    /// The EDID block the registers expose.
    pub fn edid(&self) -> &[u8; edid::EDID_BLOCK] {
        &self.edid
    }

    /// Reads `data.len()` bytes at `offset` (the caller has checked the range is inside BAR2).
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            let (reg, start, _) = Reg::at(at);
            let shift = 8 * (at - start);
            *b = match reg {
                Reg::Edid(i) => self.edid.get(i).copied().unwrap_or(0),
                Reg::Vga(port) => self.vga_read(port),
                Reg::Dispi(index) => (self.dispi_read(index) >> shift) as u8,
                Reg::QextSize => (QEXT_SIZE >> shift) as u8,
                Reg::QextByteOrder => (self.byte_order() >> shift) as u8,
                Reg::Unassigned => 0,
            };
        }
    }

    /// Writes `data` at `offset` (the caller has checked the range is inside BAR2). A partial
    /// write to a 16- or 32-bit register merges with its current value. Returns how many
    /// register writes had no effect (read-only or unassigned, or an invalid value).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        let mut ignored = 0;
        let mut i = 0usize;
        while i < data.len() {
            let at = offset + i as u64;
            let (reg, start, width) = Reg::at(at);
            let take = ((start + width - at) as usize).min(data.len() - i);
            let bytes = &data[i..i + take];
            let merge = |cur: u32| {
                let mut v = cur.to_le_bytes();
                let first = (at - start) as usize;
                v[first..first + take].copy_from_slice(bytes);
                u32::from_le_bytes(v)
            };
            let effective = match reg {
                Reg::Vga(port) => {
                    self.vga_write(port, bytes[0]);
                    true
                }
                Reg::Dispi(index) => {
                    let v = merge(u32::from(self.dispi_read_raw(index))) as u16;
                    self.dispi_write(index, v)
                }
                Reg::QextByteOrder => match merge(self.byte_order()) {
                    LITTLE_ENDIAN_MAGIC => {
                        self.state.big_endian = false;
                        true
                    }
                    BIG_ENDIAN_MAGIC => {
                        self.state.big_endian = true;
                        true
                    }
                    _ => false,
                },
                Reg::Edid(_) | Reg::QextSize | Reg::Unassigned => false,
            };
            if !effective {
                ignored += 1;
            }
            i += take;
        }
        ignored
    }

    fn byte_order(&self) -> u32 {
        if self.state.big_endian {
            BIG_ENDIAN_MAGIC
        } else {
            LITTLE_ENDIAN_MAGIC
        }
    }

    /// The stored value, without get-caps substitution (for read-modify-write).
    fn dispi_read_raw(&self, index: usize) -> u16 {
        match index {
            dispi::ID => dispi::ID5,
            dispi::VIDEO_MEMORY_64K => (self.vram_size >> 16).min(0xffff) as u16,
            i => self.state.dispi.get(i).copied().unwrap_or(0),
        }
    }

    fn dispi_read(&self, index: usize) -> u16 {
        if self.state.dispi[dispi::ENABLE] & dispi::GETCAPS != 0 {
            match index {
                dispi::XRES => return self.max_resolution.width as u16,
                dispi::YRES => return self.max_resolution.height as u16,
                dispi::BPP => return 32,
                _ => {}
            }
        }
        self.dispi_read_raw(index)
    }

    fn dispi_write(&mut self, index: usize, value: u16) -> bool {
        match index {
            dispi::ID | dispi::VIDEO_MEMORY_64K => false,
            i => match self.state.dispi.get_mut(i) {
                Some(r) => {
                    *r = value;
                    true
                }
                None => false,
            },
        }
    }

    fn vga_read(&mut self, port: usize) -> u8 {
        let vga = &mut self.state.vga;
        match port {
            0x00 => vga.ar_index,
            0x01 => vga.ar[usize::from(vga.ar_index & 0x1f)],
            0x0c => vga.misc,
            0x1a => {
                // Toggle display-enable and vertical-retrace so polling loops progress.
                vga.st01 ^= 0x09;
                vga.ar_flip_flop = false;
                vga.st01
            }
            p => vga.ports[p],
        }
    }

    fn vga_write(&mut self, port: usize, value: u8) {
        let vga = &mut self.state.vga;
        match port {
            0x00 => {
                if vga.ar_flip_flop {
                    vga.ar[usize::from(vga.ar_index & 0x1f)] = value;
                } else {
                    vga.ar_index = value & 0x3f;
                }
                vga.ar_flip_flop = !vga.ar_flip_flop;
            }
            0x02 => vga.misc = value,
            p => vga.ports[p] = value,
        }
    }

    /// True while the attribute index lacks the palette-access bit (the VGA way to blank).
    pub fn blanked(&self) -> bool {
        self.state.vga.ar_index & 0x20 == 0
    }

    /// The DISPI register `index` as the guest reads it.
    pub fn dispi(&self, index: usize) -> u16 {
        if index < dispi::COUNT {
            self.dispi_read(index)
        } else {
            0
        }
    }

    /// The current scanout, or why there is none. Never points outside VRAM, never exceeds the
    /// type's max resolution.
    pub fn scanout(&self) -> Result<Scanout, NotDisplaying> {
        let r = &self.state.dispi;
        if r[dispi::ENABLE] & dispi::ENABLED == 0 {
            return Err(NotDisplaying::Disabled);
        }
        let format = match r[dispi::BPP] {
            16 => PixelFormat::Rgb565,
            32 if self.state.big_endian => PixelFormat::Xrgb8888BigEndian,
            32 => PixelFormat::Xrgb8888,
            other => return Err(NotDisplaying::UnsupportedDepth(other)),
        };
        let bpp = u64::from(format.bytes_per_pixel());
        let (width, height) = (u32::from(r[dispi::XRES]), u32::from(r[dispi::YRES]));
        if width < crate::catalog::MIN_DIMENSION || height < crate::catalog::MIN_DIMENSION {
            return Err(NotDisplaying::TooSmall { width, height });
        }
        if !Resolution::new(width, height).fits_within(self.max_resolution) {
            return Err(NotDisplaying::AboveMaxResolution {
                width,
                height,
                max_width: self.max_resolution.width,
                max_height: self.max_resolution.height,
            });
        }
        let virt_width = u64::from(r[dispi::VIRT_WIDTH].max(r[dispi::XRES]));
        let stride = virt_width * bpp;
        let offset = u64::from(r[dispi::X_OFFSET]) * bpp + u64::from(r[dispi::Y_OFFSET]) * stride;
        // The whole stride * height, as bochs-display checks it.
        let end = offset + stride * u64::from(height);
        if end > self.vram_size {
            return Err(NotDisplaying::PastVram {
                end,
                vram: self.vram_size,
            });
        }
        Ok(Scanout {
            offset,
            // stride <= 0xffff * 4 fits u32.
            stride: stride as u32,
            width,
            height,
            format,
        })
    }

    /// Power-on values.
    pub fn reset(&mut self) {
        self.state = BochsState::default();
    }

    /// The state to save.
    pub fn state(&self) -> BochsState {
        self.state.clone()
    }

    /// Restores saved state.
    pub fn restore(&mut self, state: &BochsState) {
        self.state = state.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;

    fn regs(name: &str) -> BochsRegs {
        let c = Catalog::builtin().unwrap();
        BochsRegs::new(c.resolve(name).unwrap(), &[7; 16])
    }

    fn w16(r: &mut BochsRegs, index: usize, v: u16) {
        assert_eq!(
            r.write(DISPI_OFFSET + 2 * index as u64, &v.to_le_bytes()),
            0,
            "index {index}"
        );
    }

    fn r16(r: &mut BochsRegs, index: usize) -> u16 {
        let mut b = [0u8; 2];
        r.read(DISPI_OFFSET + 2 * index as u64, &mut b);
        u16::from_le_bytes(b)
    }

    fn r8(r: &mut BochsRegs, at: u64) -> u8 {
        let mut b = [0u8; 1];
        r.read(at, &mut b);
        b[0]
    }

    /// Linux bochs-drm's bochs_hw_setmode + bochs_hw_setformat + bochs_hw_setbase for a mode.
    fn linux_modeset(r: &mut BochsRegs, w: u16, h: u16, fb_size: u64, fb_offset: u64) {
        // bochs_hw_blank(false): misc colour bit, reset flip-flop, index 0x20.
        assert_eq!(r.write(VGA_OFFSET + 2, &[0x01]), 0);
        r8(r, VGA_OFFSET + 0x1a);
        assert_eq!(r.write(VGA_OFFSET, &[0x20]), 0);
        let stride = u64::from(w) * 4;
        w16(r, dispi::ENABLE, 0);
        w16(r, dispi::BPP, 32);
        w16(r, dispi::XRES, w);
        w16(r, dispi::YRES, h);
        w16(r, dispi::BANK, 0);
        w16(r, dispi::VIRT_WIDTH, w);
        w16(r, dispi::VIRT_HEIGHT, (fb_size / stride) as u16);
        w16(r, dispi::X_OFFSET, 0);
        w16(r, dispi::Y_OFFSET, 0);
        w16(r, dispi::ENABLE, dispi::ENABLED | dispi::LFB_ENABLED);
        // setformat: little endian (a 32-bit write).
        assert_eq!(
            r.write(QEXT_OFFSET + 4, &LITTLE_ENDIAN_MAGIC.to_le_bytes()),
            0
        );
        // setbase(x=0, y=0, stride, addr = fb_offset).
        let vy = fb_offset / stride;
        let vx = (fb_offset % stride) / 4;
        w16(r, dispi::VIRT_WIDTH, (stride / 4) as u16);
        w16(r, dispi::X_OFFSET, vx as u16);
        w16(r, dispi::Y_OFFSET, vy as u16);
    }

    #[test]
    fn linux_mode_set_sequence_gives_expected_scanout() {
        let mut r = regs("EMU-64M");
        assert_eq!(r.scanout(), Err(NotDisplaying::Disabled));
        linux_modeset(&mut r, 1280, 800, 64 << 20, 0x40_0000);
        assert!(!r.blanked());
        assert_eq!(
            r.scanout(),
            Ok(Scanout {
                offset: 0x40_0000,
                stride: 1280 * 4,
                width: 1280,
                height: 800,
                format: PixelFormat::Xrgb8888
            })
        );
    }

    #[test]
    fn id_and_video_memory_are_read_only() {
        let mut r = regs("EMU-256M");
        assert_eq!(r16(&mut r, dispi::ID), 0xb0c5);
        assert_eq!(
            r16(&mut r, dispi::VIDEO_MEMORY_64K),
            4096,
            "256 MiB / 64 KiB"
        );
        assert_eq!(r.write(DISPI_OFFSET, &0xb0c0u16.to_le_bytes()), 1);
        assert_eq!(r.write(DISPI_OFFSET + 20, &1u16.to_le_bytes()), 1);
        assert_eq!(r16(&mut r, dispi::ID), 0xb0c5);
        assert_eq!(r16(&mut r, dispi::VIDEO_MEMORY_64K), 4096);
        let mut r = regs("EMU-1G");
        assert_eq!(r16(&mut r, dispi::VIDEO_MEMORY_64K), 16384);
    }

    #[test]
    fn byte_and_dword_accesses_to_dispi() {
        let mut r = regs("EMU-16M");
        // Byte writes merge into the 16-bit register.
        assert_eq!(r.write(DISPI_OFFSET + 2, &[0x00]), 0);
        assert_eq!(r.write(DISPI_OFFSET + 3, &[0x04]), 0);
        assert_eq!(r16(&mut r, dispi::XRES), 1024);
        // A 32-bit write spans XRES and YRES.
        assert_eq!(
            r.write(DISPI_OFFSET + 2, &(768u32 << 16 | 800).to_le_bytes()),
            0
        );
        assert_eq!(
            (r16(&mut r, dispi::XRES), r16(&mut r, dispi::YRES)),
            (800, 768)
        );
        let mut b = [0u8; 4];
        r.read(DISPI_OFFSET, &mut b);
        assert_eq!(u32::from_le_bytes(b), 800 << 16 | 0xb0c5);
        assert_eq!(r8(&mut r, DISPI_OFFSET + 1), 0xb0);
    }

    #[test]
    fn getcaps_reports_the_maxima() {
        let mut r = regs("EMU-64M");
        w16(&mut r, dispi::XRES, 640);
        w16(&mut r, dispi::ENABLE, dispi::GETCAPS);
        assert_eq!(
            (
                r16(&mut r, dispi::XRES),
                r16(&mut r, dispi::YRES),
                r16(&mut r, dispi::BPP)
            ),
            (2560, 1600, 32)
        );
        w16(&mut r, dispi::ENABLE, 0);
        assert_eq!(r16(&mut r, dispi::XRES), 640);
    }

    #[test]
    fn vga_flip_flop() {
        let mut r = regs("EMU-16M");
        assert!(r.blanked(), "power-on index lacks 0x20");
        // Index, then data.
        r.write(VGA_OFFSET, &[0x30]);
        r.write(VGA_OFFSET, &[0x5a]);
        assert_eq!(r8(&mut r, VGA_OFFSET), 0x30);
        assert_eq!(r8(&mut r, VGA_OFFSET + 1), 0x5a, "AR[0x10] holds the data");
        assert!(!r.blanked());
        // Next write is an index again.
        r.write(VGA_OFFSET, &[0x01]);
        assert!(r.blanked());
        // Now the flip-flop expects data; reading 0x3da resets it to index.
        r8(&mut r, VGA_OFFSET + 0x1a);
        r.write(VGA_OFFSET, &[0x20]);
        assert_eq!(
            r8(&mut r, VGA_OFFSET),
            0x20,
            "treated as an index after the reset"
        );
        assert!(!r.blanked());
        // 0x3da toggles retrace so polling loops end.
        let a = r8(&mut r, VGA_OFFSET + 0x1a);
        let b = r8(&mut r, VGA_OFFSET + 0x1a);
        assert_ne!(a & 0x08, b & 0x08);
        // A 16-bit access is two ports: 0x3c2 (misc write) and 0x3c3.
        r.write(VGA_OFFSET + 2, &[0xe3, 0x11]);
        assert_eq!(r8(&mut r, VGA_OFFSET + 0xc), 0xe3);
        assert_eq!(r8(&mut r, VGA_OFFSET + 3), 0x11);
    }

    #[test]
    fn edid_window_and_extension_registers() {
        let mut r = regs("EMU-16M");
        let mut e = [0u8; 256];
        r.read(0, &mut e);
        assert_eq!(&e[..128], r.edid());
        assert!(e[128..].iter().all(|&b| b == 0));
        assert_eq!(r.write(0x10, &[1, 2, 3, 4]), 4, "EDID is read-only");
        let mut b = [0u8; 4];
        r.read(QEXT_OFFSET, &mut b);
        assert_eq!(u32::from_le_bytes(b), 8);
        r.read(QEXT_OFFSET + 4, &mut b);
        assert_eq!(u32::from_le_bytes(b), LITTLE_ENDIAN_MAGIC);
        assert_eq!(r.write(QEXT_OFFSET + 4, &BIG_ENDIAN_MAGIC.to_le_bytes()), 0);
        assert_eq!(
            r.write(QEXT_OFFSET + 4, &0x1234u32.to_le_bytes()),
            1,
            "bad magic ignored"
        );
        r.read(QEXT_OFFSET + 4, &mut b);
        assert_eq!(u32::from_le_bytes(b), BIG_ENDIAN_MAGIC);
        r.read(0xffc, &mut b);
        assert_eq!(b, [0; 4], "unassigned reads zero");
        assert_eq!(r.write(0xffc, &[1; 4]), 4);
    }

    #[test]
    fn scanout_rejects_bad_geometry() {
        let mut r = regs("EMU-16M");
        let set = |r: &mut BochsRegs, regs: &[(usize, u16)]| {
            for &(i, v) in regs {
                w16(r, i, v);
            }
        };
        set(
            &mut r,
            &[
                (dispi::BPP, 32),
                (dispi::XRES, 1024),
                (dispi::YRES, 768),
                (dispi::ENABLE, 0x41),
            ],
        );
        assert!(r.scanout().is_ok());
        set(&mut r, &[(dispi::BPP, 8)]);
        assert_eq!(r.scanout(), Err(NotDisplaying::UnsupportedDepth(8)));
        set(&mut r, &[(dispi::BPP, 16)]);
        assert_eq!(r.scanout().unwrap().format, PixelFormat::Rgb565);
        set(&mut r, &[(dispi::BPP, 32), (dispi::XRES, 63)]);
        assert!(matches!(r.scanout(), Err(NotDisplaying::TooSmall { .. })));
        set(&mut r, &[(dispi::XRES, 2560)]);
        assert!(matches!(
            r.scanout(),
            Err(NotDisplaying::AboveMaxResolution { .. })
        ));
        set(&mut r, &[(dispi::XRES, 1024), (dispi::Y_OFFSET, 0xffff)]);
        assert!(matches!(r.scanout(), Err(NotDisplaying::PastVram { .. })));
        // Exactly filling the 16 MiB VRAM is fine; one more line is not.
        set(
            &mut r,
            &[(dispi::VIRT_WIDTH, 4096), (dispi::Y_OFFSET, 1024 - 768)],
        );
        let s = r.scanout().unwrap();
        assert_eq!(s.offset + u64::from(s.stride) * 768, 16 << 20);
        set(&mut r, &[(dispi::Y_OFFSET, 1024 - 767)]);
        assert!(matches!(r.scanout(), Err(NotDisplaying::PastVram { .. })));
    }

    #[test]
    fn reset_and_state_round_trip() {
        let mut r = regs("EMU-16M");
        linux_modeset(&mut r, 1024, 768, 16 << 20, 0);
        let saved = r.state();
        let before = r.scanout();
        r.reset();
        assert_eq!(r.scanout(), Err(NotDisplaying::Disabled));
        assert!(r.blanked());
        r.restore(&saved);
        assert_eq!(r.scanout(), before);
    }
}

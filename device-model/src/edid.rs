//! EDID 1.4 base block for a type's heads (VESA E-EDID Release A, Revision 2).
//!
//! ```text
//!  offset  size  field
//!  0x00    8     header 00 ff ff ff ff ff ff 00
//!  0x08    2     manufacturer "VGE" (big-endian, 5 bits per letter)
//!  0x0a    2     product code = PCI subsystem ID (little-endian)
//!  0x0c    4     serial = first 4 bytes of the instance UUID (little-endian u32 of them, BE order)
//!  0x10    2     week 0, year 2026 (model year pinned with the type version)
//!  0x12    2     EDID 1.4
//!  0x14    5     digital 8 bpc DisplayPort, size in cm at 96 dpi, gamma 2.2, features 0x06
//!  0x19    10    chromaticity: sRGB primaries, D65 white
//!  0x23    3     established timings (only modes within max_resolution)
//!  0x26    16    standard timings at 60 Hz (only modes within max_resolution; 0x0101 unused)
//!  0x36    18    descriptor 1: detailed timing, default resolution at the FRL refresh (preferred)
//!  0x48    18    descriptor 2: detailed timing, max resolution (or a dummy when it is the default)
//!  0x5a    18    descriptor 3: range limits (0xfd), "range limits only": no inferred modes
//!  0x6c    18    descriptor 4: monitor name (0xfc), the type name
//!  0x7e    1     extension count 0
//!  0x7f    1     checksum: all 128 bytes sum to 0 mod 256
//! ```
//!
//! Feature bit 0 (continuous frequency) is clear, so a sink adds no modes beyond those listed;
//! every listed mode is within the type's `max_resolution`. Detailed timings use CVT reduced
//! blanking (v1).

use serde::Serialize;

use crate::catalog::{Resolution, VgpuType};

/// Size of the EDID base block.
pub const EDID_BLOCK: usize = 128;
/// The pixel clock field is 16 bits of 10 kHz.
pub const MAX_PIXEL_CLOCK_KHZ: u32 = 655_350;

const HEADER: [u8; 8] = [0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00];
const MANUFACTURER: [u8; 3] = *b"VGE";
const MODEL_YEAR: u8 = (2026 - 1990) as u8;

/// Established timings I and II: (byte, bit, width, height, refresh, offered). We offer only
/// the 60 Hz ones (when within max_resolution); the decoder reads them all.
const ESTABLISHED: [(usize, u8, u32, u32, u32, bool); 16] = [
    (0x23, 7, 720, 400, 70, false),
    (0x23, 6, 720, 400, 88, false),
    (0x23, 5, 640, 480, 60, true),
    (0x23, 4, 640, 480, 67, false),
    (0x23, 3, 640, 480, 72, false),
    (0x23, 2, 640, 480, 75, false),
    (0x23, 1, 800, 600, 56, false),
    (0x23, 0, 800, 600, 60, true),
    (0x24, 7, 800, 600, 72, false),
    (0x24, 6, 800, 600, 75, false),
    (0x24, 5, 832, 624, 75, false),
    (0x24, 3, 1024, 768, 60, true),
    (0x24, 2, 1024, 768, 70, false),
    (0x24, 1, 1024, 768, 75, false),
    (0x24, 0, 1280, 1024, 75, false),
    (0x25, 7, 1152, 870, 75, false),
];

/// Standard timing candidates at 60 Hz: (width, height, aspect code). Aspect codes (EDID 1.3+):
/// 0 = 16:10, 1 = 4:3, 2 = 5:4, 3 = 16:9. Width is at most 2288 (the field's limit).
const STANDARD: [(u32, u32, u8); 8] = [
    (1280, 720, 3),
    (1280, 800, 0),
    (1280, 1024, 2),
    (1440, 900, 0),
    (1600, 900, 3),
    (1680, 1050, 0),
    (1920, 1080, 3),
    (1920, 1200, 0),
];

/// A display timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Active pixels per line.
    pub hactive: u32,
    /// Horizontal front porch.
    pub hfront: u32,
    /// Horizontal sync width.
    pub hsync: u32,
    /// Horizontal blanking (front porch + sync + back porch).
    pub hblank: u32,
    /// Active lines.
    pub vactive: u32,
    /// Vertical front porch.
    pub vfront: u32,
    /// Vertical sync width.
    pub vsync: u32,
    /// Vertical blanking.
    pub vblank: u32,
    /// Pixel clock in kHz.
    pub pixel_clock_khz: u32,
}

/// CVT reduced-blanking (v1) timing for `res` at `refresh` Hz.
pub fn cvt_rb_timing(res: Resolution, refresh: u32) -> Timing {
    const H_BLANK: u32 = 160;
    const H_FRONT: u32 = 48;
    const H_SYNC: u32 = 32;
    const MIN_V_BLANK_US: u64 = 460;
    const V_FRONT: u32 = 3;
    const MIN_V_BACK: u32 = 6;
    let (w, h) = (res.width, res.height);
    let vsync = if w * 3 == h * 4 {
        4
    } else if w * 9 == h * 16 {
        5
    } else if w * 10 == h * 16 {
        6
    } else if w * 4 == h * 5 || w * 9 == h * 15 {
        7
    } else {
        10
    };
    let refresh = u64::from(refresh.max(1));
    // VBI_LINES = floor(MIN_V_BLANK / H_PERIOD_EST) + 1, with
    // H_PERIOD_EST = (1e6 / refresh - MIN_V_BLANK) / vactive, kept in integers.
    let denom = (1_000_000 - (MIN_V_BLANK_US * refresh).min(999_999)).max(1);
    let vbi_lines = (MIN_V_BLANK_US * u64::from(h) * refresh / denom) as u32 + 1;
    let vblank = vbi_lines.max(V_FRONT + vsync + MIN_V_BACK);
    let htotal = u64::from(w + H_BLANK);
    let vtotal = u64::from(h + vblank);
    // Round down to the CVT clock step of 0.25 MHz.
    let clock_hz = refresh * htotal * vtotal;
    let pixel_clock_khz = u32::try_from(clock_hz / 250_000 * 250).unwrap_or(u32::MAX);
    Timing {
        hactive: w,
        hfront: H_FRONT,
        hsync: H_SYNC,
        hblank: H_BLANK,
        vactive: h,
        vfront: V_FRONT,
        vsync,
        vblank,
        pixel_clock_khz,
    }
}

/// Image size in mm at 96 dpi.
fn size_mm(px: u32) -> u32 {
    (px * 254 + 480) / 960
}

fn detailed_timing(t: &Timing, panel: Resolution) -> [u8; 18] {
    let mut d = [0u8; 18];
    let clock = (t.pixel_clock_khz / 10) as u16;
    d[0..2].copy_from_slice(&clock.to_le_bytes());
    d[2] = t.hactive as u8;
    d[3] = t.hblank as u8;
    d[4] = (((t.hactive >> 8) & 0xf) << 4 | ((t.hblank >> 8) & 0xf)) as u8;
    d[5] = t.vactive as u8;
    d[6] = t.vblank as u8;
    d[7] = (((t.vactive >> 8) & 0xf) << 4 | ((t.vblank >> 8) & 0xf)) as u8;
    d[8] = t.hfront as u8;
    d[9] = t.hsync as u8;
    d[10] = ((t.vfront & 0xf) << 4 | (t.vsync & 0xf)) as u8;
    d[11] = (((t.hfront >> 8) & 3) << 6
        | ((t.hsync >> 8) & 3) << 4
        | ((t.vfront >> 4) & 3) << 2
        | ((t.vsync >> 4) & 3)) as u8;
    let (wmm, hmm) = (size_mm(panel.width), size_mm(panel.height));
    d[12] = wmm as u8;
    d[13] = hmm as u8;
    d[14] = (((wmm >> 8) & 0xf) << 4 | ((hmm >> 8) & 0xf)) as u8;
    // Digital separate sync, hsync positive, vsync negative (CVT-RB).
    d[17] = 0x1a;
    d
}

fn text_descriptor(tag: u8, text: &str) -> [u8; 18] {
    let mut d = [0u8; 18];
    d[3] = tag;
    let bytes: Vec<u8> = text.bytes().filter(u8::is_ascii_graphic).take(13).collect();
    d[5..5 + bytes.len()].copy_from_slice(&bytes);
    if bytes.len() < 13 {
        d[5 + bytes.len()] = 0x0a;
        for b in &mut d[6 + bytes.len()..] {
            *b = 0x20;
        }
    }
    d
}

/// Generates the EDID of one head of an instance of `ty`.
pub fn generate(ty: &VgpuType, uuid: &[u8; 16]) -> [u8; EDID_BLOCK] {
    let mut e = [0u8; EDID_BLOCK];
    e[0..8].copy_from_slice(&HEADER);
    let m = MANUFACTURER.map(|c| u16::from(c - b'A' + 1));
    e[8..10].copy_from_slice(&((m[0] << 10) | (m[1] << 5) | m[2]).to_be_bytes());
    e[10..12].copy_from_slice(&ty.pci.subsystem_device.to_le_bytes());
    e[12..16]
        .copy_from_slice(&u32::from_be_bytes([uuid[0], uuid[1], uuid[2], uuid[3]]).to_le_bytes());
    e[16] = 0;
    e[17] = MODEL_YEAR;
    e[18] = 1;
    e[19] = 4;
    // Digital, 8 bits per colour, DisplayPort.
    e[20] = 0xa5;
    let max = ty.max_resolution;
    e[21] = size_mm(max.width).div_ceil(10).clamp(1, 255) as u8;
    e[22] = size_mm(max.height).div_ceil(10).clamp(1, 255) as u8;
    // Gamma 2.2.
    e[23] = 120;
    // sRGB default colour space, preferred timing is native; not continuous frequency.
    e[24] = 0x06;
    e[25..35].copy_from_slice(&chromaticity());

    for (byte, bit, w, h, _, offered) in ESTABLISHED {
        if offered && Resolution::new(w, h).fits_within(max) {
            e[byte] |= 1 << bit;
        }
    }
    let mut slot = 0x26;
    for (w, h, aspect) in STANDARD {
        if Resolution::new(w, h).fits_within(max) {
            e[slot] = (w / 8 - 31) as u8;
            // Refresh 60 Hz: field = refresh - 60 = 0.
            e[slot + 1] = aspect << 6;
            slot += 2;
        }
    }
    while slot < 0x36 {
        e[slot] = 0x01;
        e[slot + 1] = 0x01;
        slot += 2;
    }

    let refresh = ty.refresh_hz();
    let preferred = cvt_rb_timing(ty.default_resolution, refresh);
    e[0x36..0x48].copy_from_slice(&detailed_timing(&preferred, max));
    let largest = cvt_rb_timing(max, refresh);
    if ty.default_resolution != max {
        e[0x48..0x5a].copy_from_slice(&detailed_timing(&largest, max));
    } else {
        // Dummy descriptor (tag 0x10).
        e[0x48 + 3] = 0x10;
    }
    e[0x5a..0x6c].copy_from_slice(&range_limits(refresh, &largest));
    e[0x6c..0x7e].copy_from_slice(&text_descriptor(0xfc, &ty.name));
    e[0x7e] = 0;
    e[0x7f] = 0u8.wrapping_sub(e[..0x7f].iter().fold(0u8, |a, &b| a.wrapping_add(b)));
    e
}

fn range_limits(refresh: u32, largest: &Timing) -> [u8; 18] {
    let mut d = [0u8; 18];
    d[3] = 0xfd;
    d[5] = refresh.min(60) as u8;
    d[6] = refresh.max(60) as u8;
    let hfreq_khz = |t: &Timing| t.pixel_clock_khz.div_ceil(t.hactive + t.hblank);
    // 30 kHz covers DMT 640x480@60 (31.5 kHz).
    d[7] = 30;
    d[8] = hfreq_khz(largest).clamp(80, 255) as u8;
    // Max pixel clock in 10 MHz units; the standard timing 1920x1200@60 (DMT) needs 193.25 MHz.
    d[9] = largest
        .pixel_clock_khz
        .max(193_250)
        .div_ceil(10_000)
        .min(255) as u8;
    // "Range limits only": no timing formula, so no inferred modes.
    d[10] = 0x01;
    d[11] = 0x0a;
    for b in &mut d[12..] {
        *b = 0x20;
    }
    d
}

/// sRGB primaries and D65 white point as 10-bit fractions.
fn chromaticity() -> [u8; 10] {
    let v = |x: f64| (x * 1024.0).round() as u16;
    let (rx, ry, gx, gy) = (v(0.640), v(0.330), v(0.300), v(0.600));
    let (bx, by, wx, wy) = (v(0.150), v(0.060), v(0.3127), v(0.3290));
    let lo = |a: u16, b: u16, c: u16, d: u16| {
        ((a & 3) << 6 | (b & 3) << 4 | (c & 3) << 2 | (d & 3)) as u8
    };
    [
        lo(rx, ry, gx, gy),
        lo(bx, by, wx, wy),
        (rx >> 2) as u8,
        (ry >> 2) as u8,
        (gx >> 2) as u8,
        (gy >> 2) as u8,
        (bx >> 2) as u8,
        (by >> 2) as u8,
        (wx >> 2) as u8,
        (wy >> 2) as u8,
    ]
}

/// A mode an EDID offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Mode {
    /// Pixels per line.
    pub width: u32,
    /// Lines.
    pub height: u32,
    /// Refresh rate in Hz, rounded.
    pub refresh: u32,
    /// The first detailed timing: the preferred mode.
    pub preferred: bool,
}

/// Why bytes are not a usable EDID base block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EdidError {
    /// Fewer than 128 bytes.
    #[error("EDID is {0} bytes, shorter than a 128-byte block")]
    Short(usize),
    /// Bad fixed header.
    #[error("EDID header is not 00 ff ff ff ff ff ff 00")]
    Header,
    /// Bytes do not sum to zero.
    #[error("EDID checksum does not sum to zero")]
    Checksum,
}

/// Decodes the modes of an EDID base block: detailed timings first (the first is preferred),
/// then established and standard timings.
pub fn decode_modes(edid: &[u8]) -> Result<Vec<Mode>, EdidError> {
    let e = edid.get(..EDID_BLOCK).ok_or(EdidError::Short(edid.len()))?;
    if e[..8] != HEADER {
        return Err(EdidError::Header);
    }
    if e.iter().fold(0u8, |a, &b| a.wrapping_add(b)) != 0 {
        return Err(EdidError::Checksum);
    }
    let mut modes = Vec::new();
    for (i, d) in e[0x36..0x7e].chunks_exact(18).enumerate() {
        let clock_khz = u32::from(u16::from_le_bytes([d[0], d[1]])) * 10;
        if clock_khz == 0 {
            continue;
        }
        let hactive = u32::from(d[2]) | u32::from(d[4] >> 4) << 8;
        let hblank = u32::from(d[3]) | u32::from(d[4] & 0xf) << 8;
        let vactive = u32::from(d[5]) | u32::from(d[7] >> 4) << 8;
        let vblank = u32::from(d[6]) | u32::from(d[7] & 0xf) << 8;
        let total = u64::from(hactive + hblank) * u64::from(vactive + vblank);
        let refresh = (u64::from(clock_khz) * 1000 + total / 2) / total.max(1);
        modes.push(Mode {
            width: hactive,
            height: vactive,
            refresh: refresh as u32,
            preferred: i == 0,
        });
    }
    for (byte, bit, width, height, refresh, _) in ESTABLISHED {
        if e[byte] & (1 << bit) != 0 {
            modes.push(Mode {
                width,
                height,
                refresh,
                preferred: false,
            });
        }
    }
    for s in e[0x26..0x36].chunks_exact(2) {
        if s == [0x01, 0x01] || s[0] == 0 {
            continue;
        }
        let width = (u32::from(s[0]) + 31) * 8;
        let height = match s[1] >> 6 {
            0 => width * 10 / 16,
            1 => width * 3 / 4,
            2 => width * 4 / 5,
            _ => width * 9 / 16,
        };
        modes.push(Mode {
            width,
            height,
            refresh: u32::from(s[1] & 0x3f) + 60,
            preferred: false,
        });
    }
    Ok(modes)
}

/// The monitor name descriptor's text, if present.
pub fn monitor_name(edid: &[u8]) -> Option<String> {
    let e = edid.get(..EDID_BLOCK)?;
    e[0x36..0x7e]
        .chunks_exact(18)
        .find(|d| d[0..3] == [0, 0, 0] && d[3] == 0xfc)
        .map(|d| {
            String::from_utf8_lossy(&d[5..18])
                .split('\n')
                .next()
                .unwrap_or_default()
                .to_string()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;

    const UUID: [u8; 16] = [
        0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8,
    ];

    #[test]
    fn every_builtin_type_has_a_valid_capped_edid() {
        let c = Catalog::builtin().unwrap();
        for ty in c.types() {
            let e = generate(ty, &UUID);
            assert_eq!(e[..8], HEADER, "{}", ty.key());
            assert_eq!(
                e.iter().fold(0u8, |a, &b| a.wrapping_add(b)),
                0,
                "checksum {}",
                ty.key()
            );
            assert_eq!((e[18], e[19]), (1, 4), "EDID 1.4");
            assert_eq!(e[24] & 1, 0, "not continuous frequency: no inferred modes");
            let modes = decode_modes(&e).unwrap();
            let first = modes[0];
            assert!(first.preferred);
            assert_eq!(
                (first.width, first.height, first.refresh),
                (
                    ty.default_resolution.width,
                    ty.default_resolution.height,
                    ty.refresh_hz()
                ),
                "{}",
                ty.key()
            );
            for m in &modes {
                assert!(
                    Resolution::new(m.width, m.height).fits_within(ty.max_resolution),
                    "{} offers {}x{} above {}",
                    ty.key(),
                    m.width,
                    m.height,
                    ty.max_resolution
                );
            }
            assert!(
                modes
                    .iter()
                    .any(|m| m.width == ty.max_resolution.width
                        && m.height == ty.max_resolution.height),
                "{} offers its max resolution",
                ty.key()
            );
            assert_eq!(
                monitor_name(&e).as_deref(),
                Some(&ty.name[..ty.name.len().min(13)])
            );
        }
    }

    #[test]
    fn serial_comes_from_uuid_and_frl_sets_refresh() {
        let c = Catalog::builtin().unwrap();
        let ty = c.resolve("EMU-256M").unwrap();
        assert_eq!(ty.frl, 45);
        let e = generate(ty, &UUID);
        assert_eq!(
            u32::from_le_bytes([e[12], e[13], e[14], e[15]]),
            0x1234_5678
        );
        assert_eq!(decode_modes(&e).unwrap()[0].refresh, 45);
        let other = generate(ty, &[0; 16]);
        assert_ne!(e, other, "serial differs per instance");
    }

    #[test]
    fn small_max_resolution_drops_larger_modes() {
        let mut c = Catalog::builtin().unwrap();
        let t =
            crate::catalog::test_support::bochs_toml("TINY", 1, "4M", "800x600", "800x600", 0, "");
        c.add_toml("tiny.toml", &t).unwrap();
        let ty = c.resolve("TINY").unwrap();
        let e = generate(ty, &UUID);
        let modes = decode_modes(&e).unwrap();
        let sizes: Vec<(u32, u32)> = modes.iter().map(|m| (m.width, m.height)).collect();
        assert_eq!(sizes, vec![(800, 600), (640, 480), (800, 600)]);
        assert_eq!(modes[0].refresh, 60, "FRL off advertises 60 Hz");
    }

    #[test]
    fn cvt_rb_matches_published_timings() {
        // VESA CVT-RB 1920x1080@60: 2080x1111, 138.50 MHz.
        let t = cvt_rb_timing(Resolution::new(1920, 1080), 60);
        assert_eq!((t.hactive + t.hblank, t.vactive + t.vblank), (2080, 1111));
        assert_eq!(t.pixel_clock_khz, 138_500);
        // 2560x1600@60 RB: 2720x1646, 268.50 MHz.
        let t = cvt_rb_timing(Resolution::new(2560, 1600), 60);
        assert_eq!((t.hactive + t.hblank, t.vactive + t.vblank), (2720, 1646));
        assert_eq!(t.pixel_clock_khz, 268_500);
    }

    #[test]
    fn decoder_rejects_bad_blocks() {
        let c = Catalog::builtin().unwrap();
        let mut e = generate(c.resolve("EMU-16M").unwrap(), &UUID);
        assert_eq!(decode_modes(&e[..100]), Err(EdidError::Short(100)));
        e[50] ^= 1;
        assert_eq!(decode_modes(&e), Err(EdidError::Checksum));
        e[0] = 1;
        assert_eq!(decode_modes(&e), Err(EdidError::Header));
    }
}

//! FramebufferUpdate building (RFC 6143 section 7.6.1 and 7.7): rectangles of a [`Frame`] in
//! the viewer's pixel format, as Raw, ZRLE or Tight (fill, palette, basic zlib; no JPEG), and
//! the pseudo-encodings DesktopSize, ExtendedDesktopSize, LastRect and Cursor.
//!
//! Zlib streams live in an [`Encoder`], one per viewer: ZRLE and Tight both keep their
//! dictionaries across rectangles for the life of the connection.

use flate2::{Compress, Compression, FlushCompress};
use vgpu_model::{Frame, PixelFormat};

use super::proto::ClientPixelFormat;

/// Encoding numbers (RFC 6143 section 7.7 and the IANA RFB registry).
pub mod number {
    /// Raw.
    pub const RAW: i32 = 0;
    /// Tight.
    pub const TIGHT: i32 = 7;
    /// ZRLE.
    pub const ZRLE: i32 = 16;
    /// Cursor pseudo-encoding.
    pub const CURSOR: i32 = -239;
    /// DesktopSize pseudo-encoding.
    pub const DESKTOP_SIZE: i32 = -223;
    /// LastRect pseudo-encoding.
    pub const LAST_RECT: i32 = -224;
    /// ExtendedDesktopSize pseudo-encoding.
    pub const EXTENDED_DESKTOP_SIZE: i32 = -308;
}

/// A rectangle in framebuffer coordinates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rect {
    /// Left.
    pub x: u16,
    /// Top.
    pub y: u16,
    /// Width.
    pub w: u16,
    /// Height.
    pub h: u16,
}

impl Rect {
    /// A rectangle.
    pub const fn new(x: u16, y: u16, w: u16, h: u16) -> Rect {
        Rect { x, y, w, h }
    }

    fn right(&self) -> u32 {
        u32::from(self.x) + u32::from(self.w)
    }

    fn bottom(&self) -> u32 {
        u32::from(self.y) + u32::from(self.h)
    }

    /// The smallest rectangle holding both (saturating at the 16-bit coordinate limit).
    pub fn union(&self, o: &Rect) -> Rect {
        if self.w == 0 || self.h == 0 {
            return *o;
        }
        if o.w == 0 || o.h == 0 {
            return *self;
        }
        let x = self.x.min(o.x);
        let y = self.y.min(o.y);
        let r = self.right().max(o.right());
        let b = self.bottom().max(o.bottom());
        Rect::new(
            x,
            y,
            (r - u32::from(x)).min(0xffff) as u16,
            (b - u32::from(y)).min(0xffff) as u16,
        )
    }

    /// The overlap, if not empty.
    pub fn intersect(&self, o: &Rect) -> Option<Rect> {
        let x = self.x.max(o.x);
        let y = self.y.max(o.y);
        let r = self.right().min(o.right());
        let b = self.bottom().min(o.bottom());
        (r > u32::from(x) && b > u32::from(y))
            .then(|| Rect::new(x, y, (r - u32::from(x)) as u16, (b - u32::from(y)) as u16))
    }
}

/// An encoding for pixel data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encoding {
    /// Raw: every pixel as is.
    #[default]
    Raw,
    /// ZRLE: 64x64 tiles in one zlib stream.
    Zrle,
    /// Tight: fill, palette or zlib per rectangle.
    Tight,
}

/// What a viewer's SetEncodings allows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncodingSet {
    /// The first pixel encoding in the viewer's list that we implement (Raw otherwise).
    pub preferred: Encoding,
    /// DesktopSize.
    pub desktop_size: bool,
    /// ExtendedDesktopSize.
    pub extended_desktop_size: bool,
    /// LastRect.
    pub last_rect: bool,
    /// Cursor.
    pub cursor: bool,
}

impl EncodingSet {
    /// From a SetEncodings list, in the viewer's order of preference.
    pub fn from_list(list: &[i32]) -> EncodingSet {
        let mut set = EncodingSet::default();
        let mut chosen = None;
        for &e in list {
            match e {
                number::RAW => {
                    chosen.get_or_insert(Encoding::Raw);
                }
                number::ZRLE => {
                    chosen.get_or_insert(Encoding::Zrle);
                }
                number::TIGHT => {
                    chosen.get_or_insert(Encoding::Tight);
                }
                number::CURSOR => set.cursor = true,
                number::DESKTOP_SIZE => set.desktop_size = true,
                number::LAST_RECT => set.last_rect = true,
                number::EXTENDED_DESKTOP_SIZE => set.extended_desktop_size = true,
                _ => {}
            }
        }
        set.preferred = chosen.unwrap_or_default();
        set
    }
}

/// A cursor image: `width * height` pixels 0xAARRGGBB, row-major, with its hot spot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// Width in pixels.
    pub width: u16,
    /// Height in pixels.
    pub height: u16,
    /// Hot spot.
    pub hot_x: u16,
    /// Hot spot.
    pub hot_y: u16,
    /// ARGB pixels (alpha >= 128 is opaque, the rest transparent).
    pub argb: Vec<u32>,
}

/// Converts a frame's pixels into one viewer's pixel values.
#[derive(Debug)]
pub struct Converter {
    lut: [[u32; 256]; 3],
    /// The same for the 5-, 6- and 5-bit channels of an RGB565 source (expanded to 8 bits as
    /// `rgb_of` does, then looked up in `lut`).
    lut565: [[u32; 64]; 3],
    /// The values are the 8-bit channels at bits 16, 8 and 0 (the server's own layout), so a
    /// 32-bit source pixel converts by moving its bytes, without the tables.
    identity: bool,
    /// The format the tables are for.
    format: ClientPixelFormat,
}

impl Converter {
    /// For a viewer format (validated: every max is 2^n - 1).
    pub fn new(dst: &ClientPixelFormat) -> Converter {
        let mut lut = [[0u32; 256]; 3];
        for (t, (max, shift)) in lut.iter_mut().zip([
            (dst.red_max, dst.red_shift),
            (dst.green_max, dst.green_shift),
            (dst.blue_max, dst.blue_shift),
        ]) {
            for (c, v) in t.iter_mut().enumerate() {
                let scaled = (c as u32 * u32::from(max) + 127) / 255;
                *v = scaled.checked_shl(u32::from(shift)).unwrap_or(0);
            }
        }
        let mut lut565 = [[0u32; 64]; 3];
        for (v, out) in lut565[0].iter_mut().enumerate().take(32) {
            *out = lut[0][(v << 3) | (v >> 2)];
        }
        for (v, out) in lut565[1].iter_mut().enumerate() {
            *out = lut[1][(v << 2) | (v >> 4)];
        }
        for (v, out) in lut565[2].iter_mut().enumerate().take(32) {
            *out = lut[2][(v << 3) | (v >> 2)];
        }
        let identity = [dst.red_max, dst.green_max, dst.blue_max] == [255; 3]
            && [dst.red_shift, dst.green_shift, dst.blue_shift] == [16, 8, 0];
        Converter {
            lut,
            lut565,
            identity,
            format: *dst,
        }
    }

    /// The value of an 8-bit RGB colour.
    pub fn rgb(&self, r: u8, g: u8, b: u8) -> u32 {
        self.lut[0][usize::from(r)] | self.lut[1][usize::from(g)] | self.lut[2][usize::from(b)]
    }

    /// Values of `rect` (clipped to the frame by the caller), row-major. A frame whose data is
    /// shorter than its geometry says reads as black where it is missing.
    pub fn rect(&self, frame: &Frame, rect: Rect) -> Vec<u32> {
        let mut out = Vec::new();
        self.rect_into(frame, rect, &mut out);
        out
    }

    /// [`rect`](Self::rect) into `out` (cleared first), reusing its allocation.
    pub fn rect_into(&self, frame: &Frame, rect: Rect, out: &mut Vec<u32>) {
        out.clear();
        out.reserve(usize::from(rect.w) * usize::from(rect.h));
        for y in rect.y..rect.y + rect.h {
            self.row_into(frame, row_bytes(frame, rect, y), usize::from(rect.w), out);
        }
    }

    /// Appends the values of one row of `frame` (`w` pixels, black when `row` is `None`).
    fn row_into(&self, frame: &Frame, row: Option<&[u8]>, w: usize, out: &mut Vec<u32>) {
        use PixelFormat as F;
        let Some(row) = row else {
            out.resize(out.len() + w, self.rgb(0, 0, 0));
            return;
        };
        // Byte positions of red, green and blue, as in `rgb_of`.
        match frame.format {
            F::Xrgb8888 | F::Argb8888 => self.row32::<2, 1, 0>(row, out),
            F::Xrgb8888BigEndian | F::Bgra8888 | F::Bgrx8888 => self.row32::<1, 2, 3>(row, out),
            F::Abgr8888 | F::Xbgr8888 => self.row32::<0, 1, 2>(row, out),
            F::Rgba8888 | F::Rgbx8888 => self.row32::<3, 2, 1>(row, out),
            F::Rgb565 => {
                let [r, g, b] = &self.lut565;
                out.extend(row.chunks_exact(2).map(|p| {
                    let v = usize::from(u16::from_le_bytes([p[0], p[1]]));
                    r[v >> 11] | g[(v >> 5) & 0x3f] | b[v & 0x1f]
                }));
            }
        }
    }

    /// One row of a 32-bit source whose red, green and blue are bytes `R`, `G` and `B`.
    fn row32<const R: usize, const G: usize, const B: usize>(
        &self,
        row: &[u8],
        out: &mut Vec<u32>,
    ) {
        let px = row.chunks_exact(4);
        if self.identity {
            out.extend(px.map(|p| u32::from_le_bytes([p[B], p[G], p[R], 0])));
        } else {
            let [lr, lg, lb] = &self.lut;
            out.extend(
                px.map(|p| lr[usize::from(p[R])] | lg[usize::from(p[G])] | lb[usize::from(p[B])]),
            );
        }
    }
}

/// The bytes of row `y` of `rect` in `frame`, or `None` where the data stops short.
fn row_bytes(frame: &Frame, rect: Rect, y: u16) -> Option<&[u8]> {
    let bpp = frame.format.bytes_per_pixel() as usize;
    let stride = frame.width as usize * bpp;
    let start = usize::from(y) * stride + usize::from(rect.x) * bpp;
    frame.data.get(start..start + usize::from(rect.w) * bpp)
}

/// 8-bit RGB of one pixel of `format` (what [`Converter`]'s tables implement).
#[cfg(test)]
fn rgb_of(format: PixelFormat, p: &[u8]) -> (u8, u8, u8) {
    let at = |[r, g, b]: [usize; 3]| (p[r], p[g], p[b]);
    match format {
        PixelFormat::Xrgb8888 | PixelFormat::Argb8888 => at([2, 1, 0]),
        PixelFormat::Xrgb8888BigEndian | PixelFormat::Bgra8888 | PixelFormat::Bgrx8888 => {
            at([1, 2, 3])
        }
        PixelFormat::Abgr8888 | PixelFormat::Xbgr8888 => at([0, 1, 2]),
        PixelFormat::Rgba8888 | PixelFormat::Rgbx8888 => at([3, 2, 1]),
        PixelFormat::Rgb565 => {
            let v = u16::from_le_bytes([p[0], p[1]]);
            let (r, g, b) = ((v >> 11) & 0x1f, (v >> 5) & 0x3f, v & 0x1f);
            (
                ((r << 3) | (r >> 2)) as u8,
                ((g << 2) | (g >> 4)) as u8,
                ((b << 3) | (b >> 2)) as u8,
            )
        }
    }
}

/// A row of the server's own XRGB8888 (or ARGB8888) straight into a viewer's Raw data when the
/// viewer asked for the server's format: a copy with the fourth byte of each pixel cleared.
fn put_xrgb_row(out: &mut Vec<u8>, row: &[u8]) {
    let at = out.len();
    out.extend_from_slice(row);
    let mut pairs = out[at..].chunks_exact_mut(8);
    for c in &mut pairs {
        let v = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        c.copy_from_slice(&(v & 0x00ff_ffff_00ff_ffff).to_le_bytes());
    }
    if let Some(x) = pairs.into_remainder().get_mut(3) {
        *x = 0;
    }
}

fn colour_mask(pf: &ClientPixelFormat) -> u32 {
    (u32::from(pf.red_max) << pf.red_shift)
        | (u32::from(pf.green_max) << pf.green_shift)
        | (u32::from(pf.blue_max) << pf.blue_shift)
}

/// How a pixel value goes on the wire: bytes `at..at + len` of its little- or big-endian
/// form, or Tight's R, G, B bytes (each channel's value shifted down to bit 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    Le { at: u8, len: u8 },
    Be { at: u8, len: u8 },
    Rgb { shifts: [u8; 3] },
}

impl Wire {
    /// PIXEL: the viewer's bytes per pixel in its byte order.
    fn pixel(pf: &ClientPixelFormat) -> Wire {
        match (pf.bits_per_pixel, pf.big_endian) {
            (32, false) => Wire::Le { at: 0, len: 4 },
            (32, true) => Wire::Be { at: 0, len: 4 },
            (16, false) => Wire::Le { at: 0, len: 2 },
            (16, true) => Wire::Be { at: 2, len: 2 },
            _ => Wire::Le { at: 0, len: 1 },
        }
    }

    /// ZRLE's CPIXEL (RFC 6143 section 7.7.6): 3 bytes when 32 bpp, depth <= 24 and the
    /// colour bits fit in the least or the most significant 3 bytes, otherwise PIXEL.
    fn cpixel(pf: &ClientPixelFormat) -> Wire {
        if pf.bits_per_pixel != 32 || pf.depth > 24 {
            return Wire::pixel(pf);
        }
        let mask = colour_mask(pf);
        match (mask & 0xff00_0000 == 0, mask & 0xff == 0, pf.big_endian) {
            (true, _, false) => Wire::Le { at: 0, len: 3 },
            (true, _, true) => Wire::Be { at: 1, len: 3 },
            (false, true, false) => Wire::Le { at: 1, len: 3 },
            (false, true, true) => Wire::Be { at: 0, len: 3 },
            (false, false, _) => Wire::pixel(pf),
        }
    }

    /// Tight's TPIXEL: R, G, B bytes when 32 bpp, depth 24 and every channel 8 bits wide,
    /// otherwise PIXEL.
    fn tpixel(pf: &ClientPixelFormat) -> Wire {
        if pf.bits_per_pixel == 32
            && pf.depth == 24
            && [pf.red_max, pf.green_max, pf.blue_max] == [255; 3]
        {
            Wire::Rgb {
                shifts: [pf.red_shift, pf.green_shift, pf.blue_shift],
            }
        } else {
            Wire::pixel(pf)
        }
    }

    fn len(self) -> usize {
        match self {
            Wire::Le { len, .. } | Wire::Be { len, .. } => usize::from(len),
            Wire::Rgb { .. } => 3,
        }
    }

    /// Appends one value.
    fn put(self, out: &mut Vec<u8>, v: u32) {
        match self {
            Wire::Le { at, len } => {
                out.extend_from_slice(&v.to_le_bytes()[usize::from(at)..usize::from(at + len)])
            }
            Wire::Be { at, len } => {
                out.extend_from_slice(&v.to_be_bytes()[usize::from(at)..usize::from(at + len)])
            }
            Wire::Rgb { shifts } => out
                .extend_from_slice(&shifts.map(|s| v.checked_shr(u32::from(s)).unwrap_or(0) as u8)),
        }
    }

    /// Appends every value of `px`: one loop per byte layout, so the layout is decided once.
    fn put_all(self, out: &mut Vec<u8>, px: &[u32]) {
        match self {
            Wire::Le { at: 0, len: 4 } => put_each(out, px, u32::to_le_bytes),
            Wire::Be { at: 0, len: 4 } => put_each(out, px, u32::to_be_bytes),
            Wire::Le { at: 0, len: 2 } => put_each(out, px, |v| (v as u16).to_le_bytes()),
            Wire::Be { at: 2, len: 2 } => put_each(out, px, |v| (v as u16).to_be_bytes()),
            Wire::Le { at: 0, len: 3 } => put_each(out, px, |v| {
                let b = v.to_le_bytes();
                [b[0], b[1], b[2]]
            }),
            Wire::Le { at: 1, len: 3 } => put_each(out, px, |v| {
                let b = v.to_le_bytes();
                [b[1], b[2], b[3]]
            }),
            Wire::Be { at: 0, len: 3 } => put_each(out, px, |v| {
                let b = v.to_be_bytes();
                [b[0], b[1], b[2]]
            }),
            Wire::Be { at: 1, len: 3 } | Wire::Rgb { shifts: [16, 8, 0] } => {
                put_each(out, px, |v| {
                    let b = v.to_be_bytes();
                    [b[1], b[2], b[3]]
                })
            }
            _ => {
                for &v in px {
                    self.put(out, v);
                }
            }
        }
    }
}

/// Appends `f` of every value of `px`.
fn put_each<const N: usize>(out: &mut Vec<u8>, px: &[u32], f: impl Fn(u32) -> [u8; N]) {
    let at = out.len();
    out.resize(at + px.len() * N, 0);
    for (d, &v) in out[at..].chunks_exact_mut(N).zip(px) {
        d.copy_from_slice(&f(v));
    }
}

/// The bytes ZRLE spends on a run length: (len - 1) as 255s and a remainder.
fn run_len_bytes(len: usize) -> usize {
    (len - 1) / 255 + 1
}

fn put_run_len(out: &mut Vec<u8>, len: usize) {
    let mut rest = len - 1;
    while rest >= 255 {
        out.push(255);
        rest -= 255;
    }
    out.push(rest as u8);
}

/// A run of equal pixels, with the colour's palette index (0 once the palette overflowed).
#[derive(Clone, Copy, Debug)]
struct Run {
    colour: u32,
    len: u32,
    index: u8,
}

/// Slots of the palette's hash table: twice the largest palette (ZRLE's 127), so probes stay
/// short.
const PALETTE_SLOTS: usize = 256;

/// What the encoders learn about a tile or rectangle in one pass: its runs of equal pixels
/// (crossing rows) and its palette in order of first appearance, found with a small
/// open-addressing table looked up once per run rather than once per pixel. Kept in the
/// [`Encoder`] so the buffers outlive a rectangle.
#[derive(Debug, Default)]
struct Scan {
    runs: Vec<Run>,
    palette: Vec<u32>,
    /// Palette index + 1 of the colour in each slot, 0 for an empty slot.
    slots: Vec<u8>,
    /// Per-pixel indices, expanded from the runs for packing.
    indices: Vec<u8>,
}

impl Scan {
    /// Finds the runs of `px` and its palette of at most `max` (< 256) colours. Returns false
    /// when there are more colours, after the palette overflowed if `stop` (the runs are then
    /// incomplete), at the end otherwise.
    fn scan(&mut self, px: &[u32], max: usize, stop: bool) -> bool {
        self.runs.clear();
        self.palette.clear();
        self.slots.clear();
        self.slots.resize(PALETTE_SLOTS, 0);
        let mut fits = true;
        let mut i = 0;
        while i < px.len() {
            let c = px[i];
            let start = i;
            i += 1;
            // Whole groups of 8 first: a console is mostly long runs.
            while let Some(group) = px.get(i..i + 8) {
                if group.iter().fold(0, |acc, &p| acc | (p ^ c)) != 0 {
                    break;
                }
                i += 8;
            }
            while px.get(i) == Some(&c) {
                i += 1;
            }
            let index = if fits {
                match self.index(c, max) {
                    Some(index) => index,
                    None if stop => return false,
                    None => {
                        fits = false;
                        0
                    }
                }
            } else {
                0
            };
            self.runs.push(Run {
                colour: c,
                len: (i - start) as u32,
                index,
            });
        }
        fits
    }

    /// The palette index of `c`, added if new; `None` when that would make more than `max`.
    fn index(&mut self, c: u32, max: usize) -> Option<u8> {
        let mut slot = (c.wrapping_mul(0x9e37_79b1) >> 24) as usize;
        loop {
            match self.slots[slot] {
                0 => {
                    if self.palette.len() >= max {
                        return None;
                    }
                    self.palette.push(c);
                    self.slots[slot] = self.palette.len() as u8;
                    return Some(self.palette.len() as u8 - 1);
                }
                s if self.palette[usize::from(s - 1)] == c => return Some(s - 1),
                _ => slot = (slot + 1) % PALETTE_SLOTS,
            }
        }
    }

    /// Palette indices of the scanned pixels (rows of `w`), packed MSB first at `bits` (1, 2
    /// or 4) per pixel, each row padded to a byte.
    fn pack(&mut self, out: &mut Vec<u8>, w: usize, bits: usize) {
        self.indices.clear();
        for r in &self.runs {
            self.indices
                .resize(self.indices.len() + r.len as usize, r.index);
        }
        let per_byte = 8 / bits;
        for row in self.indices.chunks(w.max(1)) {
            for group in row.chunks(per_byte) {
                let acc = group.iter().fold(0u8, |acc, &i| (acc << bits) | i);
                out.push(acc << ((per_byte - group.len()) * bits));
            }
        }
    }

    /// One ZRLE tile of `px` (rows of `tw`) in the smallest of the subencodings we implement:
    /// solid (1), packed palette (2-16), plain RLE (128), palette RLE (130-255) or raw (0).
    /// Runs may cross rows.
    fn zrle_tile(&mut self, out: &mut Vec<u8>, px: &[u32], tw: usize, cpix: Wire) {
        let cp = cpix.len();
        let th = px.len() / tw.max(1);
        let has_palette = self.scan(px, 127, false);
        let pal = &self.palette;
        if has_palette && pal.len() == 1 {
            out.push(1);
            cpix.put(out, pal[0]);
            return;
        }
        let raw_size = px.len() * cp;
        let plain_rle = self
            .runs
            .iter()
            .map(|r| cp + run_len_bytes(r.len as usize))
            .sum::<usize>();
        let (packed, pal_rle) = if has_palette {
            let bits = match pal.len() {
                2 => 1,
                3..=4 => 2,
                _ => 4,
            };
            let packed = (pal.len() <= 16).then(|| pal.len() * cp + th * (tw * bits).div_ceil(8));
            let rle = pal.len() * cp
                + self
                    .runs
                    .iter()
                    .map(|r| match r.len {
                        1 => 1,
                        n => 1 + run_len_bytes(n as usize),
                    })
                    .sum::<usize>();
            (packed.map(|s| (s, bits)), Some(rle))
        } else {
            (None, None)
        };
        let best = raw_size
            .min(plain_rle)
            .min(packed.map_or(usize::MAX, |p| p.0))
            .min(pal_rle.unwrap_or(usize::MAX));
        if let Some((size, bits)) = packed {
            if size == best {
                out.push(pal.len() as u8);
                for &c in pal {
                    cpix.put(out, c);
                }
                self.pack(out, tw, bits);
                return;
            }
        }
        if pal_rle == Some(best) {
            out.push(128 + pal.len() as u8);
            for &c in pal {
                cpix.put(out, c);
            }
            for r in &self.runs {
                if r.len == 1 {
                    out.push(r.index);
                } else {
                    out.push(0x80 | r.index);
                    put_run_len(out, r.len as usize);
                }
            }
            return;
        }
        if plain_rle == best {
            out.push(128);
            for r in &self.runs {
                cpix.put(out, r.colour);
                put_run_len(out, r.len as usize);
            }
            return;
        }
        out.push(0);
        cpix.put_all(out, px);
    }
}

/// The stream in `slot`, started (zlib format, fast level) on first use.
fn zlib(slot: &mut Option<Compress>) -> &mut Compress {
    slot.get_or_insert_with(|| Compress::new(Compression::fast(), true))
}

/// Runs `input` through a zlib stream with a sync flush, appending everything it produces.
fn deflate(z: &mut Compress, input: &[u8], out: &mut Vec<u8>) {
    let mut pos = 0;
    loop {
        out.reserve(input.len() - pos + 1024);
        let before = z.total_in();
        if z.compress_vec(&input[pos..], out, FlushCompress::Sync)
            .is_err()
        {
            // Not reachable with a valid stream; the viewer sees a short rectangle and drops
            // the connection rather than this process panicking.
            return;
        }
        pos += (z.total_in() - before) as usize;
        if pos == input.len() && out.len() < out.capacity() {
            return;
        }
    }
}

/// One viewer's encoder state: the zlib streams that outlive a rectangle, and buffers reused
/// from one rectangle to the next.
#[derive(Debug, Default)]
pub struct Encoder {
    /// Created on first use: a deflate state is a few hundred KiB, and a viewer uses one
    /// encoding, so most of these stay `None`.
    zrle: Option<Compress>,
    tight: [Option<Compress>; 4],
    /// Zlib input (ZRLE tiles, Tight data).
    scratch: Vec<u8>,
    /// Tight's compressed data, before its length goes out.
    compressed: Vec<u8>,
    /// Pixel values of a row, a tile or a Tight rectangle.
    pixels: Vec<u32>,
    scan: Scan,
    /// Conversion tables for the viewer's current format, rebuilt when it changes.
    conv: Option<Box<Converter>>,
}

impl Encoder {
    /// The converter for `pf`, built once per format rather than per rectangle.
    fn converter(&mut self, pf: &ClientPixelFormat) -> Box<Converter> {
        match self.conv.take() {
            Some(c) if c.format == *pf => c,
            _ => Box::new(Converter::new(pf)),
        }
    }
}

/// The widest rectangle Tight allows, and the most pixels we put in one.
const TIGHT_MAX_WIDTH: u16 = 2048;
const TIGHT_MAX_PIXELS: u32 = 65536;
/// Tight data shorter than this is sent without zlib.
const TIGHT_MIN_TO_COMPRESS: usize = 12;

/// Builds one FramebufferUpdate message in place at the end of an output buffer.
#[derive(Debug)]
pub struct UpdateWriter<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
    count: u32,
    last_rect: bool,
}

impl<'a> UpdateWriter<'a> {
    /// Starts the message. With `last_rect` the rectangle count is 0xffff and the message ends
    /// with a LastRect rectangle; otherwise the count is filled in by [`finish`](Self::finish).
    pub fn begin(out: &'a mut Vec<u8>, last_rect: bool) -> UpdateWriter<'a> {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0xff, 0xff]);
        UpdateWriter {
            out,
            start,
            count: 0,
            last_rect,
        }
    }

    fn header(&mut self, x: u16, y: u16, w: u16, h: u16, encoding: i32) {
        self.count += 1;
        for v in [x, y, w, h] {
            self.out.extend_from_slice(&v.to_be_bytes());
        }
        self.out.extend_from_slice(&encoding.to_be_bytes());
    }

    /// A DesktopSize rectangle: the framebuffer is now `w` x `h`.
    pub fn desktop_size(&mut self, w: u16, h: u16) {
        self.header(0, 0, w, h, number::DESKTOP_SIZE);
    }

    /// A server-initiated ExtendedDesktopSize rectangle with one screen covering the head.
    pub fn extended_desktop_size(&mut self, w: u16, h: u16, screen_id: u32) {
        // Reason 0 (a change on the server), status 0 (no error).
        self.extended_desktop_size_reply(w, h, screen_id, 0, 0);
    }

    /// An ExtendedDesktopSize rectangle with its reason (x: 0 server, 1 this client, 2 another
    /// client) and status (y: 0 success, 1 prohibited, ...).
    pub fn extended_desktop_size_reply(
        &mut self,
        w: u16,
        h: u16,
        screen_id: u32,
        reason: u16,
        status: u16,
    ) {
        self.header(reason, status, w, h, number::EXTENDED_DESKTOP_SIZE);
        self.out.extend_from_slice(&[1, 0, 0, 0]);
        self.out.extend_from_slice(&screen_id.to_be_bytes());
        for v in [0, 0, w, h] {
            self.out.extend_from_slice(&u16::to_be_bytes(v));
        }
        self.out.extend_from_slice(&0u32.to_be_bytes());
    }

    /// A Cursor rectangle: pixels in the viewer's format, then the opacity bitmask.
    pub fn cursor(&mut self, c: &Cursor, pf: &ClientPixelFormat) {
        let (w, h) = (usize::from(c.width), usize::from(c.height));
        let n = w * h;
        let conv = Converter::new(pf);
        let wire = Wire::pixel(pf);
        self.header(c.hot_x, c.hot_y, c.width, c.height, number::CURSOR);
        let px = |i: usize| c.argb.get(i).copied().unwrap_or(0);
        for i in 0..n {
            let p = px(i);
            wire.put(self.out, conv.rgb((p >> 16) as u8, (p >> 8) as u8, p as u8));
        }
        for y in 0..h {
            for bx in 0..w.div_ceil(8) {
                let mut m = 0u8;
                for bit in 0..8 {
                    let x = bx * 8 + bit;
                    if x < w && px(y * w + x) >> 24 >= 0x80 {
                        m |= 0x80 >> bit;
                    }
                }
                self.out.push(m);
            }
        }
    }

    /// The pixels of `rect` (clipped to the frame) in `encoding`. Tight splits it into
    /// several rectangles where its size limits require.
    pub fn rect(
        &mut self,
        enc: &mut Encoder,
        frame: &Frame,
        rect: Rect,
        encoding: Encoding,
        pf: &ClientPixelFormat,
    ) {
        let fw = frame.width.min(0xffff) as u16;
        let fh = frame.height.min(0xffff) as u16;
        let Some(rect) = rect.intersect(&Rect::new(0, 0, fw, fh)) else {
            return;
        };
        let conv = enc.converter(pf);
        match encoding {
            Encoding::Raw => self.raw(enc, &conv, frame, rect, pf),
            Encoding::Zrle => self.zrle(enc, &conv, frame, rect, pf),
            Encoding::Tight => {
                let max_h = (TIGHT_MAX_PIXELS / u32::from(rect.w.min(TIGHT_MAX_WIDTH))).max(1);
                let max_h = max_h.min(0xffff) as u16;
                let mut y = rect.y;
                while y < rect.y + rect.h {
                    let h = max_h.min(rect.y + rect.h - y);
                    let mut x = rect.x;
                    while x < rect.x + rect.w {
                        let w = TIGHT_MAX_WIDTH.min(rect.x + rect.w - x);
                        self.tight(enc, &conv, frame, Rect::new(x, y, w, h), pf);
                        x += w;
                    }
                    y += h;
                }
            }
        }
        enc.conv = Some(conv);
    }

    /// Raw (RFC 6143 section 7.7.1), a row at a time: converted into the reused pixel buffer
    /// and written in one loop for the viewer's byte layout, or copied with the padding
    /// cleared when the viewer takes the server's own format from an XRGB8888 frame.
    fn raw(
        &mut self,
        enc: &mut Encoder,
        conv: &Converter,
        frame: &Frame,
        rect: Rect,
        pf: &ClientPixelFormat,
    ) {
        self.header(rect.x, rect.y, rect.w, rect.h, number::RAW);
        let wire = Wire::pixel(pf);
        let copy = conv.identity
            && wire == (Wire::Le { at: 0, len: 4 })
            && matches!(frame.format, PixelFormat::Xrgb8888 | PixelFormat::Argb8888);
        self.out
            .reserve(usize::from(rect.w) * usize::from(rect.h) * wire.len());
        let px = &mut enc.pixels;
        for y in rect.y..rect.y + rect.h {
            match row_bytes(frame, rect, y) {
                Some(row) if copy => put_xrgb_row(self.out, row),
                row => {
                    px.clear();
                    conv.row_into(frame, row, usize::from(rect.w), px);
                    wire.put_all(self.out, px);
                }
            }
        }
    }

    /// ZRLE (RFC 6143 section 7.7.6): 64x64 tiles, each raw, solid, packed palette, plain RLE
    /// or palette RLE.
    fn zrle(
        &mut self,
        enc: &mut Encoder,
        conv: &Converter,
        frame: &Frame,
        rect: Rect,
        pf: &ClientPixelFormat,
    ) {
        self.header(rect.x, rect.y, rect.w, rect.h, number::ZRLE);
        let cpix = Wire::cpixel(pf);
        let raw = &mut enc.scratch;
        raw.clear();
        for ty in (rect.y..rect.y + rect.h).step_by(64) {
            let th = 64.min(rect.y + rect.h - ty);
            for tx in (rect.x..rect.x + rect.w).step_by(64) {
                let tw = 64.min(rect.x + rect.w - tx);
                conv.rect_into(frame, Rect::new(tx, ty, tw, th), &mut enc.pixels);
                enc.scan.zrle_tile(raw, &enc.pixels, usize::from(tw), cpix);
            }
        }
        let at = self.out.len();
        self.out.extend_from_slice(&[0; 4]);
        deflate(zlib(&mut enc.zrle), raw, self.out);
        let len = (self.out.len() - at - 4) as u32;
        self.out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// One Tight rectangle (at most 2048 wide): fill, palette (2 to 16 colours) or basic copy.
    fn tight(
        &mut self,
        enc: &mut Encoder,
        conv: &Converter,
        frame: &Frame,
        rect: Rect,
        pf: &ClientPixelFormat,
    ) {
        self.header(rect.x, rect.y, rect.w, rect.h, number::TIGHT);
        let tpix = Wire::tpixel(pf);
        let px = &mut enc.pixels;
        conv.rect_into(frame, rect, px);
        let data = &mut enc.scratch;
        data.clear();
        let scan = &mut enc.scan;
        let stream = if scan.scan(px, 16, true) {
            let pal = &scan.palette;
            if pal.len() == 1 {
                self.out.push(0x80);
                tpix.put(self.out, pal[0]);
                return;
            }
            // Basic compression, explicit filter: palette.
            let stream = if pal.len() == 2 { 1 } else { 2 };
            self.out.push(0x40 | (stream << 4));
            self.out.push(1);
            self.out.push((pal.len() - 1) as u8);
            for &c in pal {
                tpix.put(self.out, c);
            }
            if pal.len() == 2 {
                scan.pack(data, usize::from(rect.w), 1);
            } else {
                for r in &scan.runs {
                    data.resize(data.len() + r.len as usize, r.index);
                }
            }
            stream
        } else {
            // Basic compression, copy filter (implicit), stream 0.
            self.out.push(0x00);
            tpix.put_all(data, px);
            0
        };
        if data.len() < TIGHT_MIN_TO_COMPRESS {
            self.out.extend_from_slice(data);
        } else {
            let z = &mut enc.compressed;
            z.clear();
            deflate(zlib(&mut enc.tight[usize::from(stream)]), data, z);
            put_compact_len(self.out, z.len());
            self.out.extend_from_slice(z);
        }
    }

    /// Ends the message: a LastRect, or the rectangle count patched in.
    pub fn finish(mut self) {
        if self.last_rect {
            self.header(0, 0, 0, 0, number::LAST_RECT);
        } else {
            let n = self.count.min(0xffff) as u16;
            self.out[self.start + 2..self.start + 4].copy_from_slice(&n.to_be_bytes());
        }
    }
}

/// Tight's compact length: 7 bits per byte, low first, at most 3 bytes (22 bits).
fn put_compact_len(out: &mut Vec<u8>, len: usize) {
    let len = len.min((1 << 22) - 1);
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x4000 {
        out.extend_from_slice(&[(len as u8 & 0x7f) | 0x80, (len >> 7) as u8]);
    } else {
        out.extend_from_slice(&[
            (len as u8 & 0x7f) | 0x80,
            ((len >> 7) as u8 & 0x7f) | 0x80,
            (len >> 14) as u8,
        ]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn formats() -> Vec<ClientPixelFormat> {
        let pf = |bpp, depth, big_endian, max: [u16; 3], shift: [u8; 3]| ClientPixelFormat {
            bits_per_pixel: bpp,
            depth,
            big_endian,
            true_colour: true,
            red_max: max[0],
            green_max: max[1],
            blue_max: max[2],
            red_shift: shift[0],
            green_shift: shift[1],
            blue_shift: shift[2],
        };
        vec![
            ClientPixelFormat::SERVER,
            pf(32, 24, true, [255; 3], [16, 8, 0]),
            pf(32, 24, false, [255; 3], [0, 8, 16]),
            pf(32, 30, false, [1023; 3], [20, 10, 0]),
            pf(16, 16, false, [31, 63, 31], [11, 5, 0]),
            pf(16, 12, true, [15, 15, 15], [0, 4, 8]),
        ]
    }

    const SOURCES: [PixelFormat; 10] = [
        PixelFormat::Xrgb8888,
        PixelFormat::Xrgb8888BigEndian,
        PixelFormat::Rgb565,
        PixelFormat::Argb8888,
        PixelFormat::Bgra8888,
        PixelFormat::Bgrx8888,
        PixelFormat::Abgr8888,
        PixelFormat::Xbgr8888,
        PixelFormat::Rgba8888,
        PixelFormat::Rgbx8888,
    ];

    /// A `w` x `h` frame of `format` whose bytes are a hash of their position: every 565 value
    /// at 256x256, and every padding byte set.
    fn frame(w: u32, h: u32, format: PixelFormat) -> Frame {
        let n = (w * h * format.bytes_per_pixel()) as usize;
        let data = (0..n)
            .map(|i| {
                if format == PixelFormat::Rgb565 {
                    ((i / 2) >> (8 * (i % 2))) as u8
                } else {
                    ((i as u32).wrapping_mul(0x9e37_79b1) >> 13) as u8
                }
            })
            .collect();
        Frame {
            width: w,
            height: h,
            format,
            data,
        }
    }

    /// The tables (and the byte moves that replace them for the server's layout) give what
    /// looking up each pixel's 8-bit RGB gives, for every source format, all 65536 RGB565
    /// values included.
    #[test]
    fn conversion_matches_per_pixel_rgb() {
        for pf in formats() {
            let conv = Converter::new(&pf);
            for format in SOURCES {
                let f = frame(256, 256, format);
                let bpp = format.bytes_per_pixel() as usize;
                let want: Vec<u32> = f
                    .data
                    .chunks_exact(bpp)
                    .map(|p| {
                        let (r, g, b) = rgb_of(format, p);
                        conv.rgb(r, g, b)
                    })
                    .collect();
                let got = conv.rect(&f, Rect::new(0, 0, 256, 256));
                assert!(got == want, "{} to {pf:?}", format.as_str());
            }
        }
    }

    /// Raw in the server's format from XRGB8888 or ARGB8888 (the copy with the padding
    /// cleared) writes what converting each pixel and writing it does: odd widths and
    /// heights, rectangles away from the origin, rows missing from a short frame.
    #[test]
    fn raw_copy_matches_conversion() {
        let pf = ClientPixelFormat::SERVER;
        let conv = Converter::new(&pf);
        for format in [PixelFormat::Xrgb8888, PixelFormat::Argb8888] {
            for (w, h) in [(1, 1), (2, 3), (37, 13), (64, 65), (131, 7)] {
                let mut f = frame(w, h, format);
                let whole = Rect::new(0, 0, w as u16, h as u16);
                for short in [false, true] {
                    if short {
                        f.data.truncate(f.data.len() / 3 + 5);
                    }
                    let rects = [
                        whole,
                        Rect::new(1, 1, w as u16, h as u16),
                        Rect::new(w as u16 / 2, h as u16 / 3, 3, 5),
                    ];
                    for r in rects {
                        let Some(r) = r.intersect(&whole) else {
                            continue;
                        };
                        let mut got = Vec::new();
                        let mut wr = UpdateWriter::begin(&mut got, false);
                        wr.rect(&mut Encoder::default(), &f, r, Encoding::Raw, &pf);
                        wr.finish();
                        let mut want = Vec::new();
                        for v in conv.rect(&f, r) {
                            want.extend_from_slice(&v.to_le_bytes());
                        }
                        assert!(got[16..] == want[..], "{w}x{h} {r:?} short {short}");
                    }
                }
            }
        }
    }

    /// Every layout's loop writes what writing one value at a time does.
    #[test]
    fn bulk_pixel_writes_match_single_ones() {
        let px: Vec<u32> = (0..99u32).map(|i| i.wrapping_mul(0x9e37_79b1)).collect();
        let mut wires = vec![Wire::Rgb {
            shifts: [3, 11, 20],
        }];
        for at in 0..4 {
            for len in 1..=4 - at {
                wires.push(Wire::Le { at, len });
                wires.push(Wire::Be { at, len });
            }
        }
        wires.push(Wire::Rgb { shifts: [16, 8, 0] });
        for wire in wires {
            let mut one = Vec::new();
            for &v in &px {
                wire.put(&mut one, v);
            }
            let mut all = vec![7];
            wire.put_all(&mut all, &px);
            assert_eq!(all[1..], one[..], "{wire:?}");
            assert_eq!(one.len(), px.len() * wire.len());
        }
    }

    /// Runs, palette order and packing against the obvious per-pixel definitions.
    #[test]
    fn scan_finds_runs_and_palette() {
        let mut scan = Scan::default();
        for (k, run, n, w) in [
            (1, 1, 1, 1),
            (2, 3, 77, 9),
            (4, 1, 64, 8),
            (16, 10, 4096, 64),
        ] {
            let px: Vec<u32> = (0..n).map(|i| ((i / run) % k) * 0x01_0203).collect();
            let mut pal = Vec::new();
            for &p in &px {
                if !pal.contains(&p) {
                    pal.push(p);
                }
            }
            assert!(scan.scan(&px, 16, true));
            assert_eq!(scan.palette, pal);
            let expanded: Vec<u32> = scan
                .runs
                .iter()
                .flat_map(|r| std::iter::repeat_n(r.colour, r.len as usize))
                .collect();
            assert_eq!(expanded, px);
            assert!(scan.runs.windows(2).all(|r| r[0].colour != r[1].colour));
            for r in &scan.runs {
                assert_eq!(pal[usize::from(r.index)], r.colour);
            }
            for bits in [1, 2, 4] {
                if k > 1 << bits {
                    continue;
                }
                let mut want = Vec::new();
                for row in px.chunks(w) {
                    let mut acc = 0u8;
                    let mut got = 0;
                    for p in row {
                        let i = pal.iter().position(|c| c == p).unwrap() as u8;
                        acc = (acc << bits) | i;
                        got += bits;
                        if got == 8 {
                            want.push(acc);
                            (acc, got) = (0, 0);
                        }
                    }
                    if got > 0 {
                        want.push(acc << (8 - got));
                    }
                }
                let mut packed = Vec::new();
                scan.pack(&mut packed, w, bits);
                assert_eq!(packed, want, "{k} colours at {bits} bits");
            }
            // One colour more than allowed: no palette.
            assert!(!scan.scan(&px, k as usize - 1, true));
        }
    }
}

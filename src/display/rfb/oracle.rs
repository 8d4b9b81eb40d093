//! The encoders as first written: plain loops over a freshly converted `Vec<u32>`, a linear
//! palette search per pixel, a call per output pixel. Slow, but short enough to check by eye
//! against RFC 6143 and the Tight description, so the tests hold the optimised encoders of
//! [`super::encode`] to the same bytes, rectangle for rectangle, zlib streams included.

use flate2::{Compress, Compression, FlushCompress};
use vgpu_model::{Frame, PixelFormat};

use super::encode::{number, Encoding, Rect};
use super::proto::ClientPixelFormat;

/// Converts a frame's pixels into one viewer's pixel values.
#[derive(Debug)]
struct Converter {
    lut: [[u32; 256]; 3],
}

impl Converter {
    /// For a viewer format (validated: every max is 2^n - 1).
    fn new(dst: &ClientPixelFormat) -> Converter {
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
        Converter { lut }
    }

    /// The value of an 8-bit RGB colour.
    fn rgb(&self, r: u8, g: u8, b: u8) -> u32 {
        self.lut[0][usize::from(r)] | self.lut[1][usize::from(g)] | self.lut[2][usize::from(b)]
    }

    /// Values of `rect` (clipped to the frame by the caller), row-major. A frame whose data is
    /// shorter than its geometry says reads as black where it is missing.
    fn rect(&self, frame: &Frame, rect: Rect) -> Vec<u32> {
        let bpp = frame.format.bytes_per_pixel() as usize;
        let stride = frame.width as usize * bpp;
        let mut out = Vec::with_capacity(usize::from(rect.w) * usize::from(rect.h));
        for y in rect.y..rect.y + rect.h {
            let start = usize::from(y) * stride + usize::from(rect.x) * bpp;
            let len = usize::from(rect.w) * bpp;
            match frame.data.get(start..start + len) {
                Some(row) => {
                    for p in row.chunks_exact(bpp) {
                        let (r, g, b) = rgb_of(frame.format, p);
                        out.push(self.rgb(r, g, b));
                    }
                }
                None => out.extend(std::iter::repeat_n(self.rgb(0, 0, 0), usize::from(rect.w))),
            }
        }
        out
    }
}

/// 8-bit RGB of one pixel of `format`.
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

/// Appends a pixel value as the viewer's PIXEL (bpp and byte order).
fn put_pixel(out: &mut Vec<u8>, v: u32, pf: &ClientPixelFormat) {
    match (pf.bits_per_pixel, pf.big_endian) {
        (32, false) => out.extend_from_slice(&v.to_le_bytes()),
        (32, true) => out.extend_from_slice(&v.to_be_bytes()),
        (16, false) => out.extend_from_slice(&(v as u16).to_le_bytes()),
        (16, true) => out.extend_from_slice(&(v as u16).to_be_bytes()),
        _ => out.push(v as u8),
    }
}

fn colour_mask(pf: &ClientPixelFormat) -> u32 {
    (u32::from(pf.red_max) << pf.red_shift)
        | (u32::from(pf.green_max) << pf.green_shift)
        | (u32::from(pf.blue_max) << pf.blue_shift)
}

/// ZRLE's CPIXEL (RFC 6143 section 7.7.6): 3 bytes when 32 bpp, depth <= 24 and the colour
/// bits fit in the least or the most significant 3 bytes.
#[derive(Clone, Copy)]
enum CPixel {
    Full,
    Low3,
    High3,
}

impl CPixel {
    fn of(pf: &ClientPixelFormat) -> CPixel {
        if pf.bits_per_pixel != 32 || pf.depth > 24 {
            return CPixel::Full;
        }
        let mask = colour_mask(pf);
        if mask & 0xff00_0000 == 0 {
            CPixel::Low3
        } else if mask & 0xff == 0 {
            CPixel::High3
        } else {
            CPixel::Full
        }
    }

    fn put(self, out: &mut Vec<u8>, v: u32, pf: &ClientPixelFormat) {
        match (self, pf.big_endian) {
            (CPixel::Full, _) => put_pixel(out, v, pf),
            (CPixel::Low3, false) => out.extend_from_slice(&v.to_le_bytes()[..3]),
            (CPixel::Low3, true) => out.extend_from_slice(&v.to_be_bytes()[1..]),
            (CPixel::High3, false) => out.extend_from_slice(&v.to_le_bytes()[1..]),
            (CPixel::High3, true) => out.extend_from_slice(&v.to_be_bytes()[..3]),
        }
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

/// One ZRLE tile in the smallest of the subencodings we implement: solid (1), packed palette
/// (2-16), plain RLE (128), palette RLE (130-255) or raw (0). Runs may cross rows.
fn zrle_tile(out: &mut Vec<u8>, px: &[u32], tw: usize, cpix: CPixel, pf: &ClientPixelFormat) {
    let cp = match cpix {
        CPixel::Full => pf.bytes_per_pixel(),
        _ => 3,
    };
    let th = px.len() / tw.max(1);
    let pal = palette(px, 127);
    if let Some(pal) = pal.as_ref().filter(|p| p.len() == 1) {
        out.push(1);
        cpix.put(out, pal[0], pf);
        return;
    }
    let mut runs: Vec<(u32, usize)> = Vec::new();
    for &p in px {
        match runs.last_mut() {
            Some((c, n)) if *c == p => *n += 1,
            _ => runs.push((p, 1)),
        }
    }
    let raw_size = px.len() * cp;
    let plain_rle = runs
        .iter()
        .map(|&(_, n)| cp + run_len_bytes(n))
        .sum::<usize>();
    let (packed, pal_rle) = match &pal {
        Some(pal) => {
            let bits = match pal.len() {
                2 => 1,
                3..=4 => 2,
                _ => 4,
            };
            let packed = (pal.len() <= 16).then(|| pal.len() * cp + th * (tw * bits).div_ceil(8));
            let rle = pal.len() * cp
                + runs
                    .iter()
                    .map(|&(_, n)| if n == 1 { 1 } else { 1 + run_len_bytes(n) })
                    .sum::<usize>();
            (packed.map(|s| (s, bits)), Some(rle))
        }
        None => (None, None),
    };
    let best = raw_size
        .min(plain_rle)
        .min(packed.map_or(usize::MAX, |p| p.0))
        .min(pal_rle.unwrap_or(usize::MAX));
    let index = |pal: &[u32], c: u32| pal.iter().position(|&x| x == c).unwrap_or(0) as u8;
    if let (Some((size, bits)), Some(pal)) = (packed, &pal) {
        if size == best {
            out.push(pal.len() as u8);
            for &c in pal {
                cpix.put(out, c, pf);
            }
            pack_indices(out, px, tw, pal, bits);
            return;
        }
    }
    if let (Some(size), Some(pal)) = (pal_rle, &pal) {
        if size == best {
            out.push(128 + pal.len() as u8);
            for &c in pal {
                cpix.put(out, c, pf);
            }
            for &(c, n) in &runs {
                if n == 1 {
                    out.push(index(pal, c));
                } else {
                    out.push(0x80 | index(pal, c));
                    put_run_len(out, n);
                }
            }
            return;
        }
    }
    if plain_rle == best {
        out.push(128);
        for &(c, n) in &runs {
            cpix.put(out, c, pf);
            put_run_len(out, n);
        }
        return;
    }
    out.push(0);
    for &v in px {
        cpix.put(out, v, pf);
    }
}

/// Tight's TPIXEL: R, G, B bytes when 32 bpp, depth 24 and every channel 8 bits wide.
fn put_tpixel(out: &mut Vec<u8>, v: u32, pf: &ClientPixelFormat) {
    if pf.bits_per_pixel == 32
        && pf.depth == 24
        && pf.red_max == 255
        && pf.green_max == 255
        && pf.blue_max == 255
    {
        out.extend_from_slice(&[
            (v >> pf.red_shift) as u8,
            (v >> pf.green_shift) as u8,
            (v >> pf.blue_shift) as u8,
        ]);
    } else {
        put_pixel(out, v, pf);
    }
}

/// Up to `max` distinct values of `px`, in order of first appearance; `None` past `max`.
fn palette(px: &[u32], max: usize) -> Option<Vec<u32>> {
    let mut pal: Vec<u32> = Vec::with_capacity(max);
    for &p in px {
        if !pal.contains(&p) {
            if pal.len() == max {
                return None;
            }
            pal.push(p);
        }
    }
    Some(pal)
}

/// Indices into `pal`, packed MSB first at `bits` per pixel, each row padded to a byte.
fn pack_indices(out: &mut Vec<u8>, px: &[u32], w: usize, pal: &[u32], bits: usize) {
    for row in px.chunks(w.max(1)) {
        let mut acc = 0u8;
        let mut n = 0;
        for p in row {
            let i = pal.iter().position(|c| c == p).unwrap_or(0) as u8;
            acc = (acc << bits) | i;
            n += bits;
            if n == 8 {
                out.push(acc);
                acc = 0;
                n = 0;
            }
        }
        if n > 0 {
            out.push(acc << (8 - n));
        }
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

const TIGHT_MAX_WIDTH: u16 = 2048;
const TIGHT_MAX_PIXELS: u32 = 65536;
const TIGHT_MIN_TO_COMPRESS: usize = 12;

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

fn header(out: &mut Vec<u8>, r: Rect, encoding: i32) {
    for v in [r.x, r.y, r.w, r.h] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&encoding.to_be_bytes());
}

/// One viewer's zlib streams, as the optimised encoder keeps them.
#[derive(Default)]
pub struct Oracle {
    zrle: Option<Compress>,
    tight: [Option<Compress>; 4],
}

impl Oracle {
    /// The rectangles `UpdateWriter::rect` writes for `rect` (headers included); returns how
    /// many.
    pub fn rect(
        &mut self,
        out: &mut Vec<u8>,
        frame: &Frame,
        rect: Rect,
        encoding: Encoding,
        pf: &ClientPixelFormat,
    ) -> u32 {
        let fw = frame.width.min(0xffff) as u16;
        let fh = frame.height.min(0xffff) as u16;
        let Some(rect) = rect.intersect(&Rect::new(0, 0, fw, fh)) else {
            return 0;
        };
        let conv = Converter::new(pf);
        match encoding {
            Encoding::Raw => {
                header(out, rect, number::RAW);
                for v in conv.rect(frame, rect) {
                    put_pixel(out, v, pf);
                }
                1
            }
            Encoding::Zrle => {
                header(out, rect, number::ZRLE);
                let cpix = CPixel::of(pf);
                let mut raw = Vec::new();
                for ty in (rect.y..rect.y + rect.h).step_by(64) {
                    let th = 64.min(rect.y + rect.h - ty);
                    for tx in (rect.x..rect.x + rect.w).step_by(64) {
                        let tw = 64.min(rect.x + rect.w - tx);
                        let px = conv.rect(frame, Rect::new(tx, ty, tw, th));
                        zrle_tile(&mut raw, &px, usize::from(tw), cpix, pf);
                    }
                }
                let mut z = Vec::new();
                deflate(zlib(&mut self.zrle), &raw, &mut z);
                out.extend_from_slice(&(z.len() as u32).to_be_bytes());
                out.extend_from_slice(&z);
                1
            }
            Encoding::Tight => {
                let max_h = (TIGHT_MAX_PIXELS / u32::from(rect.w.min(TIGHT_MAX_WIDTH))).max(1);
                let max_h = max_h.min(0xffff) as u16;
                let mut n = 0;
                let mut y = rect.y;
                while y < rect.y + rect.h {
                    let h = max_h.min(rect.y + rect.h - y);
                    let mut x = rect.x;
                    while x < rect.x + rect.w {
                        let w = TIGHT_MAX_WIDTH.min(rect.x + rect.w - x);
                        self.tight(out, &conv, frame, Rect::new(x, y, w, h), pf);
                        n += 1;
                        x += w;
                    }
                    y += h;
                }
                n
            }
        }
    }

    fn tight(
        &mut self,
        out: &mut Vec<u8>,
        conv: &Converter,
        frame: &Frame,
        rect: Rect,
        pf: &ClientPixelFormat,
    ) {
        header(out, rect, number::TIGHT);
        let px = conv.rect(frame, rect);
        let mut data = Vec::new();
        let stream = match palette(&px, 16) {
            Some(pal) if pal.len() == 1 => {
                out.push(0x80);
                put_tpixel(out, pal[0], pf);
                return;
            }
            Some(pal) => {
                let stream = if pal.len() == 2 { 1 } else { 2 };
                out.push(0x40 | (stream << 4));
                out.push(1);
                out.push((pal.len() - 1) as u8);
                for &c in &pal {
                    put_tpixel(out, c, pf);
                }
                if pal.len() == 2 {
                    pack_indices(&mut data, &px, usize::from(rect.w), &pal, 1);
                } else {
                    data.extend(
                        px.iter()
                            .map(|p| pal.iter().position(|c| c == p).unwrap_or(0) as u8),
                    );
                }
                stream
            }
            None => {
                out.push(0x00);
                for &v in &px {
                    put_tpixel(&mut data, v, pf);
                }
                0
            }
        };
        if data.len() < TIGHT_MIN_TO_COMPRESS {
            out.extend_from_slice(&data);
        } else {
            let mut z = Vec::new();
            deflate(zlib(&mut self.tight[usize::from(stream)]), &data, &mut z);
            put_compact_len(out, z.len());
            out.extend_from_slice(&z);
        }
    }
}

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
        Converter { lut, format: *dst }
    }

    /// The value of an 8-bit RGB colour.
    pub fn rgb(&self, r: u8, g: u8, b: u8) -> u32 {
        self.lut[0][usize::from(r)] | self.lut[1][usize::from(g)] | self.lut[2][usize::from(b)]
    }

    /// Values of `rect` (clipped to the frame by the caller), row-major. A frame whose data is
    /// shorter than its geometry says reads as black where it is missing.
    pub fn rect(&self, frame: &Frame, rect: Rect) -> Vec<u32> {
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

/// One viewer's encoder state: the zlib streams that outlive a rectangle.
#[derive(Debug, Default)]
pub struct Encoder {
    /// Created on first use: a deflate state is a few hundred KiB, and a viewer uses one
    /// encoding, so most of these stay `None`.
    zrle: Option<Compress>,
    tight: [Option<Compress>; 4],
    scratch: Vec<u8>,
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
        self.header(c.hot_x, c.hot_y, c.width, c.height, number::CURSOR);
        let px = |i: usize| c.argb.get(i).copied().unwrap_or(0);
        for i in 0..n {
            let p = px(i);
            put_pixel(
                self.out,
                conv.rgb((p >> 16) as u8, (p >> 8) as u8, p as u8),
                pf,
            );
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
            Encoding::Raw => {
                self.header(rect.x, rect.y, rect.w, rect.h, number::RAW);
                let px = conv.rect(frame, rect);
                self.out.reserve(px.len() * pf.bytes_per_pixel());
                for v in px {
                    put_pixel(self.out, v, pf);
                }
            }
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

    /// ZRLE (RFC 6143 section 7.7.6): 64x64 tiles, each raw, solid or packed palette.
    fn zrle(
        &mut self,
        enc: &mut Encoder,
        conv: &Converter,
        frame: &Frame,
        rect: Rect,
        pf: &ClientPixelFormat,
    ) {
        self.header(rect.x, rect.y, rect.w, rect.h, number::ZRLE);
        let cpix = CPixel::of(pf);
        let mut raw = std::mem::take(&mut enc.scratch);
        raw.clear();
        for ty in (rect.y..rect.y + rect.h).step_by(64) {
            let th = 64.min(rect.y + rect.h - ty);
            for tx in (rect.x..rect.x + rect.w).step_by(64) {
                let tw = 64.min(rect.x + rect.w - tx);
                let px = conv.rect(frame, Rect::new(tx, ty, tw, th));
                zrle_tile(&mut raw, &px, usize::from(tw), cpix, pf);
            }
        }
        let at = self.out.len();
        self.out.extend_from_slice(&[0; 4]);
        deflate(zlib(&mut enc.zrle), &raw, self.out);
        let len = (self.out.len() - at - 4) as u32;
        self.out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        enc.scratch = raw;
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
        let px = conv.rect(frame, rect);
        let mut data = std::mem::take(&mut enc.scratch);
        data.clear();
        let stream = match palette(&px, 16) {
            Some(pal) if pal.len() == 1 => {
                self.out.push(0x80);
                put_tpixel(self.out, pal[0], pf);
                enc.scratch = data;
                return;
            }
            Some(pal) => {
                // Basic compression, explicit filter: palette.
                let stream = if pal.len() == 2 { 1 } else { 2 };
                self.out.push(0x40 | (stream << 4));
                self.out.push(1);
                self.out.push((pal.len() - 1) as u8);
                for &c in &pal {
                    put_tpixel(self.out, c, pf);
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
                // Basic compression, copy filter (implicit), stream 0.
                self.out.push(0x00);
                for &v in &px {
                    put_tpixel(&mut data, v, pf);
                }
                0
            }
        };
        if data.len() < TIGHT_MIN_TO_COMPRESS {
            self.out.extend_from_slice(&data);
        } else {
            let mut z = Vec::new();
            deflate(zlib(&mut enc.tight[usize::from(stream)]), &data, &mut z);
            put_compact_len(self.out, z.len());
            self.out.extend_from_slice(&z);
        }
        enc.scratch = data;
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

//! A reference RFB client-side decoder for tests, written from RFC 6143 and the Tight
//! description alone and sharing no code with the encoders: it rebuilds the viewer's
//! framebuffer (pixel values in the viewer's format) from FramebufferUpdate messages.
//! It panics on anything malformed; that is the assertion.

use flate2::{Decompress, FlushDecompress};

use super::proto::ClientPixelFormat;

/// A cursor as decoded: (hot x, hot y, width, height, pixels, mask).
pub type DecodedCursor = (u16, u16, usize, usize, Vec<u32>, Vec<u8>);

pub struct RefDecoder {
    pub pf: ClientPixelFormat,
    pub width: usize,
    pub height: usize,
    /// Pixel values, row-major.
    pub fb: Vec<u32>,
    /// The last cursor: (hot x, hot y, w, h, pixels, mask).
    pub cursor: Option<DecodedCursor>,
    /// Screens of the last ExtendedDesktopSize: (id, x, y, w, h).
    pub screens: Vec<(u32, u16, u16, u16, u16)>,
    /// ZRLE subencodings seen.
    pub zrle_subencodings: std::collections::BTreeSet<u8>,
    /// Encodings of the rectangles seen, in order.
    pub seen: Vec<i32>,
    zrle: Decompress,
    tight: [Decompress; 4],
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        s
    }
    fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }
    fn u16(&mut self) -> u16 {
        let s = self.take(2);
        (u16::from(s[0]) << 8) | u16::from(s[1])
    }
    fn u32(&mut self) -> u32 {
        let s = self.take(4);
        s.iter().fold(0, |a, &x| (a << 8) | u32::from(x))
    }
}

fn inflate(z: &mut Decompress, input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() * 4 + 64);
    let mut pos = 0;
    loop {
        let before = z.total_in();
        z.decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync)
            .expect("zlib data");
        pos += (z.total_in() - before) as usize;
        if pos == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

impl RefDecoder {
    pub fn new(pf: ClientPixelFormat, width: usize, height: usize) -> RefDecoder {
        RefDecoder {
            pf,
            width,
            height,
            fb: vec![0; width * height],
            cursor: None,
            screens: Vec::new(),
            seen: Vec::new(),
            zrle_subencodings: Default::default(),
            zrle: Decompress::new(true),
            tight: [
                Decompress::new(true),
                Decompress::new(true),
                Decompress::new(true),
                Decompress::new(true),
            ],
        }
    }

    fn pixel(&self, s: &[u8]) -> u32 {
        let bytes: Vec<u32> = s.iter().map(|&b| u32::from(b)).collect();
        if self.pf.big_endian {
            bytes.iter().fold(0, |a, &b| (a << 8) | b)
        } else {
            bytes.iter().rev().fold(0, |a, &b| (a << 8) | b)
        }
    }

    fn read_pixel(&self, r: &mut Reader) -> u32 {
        let s = r.take(usize::from(self.pf.bits_per_pixel / 8));
        self.pixel(s)
    }

    /// ZRLE CPIXEL: which 3 bytes, if any.
    fn read_cpixel(&self, r: &mut Reader) -> u32 {
        let pf = &self.pf;
        let mask = (u32::from(pf.red_max) << pf.red_shift)
            | (u32::from(pf.green_max) << pf.green_shift)
            | (u32::from(pf.blue_max) << pf.blue_shift);
        if pf.bits_per_pixel == 32 && pf.depth <= 24 {
            let fits_low = mask <= 0x00ff_ffff;
            let fits_high = mask.trailing_zeros() >= 8;
            if fits_low || fits_high {
                let s = r.take(3);
                // The three bytes as they sit in the pixel, then the missing one added.
                let mut four = [0u8; 4];
                match (fits_low, pf.big_endian) {
                    (true, false) => four[..3].copy_from_slice(s),
                    (true, true) => four[1..].copy_from_slice(s),
                    (false, false) => four[1..].copy_from_slice(s),
                    (false, true) => four[..3].copy_from_slice(s),
                }
                return self.pixel(&four);
            }
        }
        self.read_pixel(r)
    }

    fn read_tpixel(&self, r: &mut Reader) -> u32 {
        let pf = &self.pf;
        if pf.bits_per_pixel == 32
            && pf.depth == 24
            && (pf.red_max, pf.green_max, pf.blue_max) == (255, 255, 255)
        {
            let s = r.take(3);
            (u32::from(s[0]) << pf.red_shift)
                | (u32::from(s[1]) << pf.green_shift)
                | (u32::from(s[2]) << pf.blue_shift)
        } else {
            self.read_pixel(r)
        }
    }

    fn put(&mut self, x: usize, y: usize, v: u32) {
        assert!(x < self.width && y < self.height, "pixel {x},{y} outside");
        self.fb[y * self.width + x] = v;
    }

    fn resize(&mut self, w: usize, h: usize) {
        self.width = w;
        self.height = h;
        self.fb = vec![0; w * h];
    }

    /// Decodes one FramebufferUpdate at the start of `b`; returns the bytes it used.
    pub fn update(&mut self, b: &[u8]) -> usize {
        let mut r = Reader { b, at: 0 };
        assert_eq!(r.u8(), 0, "message type");
        r.u8();
        let count = r.u16();
        let mut n = 0u32;
        while count == 0xffff || n < u32::from(count) {
            n += 1;
            let (x, y, w, h) = (
                usize::from(r.u16()),
                usize::from(r.u16()),
                usize::from(r.u16()),
                usize::from(r.u16()),
            );
            let enc = r.u32() as i32;
            self.seen.push(enc);
            match enc {
                0 => {
                    for j in 0..h {
                        for i in 0..w {
                            let v = self.read_pixel(&mut r);
                            self.put(x + i, y + j, v);
                        }
                    }
                }
                16 => {
                    let len = r.u32() as usize;
                    let data = inflate(&mut self.zrle, r.take(len));
                    let used = self.zrle_tiles(&data, x, y, w, h);
                    assert_eq!(used, data.len(), "ZRLE data left over");
                }
                7 => self.tight(&mut r, x, y, w, h),
                -223 => self.resize(w, h),
                -308 => {
                    let screens = r.u8();
                    r.take(3);
                    self.screens.clear();
                    for _ in 0..screens {
                        let s = (r.u32(), r.u16(), r.u16(), r.u16(), r.u16());
                        r.u32();
                        self.screens.push(s);
                    }
                    self.resize(w, h);
                }
                -224 => break,
                -239 => {
                    let px = (0..w * h).map(|_| self.read_pixel(&mut r)).collect();
                    let mask = r.take(w.div_ceil(8) * h).to_vec();
                    self.cursor = Some((x as u16, y as u16, w, h, px, mask));
                }
                e => panic!("unexpected encoding {e}"),
            }
        }
        r.at
    }

    fn zrle_tiles(&mut self, data: &[u8], x0: usize, y0: usize, w: usize, h: usize) -> usize {
        let mut r = Reader { b: data, at: 0 };
        for ty in (0..h).step_by(64) {
            for tx in (0..w).step_by(64) {
                let (tw, th) = (64.min(w - tx), 64.min(h - ty));
                let mut tile = Vec::with_capacity(tw * th);
                let sub = r.u8();
                self.zrle_subencodings.insert(sub);
                match sub {
                    0 => {
                        for _ in 0..tw * th {
                            tile.push(self.read_cpixel(&mut r));
                        }
                    }
                    1 => {
                        let c = self.read_cpixel(&mut r);
                        tile.resize(tw * th, c);
                    }
                    2..=16 => {
                        let pal: Vec<u32> = (0..sub).map(|_| self.read_cpixel(&mut r)).collect();
                        let bits = if sub == 2 {
                            1
                        } else if sub <= 4 {
                            2
                        } else {
                            4
                        };
                        for _ in 0..th {
                            let row = r.take((tw * bits).div_ceil(8));
                            for i in 0..tw {
                                let bit = i * bits;
                                let idx =
                                    (row[bit / 8] >> (8 - bits - bit % 8)) & ((1 << bits) - 1);
                                tile.push(pal[usize::from(idx)]);
                            }
                        }
                    }
                    128 | 130..=255 => {
                        let pal: Vec<u32> = if sub == 128 {
                            Vec::new()
                        } else {
                            (0..sub - 128).map(|_| self.read_cpixel(&mut r)).collect()
                        };
                        while tile.len() < tw * th {
                            let (c, run) = if sub == 128 {
                                (self.read_cpixel(&mut r), true)
                            } else {
                                let i = r.u8();
                                (pal[usize::from(i & 0x7f)], i & 0x80 != 0)
                            };
                            let mut len = 1;
                            if run {
                                loop {
                                    let b = r.u8();
                                    len += usize::from(b);
                                    if b != 255 {
                                        break;
                                    }
                                }
                            }
                            tile.extend(std::iter::repeat_n(c, len));
                        }
                        assert_eq!(tile.len(), tw * th, "RLE run past the tile");
                    }
                    s => panic!("bad ZRLE subencoding {s}"),
                }
                for (k, &v) in tile.iter().enumerate() {
                    self.put(x0 + tx + k % tw, y0 + ty + k / tw, v);
                }
            }
        }
        r.at
    }

    fn tight(&mut self, r: &mut Reader, x: usize, y: usize, w: usize, h: usize) {
        assert!(w <= 2048, "Tight rectangle wider than 2048");
        let ctl = r.u8();
        for s in 0..4 {
            if ctl & (1 << s) != 0 {
                self.tight[s] = Decompress::new(true);
            }
        }
        let kind = ctl >> 4;
        if kind == 8 {
            let c = self.read_tpixel(r);
            for j in 0..h {
                for i in 0..w {
                    self.put(x + i, y + j, c);
                }
            }
            return;
        }
        assert!(kind < 8, "JPEG or bad Tight control {ctl:#x}");
        let stream = usize::from(kind & 3);
        let filter = if kind & 4 != 0 { r.u8() } else { 0 };
        let tpix_len = {
            let pf = &self.pf;
            if pf.bits_per_pixel == 32
                && pf.depth == 24
                && (pf.red_max, pf.green_max, pf.blue_max) == (255, 255, 255)
            {
                3
            } else {
                usize::from(pf.bits_per_pixel / 8)
            }
        };
        let (pal, len) = match filter {
            0 => (Vec::new(), w * h * tpix_len),
            1 => {
                let n = usize::from(r.u8()) + 1;
                let pal: Vec<u32> = (0..n).map(|_| self.read_tpixel(r)).collect();
                let len = if n == 2 { w.div_ceil(8) * h } else { w * h };
                (pal, len)
            }
            f => panic!("unexpected Tight filter {f}"),
        };
        let data = if len < 12 {
            r.take(len).to_vec()
        } else {
            let mut clen = 0usize;
            for i in 0..3 {
                let b = r.u8();
                if i < 2 {
                    clen |= usize::from(b & 0x7f) << (7 * i);
                    if b & 0x80 == 0 {
                        break;
                    }
                } else {
                    clen |= usize::from(b) << 14;
                }
            }
            inflate(&mut self.tight[stream], r.take(clen))
        };
        assert_eq!(data.len(), len, "Tight data length");
        let mut d = Reader { b: &data, at: 0 };
        for j in 0..h {
            if filter == 1 && pal.len() == 2 {
                let row = d.take(w.div_ceil(8));
                for i in 0..w {
                    let v = pal[usize::from((row[i / 8] >> (7 - i % 8)) & 1)];
                    self.put(x + i, y + j, v);
                }
                continue;
            }
            for i in 0..w {
                let v = if filter == 1 {
                    pal[usize::from(d.u8())]
                } else {
                    self.read_tpixel(&mut d)
                };
                self.put(x + i, y + j, v);
            }
        }
    }
}

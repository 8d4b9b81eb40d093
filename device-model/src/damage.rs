//! What changed on a head since a viewer last looked: damage as a bounded list of rectangles.
//!
//! Two sources, one result type ([`Damage`]):
//! - virtio-gpu knows its damage: the guest's RESOURCE_FLUSH rectangles, recorded per head by
//!   the GPU with a generation counter (`Gpu::damage_since`).
//! - bochs does not (the guest writes VRAM through a mapping, nothing traps): a
//!   [`DamageTracker`], one per (viewer, head), hashes 64-pixel row segments of each frame the
//!   viewer samples and reports the segments whose hash changed.
//!
//! This is pure code over [`Frame`]s and rectangles: no guest-visible state, no I/O. It lives in
//! the model crate because the GPU's flush log speaks the same [`Damage`] and because it is
//! unit-tested and benchmarked like the rest of the scanout math.
//!
//! Rectangles are merged into a small number: segments touching in a row form a run, runs
//! touching across rows grow one bounding rectangle (a line of text is one rectangle), and
//! overlapping rectangles are merged. Above [`MAX_RECTS`] the damage is their bounding
//! rectangle; damage covering the whole head is [`Damage::Full`].

use crate::scanout::{Frame, PixelFormat};

/// Pixels per hashed row segment.
pub const SEGMENT: u32 = 64;

/// Most rectangles a [`Damage::Rects`] holds; more are replaced by their bounding rectangle.
pub const MAX_RECTS: usize = 64;

/// A rectangle of a head, in pixels of its visible image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rect {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

impl Rect {
    /// A rectangle.
    pub const fn new(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    /// One past the right edge (u64: no wrap-around).
    fn right(&self) -> u64 {
        u64::from(self.x) + u64::from(self.width)
    }

    /// One past the bottom edge.
    fn bottom(&self) -> u64 {
        u64::from(self.y) + u64::from(self.height)
    }

    /// Whether it has no pixel.
    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    /// The part inside a `width` x `height` image (possibly empty).
    pub fn clamp(&self, width: u32, height: u32) -> Rect {
        let x = self.x.min(width);
        let y = self.y.min(height);
        let r = self.right().min(u64::from(width)) as u32;
        let b = self.bottom().min(u64::from(height)) as u32;
        Rect::new(x, y, r - x, b - y)
    }

    /// The part inside `other` (possibly empty), in the same coordinates.
    pub fn intersect(&self, other: &Rect) -> Rect {
        let x = self.x.max(other.x);
        let y = self.y.max(other.y);
        let r = self.right().min(other.right());
        let b = self.bottom().min(other.bottom());
        if r <= u64::from(x) || b <= u64::from(y) {
            return Rect::new(x, y, 0, 0);
        }
        Rect::new(x, y, (r - u64::from(x)) as u32, (b - u64::from(y)) as u32)
    }

    /// Whether the two share a pixel.
    fn overlaps(&self, other: &Rect) -> bool {
        !self.intersect(other).is_empty()
    }

    /// Whether every pixel of `other` is inside.
    pub fn contains(&self, other: &Rect) -> bool {
        other.x >= self.x
            && other.y >= self.y
            && other.right() <= self.right()
            && other.bottom() <= self.bottom()
    }

    /// The smallest rectangle holding both (both non-empty and inside a u32 image).
    pub fn union(&self, other: &Rect) -> Rect {
        let x = self.x.min(other.x);
        let y = self.y.min(other.y);
        let r = self.right().max(other.right());
        let b = self.bottom().max(other.bottom());
        Rect::new(x, y, (r - u64::from(x)) as u32, (b - u64::from(y)) as u32)
    }
}

/// What changed on a head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Damage {
    /// Everything (a new mode, a new scanout, or more than the rectangles can say).
    Full,
    /// These rectangles, at most [`MAX_RECTS`], inside the head, not overlapping; empty when
    /// nothing changed.
    Rects(Vec<Rect>),
}

impl Damage {
    /// Nothing changed.
    pub fn none() -> Damage {
        Damage::Rects(Vec::new())
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        matches!(self, Damage::Rects(r) if r.is_empty())
    }

    /// The rectangles to send for a `width` x `height` head ([`Damage::Full`]: the whole head).
    pub fn rects(&self, width: u32, height: u32) -> Vec<Rect> {
        match self {
            Damage::Full => vec![Rect::new(0, 0, width, height)],
            Damage::Rects(r) => r.clone(),
        }
    }

    /// Damage made of `rects` (any order, may overlap) on a `width` x `height` head: each
    /// clamped to the head, overlapping ones merged, at most [`MAX_RECTS`] (else their
    /// bounding rectangle), [`Damage::Full`] when one covers the head.
    pub fn from_rects(rects: impl IntoIterator<Item = Rect>, width: u32, height: u32) -> Damage {
        let mut v: Vec<Rect> = rects
            .into_iter()
            .map(|r| r.clamp(width, height))
            .filter(|r| !r.is_empty())
            .collect();
        // Merging is quadratic: a very long list goes straight to its bounding rectangle.
        if v.len() <= 4 * MAX_RECTS {
            merge_overlapping(&mut v);
        }
        if v.len() > MAX_RECTS {
            let bound = v.iter().skip(1).fold(v[0], |a, r| a.union(r));
            v = vec![bound];
        }
        let full = Rect::new(0, 0, width, height);
        if v.iter().any(|r| r.contains(&full)) {
            return Damage::Full;
        }
        Damage::Rects(v)
    }
}

/// Replaces overlapping rectangles by their union until none overlap.
fn merge_overlapping(v: &mut Vec<Rect>) {
    let mut i = 0;
    while i < v.len() {
        let mut grown = false;
        let mut j = i + 1;
        while j < v.len() {
            if v[i].overlaps(&v[j]) {
                let other = v.swap_remove(j);
                v[i] = v[i].union(&other);
                grown = true;
            } else {
                j += 1;
            }
        }
        // A grown rectangle may now overlap one already passed: look again from the start.
        if grown {
            i = 0;
        } else {
            i += 1;
        }
    }
}

/// Hash of one row segment: four independent multiply-xor-rotate lanes over little-endian u64
/// words (so the CPU overlaps their multiplies), folded at the end. Every step is a bijection
/// of a lane for a fixed word, so a change confined to one 8-byte word always changes the
/// hash; other changes collide with a probability of about 2^-64.
#[inline]
fn hash_segment(bytes: &[u8]) -> u64 {
    const P: u64 = 0x9e37_79b9_7f4a_7c15;
    const Q: u64 = 0xc2b2_ae3d_27d4_eb4f;
    #[inline(always)]
    fn step(acc: u64, w: u64) -> u64 {
        (acc ^ w).wrapping_mul(P).rotate_left(29)
    }
    let word = |b: &[u8]| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let mut l = [P, Q, P ^ Q, P.wrapping_add(Q)];
    let mut blocks = bytes.chunks_exact(32);
    for b in &mut blocks {
        l[0] = step(l[0], word(&b[0..8]));
        l[1] = step(l[1], word(&b[8..16]));
        l[2] = step(l[2], word(&b[16..24]));
        l[3] = step(l[3], word(&b[24..32]));
    }
    let rest = blocks.remainder();
    let mut words = rest.chunks_exact(8);
    for w in &mut words {
        l[0] = step(l[0], word(w));
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        let mut w = [0u8; 8];
        w[..tail.len()].copy_from_slice(tail);
        // The length in the top byte: a tail of zeros is not the absence of a tail.
        l[1] = step(l[1], u64::from_le_bytes(w) ^ ((tail.len() as u64) << 56));
    }
    let h = step(step(step(l[0], l[1]), l[2]), l[3]);
    (h ^ (h >> 32)).wrapping_mul(Q)
}

/// A rectangle being grown, in segment columns and rows.
#[derive(Clone, Copy, Debug)]
struct Grow {
    x0: u32,
    x1: u32,
    y0: u32,
    y1: u32,
}

/// Row segments' hashes of the frames one viewer saw on one head, and what changed since.
#[derive(Clone, Debug, Default)]
pub struct DamageTracker {
    /// Mode of the last frame (`None`: nothing seen yet, or invalidated).
    mode: Option<(u32, u32, PixelFormat)>,
    /// One hash per segment, row-major.
    hashes: Vec<u64>,
    /// A row being hashed ([`DamageTracker::update_rows`]).
    row: Vec<u8>,
}

/// Where the rows being hashed come from.
trait Rows {
    /// Row `y`, `row` bytes long.
    fn row(&mut self, y: usize) -> &[u8];
}

/// The rows of a frame's buffer, read in place.
struct InPlace<'a> {
    data: &'a [u8],
    row: usize,
}

impl Rows for InPlace<'_> {
    fn row(&mut self, y: usize) -> &[u8] {
        &self.data[y * self.row..][..self.row]
    }
}

/// Rows copied one at a time into a buffer by a callback.
struct Filled<'a, F> {
    buf: &'a mut Vec<u8>,
    fill: F,
}

impl<F: FnMut(usize, &mut [u8])> Rows for Filled<'_, F> {
    fn row(&mut self, y: usize) -> &[u8] {
        (self.fill)(y, self.buf);
        self.buf
    }
}

impl DamageTracker {
    /// A tracker that has seen nothing: the first frame is [`Damage::Full`].
    pub fn new() -> DamageTracker {
        DamageTracker::default()
    }

    /// Forgets what was seen: the next frame is [`Damage::Full`] (a viewer that lost its
    /// picture, e.g. after a resize it asked for).
    pub fn invalidate(&mut self) {
        self.mode = None;
    }

    /// Segments per row for a `width`-pixel row.
    fn segments(width: u32) -> u32 {
        width.div_ceil(SEGMENT)
    }

    /// Hashes `frame` and returns what changed since the last frame given: [`Damage::Full`]
    /// for the first frame and after a mode change (size or format), else the changed
    /// segments merged into at most [`MAX_RECTS`] rectangles.
    pub fn update(&mut self, frame: &Frame) -> Damage {
        let row = frame.width as usize * frame.format.bytes_per_pixel() as usize;
        if frame.data.len() < row * frame.height as usize {
            // A frame shorter than it claims: say everything.
            self.mode = None;
            return Damage::Full;
        }
        let mut rows = InPlace {
            data: &frame.data,
            row,
        };
        self.scan(frame.width, frame.height, frame.format, &mut rows)
    }

    /// Like [`DamageTracker::update`], for an image that is not a [`Frame`]: `fill(y, row)`
    /// writes row `y` (`width` pixels of `format`) into `row`. A viewer hashes a scanout
    /// straight from VRAM this way, a row at a time, and copies the frame only when something
    /// changed.
    pub fn update_rows(
        &mut self,
        width: u32,
        height: u32,
        format: PixelFormat,
        fill: impl FnMut(usize, &mut [u8]),
    ) -> Damage {
        let mut buf = std::mem::take(&mut self.row);
        buf.resize(width as usize * format.bytes_per_pixel() as usize, 0);
        let d = self.scan(
            width,
            height,
            format,
            &mut Filled {
                buf: &mut buf,
                fill,
            },
        );
        self.row = buf;
        d
    }

    fn scan(
        &mut self,
        width: u32,
        height: u32,
        format: PixelFormat,
        src: &mut impl Rows,
    ) -> Damage {
        let mode = (width, height, format);
        let bpp = format.bytes_per_pixel() as usize;
        let row = width as usize * bpp;
        let segs = Self::segments(width) as usize;
        let seg_bytes = SEGMENT as usize * bpp;
        let rows = height as usize;
        if row == 0 || rows == 0 {
            self.mode = None;
            return Damage::Full;
        }
        if self.mode != Some(mode) {
            self.hashes.clear();
            self.hashes.reserve(segs * rows);
            for y in 0..rows {
                let line = src.row(y);
                self.hashes.extend(line.chunks(seg_bytes).map(hash_segment));
            }
            self.mode = Some(mode);
            return Damage::Full;
        }
        let mut open: Vec<Grow> = Vec::new();
        let mut done: Vec<Grow> = Vec::new();
        for (y, old) in self.hashes.chunks_exact_mut(segs).enumerate() {
            let line = src.row(y);
            let y = y as u32;
            let mut run: Option<u32> = None;
            for (s, (seg, h)) in line.chunks(seg_bytes).zip(old.iter_mut()).enumerate() {
                let new = hash_segment(seg);
                let changed = new != *h;
                *h = new;
                match (changed, run) {
                    (true, None) => run = Some(s as u32),
                    (false, Some(x0)) => {
                        grow(&mut open, &mut done, y, x0, s as u32);
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(x0) = run {
                grow(&mut open, &mut done, y, x0, segs as u32);
            }
        }
        done.append(&mut open);
        let (w, h) = (width, height);
        Damage::from_rects(
            done.iter().map(|g| {
                let x = g.x0 * SEGMENT;
                let right = (g.x1 * SEGMENT).min(w);
                Rect::new(x, g.y0, right - x, g.y1 - g.y0)
            }),
            w,
            h,
        )
    }
}

/// Adds the run of changed segments `x0..x1` of row `y`: every open rectangle it touches (in
/// this row or the one above, overlapping or adjacent columns) grows into one with it; open
/// rectangles that ended above the previous row are closed into `done`.
fn grow(open: &mut Vec<Grow>, done: &mut Vec<Grow>, y: u32, x0: u32, x1: u32) {
    let mut g = Grow {
        x0,
        x1,
        y0: y,
        y1: y + 1,
    };
    let mut i = 0;
    while i < open.len() {
        let o = open[i];
        if o.y1 < y {
            done.push(open.swap_remove(i));
        } else if o.x0 <= g.x1 && g.x0 <= o.x1 {
            g = Grow {
                x0: g.x0.min(o.x0),
                x1: g.x1.max(o.x1),
                y0: g.y0.min(o.y0),
                y1: y + 1,
            };
            open.swap_remove(i);
        } else {
            i += 1;
        }
    }
    open.push(g);
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u32 = 1920;
    const H: u32 = 1080;

    fn frame(width: u32, height: u32, format: PixelFormat) -> Frame {
        let bpp = format.bytes_per_pixel() as usize;
        Frame {
            width,
            height,
            format,
            data: (0..width as usize * height as usize * bpp)
                .map(|i| (i * 7 % 251) as u8)
                .collect(),
        }
    }

    fn set(f: &mut Frame, x: u32, y: u32, v: u8) {
        let bpp = f.format.bytes_per_pixel() as usize;
        let at = (y as usize * f.width as usize + x as usize) * bpp;
        f.data[at] = v;
    }

    fn seen(f: &Frame) -> DamageTracker {
        let mut t = DamageTracker::new();
        assert_eq!(t.update(f), Damage::Full);
        t
    }

    #[test]
    fn unchanged_frame_has_no_damage() {
        let f = frame(W, H, PixelFormat::Xrgb8888);
        let mut t = seen(&f);
        assert!(t.update(&f).is_empty());
        assert!(t.update(&f).is_empty());
    }

    #[test]
    fn rows_filled_one_at_a_time_hash_like_the_frame() {
        // A scanout of 100x70 RGB565 inside a larger buffer (stride 256 bytes), as VRAM holds
        // it: update_rows over the buffer and update over the frame agree at every step.
        let mut f = frame(100, 70, PixelFormat::Rgb565);
        let stride = 256usize;
        let vram = |f: &Frame| {
            let mut v = vec![0xaau8; stride * 70];
            for (y, line) in f.data.chunks_exact(200).enumerate() {
                v[y * stride..][..200].copy_from_slice(line);
            }
            v
        };
        let (mut a, mut b) = (DamageTracker::new(), DamageTracker::new());
        for step in 0..3u8 {
            if step > 0 {
                set(&mut f, 20 * u32::from(step), 9 * u32::from(step), step);
            }
            let v = vram(&f);
            let by_rows = a.update_rows(100, 70, PixelFormat::Rgb565, |y, dst| {
                dst.copy_from_slice(&v[y * stride..][..dst.len()]);
            });
            assert_eq!(by_rows, b.update(&f), "step {step}");
        }
        // A mode change through either path is Full.
        assert_eq!(
            a.update_rows(50, 70, PixelFormat::Rgb565, |_, dst| dst.fill(0)),
            Damage::Full
        );
    }

    #[test]
    fn one_pixel_is_one_segment() {
        let mut f = frame(W, H, PixelFormat::Xrgb8888);
        let mut t = seen(&f);
        set(&mut f, 130, 17, 0xee);
        assert_eq!(t.update(&f), Damage::Rects(vec![Rect::new(128, 17, 64, 1)]));
        assert!(t.update(&f).is_empty());
        // The last, narrower segment of a row is clamped to the frame.
        let mut f = frame(100, 70, PixelFormat::Rgb565);
        let mut t = seen(&f);
        set(&mut f, 99, 69, 0xee);
        assert_eq!(t.update(&f), Damage::Rects(vec![Rect::new(64, 69, 36, 1)]));
    }

    #[test]
    fn a_line_of_text_is_one_rectangle() {
        let mut f = frame(W, H, PixelFormat::Xrgb8888);
        let mut t = seen(&f);
        // 40 glyphs of 8x16 at (16, 320): ragged strokes, a blank top and bottom row.
        for c in 0..40u32 {
            for gy in 1..15u32 {
                for gx in 0..8u32 {
                    if (gx * 3 + gy * 5 + c) % 7 < 3 {
                        set(&mut f, 16 + c * 8 + gx, 320 + gy, 0x11);
                    }
                }
            }
        }
        let d = t.update(&f);
        assert_eq!(d, Damage::Rects(vec![Rect::new(0, 321, 384, 14)]));
    }

    #[test]
    fn everything_changed_is_full() {
        let f = frame(W, H, PixelFormat::Xrgb8888);
        let mut t = seen(&f);
        let mut g = f.clone();
        g.data.iter_mut().for_each(|b| *b ^= 0x40);
        assert_eq!(t.update(&g), Damage::Full);
        assert!(t.update(&g).is_empty());
    }

    #[test]
    fn a_mode_change_is_full() {
        let f = frame(W, H, PixelFormat::Xrgb8888);
        let mut t = seen(&f);
        assert_eq!(
            t.update(&frame(1280, 720, PixelFormat::Xrgb8888)),
            Damage::Full
        );
        // Same bytes, another format.
        let mut g = frame(1280, 720, PixelFormat::Xrgb8888);
        g.format = PixelFormat::Bgrx8888;
        assert_eq!(t.update(&g), Damage::Full);
        assert!(t.update(&g).is_empty());
        t.invalidate();
        assert_eq!(t.update(&g), Damage::Full);
    }

    #[test]
    fn many_changes_are_bounded() {
        let mut f = frame(W, H, PixelFormat::Xrgb8888);
        let mut t = seen(&f);
        // 20 separate pixels: 20 rectangles.
        for i in 0..20 {
            set(&mut f, i * 90, i * 50, 0x77);
        }
        match t.update(&f) {
            Damage::Rects(r) => assert_eq!(r.len(), 20),
            d => panic!("{d:?}"),
        }
        // 14 x 50 separate pixels: more than MAX_RECTS, one bounding rectangle.
        for i in 0..14 {
            for j in 0..50 {
                set(&mut f, 128 + i * 128, 10 + j * 4, 0x99);
            }
        }
        assert_eq!(
            t.update(&f),
            Damage::Rects(vec![Rect::new(128, 10, 1856 - 128, 197)])
        );
    }

    #[test]
    fn any_single_word_change_is_seen() {
        let f = frame(256, 64, PixelFormat::Xrgb8888);
        let mut t = seen(&f);
        let mut g = f.clone();
        for bit in 0..64 {
            let at = 8 * (bit % 32) + bit / 8;
            g.data[at] ^= 1 << (bit % 8);
            assert!(!t.update(&g).is_empty(), "bit {bit}");
        }
    }

    #[test]
    fn rects_merge_and_clamp() {
        let d = Damage::from_rects(
            [
                Rect::new(0, 0, 10, 10),
                Rect::new(5, 5, 10, 10),
                Rect::new(30, 30, 100, 100),
                Rect::new(20, 0, 0, 5),
            ],
            64,
            64,
        );
        assert_eq!(
            d,
            Damage::Rects(vec![Rect::new(0, 0, 15, 15), Rect::new(30, 30, 34, 34)])
        );
        assert_eq!(
            Damage::from_rects([Rect::new(0, 0, 100, 100)], 64, 64),
            Damage::Full
        );
        let many = (0..100).map(|i| Rect::new(i * 2, 0, 1, 1));
        assert_eq!(
            Damage::from_rects(many, 640, 480),
            Damage::Rects(vec![Rect::new(0, 0, 199, 1)])
        );
        assert_eq!(Damage::Full.rects(8, 9), vec![Rect::new(0, 0, 8, 9)]);
    }
}

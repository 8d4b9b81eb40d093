//! The RFB encoders (Raw, ZRLE, Tight) driven through a `Session` as a viewer drives them, as
//! ratios against a memcpy of the same pixels measured in the same run, with the bytes each one
//! sends. Run: `cargo bench --bench rfb` (`cargo bench --bench rfb -- WORD` runs only the
//! cases whose label holds WORD, e.g. `zrle`, `photo`, `565` or `zlib`).
//!
//! Two 1920x1080 XRGB8888 frames, generated deterministically:
//! - console: a dark background, 66 rows of 8x16 glyphs of ragged length in a few colours (a
//!   kernel log: green timestamps, grey words, a few yellow, red and cyan ones, one row in ten
//!   blank) and a blue status bar with white and yellow text in the last 24 rows;
//! - photo: smooth gradients plus per-channel noise of +/-12, where compression is hard.
//!
//! Cases, each through a session that did the handshake (3.8, security None, ClientInit),
//! SetPixelFormat (the server's 32-bpp format, or 16-bpp RGB565) and a SetEncodings naming only
//! the encoding measured (so it is the preferred one):
//! 1. the whole frame, answering a non-incremental FramebufferUpdateRequest. Bytes are those of
//!    a fresh session's first update (what a viewer gets when it connects); the timing repeats
//!    the update on that session.
//! 2. one text line of the console (the 1920x16 rectangle of a row), answering an incremental
//!    request with that rectangle as the damage. Successive updates cycle over the frame's
//!    non-blank rows, so each carries different text, as a console printing line after line;
//!    the zlib streams keep the earlier updates as history, as in a live session. Bytes are the
//!    mean over one cycle after a full update.
//!
//! Floors: a memcpy of the rectangle's XRGB8888 bytes (the frame's 8.3 MB, or the row's
//! 123 KB) between two buffers already faulted in. Every figure is the median CPU time of the
//! benchmark's thread (pinned to CPU 0), not wall time: on a shared machine an update of tens of
//! milliseconds is cut by other tasks' time slices in every sample, a 0.6 ms memcpy is not, so
//! wall-time ratios of long encodes grew with the load (2-4x between cases doing the same work
//! in one run at a load of 4.4 on 2 cores).
//!
//! The encoder's zlib level is fixed (flate2's `Compression::fast()`, level 1). To show what a
//! level knob would buy without changing it, the zlib input of a fresh session's first full
//! update (inflated back out of that update) is compressed again here at levels 1, 6 and 9 with
//! one stream per encoder stream and a sync flush per rectangle, as the encoder does. The
//! level-1 replay time against the encoder's time is also where the encoder's time goes: in
//! zlib, or in building the zlib input (conversion, tiling, palettes, runs).

use std::hint::black_box;
use std::io::Write;
use std::time::Duration;

use flate2::write::ZlibEncoder;
use flate2::{Compression, Decompress, FlushDecompress};
use vgpu_emu::display::rfb::encode::number;
use vgpu_emu::display::rfb::{
    ClientPixelFormat, Encoding, Rect, Security, Session, SessionConfig, Update,
};
use vgpu_model::{Frame, PixelFormat};

mod common;
use common::{cpu_time, pin_to_cpu0};

const W: usize = 1920;
const H: usize = 1080;
const CELL_W: usize = 8;
const CELL_H: usize = 16;
/// Text rows above the status bar.
const TEXT_ROWS: usize = 66;
const STATUS_Y: usize = TEXT_ROWS * CELL_H;

type Rgb = [u8; 3];
const BACKGROUND: Rgb = [16, 18, 24];
const GREY: Rgb = [204, 204, 204];
const GREEN: Rgb = [78, 201, 112];
const YELLOW: Rgb = [229, 192, 80];
const RED: Rgb = [224, 88, 80];
const CYAN: Rgb = [86, 182, 194];
const WHITE: Rgb = [240, 240, 240];
const BAR: Rgb = [32, 74, 135];

/// 16 bpp, depth 16, little-endian 5-6-5.
const RGB565: ClientPixelFormat = ClientPixelFormat {
    bits_per_pixel: 16,
    depth: 16,
    big_endian: false,
    true_colour: true,
    red_max: 31,
    green_max: 63,
    blue_max: 31,
    red_shift: 11,
    green_shift: 5,
    blue_shift: 0,
};

/// splitmix64: deterministic frames without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An 8x16 glyph (bit 7 of a row is the leftmost column) for a printable ASCII code: two to
/// five strokes out of eleven (bars, 2-pixel-wide verticals as in the VGA font, a diagonal, a
/// descender), chosen by a hash of the code. Space is blank.
fn glyph(c: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    if c == b' ' {
        return g;
    }
    let mut h = u32::from(c).wrapping_mul(0x9e37_79b9) ^ 0x5bd1_e995;
    h ^= h >> 15;
    h = h.wrapping_mul(0x2c1b_3c6d);
    h ^= h >> 12;
    let mut strokes = h & 0x7ff;
    while strokes.count_ones() > 5 {
        strokes &= strokes - 1;
    }
    if strokes.count_ones() < 2 {
        strokes |= 0b1001_0000;
    }
    let (left, right, centre, bar) = (0b0110_0000u8, 0b0000_0110u8, 0b0001_1000u8, 0b0111_1110u8);
    let mut fill = |ys: std::ops::RangeInclusive<usize>, mask: u8| {
        for y in ys {
            g[y] |= mask;
        }
    };
    for s in 0..11 {
        if strokes & (1 << s) == 0 {
            continue;
        }
        match s {
            0 => fill(3..=3, bar),
            1 => fill(6..=6, bar),
            2 => fill(8..=8, bar),
            3 => fill(12..=12, bar),
            4 => fill(3..=7, left),
            5 => fill(8..=12, left),
            6 => fill(3..=7, right),
            7 => fill(8..=12, right),
            8 => fill(3..=12, centre),
            9 => fill(13..=14, right),
            _ => {
                for i in 0..5 {
                    fill(11 - 2 * i..=12 - 2 * i, 0x40 >> i);
                }
            }
        }
    }
    g
}

type Cell = (u8, Rgb);

/// One row of a kernel log: `[ssss.uuuuuu] ` in green, then words of 1-10 characters up to a
/// ragged length of 45-214 columns; one row in ten blank.
fn log_line(rng: &mut Rng, n: usize) -> Vec<Cell> {
    let mut line = Vec::new();
    if rng.below(10) == 0 {
        return line;
    }
    let stamp = format!("[{:5}.{:06}] ", 3 + n * 7, rng.below(1_000_000));
    line.extend(stamp.bytes().map(|c| (c, GREEN)));
    let target = 30 + rng.below(170) as usize;
    while line.len() < target {
        let colour = match rng.below(100) {
            0..=4 => YELLOW,
            5..=8 => RED,
            9..=14 => CYAN,
            _ => GREY,
        };
        for _ in 0..1 + rng.below(10) {
            let c = match rng.below(10) {
                0 => b'0' + rng.below(10) as u8,
                1 => b"=:/._-,()"[rng.below(9) as usize],
                _ => b'a' + rng.below(26) as u8,
            };
            line.push((c, colour));
        }
        line.push((b' ', colour));
    }
    line
}

fn put(data: &mut [u8], x: usize, y: usize, c: Rgb) {
    let at = (y * W + x) * 4;
    data[at..at + 4].copy_from_slice(&[c[2], c[1], c[0], 0]);
}

/// `text` in 8x16 cells from column 0 at pixel row `y` (background pixels left as they are).
fn draw(data: &mut [u8], y: usize, text: &[Cell]) {
    for (col, &(c, fg)) in text.iter().enumerate().take(W / CELL_W) {
        let g = glyph(c);
        for (gy, bits) in g.iter().enumerate() {
            for gx in 0..CELL_W {
                if bits & (0x80 >> gx) != 0 {
                    put(data, col * CELL_W + gx, y + gy, fg);
                }
            }
        }
    }
}

/// The console frame, the rows that hold text, and how many glyphs it shows.
fn console_frame() -> (Frame, Vec<usize>, usize) {
    let mut data = vec![0u8; W * H * 4];
    for y in 0..H {
        for x in 0..W {
            put(&mut data, x, y, if y < STATUS_Y { BACKGROUND } else { BAR });
        }
    }
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut rows = Vec::new();
    let mut glyphs = 0;
    for row in 0..TEXT_ROWS {
        let line = log_line(&mut rng, row);
        if !line.is_empty() {
            rows.push(row);
        }
        glyphs += line.iter().filter(|c| c.0 != b' ').count();
        draw(&mut data, row * CELL_H, &line);
    }
    let status = " tty1 | 1920x1080 | up 3 days, 4:12 | load 0.08 0.12 0.10 | mem 412M/2048M ";
    let mut bar: Vec<Cell> = status.bytes().map(|c| (c, WHITE)).collect();
    bar.extend(" [ 2 updates pending ] ".bytes().map(|c| (c, YELLOW)));
    glyphs += bar.iter().filter(|c| c.0 != b' ').count();
    draw(&mut data, STATUS_Y + 4, &bar);
    let frame = Frame {
        width: W as u32,
        height: H as u32,
        format: PixelFormat::Xrgb8888,
        data,
    };
    (frame, rows, glyphs)
}

/// Smooth colour fields under a vignette, plus uniform noise of +/-12 per channel.
fn photo_frame() -> Frame {
    let mut data = vec![0u8; W * H * 4];
    let mut rng = Rng(42);
    for y in 0..H {
        for x in 0..W {
            let (fx, fy) = (x as f32 / W as f32, y as f32 / H as f32);
            let vignette = 1.0 - 0.9 * ((fx - 0.5).powi(2) + (fy - 0.45).powi(2));
            let fields = [
                120.0 + 90.0 * (fx * 3.1 + fy * 1.7).sin() + 30.0 * (fy * 7.3).cos(),
                110.0 + 80.0 * (fx * 2.3 - fy * 3.9 + 1.0).sin() + 25.0 * (fx * 5.0).cos(),
                100.0 + 90.0 * (fx * 1.3 + fy * 2.1).cos(),
            ];
            let noise = rng.next();
            let mut c = [0u8; 3];
            for (i, v) in fields.iter().enumerate() {
                let n = ((noise >> (i * 8)) & 0xff) as f32 / 255.0 * 24.0 - 12.0;
                c[i] = (v * vignette + n).clamp(0.0, 255.0) as u8;
            }
            put(&mut data, x, y, c);
        }
    }
    Frame {
        width: W as u32,
        height: H as u32,
        format: PixelFormat::Xrgb8888,
        data,
    }
}

/// A session past the handshake whose viewer asked for `pf` and `encoding` alone.
fn viewer(pf: &ClientPixelFormat, encoding: i32, expect: Encoding) -> Session {
    let mut s = Session::new(SessionConfig {
        width: W as u16,
        height: H as u16,
        name: "bench".into(),
        security: Security::None,
        screen_id: 0,
    });
    // ProtocolVersion, security type None, ClientInit (shared).
    s.feed(b"RFB 003.008\n\x01\x01").expect("handshake");
    assert!(s.is_ready());
    let mut m = vec![0, 0, 0, 0];
    m.extend_from_slice(&pf.to_bytes());
    m.extend_from_slice(&[2, 0, 0, 1]);
    m.extend_from_slice(&encoding.to_be_bytes());
    s.feed(&m).expect("SetPixelFormat and SetEncodings");
    assert_eq!(s.pixel_format(), *pf);
    assert_eq!(s.encodings().preferred, expect);
    s.consume_output(s.output().len());
    s
}

fn request(s: &mut Session, incremental: bool) {
    let mut m = vec![3, u8::from(incremental), 0, 0, 0, 0];
    m.extend_from_slice(&(W as u16).to_be_bytes());
    m.extend_from_slice(&(H as u16).to_be_bytes());
    s.feed(&m).expect("FramebufferUpdateRequest");
}

/// Answers a request with `dirty` (or the whole frame when `dirty` is empty); returns the
/// update's length and drops it from the output as a transport would once written.
fn update(s: &mut Session, frame: &Frame, dirty: &[Rect]) -> usize {
    request(s, !dirty.is_empty());
    assert!(s.send_update(&Update {
        frame,
        dirty,
        cursor: None,
    }));
    let n = s.output().len();
    s.consume_output(n);
    n
}

fn row_rect(row: usize) -> Rect {
    Rect::new(0, (row * CELL_H) as u16, W as u16, CELL_H as u16)
}

/// CPU time of one memcpy of `len` bytes, timed `reps` at a time (a line copies in a few
/// microseconds, not much above the cost of reading the clock).
fn memcpy_floor(budget: Duration, len: usize, reps: u32) -> Duration {
    let src: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let mut dst = vec![0u8; len];
    cpu_time(budget, || {
        for _ in 0..reps {
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
        }
    }) / reps
}

/// Tight's TPIXEL size: 3 bytes for 32-bpp depth-24 8-8-8, otherwise the pixel.
fn tpixel_len(pf: &ClientPixelFormat) -> usize {
    let rgb888 = pf.red_max == 255 && pf.green_max == 255 && pf.blue_max == 255;
    if pf.bits_per_pixel == 32 && pf.depth == 24 && rgb888 {
        3
    } else {
        pf.bytes_per_pixel()
    }
}

fn inflate(z: &mut Decompress, input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() * 4 + 1024);
    let mut pos = 0;
    loop {
        let before = z.total_in();
        z.decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync)
            .expect("the update's zlib data");
        pos += (z.total_in() - before) as usize;
        if pos == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

/// What the encoder fed zlib for one FramebufferUpdate of a fresh session (ZRLE or Tight):
/// (stream, bytes) in order, one entry per sync flush, and the compressed bytes it sent.
fn zlib_input(update: &[u8], pf: &ClientPixelFormat) -> (Vec<(usize, Vec<u8>)>, usize) {
    let mut at = 4;
    let mut take = |n: usize| {
        let s = &update[at..at + n];
        at += n;
        s
    };
    let be16 = |b: &[u8]| usize::from(u16::from_be_bytes([b[0], b[1]]));
    let mut streams: [Decompress; 4] = std::array::from_fn(|_| Decompress::new(true));
    let mut chunks = Vec::new();
    let mut compressed = 0;
    let count = be16(&update[2..4]);
    for _ in 0..count {
        let h = take(12);
        let (w, hgt) = (be16(&h[4..6]), be16(&h[6..8]));
        let enc = i32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        if enc == number::ZRLE {
            let l = take(4);
            let len = u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize;
            chunks.push((0, inflate(&mut streams[0], take(len))));
            compressed += len;
            continue;
        }
        assert_eq!(enc, number::TIGHT, "only ZRLE and Tight carry zlib data");
        let ctl = take(1)[0];
        if ctl >> 4 == 8 {
            take(tpixel_len(pf));
            continue;
        }
        let stream = usize::from((ctl >> 4) & 3);
        let mut len = w * hgt * tpixel_len(pf);
        if ctl & 0x40 != 0 {
            assert_eq!(
                take(1)[0],
                1,
                "the encoder's only explicit filter is palette"
            );
            let colours = usize::from(take(1)[0]) + 1;
            take(colours * tpixel_len(pf));
            len = if colours == 2 {
                hgt * w.div_ceil(8)
            } else {
                w * hgt
            };
        }
        if len < 12 {
            take(len);
            continue;
        }
        let mut zlen = 0;
        for i in 0..3 {
            let b = take(1)[0];
            if i == 2 {
                zlen |= usize::from(b) << 14;
                break;
            }
            zlen |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                break;
            }
        }
        let data = inflate(&mut streams[stream], take(zlen));
        assert_eq!(data.len(), len, "Tight rectangle {w}x{hgt}");
        chunks.push((stream, data));
        compressed += zlen;
    }
    (chunks, compressed)
}

/// `chunks` through fresh zlib streams at `level`, a sync flush after each; the bytes out.
fn recompress(chunks: &[(usize, Vec<u8>)], level: u32) -> usize {
    let mut streams: [Option<ZlibEncoder<Vec<u8>>>; 4] = Default::default();
    for (stream, data) in chunks {
        let z = streams[*stream]
            .get_or_insert_with(|| ZlibEncoder::new(Vec::new(), Compression::new(level)));
        z.write_all(data).expect("to a Vec");
        z.flush().expect("to a Vec");
    }
    streams.iter().flatten().map(|z| z.get_ref().len()).sum()
}

/// One-line updates timed per sample (each a fraction of a millisecond).
const LINES_PER_SAMPLE: u32 = 10;

const ENCODINGS: [(Encoding, i32, &str); 3] = [
    (Encoding::Raw, number::RAW, "Raw"),
    (Encoding::Zrle, number::ZRLE, "ZRLE"),
    (Encoding::Tight, number::TIGHT, "Tight"),
];

fn main() {
    pin_to_cpu0();
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(|a| a.to_lowercase());
    let wanted = |label: &str| {
        filter
            .as_ref()
            .is_none_or(|f| label.to_lowercase().contains(f))
    };
    let budget = Duration::from_millis(1500);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;

    let (console, rows, glyphs) = console_frame();
    let photo = photo_frame();
    let memcpy_frame = memcpy_floor(budget, W * H * 4, 1);
    let memcpy_line = memcpy_floor(budget, W * CELL_H * 4, 100);
    println!(
        "floors: memcpy of a {W}x{H} XRGB8888 frame {:.3} ms; of a {W}x{CELL_H} line {:.4} ms",
        ms(memcpy_frame),
        ms(memcpy_line)
    );
    println!(
        "console: {} of {TEXT_ROWS} text rows hold text, {glyphs} glyphs in all",
        rows.len()
    );
    println!();
    println!("| frame | area | client format | encoding | median | x memcpy | bytes | of raw |");
    println!("|---|---|---|---|---|---|---|---|");

    let formats = [
        (ClientPixelFormat::SERVER, "32 bpp"),
        (RGB565, "16 bpp 565"),
    ];
    let frames = [("console", &console), ("photo", &photo)];
    let mut encoder_ms = Vec::new();
    for (fname, frame) in frames {
        for (pf, pname) in &formats {
            for (enc, number, ename) in ENCODINGS {
                let label = format!("{fname} full {pname} {ename}");
                if !wanted(&label) {
                    continue;
                }
                let bytes = update(&mut viewer(pf, number, enc), frame, &[]);
                let mut s = viewer(pf, number, enc);
                let t = cpu_time(budget, || {
                    black_box(update(&mut s, black_box(frame), &[]));
                });
                let raw = W * H * pf.bytes_per_pixel();
                println!(
                    "| {fname} | {W}x{H} | {pname} | {ename} | {:.2} ms | {:.1}x | {bytes} | {:.4} |",
                    ms(t),
                    ms(t) / ms(memcpy_frame),
                    bytes as f64 / raw as f64
                );
                encoder_ms.push((fname, *pname, ename, t));
            }
        }
    }
    for (pf, pname) in &formats {
        for (enc, number, ename) in ENCODINGS {
            let label = format!("console line {pname} {ename}");
            if !wanted(&label) {
                continue;
            }
            let mut s = viewer(pf, number, enc);
            update(&mut s, &console, &[]);
            let total: usize = rows
                .iter()
                .map(|&r| update(&mut s, &console, &[row_rect(r)]))
                .sum();
            let bytes = total as f64 / rows.len() as f64;
            let mut i = 0;
            let t = cpu_time(budget, || {
                for _ in 0..LINES_PER_SAMPLE {
                    let r = row_rect(rows[i % rows.len()]);
                    i += 1;
                    black_box(update(&mut s, black_box(&console), &[r]));
                }
            }) / LINES_PER_SAMPLE;
            let raw = W * CELL_H * pf.bytes_per_pixel();
            println!(
                "| console, one text line | {W}x{CELL_H} | {pname} | {ename} | {:.4} ms | {:.1}x | {bytes:.0} (mean) | {:.4} |",
                ms(t),
                ms(t) / ms(memcpy_line),
                bytes / raw as f64
            );
        }
    }

    // The zlib level the encoder does not offer: its zlib input compressed again.
    if !wanted("zlib levels") {
        return;
    }
    println!();
    println!(
        "zlib levels (the encoder uses level 1): a fresh session's first full update, 32 bpp, \
         its zlib input compressed again per level"
    );
    println!();
    println!("| frame | encoding | zlib input | sent (level 1, encoder) | level | bytes | zlib time | x memcpy | x the encoder's whole update |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let pf = ClientPixelFormat::SERVER;
    for (fname, frame) in frames {
        for (enc, number, ename) in &ENCODINGS[1..] {
            let mut s = viewer(&pf, *number, *enc);
            request(&mut s, false);
            assert!(s.send_update(&Update {
                frame,
                dirty: &[],
                cursor: None,
            }));
            let (chunks, sent) = zlib_input(s.output(), &pf);
            let input: usize = chunks.iter().map(|(_, c)| c.len()).sum();
            let whole = encoder_ms
                .iter()
                .find(|e| e.0 == fname && e.1 == "32 bpp" && e.2 == *ename)
                .map(|e| e.3);
            for level in [1, 6, 9] {
                let mut bytes = 0;
                let t = cpu_time(Duration::from_secs(1), || {
                    bytes = recompress(black_box(&chunks), level);
                });
                let share = whole.map_or("-".to_string(), |w| format!("{:.2}", ms(t) / ms(w)));
                println!(
                    "| {fname} | {ename} | {input} | {sent} | {level} | {bytes} | {:.2} ms | {:.1}x | {share} |",
                    ms(t),
                    ms(t) / ms(memcpy_frame)
                );
            }
        }
    }
}

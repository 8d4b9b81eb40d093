//! The bochs damage pass (hashing 64-pixel row segments of a frame and merging the changed ones
//! into rectangles) as a ratio against a memcpy of the same frame measured in the same run.
//! Run: `cargo bench --bench damage`.
//!
//! One 1920x1080 XRGB8888 frame, three cases, each one `DamageTracker::update`:
//! 1. unchanged (a static screen: the common case for a viewer),
//! 2. one line of text changed (alternating two frames that differ in one 16-row text line),
//! 3. every pixel changed (alternating a frame and its inverse).
//!
//! The floor is a memcpy of 1920 * 1080 * 4 bytes between two buffers already faulted in. A
//! 3840x2160 unchanged frame is reported too (against its own memcpy).

use std::hint::black_box;
use std::time::Duration;

use vgpu_model::damage::{Damage, DamageTracker};
use vgpu_model::{Frame, PixelFormat};

mod common;
use common::{pin_to_cpu0, time};

fn frame(width: u32, height: u32) -> Frame {
    Frame {
        width,
        height,
        format: PixelFormat::Xrgb8888,
        // Real pages with varied content: no run of equal words to flatter the hash.
        data: (0..width as usize * height as usize * 4)
            .map(|i| (i * 7 % 251) as u8)
            .collect(),
    }
}

/// The same frame with one line of 100 8x16 glyphs drawn at row 400.
fn with_text_line(f: &Frame) -> Frame {
    let mut g = f.clone();
    for c in 0..100usize {
        for gy in 1..15usize {
            for gx in 0..8usize {
                if (gx * 3 + gy * 5 + c) % 7 < 3 {
                    let at = ((400 + gy) * f.width as usize + 16 + c * 8 + gx) * 4;
                    g.data[at..at + 4].copy_from_slice(&[0xee, 0xee, 0xee, 0]);
                }
            }
        }
    }
    g
}

fn describe(d: &Damage) -> String {
    match d {
        Damage::Full => "full".to_string(),
        Damage::Rects(r) if r.is_empty() => "none".to_string(),
        Damage::Rects(r) => format!("{} rect(s), first {:?}", r.len(), r[0]),
    }
}

fn memcpy_floor(budget: Duration, len: usize) -> Duration {
    let src = vec![0x5au8; len];
    let mut dst = vec![0u8; len];
    time(budget, || {
        dst.copy_from_slice(black_box(&src));
        black_box(&dst);
    })
}

fn main() {
    pin_to_cpu0();
    let budget = Duration::from_secs(2);
    let us = |d: Duration| d.as_secs_f64() * 1e6;

    let a = frame(1920, 1080);
    let b = with_text_line(&a);
    let mut c = a.clone();
    c.data.iter_mut().for_each(|x| *x = !*x);

    let memcpy = memcpy_floor(budget, a.data.len());
    println!(
        "floor: memcpy of one 1920x1080 XRGB8888 frame: {:.0} us",
        us(memcpy)
    );

    let mut t = DamageTracker::new();
    t.update(&a);
    let mut last = Damage::none();
    let unchanged = time(budget, || last = t.update(black_box(&a)));
    println!(
        "damage pass, unchanged frame: {:.0} us = {:.2}x the memcpy ({})",
        us(unchanged),
        us(unchanged) / us(memcpy),
        describe(&last)
    );

    let mut flip = false;
    let line = time(budget, || {
        flip = !flip;
        last = t.update(black_box(if flip { &b } else { &a }));
    });
    println!(
        "damage pass, one text line changed: {:.0} us = {:.2}x the memcpy ({})",
        us(line),
        us(line) / us(memcpy),
        describe(&last)
    );

    let full = time(budget, || {
        flip = !flip;
        last = t.update(black_box(if flip { &c } else { &a }));
    });
    println!(
        "damage pass, every pixel changed: {:.0} us = {:.2}x the memcpy ({})",
        us(full),
        us(full) / us(memcpy),
        describe(&last)
    );

    let k = frame(3840, 2160);
    let memcpy4k = memcpy_floor(budget, k.data.len());
    let mut t = DamageTracker::new();
    t.update(&k);
    let unchanged4k = time(budget, || last = t.update(black_box(&k)));
    println!(
        "3840x2160: memcpy {:.0} us; damage pass, unchanged: {:.0} us = {:.2}x ({})",
        us(memcpy4k),
        us(unchanged4k),
        us(unchanged4k) / us(memcpy4k),
        describe(&last)
    );
}

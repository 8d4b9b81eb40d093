//! The test picture: what `vgpu-guest draw` puts on each head, as a pure function of
//! (head index, width, height), so the host computes the very same pixels to compare a head's
//! screen with. Integers only; no state, no randomness, no dependency.
//!
//! Layout of head `h` at `w` x `h_px` (pixel (0, 0) at the top left), XRGB8888 with X = 0:
//!
//! ```text
//! +--------------------------------------------+  rows [0, band): the head's colour
//! |               head colour band             |  band = max(1, height / 8)
//! +--------------------------------------------+
//! | gradient:  red   = x * 255 / max(1, w - 1) |
//! |            green = y * 255 / max(1, h - 1) |
//! |            blue  = (head % 4) * 0x55       |
//! |        [#][#][#]   the head index in       |  decimal digits of a 3x5 block font,
//! |        [#]   [#]   decimal, white blocks   |  block = max(1, min(w, h) / 24) pixels,
//! |        ...                                 |  digits 4 blocks apart, centred
//! +--------------------------------------------+  rows [height - band, height): head colour
//! |               head colour band             |
//! +--------------------------------------------+
//! ```
//!
//! Head colours by `head % 8`: red, green, blue, yellow, magenta, cyan, orange, grey.
//! Where a digit block overlaps a band, the block wins.

/// The bands' colour of each head, by head index modulo 8.
pub const HEAD_COLOURS: [u32; 8] = [
    0xff_00_00, 0x00_ff_00, 0x00_00_ff, 0xff_ff_00, 0xff_00_ff, 0x00_ff_ff, 0xff_80_00, 0x80_80_80,
];

/// Digit blocks.
pub const DIGIT_COLOUR: u32 = 0xff_ff_ff;

/// A 3x5 block font: bit (4 - row) * 3 + (2 - column) is set where digit d has a block.
const FONT: [u16; 10] = [
    0b111_101_101_101_111, // 0
    0b010_110_010_010_111, // 1
    0b111_001_111_100_111, // 2
    0b111_001_111_001_111, // 3
    0b101_101_111_001_001, // 4
    0b111_100_111_001_111, // 5
    0b111_100_111_101_111, // 6
    0b111_001_010_010_010, // 7
    0b111_101_111_101_111, // 8
    0b111_101_111_001_111, // 9
];

/// The decimal digits of `n`, most significant first.
fn digits(n: u32) -> Vec<u8> {
    n.to_string().bytes().map(|b| b - b'0').collect()
}

/// Whether (x, y) is on a block of the head index's digits.
fn on_digit(head: u32, width: u32, height: u32, x: u32, y: u32) -> bool {
    let block = (width.min(height) / 24).max(1);
    let digits = digits(head);
    let n = digits.len() as u32;
    // n digits of 3 blocks with 1 block between them.
    let (text_w, text_h) = (
        u64::from(4 * n - 1) * u64::from(block),
        5 * u64::from(block),
    );
    let left = (u64::from(width).saturating_sub(text_w)) / 2;
    let top = (u64::from(height).saturating_sub(text_h)) / 2;
    let (x, y) = (u64::from(x), u64::from(y));
    if x < left || y < top || x >= left + text_w || y >= top + text_h {
        return false;
    }
    let (bx, by) = ((x - left) / u64::from(block), (y - top) / u64::from(block));
    let (digit, column) = ((bx / 4) as usize, (bx % 4) as u32);
    if column == 3 {
        return false;
    }
    let row = by as u32;
    FONT[usize::from(digits[digit])] >> ((4 - row) * 3 + (2 - column)) & 1 == 1
}

/// The XRGB8888 value of pixel (x, y) of head `head`'s picture at `width` x `height`.
pub fn pixel(head: u32, width: u32, height: u32, x: u32, y: u32) -> u32 {
    if on_digit(head, width, height, x, y) {
        return DIGIT_COLOUR;
    }
    let band = (height / 8).max(1);
    if y < band || y >= height.saturating_sub(band) {
        return HEAD_COLOURS[(head % 8) as usize];
    }
    let red = u64::from(x) * 255 / u64::from(width.saturating_sub(1).max(1));
    let green = u64::from(y) * 255 / u64::from(height.saturating_sub(1).max(1));
    let blue = (head % 4) * 0x55;
    ((red.min(255) as u32) << 16) | ((green.min(255) as u32) << 8) | blue
}

/// The whole picture as packed RGB bytes (3 per pixel, rows top to bottom, no padding), the
/// form of a screen dump.
pub fn rgb(head: u32, width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height {
        for x in 0..width {
            let p = pixel(head, width, height, x, y);
            out.extend_from_slice(&[(p >> 16) as u8, (p >> 8) as u8, p as u8]);
        }
    }
    out
}

/// Writes the picture into an XRGB8888 buffer (little-endian 32-bit pixels, as DRM's
/// XRGB8888 lays them out) whose rows are `pitch` bytes apart.
pub fn fill_xrgb8888(head: u32, width: u32, height: u32, pitch: usize, buf: &mut [u8]) {
    for (y, row) in buf.chunks_mut(pitch).take(height as usize).enumerate() {
        for (x, px) in row.chunks_exact_mut(4).take(width as usize).enumerate() {
            px.copy_from_slice(&pixel(head, width, height, x as u32, y as u32).to_le_bytes());
        }
    }
}

/// The inverse picture (every colour channel complemented, X stays 0): the second buffer of a
/// page-flipping head, so that every flip changes every pixel.
pub fn fill_inverse_xrgb8888(head: u32, width: u32, height: u32, pitch: usize, buf: &mut [u8]) {
    for (y, row) in buf.chunks_mut(pitch).take(height as usize).enumerate() {
        for (x, px) in row.chunks_exact_mut(4).take(width as usize).enumerate() {
            let p = pixel(head, width, height, x as u32, y as u32) ^ 0x00ff_ffff;
            px.copy_from_slice(&p.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_gradient_and_digits() {
        let (w, h) = (1024, 768);
        assert_eq!(pixel(0, w, h, 0, 0), 0xff0000);
        assert_eq!(pixel(3, w, h, w - 1, h - 1), 0xffff00);
        // Gradient just below the top band, at the left edge: red 0, green y*255/767.
        assert_eq!(pixel(1, w, h, 0, 96), (96 * 255 / 767) << 8 | 0x55);
        assert_eq!(
            pixel(2, w, h, w - 1, 200),
            0xff0000 | (200 * 255 / 767) << 8 | 0xaa
        );
        // The digit is centred: block 32 px, "0" is 96x160 at (464, 304); its middle column
        // is hollow on rows 1-3.
        assert_eq!(pixel(0, w, h, 464, 304), DIGIT_COLOUR);
        assert_ne!(pixel(0, w, h, 464 + 40, 304 + 40), DIGIT_COLOUR);
        assert_eq!(pixel(8, w, h, 464 + 40, 304 + 80), DIGIT_COLOUR);
    }

    #[test]
    fn heads_differ_and_the_forms_agree() {
        let (w, h) = (64, 48);
        let pics: Vec<Vec<u8>> = (0..4).map(|head| rgb(head, w, h)).collect();
        for a in 0..4 {
            for b in a + 1..4 {
                assert_ne!(pics[a], pics[b]);
            }
        }
        let pitch = 64 * 4 + 32;
        let mut buf = vec![0u8; pitch * 48];
        fill_xrgb8888(2, w, h, pitch, &mut buf);
        for y in 0..48 {
            for x in 0..64 {
                let px = &buf[y * pitch + x * 4..][..4];
                let rgb = &pics[2][(y * 64 + x) * 3..][..3];
                assert_eq!([px[2], px[1], px[0], px[3]], [rgb[0], rgb[1], rgb[2], 0]);
            }
        }
        // The inverse differs in every pixel, channel by channel.
        let mut inverse = vec![0u8; pitch * 48];
        fill_inverse_xrgb8888(2, w, h, pitch, &mut inverse);
        for y in 0..48 {
            for x in 0..64 {
                let (a, b) = (
                    &buf[y * pitch + x * 4..][..4],
                    &inverse[y * pitch + x * 4..][..4],
                );
                assert_eq!(
                    [a[0] ^ b[0], a[1] ^ b[1], a[2] ^ b[2], b[3]],
                    [0xff, 0xff, 0xff, 0]
                );
            }
        }
        // Tiny and multi-digit heads do not panic.
        assert_eq!(rgb(123, 1, 1).len(), 3);
        assert_eq!(rgb(10, 5, 3).len(), 45);
    }
}

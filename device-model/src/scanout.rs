//! Scanout geometry and frame capture: what a head shows, read only from inside VRAM.

use std::fmt;

use serde::Serialize;

use crate::vram::VramRead;

/// Pixel layout of a scanout in VRAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PixelFormat {
    /// 32 bpp, little-endian x8r8g8b8: bytes B, G, R, X (DRM_FORMAT_XRGB8888).
    Xrgb8888,
    /// 32 bpp, big-endian x8r8g8b8: bytes X, R, G, B (bochs byte-order register set to BE).
    Xrgb8888BigEndian,
    /// 16 bpp r5g6b5, little-endian (DRM_FORMAT_RGB565).
    Rgb565,
    /// 32 bpp: bytes B, G, R, A (DRM_FORMAT_ARGB8888; virtio-gpu B8G8R8A8).
    Argb8888,
    /// 32 bpp: bytes A, R, G, B (DRM_FORMAT_BGRA8888; virtio-gpu A8R8G8B8).
    Bgra8888,
    /// 32 bpp: bytes X, R, G, B (DRM_FORMAT_BGRX8888; virtio-gpu X8R8G8B8).
    Bgrx8888,
    /// 32 bpp: bytes R, G, B, A (DRM_FORMAT_ABGR8888; virtio-gpu R8G8B8A8).
    Abgr8888,
    /// 32 bpp: bytes R, G, B, X (DRM_FORMAT_XBGR8888; virtio-gpu R8G8B8X8).
    Xbgr8888,
    /// 32 bpp: bytes A, B, G, R (DRM_FORMAT_RGBA8888; virtio-gpu A8B8G8R8).
    Rgba8888,
    /// 32 bpp: bytes X, B, G, R (DRM_FORMAT_RGBX8888; virtio-gpu X8B8G8R8).
    Rgbx8888,
}

impl PixelFormat {
    /// Bytes per pixel.
    pub fn bytes_per_pixel(self) -> u32 {
        match self {
            PixelFormat::Rgb565 => 2,
            _ => 4,
        }
    }

    /// The DRM fourcc-style name.
    pub fn as_str(self) -> &'static str {
        match self {
            PixelFormat::Xrgb8888 => "XRGB8888",
            PixelFormat::Xrgb8888BigEndian => "XRGB8888-BE",
            PixelFormat::Rgb565 => "RGB565",
            PixelFormat::Argb8888 => "ARGB8888",
            PixelFormat::Bgra8888 => "BGRA8888",
            PixelFormat::Bgrx8888 => "BGRX8888",
            PixelFormat::Abgr8888 => "ABGR8888",
            PixelFormat::Xbgr8888 => "XBGR8888",
            PixelFormat::Rgba8888 => "RGBA8888",
            PixelFormat::Rgbx8888 => "RGBX8888",
        }
    }

    /// Byte positions of red, green and blue in one pixel of a 32-bpp format.
    fn rgb_bytes(self) -> Option<[usize; 3]> {
        match self {
            PixelFormat::Xrgb8888 | PixelFormat::Argb8888 => Some([2, 1, 0]),
            PixelFormat::Xrgb8888BigEndian | PixelFormat::Bgra8888 | PixelFormat::Bgrx8888 => {
                Some([1, 2, 3])
            }
            PixelFormat::Abgr8888 | PixelFormat::Xbgr8888 => Some([0, 1, 2]),
            PixelFormat::Rgba8888 | PixelFormat::Rgbx8888 => Some([3, 2, 1]),
            PixelFormat::Rgb565 => None,
        }
    }
}

/// Where a head's visible image lies in VRAM. Invariant: `offset + stride * (height - 1) +
/// width * bpp <= VRAM size` and `width x height` within the type's max resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Scanout {
    /// Byte offset of the first pixel in VRAM.
    pub offset: u64,
    /// Bytes from one line to the next.
    pub stride: u32,
    /// Visible pixels per line.
    pub width: u32,
    /// Visible lines.
    pub height: u32,
    /// Pixel layout.
    pub format: PixelFormat,
}

impl Scanout {
    /// Bytes from the first pixel to one past the last.
    pub fn span(&self) -> u64 {
        u64::from(self.stride) * u64::from(self.height.saturating_sub(1))
            + u64::from(self.width) * u64::from(self.format.bytes_per_pixel())
    }
}

impl fmt::Display for Scanout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}x{} {} stride {} at {:#x}",
            self.width,
            self.height,
            self.format.as_str(),
            self.stride,
            self.offset
        )
    }
}

/// Why a head shows nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(rename_all = "kebab-case", tag = "reason")]
pub enum NotDisplaying {
    /// No such head.
    #[error("head {0} does not exist")]
    NoSuchHead(u32),
    /// The guest has not enabled the display.
    #[error("display is disabled")]
    Disabled,
    /// A depth the personality does not scan out.
    #[error("unsupported depth of {0} bits per pixel")]
    UnsupportedDepth(u16),
    /// Smaller than 64x64.
    #[error("mode {width}x{height} is below the 64x64 minimum")]
    TooSmall {
        /// Width.
        width: u32,
        /// Height.
        height: u32,
    },
    /// Larger than the type's max resolution.
    #[error("mode {width}x{height} is above the type's max resolution {max_width}x{max_height}")]
    AboveMaxResolution {
        /// Width.
        width: u32,
        /// Height.
        height: u32,
        /// Type limit.
        max_width: u32,
        /// Type limit.
        max_height: u32,
    },
    /// The head shows guest memory, and no guest memory was given to read it from.
    #[error("guest memory is not mapped")]
    NoGuestMemory,
    /// The image would reach past the end of VRAM.
    #[error("scanout ends at {end:#x}, past the {vram:#x}-byte VRAM")]
    PastVram {
        /// One past the last byte the image needs.
        end: u64,
        /// VRAM size.
        vram: u64,
    },
}

/// A captured image: tightly packed rows in the scanout's pixel format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Pixels per line.
    pub width: u32,
    /// Lines.
    pub height: u32,
    /// Pixel layout of `data`.
    pub format: PixelFormat,
    /// `width * bpp` bytes per row, `height` rows.
    pub data: Vec<u8>,
}

impl Frame {
    /// Copies the scanout's visible rows out of VRAM. The scanout invariant guarantees every
    /// row lies inside VRAM; a row that does not (a backing smaller than claimed) is left black
    /// rather than read.
    pub fn capture<V: VramRead + ?Sized>(scanout: &Scanout, vram: &V) -> Frame {
        let row = scanout.width as usize * scanout.format.bytes_per_pixel() as usize;
        let mut data = vec![0u8; row * scanout.height as usize];
        if scanout.stride as usize == row {
            // Contiguous image: one copy.
            vram.read(scanout.offset, &mut data);
        } else {
            for (y, dst) in data.chunks_exact_mut(row.max(1)).enumerate() {
                let at = scanout.offset + u64::from(scanout.stride) * y as u64;
                vram.read(at, dst);
            }
        }
        Frame {
            width: scanout.width,
            height: scanout.height,
            format: scanout.format,
            data,
        }
    }

    /// The image as packed 8-bit RGB (what a PNG encoder takes).
    pub fn to_rgb8(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.width as usize * self.height as usize * 3);
        match self.format.rgb_bytes() {
            Some([r, g, b]) => {
                for p in self.data.chunks_exact(4) {
                    out.extend_from_slice(&[p[r], p[g], p[b]]);
                }
            }
            None => {
                for p in self.data.chunks_exact(2) {
                    let v = u16::from_le_bytes([p[0], p[1]]);
                    let (r, g, b) = ((v >> 11) & 0x1f, (v >> 5) & 0x3f, v & 0x1f);
                    // Replicate high bits into the low ones: 0x1f -> 0xff, 0 -> 0.
                    out.extend_from_slice(&[
                        ((r << 3) | (r >> 2)) as u8,
                        ((g << 2) | (g >> 4)) as u8,
                        ((b << 3) | (b >> 2)) as u8,
                    ]);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vram::{VecVram, Vram};

    #[test]
    fn capture_skips_stride_padding_and_converts() {
        let mut vram = VecVram::new(4096);
        // Two rows of two XRGB pixels, stride 16, starting at 8.
        let px = |r: u8, g: u8, b: u8| [b, g, r, 0xaa];
        for (i, p) in [px(1, 2, 3), px(4, 5, 6), px(7, 8, 9), px(10, 11, 12)]
            .iter()
            .enumerate()
        {
            let at = 8 + (i / 2) * 16 + (i % 2) * 4;
            vram.write(at as u64, p);
        }
        let s = Scanout {
            offset: 8,
            stride: 16,
            width: 2,
            height: 2,
            format: PixelFormat::Xrgb8888,
        };
        assert_eq!(s.span(), 24);
        let f = Frame::capture(&s, &vram);
        assert_eq!(f.to_rgb8(), vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    }

    #[test]
    fn rgb565_and_big_endian_convert() {
        let f = Frame {
            width: 2,
            height: 1,
            format: PixelFormat::Rgb565,
            data: vec![0x00, 0xf8, 0xff, 0x07],
        };
        assert_eq!(f.to_rgb8(), vec![255, 0, 0, 0, 255, 255]);
        let f = Frame {
            width: 1,
            height: 1,
            format: PixelFormat::Xrgb8888BigEndian,
            data: vec![0, 1, 2, 3],
        };
        assert_eq!(f.to_rgb8(), vec![1, 2, 3]);
    }

    #[test]
    fn every_32bpp_byte_order_converts() {
        // The pixel red=1, green=2, blue=3, alpha/X=9 as each format lays it out in memory.
        let cases = [
            (PixelFormat::Xrgb8888, [3, 2, 1, 9]),
            (PixelFormat::Argb8888, [3, 2, 1, 9]),
            (PixelFormat::Xrgb8888BigEndian, [9, 1, 2, 3]),
            (PixelFormat::Bgra8888, [9, 1, 2, 3]),
            (PixelFormat::Bgrx8888, [9, 1, 2, 3]),
            (PixelFormat::Abgr8888, [1, 2, 3, 9]),
            (PixelFormat::Xbgr8888, [1, 2, 3, 9]),
            (PixelFormat::Rgba8888, [9, 3, 2, 1]),
            (PixelFormat::Rgbx8888, [9, 3, 2, 1]),
        ];
        for (format, bytes) in cases {
            assert_eq!(format.bytes_per_pixel(), 4);
            let f = Frame {
                width: 1,
                height: 1,
                format,
                data: bytes.to_vec(),
            };
            assert_eq!(f.to_rgb8(), vec![1, 2, 3], "{}", format.as_str());
        }
    }
}

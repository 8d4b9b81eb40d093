//! VRAM backing: a trait, so the model runs on a `Vec` in tests and on a shared memfd mapping in
//! the server.

use std::fmt;

/// Read access to VRAM: what copying a frame out needs. A server can offer it on a second
/// handle (a read-only view of shared memory), so frames are copied without holding the device.
///
/// An implementation must never touch memory outside its backing: out-of-range parts of a read
/// are filled with zeros.
pub trait VramRead {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Copies VRAM at `offset` into `dst`.
    fn read(&self, offset: u64, dst: &mut [u8]);
}

/// Byte-addressable video memory of a fixed size.
///
/// Callers (the device model) check every range against [`VramRead::size`] before calling; an
/// implementation must still never touch memory outside its backing: out-of-range parts of a
/// read are filled with zeros and of a write are dropped.
pub trait Vram: VramRead + Send + fmt::Debug {
    /// Copies `src` into VRAM at `offset`.
    fn write(&mut self, offset: u64, src: &[u8]);
}

/// VRAM in a heap buffer, for tests and tools.
#[derive(Clone, PartialEq, Eq)]
pub struct VecVram(Vec<u8>);

impl VecVram {
    /// `size` bytes of zeroed VRAM.
    pub fn new(size: usize) -> Self {
        VecVram(vec![0; size])
    }

    /// The contents.
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for VecVram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VecVram({} bytes)", self.0.len())
    }
}

/// VRAM that has a size but holds nothing: reads return zeros, writes are dropped. For the ABI
/// fingerprint (which needs the device, not its pixels) and for fuzzing (no per-run allocation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NullVram(pub u64);

impl VramRead for NullVram {
    fn size(&self) -> u64 {
        self.0
    }
    fn read(&self, _offset: u64, dst: &mut [u8]) {
        dst.fill(0);
    }
}

impl Vram for NullVram {
    fn write(&mut self, _offset: u64, _src: &[u8]) {}
}

/// The in-bounds part of `[offset, offset + len)` within `size`, as a `usize` range.
pub fn clamp_range(size: u64, offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let size = usize::try_from(size).ok()?;
    if start >= size {
        return None;
    }
    Some(start..start.saturating_add(len).min(size))
}

impl VramRead for VecVram {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read(&self, offset: u64, dst: &mut [u8]) {
        let n = match clamp_range(self.size(), offset, dst.len()) {
            Some(r) => {
                let n = r.len();
                dst[..n].copy_from_slice(&self.0[r]);
                n
            }
            None => 0,
        };
        dst[n..].fill(0);
    }
}

impl Vram for VecVram {
    fn write(&mut self, offset: u64, src: &[u8]) {
        if let Some(r) = clamp_range(self.size(), offset, src.len()) {
            let n = r.len();
            self.0[r].copy_from_slice(&src[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_is_zero_and_dropped() {
        let mut v = VecVram::new(8);
        v.write(6, &[1, 2, 3, 4]);
        assert_eq!(v.as_slice(), &[0, 0, 0, 0, 0, 0, 1, 2]);
        let mut b = [9u8; 4];
        v.read(7, &mut b);
        assert_eq!(b, [2, 0, 0, 0]);
        v.read(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
        v.write(u64::MAX, &[5]);
        assert_eq!(v.as_slice()[7], 2);
    }
}

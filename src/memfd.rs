//! VRAM backed by a memfd: sparse until written, shared with the client through the region fd.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use vgpu_model::vram::{clamp_range, Vram};
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

/// Creates an anonymous memory file (close-on-exec) of `size` bytes. Its pages are allocated
/// only when touched.
pub fn memfd(name: &str, size: u64) -> io::Result<File> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call; memfd_create
    // reads it and returns a new descriptor or -1, touching no other memory.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size)?;
    Ok(file)
}

/// Maps `size` bytes of `file` at `offset`, shared, with protection `prot`. The file must be at
/// least `offset + size` bytes long (checked: touching a page past its end raises SIGBUS).
pub fn map_shared(file: File, offset: u64, size: u64, prot: i32) -> io::Result<MmapRegion> {
    let len = file.metadata()?.len();
    if offset.checked_add(size).is_none_or(|end| end > len) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let size = usize::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    MmapRegion::build(
        Some(FileOffset::new(file, offset)),
        size,
        prot,
        libc::MAP_SHARED,
    )
    .map_err(|e| match e {
        vm_memory::mmap::MmapRegionError::Mmap(io) => io,
        _ => io::Error::from_raw_os_error(libc::EINVAL),
    })
}

/// VRAM in a shared memfd mapping.
#[derive(Debug)]
pub struct MemfdVram {
    file: File,
    map: MmapRegion,
}

impl MemfdVram {
    /// `size` bytes of zeroed, sparse VRAM named `name` (visible in /proc/PID/fd).
    pub fn new(name: &str, size: u64) -> io::Result<Self> {
        let file = memfd(name, size)?;
        let map = map_shared(
            file.try_clone()?,
            0,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
        )?;
        Ok(MemfdVram { file, map })
    }

    /// The memfd, to pass to a client as the VRAM region's fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Vram for MemfdVram {
    fn size(&self) -> u64 {
        self.map.size() as u64
    }

    fn read(&self, offset: u64, dst: &mut [u8]) {
        dst.fill(0);
        if let Some(r) = clamp_range(self.size(), offset, dst.len()) {
            let n = r.len();
            // In bounds by construction; a failure leaves zeros.
            let _ = self
                .map
                .as_volatile_slice()
                .read_slice(&mut dst[..n], r.start);
        }
    }

    fn write(&mut self, offset: u64, src: &[u8]) {
        if let Some(r) = clamp_range(self.size(), offset, src.len()) {
            let n = r.len();
            let _ = self.map.as_volatile_slice().write_slice(&src[..n], r.start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_vram_reads_back_and_stays_in_bounds() {
        let mut v = MemfdVram::new("test-vram", 1 << 20).unwrap();
        assert_eq!(v.size(), 1 << 20);
        v.write((1 << 20) - 2, &[1, 2, 3, 4]);
        let mut b = [9u8; 4];
        v.read((1 << 20) - 2, &mut b);
        assert_eq!(b, [1, 2, 0, 0]);
        v.read(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
        // The client sees the same bytes through the fd.
        let shared = map_shared(
            v.fd().try_clone_to_owned().unwrap().into(),
            0,
            1 << 20,
            libc::PROT_READ,
        )
        .unwrap();
        let mut c = [0u8; 2];
        shared
            .as_volatile_slice()
            .read_slice(&mut c, (1 << 20) - 2)
            .unwrap();
        assert_eq!(c, [1, 2]);
    }

    #[test]
    fn mapping_past_the_end_of_a_file_is_refused() {
        let f = memfd("small", 4096).unwrap();
        let e = map_shared(f, 0, 8192, libc::PROT_READ).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let f = memfd("small", 4096).unwrap();
        assert!(map_shared(f, u64::MAX, 4096, libc::PROT_READ).is_err());
    }
}

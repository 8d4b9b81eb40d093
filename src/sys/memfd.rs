//! Shared memory with a client: VRAM in a sealed memfd, and mappings of the client's files.
//!
//! Memory shared with an untrusted client is only safe to touch while its file cannot shrink:
//! touching a page of a `MAP_SHARED` mapping past the end of its file raises SIGBUS, which would
//! take the whole process (in a daemon, every tenant) down. So:
//! - the VRAM memfd we hand out is sealed against shrinking, growing and further sealing
//!   (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`) before any client sees it; and
//! - a client's file (a DMA map) is mapped only when it carries `F_SEAL_SHRINK` (QEMU's
//!   `memory-backend-memfd` sets it by default), and only after its size has been checked *after*
//!   the seal was seen, so it cannot shrink between the check and the access. A file without the
//!   seal is not mapped at all (see `dma.rs`).
//!
//! Mappings keep no descriptor open: the kernel keeps the file alive for as long as it is mapped,
//! and a client cannot grow our descriptor table by mapping memory.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use vgpu_model::vram::{clamp_range, Vram, VramRead};
use vm_memory::{Bytes, MmapRegion, VolatileMemory};

/// The seals our VRAM carries: its size is fixed for good, and nobody can change that.
const VRAM_SEALS: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

fn memfd_create(name: &str, size: u64) -> io::Result<File> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call; memfd_create
    // reads it and returns a new descriptor or -1, touching no other memory.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size)?;
    Ok(file)
}

/// Creates an anonymous memory file (close-on-exec) of `size` bytes whose size is sealed
/// (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`): safe to hand to a client and to map. Its pages
/// are allocated only when touched.
pub fn memfd(name: &str, size: u64) -> io::Result<File> {
    let file = memfd_create(name, size)?;
    // SAFETY: F_ADD_SEALS takes an int argument and touches no memory of ours.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, VRAM_SEALS) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// A memory file of `size` bytes *without* seals (its size can change): what a careless or
/// hostile client might share. For tests.
#[doc(hidden)]
pub fn memfd_unsealed(name: &str, size: u64) -> io::Result<File> {
    memfd_create(name, size)
}

/// Whether `fd` carries `F_SEAL_SHRINK`, so that its size can never drop below what we check.
/// Files that cannot be sealed at all (not a memfd, a pipe) answer false.
pub fn cannot_shrink(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: F_GET_SEALS takes no argument and touches no memory of ours.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

/// A shared mapping of part of a file, unmapped on drop. Holds no descriptor.
#[derive(Debug)]
pub struct Mapping {
    region: MmapRegion,
}

// SAFETY: the mapping is plain shared memory; `MmapRegion` is Send and Sync, and the only extra
// state here is the ownership of the address range, which moves with the value.
unsafe impl Send for Mapping {}
// SAFETY: as above; all access goes through `MmapRegion`'s volatile accessors.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `size` bytes of `file` at `offset`, shared, with protection `prot`. The caller must
    /// know that the file cannot shrink (a seal, or a file of its own); its current length is
    /// checked here: touching a page past the end would raise SIGBUS.
    pub fn new(file: &File, offset: u64, size: u64, prot: i32) -> io::Result<Mapping> {
        let einval = || io::Error::from_raw_os_error(libc::EINVAL);
        let len = file.metadata()?.len();
        if size == 0 || offset.checked_add(size).is_none_or(|end| end > len) {
            return Err(einval());
        }
        let size = usize::try_from(size).map_err(|_| einval())?;
        let off = libc::off_t::try_from(offset).map_err(|_| einval())?;
        // SAFETY: a fresh mapping at an address of the kernel's choosing (no MAP_FIXED), so no
        // existing memory is affected; the result is checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `addr..addr + size` is the mapping just created, owned by the `Mapping` we
        // return, which unmaps it exactly once, on drop.
        match unsafe { MmapRegion::build_raw(addr.cast(), size, prot, libc::MAP_SHARED) } {
            Ok(region) => Ok(Mapping { region }),
            Err(_) => {
                // SAFETY: unmaps the mapping just created, which nothing else refers to.
                unsafe { libc::munmap(addr, size) };
                Err(einval())
            }
        }
    }

    /// The mapped memory.
    pub fn region(&self) -> &MmapRegion {
        &self.region
    }

    /// Length in bytes.
    pub fn size(&self) -> u64 {
        self.region.size() as u64
    }

    /// Copies `dst.len()` bytes at `offset` out (zeros where out of range).
    pub fn read(&self, offset: u64, dst: &mut [u8]) {
        let n = match clamp_range(self.size(), offset, dst.len()) {
            Some(r) => {
                let n = r.len();
                // In bounds by construction; a failure reads as zeros.
                if self
                    .region
                    .as_volatile_slice()
                    .read_slice(&mut dst[..n], r.start)
                    .is_err()
                {
                    0
                } else {
                    n
                }
            }
            None => 0,
        };
        dst[n..].fill(0);
    }

    /// Copies `src` in at `offset` (the out-of-range part is dropped).
    pub fn write(&self, offset: u64, src: &[u8]) {
        if let Some(r) = clamp_range(self.size(), offset, src.len()) {
            let n = r.len();
            let _ = self
                .region
                .as_volatile_slice()
                .write_slice(&src[..n], r.start);
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by `Mapping::new` and belongs to this value alone; the
        // `MmapRegion` was built over it without ownership and does not unmap it.
        unsafe { libc::munmap(self.region.as_ptr().cast(), self.region.size()) };
    }
}

/// VRAM in a sealed, shared memfd mapping. Holds no descriptor: the memfd goes to whoever
/// hands it to clients.
#[derive(Debug)]
pub struct MemfdVram {
    map: std::sync::Arc<Mapping>,
}

impl MemfdVram {
    /// `size` bytes of zeroed, sparse VRAM in a memfd named `name` (visible in /proc/PID/maps),
    /// and that memfd, sealed against resizing: the region fd for clients.
    pub fn new(name: &str, size: u64) -> io::Result<(Self, File)> {
        let file = memfd(name, size)?;
        let map = Mapping::new(&file, 0, size, libc::PROT_READ | libc::PROT_WRITE)?;
        let vram = MemfdVram {
            map: std::sync::Arc::new(map),
        };
        Ok((vram, file))
    }

    /// A read-only view of the same memory that can be read without the device (and its lock):
    /// screenshots copy frames through it while the guest's register path runs on.
    pub fn view(&self) -> VramView {
        VramView(self.map.clone())
    }
}

impl VramRead for MemfdVram {
    fn size(&self) -> u64 {
        self.map.size()
    }

    fn read(&self, offset: u64, dst: &mut [u8]) {
        self.map.read(offset, dst);
    }
}

impl Vram for MemfdVram {
    fn write(&mut self, offset: u64, src: &[u8]) {
        self.map.write(offset, src);
    }
}

/// Shared read access to an instance's VRAM, outside the instance lock. The guest may write
/// while a copy runs (as it may while a real display engine scans out): a frame can tear, but
/// every access stays inside the sealed mapping.
#[derive(Clone, Debug)]
pub struct VramView(std::sync::Arc<Mapping>);

impl VramRead for VramView {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read(&self, offset: u64, dst: &mut [u8]) {
        self.0.read(offset, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn memfd_vram_reads_back_and_stays_in_bounds() {
        let (mut v, file) = MemfdVram::new("test-vram", 1 << 20).unwrap();
        assert_eq!(v.size(), 1 << 20);
        v.write((1 << 20) - 2, &[1, 2, 3, 4]);
        let mut b = [9u8; 4];
        v.read((1 << 20) - 2, &mut b);
        assert_eq!(b, [1, 2, 0, 0]);
        v.read(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
        // The client sees the same bytes through the fd.
        let shared = Mapping::new(&file, 0, 1 << 20, libc::PROT_READ).unwrap();
        let mut c = [0u8; 2];
        shared.read((1 << 20) - 2, &mut c);
        assert_eq!(c, [1, 2]);
        // And so does a view.
        let mut d = [0u8; 2];
        v.view().read((1 << 20) - 2, &mut d);
        assert_eq!(d, [1, 2]);
    }

    #[test]
    fn mapping_past_the_end_of_a_file_is_refused() {
        let f = memfd("small", 4096).unwrap();
        let e = Mapping::new(&f, 0, 8192, libc::PROT_READ).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        assert!(Mapping::new(&f, u64::MAX, 4096, libc::PROT_READ).is_err());
        assert!(Mapping::new(&f, 0, 0, libc::PROT_READ).is_err());
    }

    #[test]
    fn vram_cannot_be_resized_by_whoever_holds_its_fd() {
        let (_v, client) = MemfdVram::new("sealed", 1 << 16).unwrap();
        assert!(client.set_len(0).is_err(), "shrinking is sealed");
        assert!(client.set_len(1 << 20).is_err(), "growing is sealed");
        // SAFETY: F_ADD_SEALS with an int argument.
        let r = unsafe { libc::fcntl(client.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert!(r < 0, "the seals themselves are sealed");
        assert!(cannot_shrink(client.as_fd()));
    }

    #[test]
    fn only_shrink_sealed_files_count_as_safe() {
        let sealed = memfd("ram", 4096).unwrap();
        assert!(cannot_shrink(sealed.as_fd()));
        let open = memfd_unsealed("ram", 4096).unwrap();
        assert!(!cannot_shrink(open.as_fd()));
        let (sock, _) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!cannot_shrink(sock.as_fd()));
    }

    #[test]
    fn mappings_hold_no_descriptor() {
        let f = memfd("no-fd-probe", 1 << 16).unwrap();
        let maps: Vec<Mapping> = (0..8)
            .map(|_| Mapping::new(&f, 0, 1 << 16, libc::PROT_READ).unwrap())
            .collect();
        drop(f);
        let fds = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|t| t.to_string_lossy().contains("no-fd-probe"))
            .count();
        assert_eq!(fds, 0, "no descriptor stays open for a mapping");
        let maps_text = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert_eq!(maps_text.matches("no-fd-probe").count(), 8);
        drop(maps);
        let maps_text = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert_eq!(
            maps_text.matches("no-fd-probe").count(),
            0,
            "unmapped on drop"
        );
    }
}

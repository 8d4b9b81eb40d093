//! The client's DMA map table: guest memory regions announced with DMA_MAP.
//!
//! QEMU announces all guest RAM before DEVICE_GET_INFO; some regions come with an fd, some
//! without (recorded only). An fd is mapped only when the file cannot shrink under us
//! (`F_SEAL_SHRINK`, which QEMU's `memory-backend-memfd` sets by default) and is large enough;
//! otherwise touching the mapping after the client truncated the file would raise SIGBUS. A file
//! without the seal is recorded like an fd-less region: reachable only through DMA_READ/WRITE
//! messages, never through a mapping.
//!
//! The device model reaches guest RAM as a [`GuestRam`] built from the mapped, writable regions
//! ([`DmaMaps::guest_ram`]). Each of its regions holds a reference on its mapping, so a handle a
//! screenshot still holds keeps the pages mapped after the client unmapped them; the pages go
//! when the last holder lets go. Regions the client announced read-only are left out: the model
//! writes (rings, responses), and a write to a read-only mapping would fault.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use vgpu_model::bus::{GuestRam, RamRegion};
use vm_memory::{GuestAddress, GuestRegionCollection, GuestRegionMmap, MmapRegion};

use crate::sys::memfd::{cannot_shrink, Mapping};

/// Most regions one client may map (bounds the table's memory; mappings hold no descriptor).
pub const MAX_MAPS: usize = 16384;

/// What became of a region's fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapped {
    /// No fd came with the region.
    NoFd,
    /// Mapped.
    Yes,
    /// The file could shrink (no `F_SEAL_SHRINK`): not mapped, the fd closed.
    NotSealed,
}

/// One mapped guest region.
#[derive(Debug)]
pub struct DmaRegion {
    /// Length.
    pub size: u64,
    /// READ / WRITE flags as sent.
    pub flags: u32,
    /// The mapping, when the client sent the fd of a file that cannot shrink.
    pub map: Option<Arc<Mapping>>,
}

/// Guest address -> region.
#[derive(Debug, Default)]
pub struct DmaMaps {
    regions: BTreeMap<u64, DmaRegion>,
}

impl DmaMaps {
    /// Adds `[addr, addr + size)`. Returns an errno on failure.
    pub fn map(
        &mut self,
        addr: u64,
        size: u64,
        offset: u64,
        flags: u32,
        fd: Option<OwnedFd>,
    ) -> Result<Mapped, i32> {
        let end = addr.checked_add(size).ok_or(libc::EINVAL)?;
        if size == 0 || flags & !(libc::PROT_READ as u32 | libc::PROT_WRITE as u32) != 0 {
            return Err(libc::EINVAL);
        }
        if self.regions.len() >= MAX_MAPS {
            return Err(libc::ENOSPC);
        }
        // Overlap with the region starting at or before `addr`, or any starting inside.
        let before = self.regions.range(..=addr).next_back();
        let overlaps_before = before.is_some_and(|(&a, r)| a + r.size > addr);
        let overlaps_after = self.regions.range(addr..end).next().is_some();
        if overlaps_before || overlaps_after {
            return Err(libc::EEXIST);
        }
        let (map, mapped) = match fd {
            // The seal first, then the size: once the seal is seen, the size can only grow.
            Some(fd) if cannot_shrink(fd.as_fd()) => {
                // VFIO_DMA_MAP_FLAG_READ/WRITE have the values of PROT_READ/PROT_WRITE.
                let prot = flags as i32;
                let map = Mapping::new(&File::from(fd), offset, size, prot)
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))?;
                (Some(Arc::new(map)), Mapped::Yes)
            }
            Some(_) => (None, Mapped::NotSealed),
            None => (None, Mapped::NoFd),
        };
        self.regions.insert(addr, DmaRegion { size, flags, map });
        Ok(mapped)
    }

    /// Removes every region inside `[addr, addr + size)`. A region only partly inside is an
    /// error (EINVAL) and nothing is removed.
    pub fn unmap(&mut self, addr: u64, size: u64) -> Result<usize, i32> {
        let end = addr.checked_add(size).ok_or(libc::EINVAL)?;
        let before = self.regions.range(..addr).next_back();
        if before.is_some_and(|(&a, r)| a + r.size > addr) {
            return Err(libc::EINVAL);
        }
        let inside: Vec<u64> = self.regions.range(addr..end).map(|(&a, _)| a).collect();
        if inside.iter().any(|a| a + self.regions[a].size > end) {
            return Err(libc::EINVAL);
        }
        for a in &inside {
            self.regions.remove(a);
        }
        Ok(inside.len())
    }

    /// Removes everything.
    pub fn clear(&mut self) -> usize {
        let n = self.regions.len();
        self.regions.clear();
        n
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// No regions.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Guest RAM as the device model sees it: every mapped region the client made readable and
    /// writable. Possibly empty (a client whose RAM could not be mapped): the device then finds
    /// its rings unreachable and says so, rather than waiting for memory that will not come.
    pub fn guest_ram(&self) -> Arc<GuestRam> {
        let rw = libc::PROT_READ as u32 | libc::PROT_WRITE as u32;
        let regions: Vec<RamRegion> = self
            .regions
            .iter()
            .filter(|(_, r)| r.flags & rw == rw)
            .filter_map(|(&addr, r)| {
                let map = r.map.as_ref()?;
                let raw = map.region();
                // SAFETY: `raw` describes the whole of `map`'s live shared mapping, and the
                // region built here holds a reference on `map` (below), so the memory stays
                // mapped for as long as the region exists. Prot and flags are the mapping's own.
                let region = unsafe {
                    MmapRegion::build_raw(
                        raw.as_ptr(),
                        raw.size(),
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                    )
                }
                .ok()?;
                let region = GuestRegionMmap::new(region, GuestAddress(addr))?;
                Some(RamRegion::new(region, Some(Box::new(map.clone()))))
            })
            .collect();
        if regions.is_empty() {
            return Arc::new(GuestRegionCollection::new());
        }
        // The table keeps regions sorted and disjoint, which is all the collection checks.
        Arc::new(GuestRegionCollection::from_regions(regions).unwrap_or_default())
    }

    /// Bytes mapped with an fd.
    pub fn mapped_bytes(&self) -> u64 {
        self.regions
            .values()
            .filter(|r| r.map.is_some())
            .map(|r| r.size)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::memfd::{memfd, memfd_unsealed};

    #[test]
    fn map_unmap_and_overlaps() {
        let mut m = DmaMaps::default();
        assert_eq!(m.map(0x1000, 0x2000, 0, 3, None), Ok(Mapped::NoFd));
        assert_eq!(m.map(0x2000, 0x1000, 0, 3, None), Err(libc::EEXIST));
        assert_eq!(m.map(0x0, 0x1001, 0, 3, None), Err(libc::EEXIST));
        let mapped = m.map(
            0x3000,
            0x1000,
            0,
            3,
            Some(memfd("ram", 0x1000).unwrap().into()),
        );
        assert_eq!(mapped, Ok(Mapped::Yes));
        assert_eq!(m.mapped_bytes(), 0x1000);
        assert_eq!(m.unmap(0x1000, 0x1000), Err(libc::EINVAL), "partial unmap");
        assert_eq!(m.unmap(0x0, 0x4000), Ok(2));
        assert_eq!(m.len(), 0);
        assert_eq!(m.map(u64::MAX, 2, 0, 3, None), Err(libc::EINVAL));
        assert_eq!(m.map(0, 0, 0, 3, None), Err(libc::EINVAL));
    }

    #[test]
    fn an_fd_smaller_than_the_map_is_refused() {
        let mut m = DmaMaps::default();
        let small = memfd("ram", 0x1000).unwrap();
        assert_eq!(
            m.map(0, 0x2000, 0, 3, Some(small.into())),
            Err(libc::EINVAL)
        );
        let f = memfd("ram", 0x2000).unwrap();
        assert_eq!(
            m.map(0, 0x1000, 0x1001, 3, Some(f.into())),
            Err(libc::EINVAL),
            "offset not page aligned"
        );
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn guest_ram_holds_writable_mapped_regions_and_outlives_an_unmap() {
        use vm_memory::{Bytes, GuestMemoryBackend};
        let mut m = DmaMaps::default();
        assert_eq!(m.guest_ram().num_regions(), 0);
        let f = memfd("ram", 0x2000).unwrap();
        let client = f.try_clone().unwrap();
        m.map(0x10000, 0x2000, 0, 3, Some(f.into())).unwrap();
        m.map(0x0, 0x1000, 0, 3, None).unwrap();
        let ro = memfd("rom", 0x1000).unwrap();
        m.map(0x20000, 0x1000, 0, 1, Some(ro.into())).unwrap();
        let ram = m.guest_ram();
        assert_eq!(
            ram.num_regions(),
            1,
            "fd-less and read-only regions are left out"
        );
        ram.write_slice(b"ring", GuestAddress(0x11000)).unwrap();
        let mut b = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&client, &mut b, 0x1000).unwrap();
        assert_eq!(&b, b"ring", "the client sees what the model wrote");
        assert!(ram.read_slice(&mut b, GuestAddress(0x0)).is_err());
        assert!(ram.read_slice(&mut b, GuestAddress(0x20000)).is_err());
        // The client unmaps; a holder of the old handle still reads valid memory.
        m.clear();
        ram.read_slice(&mut b, GuestAddress(0x11000)).unwrap();
        assert_eq!(&b, b"ring");
    }

    /// A file the client could truncate is never mapped: a later access would raise SIGBUS.
    #[test]
    fn a_file_that_can_shrink_is_not_mapped() {
        let mut m = DmaMaps::default();
        let f = memfd_unsealed("ram", 0x2000).unwrap();
        let client = f.try_clone().unwrap();
        assert_eq!(
            m.map(0, 0x2000, 0, 3, Some(f.into())),
            Ok(Mapped::NotSealed)
        );
        assert_eq!(m.len(), 1, "recorded, as an fd-less region");
        assert_eq!(m.mapped_bytes(), 0);
        // The client truncating its file now cannot hurt us.
        client.set_len(0).unwrap();
        assert_eq!(m.unmap(0, 0x2000), Ok(1));
    }
}

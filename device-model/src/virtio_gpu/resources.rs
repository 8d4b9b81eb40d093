//! Resources of one GPU: host-side 2D images, guest-memory blobs, their backings (scatter lists
//! in guest memory), and the memory budget they are charged to.
//!
//! The budget is the type's `framebuffer` bytes. A 2D resource is charged its full pixel size
//! (`width * height * 4`) at creation, though the host allocates the pixels only at its first
//! transfer; a blob is charged [`BLOB_CHARGE`] (its pixels stay in guest memory); a backing is
//! charged [`ENTRY_CHARGE`] per entry. The charges of the live resources always add up to
//! [`Resources::used`].

use std::collections::BTreeMap;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::protocol::{ErrorCode, MemEntry};
use crate::scanout::PixelFormat;

/// Most live resources per GPU (ERR_OUT_OF_MEMORY beyond).
pub const MAX_RESOURCES: usize = 16384;
/// Bookkeeping charge of one blob resource.
pub const BLOB_CHARGE: u64 = 4096;
/// Bookkeeping charge of one backing entry (its address, length and running offset).
pub const ENTRY_CHARGE: u64 = 32;

/// A backing: guest ranges that read as one contiguous byte range, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backing {
    entries: Vec<MemEntry>,
    /// Byte offset of each entry inside the backing (ascending).
    starts: Vec<u64>,
    len: u64,
}

impl Backing {
    /// A backing of `entries`, each checked to lie inside `mem` (ERR_UNSPEC otherwise, as a
    /// range the device cannot map).
    pub fn new<M: GuestMemory + ?Sized>(
        mem: &M,
        entries: Vec<MemEntry>,
    ) -> Result<Backing, ErrorCode> {
        let mut starts = Vec::with_capacity(entries.len());
        let mut len = 0u64;
        for e in &entries {
            let end = e.addr.checked_add(u64::from(e.length));
            if end.is_none()
                || (e.length > 0
                    && !mem.check_range(GuestAddress(e.addr), e.length as usize, Permissions::Read))
            {
                return Err(ErrorCode::Unspec);
            }
            starts.push(len);
            // At most 16384 entries of < 4 GiB: no overflow.
            len += u64::from(e.length);
        }
        Ok(Backing {
            entries,
            starts,
            len,
        })
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// No bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries.
    pub fn entries(&self) -> &[MemEntry] {
        &self.entries
    }

    /// Reads `buf.len()` bytes at `offset` inside the backing. Bytes past the backing or
    /// outside guest memory (it may have shrunk since the check) read as zero. Returns whether
    /// every byte was read.
    pub fn read<M: GuestMemory + ?Sized>(&self, mem: &M, offset: u64, buf: &mut [u8]) -> bool {
        let mut complete = true;
        let mut done = 0usize;
        let mut at = offset;
        // The entry holding `at`: the last one starting at or before it.
        let mut i = self.starts.partition_point(|&s| s <= at).saturating_sub(1);
        while done < buf.len() {
            let (Some(e), Some(&start)) = (self.entries.get(i), self.starts.get(i)) else {
                break;
            };
            let inside = at.saturating_sub(start);
            let avail = u64::from(e.length).saturating_sub(inside);
            if at < start || avail == 0 {
                i += 1;
                continue;
            }
            let n = (buf.len() - done).min(usize::try_from(avail).unwrap_or(usize::MAX));
            let Some(dst) = buf.get_mut(done..done + n) else {
                break;
            };
            // e.addr + e.length did not overflow (checked at creation).
            if mem.read_slice(dst, GuestAddress(e.addr + inside)).is_err() {
                dst.fill(0);
                complete = false;
            }
            done += n;
            at += n as u64;
            i += 1;
        }
        if let Some(rest) = buf.get_mut(done..) {
            if !rest.is_empty() {
                rest.fill(0);
                complete = false;
            }
        }
        complete
    }
}

/// A host-side 2D resource.
#[derive(Clone, Debug)]
pub struct Image {
    /// Pixels per row.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Pixel layout.
    pub format: PixelFormat,
    /// `width * height * 4` bytes once the guest transferred into it (copy-on-write: a
    /// screenshot holding a clone never blocks a transfer).
    pub pixels: Option<Arc<Vec<u8>>>,
    /// The guest's copy, if attached.
    pub backing: Option<Arc<Backing>>,
}

impl Image {
    /// Bytes per row (fits u32: checked at creation).
    pub fn stride(&self) -> u32 {
        self.width.wrapping_mul(4)
    }

    /// Bytes of the pixels.
    pub fn size(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height) * 4
    }

    /// The pixels for writing, allocated (zeroed) on first use; ERR_OUT_OF_MEMORY when the
    /// host cannot allocate them.
    pub fn pixels_mut(&mut self) -> Result<&mut Vec<u8>, ErrorCode> {
        if self.pixels.is_none() {
            let n = usize::try_from(self.size()).map_err(|_| ErrorCode::OutOfMemory)?;
            let mut v = Vec::new();
            v.try_reserve_exact(n).map_err(|_| ErrorCode::OutOfMemory)?;
            v.resize(n, 0);
            self.pixels = Some(Arc::new(v));
        }
        match self.pixels.as_mut() {
            Some(p) => Ok(Arc::make_mut(p)),
            None => Err(ErrorCode::OutOfMemory),
        }
    }
}

/// A guest-memory blob.
#[derive(Clone, Debug)]
pub struct Blob {
    /// Bytes the guest declared.
    pub size: u64,
    /// Where they are (at least `size` bytes).
    pub backing: Arc<Backing>,
}

/// What a resource is.
#[derive(Clone, Debug)]
pub enum Kind {
    /// RESOURCE_CREATE_2D.
    Image(Image),
    /// RESOURCE_CREATE_BLOB (guest memory).
    Blob(Blob),
}

/// One resource and what it is charged.
#[derive(Clone, Debug)]
pub struct Resource {
    /// Its kind.
    pub kind: Kind,
    /// Budget bytes it holds.
    pub charge: u64,
}

/// The resource table and its budget.
#[derive(Debug)]
pub struct Resources {
    map: BTreeMap<u32, Resource>,
    budget: u64,
    used: u64,
}

impl Resources {
    /// An empty table with `budget` bytes.
    pub fn new(budget: u64) -> Resources {
        Resources {
            map: BTreeMap::new(),
            budget,
            used: 0,
        }
    }

    /// Budget bytes charged.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// The budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Live resources.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// No live resources.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Sum of the live resources' charges (equals [`Resources::used`]; for invariant checks).
    pub fn charged(&self) -> u64 {
        self.map.values().map(|r| r.charge).sum()
    }

    /// Host bytes of pixels actually allocated.
    pub fn allocated(&self) -> u64 {
        self.map
            .values()
            .filter_map(|r| match &r.kind {
                Kind::Image(i) => i.pixels.as_ref().map(|p| p.len() as u64),
                Kind::Blob(_) => None,
            })
            .sum()
    }

    /// Resource `id`.
    pub fn get(&self, id: u32) -> Option<&Resource> {
        self.map.get(&id)
    }

    /// Resource `id`, for writing.
    pub fn get_mut(&mut self, id: u32) -> Option<&mut Resource> {
        self.map.get_mut(&id)
    }

    fn reserve(&self, bytes: u64) -> Result<(), ErrorCode> {
        match self.used.checked_add(bytes) {
            Some(total) if total <= self.budget => Ok(()),
            _ => Err(ErrorCode::OutOfMemory),
        }
    }

    /// A new resource may take `id`: not 0, not in use, and the table not full.
    pub fn check_new_id(&self, id: u32) -> Result<(), ErrorCode> {
        if id == 0 || self.map.contains_key(&id) {
            return Err(ErrorCode::InvalidResourceId);
        }
        if self.map.len() >= MAX_RESOURCES {
            return Err(ErrorCode::OutOfMemory);
        }
        Ok(())
    }

    fn insert(&mut self, id: u32, kind: Kind, charge: u64) {
        self.used += charge;
        self.map.insert(id, Resource { kind, charge });
    }

    /// RESOURCE_CREATE_2D, arguments already decoded.
    pub fn create_image(
        &mut self,
        id: u32,
        format: PixelFormat,
        width: u32,
        height: u32,
    ) -> Result<(), ErrorCode> {
        self.check_new_id(id)?;
        if width == 0 || height == 0 || width.checked_mul(4).is_none() {
            return Err(ErrorCode::InvalidParameter);
        }
        let size = u64::from(width) * u64::from(height) * 4;
        self.reserve(size)?;
        let image = Image {
            width,
            height,
            format,
            pixels: None,
            backing: None,
        };
        self.insert(id, Kind::Image(image), size);
        Ok(())
    }

    /// RESOURCE_CREATE_BLOB with guest memory `backing`.
    pub fn create_blob(&mut self, id: u32, size: u64, backing: Backing) -> Result<(), ErrorCode> {
        self.check_new_id(id)?;
        if size == 0 || backing.len() < size {
            return Err(ErrorCode::InvalidParameter);
        }
        let charge = BLOB_CHARGE + ENTRY_CHARGE * backing.entries().len() as u64;
        self.reserve(charge)?;
        let blob = Blob {
            size,
            backing: Arc::new(backing),
        };
        self.insert(id, Kind::Blob(blob), charge);
        Ok(())
    }

    /// RESOURCE_UNREF.
    pub fn unref(&mut self, id: u32) -> Result<(), ErrorCode> {
        let r = self.map.remove(&id).ok_or(ErrorCode::InvalidResourceId)?;
        self.used -= r.charge;
        Ok(())
    }

    /// RESOURCE_ATTACH_BACKING on a 2D resource.
    pub fn attach(&mut self, id: u32, backing: Backing) -> Result<(), ErrorCode> {
        let charge = ENTRY_CHARGE * backing.entries().len() as u64;
        let room = self.reserve(charge);
        let r = self.map.get_mut(&id).ok_or(ErrorCode::InvalidResourceId)?;
        let Kind::Image(image) = &mut r.kind else {
            // A blob's memory is given at creation.
            return Err(ErrorCode::InvalidParameter);
        };
        if image.backing.is_some() {
            return Err(ErrorCode::Unspec);
        }
        if backing.len() < image.size() {
            return Err(ErrorCode::InvalidParameter);
        }
        room?;
        image.backing = Some(Arc::new(backing));
        r.charge += charge;
        self.used += charge;
        Ok(())
    }

    /// RESOURCE_DETACH_BACKING on a 2D resource.
    pub fn detach(&mut self, id: u32) -> Result<(), ErrorCode> {
        let r = self.map.get_mut(&id).ok_or(ErrorCode::InvalidResourceId)?;
        let Kind::Image(image) = &mut r.kind else {
            return Err(ErrorCode::InvalidParameter);
        };
        let backing = image.backing.take().ok_or(ErrorCode::Unspec)?;
        let charge = ENTRY_CHARGE * backing.entries().len() as u64;
        r.charge -= charge;
        self.used -= charge;
        Ok(())
    }

    /// Drops every resource.
    pub fn clear(&mut self) {
        self.map.clear();
        self.used = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn ram() -> GuestMemoryMmap<()> {
        // 0..64 KiB and 128..192 KiB: a hole between.
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x2_0000), 0x1_0000),
        ])
        .unwrap()
    }

    fn e(addr: u64, length: u32) -> MemEntry {
        MemEntry { addr, length }
    }

    #[test]
    fn backing_reads_across_entries_and_zero_fills_the_rest() {
        let mem = ram();
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(0x100)).unwrap();
        mem.write_slice(&[5, 6, 7, 8], GuestAddress(0x2_0000))
            .unwrap();
        let b = Backing::new(&mem, vec![e(0x100, 4), e(0x2_0000, 4)]).unwrap();
        assert_eq!(b.len(), 8);
        let mut buf = [0xffu8; 10];
        assert!(!b.read(&mem, 0, &mut buf));
        assert_eq!(buf, [1, 2, 3, 4, 5, 6, 7, 8, 0, 0]);
        let mut buf = [0xffu8; 3];
        assert!(b.read(&mem, 3, &mut buf));
        assert_eq!(buf, [4, 5, 6]);
        let mut buf = [0xffu8; 2];
        assert!(!b.read(&mem, u64::MAX, &mut buf));
        assert_eq!(buf, [0, 0]);
    }

    #[test]
    fn backing_outside_ram_is_refused() {
        let mem = ram();
        assert_eq!(
            Backing::new(&mem, vec![e(0xff00, 0x200)]),
            Err(ErrorCode::Unspec)
        );
        assert_eq!(
            Backing::new(&mem, vec![e(0x3_0000, 1)]),
            Err(ErrorCode::Unspec)
        );
        assert_eq!(
            Backing::new(&mem, vec![e(u64::MAX - 1, 16)]),
            Err(ErrorCode::Unspec)
        );
        // Empty entries anywhere are harmless.
        assert!(Backing::new(&mem, vec![e(u64::MAX, 0)]).is_ok());
    }

    #[test]
    fn budget_is_charged_and_released() {
        let mem = ram();
        let mut r = Resources::new(64 * 64 * 4 + 2 * ENTRY_CHARGE);
        r.create_image(1, PixelFormat::Xrgb8888, 64, 64).unwrap();
        assert_eq!(
            r.create_image(2, PixelFormat::Xrgb8888, 8, 8),
            Err(ErrorCode::OutOfMemory)
        );
        let b = Backing::new(&mem, vec![e(0, 0x2000), e(0x2000, 0x2000)]).unwrap();
        r.attach(1, b).unwrap();
        assert_eq!(r.used(), r.budget());
        assert_eq!(r.charged(), r.used());
        r.detach(1).unwrap();
        assert_eq!(r.used(), 64 * 64 * 4);
        r.unref(1).unwrap();
        assert_eq!((r.used(), r.len()), (0, 0));
    }
}

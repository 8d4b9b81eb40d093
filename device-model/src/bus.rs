//! What the model reaches outside itself, each through a small trait with a null
//! implementation for tests: guest memory (`vm-memory`), interrupts, and time.
//!
//! Guest memory is `vm-memory`'s [`GuestMemory`](vm_memory::GuestMemory); the server builds a
//! [`GuestRam`] from the client's DMA maps (only regions it could map: a range the client
//! announced without a usable fd is simply absent, so an access there fails like any address
//! outside RAM).
//!
//! Each [`RamRegion`] owns what keeps its mapping alive (the server's mapping object, which
//! unmaps on drop), so a `GuestRam` handed to a screenshot stays valid even if the client
//! unmaps the region meanwhile: the pages go when the last holder lets go.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::bitmap::BS;
use vm_memory::{
    GuestAddress, GuestMemoryRegion, GuestMemoryRegionBytes, GuestMemoryResult,
    GuestRegionCollection, GuestRegionMmap, GuestUsize, MemoryRegionAddress, VolatileSlice,
};

/// Guest RAM: the regions the model may touch.
pub type GuestRam = GuestRegionCollection<RamRegion>;

/// One region of guest RAM and the owner of its mapping.
pub struct RamRegion {
    region: GuestRegionMmap<()>,
    _owner: Option<Box<dyn Send + Sync>>,
}

impl fmt::Debug for RamRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RamRegion({:#x}+{:#x})",
            self.region.start_addr().0,
            self.region.len()
        )
    }
}

impl RamRegion {
    /// A region whose mapping `owner` keeps alive (and releases when dropped). `region` must
    /// describe memory inside that mapping (the caller built it with
    /// `MmapRegion::build_raw` over the owner's mapping) or own its mapping itself (`None`).
    pub fn new(region: GuestRegionMmap<()>, owner: Option<Box<dyn Send + Sync>>) -> Self {
        RamRegion {
            region,
            _owner: owner,
        }
    }
}

/// Anonymous guest RAM at `ranges` (tests and fuzzing).
pub fn anonymous_ram(ranges: &[(u64, usize)]) -> Result<Arc<GuestRam>, String> {
    let regions = ranges
        .iter()
        .map(|&(at, len)| {
            GuestRegionMmap::from_range(GuestAddress(at), len, None)
                .map(|r| RamRegion::new(r, None))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestRegionCollection::from_regions(regions)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

impl GuestMemoryRegion for RamRegion {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.region.len()
    }

    fn start_addr(&self) -> GuestAddress {
        self.region.start_addr()
    }

    fn bitmap(&self) -> BS<'_, ()> {}

    fn get_host_address(&self, addr: MemoryRegionAddress) -> GuestMemoryResult<*mut u8> {
        self.region.get_host_address(addr)
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> GuestMemoryResult<VolatileSlice<'_, BS<'_, ()>>> {
        self.region.get_slice(offset, count)
    }
}

impl GuestMemoryRegionBytes for RamRegion {}

/// Raises MSI-X vectors. Must never block (the server's implementation writes an eventfd
/// without waiting).
pub trait InterruptSink: Send + Sync + fmt::Debug {
    /// Signals MSI-X vector `vector`.
    fn signal_msix(&self, vector: u16);
}

/// Drops every interrupt.
#[derive(Clone, Copy, Debug, Default)]
pub struct NullInterrupts;

impl InterruptSink for NullInterrupts {
    fn signal_msix(&self, _vector: u16) {}
}

/// Records every interrupt (tests).
#[derive(Debug, Default)]
pub struct RecordedInterrupts(pub Mutex<Vec<u16>>);

impl RecordedInterrupts {
    /// Takes what was recorded so far.
    pub fn take(&self) -> Vec<u16> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl InterruptSink for RecordedInterrupts {
    fn signal_msix(&self, vector: u16) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(vector);
    }
}

/// Monotonic time, injected so the model's timing logic is testable without sleeping.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Time since an arbitrary fixed origin (CLOCK_MONOTONIC in the server).
    fn now(&self) -> Duration;
}

/// A clock that moves only when told to (tests and fuzzing).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock reading `start` (to the nanosecond; saturating at `u64::MAX` ns).
    pub fn new(start: Duration) -> Self {
        ManualClock(AtomicU64::new(nanos(start)))
    }

    /// Sets the time.
    pub fn set(&self, t: Duration) {
        self.0.store(nanos(t), Ordering::SeqCst);
    }

    /// Moves the time forward by `d` (saturating).
    pub fn advance(&self, d: Duration) {
        let add = nanos(d);
        // A failed update cannot happen: the closure always returns Some.
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(add))
            });
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn anonymous_ram_reads_back_and_refuses_holes() {
        let ram = anonymous_ram(&[(0, 0x2000), (0x10000, 0x1000)]).unwrap();
        ram.write_slice(&[1, 2, 3], GuestAddress(0x1ffd)).unwrap();
        let mut b = [0u8; 3];
        ram.read_slice(&mut b, GuestAddress(0x1ffd)).unwrap();
        assert_eq!(b, [1, 2, 3]);
        assert!(
            ram.read_slice(&mut b, GuestAddress(0x1fff)).is_err(),
            "runs into the hole"
        );
        assert!(ram.read_slice(&mut b, GuestAddress(0x5000)).is_err());
        assert!(ram.check_address(GuestAddress(0x10fff)).is_some());
        assert!(
            anonymous_ram(&[(0, 0x2000), (0x1000, 0x1000)]).is_err(),
            "overlap"
        );
    }
}

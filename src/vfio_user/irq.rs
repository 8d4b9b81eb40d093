//! Interrupts: the eventfds a client assigns with SET_IRQS, and how we raise them.
//!
//! An eventfd comes from the client, which keeps its own handle on the same open file: it can
//! push the counter to just below overflow, where a blocking `write` of 1 would wait until
//! somebody reads. So we never write to it blocking, and never while a lock the guest's register
//! path needs is held:
//! - the descriptor is put in non-blocking mode when it is assigned, and that is checked again
//!   (the client shares the file status flags and could clear it) right before each signal,
//!   which also first polls for room; a full counter means the interrupt is already pending
//!   many times over, so `EAGAIN` is reported as [`Signalled::AlreadyPending`];
//! - the table lives under its own small lock, separate from the instance lock; a signaller
//!   clones the vector's handle out of it and writes after releasing it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

/// A client's eventfd, checked and set non-blocking.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

/// What raising an interrupt did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signalled {
    /// The counter was incremented.
    Raised,
    /// The counter is full: the interrupt is pending already.
    AlreadyPending,
    /// No eventfd is assigned to that vector.
    NotAssigned,
    /// The write failed otherwise (errno).
    Failed(i32),
}

fn is_eventfd(fd: &OwnedFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument and touches no memory of ours.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 {
        return Err(io::Error::last_os_error());
    }
    if fl & libc::O_NONBLOCK == 0 {
        // SAFETY: F_SETFL takes an int argument and touches no memory of ours.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl EventFd {
    /// Adopts a descriptor a client sent: it must be an eventfd (EINVAL otherwise).
    pub fn adopt(fd: OwnedFd) -> Result<EventFd, i32> {
        if !is_eventfd(&fd) {
            return Err(libc::EINVAL);
        }
        set_nonblocking(&fd).map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))?;
        Ok(EventFd(fd))
    }

    /// Adds 1 to the counter, never blocking.
    pub fn signal(&self) -> Signalled {
        let fd = self.0.as_raw_fd();
        if let Err(e) = set_nonblocking(&self.0) {
            return Signalled::Failed(e.raw_os_error().unwrap_or(libc::EIO));
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: polls one live pollfd on the stack, with no wait.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        if ready == 0 {
            return Signalled::AlreadyPending;
        }
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to a descriptor we own.
        let n = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
        if n == 8 {
            return Signalled::Raised;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) => Signalled::AlreadyPending,
            Some(e) => Signalled::Failed(e),
            None => Signalled::Failed(libc::EIO),
        }
    }
}

/// The interrupt vectors of one connection: per IRQ index, per vector, an optional eventfd.
#[derive(Debug, Default)]
pub struct Interrupts {
    table: Mutex<Vec<Vec<Option<Arc<EventFd>>>>>,
}

impl Interrupts {
    /// A table with `counts[i]` vectors for IRQ index `i`, none assigned.
    pub fn new(counts: &[u32]) -> Self {
        Interrupts {
            table: Mutex::new(
                counts
                    .iter()
                    .map(|&n| (0..n).map(|_| None).collect())
                    .collect(),
            ),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Vec<Option<Arc<EventFd>>>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Vectors of `index` (0 for an unknown index).
    pub fn count(&self, index: u32) -> usize {
        self.lock().get(index as usize).map_or(0, Vec::len)
    }

    /// Assigns `fds` to vectors `start..` of `index`; `None` entries de-assign. The caller has
    /// checked the range against [`Interrupts::count`]. Dropped eventfds are closed after the
    /// table lock is released.
    pub fn assign(&self, index: u32, start: usize, fds: Vec<Option<EventFd>>) {
        let mut old = Vec::with_capacity(fds.len());
        {
            let mut table = self.lock();
            let Some(vectors) = table.get_mut(index as usize) else {
                return;
            };
            for (slot, fd) in vectors.iter_mut().skip(start).zip(fds) {
                old.push(std::mem::replace(slot, fd.map(Arc::new)));
            }
        }
        drop(old);
    }

    /// De-assigns every vector of `index`.
    pub fn disable(&self, index: u32) {
        let n = self.count(index);
        self.assign(index, 0, (0..n).map(|_| None).collect());
    }

    /// De-assigns everything (the client left).
    pub fn clear(&self) -> usize {
        let old: Vec<Arc<EventFd>> = self
            .lock()
            .iter_mut()
            .flatten()
            .filter_map(Option::take)
            .collect();
        old.len()
    }

    /// Number of assigned vectors.
    pub fn assigned(&self) -> usize {
        self.lock().iter().flatten().filter(|v| v.is_some()).count()
    }

    /// Raises vector `vector` of `index`, outside the table lock.
    pub fn signal(&self, index: u32, vector: usize) -> Signalled {
        let fd = self
            .lock()
            .get(index as usize)
            .and_then(|v| v.get(vector))
            .and_then(Clone::clone);
        fd.map_or(Signalled::NotAssigned, |fd| fd.signal())
    }
}

/// The device model's way to raise MSI-X vectors: the client's eventfds of the MSI-X index.
/// QEMU emulates the MSI-X table (masking included) on its side of the eventfd.
///
/// The model raises vectors while the instance lock is held (it completes virtqueue work under
/// it), so a signal is only recorded here; [`MsixSink::flush`] writes the eventfds, and the
/// instance lock's guard calls it once the lock is released ([`crate::instance::lock`]), so no
/// eventfd is written under the lock the guest's register path needs.
#[derive(Debug)]
pub struct MsixSink {
    irqs: Arc<Interrupts>,
    /// Vectors raised since the last flush, one bit each.
    pending: std::sync::atomic::AtomicU64,
}

impl MsixSink {
    /// A sink raising the MSI-X vectors of `irqs`.
    pub fn new(irqs: Arc<Interrupts>) -> Self {
        MsixSink {
            irqs,
            pending: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Writes the eventfd of every vector raised since the last flush (no lock held).
    pub fn flush(&self) {
        let mut bits = self.pending.swap(0, std::sync::atomic::Ordering::AcqRel);
        while bits != 0 {
            let vector = bits.trailing_zeros();
            bits &= bits - 1;
            self.irqs.signal(
                vfio_bindings::bindings::vfio::VFIO_PCI_MSIX_IRQ_INDEX,
                vector as usize,
            );
        }
    }
}

impl vgpu_model::bus::InterruptSink for MsixSink {
    fn signal_msix(&self, vector: u16) {
        if vector < 64 {
            self.pending
                .fetch_or(1 << vector, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// Creates an eventfd of our own (tests and benchmarks; a client's stand-in).
#[doc(hidden)]
pub fn new_eventfd(flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes two ints and returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter_value(fd: &OwnedFd) -> u64 {
        let mut b = [0u8; 8];
        // SAFETY: reads 8 bytes into a live local buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        assert_eq!(n, 8);
        u64::from_ne_bytes(b)
    }

    fn add(fd: &OwnedFd, v: u64) {
        let b = v.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer.
        let n = unsafe { libc::write(fd.as_raw_fd(), b.as_ptr().cast(), 8) };
        assert_eq!(n, 8);
    }

    #[test]
    fn a_full_counter_is_already_pending_and_never_blocks() {
        // The client's handle: blocking, as a hostile client would leave it.
        let client = new_eventfd(libc::EFD_CLOEXEC).unwrap();
        let ours = EventFd::adopt(client.try_clone().unwrap()).unwrap();
        assert_eq!(ours.signal(), Signalled::Raised);
        assert_eq!(counter_value(&client), 1);
        add(&client, u64::MAX - 1);
        assert_eq!(ours.signal(), Signalled::AlreadyPending);
        // The client clears O_NONBLOCK on the shared file description: still no blocking.
        // SAFETY: F_SETFL with an int argument.
        unsafe { libc::fcntl(client.as_raw_fd(), libc::F_SETFL, 0) };
        assert_eq!(ours.signal(), Signalled::AlreadyPending);
        assert_eq!(counter_value(&client), u64::MAX - 1);
        assert_eq!(ours.signal(), Signalled::Raised);
    }

    #[test]
    fn only_eventfds_are_adopted() {
        let f = crate::sys::memfd::memfd("not-an-eventfd", 8).unwrap();
        assert_eq!(EventFd::adopt(f.into()).unwrap_err(), libc::EINVAL);
    }

    #[test]
    fn the_table_assigns_signals_and_clears() {
        let irqs = Interrupts::new(&[0, 2]);
        assert_eq!(irqs.count(1), 2);
        assert_eq!(irqs.count(7), 0);
        assert_eq!(irqs.signal(1, 0), Signalled::NotAssigned);
        let client = new_eventfd(libc::EFD_CLOEXEC).unwrap();
        let fd = EventFd::adopt(client.try_clone().unwrap()).unwrap();
        irqs.assign(1, 1, vec![Some(fd)]);
        assert_eq!(irqs.assigned(), 1);
        assert_eq!(irqs.signal(1, 1), Signalled::Raised);
        assert_eq!(counter_value(&client), 1);
        irqs.disable(1);
        assert_eq!(irqs.signal(1, 1), Signalled::NotAssigned);
        assert_eq!(irqs.assigned(), 0);
    }
}

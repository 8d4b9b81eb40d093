//! An eventfd of our own, to wake a thread that sleeps in `poll`: signalling never blocks (a
//! counter that is already full is a wake-up already pending).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// A non-blocking eventfd used as a wake-up flag.
#[derive(Debug)]
pub struct Notifier(OwnedFd);

impl Notifier {
    /// A fresh notifier, not signalled.
    pub fn new() -> io::Result<Notifier> {
        crate::vfio_user::irq::new_eventfd(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK).map(Notifier)
    }

    /// Signals it. Never blocks; a full counter (`EAGAIN`) is a signal already pending.
    pub fn notify(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to our own non-blocking eventfd.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Clears it; returns whether it was signalled. Never blocks.
    pub fn drain(&self) -> bool {
        let mut b = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live local buffer, without blocking.
        let n = unsafe { libc::read(self.0.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
        n == 8
    }
}

impl AsFd for Notifier {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_then_drain_once() {
        let n = Notifier::new().unwrap();
        assert!(!n.drain());
        n.notify();
        n.notify();
        assert!(n.drain());
        assert!(!n.drain());
    }
}

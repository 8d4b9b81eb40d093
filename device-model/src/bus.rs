//! What the model reaches outside itself, each through a small trait with a null
//! implementation for tests: guest memory (`vm-memory`), interrupts, and time.
//!
//! Guest memory is `vm-memory`'s [`GuestMemory`](vm_memory::GuestMemory); the server builds a
//! [`GuestRam`] from the client's DMA maps (only regions it could map: a range the client
//! announced without a usable fd is simply absent, so an access there fails like any address
//! outside RAM).

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

/// Guest RAM as the server maps it.
pub type GuestRam = vm_memory::GuestMemoryMmap<()>;

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

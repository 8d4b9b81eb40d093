//! The frame-rate limiter: one absolute-time tick per instance, at the type's FRL.
//!
//! (Interface: the counters the server reports. The limiter lands with its own change.)

use serde::{Deserialize, Serialize};

/// Per-head frame counters of the limiter, as `status` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeadFrames {
    /// Head index.
    pub head: u32,
    /// Frames the guest submitted (fenced flushes of a resource this head shows).
    pub submitted: u64,
    /// Frames presented: completed on a tick (or at once with the limiter off).
    pub presented: u64,
    /// Frames merged into a later one by the limiter (several submitted within one tick).
    pub dropped: u64,
    /// Frames presented over the last second, per second.
    pub present_rate: f64,
}

//! The guest tests' tool inside the guest (`vgpu-guest`), as a library: the test picture (a
//! pure function the host-side tests compute too), DRM cards and their connectors, and heads
//! lit with dumb buffers, and page-flip statistics.

pub mod card;
pub mod flip;
pub mod picture;
pub mod scanout;

//! The guest tests' tool inside the guest (`vgpu-guest`), as a library: the test picture (a
//! pure function the host-side tests compute too), DRM cards and their connectors, and heads
//! lit with dumb buffers.

pub mod card;
pub mod picture;
pub mod scanout;

//! `vgpu-model`: everything a guest can see of a vgpu-emu device, and nothing else.
//!
//! - [`catalog`]: versioned vGPU types (built-in TOML plus user files), validation, lookup.
//! - [`fingerprint`]: stable ABI fingerprints of type versions and the released list.
//! - [`pci`]: PCI configuration space as a register map (reset image, write and RW1C masks).
//! - [`bochs`]: the bochs personality's register BAR (EDID, VGA ports, DISPI, extensions).
//! - [`edid`]: EDID 1.4 generation and decoding.
//! - [`scanout`]: scanout geometry, capture and pixel conversion.
//! - [`damage`]: what changed on a head for a viewer (flush rectangles, hashed row segments).
//! - [`device`]: one instance: regions, guarded accesses, reset, saved state.
//! - [`bus`]: guest memory, interrupts and time, as the model reaches them.
//! - [`virtio_gpu`]: the virtio-gpu personality (multi-head).
//! - [`vram`]: the VRAM backing trait and a `Vec` implementation.
//! - [`frl`]: the frame-rate limiter (an absolute-time tick per instance, an injected clock).
//! - [`fuzz`]: the register-sequence and virtio-gpu command harnesses shared by the property
//!   tests and `cargo fuzz`.
//!
//! The crate opens no sockets, starts no threads and logs nothing: accesses come in as
//! `read(region, offset, &mut [u8])` / `write(region, offset, &[u8])` and every guest- or
//! peer-supplied offset is bounds-checked before use.

pub mod bochs;
pub mod bus;
pub mod catalog;
pub mod damage;
pub mod device;
pub mod edid;
pub mod fingerprint;
pub mod frl;
pub mod fuzz;
pub mod pci;
pub mod scanout;
pub mod virtio_gpu;
pub mod vram;

pub use catalog::{Catalog, CatalogError, LookupError, Personality, Resolution, VgpuType};
pub use device::{AccessError, Device, DeviceError, DeviceState, RegionInfo};
pub use fingerprint::{fingerprint, Fingerprint};
pub use scanout::{Frame, NotDisplaying, PixelFormat, Scanout};
pub use vram::{VecVram, Vram, VramRead};

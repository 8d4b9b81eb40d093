//! A fuzz harness for the guest-facing surface: bytes become a sequence of region reads, writes
//! and resets on a device, and the scanout invariants are checked after every step. The same
//! bytes then drive a virtio-gpu device (BAR4, BAR1, config space, kicks and guest RAM), whose
//! transport invariants are checked the same way.
//!
//! Shared by the property test in this crate and the `cargo fuzz` target, so both exercise the
//! same decoder. [`run_register_ops`] panics only when an invariant breaks (that is the finding).

use crate::bochs::{DISPI_OFFSET, QEXT_OFFSET, VGA_OFFSET};
use std::sync::OnceLock;

use crate::catalog::{Catalog, Personality, VgpuType};
use crate::device::{Device, NUM_REGIONS};
use crate::vram::NullVram;

/// Register values that reach the edges of the scanout checks.
const INTERESTING: [u16; 16] = [
    0, 1, 15, 16, 24, 32, 63, 64, 0x41, 0x43, 1024, 2560, 3840, 4096, 0x7fff, 0xffff,
];

/// What a run did, so tests can tell a vacuous run from one that reached the scanout checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Operations executed.
    pub ops: usize,
    /// Steps after which a head was displaying (and the capture checks ran).
    pub displaying: usize,
    /// Operations executed on the virtio-gpu device.
    pub virtio_ops: usize,
}

/// Runs the operations encoded in `data` on a device of a built-in bochs type (`type_index`
/// modulo their number; types up to 64 MiB so runs stay cheap) and checks the invariants after
/// each one.
pub fn run_register_ops(type_index: u8, data: &[u8]) -> RunStats {
    static TYPES: OnceLock<Vec<VgpuType>> = OnceLock::new();
    let mut stats = RunStats::default();
    let bochs = TYPES.get_or_init(|| {
        Catalog::builtin()
            .map(|c| {
                c.types()
                    .iter()
                    .filter(|t| t.personality.is_implemented() && t.framebuffer <= 64 << 20)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    });
    if bochs.is_empty() {
        return stats;
    }
    stats.virtio_ops = run_virtio_ops(type_index, data);
    let bochs: Vec<&VgpuType> = bochs
        .iter()
        .filter(|t| t.personality == Personality::Bochs)
        .collect();
    if bochs.is_empty() {
        return stats;
    }
    let ty = bochs[usize::from(type_index) % bochs.len()];
    let vram = NullVram(ty.framebuffer);
    let Ok(mut dev) = Device::new(ty, &[0x5a; 16], Some(Box::new(vram))) else {
        return stats;
    };
    let mut input = data;
    let mut take = |n: usize| -> Option<&[u8]> {
        if input.len() < n {
            return None;
        }
        let (head, rest) = input.split_at(n);
        input = rest;
        Some(head)
    };
    while let Some(op) = take(4) {
        let (kind, sel, a, b) = (op[0], op[1], op[2], op[3]);
        let len = usize::from(kind >> 4) % 9;
        // Aim most accesses at the register windows, some anywhere (including past the end).
        let (region, offset) = match sel % 8 {
            0..=2 => (2, DISPI_OFFSET + u64::from(a % 0x18)),
            3 => (2, VGA_OFFSET + u64::from(a % 0x20)),
            4 => (2, QEXT_OFFSET + u64::from(a % 8) + u64::from(b) * 0x100),
            5 => (7, u64::from(a)),
            6 => (0, u64::from(u16::from_le_bytes([a, b])) << 12),
            _ => (u32::from(a) % (NUM_REGIONS + 2), u64::from(b) << (a % 64)),
        };
        match kind % 4 {
            0 => {
                let mut buf = vec![0u8; len];
                let _ = dev.read(region, offset, &mut buf);
            }
            1 | 2 => {
                let value = if kind % 4 == 1 {
                    INTERESTING[usize::from(b) % INTERESTING.len()]
                        .to_le_bytes()
                        .to_vec()
                } else {
                    take(len).map(<[u8]>::to_vec).unwrap_or_default()
                };
                let _ = dev.write(region, offset, &value);
            }
            _ => {
                if a == 0 {
                    dev.reset();
                }
            }
        }
        stats.ops += 1;
        if check_invariants(&dev) {
            stats.displaying += 1;
        }
    }
    stats
}

/// Guest RAM of the virtio-gpu runs: 64 KiB at 0 (rings and buffers the ops write).
const VIRTIO_RAM: u64 = 0x1_0000;

/// Runs the operations encoded in `data` on a device of a built-in virtio-gpu type and checks
/// the transport invariants after each one. Returns the operations executed.
///
/// Each 4-byte op `(kind, sel, a, b)`: `kind % 4` 0 reads, 1 writes an interesting value, 2
/// writes the next `len` input bytes, 3 writes them into guest RAM at `(b << 8 | a)` (or, with
/// `a == 0`, resets the device). `sel % 8` aims: 0-2 common configuration, 3 ISR / device
/// configuration / notify, 4 BAR1 (MSI-X), 5 config space, 6 a kick, 7 anywhere.
pub fn run_virtio_ops(type_index: u8, data: &[u8]) -> usize {
    static TYPES: OnceLock<Vec<VgpuType>> = OnceLock::new();
    let types = TYPES.get_or_init(|| {
        Catalog::builtin()
            .map(|c| {
                c.types()
                    .iter()
                    .filter(|t| t.personality == Personality::VirtioGpu)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    });
    if types.is_empty() {
        return 0;
    }
    let ty = &types[usize::from(type_index) % types.len()];
    let Ok(mut dev) = Device::new(ty, &[0x5a; 16], None) else {
        return 0;
    };
    let Ok(ram) = crate::bus::anonymous_ram(&[(0, VIRTIO_RAM as usize)]) else {
        return 0;
    };
    dev.attach_memory(Some(ram.clone()));
    dev.attach_interrupts(std::sync::Arc::new(crate::bus::NullInterrupts));
    let mut ops = 0;
    let mut input = data;
    let mut take = |n: usize| -> Option<&[u8]> {
        if input.len() < n {
            return None;
        }
        let (head, rest) = input.split_at(n);
        input = rest;
        Some(head)
    };
    while let Some(op) = take(4) {
        let (kind, sel, a, b) = (op[0], op[1], op[2], op[3]);
        let len = usize::from(kind >> 4) % 9;
        let (region, offset) = match sel % 8 {
            0..=2 => (4, u64::from(a % 0x40)),
            3 => (4, u64::from(b % 3 + 1) * 0x1000 + u64::from(a % 0x20)),
            4 => (1, u64::from(u16::from_le_bytes([a, b]) % 0x1000)),
            5 => (7, u64::from(a)),
            6 => (4, 0x3000 + u64::from(a % 3) * 4),
            _ => (u32::from(a) % (NUM_REGIONS + 2), u64::from(b) << (a % 64)),
        };
        match kind % 4 {
            0 => {
                let mut buf = vec![0u8; len];
                let _ = dev.read(region, offset, &mut buf);
            }
            1 => {
                let v = INTERESTING[usize::from(b) % INTERESTING.len()].to_le_bytes();
                let _ = dev.write(region, offset, &v[..len.clamp(1, 2)]);
            }
            2 => {
                let value = take(len).map(<[u8]>::to_vec).unwrap_or_default();
                let _ = dev.write(region, offset, &value);
            }
            _ => {
                if a == 0 {
                    dev.reset();
                } else if let Some(bytes) = take(len) {
                    use vm_memory::Bytes;
                    let at = u64::from(u16::from_le_bytes([a, b]));
                    let _ = ram.write_slice(bytes, vm_memory::GuestAddress(at));
                }
            }
        }
        ops += 1;
        check_invariants(&dev);
    }
    let _ = dev.take_notices();
    ops
}

/// Panics when the virtio-gpu transport breaks its rules: read-only config bytes changed,
/// DRIVER_OK without FEATURES_OK, FEATURES_OK with features that were not offered or without
/// VERSION_1.
fn check_virtio_invariants(dev: &Device) {
    use crate::virtio_gpu::transport::{feature, status};
    let Some(t) = dev.virtio_gpu() else {
        return;
    };
    let cs = dev.config();
    for at in [0usize, 2, 8, 0x2c, 0x2e, 0x34, 0x3d] {
        assert_eq!(
            cs.bytes()[at],
            cs.reset_image()[at],
            "read-only config byte {at:#x} changed"
        );
    }
    let s = t.device_status();
    if s & status::DRIVER_OK != 0 {
        assert!(
            s & status::FEATURES_OK != 0,
            "DRIVER_OK without FEATURES_OK"
        );
    }
    if s & status::FEATURES_OK != 0 {
        let f = t.driver_features();
        assert_eq!(f & !feature::OFFERED, 0, "accepted features not offered");
        assert!(f & feature::VERSION_1 != 0, "accepted without VERSION_1");
    }
}

/// The scanout DESIGN.md section 3 prescribes for the DISPI registers as written, computed here
/// from the saved register state alone (not by the code under test): `Some((offset, stride,
/// width, height, bytes per pixel))` when it may be displayed.
fn expected_scanout(dev: &Device) -> Option<(u64, u64, u32, u32, u64)> {
    use crate::bochs::dispi;
    let r = dev.state().bochs.dispi;
    let ty = dev.vgpu_type();
    if r[dispi::ENABLE] & 1 == 0 {
        return None;
    }
    let bpp = match r[dispi::BPP] {
        16 => 2u64,
        32 => 4,
        _ => return None,
    };
    let (w, h) = (u32::from(r[dispi::XRES]), u32::from(r[dispi::YRES]));
    if w < 64 || h < 64 || w > ty.max_resolution.width || h > ty.max_resolution.height {
        return None;
    }
    let stride = u64::from(r[dispi::VIRT_WIDTH].max(r[dispi::XRES])) * bpp;
    let offset = u64::from(r[dispi::X_OFFSET]) * bpp + u64::from(r[dispi::Y_OFFSET]) * stride;
    if offset + stride * u64::from(h) > ty.framebuffer {
        return None;
    }
    Some((offset, stride, w, h, bpp))
}

/// Panics when the device's scanout differs from what the registers prescribe (so it could
/// reach outside VRAM or exceed the type's limits), or a capture is not the scanout's size.
/// Returns whether any head is displaying.
pub fn check_invariants(dev: &Device) -> bool {
    let ty = dev.vgpu_type();
    if ty.personality == Personality::VirtioGpu {
        check_virtio_invariants(dev);
        return (0..ty.num_heads).any(|h| dev.head_source(h).is_ok());
    }
    let expected = expected_scanout(dev);
    let mut displaying = false;
    for head in 0..ty.num_heads {
        let got = dev.scanout(head).ok().map(|s| {
            (
                s.offset,
                u64::from(s.stride),
                s.width,
                s.height,
                u64::from(s.format.bytes_per_pixel()),
            )
        });
        let want = if head == 0 { expected } else { None };
        assert_eq!(
            got, want,
            "head {head}: scanout differs from the registers' rule"
        );
        if let Some((_, _, w, h, bpp)) = got {
            let frame = dev.capture(head).expect("a displayable head captures");
            assert_eq!(frame.data.len() as u64, u64::from(w) * u64::from(h) * bpp);
            displaying = true;
        }
    }
    displaying
}

/// Fuzz entry point for type files, a local user's input: `data` as the text of a user type
/// file added to the built-in catalog. Panics when an accepted file yields a type the catalog
/// cannot resolve, describe or fingerprint, or when a refused file changed the catalog or was
/// refused without naming the file.
pub fn type_file(data: &[u8]) {
    static BUILTIN: OnceLock<Option<Catalog>> = OnceLock::new();
    let Some(before) = BUILTIN.get_or_init(|| Catalog::builtin().ok()).as_ref() else {
        return;
    };
    let text = String::from_utf8_lossy(data);
    let mut catalog = before.clone();
    match catalog.add_toml("fuzz.toml", &text) {
        Ok(()) => {
            // The file's own types (the built-in ones are held by their own tests).
            let known = |t: &VgpuType| before.types().iter().any(|b| b.key() == t.key());
            for ty in catalog.types().iter().filter(|t| !known(t)) {
                let found = catalog
                    .resolve(&ty.key())
                    .expect("every type resolves by its key");
                assert_eq!(found.key(), ty.key());
                let _ = ty.nvidia_description();
                let _ = crate::fingerprint::fingerprint(ty);
            }
        }
        Err(e) => {
            assert_eq!(
                catalog.types().len(),
                before.types().len(),
                "a refused file leaves the catalog as it was"
            );
            assert!(
                e.to_string().contains("fuzz.toml"),
                "the error names the file: {e}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic pseudo-random bytes, no dependency.
    fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed.max(1);
        (0..n)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn random_register_sequences_keep_the_invariants() {
        let mut total = RunStats::default();
        for seed in 1..400u64 {
            let r = run_register_ops(seed as u8, &bytes(seed, 2048));
            total.ops += r.ops;
            total.displaying += r.displaying;
            total.virtio_ops += r.virtio_ops;
        }
        assert!(total.ops > 100_000, "{total:?}");
        // Not vacuous: random sequences do reach displaying modes and the capture checks.
        assert!(total.displaying > 0, "{total:?}");
        assert!(total.virtio_ops > 100_000, "{total:?}");
    }

    #[test]
    fn a_mode_set_through_the_decoder_displays() {
        // Op kind 1 (write an INTERESTING value), selector 0 (DISPI), register * 2, value index:
        // BPP = 32, XRES = 64, YRES = 64, ENABLE = 0x41.
        let w = |reg: u8, value_index: u8| [0x21, 0, reg * 2, value_index];
        let ops: Vec<u8> = [w(3, 5), w(1, 7), w(2, 7), w(4, 8)].concat();
        let r = run_register_ops(0, &ops);
        assert_eq!((r.ops, r.displaying), (4, 1));
    }
}

//! Fuzz harnesses for the guest-facing surface: bytes become a sequence of region reads, writes
//! and resets on a bochs device, whose scanout invariants are checked after every step, and the
//! same bytes then drive a virtio-gpu device (BAR4, BAR1, config space, kicks and guest RAM)
//! with its transport invariants ([`run_register_ops`]); or they become virtio-gpu requests,
//! guest-memory writes and resets on a GPU ([`run_gpu_commands`]), with the budget and fence
//! invariants checked after every step.
//!
//! Shared by the property tests in this crate and the `cargo fuzz` targets, so both exercise the
//! same decoders. The harnesses panic only when an invariant breaks (that is the finding).

use crate::bochs::{DISPI_OFFSET, QEXT_OFFSET, VGA_OFFSET};
use std::sync::OnceLock;

use crate::catalog::{Catalog, Personality, VgpuType};
use crate::device::{Device, NUM_REGIONS};
use crate::vram::NullVram;

use std::sync::Arc;
use std::time::Duration;

use vm_memory::Bytes;

use crate::bus::{GuestRam, ManualClock};
use crate::virtio_gpu::protocol::{
    encode, ty, CtrlHeader, CursorCmd, MemEntry, Rect, BLOB_MEM_GUEST, FLAG_FENCE, FORMAT_B8G8R8A8,
    FORMAT_B8G8R8X8,
};
use crate::virtio_gpu::resources::MAX_RESOURCES;
use crate::virtio_gpu::{Completion, Gpu, HeadSource};

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
    /// Steps after which the virtio-gpu device's frame-rate limiter held a completion.
    pub frl_held: usize,
    /// Completions the limiter released on its ticks or when the knob went off.
    pub frl_released: usize,
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
    let v = run_virtio(type_index, data);
    (stats.virtio_ops, stats.frl_held, stats.frl_released) =
        (v.virtio_ops, v.frl_held, v.frl_released);
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
    let mut input = Input(data);
    while let Some(op) = input.exact(4) {
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
                    input.exact(len).map(<[u8]>::to_vec).unwrap_or_default()
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

/// Where the virtio-gpu runs' manual clock starts (the limiter's tick 0).
const VIRTIO_T0: Duration = Duration::from_secs(1);

/// Runs the operations encoded in `data` on a device of a built-in virtio-gpu type and checks
/// the transport invariants after each one. Returns the operations executed.
///
/// Each 4-byte op `(kind, sel, a, b)`: `kind % 4` 0 reads, 1 writes an interesting value, 2
/// writes the next `len` input bytes (`len = (kind >> 4) % 9`), 3 writes them into guest RAM
/// at `(b << 8 | a)`, or, with `a == 0`, by `kind >> 4`: 0-11 resets the device, 12 advances
/// the clock by `b` * 1.000003 ms, 13 runs the limiter's tick, 14 flips the limiter's knob, 15
/// sets the clock to the limiter's deadline and ticks. `sel % 8` aims: 0-2 common
/// configuration, 3 ISR / device configuration / notify, 4 BAR1 (MSI-X), 5 config space, 6 a
/// kick, 7 anywhere.
pub fn run_virtio_ops(type_index: u8, data: &[u8]) -> usize {
    run_virtio(type_index, data).virtio_ops
}

fn run_virtio(type_index: u8, data: &[u8]) -> RunStats {
    let mut stats = RunStats::default();
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
        return stats;
    }
    let ty = &types[usize::from(type_index) % types.len()];
    let Ok(mut dev) = Device::new(ty, &[0x5a; 16], None) else {
        return stats;
    };
    let Ok(ram) = crate::bus::anonymous_ram(&[(0, VIRTIO_RAM as usize)]) else {
        return stats;
    };
    let clock = Arc::new(ManualClock::new(VIRTIO_T0));
    dev.attach_memory(Some(ram.clone()));
    dev.attach_interrupts(std::sync::Arc::new(crate::bus::NullInterrupts));
    dev.attach_clock(clock.clone());
    dev.record_fences(true);
    let mut fences = FenceOrder::default();
    let mut input = Input(data);
    while let Some(op) = input.exact(4) {
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
                let value = input.exact(len).map(<[u8]>::to_vec).unwrap_or_default();
                let _ = dev.write(region, offset, &value);
            }
            _ => {
                if a == 0 {
                    match kind >> 4 {
                        12 => clock.advance(Duration::from_nanos(u64::from(b) * 1_000_003)),
                        13 => stats.frl_released += dev.frl_tick(),
                        14 => {
                            let on = dev.frame_rate_limiter();
                            dev.set_frame_rate_limiter(!on);
                        }
                        15 => {
                            if let Some(at) = dev.frl_deadline() {
                                clock.set(at);
                            }
                            stats.frl_released += dev.frl_tick();
                        }
                        _ => dev.reset(),
                    }
                } else if let Some(bytes) = input.exact(len) {
                    use vm_memory::Bytes;
                    let at = u64::from(u16::from_le_bytes([a, b]));
                    let _ = ram.write_slice(bytes, vm_memory::GuestAddress(at));
                }
            }
        }
        stats.virtio_ops += 1;
        check_invariants(&dev);
        if check_frl_invariants(&mut dev, &mut fences) {
            stats.frl_held += 1;
        }
    }
    let _ = dev.take_notices();
    stats
}

/// A [`run_register_ops`] input (the type byte first; type 0 is a virtio-gpu M60 type in
/// [`run_virtio_ops`]) in which a driver brings the virtio-gpu up the way Linux does, shows a
/// guest blob on head 0 and flips it with fenced flushes while the clock, the limiter's tick
/// and its knob move, then resets with a flush held: the seed that reaches the frame-rate
/// limiter.
pub fn virtio_frl_seed() -> Vec<u8> {
    const DESC: u64 = 0x1010;
    const AVAIL: u64 = 0x1110;
    const USED: u64 = 0x1210;
    const SIZE: u16 = 16;
    let mut ops = vec![0u8];
    let common = |ops: &mut Vec<u8>, at: u8, bytes: &[u8]| {
        ops.extend([(bytes.len() as u8) << 4 | 2, 0, at, 0]);
        ops.extend_from_slice(bytes);
    };
    // RAM writes of at most 8 bytes at an address whose low byte is not 0 (a 0 selects the
    // reset and limiter ops): a chunk that would start on one starts a byte earlier.
    let ram = |ops: &mut Vec<u8>, addr: u64, data: &[u8]| {
        let mut at = 0usize;
        while at < data.len() {
            let mut from = at;
            if (addr + from as u64) & 0xff == 0 && from > 0 {
                from -= 1;
            }
            let n = (data.len() - from).min(8);
            let start = addr + from as u64;
            ops.extend([(n as u8) << 4 | 3, 0, start as u8, (start >> 8) as u8]);
            ops.extend_from_slice(&data[from..from + n]);
            at = from + n;
        }
    };
    let kick = |ops: &mut Vec<u8>| ops.extend([0x21, 6, 0, 0]);
    let frl = |ops: &mut Vec<u8>, op: u8, b: u8| ops.extend([op << 4 | 3, 0, 0, b]);
    let (advance, tick, knob, deadline_tick) = (12, 13, 14, 15);
    common(&mut ops, 0x14, &[1]);
    common(&mut ops, 0x14, &[3]);
    common(&mut ops, 0x08, &1u32.to_le_bytes());
    common(&mut ops, 0x0c, &1u32.to_le_bytes());
    common(&mut ops, 0x14, &[0xb]);
    common(&mut ops, 0x16, &0u16.to_le_bytes());
    common(&mut ops, 0x18, &SIZE.to_le_bytes());
    common(&mut ops, 0x20, &DESC.to_le_bytes());
    common(&mut ops, 0x28, &AVAIL.to_le_bytes());
    common(&mut ops, 0x30, &USED.to_le_bytes());
    common(&mut ops, 0x1a, &1u16.to_le_bytes());
    common(&mut ops, 0x1c, &1u16.to_le_bytes());
    common(&mut ops, 0x14, &[0xf]);
    let mut chains = 0u16;
    let mut send = |ops: &mut Vec<u8>, request: &[u8]| {
        let slot = u64::from(chains % 8);
        let (req, resp) = (0x2010 + 0x80 * slot, 0x3010 + 0x40 * slot);
        let d = (chains * 2) % SIZE;
        let mut descs = Vec::new();
        for (addr, len, flags, next) in
            [(req, request.len() as u32, 1u16, d + 1), (resp, 0x40, 2, 0)]
        {
            descs.extend_from_slice(&addr.to_le_bytes());
            descs.extend_from_slice(&len.to_le_bytes());
            descs.extend_from_slice(&flags.to_le_bytes());
            descs.extend_from_slice(&next.to_le_bytes());
        }
        ram(ops, req, request);
        ram(ops, DESC + 16 * u64::from(d), &descs);
        ram(
            ops,
            AVAIL + 4 + 2 * u64::from(chains % SIZE),
            &d.to_le_bytes(),
        );
        chains = chains.wrapping_add(1);
        ram(ops, AVAIL + 2, &chains.to_le_bytes());
        kick(ops);
    };
    let full = Rect {
        x: 0,
        y: 0,
        width: 32,
        height: 32,
    };
    let blob = MemEntry {
        addr: 0x4000,
        length: 0x1000,
    };
    send(
        &mut ops,
        &encode::create_blob(1, BLOB_MEM_GUEST, 0x1000, &[blob]),
    );
    send(
        &mut ops,
        &encode::set_scanout_blob(0, 1, full, (32, 32, FORMAT_B8G8R8X8), 128, 0),
    );
    // Two frames in one tick (one merged), released on the grid.
    send(&mut ops, &encode::flush(1, full, Some(1)));
    frl(&mut ops, advance, 3);
    send(&mut ops, &encode::flush(1, full, Some(2)));
    frl(&mut ops, deadline_tick, 0);
    // The knob off releases at once and holds nothing; on again holds again.
    send(&mut ops, &encode::flush(1, full, Some(3)));
    frl(&mut ops, knob, 0);
    send(&mut ops, &encode::flush(1, full, Some(4)));
    frl(&mut ops, knob, 0);
    // A fenced request behind a held flush, an unfenced one past it, a late tick.
    send(&mut ops, &encode::flush(1, full, Some(5)));
    send(&mut ops, &encode::header(ty::GET_DISPLAY_INFO, Some(6)));
    send(&mut ops, &encode::get_edid(0));
    frl(&mut ops, advance, 40);
    frl(&mut ops, tick, 0);
    // Held across a reset: dropped.
    send(&mut ops, &encode::flush(1, full, Some(7)));
    frl(&mut ops, advance, 1);
    ops.extend([0x03, 0, 0, 0]);
    frl(&mut ops, deadline_tick, 0);
    ops
}

/// The order of the fenced control completions seen so far.
#[derive(Debug, Default)]
struct FenceOrder {
    last: Option<u64>,
}

/// Panics when the frame-rate limiter breaks its rules: more completions held than the
/// control queue has room for, held completions without a queue or without a deadline (or a
/// deadline with nothing held), fenced completions out of the order they were submitted in
/// (fence-id order for a driver whose ids increase, as Linux's), or per-head counters that do
/// not add up. Returns whether anything is held.
fn check_frl_invariants(dev: &mut Device, order: &mut FenceOrder) -> bool {
    for (seq, fence) in dev.take_fence_log() {
        if let Some(last) = order.last {
            assert!(
                seq > last,
                "fence {fence} (request {seq}) completed after request {last}"
            );
        }
        order.last = Some(seq);
    }
    let Some(t) = dev.virtio_gpu() else {
        return false;
    };
    let l = t.limiter();
    let held = l.held();
    if held > 0 {
        let size = t
            .queue_size(0)
            .expect("held completions belong to a live controlq");
        assert!(held <= usize::from(size), "{held} held, queue of {size}");
        assert!(l.active(), "held while the limiter is off");
        let first = l.held_iter().next().map(|h| h.held_at);
        assert_eq!(dev.frl_deadline(), first.and_then(|t| l.next_tick_after(t)));
        let mut prev: Option<u64> = None;
        for h in l.held_iter() {
            assert!(prev.is_none_or(|p| h.seq > p), "held out of order");
            prev = Some(h.seq);
        }
    } else {
        assert_eq!(dev.frl_deadline(), None, "a wake-up with nothing held");
    }
    for c in dev.frl_counters() {
        let waiting = l
            .held_iter()
            .filter(|h| h.heads & (1 << c.head) != 0)
            .count() as u64;
        assert_eq!(
            c.submitted,
            c.presented + c.dropped + c.discarded + waiting,
            "head {}: {c:?}, {waiting} held",
            c.head
        );
    }
    held > 0
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

/// Guest RAM of the GPU harness: 0..192 KiB and 256..384 KiB (a hole between).
const GPU_RAM: [(u64, usize); 2] = [(0, 0x3_0000), (0x4_0000, 0x2_0000)];
/// Addresses the harness aims at: RAM, the hole and past the end.
const GPU_ADDR_SPAN: u64 = 0x7_0000;
/// The harness's resource budget (the M60 type's own would let a run allocate GiBs).
const GPU_BUDGET: u64 = 1 << 20;
/// Frames up to this many pixels are captured and checked after each step.
const GPU_CAPTURE_PIXELS: u64 = 256 * 256;

/// Values that reach the edges of the GPU's checks.
const GPU_INTERESTING: [u32; 24] = [
    0,
    1,
    2,
    15,
    16,
    17,
    64,
    0x100,
    0x300,
    0x400,
    0x1000,
    0x3_0000,
    2560,
    2561,
    1600,
    0x3fff_ffff,
    0x4000_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fff0,
    0xffff_ffff,
    BLOB_MEM_GUEST,
    FORMAT_B8G8R8X8,
    FORMAT_B8G8R8A8,
];

/// What a GPU run did, so tests can tell a vacuous run from one that reached the commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuRunStats {
    /// Operations executed.
    pub ops: usize,
    /// Control requests answered OK.
    pub ok: usize,
    /// Steps after which a head was displaying.
    pub displaying: usize,
}

/// Runs the operations encoded in `data` against a [`Gpu`] of an M60 type (4 heads, budget
/// shrunk to 1 MiB) over a small guest RAM with a hole, and checks the invariants after each
/// one: the budget equals the charges of the live resources, every control request gets a
/// well-formed response that completes its fence, and every displaying head has a scanout
/// within the type's limits whose capture has its size.
///
/// Operations (first byte modulo 8): 0 a raw control request (u16 length, bytes), 1 a raw
/// cursor request, 2-4 a control command built from the following bytes, 5 a cursor command,
/// 6 a guest-memory write (u32 address, u16 length, bytes), 7 a reset (or nothing).
pub fn run_gpu_commands(data: &[u8]) -> GpuRunStats {
    static TYPE: OnceLock<Option<VgpuType>> = OnceLock::new();
    let mut stats = GpuRunStats::default();
    let Some(ty) = TYPE
        .get_or_init(|| {
            let c = Catalog::builtin().ok()?;
            let t = c.resolve("M60-2Q").ok()?;
            Some(VgpuType {
                framebuffer: GPU_BUDGET,
                ..t.clone()
            })
        })
        .as_ref()
    else {
        return stats;
    };
    let Ok(mem) = crate::bus::anonymous_ram(&GPU_RAM) else {
        return stats;
    };
    let mut gpu = Gpu::new(ty, &[0x5a; 16]);
    let mut input = Input(data);
    while let Some(op) = input.byte() {
        match op % 8 {
            0 => {
                let req = input.raw();
                let c = gpu.control(&*mem, &req);
                stats.ok += usize::from(check_completion(&req, &c));
            }
            1 => {
                let req = input.raw();
                assert_eq!(gpu.cursor(&*mem, &req), Completion::default());
            }
            2..=4 => {
                let req = input.command();
                let c = gpu.control(&*mem, &req);
                stats.ok += usize::from(check_completion(&req, &c));
            }
            5 => {
                let update = input.byte().unwrap_or(0) & 1 == 0;
                let c = CursorCmd {
                    scanout_id: input.word() % 6,
                    x: input.word(),
                    y: input.word(),
                    resource_id: input.word() % 8,
                    hot_x: input.word(),
                    hot_y: input.word(),
                };
                let req = encode::cursor(update, c);
                assert_eq!(gpu.cursor(&*mem, &req), Completion::default());
            }
            6 => {
                let addr = u64::from(input.u32()) % GPU_ADDR_SPAN;
                let bytes = input.raw();
                let _ = mem.write_slice(&bytes, vm_memory::GuestAddress(addr));
            }
            _ => {
                if input.byte() == Some(0) {
                    gpu.reset();
                    let m = gpu.memory();
                    assert_eq!((m.used, m.allocated, m.resources), (0, 0, 0));
                }
            }
        }
        stats.ops += 1;
        if check_gpu_invariants(&gpu, ty, &mem) {
            stats.displaying += 1;
        }
    }
    stats
}

/// The harness's input, consumed front to back.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    /// The next `n` bytes, or `None` (consuming nothing) when fewer are left.
    fn exact(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        Some(self.take(n))
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).first().copied()
    }

    fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let got = self.take(4);
        b[..got.len()].copy_from_slice(got);
        u32::from_le_bytes(b)
    }

    /// A u16 length (below 4 KiB), then that many bytes.
    fn raw(&mut self) -> Vec<u8> {
        let lo = self.byte().unwrap_or(0);
        let hi = self.byte().unwrap_or(0);
        let n = usize::from(u16::from_le_bytes([lo, hi])) % 4096;
        self.take(n).to_vec()
    }

    /// A field value: mostly small, often an edge, sometimes arbitrary.
    fn word(&mut self) -> u32 {
        let sel = self.byte().unwrap_or(0);
        match sel >> 6 {
            0 => u32::from(sel & 63),
            1 => GPU_INTERESTING[usize::from(sel & 63) % GPU_INTERESTING.len()],
            2 => {
                let a = self.byte().unwrap_or(0);
                let b = self.byte().unwrap_or(0);
                u32::from(u16::from_le_bytes([a, b]))
            }
            _ => self.u32(),
        }
    }

    fn rect(&mut self) -> Rect {
        Rect {
            x: self.word(),
            y: self.word(),
            width: self.word(),
            height: self.word(),
        }
    }

    fn entries(&mut self) -> Vec<MemEntry> {
        let n = self.byte().unwrap_or(0) % 9;
        (0..n)
            .map(|_| MemEntry {
                addr: u64::from(self.word()) << 8,
                length: self.word().saturating_mul(256),
            })
            .collect()
    }

    /// A control request built field by field.
    fn command(&mut self) -> Vec<u8> {
        let kind = self.byte().unwrap_or(0);
        let id = |s: &mut Self| s.word() % 8;
        let mut req = match kind % 12 {
            0 => encode::get_display_info(),
            1 => encode::get_edid(self.word()),
            2 => {
                let id = id(self);
                encode::create_2d(id, self.word(), self.word(), self.word())
            }
            3 => encode::unref(id(self)),
            4 => {
                let id = id(self);
                encode::attach_backing(id, &self.entries())
            }
            5 => encode::detach_backing(id(self)),
            6 => {
                let id = id(self);
                let r = self.rect();
                encode::transfer_2d(id, r, u64::from(self.word()))
            }
            7 => {
                let head = self.word();
                let id = id(self);
                encode::set_scanout(head, id, self.rect())
            }
            8 => {
                let id = id(self);
                encode::flush(id, self.rect(), None)
            }
            9 => {
                let id = id(self);
                let blob_mem = self.word();
                let size = u64::from(self.word()) << 4;
                encode::create_blob(id, blob_mem, size, &self.entries())
            }
            10 => {
                let head = self.word();
                let id = id(self);
                let r = self.rect();
                let fb = (self.word(), self.word(), self.word());
                encode::set_scanout_blob(head, id, r, fb, self.word(), self.word())
            }
            _ => encode::header(self.word(), None),
        };
        if kind & 0x80 != 0 {
            // Fenced, with an arbitrary id.
            let fence = u64::from(self.u32());
            if let Some(h) = req.get_mut(4..16) {
                h[..4].copy_from_slice(&FLAG_FENCE.to_le_bytes());
                h[4..].copy_from_slice(&fence.to_le_bytes());
            }
        }
        if kind & 0x40 != 0 {
            // Truncated.
            let keep = usize::from(self.byte().unwrap_or(0));
            req.truncate(keep);
        }
        req
    }
}

/// Panics unless `c` is a well-formed answer to control request `req` (a known response type,
/// the fence echoed). Returns whether it was OK.
fn check_completion(req: &[u8], c: &Completion) -> bool {
    let resp = CtrlHeader::parse(&c.response).expect("every response has a header");
    let ok = matches!(
        resp.ty,
        ty::RESP_OK_NODATA | ty::RESP_OK_DISPLAY_INFO | ty::RESP_OK_EDID
    );
    assert!(
        ok || (ty::RESP_ERR_UNSPEC..=ty::RESP_ERR_INVALID_PARAMETER).contains(&resp.ty),
        "response type {:#x}",
        resp.ty
    );
    match CtrlHeader::parse(req).filter(CtrlHeader::is_fenced) {
        Some(h) => {
            assert_eq!(c.fence, Some(h.fence_id), "the fence completes");
            assert!(resp.is_fenced() && resp.fence_id == h.fence_id);
        }
        None => assert!(c.fence.is_none() && !resp.is_fenced()),
    }
    ok
}

/// Panics when the budget does not equal the live resources' charges or exceeds the type's,
/// or a head shows a scanout outside the type's limits or captures to the wrong size. Returns
/// whether any head is displaying.
pub fn check_gpu_invariants(gpu: &Gpu, ty: &VgpuType, mem: &Arc<GuestRam>) -> bool {
    let m = gpu.memory();
    assert_eq!(m.used, gpu.recount_charges(), "budget accounting");
    assert!(m.used <= m.budget && m.allocated <= m.used, "{m:?}");
    assert!(m.resources <= MAX_RESOURCES);
    let mut displaying = false;
    for head in 0..gpu.num_scanouts() {
        let Ok(src) = gpu.head(head, Some(mem)) else {
            continue;
        };
        let (w, h) = match &src {
            HeadSource::Host { width, height, .. } | HeadSource::Guest { width, height, .. } => {
                (*width, *height)
            }
        };
        assert!(
            (16..=ty.max_resolution.width).contains(&w)
                && (16..=ty.max_resolution.height).contains(&h),
            "head {head}: {w}x{h}"
        );
        if u64::from(w) * u64::from(h) <= GPU_CAPTURE_PIXELS {
            let f = src.capture();
            assert_eq!(f.data.len() as u64, u64::from(w) * u64::from(h) * 4);
        }
        displaying = true;
    }
    displaying
}

/// Well-formed request sequences in [`run_gpu_commands`]'s encoding: the seed corpus, and the
/// property test's proof that the harness reaches displaying heads.
pub fn gpu_seed_inputs() -> Vec<Vec<u8>> {
    fn raw(op: u8, bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![op];
        v.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        v.extend_from_slice(bytes);
        v
    }
    let ctl = |b: Vec<u8>| raw(0, &b);
    let cur = |b: Vec<u8>| raw(1, &b);
    let write = |addr: u32, bytes: &[u8]| {
        let mut v = vec![6];
        v.extend_from_slice(&addr.to_le_bytes());
        v.extend_from_slice(&raw(0, bytes)[1..]);
        v
    };
    let r = |x, y, width, height| Rect {
        x,
        y,
        width,
        height,
    };
    let e = |addr, length| MemEntry { addr, length };
    let pattern: Vec<u8> = (0..4000u32).map(|i| (i * 7) as u8).collect();
    let reset = vec![7, 0];

    let image: Vec<u8> = [
        write(0x1000, &pattern),
        write(0x4_0000, &pattern),
        ctl(encode::create_2d(1, FORMAT_B8G8R8X8, 32, 32)),
        ctl(encode::attach_backing(
            1,
            &[e(0x1000, 0x800), e(0x4_0000, 0x800)],
        )),
        ctl(encode::transfer_2d(1, r(0, 0, 32, 32), 0)),
        ctl(encode::set_scanout(0, 1, r(0, 0, 32, 32))),
        ctl(encode::flush(1, r(0, 0, 32, 32), Some(1))),
        ctl(encode::transfer_2d(1, r(8, 8, 16, 16), 8 * 128 + 32)),
        ctl(encode::set_scanout(3, 1, r(16, 16, 16, 16))),
        ctl(encode::flush(1, r(8, 8, 16, 16), Some(2))),
        ctl(encode::detach_backing(1)),
        ctl(encode::unref(1)),
    ]
    .concat();
    let blob: Vec<u8> = [
        write(0x8000, &pattern),
        ctl(encode::create_blob(
            2,
            BLOB_MEM_GUEST,
            0x2000,
            &[e(0x8000, 0x1000), e(0x4_1000, 0x1000)],
        )),
        ctl(encode::transfer_2d(2, r(0, 0, 32, 32), 0)),
        ctl(encode::set_scanout_blob(
            1,
            2,
            r(4, 4, 24, 24),
            (32, 32, FORMAT_B8G8R8X8),
            128,
            0x100,
        )),
        ctl(encode::flush(2, r(0, 0, 32, 32), Some(3))),
        ctl(encode::set_scanout_blob(
            1,
            0,
            r(0, 0, 0, 0),
            (0, 0, 0),
            0,
            0,
        )),
        ctl(encode::unref(2)),
    ]
    .concat();
    let c = |update, resource_id, x| {
        encode::cursor(
            update,
            CursorCmd {
                scanout_id: 0,
                x,
                y: 7,
                resource_id,
                hot_x: 1,
                hot_y: 1,
            },
        )
    };
    let cursor: Vec<u8> = [
        write(0x1_0000, &pattern),
        ctl(encode::create_2d(3, FORMAT_B8G8R8A8, 64, 64)),
        ctl(encode::attach_backing(3, &[e(0x1_0000, 0x4000)])),
        ctl(encode::transfer_2d(3, r(0, 0, 64, 64), 0)),
        cur(c(true, 3, 10)),
        cur(c(false, 0, 20)),
        ctl(encode::create_blob(
            4,
            BLOB_MEM_GUEST,
            0x4000,
            &[e(0x1_0000, 0x4000)],
        )),
        cur(c(true, 4, 30)),
        cur(c(true, 0, 30)),
        reset.clone(),
    ]
    .concat();
    let budget: Vec<u8> = [
        ctl(encode::create_2d(1, FORMAT_B8G8R8X8, 256, 512)),
        ctl(encode::create_2d(2, FORMAT_B8G8R8X8, 256, 512)),
        ctl(encode::create_2d(3, FORMAT_B8G8R8X8, 1, 1)),
        ctl(encode::unref(2)),
        ctl(encode::create_2d(3, FORMAT_B8G8R8X8, 1, 1)),
        ctl(encode::create_2d(
            0x3fff_ffff,
            FORMAT_B8G8R8X8,
            0x3fff_ffff,
            4,
        )),
        reset.clone(),
    ]
    .concat();
    let queries: Vec<u8> = [
        ctl(encode::get_display_info()),
        ctl(encode::get_edid(0)),
        ctl(encode::get_edid(3)),
        ctl(encode::get_edid(4)),
        ctl(encode::header(ty::GET_CAPSET_INFO, Some(9))),
        ctl(encode::header(0xdead, None)),
        ctl(vec![1, 2, 3]),
    ]
    .concat();
    let errors: Vec<u8> = [
        ctl(encode::create_2d(0, FORMAT_B8G8R8X8, 32, 32)),
        ctl(encode::create_2d(5, 0, 32, 32)),
        ctl(encode::create_2d(5, FORMAT_B8G8R8X8, u32::MAX, u32::MAX)),
        ctl(encode::create_2d(5, FORMAT_B8G8R8X8, 32, 32)),
        ctl(encode::attach_backing(5, &[e(0x3_0000, 0x1000)])),
        ctl(encode::attach_backing(5, &[e(0x1000, 0x100)])),
        ctl(encode::transfer_2d(5, r(u32::MAX, 0, 2, 2), 0)),
        ctl(encode::set_scanout(4, 5, r(0, 0, 32, 32))),
        ctl(encode::set_scanout(0, 5, r(0, 0, 8, 8))),
        ctl(encode::create_blob(6, 2, 0x1000, &[e(0, 0x1000)])),
        ctl(encode::create_blob(
            6,
            BLOB_MEM_GUEST,
            0x2000,
            &[e(0, 0x1000)],
        )),
    ]
    .concat();
    vec![image, blob, cursor, budget, queries, errors]
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
    fn random_gpu_sequences_keep_the_invariants() {
        let mut total = GpuRunStats::default();
        for seed in 1..300u64 {
            let r = run_gpu_commands(&bytes(seed, 4096));
            total.ops += r.ops;
            total.ok += r.ok;
            total.displaying += r.displaying;
        }
        assert!(total.ops > 1_000, "{total:?}");
        assert!(total.ok > 0, "{total:?}");
    }

    #[test]
    fn the_gpu_seeds_reach_every_command() {
        let seeds = gpu_seed_inputs();
        let stats: Vec<GpuRunStats> = seeds.iter().map(|s| run_gpu_commands(s)).collect();
        // The image and blob sequences display; every sequence has OK answers.
        assert!(
            stats[0].displaying >= 4 && stats[1].displaying >= 2,
            "{stats:?}"
        );
        assert!(stats.iter().all(|s| s.ok > 0), "{stats:?}");
        // Each sequence followed by random bytes, mutated like a fuzzer would.
        for (i, s) in seeds.iter().enumerate() {
            let mut v = s.clone();
            v.extend(bytes(i as u64 + 1, 2048));
            run_gpu_commands(&v);
            for at in (0..s.len()).step_by(7) {
                let mut m = s.clone();
                m[at] ^= 0x5a;
                run_gpu_commands(&m);
            }
        }
    }

    /// The seed inputs of the `gpu_commands` fuzz target are checked in as
    /// `fuzz/corpus/gpu_commands/seed-N`, byte for byte. After changing the seeds, write them
    /// with `VGPU_WRITE_SEEDS=1 cargo test -p vgpu-model gpu_seed`.
    #[test]
    fn gpu_seed_corpus_is_checked_in() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/gpu_commands");
        let write = std::env::var_os("VGPU_WRITE_SEEDS").is_some();
        for (i, s) in gpu_seed_inputs().iter().enumerate() {
            let file = dir.join(format!("seed-{i}"));
            if write {
                std::fs::write(&file, s).unwrap();
            }
            let on_disk = std::fs::read(&file).unwrap_or_default();
            assert!(
                on_disk == *s,
                "{} differs from seed {i}; write the seeds with VGPU_WRITE_SEEDS=1",
                file.display()
            );
        }
    }

    #[test]
    fn the_frl_seed_reaches_the_limiter() {
        let seed = virtio_frl_seed();
        let r = run_register_ops(seed[0], &seed[1..]);
        assert!(r.frl_held >= 5, "{r:?}");
        // Ticks release 1 and 2, then 5 and 6 (the knob releases 3; the reset drops 7).
        assert_eq!(r.frl_released, 4, "{r:?}");
        // Mutated like a fuzzer would, it keeps the invariants.
        for at in (1..seed.len()).step_by(5) {
            let mut m = seed.clone();
            m[at] ^= 0x5a;
            run_register_ops(m[0], &m[1..]);
        }
        let mut more = seed.clone();
        more.extend(bytes(7, 4096));
        run_register_ops(more[0], &more[1..]);
    }

    /// The limiter seed is checked in as `fuzz/corpus/registers/frl-seed-0`; write it with
    /// `VGPU_WRITE_SEEDS=1 cargo test -p vgpu-model frl_seed`.
    #[test]
    fn frl_seed_corpus_is_checked_in() {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus/registers/frl-seed-0");
        let seed = virtio_frl_seed();
        if std::env::var_os("VGPU_WRITE_SEEDS").is_some() {
            std::fs::write(&file, &seed).unwrap();
        }
        assert!(
            std::fs::read(&file).unwrap_or_default() == seed,
            "{} differs from the seed; write it with VGPU_WRITE_SEEDS=1",
            file.display()
        );
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

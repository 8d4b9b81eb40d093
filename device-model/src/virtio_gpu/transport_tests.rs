//! The transport driven through `Device` exactly as Linux `virtio_pci_modern` and `virtio_gpu`
//! drive it, with split rings built by hand in anonymous guest RAM.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::transport::{layout, status, NO_VECTOR};
use crate::bus::{anonymous_ram, GuestRam, RecordedInterrupts};
use crate::catalog::Catalog;
use crate::device::{Device, DeviceError};
use crate::pci::{walk_capabilities, VendorCapability, CAP_ID_MSIX, CAP_ID_VENDOR};

const BAR4: u32 = 4;
const BAR1: u32 = 1;
const RAM: usize = 0x10_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
/// Ring base of queue q: descriptors, then the driver ring; the device ring a page later.
const fn ring(q: u64) -> u64 {
    0x1_0000 + q * 0x1_0000
}

struct Guest {
    dev: Device,
    ram: Arc<GuestRam>,
    irq: Arc<RecordedInterrupts>,
    size: u16,
    avail: [u16; 2],
}

fn m60() -> Device {
    let c = Catalog::builtin().unwrap();
    Device::new(c.resolve("M60-2Q").unwrap(), &[7; 16], None).unwrap()
}

impl Guest {
    fn new() -> Guest {
        Guest::with(m60())
    }

    /// A guest of `dev`, with guest RAM and recorded interrupts attached.
    fn with(mut dev: Device) -> Guest {
        let ram = anonymous_ram(&[(0, RAM)]).unwrap();
        let irq = Arc::new(RecordedInterrupts::default());
        dev.attach_memory(Some(ram.clone()));
        dev.attach_interrupts(irq.clone());
        Guest {
            dev,
            ram,
            irq,
            size: 16,
            avail: [0; 2],
        }
    }

    fn w(&mut self, off: u64, v: &[u8]) {
        self.dev.write(BAR4, off, v).unwrap();
    }
    fn w8(&mut self, off: u64, v: u8) {
        self.w(off, &[v]);
    }
    fn w16(&mut self, off: u64, v: u16) {
        self.w(off, &v.to_le_bytes());
    }
    fn w32(&mut self, off: u64, v: u32) {
        self.w(off, &v.to_le_bytes());
    }
    fn r(&mut self, off: u64, n: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.read(BAR4, off, &mut b[..n]).unwrap();
        u64::from_le_bytes(b)
    }
    fn status(&mut self) -> u8 {
        self.r(0x14, 1) as u8
    }

    /// Linux `virtio_dev_probe` + `vp_modern_find_vqs` up to FEATURES_OK; returns whether the
    /// device accepted `features`.
    fn negotiate(&mut self, features: u64) -> bool {
        self.w8(0x14, 0);
        assert_eq!(self.status(), 0);
        self.w8(0x14, status::ACKNOWLEDGE);
        self.w8(0x14, status::ACKNOWLEDGE | status::DRIVER);
        self.w32(0x00, 0);
        let lo = self.r(0x04, 4);
        self.w32(0x00, 1);
        let hi = self.r(0x04, 4);
        assert_eq!(hi << 32 | lo, super::transport::feature::OFFERED);
        self.w32(0x08, 0);
        self.w32(0x0c, features as u32);
        self.w32(0x08, 1);
        self.w32(0x0c, (features >> 32) as u32);
        let s = self.status() | status::FEATURES_OK;
        self.w8(0x14, s);
        self.status() & status::FEATURES_OK != 0
    }

    fn setup_queue(&mut self, q: u16, vector: u16) {
        self.w16(0x16, q);
        assert_eq!(self.r(0x18, 2), 256, "max queue size");
        assert_eq!(self.r(0x1c, 2), 0, "not enabled");
        self.w16(0x18, self.size);
        let base = ring(u64::from(q));
        let desc = base;
        let avail = base + 16 * u64::from(self.size);
        let used = base + 0x1000;
        for (off, v) in [(0x20, desc), (0x28, avail), (0x30, used)] {
            self.w32(off, v as u32);
            self.w32(off + 4, (v >> 32) as u32);
        }
        self.w16(0x1a, vector);
        assert_eq!(self.r(0x1a, 2), u64::from(vector));
        assert_eq!(self.r(0x1e, 2), u64::from(q), "queue_notify_off");
        self.w16(0x1c, 1);
        assert_eq!(self.r(0x1c, 2), 1);
    }

    /// The whole Linux bring-up: features, config vector 0, controlq vector 1, cursorq 2.
    fn init(&mut self) {
        let f = super::transport::feature::OFFERED;
        assert!(self.negotiate(f));
        self.w16(0x10, 0);
        assert_eq!(self.r(0x10, 2), 0);
        self.setup_queue(0, 1);
        self.setup_queue(1, 2);
        let s = self.status() | status::DRIVER_OK;
        self.w8(0x14, s);
        assert_eq!(
            self.status(),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
        );
        self.avail = [0; 2];
    }

    fn put_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(table + 16 * u64::from(i));
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.ram.write_slice(&d, at).unwrap();
    }

    /// Makes chain `head` of queue `q` available (the descriptors are already written).
    fn offer(&mut self, q: usize, head: u16) {
        let avail = ring(q as u64) + 16 * u64::from(self.size);
        let slot = self.avail[q] % self.size;
        self.ram
            .write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(slot)))
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.ram
            .write_obj(self.avail[q], GuestAddress(avail + 2))
            .unwrap();
    }

    fn kick(&mut self, q: u16) {
        self.w16(layout::NOTIFY + 4 * u64::from(q), q);
    }

    /// (used idx, [(id, len)]) of queue q.
    fn used(&self, q: usize) -> (u16, Vec<(u32, u32)>) {
        let used = ring(q as u64) + 0x1000;
        let idx: u16 = self.ram.read_obj(GuestAddress(used + 2)).unwrap();
        let elems = (0..idx.min(self.size))
            .map(|i| {
                let at = used + 4 + 8 * u64::from(i);
                (
                    self.ram.read_obj(GuestAddress(at)).unwrap(),
                    self.ram.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect();
        (idx, elems)
    }

    /// A GET_DISPLAY_INFO request at 0x8_0000 and a 408-byte response buffer at 0x9_0000 as
    /// descriptors `first`, `first + 1` of queue q's table.
    fn request(&mut self, q: usize, first: u16) {
        let mut hdr = [0u8; 24];
        hdr[..4].copy_from_slice(&0x100u32.to_le_bytes());
        self.ram.write_slice(&hdr, GuestAddress(0x8_0000)).unwrap();
        self.ram
            .write_slice(&[0xaa; 408], GuestAddress(0x9_0000))
            .unwrap();
        let table = ring(q as u64);
        self.put_desc(table, first, 0x8_0000, 24, F_NEXT, first + 1);
        self.put_desc(table, first + 1, 0x9_0000, 408, F_WRITE, 0);
        self.offer(q, first);
    }

    fn response_type(&self) -> u32 {
        self.ram.read_obj(GuestAddress(0x9_0000)).unwrap()
    }
}

#[test]
fn linux_bring_up_and_one_request() {
    let mut g = Guest::new();
    assert_eq!(g.dev.msix_vectors(), 3);
    assert_eq!(g.r(0x12, 2), 2, "num_queues");
    g.init();
    g.request(0, 0);
    g.kick(0);
    assert_eq!(g.used(0), (1, vec![(0, 408)]));
    assert_eq!(g.response_type(), 0x1101, "OK_DISPLAY_INFO");
    let past: u8 = g.ram.read_obj(GuestAddress(0x9_0000 + 408)).unwrap();
    assert_eq!(past, 0, "nothing written past the response");
    assert_eq!(g.irq.take(), vec![1], "controlq's vector");
    assert_eq!(g.r(layout::ISR, 1), 1, "queue interrupt");
    assert_eq!(g.r(layout::ISR, 1), 0, "read-to-clear");
    // Device config: events_read 0, num_scanouts = heads, num_capsets 0.
    assert_eq!(g.r(layout::DEVICE + 8, 4), 4);
    assert_eq!(g.r(layout::DEVICE + 12, 4), 0);
    g.w32(layout::DEVICE + 4, 1);
    // A second request in the next slot; the cursor queue answers nothing.
    g.request(0, 2);
    g.kick(0);
    assert_eq!(g.used(0).0, 2);
    g.put_desc(ring(1), 0, 0x8_0000, 56, 0, 0);
    g.offer(1, 0);
    g.kick(1);
    assert_eq!(g.used(1), (1, vec![(0, 0)]));
    assert_eq!(g.irq.take(), vec![1, 2]);
    assert!(g.dev.take_notices().is_empty());
}

#[test]
fn indirect_chain_is_served() {
    let mut g = Guest::new();
    g.init();
    g.request(0, 0);
    // Replace the chain by an indirect table at 0xa_0000 holding the same two descriptors.
    g.avail[0] = 0;
    g.put_desc(0xa_0000, 0, 0x8_0000, 24, F_NEXT, 1);
    g.put_desc(0xa_0000, 1, 0x9_0000, 408, F_WRITE, 0);
    g.put_desc(ring(0), 0, 0xa_0000, 32, F_INDIRECT, 0);
    g.offer(0, 0);
    g.kick(0);
    assert_eq!(g.used(0), (1, vec![(0, 408)]));
    assert_eq!(g.response_type(), 0x1101);
}

fn needs_reset(g: &mut Guest) -> bool {
    g.status() & status::NEEDS_RESET != 0
}

#[test]
fn descriptor_loop_needs_reset_until_the_driver_resets() {
    let mut g = Guest::new();
    g.init();
    g.put_desc(ring(0), 0, 0x8_0000, 24, F_NEXT, 1);
    g.put_desc(ring(0), 1, 0x8_0000, 24, F_NEXT, 0);
    g.offer(0, 0);
    g.kick(0);
    assert!(needs_reset(&mut g));
    assert_eq!(g.used(0).0, 0, "nothing used");
    assert_eq!(g.irq.take(), vec![0], "the config vector");
    assert_eq!(g.r(layout::ISR, 1), 2, "config change");
    let notices = g.dev.take_notices();
    assert!(
        notices
            .iter()
            .any(|n| n.contains("controlq") && n.contains("needs reset")),
        "{notices:?}"
    );
    // Further kicks do nothing; a reset and a new bring-up serve again.
    g.request(0, 2);
    g.kick(0);
    assert_eq!(g.used(0).0, 0);
    g.init();
    assert!(!needs_reset(&mut g));
    g.request(0, 0);
    g.kick(0);
    assert_eq!(g.used(0), (1, vec![(0, 408)]));
}

#[test]
fn malformed_chains() {
    // Next index past the table.
    let mut g = Guest::new();
    g.init();
    g.put_desc(ring(0), 0, 0x8_0000, 24, F_NEXT, 300);
    g.offer(0, 0);
    g.kick(0);
    assert!(needs_reset(&mut g));

    // Head index out of range.
    let mut g = Guest::new();
    g.init();
    g.offer(0, 999);
    g.kick(0);
    assert!(needs_reset(&mut g));

    // An indirect table longer than MAX_CHAIN_DESCRIPTORS, walked to its end.
    let mut g = Guest::new();
    g.init();
    let n = super::transport::MAX_CHAIN_DESCRIPTORS as u16 + 10;
    for i in 0..n {
        let flags = if i + 1 < n { F_NEXT } else { F_WRITE };
        g.put_desc(0xb_0000, i, 0x8_0000, 1, flags, i + 1);
    }
    g.put_desc(ring(0), 0, 0xb_0000, 16 * u32::from(n), F_INDIRECT, 0);
    g.offer(0, 0);
    g.kick(0);
    assert!(needs_reset(&mut g), "{n} descriptors");

    // Indirect tables: beyond 65535 entries, not a multiple of 16, nested.
    for (len, nested) in [(16 * 65536, false), (20, false), (32, true)] {
        let mut g = Guest::new();
        g.init();
        let flags = if nested { F_INDIRECT } else { F_NEXT };
        g.put_desc(0xa_0000, 0, 0xa_0000, 32, flags, 1);
        g.put_desc(0xa_0000, 1, 0x9_0000, 408, F_WRITE, 0);
        g.put_desc(ring(0), 0, 0xa_0000, len, F_INDIRECT, 0);
        g.offer(0, 0);
        g.kick(0);
        assert!(needs_reset(&mut g), "indirect table of {len} bytes");
    }

    // An available index far ahead of what was used.
    let mut g = Guest::new();
    g.init();
    let avail = ring(0) + 16 * u64::from(g.size);
    g.ram.write_obj(1000u16, GuestAddress(avail + 2)).unwrap();
    g.kick(0);
    assert!(needs_reset(&mut g));
}

#[test]
fn buffers_outside_ram_and_oversized_requests_get_error_responses() {
    let mut g = Guest::new();
    g.init();
    // The request lies outside RAM: ERR_UNSPEC, the device keeps going.
    g.put_desc(ring(0), 0, 0x4000_0000, 24, F_NEXT, 1);
    g.put_desc(ring(0), 1, 0x9_0000, 408, F_WRITE, 0);
    g.offer(0, 0);
    g.kick(0);
    assert_eq!(g.used(0), (1, vec![(0, 24)]));
    assert_eq!(g.response_type(), 0x1200);
    assert!(!needs_reset(&mut g));
    assert!(!g.dev.take_notices().is_empty());
    // More than MAX_REQUEST readable bytes: ERR_INVALID_PARAMETER, nothing read.
    let big = (super::MAX_REQUEST + 1) as u32;
    g.put_desc(ring(0), 2, 0x4000_0000, big, F_NEXT, 3);
    g.put_desc(ring(0), 3, 0x9_0000, 408, F_WRITE, 0);
    g.offer(0, 2);
    g.kick(0);
    assert_eq!(g.used(0), (2, vec![(0, 24), (2, 24)]));
    assert_eq!(g.response_type(), 0x1205);
    // Too little writable room: what fits. The response buffer outside RAM: nothing.
    g.put_desc(ring(0), 4, 0x8_0000, 24, F_NEXT, 5);
    g.put_desc(ring(0), 5, 0x9_0000, 10, F_WRITE, 0);
    g.offer(0, 4);
    g.request(0, 6);
    g.put_desc(ring(0), 7, 0x4000_0000, 408, F_WRITE, 0);
    g.kick(0);
    assert_eq!(g.used(0).1[2..], [(4, 10), (6, 0)]);
    assert!(!needs_reset(&mut g));
}

#[test]
fn rings_outside_ram_need_reset() {
    let mut g = Guest::new();
    assert!(g.negotiate(super::transport::feature::OFFERED));
    g.w16(0x16, 0);
    g.w16(0x18, 16);
    g.w32(0x20, 0);
    g.w32(0x24, 0x10);
    g.w32(0x28, 0x2000);
    g.w32(0x30, 0x3000);
    g.w16(0x1c, 1);
    let s = g.status() | status::DRIVER_OK;
    g.w8(0x14, s);
    assert_eq!(
        g.r(0x20, 8),
        0x10_0000_0000,
        "queue_desc as one 64-bit read"
    );
    g.kick(0);
    assert!(needs_reset(&mut g));
    let n = g.dev.take_notices();
    assert!(
        n.iter().any(|n| n.contains("outside mapped guest memory")),
        "{n:?}"
    );
}

#[test]
fn misaligned_ring_needs_reset() {
    let mut g = Guest::new();
    assert!(g.negotiate(super::transport::feature::OFFERED));
    g.w16(0x16, 0);
    g.w(0x20, &0x1_0008u64.to_le_bytes());
    g.w16(0x1c, 1);
    assert!(needs_reset(&mut g));
}

#[test]
fn feature_negotiation_refuses_what_was_not_offered() {
    let offered = super::transport::feature::OFFERED;
    let mut g = Guest::new();
    assert!(!g.negotiate(offered | 1), "VIRGL was not offered");
    assert!(!g.negotiate(offered & !(1 << 32)), "no VERSION_1");
    assert!(
        !g.negotiate(offered | 1 << 33),
        "ACCESS_PLATFORM was not offered"
    );
    assert!(!g.dev.take_notices().is_empty());
    // DRIVER_OK without FEATURES_OK is refused too.
    let s = g.status() | status::DRIVER_OK;
    g.w8(0x14, s);
    assert_eq!(g.status() & status::DRIVER_OK, 0);
    // A subset is fine; features are fixed after FEATURES_OK.
    assert!(g.negotiate(1 << 32));
    g.w32(0x08, 0);
    g.w32(0x0c, 2);
    assert_eq!(g.r(0x0c, 4), 0);
    // Clearing a status bit is refused.
    g.w8(0x14, status::ACKNOWLEDGE);
    assert_ne!(g.status() & status::FEATURES_OK, 0);
}

#[test]
fn queue_registers_refuse_bad_values() {
    let mut g = Guest::new();
    g.w16(0x16, 0);
    g.w16(0x18, 100);
    assert_eq!(g.r(0x18, 2), 256, "not a power of two");
    g.w16(0x18, 512);
    assert_eq!(g.r(0x18, 2), 256, "above the maximum");
    g.w16(0x18, 64);
    assert_eq!(g.r(0x18, 2), 64);
    g.w16(0x1a, 3);
    assert_eq!(
        g.r(0x1a, 2),
        u64::from(NO_VECTOR),
        "vector 3 does not exist"
    );
    g.w16(0x10, 7);
    assert_eq!(g.r(0x10, 2), u64::from(NO_VECTOR));
    g.w16(0x16, 2);
    assert_eq!(g.r(0x18, 2), 0, "queue 2 does not exist");
    g.w16(0x1c, 1);
    assert_eq!(g.r(0x1c, 2), 0);
    g.w16(0x16, 0);
    g.w16(0x1c, 0);
    assert_eq!(g.r(0x1c, 2), 0, "writing 0 does not enable");
    let ignored = g.dev.counters().ignored_writes;
    g.w16(0x04, 1);
    g.w(0x14, &[1, 0]);
    g.w(0x01, &[1]);
    assert_eq!(g.dev.counters().ignored_writes, ignored + 3);
}

#[test]
fn kicks_wait_for_memory_and_driver_ok() {
    let mut g = Guest::new();
    g.dev.attach_memory(None);
    g.init();
    g.request(0, 0);
    g.kick(0);
    assert_eq!(g.used(0).0, 0, "no memory: remembered");
    g.dev.attach_memory(Some(g.ram.clone()));
    assert_eq!(g.used(0), (1, vec![(0, 408)]), "served on attach");
    assert_eq!(g.irq.take(), vec![1]);
}

#[test]
fn reset_mid_stream() {
    let mut g = Guest::new();
    g.init();
    g.request(0, 0);
    g.kick(0);
    g.request(0, 2);
    // Reset before the second kick: queues, features and vectors are gone.
    g.w8(0x14, 0);
    assert_eq!(g.status(), 0);
    g.w16(0x16, 0);
    assert_eq!(g.r(0x1c, 2), 0);
    assert_eq!(g.r(0x1a, 2), u64::from(NO_VECTOR));
    assert_eq!(g.r(0x10, 2), u64::from(NO_VECTOR));
    g.kick(0);
    assert_eq!(g.used(0).0, 1, "a reset device serves nothing");
    // Clear the used ring as a new driver would allocate one, and start again.
    g.ram
        .write_slice(&[0u8; 0x100], GuestAddress(ring(0) + 0x1000))
        .unwrap();
    g.init();
    g.request(0, 0);
    g.kick(0);
    assert_eq!(g.used(0), (1, vec![(0, 408)]));
    // The function reset the server sends on DEVICE_RESET does the same.
    g.dev.reset();
    assert_eq!(g.status(), 0);
}

#[test]
fn every_width_at_every_offset_is_harmless() {
    let mut g = Guest::new();
    g.init();
    for bar in [BAR4, BAR1] {
        let size = g.dev.region_info(bar).unwrap().size;
        for len in [1usize, 2, 3, 4, 5, 8] {
            for off in 0..size {
                let mut b = vec![0u8; len];
                let r = g.dev.read(bar, off, &mut b);
                assert_eq!(r.is_ok(), off + len as u64 <= size);
                let _ = g.dev.write(bar, off, &[0xff; 8][..len]);
            }
        }
    }
    for off in 0..256 {
        let mut b = [0u8; 4];
        let _ = g.dev.read(7, off, &mut b);
        let _ = g.dev.write(7, off, &[0xff; 4]);
    }
}

#[test]
fn config_space_and_capabilities() {
    let dev = m60();
    let c = dev.config().bytes();
    let r16 = |at: usize| u16::from_le_bytes([c[at], c[at + 1]]);
    let r32 = |at: usize| u32::from_le_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]]);
    assert_eq!((r16(0), r16(2)), (0x1af4, 0x1050));
    assert_eq!(r32(8), 0x0380_0001, "class 038000, revision 1");
    assert_eq!(c[0x3d], 0, "interrupt pin");
    assert_eq!(r32(0x10 + 4) & 0xf, 0, "BAR1 32-bit memory");
    assert_eq!(r32(0x10 + 16) & 0xf, 0xc, "BAR4 64-bit prefetchable");
    // What Linux virtio_pci_find_capability sees: vendor caps with cfg_type and bar.
    let caps = walk_capabilities(c);
    let virtio: Vec<(u8, u8, u32, u32)> = caps
        .iter()
        .filter(|&&(id, _)| id == CAP_ID_VENDOR)
        .map(|&(_, at)| (c[at + 3], c[at + 4], r32(at + 8), r32(at + 12)))
        .collect();
    assert_eq!(
        virtio,
        vec![
            (1, 4, 0x0000, 0x3c),
            (3, 4, 0x1000, 1),
            (4, 4, 0x2000, 16),
            (2, 4, 0x3000, 8),
            (5, 0, 0, 0),
            (9, 0x34, 1, 0x2d30_364d),
        ]
    );
    let notify = caps[3].1;
    assert_eq!(r32(notify + 16), 4, "notify_off_multiplier");
    let msix = caps.iter().find(|&&(id, _)| id == CAP_ID_MSIX).unwrap().1;
    assert_eq!(r16(msix + 2) & 0x7ff, 2, "3 vectors");
    assert_eq!((r32(msix + 4), r32(msix + 8)), (0x001, 0x801));
    assert_eq!(
        VendorCapability::find(c),
        Some(("M60-2Q".to_string(), dev.vgpu_type().version))
    );
    // Regions: BAR1 and BAR4 trapped, nothing mmap-able.
    let regions = dev.regions();
    assert_eq!(regions[1].size, 4096);
    assert_eq!(regions[4].size, 16384);
    assert!(regions
        .iter()
        .all(|r| !r.flags.mmap && r.mmap_areas.is_empty()));
    for i in [0, 2, 3, 5, 6, 8] {
        assert_eq!(regions[i].size, 0, "region {i}");
    }
}

#[test]
fn pci_cfg_window_reaches_bar4() {
    let mut g = Guest::new();
    let cap = walk_capabilities(g.dev.config().bytes())
        .into_iter()
        .map(|(_, at)| at as u64)
        .find(|&at| g.dev.config().bytes()[at as usize + 3] == 5)
        .unwrap();
    g.dev.write(7, cap + 4, &[4]).unwrap();
    g.dev.write(7, cap + 8, &0x12u32.to_le_bytes()).unwrap();
    g.dev.write(7, cap + 12, &2u32.to_le_bytes()).unwrap();
    let mut b = [0u8; 4];
    g.dev.read(7, cap + 16, &mut b).unwrap();
    assert_eq!(u16::from_le_bytes([b[0], b[1]]), 2, "num_queues");
    // Write device_status through the window.
    g.dev.write(7, cap + 8, &0x14u32.to_le_bytes()).unwrap();
    g.dev.write(7, cap + 12, &1u32.to_le_bytes()).unwrap();
    g.dev
        .write(7, cap + 16, &[status::ACKNOWLEDGE, 0, 0, 0])
        .unwrap();
    assert_eq!(g.status(), status::ACKNOWLEDGE);
    // A misaligned or odd-length window does nothing.
    g.dev.write(7, cap + 12, &3u32.to_le_bytes()).unwrap();
    g.dev.write(7, cap + 16, &[0, 0, 0, 0]).unwrap();
    assert_eq!(g.status(), status::ACKNOWLEDGE);
}

#[test]
fn msix_bar_keeps_the_table_and_reads_no_pending_bits() {
    let mut g = Guest::new();
    let mut b = [0u8; 4];
    g.dev.read(BAR1, 12, &mut b).unwrap();
    assert_eq!(b, [1, 0, 0, 0], "masked at reset");
    g.dev.write(BAR1, 0, &0xfee0_0000u32.to_le_bytes()).unwrap();
    g.dev.read(BAR1, 0, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0xfee0_0000);
    g.dev.read(BAR1, 0x800, &mut b).unwrap();
    assert_eq!(b, [0; 4]);
    g.dev.reset();
    g.dev.read(BAR1, 0, &mut b).unwrap();
    assert_eq!(b, [0; 4]);
}

#[test]
fn state_saves_config_and_refuses_live_queues() {
    let mut g = Guest::new();
    g.dev.write(7, 4, &[6, 0]).unwrap();
    let idle = g.dev.state();
    let json = serde_json::to_string(&idle).unwrap();
    let back: crate::device::DeviceState = serde_json::from_str(&json).unwrap();
    let mut fresh = m60();
    fresh.restore(&back).unwrap();
    assert_eq!(fresh.config().command(), 6);
    g.init();
    let live = g.dev.state();
    assert!(matches!(fresh.restore(&live), Err(DeviceError::State(_))));
    // A bochs state (no transport) does not fit.
    let mut bochs_like = idle.clone();
    bochs_like.virtio_gpu = None;
    assert!(matches!(
        fresh.restore(&bochs_like),
        Err(DeviceError::State(_))
    ));
}

#[test]
fn heads_are_reported_without_vram() {
    let dev = m60();
    assert!(dev.vram().is_none());
    assert_eq!(
        dev.head_source(0).err(),
        Some(crate::NotDisplaying::Disabled)
    );
    assert_eq!(
        dev.head_source(4).err(),
        Some(crate::NotDisplaying::NoSuchHead(4))
    );
    assert_eq!(dev.capture(0).err(), Some(crate::NotDisplaying::Disabled));
}

mod limiter;

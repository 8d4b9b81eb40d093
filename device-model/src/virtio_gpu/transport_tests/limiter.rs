//! The frame-rate limiter seen through the transport: fenced RESOURCE_FLUSHes driven through
//! `Device::write` on BAR4 (as Linux drives them), a manual clock, and the used ring.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::{ring, Guest, F_NEXT, F_WRITE};
use crate::bus::ManualClock;
use crate::catalog::Catalog;
use crate::device::Device;
use crate::frl::HeadFrames;
use crate::virtio_gpu::protocol::{
    encode, ty, CursorCmd, MemEntry, Rect, BLOB_MEM_GUEST, FORMAT_B8G8R8X8,
};

/// Tick 0 of the limiter: the clock's time when it is attached.
const T0: Duration = Duration::from_secs(1000);
/// Guest RAM of the two heads' blobs (32x32 XRGB8888, stride 128).
const BLOB: [u64; 2] = [0xa_0000, 0xb_0000];
const FULL: Rect = Rect {
    x: 0,
    y: 0,
    width: 32,
    height: 32,
};

/// Tick `k` of an `frl` grid from T0, computed here independently of the limiter.
fn tick(frl: u32, k: u64) -> Duration {
    T0 + Duration::from_nanos((u128::from(k) * 1_000_000_000 / u128::from(frl)) as u64)
}

struct Frl {
    g: Guest,
    clock: Arc<ManualClock>,
    next_desc: u16,
    /// Fence of each request by its head descriptor (None: not fenced).
    fences: HashMap<u16, Option<u64>>,
    /// Used-ring entries already returned by `completed`.
    seen: u16,
}

fn device(name: &str, frl: Option<u32>) -> Device {
    let c = Catalog::builtin().unwrap();
    let mut ty = c.resolve(name).unwrap().clone();
    if let Some(frl) = frl {
        ty.frl = frl;
    }
    Device::new(&ty, &[7; 16], None).unwrap()
}

impl Frl {
    /// M60-2Q (60 fps, 4 heads) with the clock attached at T0, queues of 64, brought up, and
    /// a guest blob shown on heads 0 (resource 1) and 1 (resource 2).
    fn new() -> Frl {
        Frl::of(device("M60-2Q", None), 64, true)
    }

    fn of(dev: Device, size: u16, clock: bool) -> Frl {
        let mut g = Guest::with(dev);
        g.size = size;
        let c = Arc::new(ManualClock::new(T0));
        if clock {
            g.dev.attach_clock(c.clone());
        }
        let mut f = Frl {
            g,
            clock: c,
            next_desc: 0,
            fences: HashMap::new(),
            seen: 0,
        };
        f.bring_up();
        f
    }

    /// A fresh driver: clean rings, Linux's bring-up, the two heads' blobs.
    fn bring_up(&mut self) {
        for q in 0..2 {
            self.g
                .ram
                .write_slice(&[0u8; 0x1000], GuestAddress(ring(q) + 0x1000))
                .unwrap();
            self.g
                .ram
                .write_slice(&[0u8; 0x1000], GuestAddress(ring(q)))
                .unwrap();
        }
        self.g.init();
        self.next_desc = 0;
        self.seen = 0;
        self.fences.clear();
        for (head, &at) in BLOB.iter().enumerate() {
            let id = head as u32 + 1;
            let e = MemEntry {
                addr: at,
                length: 0x1000,
            };
            self.ok(encode::create_blob(id, BLOB_MEM_GUEST, 0x1000, &[e]));
            self.ok(encode::set_scanout_blob(
                head as u32,
                id,
                FULL,
                (32, 32, FORMAT_B8G8R8X8),
                128,
                0,
            ));
        }
        self.completed();
        self.g.irq.take();
    }

    /// Offers `request` on queue `q` (request at 0x4_0000 + 0x100 * d, response at
    /// 0x6_0000 + 0x40 * d for head descriptor d), and kicks. Returns the head descriptor.
    fn send(&mut self, q: usize, request: &[u8]) -> u16 {
        let d = self.next_desc;
        self.next_desc = (d + 2) % self.g.size;
        let req = 0x4_0000 + 0x100 * u64::from(d) + 0x1_0000 * q as u64;
        let resp = 0x6_0000 + 0x40 * u64::from(d) + 0x1_0000 * q as u64;
        self.g.ram.write_slice(request, GuestAddress(req)).unwrap();
        self.g
            .ram
            .write_slice(&[0xee; 0x40], GuestAddress(resp))
            .unwrap();
        let table = ring(q as u64);
        self.g
            .put_desc(table, d, req, request.len() as u32, F_NEXT, d + 1);
        self.g.put_desc(table, d + 1, resp, 0x40, F_WRITE, 0);
        if q == 0 {
            let fence = crate::virtio_gpu::protocol::CtrlHeader::parse(request)
                .filter(|h| h.is_fenced())
                .map(|h| h.fence_id);
            self.fences.insert(d, fence);
        }
        self.g.offer(q, d);
        self.g.kick(q as u16);
        d
    }

    /// Sends a control request that must complete at once with OK_NODATA.
    fn ok(&mut self, request: Vec<u8>) {
        let before = self.used_idx();
        let d = self.send(0, &request);
        assert_eq!(self.used_idx(), before.wrapping_add(1), "completes at once");
        let resp: u32 = self
            .g
            .ram
            .read_obj(GuestAddress(0x6_0000 + 0x40 * u64::from(d)))
            .unwrap();
        assert_eq!(resp, ty::RESP_OK_NODATA);
    }

    /// A fenced (or not) flush of head `head`'s resource.
    fn flush(&mut self, head: u32, fence: Option<u64>) -> u16 {
        self.send(0, &encode::flush(head + 1, FULL, fence))
    }

    fn used_idx(&self) -> u16 {
        let used = ring(0) + 0x1000;
        self.g.ram.read_obj(GuestAddress(used + 2)).unwrap()
    }

    /// The control queue's completions since the last call: the fence of each (None: not
    /// fenced), in used-ring order.
    fn completed(&mut self) -> Vec<Option<u64>> {
        let used = ring(0) + 0x1000;
        let idx = self.used_idx();
        let mut out = Vec::new();
        while self.seen != idx {
            let slot = u64::from(self.seen % self.g.size);
            let id: u32 = self
                .g
                .ram
                .read_obj(GuestAddress(used + 4 + 8 * slot))
                .unwrap();
            out.push(self.fences.get(&(id as u16)).copied().flatten());
            self.seen = self.seen.wrapping_add(1);
        }
        out
    }

    fn held(&self) -> usize {
        self.g.dev.virtio_gpu().unwrap().limiter().held()
    }

    fn set(&self, t: Duration) {
        self.clock.set(t);
    }

    fn head(&self, head: usize) -> HeadFrames {
        self.g.dev.frl_counters()[head]
    }
}

/// (submitted, presented, dropped, discarded).
fn counts(h: HeadFrames) -> (u64, u64, u64, u64) {
    (h.submitted, h.presented, h.dropped, h.discarded)
}

#[test]
fn a_flush_held_between_ticks_completes_on_the_next_grid_tick() {
    let mut f = Frl::new();
    assert_eq!(f.g.dev.frl_deadline(), None, "idle: no wake-up");
    assert!(f.g.dev.frame_rate_limiter());
    f.set(T0 + Duration::from_millis(5));
    f.flush(0, Some(1));
    assert_eq!(f.completed(), [], "held");
    assert!(f.g.irq.take().is_empty(), "no interrupt for a held fence");
    // The next tick of the grid, not 1/60 s after the flush.
    assert_eq!(f.g.dev.frl_deadline(), Some(tick(60, 1)));
    f.set(tick(60, 1) - Duration::from_nanos(1));
    assert_eq!(f.g.dev.frl_tick(), 0);
    assert_eq!(f.completed(), []);
    f.set(tick(60, 1));
    assert_eq!(f.g.dev.frl_tick(), 1);
    assert_eq!(f.completed(), [Some(1)]);
    assert_eq!(f.g.irq.take(), [1], "one controlq interrupt");
    assert_eq!(f.g.dev.frl_deadline(), None);
    assert_eq!(f.g.dev.frl_tick(), 0);
    // Held exactly on a tick: the next one. Held at 20 ms: tick 2 (33.3 ms), not 36.7 ms.
    f.flush(0, Some(2));
    assert_eq!(f.g.dev.frl_deadline(), Some(tick(60, 2)));
    f.set(tick(60, 2));
    assert_eq!(f.g.dev.frl_tick(), 1);
    f.set(T0 + Duration::from_millis(40));
    f.flush(0, Some(3));
    assert_eq!(f.g.dev.frl_deadline(), Some(tick(60, 3)));
    // A late tick (the runtime overslept) releases everything due.
    f.set(T0 + Duration::from_millis(100));
    assert_eq!(f.g.dev.frl_tick(), 1);
    assert_eq!(f.completed(), [Some(2), Some(3)]);
    // The response was written when the request was served.
    let resp: u32 = f.g.ram.read_obj(GuestAddress(0x6_0000)).unwrap();
    assert_eq!(resp, ty::RESP_OK_NODATA);
    assert_eq!(counts(f.head(0)), (3, 3, 0, 0));
}

#[test]
fn ten_thousand_ticks_do_not_drift() {
    let mut f = Frl::new();
    for k in 1..=10_000u64 {
        // Submitted a little after the previous tick, as a guest woken by it would.
        f.set(tick(60, k - 1) + Duration::from_micros(300));
        f.flush((k % 2) as u32, Some(k));
        let at = f.g.dev.frl_deadline().unwrap();
        assert_eq!(at, tick(60, k), "tick {k}");
        f.set(at);
        assert_eq!(f.g.dev.frl_tick(), 1, "tick {k}");
    }
    assert_eq!(
        f.g.dev.frl_deadline(),
        None,
        "nothing held after the last tick"
    );
    assert_eq!(
        tick(60, 10_000),
        T0 + Duration::from_nanos(166_666_666_666),
        "10000/60 s after tick 0, to the nanosecond"
    );
    assert_eq!(f.completed().len(), 10_000);
    for head in [0, 1] {
        let h = f.head(head);
        assert_eq!(counts(h), (5_000, 5_000, 0, 0));
        assert_eq!(h.present_rate, 30.0, "every other tick");
    }
}

#[test]
fn fences_complete_in_id_order_across_heads() {
    let mut f = Frl::new();
    f.set(T0 + Duration::from_millis(1));
    f.flush(0, Some(11));
    f.flush(1, Some(12));
    f.flush(0, Some(13));
    f.flush(1, Some(14));
    assert_eq!(f.held(), 4);
    f.set(tick(60, 1));
    assert_eq!(f.g.dev.frl_tick(), 4);
    assert_eq!(f.completed(), [Some(11), Some(12), Some(13), Some(14)]);
    assert_eq!(f.g.irq.take(), [1], "one interrupt per tick");
    // Two frames of each head in one tick: one presented, one merged.
    for head in [0, 1] {
        assert_eq!(counts(f.head(head)), (2, 1, 1, 0));
    }
    assert_eq!(counts(f.head(2)), (0, 0, 0, 0));
    // A fenced request that is not a flush waits behind a held flush, and completes at once
    // when nothing is held.
    f.flush(1, Some(15));
    f.send(0, &encode::header(ty::GET_DISPLAY_INFO, Some(16)));
    f.flush(0, Some(17));
    assert_eq!(f.completed(), []);
    f.set(tick(60, 2));
    assert_eq!(f.g.dev.frl_tick(), 3);
    assert_eq!(f.completed(), [Some(15), Some(16), Some(17)]);
    f.send(0, &encode::header(ty::GET_DISPLAY_INFO, Some(18)));
    assert_eq!(f.completed(), [Some(18)]);
    // The counters saw one frame per head in that tick, none merged.
    assert_eq!(counts(f.head(0)), (3, 2, 1, 0));
    assert_eq!(counts(f.head(1)), (3, 2, 1, 0));
}

#[test]
fn unfenced_requests_and_the_cursor_queue_are_never_held() {
    let mut f = Frl::new();
    f.flush(0, Some(1));
    f.send(0, &encode::get_edid(0));
    f.flush(1, None);
    assert_eq!(f.completed(), [None, None], "past the held fence");
    let cursor = CursorCmd {
        scanout_id: 0,
        x: 5,
        y: 5,
        resource_id: 0,
        hot_x: 0,
        hot_y: 0,
    };
    f.send(1, &encode::cursor(false, cursor));
    assert_eq!(f.g.used(1).0, 1, "the cursor queue completes at once");
    assert_eq!(f.g.irq.take(), [1, 1, 2], "one per kick that used a chain");
    assert_eq!(f.held(), 1);
    // An unfenced flush is a frame the guest does not wait for: presented at once.
    assert_eq!(counts(f.head(1)), (1, 1, 0, 0));
    f.set(tick(60, 1));
    assert_eq!(f.g.dev.frl_tick(), 1);
    assert_eq!(f.completed(), [Some(1)]);
}

#[test]
fn knob_flips_mid_stream() {
    let mut f = Frl::new();
    f.set(T0 + Duration::from_millis(2));
    f.flush(0, Some(1));
    f.flush(1, Some(2));
    f.flush(0, Some(3));
    assert_eq!(f.held(), 3);
    f.g.dev.set_frame_rate_limiter(false);
    assert!(!f.g.dev.frame_rate_limiter());
    assert_eq!(f.completed(), [Some(1), Some(2), Some(3)], "at once");
    assert_eq!(f.g.irq.take(), [1]);
    assert_eq!(f.g.dev.frl_deadline(), None);
    assert_eq!(counts(f.head(0)), (2, 1, 1, 0));
    // Off: fenced flushes complete as they are served, and still count.
    f.flush(0, Some(4));
    f.flush(0, Some(5));
    assert_eq!(f.completed(), [Some(4), Some(5)]);
    assert_eq!(counts(f.head(0)), (4, 3, 1, 0));
    assert_eq!(f.g.dev.frl_tick(), 0);
    // Turning it off twice does nothing more; on again holds again.
    f.g.dev.set_frame_rate_limiter(false);
    f.g.dev.set_frame_rate_limiter(true);
    f.flush(1, Some(6));
    assert_eq!(f.completed(), []);
    assert_eq!(f.g.dev.frl_deadline(), Some(tick(60, 1)));
    f.set(tick(60, 1));
    assert_eq!(f.g.dev.frl_tick(), 1);
    assert_eq!(f.completed(), [Some(6)]);
    assert_eq!(counts(f.head(1)), (2, 2, 0, 0));
    // Guest-visible state did not change: no reset, the driver kept going.
    assert_eq!(f.g.dev.counters().resets, 0);
}

#[test]
fn reset_and_disconnect_drop_held_fences() {
    let mut f = Frl::new();
    // Status 0.
    f.flush(0, Some(1));
    f.flush(1, Some(2));
    let used = f.used_idx();
    f.g.w8(0x14, 0);
    assert_eq!(f.held(), 0, "nothing kept");
    assert_eq!(f.g.dev.frl_deadline(), None);
    f.set(tick(60, 5));
    assert_eq!(f.g.dev.frl_tick(), 0);
    assert_eq!(f.used_idx(), used, "not completed");
    assert!(f.g.irq.take().is_empty());
    assert_eq!(counts(f.head(0)), (1, 0, 0, 1));
    // The function reset (vfio-user DEVICE_RESET).
    f.bring_up();
    f.flush(0, Some(1));
    f.g.dev.reset();
    assert_eq!((f.held(), f.used_idx()), (0, 2 * BLOB.len() as u16));
    // The client went away.
    f.bring_up();
    f.flush(0, Some(1));
    f.flush(0, Some(2));
    f.g.dev.attach_memory(None);
    assert_eq!(f.held(), 0);
    assert_eq!(f.g.dev.frl_deadline(), None);
    f.g.dev.attach_memory(Some(f.g.ram.clone()));
    assert_eq!(f.g.dev.frl_tick(), 0);
    assert_eq!(f.used_idx(), 2 * BLOB.len() as u16, "never completed");
    assert_eq!(counts(f.head(0)), (4, 0, 0, 4));
    // A broken ring drops them too (the device needs a reset).
    f.bring_up();
    f.flush(0, Some(1));
    f.g.offer(0, 999);
    f.g.kick(0);
    assert_ne!(f.g.status() & super::status::NEEDS_RESET, 0);
    assert_eq!(f.held(), 0);
}

#[test]
fn frl_zero_and_no_clock_never_hold() {
    for mut f in [
        Frl::of(device("M60-2Q", Some(0)), 64, true),
        Frl::of(device("M60-0B", None), 64, false),
    ] {
        f.flush(0, Some(1));
        f.flush(1, Some(2));
        assert_eq!(f.completed(), [Some(1), Some(2)]);
        assert_eq!(f.g.dev.frl_deadline(), None);
        assert_eq!(f.held(), 0);
        assert_eq!(counts(f.head(0)), (1, 1, 0, 0));
    }
}

#[test]
fn m60_0b_ticks_at_45_fps_on_both_heads() {
    let mut f = Frl::of(device("M60-0B", None), 64, true);
    for k in 1..=90u64 {
        f.set(tick(45, k - 1) + Duration::from_millis(1));
        f.flush(0, Some(2 * k));
        f.flush(1, Some(2 * k + 1));
        assert_eq!(f.g.dev.frl_deadline(), Some(tick(45, k)));
        f.set(tick(45, k));
        assert_eq!(f.g.dev.frl_tick(), 2);
    }
    for head in [0, 1] {
        let h = f.head(head);
        assert_eq!(counts(h), (90, 90, 0, 0));
        assert_eq!(h.present_rate, 45.0);
    }
}

#[test]
fn held_chains_are_bounded_by_the_queue_size() {
    // Queue of 16: 8 two-descriptor chains fit in flight; hold them all, then offer one more
    // chain than the ring has room for by reusing a head (a buggy driver).
    let mut f = Frl::of(device("M60-2Q", None), 16, true);
    let base = f.used_idx();
    for i in 0..8 {
        f.flush(0, Some(100 + i));
    }
    assert_eq!(f.held(), 8);
    // Fill the ring with 8 more chains re-offering held heads: 16 held, the rest waits.
    for i in 0..9u16 {
        f.g.offer(0, 2 * (i % 8));
        f.fences.insert(2 * (i % 8), Some(200));
    }
    f.g.kick(0);
    assert_eq!(f.held(), 16, "at most the queue size");
    assert_eq!(f.used_idx(), base);
    f.set(tick(60, 1));
    assert_eq!(f.g.dev.frl_tick(), 16);
    // The chain that waited is served after the tick, and held for the next.
    assert_eq!(f.held(), 1);
    assert_eq!(f.used_idx(), base.wrapping_add(16));
}

//! Protocol tier for the virtio-gpu personality: an independent vfio-user client (the
//! `vfio_user` crate's `Client`) plays a VMM and a hand-written virtio driver plays the guest.
//! Guest RAM is a sealed memfd the client maps into the server; the test builds split rings in
//! it, kicks through the notify capability, waits for the MSI-X eventfd and reads the used ring,
//! exactly as Linux `virtio_gpu` would (every structure is spelled out here from the virtio
//! spec, independently of the device model's code).

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;
use vfio_user::Client;

const CONFIG: u32 = 7;
const MSIX: u32 = 2;
const RAM_SIZE: u64 = 32 << 20;

// virtio-pci capability types.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

// Device status bits.
const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;

// Feature bits.
const F_EDID: u32 = 1;
const F_RESOURCE_BLOB: u32 = 3;
const F_INDIRECT: u32 = 28;
const F_VERSION_1: u32 = 32;
const F_VIRGL: u32 = 0;
const F_ACCESS_PLATFORM: u32 = 33;
const F_RING_PACKED: u32 = 34;

// virtio-gpu command and response types.
const GET_DISPLAY_INFO: u32 = 0x100;
const RESOURCE_CREATE_2D: u32 = 0x101;
const RESOURCE_UNREF: u32 = 0x102;
const SET_SCANOUT: u32 = 0x103;
const RESOURCE_FLUSH: u32 = 0x104;
const TRANSFER_TO_HOST_2D: u32 = 0x105;
const ATTACH_BACKING: u32 = 0x106;
const GET_EDID: u32 = 0x10a;
const RESOURCE_CREATE_BLOB: u32 = 0x10c;
const SET_SCANOUT_BLOB: u32 = 0x10d;
const OK_NODATA: u32 = 0x1100;
const OK_DISPLAY_INFO: u32 = 0x1101;
const OK_EDID: u32 = 0x1104;
const ERR_OUT_OF_MEMORY: u32 = 0x1201;
const ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
const ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
const ERR_INVALID_PARAMETER: u32 = 0x1205;
const FLAG_FENCE: u32 = 1;
const B8G8R8X8: u32 = 2;
const BLOB_MEM_GUEST: u32 = 1;

// Where the test driver keeps things in guest RAM.
const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x1_1000;
const USED: u64 = 0x1_2000;
const REQ: u64 = 0x2_0000;
const RESP: u64 = 0x3_0000;
const INDIRECT: u64 = 0x4_0000;
const PIXELS: u64 = 0x10_0000;
const QUEUE_SIZE: u16 = 64;

#[derive(Debug, Clone, Copy)]
struct VirtioCap {
    bar: u32,
    offset: u64,
}

/// A minimal virtio-pci modern driver with one control queue.
struct Driver {
    client: Client,
    ram: File,
    common: VirtioCap,
    notify: VirtioCap,
    notify_mult: u64,
    isr: VirtioCap,
    device: VirtioCap,
    msix: Vec<OwnedFd>,
    next_avail: u16,
    last_used: u16,
    queue_notify_off: u16,
}

fn le(b: &[u8]) -> u64 {
    b.iter().rev().fold(0u64, |a, &x| a << 8 | u64::from(x))
}

impl Driver {
    fn cfg(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = vec![0u8; len];
        self.client.region_read(CONFIG, offset, &mut b).unwrap();
        le(&b)
    }

    fn read(&mut self, cap: VirtioCap, offset: u64, len: usize) -> u64 {
        let mut b = vec![0u8; len];
        self.client
            .region_read(cap.bar, cap.offset + offset, &mut b)
            .unwrap();
        le(&b)
    }

    fn write(&mut self, cap: VirtioCap, offset: u64, value: u64, len: usize) {
        self.client
            .region_write(cap.bar, cap.offset + offset, &value.to_le_bytes()[..len])
            .unwrap();
    }

    /// Connects, maps `RAM_SIZE` of sealed guest RAM at 0 and assigns 3 MSI-X eventfds.
    fn attach(served: &Served) -> Driver {
        let mut client = Client::new(&served.socket).expect("client negotiates");
        let ram = vgpu_emu::memfd::memfd("guest-ram", RAM_SIZE).unwrap();
        client
            .dma_map(0, 0, RAM_SIZE, ram.as_raw_fd())
            .expect("DMA map");
        let info = client.get_irq_info(MSIX).unwrap();
        assert!(info.count >= 3, "MSI-X vectors: {}", info.count);
        let msix: Vec<OwnedFd> = (0..3)
            .map(|_| vgpu_emu::irq::new_eventfd(libc::EFD_NONBLOCK).unwrap())
            .collect();
        // One vector per SET_IRQS, as QEMU assigns them without NORESIZE.
        for (i, fd) in msix.iter().enumerate() {
            client
                .set_irqs(MSIX, libc_irq_flags(), i as u32, 1, &[fd.as_raw_fd()])
                .unwrap();
        }
        let none = VirtioCap { bar: 0, offset: 0 };
        let mut d = Driver {
            client,
            ram,
            common: none,
            notify: none,
            notify_mult: 0,
            isr: none,
            device: none,
            msix,
            next_avail: 0,
            last_used: 0,
            queue_notify_off: 0,
        };
        d.find_caps();
        d
    }

    /// Walks the capability list like Linux's virtio_pci_find_capability.
    fn find_caps(&mut self) {
        assert_ne!(self.cfg(0x06, 2) & 0x10, 0, "capability list bit");
        let mut at = self.cfg(0x34, 1) & !3;
        let mut seen = std::collections::HashSet::new();
        let (mut common, mut notify, mut isr, mut device) = (None, None, None, None);
        while at != 0 {
            assert!(seen.insert(at), "capability loop at {at:#x}");
            let id = self.cfg(at, 1);
            if id == 0x09 {
                let cfg_type = self.cfg(at + 3, 1) as u8;
                let bar = self.cfg(at + 4, 1) as u32;
                let cap = VirtioCap {
                    bar,
                    offset: self.cfg(at + 8, 4),
                };
                let len = self.cfg(at + 12, 4);
                match cfg_type {
                    CAP_COMMON if common.is_none() => common = Some((cap, len)),
                    CAP_NOTIFY if notify.is_none() => {
                        self.notify_mult = self.cfg(at + 16, 4);
                        notify = Some((cap, len));
                    }
                    CAP_ISR if isr.is_none() => isr = Some((cap, len)),
                    CAP_DEVICE if device.is_none() => device = Some((cap, len)),
                    _ => {}
                }
            }
            at = self.cfg(at + 1, 1) & !3;
        }
        let caps = [common, notify, isr, device].map(|c| c.expect("every virtio capability"));
        let pages: std::collections::HashSet<(u32, u64)> =
            caps.iter().map(|(c, _)| (c.bar, c.offset / 4096)).collect();
        assert_eq!(pages.len(), 4, "each capability on its own 4 KiB page");
        assert!(caps[0].1 >= 56, "common configuration length");
        [self.common, self.notify, self.isr, self.device] = caps.map(|(c, _)| c);
    }

    /// Linux's virtio_pci_modern probe and virtio_gpu's queue setup for the control queue.
    fn initialise(&mut self, accept: u64) {
        let c = self.common;
        self.write(c, 20, 0, 1);
        assert_eq!(self.read(c, 20, 1), 0, "reset reads back 0");
        self.write(c, 20, u64::from(ACKNOWLEDGE | DRIVER), 1);
        let offered = self.features();
        assert_eq!(offered & accept, accept, "offered {offered:#x}");
        self.write(c, 8, 0, 4);
        self.write(c, 12, accept & 0xffff_ffff, 4);
        self.write(c, 8, 1, 4);
        self.write(c, 12, accept >> 32, 4);
        self.write(c, 20, u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK), 1);
        assert_ne!(
            self.read(c, 20, 1) as u8 & FEATURES_OK,
            0,
            "FEATURES_OK accepted"
        );
        assert_eq!(self.read(c, 18, 2), 2, "num_queues: control and cursor");
        self.write(c, 16, 0, 2);
        assert_eq!(self.read(c, 16, 2), 0, "config vector");
        self.write(c, 22, 0, 2);
        let max = self.read(c, 24, 2) as u16;
        assert!(max >= QUEUE_SIZE, "queue size {max}");
        self.write(c, 24, u64::from(QUEUE_SIZE), 2);
        self.write(c, 26, 1, 2);
        assert_eq!(self.read(c, 26, 2), 1, "queue vector accepted");
        self.write(c, 32, DESC, 8);
        self.write(c, 40, AVAIL, 8);
        self.write(c, 48, USED, 8);
        self.queue_notify_off = self.read(c, 30, 2) as u16;
        self.write(c, 28, 1, 2);
        self.write(
            c,
            20,
            u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
            1,
        );
        self.next_avail = 0;
        self.last_used = 0;
    }

    fn features(&mut self) -> u64 {
        let c = self.common;
        self.write(c, 0, 0, 4);
        let lo = self.read(c, 4, 4);
        self.write(c, 0, 1, 4);
        let hi = self.read(c, 4, 4);
        hi << 32 | lo
    }

    fn put(&self, at: u64, bytes: &[u8]) {
        self.ram.write_all_at(bytes, at).unwrap();
    }

    fn get(&self, at: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.ram.read_exact_at(&mut b, at).unwrap();
        b
    }

    /// Submits one request (device-readable `req`, `resp_len` bytes device-writable) and
    /// returns the used length and the response, after the queue's interrupt.
    fn submit(&mut self, req: &[u8], resp_len: u32) -> (u32, Vec<u8>) {
        self.submit_chain(
            &[(REQ, req.len() as u32, false), (RESP, resp_len, true)],
            req,
        )
    }

    /// Submits a chain of (addr, len, device-writable) descriptors; `req` is written at REQ.
    fn submit_chain(&mut self, chain: &[(u64, u32, bool)], req: &[u8]) -> (u32, Vec<u8>) {
        self.put(REQ, req);
        self.put(RESP, &vec![0xee; 4096]);
        let head = (self.next_avail * 4) % QUEUE_SIZE;
        for (i, &(addr, len, write)) in chain.iter().enumerate() {
            let idx = head + i as u16;
            let last = i + 1 == chain.len();
            let mut d = Vec::new();
            d.extend_from_slice(&addr.to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
            let flags = u16::from(!last) | if write { 2 } else { 0 };
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&(idx + 1).to_le_bytes());
            self.put(DESC + 16 * u64::from(idx), &d);
        }
        self.offer_and_wait(head)
    }

    /// Like [`Driver::submit`], through one indirect descriptor table (how Linux submits a
    /// request of several buffers once RING_INDIRECT_DESC is negotiated).
    fn submit_indirect(&mut self, req: &[u8], resp_len: u32) -> (u32, Vec<u8>) {
        let mut table = Vec::new();
        for (i, (addr, len, flags)) in [(REQ, req.len() as u32, 1u16), (RESP, resp_len, 2)]
            .into_iter()
            .enumerate()
        {
            table.extend_from_slice(&addr.to_le_bytes());
            table.extend_from_slice(&len.to_le_bytes());
            table.extend_from_slice(&flags.to_le_bytes());
            table.extend_from_slice(&(i as u16 + 1).to_le_bytes());
        }
        self.put(INDIRECT, &table);
        let head = (self.next_avail * 4) % QUEUE_SIZE;
        let mut d = Vec::new();
        d.extend_from_slice(&INDIRECT.to_le_bytes());
        d.extend_from_slice(&(table.len() as u32).to_le_bytes());
        d.extend_from_slice(&4u16.to_le_bytes());
        d.extend_from_slice(&0u16.to_le_bytes());
        self.put(DESC + 16 * u64::from(head), &d);
        self.put(REQ, req);
        self.put(RESP, &vec![0xee; 4096]);
        self.offer_and_wait(head)
    }

    /// Makes the chain at `head` available, kicks, waits for the queue's interrupt, and
    /// returns the used length and the response.
    fn offer_and_wait(&mut self, head: u16) -> (u32, Vec<u8>) {
        let slot = u64::from(self.next_avail % QUEUE_SIZE);
        self.put(AVAIL + 4 + 2 * slot, &head.to_le_bytes());
        self.next_avail = self.next_avail.wrapping_add(1);
        self.put(AVAIL + 2, &self.next_avail.to_le_bytes());
        self.kick(0);
        self.wait_used();
        let slot = u64::from(self.last_used % QUEUE_SIZE);
        let elem = self.get(USED + 4 + 8 * slot, 8);
        self.last_used = self.last_used.wrapping_add(1);
        assert_eq!(le(&elem[..4]) as u16, head, "used id");
        (le(&elem[4..]) as u32, self.get(RESP, 4096))
    }

    fn kick(&mut self, queue: u16) {
        let n = self.notify;
        let at = u64::from(self.queue_notify_off) * self.notify_mult;
        self.write(n, at, u64::from(queue), 2);
    }

    fn used_idx(&self) -> u16 {
        le(&self.get(USED + 2, 2)) as u16
    }

    fn wait_used(&mut self) {
        let fd = self.msix[1].as_raw_fd();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one pollfd on the stack.
        let ready = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(ready, 1, "the control queue's MSI-X vector fired");
        let mut v = [0u8; 8];
        // SAFETY: reads 8 bytes into a stack buffer from our own eventfd.
        unsafe { libc::read(fd, v.as_mut_ptr().cast(), 8) };
        assert_eq!(
            self.used_idx(),
            self.last_used.wrapping_add(1),
            "one used entry"
        );
        let isr = self.isr;
        let _ = self.read(isr, 0, 1);
    }
}

fn libc_irq_flags() -> u32 {
    // VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER
    (1 << 2) | (1 << 5)
}

fn hdr(ty: u32, flags: u32, fence: u64) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&ty.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&fence.to_le_bytes());
    h.extend_from_slice(&[0u8; 8]);
    h
}

fn words(mut v: Vec<u8>, w: &[u32]) -> Vec<u8> {
    for x in w {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

fn resp_type(resp: &[u8]) -> u32 {
    le(&resp[..4]) as u32
}

/// What the guest draws: a pure function of the position.
fn pixel(x: u32, y: u32, seed: u32) -> [u8; 3] {
    [
        (x * 5 + seed) as u8,
        (y * 3 + seed * 7) as u8,
        ((x ^ y) + seed * 31) as u8,
    ]
}

/// Writes a w x h B8G8R8X8 image of `pixel(.., seed)` at `at`, `stride` bytes per row.
fn draw(d: &Driver, at: u64, w: u32, h: u32, stride: u32, seed: u32) -> Vec<u8> {
    let mut rgb = Vec::new();
    for y in 0..h {
        let mut row = vec![0u8; stride as usize];
        for x in 0..w {
            let [r, g, b] = pixel(x, y, seed);
            row[x as usize * 4..x as usize * 4 + 4].copy_from_slice(&[b, g, r, 0xff]);
            rgb.extend_from_slice(&[r, g, b]);
        }
        d.put(at + u64::from(y * stride), &row);
    }
    rgb
}

fn accept_all() -> u64 {
    [F_EDID, F_RESOURCE_BLOB, F_INDIRECT, F_VERSION_1]
        .iter()
        .fold(0, |a, &b| a | 1 << b)
}

#[test]
fn a_virtio_driver_lights_every_head_and_screenshots_show_its_pixels() {
    let served = Served::start("M60-2Q");
    let mut d = Driver::attach(&served);
    assert_eq!(d.cfg(0, 2), 0x1af4);
    assert_eq!(d.cfg(2, 2), 0x1050);
    assert_eq!(d.cfg(0x08, 4), 0x0380_0001, "class and revision");
    assert_eq!(d.cfg(0x3d, 1), 0, "interrupt pin");

    let offered = d.features();
    for bit in [F_VIRGL, F_ACCESS_PLATFORM, F_RING_PACKED] {
        assert_eq!(offered & 1 << bit, 0, "feature {bit} must not be offered");
    }
    d.initialise(accept_all());
    let dev = d.device;
    assert_eq!(d.read(dev, 8, 4), 4, "num_scanouts = the type's heads");

    // GET_DISPLAY_INFO: four enabled heads at the default resolution (through an indirect
    // table, as Linux sends it).
    let (len, r) = d.submit_indirect(&hdr(GET_DISPLAY_INFO, 0, 0), 408);
    assert_eq!((len, resp_type(&r)), (408, OK_DISPLAY_INFO));
    for head in 0..16u64 {
        let m = &r[24 + 24 * head as usize..][..24];
        let (w, h, enabled) = (le(&m[8..12]), le(&m[12..16]), le(&m[16..20]));
        if head < 4 {
            assert_eq!((w, h, enabled), (1920, 1080, 1), "head {head}");
        } else {
            assert_eq!(enabled, 0, "head {head}");
        }
    }

    // GET_EDID per head; an absent head is an error.
    for head in 0..4 {
        let (_, r) = d.submit(&words(hdr(GET_EDID, 0, 0), &[head, 0]), 1056);
        assert_eq!(resp_type(&r), OK_EDID, "head {head}");
        let size = le(&r[24..28]) as usize;
        assert!(size >= 128, "edid size {size}");
        assert_eq!(&r[32..40], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    }
    // (QEMU's virtio-gpu answers a head out of range with INVALID_PARAMETER here.)
    let (_, r) = d.submit(&words(hdr(GET_EDID, 0, 0), &[4, 0]), 1056);
    assert_eq!(resp_type(&r), ERR_INVALID_PARAMETER);

    // A 2D resource on head 2: create, back, transfer, scan out, flush (fenced).
    let (w, h) = (320u32, 200u32);
    let (_, r) = d.submit(
        &words(hdr(RESOURCE_CREATE_2D, 0, 0), &[1, B8G8R8X8, w, h]),
        24,
    );
    assert_eq!(resp_type(&r), OK_NODATA);
    let rgb = draw(&d, PIXELS, w, h, w * 4, 1);
    let mut attach = words(hdr(ATTACH_BACKING, 0, 0), &[1, 2]);
    // Two entries: the image split at an odd boundary.
    let split = 4096 * 7 + 512;
    for (addr, len) in [
        (PIXELS, split),
        (PIXELS + u64::from(split), w * h * 4 - split),
    ] {
        attach.extend_from_slice(&addr.to_le_bytes());
        attach = words(attach, &[len, 0]);
    }
    let (_, r) = d.submit(&attach, 24);
    assert_eq!(resp_type(&r), OK_NODATA);
    let mut transfer = words(hdr(TRANSFER_TO_HOST_2D, 0, 0), &[0, 0, w, h]);
    transfer.extend_from_slice(&0u64.to_le_bytes());
    let (_, r) = d.submit(&words(transfer, &[1, 0]), 24);
    assert_eq!(resp_type(&r), OK_NODATA);
    let (_, r) = d.submit(&words(hdr(SET_SCANOUT, 0, 0), &[0, 0, w, h, 2, 1]), 24);
    assert_eq!(resp_type(&r), OK_NODATA);
    let (_, r) = d.submit(
        &words(hdr(RESOURCE_FLUSH, FLAG_FENCE, 77), &[0, 0, w, h, 1, 0]),
        24,
    );
    assert_eq!(resp_type(&r), OK_NODATA);
    assert_eq!(le(&r[4..8]) as u32 & FLAG_FENCE, FLAG_FENCE, "fence echoed");
    assert_eq!(le(&r[8..16]), 77, "fence id echoed");
    assert_eq!(served.screenshot_head(2).unwrap(), (w, h, rgb));

    // A guest-memory blob on head 1.
    let (bw, bh, stride) = (256u32, 128u32, 256 * 4 + 64);
    let blob_at = PIXELS + (4 << 20);
    let blob_rgb = draw(&d, blob_at, bw, bh, stride, 9);
    let size = u64::from(stride * bh);
    let mut blob = words(hdr(RESOURCE_CREATE_BLOB, 0, 0), &[2, BLOB_MEM_GUEST, 0, 1]);
    blob.extend_from_slice(&0u64.to_le_bytes());
    blob.extend_from_slice(&size.to_le_bytes());
    blob.extend_from_slice(&blob_at.to_le_bytes());
    let (_, r) = d.submit(&words(blob, &[size as u32, 0]), 24);
    assert_eq!(resp_type(&r), OK_NODATA);
    let mut strides = [0u32; 4];
    strides[0] = stride;
    let set_blob = words(
        words(
            hdr(SET_SCANOUT_BLOB, 0, 0),
            &[0, 0, bw, bh, 1, 2, bw, bh, B8G8R8X8, 0],
        ),
        &strides,
    );
    let (_, r) = d.submit(&words(set_blob, &[0; 4]), 24);
    assert_eq!(resp_type(&r), OK_NODATA);
    assert_eq!(served.screenshot_head(1).unwrap(), (bw, bh, blob_rgb));

    // Heads without a scanout say so; status agrees.
    let err = served.screenshot_head(0).unwrap_err();
    assert!(err.contains("head 0"), "{err}");
    let err = served.screenshot_head(4).unwrap_err();
    assert!(err.contains("head 4 does not exist"), "{err}");
    let status = served.status();
    let heads = status["heads"].as_array().unwrap();
    assert_eq!(heads.len(), 4);
    let shown: Vec<bool> = heads
        .iter()
        .map(|h| h["displaying"].as_bool().unwrap())
        .collect();
    assert_eq!(shown, [false, true, true, false]);
}

#[test]
fn bad_commands_get_virtio_gpu_errors_and_the_device_keeps_serving() {
    let mut served = Served::start("M60-0B");
    let mut d = Driver::attach(&served);
    d.initialise(accept_all());
    let bad: Vec<(Vec<u8>, u32)> = vec![
        // Resource id 0.
        (
            words(hdr(RESOURCE_CREATE_2D, 0, 0), &[0, B8G8R8X8, 64, 64]),
            ERR_INVALID_RESOURCE_ID,
        ),
        // width * height * 4 overflows 32 bits.
        (
            words(
                hdr(RESOURCE_CREATE_2D, 0, 0),
                &[5, B8G8R8X8, 0x8000_0000, 0x8000_0000],
            ),
            ERR_INVALID_PARAMETER,
        ),
        // Bigger than the 512 MiB budget.
        (
            words(hdr(RESOURCE_CREATE_2D, 0, 0), &[6, B8G8R8X8, 16384, 16384]),
            ERR_OUT_OF_MEMORY,
        ),
        // Unknown format.
        (
            words(hdr(RESOURCE_CREATE_2D, 0, 0), &[7, 999, 64, 64]),
            ERR_INVALID_PARAMETER,
        ),
        // Scanout of a resource that does not exist; a head that does not exist.
        (
            words(hdr(SET_SCANOUT, 0, 0), &[0, 0, 64, 64, 0, 42]),
            ERR_INVALID_RESOURCE_ID,
        ),
        (
            words(hdr(SET_SCANOUT, 0, 0), &[0, 0, 64, 64, 2, 0]),
            ERR_INVALID_SCANOUT_ID,
        ),
        // Unref of nothing.
        (
            words(hdr(RESOURCE_UNREF, 0, 0), &[9, 0]),
            ERR_INVALID_RESOURCE_ID,
        ),
    ];
    for (req, want) in &bad {
        let (_, r) = d.submit(req, 24);
        assert_eq!(resp_type(&r), *want, "request {:x?}", &req[..4]);
    }
    // A valid resource, then a transfer outside it and backing outside guest RAM.
    let (_, r) = d.submit(
        &words(hdr(RESOURCE_CREATE_2D, 0, 0), &[3, B8G8R8X8, 64, 64]),
        24,
    );
    assert_eq!(resp_type(&r), OK_NODATA);
    let mut transfer = words(hdr(TRANSFER_TO_HOST_2D, 0, 0), &[32, 32, 64, 64]);
    transfer.extend_from_slice(&0u64.to_le_bytes());
    let (_, r) = d.submit(&words(transfer, &[3, 0]), 24);
    assert_eq!(resp_type(&r), ERR_INVALID_PARAMETER, "rectangle outside");
    let mut attach = words(hdr(ATTACH_BACKING, 0, 0), &[3, 1]);
    attach.extend_from_slice(&(RAM_SIZE - 4096).to_le_bytes());
    let (_, r) = d.submit(&words(attach, &[64 * 64 * 4, 0]), 24);
    let t = resp_type(&r);
    if t == OK_NODATA {
        // Accepted as a scatter list; the transfer must then refuse to read past RAM.
        let mut transfer = words(hdr(TRANSFER_TO_HOST_2D, 0, 0), &[0, 0, 64, 64]);
        transfer.extend_from_slice(&0u64.to_le_bytes());
        let (_, r) = d.submit(&words(transfer, &[3, 0]), 24);
        assert_ne!(resp_type(&r), OK_NODATA, "a transfer read past guest RAM");
    } else {
        assert!(t >= 0x1200, "backing outside RAM: {t:#x}");
    }
    // A response buffer too small for the display info still completes.
    let (len, _) = d.submit(&hdr(GET_DISPLAY_INFO, 0, 0), 16);
    assert!(len <= 16, "used length {len} larger than the buffer");

    served.assert_alive();
    // The device still answers after all that.
    let (_, r) = d.submit(&hdr(GET_DISPLAY_INFO, 0, 0), 408);
    assert_eq!(resp_type(&r), OK_DISPLAY_INFO);
}

#[test]
fn a_disconnect_keeps_the_scanout_and_leaks_nothing_and_reset_drops_it() {
    let served = Served::start("M60-0B");
    // The baseline once the server is fully up: its control endpoint has answered, and the
    // highest count over a short window (the serving loops may still be opening theirs).
    assert_eq!(served.status()["client_connected"], false);
    let settle = std::time::Instant::now();
    let mut before = served.fd_count();
    while settle.elapsed() < Duration::from_millis(300) {
        before = before.max(served.fd_count());
        std::thread::sleep(Duration::from_millis(20));
    }
    {
        let mut d = Driver::attach(&served);
        d.initialise(accept_all());
        let (w, h) = (128u32, 96u32);
        let (_, r) = d.submit(
            &words(hdr(RESOURCE_CREATE_2D, 0, 0), &[1, B8G8R8X8, w, h]),
            24,
        );
        assert_eq!(resp_type(&r), OK_NODATA);
        draw(&d, PIXELS, w, h, w * 4, 3);
        let mut attach = words(hdr(ATTACH_BACKING, 0, 0), &[1, 1]);
        attach.extend_from_slice(&PIXELS.to_le_bytes());
        let (_, r) = d.submit(&words(attach, &[w * h * 4, 0]), 24);
        assert_eq!(resp_type(&r), OK_NODATA);
        let mut transfer = words(hdr(TRANSFER_TO_HOST_2D, 0, 0), &[0, 0, w, h]);
        transfer.extend_from_slice(&0u64.to_le_bytes());
        d.submit(&words(transfer, &[1, 0]), 24);
        let (_, r) = d.submit(&words(hdr(SET_SCANOUT, 0, 0), &[0, 0, w, h, 1, 1]), 24);
        assert_eq!(resp_type(&r), OK_NODATA);
        // Leave requests in flight: queued but never kicked.
        d.put(AVAIL + 2, &(d.next_avail + 3).to_le_bytes());
    }
    wait_until(Duration::from_secs(10), "the client to be gone", || {
        served.status()["client_connected"] == false
    });
    let (w, h, _) = served
        .screenshot_head(1)
        .expect("the scanout outlives the client");
    assert_eq!((w, h), (128, 96));
    let fds = |pid: u32| -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|p| p.display().to_string())
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while served.fd_count() > before {
        assert!(
            std::time::Instant::now() < deadline,
            "descriptors not back to {before}: {:?}",
            fds(served.pid())
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The next VM start resets the device: everything goes.
    let mut c = Client::new(&served.socket).unwrap();
    c.reset().unwrap();
    assert!(
        served.screenshot_head(1).is_err(),
        "reset drops the scanout"
    );
}

/// Guest RAM the server may not map (a file the client could truncate) is not reachable: a
/// driver that puts its rings there finds the device needing a reset (and the config
/// interrupt), the log says why and what QEMU needs, and the server keeps serving.
#[test]
fn rings_in_guest_ram_that_is_not_mapped_mark_the_device_broken_with_a_clear_log() {
    let mut served = Served::start_logged("M60-0B");
    let mut d = Driver::attach(&served);
    // Replace the sealed RAM by a file without F_SEAL_SHRINK at the same addresses.
    d.client.dma_unmap(0, RAM_SIZE).unwrap();
    let unsealed = vgpu_emu::memfd::memfd_unsealed("unsealed-ram", RAM_SIZE).unwrap();
    d.client
        .dma_map(0, 0, RAM_SIZE, unsealed.as_raw_fd())
        .unwrap();
    d.ram = unsealed;
    d.initialise(accept_all());
    d.put(REQ, &hdr(GET_DISPLAY_INFO, 0, 0));
    d.kick(0);
    // The configuration interrupt (vector 0) and DEVICE_NEEDS_RESET.
    let fd = d.msix[0].as_raw_fd();
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one pollfd on the stack.
    let ready = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    assert_eq!(ready, 1, "config interrupt");
    let common = d.common;
    assert_ne!(d.read(common, 20, 1) & 0x40, 0, "DEVICE_NEEDS_RESET");
    assert_eq!(d.used_idx(), 0, "nothing was served");
    wait_until(Duration::from_secs(10), "the log line", || {
        served.log().contains("outside mapped guest memory")
    });
    assert!(
        served.log().contains("memory-backend-memfd"),
        "{}",
        served.log()
    );
    served.assert_alive();
}

/// What the frame-rate limiter holds: a fenced RESOURCE_FLUSH (what Linux sends for every frame
/// of a blob scanout, and waits for) completes on the instance's tick; an unfenced one (a guest
/// on ordinary 2D buffers) completes at once, so such a guest is not paced. With the knob off a
/// fenced flush completes at once too, without a reset.
#[test]
fn fenced_flushes_wait_for_the_tick_and_unfenced_ones_do_not() {
    let served = Served::start("M60-0B");
    let mut d = Driver::attach(&served);
    d.initialise(accept_all());
    let (w, h) = (64u32, 64u32);
    let (_, r) = d.submit(
        &words(hdr(RESOURCE_CREATE_2D, 0, 0), &[1, B8G8R8X8, w, h]),
        24,
    );
    assert_eq!(resp_type(&r), OK_NODATA);
    let mut attach = words(hdr(ATTACH_BACKING, 0, 0), &[1, 1]);
    attach.extend_from_slice(&PIXELS.to_le_bytes());
    d.submit(&words(attach, &[w * h * 4, 0]), 24);
    let (_, r) = d.submit(&words(hdr(SET_SCANOUT, 0, 0), &[0, 0, w, h, 0, 1]), 24);
    assert_eq!(resp_type(&r), OK_NODATA);
    let runtime = |s: &Served| s.status()["frl_runtime"].clone();

    // Unfenced: every flush completes on its kick; the runtime never wakes.
    for _ in 0..20 {
        let (_, r) = d.submit(&words(hdr(RESOURCE_FLUSH, 0, 0), &[0, 0, w, h, 1, 0]), 24);
        assert_eq!(resp_type(&r), OK_NODATA);
    }
    let rt = runtime(&served);
    assert_eq!(
        (rt["ticks"].as_u64(), rt["wakeups"].as_u64()),
        (Some(0), Some(0)),
        "{rt}"
    );

    // Fenced: each completes on a tick of the 45 fps grid, so 10 take at least 9 tick periods.
    let start = std::time::Instant::now();
    for fence in 1..=10u64 {
        let (_, r) = d.submit(
            &words(hdr(RESOURCE_FLUSH, FLAG_FENCE, fence), &[0, 0, w, h, 1, 0]),
            24,
        );
        assert_eq!((resp_type(&r), le(&r[8..16])), (OK_NODATA, fence));
    }
    assert!(
        start.elapsed() >= Duration::from_secs(9) / 45,
        "10 fenced flushes in {:?}: not paced",
        start.elapsed()
    );
    let rt = runtime(&served);
    assert!(rt["ticks"].as_u64().unwrap() >= 10, "{rt}");
    let frames = &served.status()["heads"][0]["frames"];
    assert_eq!(frames["submitted"], 30, "{frames}");
    assert_eq!(frames["presented"], 30, "{frames}");

    // The knob off: a fenced flush completes on its kick, no tick involved.
    let out = served.cli(&["set", "frame_rate_limiter=0"]);
    assert!(out.status.success(), "{out:?}");
    let ticks = runtime(&served)["ticks"].as_u64().unwrap();
    for fence in 11..=20u64 {
        d.submit(
            &words(hdr(RESOURCE_FLUSH, FLAG_FENCE, fence), &[0, 0, w, h, 1, 0]),
            24,
        );
    }
    assert_eq!(runtime(&served)["ticks"].as_u64().unwrap(), ticks);
}

/// Creates 2D resource `id` of `w` x `h` backed at `at`, draws `pixel(.., seed)` into it,
/// transfers and flushes it and scans it out on `head`.
fn show_2d(d: &mut Driver, id: u32, head: u32, at: u64, (w, h): (u32, u32), seed: u32) {
    let ok = |r: Vec<u8>| assert_eq!(resp_type(&r), OK_NODATA);
    ok(d.submit(
        &words(hdr(RESOURCE_CREATE_2D, 0, 0), &[id, B8G8R8X8, w, h]),
        24,
    )
    .1);
    draw(d, at, w, h, w * 4, seed);
    let mut attach = words(hdr(ATTACH_BACKING, 0, 0), &[id, 1]);
    attach.extend_from_slice(&at.to_le_bytes());
    ok(d.submit(&words(attach, &[w * h * 4, 0]), 24).1);
    update_2d(d, id, w * 4, (0, 0, w, h));
    ok(
        d.submit(&words(hdr(SET_SCANOUT, 0, 0), &[0, 0, w, h, head, id]), 24)
            .1,
    );
    ok(
        d.submit(&words(hdr(RESOURCE_FLUSH, 0, 0), &[0, 0, w, h, id, 0]), 24)
            .1,
    );
}

/// TRANSFER_TO_HOST_2D of rectangle `(x, y, w, h)` of resource `id`, whose backing has
/// `stride` bytes per row (the offset is the rectangle's first byte in it, as Linux computes).
fn update_2d(d: &mut Driver, id: u32, stride: u32, (x, y, w, h): (u32, u32, u32, u32)) {
    let mut t = words(hdr(TRANSFER_TO_HOST_2D, 0, 0), &[x, y, w, h]);
    t.extend_from_slice(&(u64::from(y * stride) + u64::from(x * 4)).to_le_bytes());
    let (_, r) = d.submit(&words(t, &[id, 0]), 24);
    assert_eq!(resp_type(&r), OK_NODATA);
}

#[test]
fn viewers_of_every_virtio_head_see_the_screenshot_after_full_and_flushed_updates_and_a_new_scanout(
) {
    use common::vnc::VncView;
    let served = Served::start_args("M60-2Q", &["--vnc", "127.0.0.1:0"]);
    let mut d = Driver::attach(&served);
    d.initialise(accept_all());
    let wait = Duration::from_secs(20);
    let (w, h) = (320u32, 200u32);
    let size = u64::from(w * h * 4);
    show_2d(&mut d, 1, 0, PIXELS, (w, h), 1);
    show_2d(&mut d, 2, 3, PIXELS + size, (w, h), 2);
    let status = served.status();
    let addr = |head: usize| status["heads"][head]["vnc"].as_str().unwrap().to_string();
    let mut views: Vec<(usize, VncView)> = [0usize, 3]
        .into_iter()
        .map(|head| {
            (
                head,
                VncView::connect(&addr(head), ::vnc::VncEncoding::Zrle),
            )
        })
        .collect();
    for (head, v) in &mut views {
        v.wait_for(&served.screenshot_head(*head as u32).unwrap(), wait)
            .unwrap_or_else(|e| panic!("head {head}, full update: {e}"));
    }
    // The guest redraws and flushes one band of head 0: the viewer gets that band.
    let band = (0, 64, w, 16);
    let mut rgb = draw(&d, PIXELS, w, h, w * 4, 1);
    let redrawn = draw(&d, PIXELS, w, h, w * 4, 5);
    let row = (w * 3) as usize;
    rgb[64 * row..80 * row].copy_from_slice(&redrawn[64 * row..80 * row]);
    update_2d(&mut d, 1, w * 4, band);
    let (_, r) = d.submit(
        &words(
            hdr(RESOURCE_FLUSH, 0, 0),
            &[band.0, band.1, band.2, band.3, 1, 0],
        ),
        24,
    );
    assert_eq!(resp_type(&r), OK_NODATA);
    let shot = served.screenshot_head(0).unwrap();
    assert!(shot == (w, h, rgb), "only the transferred band changed");
    let before = views[0].1.rects;
    views[0]
        .1
        .wait_for(&shot, wait)
        .unwrap_or_else(|e| panic!("head 0, flushed band: {e}"));
    let n = views[0].1.rects - before;
    assert!(
        n <= 8,
        "one 320x16 band (five 64x64 ZRLE tiles) took {n} rectangles"
    );
    // A new scanout of another size on head 3: DesktopSize, then the image.
    show_2d(&mut d, 3, 3, PIXELS + 2 * size, (240, 160), 7);
    views[1]
        .1
        .wait_for(&served.screenshot_head(3).unwrap(), wait)
        .unwrap_or_else(|e| panic!("head 3, new scanout: {e}"));
    for (_, v) in views {
        v.close();
    }
}

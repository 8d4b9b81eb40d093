use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::catalog::Catalog;
use crate::virtio_gpu::protocol::{
    encode, ty, MemEntry, BLOB_MEM_HOST3D, BLOB_MEM_HOST3D_GUEST, DISPLAY_INFO_LEN,
    FORMAT_B8G8R8A8, FORMAT_B8G8R8X8, HDR_LEN, RESP_EDID_LEN,
};
use crate::virtio_gpu::{protocol, resources};

const UUID: [u8; 16] = [0x11; 16];
/// Second RAM range, after a 1 MiB hole.
const HIGH: u64 = 0x20_0000;

fn m60() -> VgpuType {
    Catalog::builtin()
        .unwrap()
        .resolve("M60-2Q")
        .unwrap()
        .clone()
}

fn small(budget: u64) -> VgpuType {
    VgpuType {
        framebuffer: budget,
        ..m60()
    }
}

/// 0..1 MiB and 2..3 MiB.
fn ram() -> Arc<GuestRam> {
    crate::bus::anonymous_ram(&[(0, 0x10_0000), (HIGH, 0x10_0000)]).unwrap()
}

fn code(c: &Completion) -> u32 {
    CtrlHeader::parse(&c.response).unwrap().ty
}

fn rect(x: u32, y: u32, width: u32, height: u32) -> Rect {
    Rect {
        x,
        y,
        width,
        height,
    }
}

fn e(addr: u64, length: u32) -> MemEntry {
    MemEntry { addr, length }
}

/// A deterministic pattern, `n` bytes.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

struct Rig {
    gpu: Gpu,
    mem: Arc<GuestRam>,
}

impl Rig {
    fn new(ty: &VgpuType) -> Rig {
        Rig {
            gpu: Gpu::new(ty, &UUID),
            mem: ram(),
        }
    }

    fn ctl(&mut self, req: &[u8]) -> u32 {
        code(&self.gpu.control(&*self.mem, req))
    }

    fn ok(&mut self, req: &[u8]) {
        assert_eq!(self.ctl(req), ty::RESP_OK_NODATA, "{:x?}", &req[..4]);
    }

    /// A `w` x `h` B8G8R8X8 resource `id` backed by two entries (one each side of the RAM
    /// hole), with `pixels` in guest memory and transferred.
    /// Writes `pixels` where [`Rig::image`] backs a resource: the first half below the RAM
    /// hole, the rest above it.
    fn backing_write(&self, pixels: &[u8]) {
        let half = pixels.len() / 2;
        self.mem
            .write_slice(&pixels[..half], GuestAddress(0x1000))
            .unwrap();
        self.mem
            .write_slice(&pixels[half..], GuestAddress(HIGH))
            .unwrap();
    }

    fn image(&mut self, id: u32, w: u32, h: u32, pixels: &[u8]) -> Vec<MemEntry> {
        let half = pixels.len() / 2;
        let entries = vec![
            e(0x1000, half as u32),
            e(HIGH, (pixels.len() - half) as u32),
        ];
        self.backing_write(pixels);
        self.ok(&encode::create_2d(id, FORMAT_B8G8R8X8, w, h));
        self.ok(&encode::attach_backing(id, &entries));
        self.ok(&encode::transfer_2d(id, rect(0, 0, w, h), 0));
        entries
    }
}

#[test]
fn display_info_reports_each_head_at_the_default_resolution() {
    let ty = m60();
    let mut rig = Rig::new(&ty);
    let c = rig.gpu.control(&*rig.mem, &encode::get_display_info());
    assert_eq!(c.response.len(), DISPLAY_INFO_LEN);
    assert_eq!(code(&c), ty::RESP_OK_DISPLAY_INFO);
    for head in 0..16usize {
        let one = &c.response[HDR_LEN + head * 24..HDR_LEN + (head + 1) * 24];
        let word = |i: usize| u32::from_le_bytes(one[i * 4..i * 4 + 4].try_into().unwrap());
        if head < ty.num_heads as usize {
            assert_eq!(
                [word(0), word(1), word(2), word(3), word(4)],
                [
                    0,
                    0,
                    ty.default_resolution.width,
                    ty.default_resolution.height,
                    1
                ]
            );
        } else {
            assert_eq!(one, &[0u8; 24][..]);
        }
    }
    assert_eq!(rig.gpu.num_scanouts(), 4);
    assert_eq!(rig.gpu.events_read(), 0);
}

#[test]
fn each_head_has_an_edid_with_its_own_serial() {
    let ty = m60();
    let mut rig = Rig::new(&ty);
    assert_eq!(
        rig.gpu.edid(0).unwrap(),
        &crate::edid::generate(&ty, &UUID)[..]
    );
    for head in 0..4 {
        let c = rig.gpu.control(&*rig.mem, &encode::get_edid(head));
        assert_eq!(c.response.len(), RESP_EDID_LEN);
        assert_eq!(code(&c), ty::RESP_OK_EDID);
        assert_eq!(&c.response[24..28], &128u32.to_le_bytes());
        let edid = &c.response[32..160];
        assert_eq!(edid, rig.gpu.edid(head).unwrap());
        assert!(c.response[160..].iter().all(|&b| b == 0));
        assert_eq!(edid.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        assert!(crate::edid::decode_modes(edid).is_ok());
        for other in 0..head {
            assert_ne!(rig.gpu.edid(other), Some(edid));
        }
    }
    assert_eq!(
        rig.ctl(&encode::get_edid(4)),
        ty::RESP_ERR_INVALID_PARAMETER
    );
    assert_eq!(rig.gpu.edid(4), None);
}

#[test]
fn a_2d_resource_is_shown_as_the_guest_wrote_it() {
    let mut rig = Rig::new(&m60());
    let (w, h) = (128, 64);
    let px = pattern((w * h * 4) as usize, 7);
    rig.image(3, w, h, &px);
    rig.ok(&encode::set_scanout(1, 3, rect(0, 0, w, h)));
    let c = rig
        .gpu
        .control(&*rig.mem, &encode::flush(3, rect(0, 0, w, h), Some(42)));
    assert_eq!(code(&c), ty::RESP_OK_NODATA);
    assert_eq!(c.fence, Some(42));
    let hdr = CtrlHeader::parse(&c.response).unwrap();
    assert_eq!((hdr.flags, hdr.fence_id), (protocol::FLAG_FENCE, 42));

    let frame = rig.gpu.head(1, None).unwrap().capture();
    assert_eq!((frame.width, frame.height), (w, h));
    assert_eq!(frame.format, PixelFormat::Xrgb8888);
    assert_eq!(frame.data, px);
    assert_eq!(rig.gpu.head(0, None).unwrap_err(), NotDisplaying::Disabled);
    assert_eq!(
        rig.gpu.head(4, None).unwrap_err(),
        NotDisplaying::NoSuchHead(4)
    );

    let status = rig.gpu.heads_status();
    assert_eq!(status.len(), 4);
    assert_eq!(
        status[1].mode.as_deref(),
        Some("128x64 XRGB8888 resource 3")
    );
    assert_eq!(
        status[1].counters,
        HeadCounters {
            flushes: 1,
            set_scanouts: 1
        }
    );
    assert_eq!(status[0].not_displaying, Some(NotDisplaying::Disabled));
    assert_eq!(status[0].counters.flushes, 0);
    assert_eq!(rig.gpu.memory().allocated, u64::from(w * h * 4));
}

#[test]
fn a_partial_transfer_updates_only_its_rectangle_and_a_sub_rectangle_scans_out() {
    let mut rig = Rig::new(&m60());
    let (w, h) = (64u32, 32u32);
    let mut px = pattern((w * h * 4) as usize, 1);
    rig.image(1, w, h, &px);
    // New guest content; transfer only the 16x8 rectangle at (8, 4). Linux sends the
    // rectangle's byte offset in the backing.
    let stride = (w * 4) as usize;
    let new = pattern(px.len(), 99);
    rig.backing_write(&new);
    let off = 4 * stride + 8 * 4;
    rig.ok(&encode::transfer_2d(1, rect(8, 4, 16, 8), off as u64));
    for y in 4..12 {
        let a = y * stride + 8 * 4;
        px[a..a + 64].copy_from_slice(&new[a..a + 64]);
    }
    rig.ok(&encode::set_scanout(0, 1, rect(0, 0, w, h)));
    assert_eq!(rig.gpu.head(0, None).unwrap().capture().data, px);

    rig.ok(&encode::set_scanout(0, 1, rect(16, 8, 32, 16)));
    let f = rig.gpu.head(0, None).unwrap().capture();
    let want: Vec<u8> = (8..24)
        .flat_map(|y| px[y * stride + 64..y * stride + 64 + 128].to_vec())
        .collect();
    assert_eq!(f.data, want);
    assert_eq!(
        rig.gpu.heads_status()[0].mode.as_deref(),
        Some("32x16 XRGB8888 resource 1 at 16,8")
    );
}

#[test]
fn a_screenshot_keeps_its_copy_while_the_guest_transfers() {
    let mut rig = Rig::new(&m60());
    let px = pattern(32 * 32 * 4, 3);
    rig.image(1, 32, 32, &px);
    rig.ok(&encode::set_scanout(0, 1, rect(0, 0, 32, 32)));
    let held = rig.gpu.head(0, None).unwrap();
    let new = pattern(px.len(), 200);
    rig.backing_write(&new);
    rig.ok(&encode::transfer_2d(1, rect(0, 0, 32, 32), 0));
    assert_eq!(held.capture().data, px);
    assert_eq!(rig.gpu.head(0, None).unwrap().capture().data, new);
}

#[test]
fn a_guest_blob_is_shown_from_guest_memory() {
    let mut rig = Rig::new(&m60());
    // A 40x20 framebuffer, stride 192 (padding), at offset 64 of a 3-entry blob; the head shows
    // its 32x16 rectangle at (4, 2).
    let (fw, fh, stride, base) = (40u32, 20u32, 192u32, 64u32);
    let size = u64::from(base + stride * fh);
    let blob = pattern(size as usize, 5);
    let cut = [0usize, 1000, 2500, size as usize];
    let addrs = [0x8000u64, HIGH + 0x4000, 0x3000];
    let entries: Vec<MemEntry> = (0..3)
        .map(|i| {
            rig.mem
                .write_slice(&blob[cut[i]..cut[i + 1]], GuestAddress(addrs[i]))
                .unwrap();
            e(addrs[i], (cut[i + 1] - cut[i]) as u32)
        })
        .collect();
    rig.ok(&encode::create_blob(9, BLOB_MEM_GUEST, size, &entries));
    // Linux sends a transfer for dumb blobs too: accepted, nothing to do.
    rig.ok(&encode::transfer_2d(9, rect(0, 0, fw, fh), 0));
    rig.ok(&encode::set_scanout_blob(
        2,
        9,
        rect(4, 2, 32, 16),
        (fw, fh, FORMAT_B8G8R8X8),
        stride,
        base,
    ));
    rig.ok(&encode::flush(9, rect(0, 0, fw, fh), None));
    assert_eq!(
        rig.gpu.head(2, None).unwrap_err(),
        NotDisplaying::NoGuestMemory
    );
    let f = rig.gpu.head(2, Some(&rig.mem)).unwrap().capture();
    let want: Vec<u8> = (2..18usize)
        .flat_map(|y| {
            let a = base as usize + y * stride as usize + 16;
            blob[a..a + 128].to_vec()
        })
        .collect();
    assert_eq!(
        (f.width, f.height, f.format),
        (32, 16, PixelFormat::Xrgb8888)
    );
    assert_eq!(f.data, want);
    let status = &rig.gpu.heads_status()[2];
    assert_eq!(
        status.mode.as_deref(),
        Some("32x16 XRGB8888 blob 9 stride 192 offset 0x1d0")
    );
    assert_eq!(status.counters.flushes, 1);
    // Blobs charge bookkeeping only.
    assert_eq!(
        rig.gpu.memory().used,
        resources::BLOB_CHARGE + 3 * resources::ENTRY_CHARGE
    );
}

#[test]
fn blob_requests_are_checked() {
    let mut rig = Rig::new(&m60());
    let ent = [e(0x1000, 0x4000)];
    for mem in [BLOB_MEM_HOST3D, BLOB_MEM_HOST3D_GUEST, 0, 7] {
        assert_eq!(
            rig.ctl(&encode::create_blob(1, mem, 0x4000, &ent)),
            ty::RESP_ERR_INVALID_PARAMETER
        );
    }
    // Size beyond the entries, size 0, entries outside RAM.
    assert_eq!(
        rig.ctl(&encode::create_blob(1, BLOB_MEM_GUEST, 0x4001, &ent)),
        ty::RESP_ERR_INVALID_PARAMETER
    );
    assert_eq!(
        rig.ctl(&encode::create_blob(1, BLOB_MEM_GUEST, 0, &ent)),
        ty::RESP_ERR_INVALID_PARAMETER
    );
    assert_eq!(
        rig.ctl(&encode::create_blob(
            1,
            BLOB_MEM_GUEST,
            0x1000,
            &[e(0x10_0000, 0x1000)]
        )),
        ty::RESP_ERR_UNSPEC
    );
    assert_eq!(
        rig.ctl(&encode::create_blob(0, BLOB_MEM_GUEST, 0x4000, &ent)),
        ty::RESP_ERR_INVALID_RESOURCE_ID
    );
    assert_eq!(rig.gpu.memory().resources, 0);
    rig.ok(&encode::create_blob(1, BLOB_MEM_GUEST, 0x4000, &ent));
    assert_eq!(
        rig.ctl(&encode::create_blob(1, BLOB_MEM_GUEST, 0x4000, &ent)),
        ty::RESP_ERR_INVALID_RESOURCE_ID
    );
    let fmt = (64, 64, FORMAT_B8G8R8X8);
    let full = rect(0, 0, 64, 64);
    // 64x64x4 = 0x4000: fits exactly with stride 256 at offset 0, not one byte later.
    rig.ok(&encode::set_scanout_blob(0, 1, full, fmt, 256, 0));
    for (r, fmt, stride, offset, want) in [
        (full, fmt, 256, 4, ty::RESP_ERR_INVALID_PARAMETER),
        (full, fmt, 260, 0, ty::RESP_ERR_INVALID_PARAMETER),
        (full, fmt, 255, 0, ty::RESP_ERR_INVALID_PARAMETER),
        (full, fmt, 256, u32::MAX, ty::RESP_ERR_INVALID_PARAMETER),
        (full, fmt, u32::MAX, 0, ty::RESP_ERR_INVALID_PARAMETER),
        (full, (64, 64, 999), 256, 0, ty::RESP_ERR_INVALID_PARAMETER),
        (
            rect(1, 0, 64, 64),
            fmt,
            256,
            0,
            ty::RESP_ERR_INVALID_PARAMETER,
        ),
        (
            rect(u32::MAX, 0, 2, 64),
            fmt,
            256,
            0,
            ty::RESP_ERR_INVALID_PARAMETER,
        ),
        (
            rect(0, 0, 8, 8),
            fmt,
            256,
            0,
            ty::RESP_ERR_INVALID_PARAMETER,
        ),
    ] {
        assert_eq!(
            rig.ctl(&encode::set_scanout_blob(0, 1, r, fmt, stride, offset)),
            want,
            "{r:?} {fmt:?} {stride} {offset}"
        );
    }
    assert_eq!(
        rig.ctl(&encode::set_scanout_blob(4, 1, full, fmt, 256, 0)),
        ty::RESP_ERR_INVALID_SCANOUT_ID
    );
    assert_eq!(
        rig.ctl(&encode::set_scanout_blob(0, 2, full, fmt, 256, 0)),
        ty::RESP_ERR_INVALID_RESOURCE_ID
    );
    // A blob is not a 2D resource, and the reverse.
    assert_eq!(
        rig.ctl(&encode::set_scanout(0, 1, full)),
        ty::RESP_ERR_INVALID_PARAMETER
    );
    assert_eq!(
        rig.ctl(&encode::attach_backing(1, &ent)),
        ty::RESP_ERR_INVALID_PARAMETER
    );
    assert_eq!(
        rig.ctl(&encode::detach_backing(1)),
        ty::RESP_ERR_INVALID_PARAMETER
    );
    rig.ok(&encode::create_2d(2, FORMAT_B8G8R8X8, 64, 64));
    assert_eq!(
        rig.ctl(&encode::set_scanout_blob(0, 2, full, fmt, 256, 0)),
        ty::RESP_ERR_INVALID_PARAMETER
    );
    // Disabling with resource 0 works on any head.
    rig.ok(&encode::set_scanout_blob(0, 0, full, fmt, 0, 0));
    assert_eq!(
        rig.gpu.head(0, Some(&rig.mem)).unwrap_err(),
        NotDisplaying::Disabled
    );
}

#[test]
fn ids_are_checked() {
    let mut rig = Rig::new(&m60());
    let full = rect(0, 0, 64, 64);
    assert_eq!(
        rig.ctl(&encode::create_2d(0, FORMAT_B8G8R8X8, 64, 64)),
        ty::RESP_ERR_INVALID_RESOURCE_ID
    );
    rig.ok(&encode::create_2d(1, FORMAT_B8G8R8X8, 64, 64));
    assert_eq!(
        rig.ctl(&encode::create_2d(1, FORMAT_B8G8R8X8, 64, 64)),
        ty::RESP_ERR_INVALID_RESOURCE_ID
    );
    for req in [
        encode::unref(2),
        encode::attach_backing(2, &[e(0, 0x4000)]),
        encode::detach_backing(2),
        encode::transfer_2d(2, full, 0),
        encode::set_scanout(0, 2, full),
        encode::flush(2, full, None),
    ] {
        assert_eq!(rig.ctl(&req), ty::RESP_ERR_INVALID_RESOURCE_ID);
    }
    for head in [4, 16, u32::MAX] {
        assert_eq!(
            rig.ctl(&encode::set_scanout(head, 1, full)),
            ty::RESP_ERR_INVALID_SCANOUT_ID
        );
    }
    for format in [0, 5, 66, 135, u32::MAX] {
        assert_eq!(
            rig.ctl(&encode::create_2d(3, format, 64, 64)),
            ty::RESP_ERR_INVALID_PARAMETER
        );
    }
    // Every supported format is accepted.
    for (i, format) in [1, 2, 3, 4, 67, 68, 121, 134].into_iter().enumerate() {
        rig.ok(&encode::create_2d(10 + i as u32, format, 16, 16));
    }
}

#[test]
fn rectangles_are_checked() {
    let mut rig = Rig::new(&m60());
    let px = pattern(64 * 64 * 4, 0);
    rig.image(1, 64, 64, &px);
    for r in [
        rect(1, 0, 64, 64),
        rect(0, 1, 64, 64),
        rect(0, 0, 65, 1),
        rect(u32::MAX, 0, 2, 2),
        rect(0, u32::MAX, 2, 2),
        rect(2, 2, u32::MAX, u32::MAX),
    ] {
        assert_eq!(
            rig.ctl(&encode::transfer_2d(1, r, 0)),
            ty::RESP_ERR_INVALID_PARAMETER,
            "{r:?}"
        );
        assert_eq!(
            rig.ctl(&encode::set_scanout(0, 1, r)),
            ty::RESP_ERR_INVALID_PARAMETER,
            "{r:?}"
        );
        assert_eq!(
            rig.ctl(&encode::flush(1, r, None)),
            ty::RESP_ERR_INVALID_PARAMETER,
            "{r:?}"
        );
    }
    // The source reaching past the backing (the offset) is refused too.
    assert_eq!(
        rig.ctl(&encode::transfer_2d(1, rect(0, 0, 64, 64), 4)),
        ty::RESP_ERR_INVALID_PARAMETER
    );
    assert_eq!(
        rig.ctl(&encode::transfer_2d(1, rect(0, 0, 1, 1), u64::MAX)),
        ty::RESP_ERR_INVALID_PARAMETER
    );
    // Below 16x16 or above the type's max resolution is not a scanout.
    assert_eq!(
        rig.ctl(&encode::set_scanout(0, 1, rect(0, 0, 15, 64))),
        ty::RESP_ERR_INVALID_PARAMETER
    );
    let max = m60().max_resolution;
    rig.ok(&encode::create_2d(2, FORMAT_B8G8R8X8, max.width + 1, 16));
    assert_eq!(
        rig.ctl(&encode::set_scanout(0, 2, rect(0, 0, max.width + 1, 16))),
        ty::RESP_ERR_INVALID_PARAMETER
    );
    rig.ok(&encode::set_scanout(0, 2, rect(1, 0, max.width, 16)));
    // An empty transfer is fine.
    rig.ok(&encode::transfer_2d(1, rect(64, 64, 0, 0), 0));
}

#[test]
fn sizes_that_overflow_are_refused() {
    let mut rig = Rig::new(&m60());
    for (w, h, want) in [
        (u32::MAX, u32::MAX, ty::RESP_ERR_INVALID_PARAMETER),
        (0x4000_0000, 1, ty::RESP_ERR_INVALID_PARAMETER),
        (0x3fff_ffff, u32::MAX, ty::RESP_ERR_OUT_OF_MEMORY),
        (0x10000, 0x10000, ty::RESP_ERR_OUT_OF_MEMORY),
        (0, 64, ty::RESP_ERR_INVALID_PARAMETER),
        (64, 0, ty::RESP_ERR_INVALID_PARAMETER),
    ] {
        assert_eq!(
            rig.ctl(&encode::create_2d(1, FORMAT_B8G8R8X8, w, h)),
            want,
            "{w}x{h}"
        );
    }
    assert_eq!(rig.gpu.memory().used, 0);
}

#[test]
fn backings_are_checked() {
    let mut rig = Rig::new(&m60());
    rig.ok(&encode::create_2d(1, FORMAT_B8G8R8X8, 64, 64));
    // nr_entries larger than the request holds, or than the cap.
    let mut req = encode::attach_backing(1, &[e(0, 0x4000)]);
    req[28..32].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(rig.ctl(&req), ty::RESP_ERR_UNSPEC);
    req[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(rig.ctl(&req), ty::RESP_ERR_UNSPEC);
    // Outside guest RAM: in the hole, past the end, wrapping around.
    for ent in [
        e(0xf_f000, 0x4000),
        e(0x30_0000, 0x4000),
        e(u64::MAX - 0xfff, 0x4000),
    ] {
        assert_eq!(
            rig.ctl(&encode::attach_backing(1, &[ent])),
            ty::RESP_ERR_UNSPEC,
            "{ent:?}"
        );
    }
    // Shorter than the resource.
    assert_eq!(
        rig.ctl(&encode::attach_backing(1, &[e(0, 0x3fff)])),
        ty::RESP_ERR_INVALID_PARAMETER
    );
    // Nothing attached so far: no transfer, no detach.
    assert_eq!(
        rig.ctl(&encode::transfer_2d(1, rect(0, 0, 64, 64), 0)),
        ty::RESP_ERR_UNSPEC
    );
    assert_eq!(rig.ctl(&encode::detach_backing(1)), ty::RESP_ERR_UNSPEC);
    assert_eq!(rig.gpu.memory().used, 64 * 64 * 4);
    rig.ok(&encode::attach_backing(1, &[e(0, 0x2000), e(HIGH, 0x2000)]));
    assert_eq!(
        rig.ctl(&encode::attach_backing(1, &[e(0, 0x4000)])),
        ty::RESP_ERR_UNSPEC
    );
    assert_eq!(
        rig.gpu.memory().used,
        64 * 64 * 4 + 2 * resources::ENTRY_CHARGE
    );
    rig.ok(&encode::detach_backing(1));
    assert_eq!(rig.gpu.memory().used, 64 * 64 * 4);
    assert_eq!(rig.gpu.recount_charges(), rig.gpu.memory().used);
}

#[test]
fn the_budget_is_enforced_and_freed_by_unref() {
    let mut rig = Rig::new(&small(64 * 1024));
    rig.ok(&encode::create_2d(1, FORMAT_B8G8R8X8, 64, 128));
    rig.ok(&encode::create_2d(2, FORMAT_B8G8R8X8, 64, 128));
    assert_eq!(rig.gpu.memory().used, 64 * 1024);
    assert_eq!(
        rig.ctl(&encode::create_2d(3, FORMAT_B8G8R8X8, 1, 1)),
        ty::RESP_ERR_OUT_OF_MEMORY
    );
    assert_eq!(
        rig.ctl(&encode::create_blob(3, BLOB_MEM_GUEST, 16, &[e(0, 16)])),
        ty::RESP_ERR_OUT_OF_MEMORY
    );
    assert_eq!(
        rig.ctl(&encode::attach_backing(1, &[e(0, 0x8000)])),
        ty::RESP_ERR_OUT_OF_MEMORY
    );
    rig.ok(&encode::unref(2));
    assert_eq!(rig.gpu.memory().used, 32 * 1024);
    rig.ok(&encode::create_2d(3, FORMAT_B8G8R8X8, 64, 64));
    rig.ok(&encode::attach_backing(1, &[e(0, 0x8000)]));
    assert_eq!(rig.gpu.recount_charges(), rig.gpu.memory().used);
}

#[test]
fn the_resource_count_is_bounded() {
    let mut rig = Rig::new(&m60());
    for id in 1..=resources::MAX_RESOURCES as u32 {
        rig.ok(&encode::create_2d(id, FORMAT_B8G8R8X8, 1, 1));
    }
    assert_eq!(
        rig.ctl(&encode::create_2d(u32::MAX, FORMAT_B8G8R8X8, 1, 1)),
        ty::RESP_ERR_OUT_OF_MEMORY
    );
    rig.ok(&encode::unref(5));
    rig.ok(&encode::create_2d(u32::MAX, FORMAT_B8G8R8X8, 1, 1));
}

#[test]
fn host_pixels_are_allocated_only_when_transferred() {
    let mut rig = Rig::new(&m60());
    rig.ok(&encode::create_2d(1, FORMAT_B8G8R8X8, 1920, 1080));
    rig.ok(&encode::set_scanout(0, 1, rect(0, 0, 1920, 1080)));
    let m = rig.gpu.memory();
    assert_eq!((m.used, m.allocated), (1920 * 1080 * 4, 0));
    // Shown before any transfer: black.
    let f = rig.gpu.head(0, None).unwrap().capture();
    assert_eq!(f.data.len(), 1920 * 1080 * 4);
    assert!(f.data.iter().all(|&b| b == 0));
}

#[test]
fn unref_disables_the_heads_showing_it() {
    let mut rig = Rig::new(&m60());
    rig.image(1, 32, 32, &pattern(4096, 0));
    rig.ok(&encode::set_scanout(0, 1, rect(0, 0, 32, 32)));
    rig.ok(&encode::set_scanout(3, 1, rect(0, 0, 16, 16)));
    rig.ok(&encode::unref(1));
    for head in [0, 3] {
        assert_eq!(
            rig.gpu.head(head, None).unwrap_err(),
            NotDisplaying::Disabled
        );
    }
    assert_eq!(rig.gpu.memory().used, 0);
}

#[test]
fn reset_frees_everything() {
    let mut rig = Rig::new(&m60());
    rig.image(1, 64, 64, &pattern(64 * 64 * 4, 0));
    rig.ok(&encode::set_scanout(0, 1, rect(0, 0, 64, 64)));
    rig.ok(&encode::create_blob(2, BLOB_MEM_GUEST, 4096, &[e(0, 4096)]));
    let c = CursorCmd {
        scanout_id: 0,
        x: 5,
        y: 6,
        resource_id: 1,
        hot_x: 1,
        hot_y: 2,
    };
    rig.gpu.cursor(&*rig.mem, &encode::cursor(true, c));
    rig.gpu
        .control(&*rig.mem, &encode::flush(1, rect(0, 0, 64, 64), Some(3)));
    assert_eq!(rig.gpu.last_fence(), Some(3));
    rig.gpu.reset();
    let m = rig.gpu.memory();
    assert_eq!((m.used, m.allocated, m.resources), (0, 0, 0));
    assert_eq!(rig.gpu.head(0, None).unwrap_err(), NotDisplaying::Disabled);
    assert_eq!(rig.gpu.cursor_state(0), Some(&Cursor::default()));
    assert_eq!(rig.gpu.last_fence(), None);
    // Ids are free again; the counters survive.
    rig.ok(&encode::create_2d(1, FORMAT_B8G8R8X8, 64, 64));
    assert_eq!(rig.gpu.heads_status()[0].counters.set_scanouts, 1);
}

#[test]
fn malformed_requests_get_unspec_and_keep_their_fence() {
    let mut rig = Rig::new(&m60());
    for len in [0, 1, 23] {
        let c = rig.gpu.control(&*rig.mem, &vec![0u8; len]);
        assert_eq!(c.response.len(), HDR_LEN);
        assert_eq!(code(&c), ty::RESP_ERR_UNSPEC);
        assert_eq!(c.fence, None);
    }
    // Truncated past a fenced header: the error still completes the fence.
    let mut req = encode::create_2d(1, FORMAT_B8G8R8X8, 64, 64);
    req[4..8].copy_from_slice(&protocol::FLAG_FENCE.to_le_bytes());
    req[8..16].copy_from_slice(&77u64.to_le_bytes());
    let c = rig.gpu.control(&*rig.mem, &req[..30]);
    assert_eq!((code(&c), c.fence), (ty::RESP_ERR_UNSPEC, Some(77)));
    assert_eq!(CtrlHeader::parse(&c.response).unwrap().fence_id, 77);
    assert_eq!(rig.gpu.memory().resources, 0);
    // Unknown, 3D and capset commands; cursor commands on the control queue.
    let cur = encode::cursor(
        true,
        CursorCmd {
            scanout_id: 0,
            x: 0,
            y: 0,
            resource_id: 0,
            hot_x: 0,
            hot_y: 0,
        },
    );
    for req in [
        encode::header(0, None),
        encode::header(0x1234, None),
        encode::header(ty::RESP_OK_NODATA, None),
        encode::header(ty::GET_CAPSET_INFO, None),
        encode::header(ty::GET_CAPSET, None),
        encode::header(ty::CTX_CREATE, None),
        encode::header(ty::RESOURCE_ASSIGN_UUID, None),
        encode::header(ty::RESOURCE_UNMAP_BLOB, None),
        cur,
    ] {
        assert_eq!(rig.ctl(&req), ty::RESP_ERR_UNSPEC, "{:x?}", &req[..4]);
    }
    // Over MAX_REQUEST.
    let mut big = encode::get_display_info();
    big.resize(MAX_REQUEST + 1, 0);
    assert_eq!(rig.ctl(&big), ty::RESP_ERR_INVALID_PARAMETER);
    // The cursor queue answers nothing, whatever it gets.
    for req in [vec![], encode::get_display_info(), vec![0xff; 100]] {
        assert_eq!(rig.gpu.cursor(&*rig.mem, &req), Completion::default());
    }
}

#[test]
fn the_cursor_image_is_copied_at_update() {
    let mut rig = Rig::new(&m60());
    let px = pattern(64 * 64 * 4, 9);
    rig.ok(&encode::create_2d(7, FORMAT_B8G8R8A8, 64, 64));
    rig.mem.write_slice(&px, GuestAddress(0x4_0000)).unwrap();
    rig.ok(&encode::attach_backing(7, &[e(0x4_0000, px.len() as u32)]));
    rig.ok(&encode::transfer_2d(7, rect(0, 0, 64, 64), 0));
    let mut c = CursorCmd {
        scanout_id: 1,
        x: 100,
        y: 200,
        resource_id: 7,
        hot_x: 3,
        hot_y: 4,
    };
    let done = rig.gpu.cursor(&*rig.mem, &encode::cursor(true, c));
    assert_eq!(done, Completion::default());
    let cur = rig.gpu.cursor_state(1).unwrap().clone();
    assert_eq!(
        (cur.resource_id, cur.hot_x, cur.hot_y, cur.x, cur.y),
        (7, 3, 4, 100, 200)
    );
    let img = cur.image.unwrap();
    assert_eq!(
        (img.width, img.height, img.format),
        (64, 64, PixelFormat::Argb8888)
    );
    assert_eq!(img.data, px);
    // Move: the position only.
    c.x = 5;
    c.resource_id = 0;
    rig.gpu.cursor(&*rig.mem, &encode::cursor(false, c));
    let cur = rig.gpu.cursor_state(1).unwrap();
    assert_eq!((cur.resource_id, cur.x, cur.y), (7, 5, 200));
    assert!(cur.image.is_some());
    // A blob cursor is read from guest memory.
    rig.ok(&encode::create_blob(
        8,
        BLOB_MEM_GUEST,
        0x4000,
        &[e(0x4_0000, 0x4000)],
    ));
    c.resource_id = 8;
    rig.gpu.cursor(&*rig.mem, &encode::cursor(true, c));
    assert_eq!(
        rig.gpu
            .cursor_state(1)
            .unwrap()
            .image
            .as_ref()
            .unwrap()
            .data,
        px
    );
    // Not 64x64: the state is kept, the image is not.
    rig.ok(&encode::create_2d(9, FORMAT_B8G8R8A8, 32, 32));
    c.resource_id = 9;
    rig.gpu.cursor(&*rig.mem, &encode::cursor(true, c));
    assert_eq!(rig.gpu.cursor_state(1).unwrap().resource_id, 9);
    assert_eq!(rig.gpu.cursor_state(1).unwrap().image, None);
    // Hidden; an unknown head is ignored.
    c.resource_id = 0;
    rig.gpu.cursor(&*rig.mem, &encode::cursor(true, c));
    assert_eq!(rig.gpu.cursor_state(1).unwrap().image, None);
    c.scanout_id = 4;
    rig.gpu.cursor(&*rig.mem, &encode::cursor(true, c));
    assert_eq!(rig.gpu.cursor_state(4), None);
}

#[test]
fn guest_memory_that_vanished_reads_black() {
    let mut rig = Rig::new(&m60());
    let ent = [e(0x1000, 64 * 64 * 4)];
    rig.mem
        .write_slice(&[0xff; 64 * 64 * 4], GuestAddress(0x1000))
        .unwrap();
    rig.ok(&encode::create_blob(1, BLOB_MEM_GUEST, 64 * 64 * 4, &ent));
    rig.ok(&encode::set_scanout_blob(
        0,
        1,
        rect(0, 0, 64, 64),
        (64, 64, FORMAT_B8G8R8X8),
        256,
        0,
    ));
    // The client replaced guest memory with a smaller map.
    let other: Arc<GuestRam> = crate::bus::anonymous_ram(&[(0, 0x2000)]).unwrap();
    let f = rig.gpu.head(0, Some(&other)).unwrap().capture();
    assert_eq!(f.data.len(), 64 * 64 * 4);
    assert!(f.data[..0x1000].iter().all(|&b| b == 0));
    assert!(f.data[0x1000..].iter().all(|&b| b == 0));
}

fn dr(x: u32, y: u32, width: u32, height: u32) -> damage::Rect {
    damage::Rect::new(x, y, width, height)
}

#[test]
fn flush_rectangles_accumulate_clamped_to_the_head() {
    let mut rig = Rig::new(&m60());
    let (w, h) = (128, 64);
    rig.image(3, w, h, &pattern((w * h * 4) as usize, 7));
    // Nothing seen yet, and no scanout: everything.
    assert_eq!(rig.gpu.damage_since(1, 0), Some((Damage::Full, 1)));
    assert_eq!(rig.gpu.damage_since(4, 0), None);
    // The head shows the 64x32 rectangle at (32, 16) of the resource.
    rig.ok(&encode::set_scanout(1, 3, rect(32, 16, 64, 32)));
    let (d, g) = rig.gpu.damage_since(1, 1).unwrap();
    assert_eq!(d, Damage::Full);
    assert_eq!(rig.gpu.damage_since(1, g), Some((Damage::none(), g)));
    // Flushes in resource coordinates, clamped and moved into the head's.
    rig.ok(&encode::flush(3, rect(0, 0, 40, 20), None));
    rig.ok(&encode::flush(3, rect(90, 40, 30, 20), None));
    rig.ok(&encode::flush(3, rect(0, 0, 10, 10), None)); // outside the head: nothing
    let (d, g2) = rig.gpu.damage_since(1, g).unwrap();
    assert_eq!(d, Damage::Rects(vec![dr(0, 0, 8, 4), dr(58, 24, 6, 8)]));
    assert_eq!(g2, g + 2);
    // Overlapping flushes merge; a flush covering the head is everything.
    rig.ok(&encode::flush(3, rect(40, 20, 10, 10), None));
    rig.ok(&encode::flush(3, rect(45, 25, 10, 10), None));
    assert_eq!(
        rig.gpu.damage_since(1, g2).unwrap().0,
        Damage::Rects(vec![dr(8, 4, 15, 15)])
    );
    rig.ok(&encode::flush(3, rect(0, 0, w, h), None));
    assert_eq!(rig.gpu.damage_since(1, g2).unwrap().0, Damage::Full);
    // Other heads saw nothing flushed.
    let (_, g0) = rig.gpu.damage_since(0, 0).unwrap();
    assert_eq!(g0, 1);
}

#[test]
fn each_viewer_keeps_its_own_generation() {
    let mut rig = Rig::new(&m60());
    let (w, h) = (64, 64);
    rig.image(1, w, h, &pattern((w * h * 4) as usize, 3));
    rig.ok(&encode::set_scanout(0, 1, rect(0, 0, w, h)));
    let (_, a) = rig.gpu.damage_since(0, 0).unwrap();
    rig.ok(&encode::flush(1, rect(0, 0, 8, 8), None));
    let (_, b) = rig.gpu.damage_since(0, 0).unwrap();
    rig.ok(&encode::flush(1, rect(32, 32, 8, 8), None));
    // Viewer A, behind by two flushes; viewer B by one; both up to date afterwards.
    let (da, na) = rig.gpu.damage_since(0, a).unwrap();
    let (db, nb) = rig.gpu.damage_since(0, b).unwrap();
    assert_eq!(da, Damage::Rects(vec![dr(0, 0, 8, 8), dr(32, 32, 8, 8)]));
    assert_eq!(db, Damage::Rects(vec![dr(32, 32, 8, 8)]));
    assert_eq!(na, nb);
    assert!(rig.gpu.damage_since(0, na).unwrap().0.is_empty());
    // A generation from the future (another GPU's) is everything.
    assert_eq!(rig.gpu.damage_since(0, na + 1).unwrap().0, Damage::Full);
    // The same rectangle flushed every frame keeps one entry; a viewer far behind on distinct
    // rectangles gets everything.
    for _ in 0..1000 {
        rig.ok(&encode::flush(1, rect(0, 0, 8, 8), None));
    }
    assert_eq!(
        rig.gpu.damage_since(0, na).unwrap().0,
        Damage::Rects(vec![dr(0, 0, 8, 8)])
    );
    let (_, n) = rig.gpu.damage_since(0, 0).unwrap();
    for i in 0..=FLUSH_LOG as u32 {
        rig.ok(&encode::flush(1, rect(i % 64, i / 64, 1, 1), None));
    }
    assert_eq!(rig.gpu.damage_since(0, n).unwrap().0, Damage::Full);
    let (_, later) = rig.gpu.damage_since(0, 0).unwrap();
    assert_eq!(
        rig.gpu.damage_since(0, later - 1).unwrap().0,
        Damage::Rects(vec![dr(0, 1, 1, 1)])
    );
}

#[test]
fn a_new_scanout_a_reset_or_an_unref_is_everything() {
    let mut rig = Rig::new(&m60());
    let (w, h) = (64, 64);
    rig.image(1, w, h, &pattern((w * h * 4) as usize, 3));
    rig.image(2, w, h, &pattern((w * h * 4) as usize, 4));
    rig.ok(&encode::set_scanout(0, 1, rect(0, 0, w, h)));
    let (_, g) = rig.gpu.damage_since(0, 0).unwrap();
    // The same scanout again changes nothing; another resource or mode is everything.
    rig.ok(&encode::set_scanout(0, 1, rect(0, 0, w, h)));
    assert!(rig.gpu.damage_since(0, g).unwrap().0.is_empty());
    rig.ok(&encode::set_scanout(0, 2, rect(0, 0, w, h)));
    let (d, g) = rig.gpu.damage_since(0, g).unwrap();
    assert_eq!(d, Damage::Full);
    rig.ok(&encode::set_scanout(0, 2, rect(0, 0, 32, 32)));
    let (d, g) = rig.gpu.damage_since(0, g).unwrap();
    assert_eq!(d, Damage::Full);
    rig.ok(&encode::unref(2));
    let (d, g) = rig.gpu.damage_since(0, g).unwrap();
    assert_eq!(d, Damage::Full);
    rig.ok(&encode::set_scanout(0, 1, rect(0, 0, w, h)));
    let (_, g) = rig.gpu.damage_since(0, g).unwrap();
    rig.gpu.reset();
    let (d, g2) = rig.gpu.damage_since(0, g).unwrap();
    assert_eq!(d, Damage::Full);
    // Generations keep growing across a reset: an old position is never mistaken for a new one.
    assert!(g2 > g);
}

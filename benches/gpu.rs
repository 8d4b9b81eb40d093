//! Host cost of the virtio-gpu command path, as ratios against a memcpy of the same frame
//! measured in the same run. Run: `cargo bench --bench gpu`.
//!
//! 1. RESOURCE_FLUSH of a 1920x1080 guest-memory blob scanout (what Linux sends for every
//!    frame of a blob dumb buffer), decoded and executed by the model.
//! 2. A screenshot of that head: the frame copied out of guest RAM (`HeadSource::capture`).
//! 3. TRANSFER_TO_HOST_2D of a whole 1920x1080 2D resource (the path of a guest without blob
//!    support): guest RAM into the host-side resource.
//!
//! The floor is a memcpy of 1920 * 1080 * 4 bytes between two buffers already faulted in; a
//! screenshot returns a new frame, so it is also set against an allocation plus that memcpy.

use std::hint::black_box;
use std::time::Duration;

use vgpu_model::bus::anonymous_ram;
use vgpu_model::virtio_gpu::protocol::{encode, MemEntry, Rect};
use vgpu_model::virtio_gpu::Gpu;
use vgpu_model::Catalog;
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::{pin_to_cpu0, time};

const W: u32 = 1920;
const H: u32 = 1080;
const FRAME: usize = (W * H * 4) as usize;
const BLOB_AT: u64 = 0x100_0000;
const BACKING_AT: u64 = 0x200_0000;
const B8G8R8X8: u32 = 2;
const BLOB_MEM_GUEST: u32 = 1;

fn ok(resp: &[u8], what: &str) {
    let t = u32::from_le_bytes(resp[..4].try_into().unwrap());
    assert_eq!(t, 0x1100, "{what} answered {t:#x}");
}

fn main() {
    pin_to_cpu0();
    let catalog = Catalog::builtin().unwrap();
    let ty = catalog.resolve("M60-2Q").unwrap();
    let ram = anonymous_ram(&[(0, 64 << 20)]).unwrap();
    // Real pages behind the frames: untouched anonymous memory reads as the shared zero page,
    // which would flatter every copy out of it.
    let frame: Vec<u8> = (0..FRAME).map(|i| (i * 7 % 251) as u8).collect();
    ram.write_slice(&frame, GuestAddress(BLOB_AT)).unwrap();
    ram.write_slice(&frame, GuestAddress(BACKING_AT)).unwrap();
    let mut gpu = Gpu::new(ty, &[7; 16]);
    let budget = Duration::from_secs(2);

    // A blob on head 0.
    let whole = Rect {
        x: 0,
        y: 0,
        width: W,
        height: H,
    };
    let entry = |addr| MemEntry {
        addr,
        length: FRAME as u32,
    };
    let blob = encode::create_blob(1, BLOB_MEM_GUEST, FRAME as u64, &[entry(BLOB_AT)]);
    ok(&gpu.control(&*ram, &blob).response, "RESOURCE_CREATE_BLOB");
    let set = encode::set_scanout_blob(0, 1, whole, (W, H, B8G8R8X8), W * 4, 0);
    ok(&gpu.control(&*ram, &set).response, "SET_SCANOUT_BLOB");
    let flush = encode::flush(1, whole, None);

    // A 2D resource with one backing entry.
    let create = encode::create_2d(2, B8G8R8X8, W, H);
    ok(&gpu.control(&*ram, &create).response, "RESOURCE_CREATE_2D");
    let attach = encode::attach_backing(2, &[entry(BACKING_AT)]);
    ok(
        &gpu.control(&*ram, &attach).response,
        "RESOURCE_ATTACH_BACKING",
    );
    let transfer = encode::transfer_2d(2, whole, 0);

    let src = vec![0x5au8; FRAME];
    let mut dst = vec![0u8; FRAME];
    let memcpy = time(budget, || {
        dst.copy_from_slice(black_box(&src));
        black_box(&dst);
    });
    // A screenshot returns a new frame: the fair floor for it allocates too.
    let alloc_memcpy = time(budget, || {
        let mut fresh = vec![0u8; FRAME];
        fresh.copy_from_slice(black_box(&src));
        black_box(&fresh);
    });
    let flush_t = time(budget, || {
        black_box(gpu.control(&*ram, &flush));
    });
    let source = gpu.head(0, Some(&ram)).expect("head 0 shows the blob");
    let shot = time(budget, || {
        black_box(source.capture());
    });
    let transfer_t = time(budget, || {
        black_box(gpu.control(&*ram, &transfer));
    });

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "floor: memcpy of one {W}x{H} XRGB8888 frame: {:.0} us",
        us(memcpy)
    );
    println!(
        "RESOURCE_FLUSH of a {W}x{H} blob scanout: {:.2} us = {:.4}x the memcpy",
        us(flush_t),
        us(flush_t) / us(memcpy)
    );
    println!(
        "screenshot copy of that head (a new frame): {:.0} us = {:.2}x the memcpy, {:.2}x an \
         allocation plus memcpy ({:.0} us)",
        us(shot),
        us(shot) / us(memcpy),
        us(shot) / us(alloc_memcpy),
        us(alloc_memcpy)
    );
    println!(
        "TRANSFER_TO_HOST_2D of a {W}x{H} 2D resource: {:.0} us = {:.2}x the memcpy",
        us(transfer_t),
        us(transfer_t) / us(memcpy)
    );
}

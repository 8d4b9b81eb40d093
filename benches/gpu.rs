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

fn hdr(ty: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&ty.to_le_bytes());
    h.extend_from_slice(&[0u8; 20]);
    h
}

fn words(mut v: Vec<u8>, w: &[u32]) -> Vec<u8> {
    for x in w {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

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
    let mut blob = words(hdr(0x10c), &[1, 1, 0, 1]);
    blob.extend_from_slice(&0u64.to_le_bytes());
    blob.extend_from_slice(&(FRAME as u64).to_le_bytes());
    blob.extend_from_slice(&BLOB_AT.to_le_bytes());
    ok(
        &gpu.control(&*ram, &words(blob, &[FRAME as u32, 0]))
            .response,
        "RESOURCE_CREATE_BLOB",
    );
    let set = words(
        hdr(0x10d),
        &[
            0,
            0,
            W,
            H,
            0,
            1,
            W,
            H,
            B8G8R8X8,
            0,
            W * 4,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ],
    );
    ok(&gpu.control(&*ram, &set).response, "SET_SCANOUT_BLOB");
    let flush = words(hdr(0x104), &[0, 0, W, H, 1, 0]);

    // A 2D resource with one backing entry.
    ok(
        &gpu.control(&*ram, &words(hdr(0x101), &[2, B8G8R8X8, W, H]))
            .response,
        "RESOURCE_CREATE_2D",
    );
    let mut attach = words(hdr(0x106), &[2, 1]);
    attach.extend_from_slice(&BACKING_AT.to_le_bytes());
    ok(
        &gpu.control(&*ram, &words(attach, &[FRAME as u32, 0]))
            .response,
        "RESOURCE_ATTACH_BACKING",
    );
    let mut transfer = words(hdr(0x105), &[0, 0, W, H]);
    transfer.extend_from_slice(&0u64.to_le_bytes());
    let transfer = words(transfer, &[2, 0]);

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

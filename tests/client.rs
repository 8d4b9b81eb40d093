//! Protocol tier, through an independent client (the `vfio_user` crate's `Client`): what a VMM
//! sees of a served instance, a Linux-style mode set, VRAM through the region fd's mmap, and a
//! screenshot that shows exactly what was written.

mod common;

use common::*;
use vfio_user::Client;
use vgpu_model::catalog::Catalog;
use vgpu_model::edid;
use vm_memory::{Bytes, MmapRegion, VolatileMemory};

const CONFIG: u32 = 7;
const BAR2: u32 = 2;

fn cfg_read(c: &mut Client, offset: u64, len: usize) -> u64 {
    let mut b = vec![0u8; len];
    c.region_read(CONFIG, offset, &mut b).unwrap();
    b.iter().rev().fold(0u64, |a, &x| a << 8 | u64::from(x))
}

fn dispi_read(c: &mut Client, index: u64) -> u16 {
    let mut b = [0u8; 2];
    c.region_read(BAR2, 0x500 + 2 * index, &mut b).unwrap();
    u16::from_le_bytes(b)
}

/// Linux bochs-drm's mode set (shared with the other tiers).
fn linux_modeset(c: &mut Client, w: u16, h: u16, vram: u64, fb_offset: u64) {
    bochs_linux_modeset(c, w, h, vram, fb_offset);
}

fn pattern_pixel(x: u32, y: u32) -> [u8; 3] {
    [(x * 7) as u8, (y * 13) as u8, ((x ^ y) * 3) as u8]
}

#[test]
fn a_vmm_sees_the_type_and_the_screenshot_shows_what_it_wrote() {
    let catalog = Catalog::builtin().unwrap();
    let ty = catalog.resolve("EMU-64M").unwrap();
    let served = Served::start("EMU-64M");
    let mut c = Client::new(&served.socket).expect("client negotiates and lists regions");

    // Config space: identity from the type.
    assert_eq!(cfg_read(&mut c, 0x00, 2), 0x1234);
    assert_eq!(cfg_read(&mut c, 0x02, 2), 0x1111);
    assert_eq!(cfg_read(&mut c, 0x08, 4), 0x0380_0002);
    assert_eq!(
        cfg_read(&mut c, 0x2c, 2),
        u64::from(ty.pci.subsystem_vendor)
    );
    assert_eq!(
        cfg_read(&mut c, 0x2e, 2),
        u64::from(ty.pci.subsystem_device)
    );
    assert_eq!(cfg_read(&mut c, 0x3d, 1), 0, "interrupt pin 0");
    // BAR sizing.
    c.region_write(CONFIG, 0x10, &[0xff; 4]).unwrap();
    assert_eq!(
        cfg_read(&mut c, 0x10, 4),
        0xfc00_0008,
        "64 MiB prefetchable"
    );
    c.region_write(CONFIG, 0x18, &[0xff; 4]).unwrap();
    assert_eq!(cfg_read(&mut c, 0x18, 4), 0xffff_f000, "4 KiB registers");
    // The whole config space in one read, as QEMU does it.
    let mut cfg = [0u8; 256];
    c.region_read(CONFIG, 0, &mut cfg).unwrap();
    assert_eq!(
        vgpu_model::pci::VendorCapability::find(&cfg),
        Some(("EMU-64M".to_string(), 1))
    );

    // Region info: VRAM mmap-able through an fd, registers trapped.
    let r0 = c.region(0).unwrap();
    assert_eq!(r0.size, 64 << 20);
    assert_ne!(
        r0.flags & vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_MMAP,
        0
    );
    assert_eq!(r0.sparse_areas.len(), 1);
    assert_eq!(
        (r0.sparse_areas[0].offset, r0.sparse_areas[0].size),
        (0, 64 << 20)
    );
    let vram_fd = r0.file_offset.as_ref().expect("VRAM region fd").clone();
    let r2 = c.region(2).unwrap();
    assert_eq!(r2.size, 4096);
    assert!(
        r2.file_offset.is_none() && r2.sparse_areas.is_empty(),
        "registers never mmap-able"
    );
    assert_eq!(c.region(7).unwrap().size, 256);
    for i in [1, 3, 4, 5, 6, 8] {
        assert_eq!(c.region(i).unwrap().size, 0, "region {i}");
    }

    // BAR2: EDID and DISPI.
    let mut e = [0u8; 128];
    c.region_read(BAR2, 0, &mut e).unwrap();
    let modes = edid::decode_modes(&e).unwrap();
    assert_eq!((modes[0].width, modes[0].height), (1280, 800));
    assert!(modes.iter().all(|m| m.width <= 2560 && m.height <= 1600));
    assert_eq!(dispi_read(&mut c, 0), 0xb0c5);
    assert_eq!(dispi_read(&mut c, 10), 1024, "64 MiB / 64 KiB");

    // Not displaying yet: the screenshot says why.
    let err = served.screenshot().unwrap_err();
    assert!(
        err.contains("not displaying") && err.contains("disabled"),
        "{err}"
    );

    // Linux's mode set: 640x480 at 1 MiB into VRAM.
    let (w, h, fb) = (640u32, 480u32, 1u64 << 20);
    linux_modeset(&mut c, w as u16, h as u16, 64 << 20, fb);

    // Write a pattern through the client's own mapping of the region fd.
    let map = MmapRegion::<()>::from_file(vram_fd, 64 << 20).unwrap();
    let mut img = vec![0u8; (w * h * 4) as usize];
    for y in 0..h {
        for x in 0..w {
            let [r, g, b] = pattern_pixel(x, y);
            let at = ((y * w + x) * 4) as usize;
            img[at..at + 4].copy_from_slice(&[b, g, r, 0]);
        }
    }
    map.as_volatile_slice()
        .write_slice(&img, fb as usize)
        .unwrap();

    let (sw, sh, rgb) = served.screenshot().expect("screenshot");
    assert_eq!((sw, sh), (w, h));
    for y in 0..h {
        for x in 0..w {
            let at = ((y * w + x) * 3) as usize;
            assert_eq!(rgb[at..at + 3], pattern_pixel(x, y), "pixel ({x}, {y})");
        }
    }

    let status = served.status();
    assert_eq!(status["type"], "EMU-64M@1");
    assert_eq!(status["client_connected"], true);
    assert_eq!(status["heads"][0]["displaying"], true);
    assert!(status["heads"][0]["mode"]
        .as_str()
        .unwrap()
        .starts_with("640x480 XRGB8888"));
    assert!(status["accesses"]["register_writes"].as_u64().unwrap() >= 12);

    // DEVICE_RESET clears the registers and keeps VRAM.
    c.reset().unwrap();
    assert_eq!(dispi_read(&mut c, 4), 0);
    let mut back = vec![0u8; 16];
    map.as_volatile_slice()
        .read_slice(&mut back, fb as usize)
        .unwrap();
    assert_eq!(back, img[..16]);
}

#[test]
fn state_written_by_one_client_is_seen_by_the_next() {
    let mut served = Served::start("EMU-16M");
    {
        let mut c = Client::new(&served.socket).unwrap();
        linux_modeset(&mut c, 800, 600, 16 << 20, 0);
        // VRAM through trapped writes this time (the other test used the mmap).
        c.region_write(0, 0, &[0x11, 0x22, 0x33, 0x00]).unwrap();
        c.shutdown().unwrap();
    }
    wait_until(std::time::Duration::from_secs(5), "the disconnect", || {
        served.status()["client_connected"] == false
    });
    let mut c = Client::new(&served.socket).expect("the next client is accepted");
    assert_eq!(dispi_read(&mut c, 1), 800);
    assert_eq!(dispi_read(&mut c, 2), 600);
    assert_eq!(dispi_read(&mut c, 4), 0x41);
    let mut px = [0u8; 4];
    c.region_read(0, 0, &mut px).unwrap();
    assert_eq!(px, [0x11, 0x22, 0x33, 0x00]);
    let (w, h, rgb) = served.screenshot().unwrap();
    assert_eq!((w, h, &rgb[..3]), (800, 600, &[0x33, 0x22, 0x11][..]));
    assert_eq!(served.status()["server"]["connections"], 2);
    served.assert_alive();
}

//! Protocol tier, malformed input from a raw-socket peer (after libvfio-user's
//! `test_request_errors.py`): each bad message gets an error reply with a non-zero errno or a
//! clean disconnect, the connection stays in sync where it can, the server keeps serving, and no
//! descriptor leaks.

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::*;

/// After each case: the server is alive and, once the previous client is gone, a fresh client
/// works.
fn fresh_client_works(served: &mut Served) {
    served.assert_alive();
    wait_until(
        Duration::from_secs(5),
        "the previous client to be gone",
        || served.status()["client_connected"] == false,
    );
    let mut p = Peer::negotiated(&served.socket);
    assert_eq!(p.dispi(0), 0xb0c5);
}

#[test]
fn truncated_and_undersized_headers() {
    let mut served = Served::start("EMU-16M");
    // Fewer than 16 bytes, then EOF: nothing to answer; the server drops the connection.
    let mut p = Peer::connect(&served.socket);
    p.send_raw(&[1, 0, 1, 0, 0x20, 0, 0, 0, 0, 0]);
    p.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(p.try_read_reply().is_none());
    fresh_client_works(&mut served);

    // message_size smaller than the header: EINVAL, then the server closes (no resync).
    let mut p = Peer::negotiated(&served.socket);
    let mut m = message(7, REGION_READ, 0, &[]);
    m[4..8].copy_from_slice(&8u32.to_le_bytes());
    p.send_raw(&m);
    let r = p.read_reply();
    assert_eq!(
        (r.id, r.errno, r.is_error()),
        (7, libc::EINVAL as u32, true)
    );
    assert!(p.closed_by_server());
    drop(p);
    fresh_client_works(&mut served);
}

#[test]
fn oversize_messages_are_refused_and_drained_in_sync() {
    let mut served = Served::start("EMU-16M");
    let mut p = Peer::negotiated(&served.socket);
    // 64 KiB above the limit, really sent: E2BIG, drained, and the next command is answered.
    let limit = 16 + 16 + (1 << 20);
    let big = message(9, REGION_WRITE, 0, &vec![0u8; limit + 65536 - 16]);
    let next = message(10, REGION_READ, 0, &region_access(2, 0x500, 2));
    let writer = {
        let mut s = p.stream.try_clone().unwrap();
        std::thread::spawn(move || {
            s.write_all(&big).unwrap();
            s.write_all(&next).unwrap();
        })
    };
    let r = p.read_reply();
    assert_eq!((r.id, r.is_error(), r.errno), (9, true, libc::E2BIG as u32));
    let r = p.read_reply();
    assert_eq!((r.id, r.is_error()), (10, false));
    assert_eq!(&r.payload[16..], &0xb0c5u16.to_le_bytes());
    writer.join().unwrap();

    // A claim of 2 GiB: E2BIG right away, no allocation of that size (the peer gives up).
    drop(p);
    wait_until(Duration::from_secs(5), "the disconnect", || {
        served.status()["client_connected"] == false
    });
    let mut p = Peer::negotiated(&served.socket);
    let mut m = message(11, REGION_WRITE, 0, &[0; 16]);
    m[4..8].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    p.send_raw(&m);
    let r = p.read_reply();
    assert_eq!((r.id, r.errno), (11, libc::E2BIG as u32));
    drop(p);
    fresh_client_works(&mut served);
}

#[test]
fn unknown_commands_are_drained_and_the_stream_stays_in_sync() {
    let mut served = Served::start("EMU-16M");
    let mut p = Peer::negotiated(&served.socket);
    // Unknown command with a payload, a command we do not implement, then a valid one, in one write.
    let mut batch = message(20, 99, 0, &[0xab; 100]);
    batch.extend(message(21, 6, 0, &[0; 24]));
    batch.extend(message(22, REGION_READ, 0, &region_access(2, 0x500, 2)));
    p.send_raw(&batch);
    let r = p.read_reply();
    assert_eq!((r.id, r.errno), (20, libc::ENOSYS as u32));
    let r = p.read_reply();
    assert_eq!((r.id, r.errno), (21, libc::ENOSYS as u32));
    let r = p.read_reply();
    assert_eq!(
        (r.id, r.is_error(), &r.payload[16..]),
        (22, false, &0xb0c5u16.to_le_bytes()[..])
    );
    drop(p);
    fresh_client_works(&mut served);
}

#[test]
fn bad_region_accesses() {
    let mut served = Served::start("EMU-16M");
    let mut p = Peer::negotiated(&served.socket);
    let einval = libc::EINVAL;
    // Region index out of range; a zero-size region.
    p.expect_errno(REGION_READ, &region_access(20, 0, 4), &[], einval);
    p.expect_errno(REGION_READ, &region_access(1, 0, 4), &[], einval);
    // offset + count past the end.
    p.expect_errno(REGION_READ, &region_access(2, 4094, 4), &[], einval);
    p.expect_errno(REGION_READ, &region_access(7, 255, 2), &[], einval);
    p.expect_errno(REGION_READ, &region_access(0, 16 << 20, 1), &[], einval);
    // count above max_data_xfer_size.
    p.expect_errno(
        REGION_READ,
        &region_access(0, 0, (1 << 20) + 1),
        &[],
        einval,
    );
    // Offset overflow.
    p.expect_errno(REGION_READ, &region_access(0, u64::MAX - 1, 4), &[], einval);
    let mut w = region_access(2, u64::MAX, 2);
    w.extend_from_slice(&[1, 2]);
    p.expect_errno(REGION_WRITE, &w, &[], einval);
    // A write whose count disagrees with its data.
    let mut w = region_access(2, 0x502, 4);
    w.extend_from_slice(&[1, 2]);
    p.expect_errno(REGION_WRITE, &w, &[], einval);
    // Short payloads.
    p.expect_errno(REGION_READ, &[0; 8], &[], einval);
    p.expect_errno(GET_REGION_INFO, &[0; 8], &[], einval);
    // A message flagged as a reply, and a command with the error bit.
    let id = p.next_id();
    p.send_raw(&message(id, REGION_READ, 1, &region_access(2, 0x500, 2)));
    assert_eq!(p.read_reply().errno, einval as u32);
    // A no-reply message gets no reply even when it fails: the next reply is for the next id.
    p.send_raw(&message(
        500,
        REGION_READ,
        NO_REPLY,
        &region_access(20, 0, 4),
    ));
    p.send_raw(&message(501, REGION_READ, 0, &region_access(2, 0x500, 2)));
    assert_eq!(p.read_reply().id, 501);
    // The model counted the refusals; nothing else changed.
    assert_eq!(p.dispi(1), 0);
    let status = served.status();
    assert!(
        status["accesses"]["refused"].as_u64().unwrap() >= 8,
        "{status}"
    );
    assert!(
        status["server"]["errors"].as_u64().unwrap() >= 12,
        "{status}"
    );
    drop(p);
    fresh_client_works(&mut served);
}

#[test]
fn version_negotiation_errors() {
    let mut served = Served::start("EMU-16M");
    let mut p = Peer::connect(&served.socket);
    // Anything before VERSION.
    p.expect_errno(REGION_READ, &region_access(2, 0x500, 2), &[], libc::EINVAL);
    // No NUL terminator.
    p.expect_errno(
        VERSION,
        &version_payload(br#"{"capabilities":{}}"#),
        &[],
        libc::EINVAL,
    );
    // Bad JSON, JSON that is not an object, a NUL inside, bad capability types.
    for bad in [
        &b"{\"capabilities\":\0"[..],
        b"[1,2]\0",
        b"{}\0{}\0",
        b"{\"capabilities\":{\"max_data_xfer_size\":\"big\"}}\0",
    ] {
        p.expect_errno(VERSION, &version_payload(bad), &[], libc::EINVAL);
    }
    // Major version 1.
    let mut v = version_payload(b"{}\0");
    v[0] = 1;
    p.expect_errno(VERSION, &v, &[], libc::ENOTSUP);
    // Then a good VERSION on the same connection: a reply no longer than the request, with
    // nonzero pgsizes and without write_multiple.
    let mut json = QEMU_CAPS.as_bytes().to_vec();
    json.push(0);
    let request = version_payload(&json);
    let r = p.call(VERSION, &request);
    assert!(!r.is_error());
    assert!(r.payload.len() <= request.len());
    assert_eq!(&r.payload[..4], &[0, 0, 0, 0], "version 0.0");
    assert_eq!(r.payload.last(), Some(&0));
    let caps: serde_json::Value =
        serde_json::from_slice(&r.payload[4..r.payload.len() - 1]).unwrap();
    assert_eq!(caps["capabilities"]["pgsizes"], 4096);
    assert!(caps["capabilities"]["max_msg_fds"].as_u64().unwrap() <= 16);
    assert!(caps["capabilities"].get("write_multiple").is_none());
    // A second VERSION is refused.
    p.expect_errno(VERSION, &request, &[], libc::EINVAL);
    // A short request gets a reply that still fits it.
    drop(p);
    wait_until(Duration::from_secs(5), "the disconnect", || {
        served.status()["client_connected"] == false
    });
    let mut p = Peer::connect(&served.socket);
    let short = version_payload(b"{\"capabilities\":{\"pgsizes\":4096}}\0");
    let r = p.call(VERSION, &short);
    assert!(!r.is_error() && r.payload.len() <= short.len(), "{r:?}");
    drop(p);
    fresh_client_works(&mut served);
}

fn dma_map(addr: u64, size: u64, offset: u64) -> Vec<u8> {
    let mut m = 32u32.to_le_bytes().to_vec();
    m.extend_from_slice(&3u32.to_le_bytes());
    m.extend_from_slice(&offset.to_le_bytes());
    m.extend_from_slice(&addr.to_le_bytes());
    m.extend_from_slice(&size.to_le_bytes());
    m
}

fn dma_unmap(flags: u32, addr: u64, size: u64) -> Vec<u8> {
    let mut m = 24u32.to_le_bytes().to_vec();
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&addr.to_le_bytes());
    m.extend_from_slice(&size.to_le_bytes());
    m
}

#[test]
fn dma_maps_and_descriptor_limits() {
    let mut served = Served::start("EMU-16M");
    let mut p = Peer::negotiated(&served.socket);
    let ram = vgpu_emu::memfd::memfd("guest-ram", 1 << 20).unwrap();
    // Maps with and without an fd (as QEMU sends them), before DEVICE_GET_INFO.
    let r = p.call_fds(DMA_MAP, &dma_map(0, 1 << 20, 0), &[ram.as_raw_fd()]);
    assert!(!r.is_error() && r.payload.is_empty(), "{r:?}");
    assert!(!p.call(DMA_MAP, &dma_map(0xfee0_0000, 0x1000, 0)).is_error());
    // An fd smaller than the mapped size (SIGBUS if mapped): refused.
    p.expect_errno(
        DMA_MAP,
        &dma_map(1 << 30, 2 << 20, 0),
        &[ram.as_raw_fd()],
        libc::EINVAL,
    );
    // Overlap.
    p.expect_errno(DMA_MAP, &dma_map(0x8_0000, 0x1000, 0), &[], libc::EEXIST);
    // More descriptors than allowed: 20 (over max_msg_fds) and 100 (over what a read takes).
    for n in [20usize, 100] {
        let fds = vec![ram.as_raw_fd(); n];
        p.expect_errno(DMA_MAP, &dma_map(2 << 30, 0x1000, 0), &fds, libc::EINVAL);
    }
    // Descriptors on a command that takes none.
    p.expect_errno(
        REGION_READ,
        &region_access(2, 0x500, 2),
        &[ram.as_raw_fd()],
        libc::EINVAL,
    );
    // Unmap: the dirty-bitmap flag is not supported; unmap-all needs address and size 0.
    p.expect_errno(DMA_UNMAP, &dma_unmap(1, 0, 1 << 20), &[], libc::ENOTSUP);
    p.expect_errno(DMA_UNMAP, &dma_unmap(2, 0, 1 << 20), &[], libc::EINVAL);
    p.expect_errno(DMA_UNMAP, &dma_unmap(0, 0, 0x1000), &[], libc::EINVAL);
    let r = p.call(DMA_UNMAP, &dma_unmap(0, 0, 1 << 20));
    assert!(!r.is_error() && r.payload.len() == 24, "{r:?}");
    let r = p.call(DMA_UNMAP, &dma_unmap(2, 0, 0));
    assert!(!r.is_error(), "unmap-all");
    drop(p);
    fresh_client_works(&mut served);
}

fn irq_set(flags: u32, index: u32, start: u32, count: u32) -> Vec<u8> {
    let mut m = 20u32.to_le_bytes().to_vec();
    for v in [flags, index, start, count] {
        m.extend_from_slice(&v.to_le_bytes());
    }
    m
}

const EVENTFD_TRIGGER: u32 = 4 | 32;
const NONE_TRIGGER: u32 = 1 | 32;
const BOOL_TRIGGER: u32 = 2 | 32;
const ERR_IRQ: u32 = 3;

#[test]
fn irq_eventfds_are_assigned_fired_and_released() {
    let mut served = Served::start("EMU-16M");
    let mut p = Peer::negotiated(&served.socket);
    // DEVICE_GET_INFO and IRQ info as QEMU reads them.
    let r = p.call(GET_INFO, &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let word = |i: usize| u32::from_le_bytes(r.payload[i * 4..i * 4 + 4].try_into().unwrap());
    assert_eq!(
        (word(1) & 3, word(2), word(3)),
        (3, 9, 5),
        "PCI|RESET, 9 regions, 5 IRQ indexes"
    );
    for (index, count) in [(0u32, 0u32), (1, 0), (2, 0), (3, 1), (4, 1)] {
        let mut q = 16u32.to_le_bytes().to_vec();
        q.extend_from_slice(&[0; 4]);
        q.extend_from_slice(&index.to_le_bytes());
        q.extend_from_slice(&[0; 4]);
        let r = p.call(GET_IRQ_INFO, &q);
        assert_eq!(
            u32::from_le_bytes(r.payload[12..16].try_into().unwrap()),
            count,
            "index {index}"
        );
    }

    let efd = eventfd();
    // Assign with argsz 20 and the eventfd as SCM_RIGHTS, as QEMU does.
    let r = p.call_fds(
        SET_IRQS,
        &irq_set(EVENTFD_TRIGGER, ERR_IRQ, 0, 1),
        &[efd.as_raw_fd()],
    );
    assert!(!r.is_error(), "{r:?}");
    // Loopback trigger: the eventfd fires.
    assert!(!p
        .call(SET_IRQS, &irq_set(NONE_TRIGGER, ERR_IRQ, 0, 1))
        .is_error());
    wait_until(Duration::from_secs(5), "the eventfd", || {
        eventfd_take(&efd) == 1
    });
    let mut b = irq_set(BOOL_TRIGGER, ERR_IRQ, 0, 1);
    b.push(1);
    assert!(!p.call(SET_IRQS, &b).is_error());
    wait_until(Duration::from_secs(5), "the eventfd", || {
        eventfd_take(&efd) == 1
    });
    // A chunk without descriptors de-assigns: triggering then fires nothing.
    assert!(!p
        .call(SET_IRQS, &irq_set(EVENTFD_TRIGGER, ERR_IRQ, 0, 1))
        .is_error());
    assert!(!p
        .call(SET_IRQS, &irq_set(NONE_TRIGGER, ERR_IRQ, 0, 1))
        .is_error());
    assert_eq!(eventfd_take(&efd), 0);
    // Count 0 with DATA_NONE disables the index.
    assert!(!p
        .call(SET_IRQS, &irq_set(NONE_TRIGGER, ERR_IRQ, 0, 0))
        .is_error());

    let einval = libc::EINVAL;
    p.expect_errno(
        SET_IRQS,
        &irq_set(EVENTFD_TRIGGER, 9, 0, 1),
        &[efd.as_raw_fd()],
        einval,
    );
    p.expect_errno(
        SET_IRQS,
        &irq_set(EVENTFD_TRIGGER | 1, ERR_IRQ, 0, 1),
        &[efd.as_raw_fd()],
        einval,
    );
    p.expect_errno(
        SET_IRQS,
        &irq_set(4 | 8, ERR_IRQ, 0, 1),
        &[efd.as_raw_fd()],
        einval,
    );
    p.expect_errno(
        SET_IRQS,
        &irq_set(EVENTFD_TRIGGER, ERR_IRQ, 0, 2),
        &[efd.as_raw_fd()],
        einval,
    );
    p.expect_errno(
        SET_IRQS,
        &irq_set(EVENTFD_TRIGGER, ERR_IRQ, u32::MAX, 2),
        &[],
        einval,
    );
    p.expect_errno(
        SET_IRQS,
        &irq_set(EVENTFD_TRIGGER, 2, 0, 1),
        &[efd.as_raw_fd()],
        einval,
    );
    p.expect_errno(
        SET_IRQS,
        &irq_set(NONE_TRIGGER, ERR_IRQ, 0, 1),
        &[efd.as_raw_fd()],
        einval,
    );
    // Not an eventfd.
    let file = vgpu_emu::memfd::memfd("not-an-eventfd", 8).unwrap();
    p.expect_errno(
        SET_IRQS,
        &irq_set(EVENTFD_TRIGGER, ERR_IRQ, 0, 1),
        &[file.as_raw_fd()],
        einval,
    );
    drop(p);
    fresh_client_works(&mut served);
}

#[test]
fn one_client_at_a_time() {
    let mut served = Served::start("EMU-16M");
    let mut first = Peer::negotiated(&served.socket);
    // A second client waits out the grace period, then is refused; the first is undisturbed.
    let mut second = Peer::connect(&served.socket);
    assert!(second.closed_by_server(), "a second client is refused");
    assert_eq!(first.dispi(0), 0xb0c5, "the first is undisturbed");
    assert_eq!(served.status()["server"]["refused_connections"], 1);
    // A client that connects just before the attached one leaves is served once it has left
    // (a reconnect racing its own disconnect).
    let mut third = Peer::connect(&served.socket);
    drop(first);
    let mut json = QEMU_CAPS.as_bytes().to_vec();
    json.push(0);
    let r = third.call(VERSION, &version_payload(&json));
    assert!(!r.is_error(), "{r:?}");
    assert_eq!(third.dispi(0), 0xb0c5);
    assert_eq!(served.status()["server"]["refused_connections"], 1);
    drop(third);
    fresh_client_works(&mut served);
}

#[test]
fn no_descriptor_leaks_over_1000_connections() {
    let mut served = Served::start("EMU-16M");
    // Settle: one full cycle first (lazy allocations, the control socket used by status).
    fresh_client_works(&mut served);
    wait_until(Duration::from_secs(5), "the first disconnect", || {
        served.status()["client_connected"] == false
    });
    let baseline = served.fd_count();
    let ram = vgpu_emu::memfd::memfd("guest-ram", 1 << 16).unwrap();
    let efd = eventfd();
    for i in 0..1000u32 {
        let mut p = Peer::negotiated(&served.socket);
        match i % 4 {
            // Leave a DMA map with an fd and an IRQ eventfd behind at disconnect.
            0 => {
                assert!(!p
                    .call_fds(DMA_MAP, &dma_map(0, 1 << 16, 0), &[ram.as_raw_fd()])
                    .is_error());
                assert!(!p
                    .call_fds(
                        SET_IRQS,
                        &irq_set(EVENTFD_TRIGGER, ERR_IRQ, 0, 1),
                        &[efd.as_raw_fd()]
                    )
                    .is_error());
            }
            // Region info hands out the VRAM fd.
            1 => {
                let mut q = 64u32.to_le_bytes().to_vec();
                q.extend_from_slice(&[0; 28]);
                let r = p.call(GET_REGION_INFO, &q);
                assert!(!r.is_error());
            }
            // Descriptors sent with a failing message.
            2 => p.expect_errno(
                REGION_READ,
                &region_access(2, 0x500, 2),
                &[ram.as_raw_fd()],
                libc::EINVAL,
            ),
            _ => {}
        }
    }
    wait_until(
        Duration::from_secs(10),
        "descriptors back to the baseline",
        || served.fd_count() == baseline,
    );
    // The settling client plus the 1000.
    assert_eq!(
        served.status()["server"]["connections"].as_u64().unwrap(),
        1001
    );
    served.assert_alive();
}

/// QEMU asks for region info with argsz 32 first. The reply announces the size needed for the
/// capabilities, and its cap_offset must already be valid (QEMU 11 refuses the device
/// otherwise: "failed to get region 0 info: Invalid argument").
#[test]
fn region_info_answers_a_short_request_as_qemu_expects() {
    let mut served = Served::start("EMU-64M");
    let mut p = Peer::negotiated(&served.socket);
    let request = |argsz: u32| {
        let mut q = argsz.to_le_bytes().to_vec();
        q.extend_from_slice(&[0; 28]);
        q
    };
    let word =
        |r: &Reply, i: usize| u32::from_le_bytes(r.payload[i * 4..i * 4 + 4].try_into().unwrap());
    let short = p.call(GET_REGION_INFO, &request(32));
    assert!(!short.is_error() && short.payload.len() == 32, "{short:?}");
    let caps_flag = vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_CAPS;
    assert_eq!(
        word(&short, 0),
        64,
        "argsz needed: info + sparse cap with one area"
    );
    assert_ne!(word(&short, 1) & caps_flag, 0);
    assert_eq!(word(&short, 3), 32, "cap_offset within [32, argsz]");
    let full = p.call(GET_REGION_INFO, &request(64));
    assert_eq!(full.payload.len(), 64);
    assert_eq!((word(&full, 0), word(&full, 3)), (64, 32));
    // The sparse-mmap capability: id 1, version 1, one area covering the 64 MiB BAR.
    assert_eq!(u16::from_le_bytes([full.payload[32], full.payload[33]]), 1);
    assert_eq!(word(&full, 8 + 2), 1, "nr_areas");
    assert_eq!(
        u64::from_le_bytes(full.payload[56..64].try_into().unwrap()),
        64 << 20
    );
    drop(p);
    fresh_client_works(&mut served);
}

/// A client that stops reading its replies stalls only itself: the server's send blocks, but the
/// instance stays reachable (status, screenshots, and in a daemon the whole mdev tree).
#[test]
fn a_client_that_stops_reading_stalls_only_itself() {
    let served = Served::start("EMU-16M");
    let mut p = Peer::negotiated(&served.socket);
    // 1 MiB reads whose replies are never read: the socket fills and the server's send blocks.
    for i in 0..32u16 {
        p.send_raw(&message(
            1000 + i,
            REGION_READ,
            0,
            &region_access(0, 0, 1 << 20),
        ));
    }
    wait_until(
        Duration::from_secs(10),
        "the server to be stuck sending",
        || served.status()["server"]["messages"].as_u64().unwrap() >= 2,
    );
    // Still answering while the send is blocked.
    let status = served.status();
    assert_eq!(status["client_connected"], true);
    assert!(served.screenshot().unwrap_err().contains("not displaying"));
    drop(p);
}

// ---- A hostile client (each of these once broke, stalled or grew the server).

/// The VRAM fd handed out with region 0's info cannot be truncated or grown: a client that
/// shrank it once made the next VRAM read (or screenshot) kill the server with SIGBUS.
#[test]
fn a_client_cannot_resize_the_vram_it_was_handed() {
    let mut served = Served::start("EMU-16M");
    let mut p = Peer::negotiated(&served.socket);
    let mut q = 64u32.to_le_bytes().to_vec();
    q.extend_from_slice(&[0; 28]);
    p.send_raw(&message(77, GET_REGION_INFO, 0, &q));
    let (r, fds) = p.read_reply_with_fds();
    assert!(!r.is_error(), "{r:?}");
    assert_eq!(
        fds.len(),
        1,
        "the VRAM fd comes with the sparse-mmap capability"
    );
    let vram = std::fs::File::from(fds.into_iter().next().unwrap());
    let e = vram.set_len(0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "shrinking is sealed");
    assert!(vram.set_len(1 << 30).is_err(), "growing is sealed");
    // VRAM is still whole: a read at its last byte works, and the server lives.
    let r = p.call(REGION_READ, &region_access(0, (16 << 20) - 4, 4));
    assert!(!r.is_error(), "{r:?}");
    served.assert_alive();
    drop(p);
    fresh_client_works(&mut served);
}

/// A guest-RAM file the client could truncate is recorded but never mapped, so truncating it
/// afterwards cannot raise SIGBUS in the server; a sealed one (QEMU's memfd backend) is mapped.
#[test]
fn only_guest_ram_that_cannot_shrink_is_mapped() {
    let mut served = Served::start("EMU-16M");
    let mut p = Peer::negotiated(&served.socket);
    let open = vgpu_emu::memfd::memfd_unsealed("open-guest-ram", 1 << 20).unwrap();
    let sealed = vgpu_emu::memfd::memfd("sealed-guest-ram", 1 << 20).unwrap();
    let r = p.call_fds(DMA_MAP, &dma_map(0, 1 << 20, 0), &[open.as_raw_fd()]);
    assert!(
        !r.is_error(),
        "an unsealed file is accepted, unmapped: {r:?}"
    );
    let r = p.call_fds(
        DMA_MAP,
        &dma_map(1 << 20, 1 << 20, 0),
        &[sealed.as_raw_fd()],
    );
    assert!(!r.is_error(), "{r:?}");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", served.pid())).unwrap();
    assert!(
        maps.contains("sealed-guest-ram"),
        "the sealed file is mapped"
    );
    assert!(!maps.contains("open-guest-ram"), "the unsealed file is not");
    open.set_len(0).unwrap();
    assert_eq!(p.dispi(0), 0xb0c5);
    served.assert_alive();
    drop(p);
    fresh_client_works(&mut served);
}

/// An interrupt eventfd whose counter the client pushed to just below overflow (with
/// O_NONBLOCK cleared on the shared file) once made the server's write block under the instance
/// lock: status hung, and SIGTERM could not stop `serve`.
#[test]
fn an_eventfd_at_the_brink_of_overflow_stalls_nothing() {
    let mut served = Served::start("EMU-16M");
    let mut p = Peer::negotiated(&served.socket);
    let efd = eventfd();
    let r = p.call_fds(
        SET_IRQS,
        &irq_set(EVENTFD_TRIGGER, ERR_IRQ, 0, 1),
        &[efd.as_raw_fd()],
    );
    assert!(!r.is_error(), "{r:?}");
    let brink = (u64::MAX - 1).to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to our eventfd; F_SETFL with an int argument.
    unsafe {
        assert_eq!(libc::write(efd.as_raw_fd(), brink.as_ptr().cast(), 8), 8);
        assert_eq!(libc::fcntl(efd.as_raw_fd(), libc::F_SETFL, 0), 0);
    }
    // The server is asked to trigger it: the interrupt is pending already, and it answers.
    p.stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let r = p.call(SET_IRQS, &irq_set(NONE_TRIGGER, ERR_IRQ, 0, 1));
    assert!(!r.is_error(), "{r:?}");
    assert_eq!(p.dispi(0), 0xb0c5);
    assert_eq!(served.status()["client_connected"], true);
    // The counter was not touched and the server still stops on SIGTERM.
    // SAFETY: sends SIGTERM to our own child.
    unsafe { libc::kill(served.pid() as i32, libc::SIGTERM) };
    wait_until(Duration::from_secs(5), "serve to stop on SIGTERM", || {
        served.child.try_wait().unwrap().is_some()
    });
}

/// Announcing a large message and trickling one byte at a time with 16 descriptors each once
/// took the server from 16 to 3216 open fds. Descriptors that cannot belong to the message are
/// closed as they arrive.
#[test]
fn trickled_descriptors_are_closed_as_they_arrive() {
    let mut served = Served::start("EMU-16M");
    let mut p = Peer::negotiated(&served.socket);
    assert_eq!(p.dispi(0), 0xb0c5);
    let baseline = served.fd_count();
    let efd = eventfd();
    let fds = [efd.as_raw_fd(); 16];
    // An unknown command of 16 + 400 bytes: its header, then 400 single bytes.
    let body = vec![0u8; 400];
    let m = message(5, 0x7f, 0, &body);
    p.send_raw(&m[..16]);
    for b in &m[16..m.len() - 1] {
        p.send_with_fds(std::slice::from_ref(b), &fds);
    }
    wait_until(Duration::from_secs(10), "the trickle to be read", || {
        served.status()["server"]["stray_fds_closed"]
            .as_u64()
            .unwrap()
            >= 398 * 16
    });
    let held = served.fd_count();
    assert!(
        held <= baseline + 16 + 2,
        "{held} fds open, baseline {baseline}: descriptors are hoarded"
    );
    // The last byte completes the message: answered in sync, and the stream goes on. (If the
    // header and the first trickled byte came in one read, its descriptors count as the
    // message's, which takes none: EINVAL; otherwise the unknown command is ENOSYS.)
    p.send_raw(&m[m.len() - 1..]);
    let r = p.read_reply();
    assert_eq!(r.id, 5);
    assert!(
        r.is_error() && [libc::ENOSYS as u32, libc::EINVAL as u32].contains(&r.errno),
        "{r:?}"
    );
    assert_eq!(p.dispi(0), 0xb0c5);
    drop(p);
    fresh_client_works(&mut served);
}

/// A VMM that probes and reconnects in a loop, every second connection negotiating, was
/// refused within ~20 cycles although no client stayed attached.
#[test]
fn a_reconnect_loop_is_never_refused() {
    let mut served = Served::start("EMU-16M");
    for i in 0..200 {
        if i % 2 == 0 {
            let p = Peer::negotiated(&served.socket);
            p.stream.shutdown(std::net::Shutdown::Both).unwrap();
        } else {
            drop(Peer::connect(&served.socket));
        }
    }
    fresh_client_works(&mut served);
    assert_eq!(served.status()["server"]["refused_connections"], 0);
}

/// A second client (a second QEMU on a busy socket) gets an answer to its first message,
/// EBUSY, instead of a closed socket that QEMU turns into an assertion failure.
#[test]
fn a_refused_client_is_answered_ebusy() {
    let mut served = Served::start_logged("EMU-16M");
    let mut first = Peer::negotiated(&served.socket);
    let mut second = Peer::connect(&served.socket);
    let mut json = QEMU_CAPS.as_bytes().to_vec();
    json.push(0);
    second.send_raw(&message(1, VERSION, 0, &version_payload(&json)));
    let r = second.read_reply();
    assert_eq!((r.id, r.errno, r.is_error()), (1, libc::EBUSY as u32, true));
    assert!(second.closed_by_server());
    assert_eq!(first.dispi(0), 0xb0c5, "the first is undisturbed");
    assert_eq!(served.status()["server"]["refused_connections"], 1);
    assert!(
        served.log().contains("another client is attached"),
        "the log says why: {}",
        served.log()
    );
    drop(first);
    fresh_client_works(&mut served);
}

/// Clients that give up while waiting do not take the places of those that come later.
#[test]
fn clients_that_close_while_waiting_make_room() {
    let mut served = Served::start("EMU-16M");
    let first = Peer::negotiated(&served.socket);
    for _ in 0..20 {
        drop(Peer::connect(&served.socket));
    }
    let mut last = Peer::connect(&served.socket);
    drop(first);
    let mut json = QEMU_CAPS.as_bytes().to_vec();
    json.push(0);
    let r = last.call(VERSION, &version_payload(&json));
    assert!(!r.is_error(), "{r:?}");
    assert_eq!(last.dispi(0), 0xb0c5);
    assert_eq!(served.status()["server"]["refused_connections"], 0);
    drop(last);
    served.assert_alive();
}

/// 1000 DEVICE_RESETs once wrote 1000 log lines.
#[test]
fn what_a_guest_repeats_is_logged_rate_limited() {
    let mut served = Served::start_logged("EMU-16M");
    let mut p = Peer::negotiated(&served.socket);
    for _ in 0..1000 {
        assert!(!p.call(RESET, &[]).is_error());
    }
    let log = served.log();
    let lines = log.lines().filter(|l| l.contains("device reset")).count();
    assert!(
        (1..=12).contains(&lines),
        "{lines} reset lines for 1000 resets"
    );
    assert_eq!(
        served.status()["accesses"]["resets"].as_u64().unwrap(),
        1000
    );
    drop(p);
    fresh_client_works(&mut served);
}

/// REGION_WRITE_MULTI applies all of its entries or none: a bad entry anywhere refuses the
/// whole message (it once applied the entries before the bad one).
#[test]
fn write_multi_is_all_or_nothing() {
    let mut served = Served::start("EMU-16M");
    let mut p = Peer::negotiated(&served.socket);
    let entry = |region: u32, offset: u64, value: u16| {
        let mut e = offset.to_le_bytes().to_vec();
        e.extend_from_slice(&region.to_le_bytes());
        e.extend_from_slice(&2u32.to_le_bytes());
        let mut data = [0u8; 8];
        data[..2].copy_from_slice(&value.to_le_bytes());
        e.extend_from_slice(&data);
        e
    };
    let xres = p.dispi(1);
    let mut m = 2u64.to_le_bytes().to_vec();
    m.extend(entry(2, 0x502, 640));
    m.extend(entry(2, 0x1000, 1)); // past the 4 KiB register BAR
    p.expect_errno(15, &m, &[], libc::EINVAL);
    assert_eq!(p.dispi(1), xres, "the first entry was not applied");
    let mut m = 2u64.to_le_bytes().to_vec();
    m.extend(entry(2, 0x502, 640));
    m.extend(entry(2, 0x504, 480));
    assert!(!p.call(15, &m).is_error());
    assert_eq!((p.dispi(1), p.dispi(2)), (640, 480));
    drop(p);
    fresh_client_works(&mut served);
}

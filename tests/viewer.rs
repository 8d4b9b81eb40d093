//! Live viewers of a served instance: `serve --vnc/--web` against an independent VNC client
//! (the `vnc` crate), a raw RFB peer written here, and a WebSocket client (tungstenite), with a
//! VMM (the `vfio_user` crate's client) setting modes and writing VRAM as bochs-drm does.
//! What each viewer reconstructs must equal `vgpu-emu screenshot`, byte for byte.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::vnc::VncView;
use common::*;
use vfio_user::Client;
use vm_memory::{Bytes, MmapRegion, VolatileMemory};

const VRAM: u64 = 64 << 20;

/// A VMM with a bochs mode set at `w` x `h` and a mapping of VRAM to draw in.
struct Vmm {
    client: Client,
    vram: MmapRegion<()>,
}

impl Vmm {
    fn attach(served: &Served) -> Vmm {
        let client = Client::new(&served.socket).expect("client negotiates");
        let fd = client
            .region(0)
            .unwrap()
            .file_offset
            .as_ref()
            .expect("VRAM fd")
            .clone();
        let vram = MmapRegion::<()>::from_file(fd, VRAM as usize).unwrap();
        Vmm { client, vram }
    }

    fn mode(&mut self, w: u16, h: u16) {
        bochs_linux_modeset(&mut self.client, w, h, VRAM, 0);
    }

    /// Fills rows `y0..y1` of a `w`-wide XRGB8888 scanout with a pattern seeded by `seed`.
    fn draw(&self, w: u32, y0: u32, y1: u32, seed: u32) {
        let mut rows = Vec::with_capacity(((y1 - y0) * w * 4) as usize);
        for y in y0..y1 {
            for x in 0..w {
                let n = (x.wrapping_mul(31) ^ y.wrapping_mul(17)).wrapping_add(seed * 97);
                // Areas of one colour (fills), few colours (palettes) and noise.
                let (r, g, b) = if x < w / 3 {
                    (40, 60, (seed * 40) as u8)
                } else if x < 2 * w / 3 {
                    if (x / 8 + y / 16) % 2 == 0 {
                        (255, 255, 255)
                    } else {
                        (0, 0, (seed * 80) as u8)
                    }
                } else {
                    (n as u8, (n >> 5) as u8, (n >> 11) as u8)
                };
                rows.extend_from_slice(&[b, g, r, 0]);
            }
        }
        self.vram
            .as_volatile_slice()
            .write_slice(&rows, (y0 * w * 4) as usize)
            .unwrap();
    }
}

fn vnc_addr(served: &Served, head: usize) -> String {
    let s = served.status();
    let addr = s["heads"][head]["vnc"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!addr.is_empty(), "status names no VNC address: {s}");
    addr
}

const WAIT: Duration = Duration::from_secs(20);

/// `ADDR:PORT` of the web port, from head 0's noVNC URL in `status`.
fn web_host(status: &serde_json::Value) -> String {
    let url = status["heads"][0]["web"].as_str().unwrap_or_default();
    assert!(
        url.starts_with("http://"),
        "status names no web URL: {status}"
    );
    url["http://".len()..]
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn viewers_of_a_bochs_head_see_the_screenshot_after_full_and_incremental_updates_and_a_mode_change()
{
    let served = Served::start_args("EMU-64M", &["--vnc", "127.0.0.1:0"]);
    let addr = vnc_addr(&served, 0);
    let mut vmm = Vmm::attach(&served);
    vmm.mode(640, 480);
    vmm.draw(640, 0, 480, 1);

    // One viewer per encoding, all at once.
    let mut views: Vec<(&str, VncView)> = [
        ("raw", ::vnc::VncEncoding::Raw),
        ("zrle", ::vnc::VncEncoding::Zrle),
        ("tight", ::vnc::VncEncoding::Tight),
    ]
    .into_iter()
    .map(|(name, e)| (name, VncView::connect(&addr, e)))
    .collect();
    let shot = served.screenshot().unwrap();
    for (name, v) in &mut views {
        v.wait_for(&shot, WAIT)
            .unwrap_or_else(|e| panic!("{name}, full update: {e}"));
    }

    // One 16-row text line changes: an incremental update carries it.
    vmm.draw(640, 160, 176, 2);
    let shot2 = served.screenshot().unwrap();
    assert_ne!(shot, shot2);
    for (name, v) in &mut views {
        let before = v.rects;
        v.wait_for(&shot2, WAIT)
            .unwrap_or_else(|e| panic!("{name}, incremental update: {e}"));
        // Far fewer rectangles than a full repaint would take (Tight splits a full 640x480
        // frame into many).
        assert!(
            v.rects - before <= 64,
            "{name}: {} rectangles for one changed line",
            v.rects - before
        );
    }

    // The guest changes mode: DesktopSize, then the new image.
    vmm.mode(800, 600);
    vmm.draw(800, 0, 600, 3);
    let shot3 = served.screenshot().unwrap();
    assert_eq!((shot3.0, shot3.1), (800, 600));
    for (name, v) in &mut views {
        v.wait_for(&shot3, WAIT)
            .unwrap_or_else(|e| panic!("{name}, after the mode change: {e}"));
    }
    for (_, v) in views {
        v.close();
    }
    let log = served.log();
    assert!(log.contains("VNC on 127.0.0.1:"), "{log}");
    assert!(log.contains("viewer 127.0.0.1:"), "{log}");
}

/// A raw RFB 3.8 peer: just enough protocol to ask for Raw updates and read them.
struct RawPeer {
    s: TcpStream,
    w: u16,
    h: u16,
}

impl RawPeer {
    fn connect(addr: &str) -> RawPeer {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut v = [0u8; 12];
        s.read_exact(&mut v).unwrap();
        assert_eq!(&v, b"RFB 003.008\n");
        s.write_all(b"RFB 003.008\n").unwrap();
        let mut n = [0u8; 1];
        s.read_exact(&mut n).unwrap();
        let mut types = vec![0u8; usize::from(n[0])];
        s.read_exact(&mut types).unwrap();
        assert!(types.contains(&1), "security None offered: {types:?}");
        s.write_all(&[1]).unwrap();
        let mut result = [0u8; 4];
        s.read_exact(&mut result).unwrap();
        assert_eq!(result, [0; 4]);
        s.write_all(&[1]).unwrap();
        let mut init = [0u8; 24];
        s.read_exact(&mut init).unwrap();
        let name_len = u32::from_be_bytes(init[20..24].try_into().unwrap());
        let mut name = vec![0u8; name_len as usize];
        s.read_exact(&mut name).unwrap();
        assert!(String::from_utf8_lossy(&name).contains("head 0"));
        let w = u16::from_be_bytes([init[0], init[1]]);
        let h = u16::from_be_bytes([init[2], init[3]]);
        // SetEncodings: Raw only.
        s.write_all(&[2, 0, 0, 1, 0, 0, 0, 0]).unwrap();
        RawPeer { s, w, h }
    }

    fn request(&mut self, incremental: bool) {
        let mut m = vec![3, u8::from(incremental), 0, 0, 0, 0];
        m.extend_from_slice(&self.w.to_be_bytes());
        m.extend_from_slice(&self.h.to_be_bytes());
        self.s.write_all(&m).unwrap();
    }

    /// Reads one FramebufferUpdate of Raw rectangles; returns the pixels it covered.
    fn read_update(&mut self) -> usize {
        let mut hdr = [0u8; 4];
        self.s.read_exact(&mut hdr).unwrap();
        assert_eq!(hdr[0], 0, "FramebufferUpdate");
        let n = u16::from_be_bytes([hdr[2], hdr[3]]);
        let mut covered = 0;
        for _ in 0..n {
            let mut r = [0u8; 12];
            self.s.read_exact(&mut r).unwrap();
            let w = usize::from(u16::from_be_bytes([r[4], r[5]]));
            let h = usize::from(u16::from_be_bytes([r[6], r[7]]));
            assert_eq!(i32::from_be_bytes(r[8..12].try_into().unwrap()), 0, "Raw");
            let mut px = vec![0u8; w * h * 4];
            self.s.read_exact(&mut px).unwrap();
            covered += w * h;
        }
        covered
    }
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn sixty_four_viewers_at_once_each_get_the_whole_frame() {
    let served = Served::start_args("EMU-64M", &["--vnc", "127.0.0.1:0"]);
    let addr = vnc_addr(&served, 0);
    let mut vmm = Vmm::attach(&served);
    vmm.mode(320, 200);
    vmm.draw(320, 0, 200, 5);
    let mut peers: Vec<RawPeer> = (0..64).map(|_| RawPeer::connect(&addr)).collect();
    for p in &mut peers {
        p.request(false);
    }
    for (i, p) in peers.iter_mut().enumerate() {
        assert_eq!(p.read_update(), 320 * 200, "viewer {i}");
    }
    // And each keeps getting what changes.
    vmm.draw(320, 50, 60, 6);
    for p in &mut peers {
        p.request(true);
    }
    for (i, p) in peers.iter_mut().enumerate() {
        let px = p.read_update();
        assert!(
            (320..320 * 200).contains(&px),
            "viewer {i}: an incremental update of {px} pixels"
        );
    }
}

#[test]
fn a_viewer_that_stops_reading_holds_one_frame_and_the_others_keep_up() {
    let served = Served::start_args("EMU-64M", &["--vnc", "127.0.0.1:0"]);
    let addr = vnc_addr(&served, 0);
    let mut vmm = Vmm::attach(&served);
    let (w, h) = (1920u32, 1080u32);
    vmm.mode(w as u16, h as u16);
    vmm.draw(w, 0, h, 1);
    // Raw: this test is about the queue, not the encoders (which a debug build runs slowly at
    // 1080p).
    let mut good = VncView::connect(&addr, ::vnc::VncEncoding::Raw);
    good.wait_for(&served.screenshot().unwrap(), WAIT).unwrap();
    let base = rss_kib(served.pid());

    // A viewer that asks for Raw updates and never reads them: the server's output to it
    // fills the socket buffers and stops there.
    let mut stuck = RawPeer::connect(&addr);
    stuck.s.set_nonblocking(true).unwrap();
    for seed in 2..40u32 {
        vmm.draw(w, 0, h, seed);
        let mut m = vec![3, u8::from(seed > 2), 0, 0, 0, 0];
        m.extend_from_slice(&stuck.w.to_be_bytes());
        m.extend_from_slice(&stuck.h.to_be_bytes());
        let _ = stuck.s.write(&m);
        if seed % 8 == 0 {
            // The reading viewer still sees every change.
            good.wait_for(&served.screenshot().unwrap(), WAIT)
                .unwrap_or_else(|e| panic!("the reading viewer fell behind: {e}"));
        }
    }
    good.wait_for(&served.screenshot().unwrap(), WAIT).unwrap();
    let grown = rss_kib(served.pid()).saturating_sub(base);
    let frame_kib = u64::from(w * h * 4) / 1024;
    // The stuck viewer holds one encoded frame; the head's sample, its conversion and the
    // allocator's slack add a few more, transiently. One frame per request would be 38.
    assert!(
        grown < 8 * frame_kib,
        "memory grew {grown} KiB with a stalled viewer (one frame is {frame_kib} KiB)"
    );
    drop(stuck);
    good.close();
}

#[test]
fn malformed_viewers_are_closed_and_the_head_keeps_serving() {
    let served = Served::start_args("EMU-64M", &["--vnc", "127.0.0.1:0"]);
    let addr = vnc_addr(&served, 0);
    let mut vmm = Vmm::attach(&served);
    vmm.mode(320, 200);
    vmm.draw(320, 0, 200, 7);

    let closed = |mut s: TcpStream| {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut sink = Vec::new();
        // EOF (not a timeout) proves the server closed it.
        s.read_to_end(&mut sink)
            .expect("the server closes the connection");
        sink
    };
    // A wrong protocol version.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"HELLO 1.0\r\n\r\n").unwrap();
    closed(s);
    // An unknown message after the handshake: closed.
    let mut p = RawPeer::connect(&addr);
    p.s.write_all(&[0xee; 8]).unwrap();
    closed(p.s);
    // A SetEncodings of 65535 entries is read through (the first 64 count) and the viewer is
    // served as usual.
    let mut p = RawPeer::connect(&addr);
    p.s.write_all(&[2, 0, 0xff, 0xff]).unwrap();
    p.s.write_all(&vec![0u8; 4 * 65535]).unwrap();
    p.request(false);
    assert_eq!(p.read_update(), 320 * 200);
    // A clipboard text longer than the bound: closed.
    let mut p = RawPeer::connect(&addr);
    p.s.write_all(&[6, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff])
        .unwrap();
    closed(p.s);
    // Key and pointer events are read and dropped (view-only), not an error.
    let mut p = RawPeer::connect(&addr);
    p.s.write_all(&[4, 1, 0, 0, 0, 0, 0, 0x41]).unwrap();
    p.s.write_all(&[5, 1, 0, 10, 0, 10]).unwrap();
    p.request(false);
    assert_eq!(p.read_update(), 320 * 200);

    // Still serving.
    let mut v = VncView::connect(&addr, ::vnc::VncEncoding::Tight);
    v.wait_for(&served.screenshot().unwrap(), WAIT).unwrap();
    v.close();
}

#[test]
fn a_password_file_asks_viewers_for_vnc_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "hunter2\n").unwrap();
    let served = Served::start_args(
        "EMU-64M",
        &[
            "--vnc",
            "127.0.0.1:0",
            "--vnc-password-file",
            pw.to_str().unwrap(),
        ],
    );
    let addr = vnc_addr(&served, 0);
    let mut vmm = Vmm::attach(&served);
    vmm.mode(320, 200);
    vmm.draw(320, 0, 200, 8);
    let mut v = VncView::connect_with(&addr, ::vnc::VncEncoding::Zrle, "hunter2");
    v.wait_for(&served.screenshot().unwrap(), WAIT).unwrap();
    v.close();

    // A wrong password is refused by the server.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        ::vnc::VncConnector::new(tcp)
            .set_auth_method(async move { Ok("wrong".to_string()) })
            .add_encoding(::vnc::VncEncoding::Raw)
            .build()
            .unwrap()
            .try_start()
            .await
            .is_err()
    });
    assert!(refused, "a wrong password must be refused");

    // Only loopback may go without one.
    let out = std::process::Command::new(BIN)
        .args(["serve", "--vnc", "0.0.0.0:0", "--socket"])
        .arg(dir.path().join("x.sock"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("--vnc-password-file"),
        "{err}"
    );
}

/// GET `path` from `addr`; returns the status code and body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut r = Vec::new();
    s.read_to_end(&mut r).unwrap();
    let r = String::from_utf8_lossy(&r).into_owned();
    let code = r
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {r}"));
    let body = r
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

#[test]
fn the_web_port_lists_the_heads_serves_novnc_and_carries_rfb_over_websocket() {
    // A stand-in noVNC tree (the browser tier uses Debian's real one).
    let novnc = tempfile::tempdir().unwrap();
    std::fs::write(novnc.path().join("vnc.html"), "<html>noVNC</html>").unwrap();
    std::fs::create_dir(novnc.path().join("core")).unwrap();
    std::fs::write(novnc.path().join("core/rfb.js"), "export default 1;").unwrap();
    let served = Served::start_args(
        "EMU-64M",
        &[
            "--web",
            "127.0.0.1:0",
            "--novnc-dir",
            novnc.path().to_str().unwrap(),
        ],
    );
    let status = served.status();
    let uuid = status["uuid"].as_str().unwrap().to_string();
    let url = status["heads"][0]["web"].as_str().unwrap().to_string();
    assert!(
        url.starts_with("http://127.0.0.1:") && url.contains(&format!("ws/{uuid}/0")),
        "{url}"
    );
    assert_eq!(status["heads"][0]["vnc"], "", "no --vnc: no raw port");
    let host = web_host(&status);

    let (code, page) = http_get(&host, "/");
    assert_eq!(code, 200);
    assert!(page.contains(&uuid) && page.contains("EMU-64M@1"), "{page}");
    let (code, body) = http_get(&host, "/novnc/vnc.html");
    assert_eq!((code, body.as_str()), (200, "<html>noVNC</html>"));
    assert_eq!(http_get(&host, "/novnc/../Cargo.toml").0, 404);
    assert_eq!(http_get(&host, "/novnc/%2e%2e/x").0, 404);
    assert_eq!(
        http_get(&host, &format!("/ws/{uuid}/0")).0,
        426,
        "no upgrade"
    );
    assert_eq!(
        http_get(&host, &format!("/ws/{uuid}/1")).0,
        404,
        "no head 1"
    );

    let mut vmm = Vmm::attach(&served);
    vmm.mode(320, 200);
    vmm.draw(320, 0, 200, 9);

    // RFB over WebSocket, as noVNC speaks it (subprotocol "binary").
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{host}/ws/{uuid}/0"
    ))
    .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "binary".parse().unwrap());
    let (mut ws, resp) = tungstenite::connect(req).expect("WebSocket upgrade");
    assert_eq!(
        resp.headers().get("Sec-WebSocket-Protocol").unwrap(),
        "binary"
    );
    let mut inbox: Vec<u8> = Vec::new();
    let mut take = |ws: &mut tungstenite::WebSocket<_>, n: usize| -> Vec<u8> {
        while inbox.len() < n {
            match ws.read().unwrap() {
                tungstenite::Message::Binary(b) => inbox.extend_from_slice(&b),
                other => panic!("unexpected {other:?}"),
            }
        }
        inbox.drain(..n).collect()
    };
    let send = |ws: &mut tungstenite::WebSocket<_>, b: &[u8]| {
        ws.send(tungstenite::Message::binary(b.to_vec())).unwrap();
    };
    assert_eq!(take(&mut ws, 12), b"RFB 003.008\n");
    send(&mut ws, b"RFB 003.008\n");
    let n = take(&mut ws, 1)[0];
    assert!(take(&mut ws, usize::from(n)).contains(&1));
    send(&mut ws, &[1]);
    assert_eq!(take(&mut ws, 4), [0; 4]);
    send(&mut ws, &[1]);
    let init = take(&mut ws, 24);
    let name_len = u32::from_be_bytes(init[20..24].try_into().unwrap()) as usize;
    take(&mut ws, name_len);
    assert_eq!(&init[..4], &[1, 64, 0, 200], "320x200");
    send(&mut ws, &[2, 0, 0, 1, 0, 0, 0, 0]);
    send(&mut ws, &[3, 0, 0, 0, 0, 0, 1, 64, 0, 200]);
    let hdr = take(&mut ws, 4);
    assert_eq!(hdr[0], 0);
    let mut fb = vec![0u8; 320 * 200 * 3];
    for _ in 0..u16::from_be_bytes([hdr[2], hdr[3]]) {
        let r = take(&mut ws, 12);
        let (x, y) = (
            usize::from(u16::from_be_bytes([r[0], r[1]])),
            usize::from(u16::from_be_bytes([r[2], r[3]])),
        );
        let (w, h) = (
            usize::from(u16::from_be_bytes([r[4], r[5]])),
            usize::from(u16::from_be_bytes([r[6], r[7]])),
        );
        let px = take(&mut ws, w * h * 4);
        for j in 0..h {
            for i in 0..w {
                let s = (j * w + i) * 4;
                let d = ((y + j) * 320 + x + i) * 3;
                // The server's format: little-endian XRGB (B, G, R, X).
                fb[d..d + 3].copy_from_slice(&[px[s + 2], px[s + 1], px[s]]);
            }
        }
    }
    assert!(
        (320, 200, fb) == served.screenshot().unwrap(),
        "the WebSocket viewer's image differs from the screenshot"
    );
    let _ = ws.close(None);
}

#[test]
fn without_novnc_the_page_says_which_package_to_install() {
    let empty = tempfile::tempdir().unwrap();
    let served = Served::start_args(
        "EMU-64M",
        &[
            "--web",
            "127.0.0.1:0",
            "--vnc",
            "127.0.0.1:0",
            "--novnc-dir",
            empty.path().to_str().unwrap(),
        ],
    );
    let status = served.status();
    let host = &web_host(&status);
    let (code, page) = http_get(host, "/");
    assert_eq!(code, 200);
    assert!(
        page.contains("novnc") && page.contains("--novnc-dir"),
        "{page}"
    );
    assert!(
        page.contains(status["heads"][0]["vnc"].as_str().unwrap()),
        "the raw VNC port is listed: {page}"
    );
    let (code, body) = http_get(host, "/novnc/vnc.html");
    assert_eq!(code, 404);
    assert!(body.contains("novnc"), "{body}");
    assert!(served.log().contains("install Debian's `novnc` package"));
}

#[test]
#[ignore = "browser tier: provisions Chromium and noVNC into the cache; run by the README's full test command"]
fn novnc_in_a_browser_shows_the_head_the_screenshot_shows() {
    let mut browser = common::browser::Browser::launch();
    let novnc = browser.novnc_dir();
    let served = Served::start_args(
        "EMU-64M",
        &[
            "--web",
            "127.0.0.1:0",
            "--novnc-dir",
            novnc.to_str().unwrap(),
        ],
    );
    let mut vmm = Vmm::attach(&served);
    vmm.mode(640, 480);
    vmm.draw(640, 0, 480, 4);
    let status = served.status();
    let uuid = status["uuid"].as_str().unwrap();
    let root = format!("http://{}/", web_host(&status));

    // The page lists the head and links to its viewer.
    let mut page = browser.open(&root);
    page.set_viewport(1280, 1024);
    let href = page.eval(&format!(
        "[...document.querySelectorAll('a')].map(a => a.href).find(h => h.includes('ws/{uuid}/0')) || ''"
    ));
    let href = href.as_str().unwrap().to_string();
    assert!(href.contains("vnc.html"), "no viewer link on {root}");
    page.navigate(&href);
    let shot = || served.screenshot().unwrap();
    page.wait_novnc_shows(shot, WAIT, "first frame");
    // A changed line and a mode change reach the browser too.
    vmm.draw(640, 200, 216, 5);
    page.wait_novnc_shows(shot, WAIT, "incremental update");
    vmm.mode(800, 600);
    vmm.draw(800, 0, 600, 6);
    page.wait_novnc_shows(shot, WAIT, "after a mode change");
    let log = served.log();
    assert!(log.contains("viewer 127.0.0.1:"), "{log}");
}

#[test]
fn malformed_web_clients_are_refused_or_closed_and_the_port_keeps_serving() {
    let served = Served::start_args("EMU-64M", &["--web", "127.0.0.1:0"]);
    let status = served.status();
    let uuid = status["uuid"].as_str().unwrap().to_string();
    let host = web_host(&status);
    let raw = |request: &[u8]| -> String {
        let mut s = TcpStream::connect(&host).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(request).unwrap();
        let mut r = Vec::new();
        s.read_to_end(&mut r)
            .expect("the server answers and closes");
        String::from_utf8_lossy(&r).into_owned()
    };
    // Another site's page may not open a head (the browser sends its Origin).
    let cross = format!(
        "GET /ws/{uuid}/0 HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Origin: http://elsewhere.example\r\n\r\n"
    );
    assert!(raw(cross.as_bytes()).starts_with("HTTP/1.1 403"));
    // An endless header, a bad method, garbage.
    let mut long = format!("GET / HTTP/1.1\r\nHost: {host}\r\nX: ").into_bytes();
    long.extend(std::iter::repeat_n(b'a', 20_000));
    assert!(raw(&long).starts_with("HTTP/1.1 431"));
    assert!(raw(b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert!(
        raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n").starts_with("HTTP/1.1 400")
    );
    // A WebSocket viewer that sends text, or a wrong RFB version, is closed.
    for bad in [
        tungstenite::Message::text("hello"),
        tungstenite::Message::binary(b"HELLO 1.0\r\n\r\n".to_vec()),
    ] {
        let (mut ws, _) = tungstenite::connect(format!("ws://{host}/ws/{uuid}/0")).unwrap();
        let _ = ws.read().unwrap(); // the server's version
        ws.send(bad).unwrap();
        let closed = (0..10).any(|_| {
            matches!(
                ws.read(),
                Ok(tungstenite::Message::Close(_))
                    | Err(tungstenite::Error::ConnectionClosed)
                    | Err(tungstenite::Error::AlreadyClosed)
                    | Err(tungstenite::Error::Protocol(_))
                    | Err(tungstenite::Error::Io(_))
            )
        });
        assert!(closed, "the server closed the WebSocket");
    }
    // Still serving.
    assert_eq!(http_get(&host, "/").0, 200);
    let (code, json) = http_get(&host, "/heads.json");
    assert_eq!(code, 200);
    assert!(json.contains(&uuid), "{json}");
}

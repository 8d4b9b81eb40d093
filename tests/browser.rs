//! The browser tier's own check: headless Chromium (provisioned into the cache) loads a page
//! from a small HTTP server here, and the DevTools client reads its canvas back exactly.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::browser::{processes_naming, Browser};

/// Canvas size: odd, so that a row stride or a CSS size mistaken for the buffer's shows.
const W: u32 = 13;
const H: u32 = 7;
/// The canvas is shown at this many CSS pixels per pixel.
const SCALE: u32 = 8;

/// The pattern the page draws: every pixel distinct, all opaque.
fn pattern(x: u32, y: u32) -> [u8; 3] {
    [
        (x * 19 + y * 3) as u8,
        (y * 37 + 5) as u8,
        (255 - x * 11 - y * 17) as u8,
    ]
}

fn page_html() -> String {
    // The same pattern as `pattern`, drawn with putImageData once the page has loaded (a timer
    // later, so that `wait_for` has something to wait for).
    format!(
        r#"<!DOCTYPE html>
<html><head><title>browser tier</title>
<style>body {{ margin: 0; background: #fff; }}
#c {{ width: {cw}px; height: {ch}px; image-rendering: pixelated; display: block; }}</style>
</head><body><canvas id="c" width="{W}" height="{H}"></canvas>
<script>
setTimeout(() => {{
  const c = document.getElementById('c').getContext('2d');
  const img = c.createImageData({W}, {H});
  for (let y = 0; y < {H}; y++) for (let x = 0; x < {W}; x++) {{
    const i = (y * {W} + x) * 4;
    img.data[i] = (x * 19 + y * 3) & 255;
    img.data[i + 1] = (y * 37 + 5) & 255;
    img.data[i + 2] = (255 - x * 11 - y * 17) & 255;
    img.data[i + 3] = 255;
  }}
  c.putImageData(img, 0, 0);
  window.drawn = true;
}}, 100);
</script></body></html>"#,
        cw = W * SCALE,
        ch = H * SCALE,
    )
}

/// A one-page HTTP server on 127.0.0.1, stopped on drop.
struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(body: String) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let mut conn = match listener.accept() {
                    Ok((conn, _)) => conn,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(e) => panic!("accept: {e}"),
                };
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                // Read the request head; every path gets the page (a favicon too: harmless).
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Server {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
#[ignore = "browser tier: provisions Chromium and noVNC into the cache; run with --include-ignored"]
fn chromium_reads_back_a_canvas_exactly() {
    let started = Instant::now();
    let mut browser = Browser::launch();
    eprintln!("browser up in {:?}", started.elapsed());

    let novnc = browser.novnc_dir();
    for f in ["vnc.html", "core/rfb.js"] {
        assert!(novnc.join(f).is_file(), "{} lacks {f}", novnc.display());
    }
    for d in ["app", "vendor"] {
        assert!(novnc.join(d).is_dir(), "{} lacks {d}/", novnc.display());
    }

    let server = Server::start(page_html());
    let url = format!("http://127.0.0.1:{}/pattern.html", server.port);
    let mut page = browser.open(&url);
    assert_eq!(page.eval("document.title"), "browser tier");
    assert_eq!(page.eval("6 * 7"), 42);
    assert_eq!(
        page.eval("new Promise(r => setTimeout(() => r('later'), 20))"),
        "later"
    );
    assert!(page.try_eval("no_such_name").is_err());
    page.wait_for("window.drawn === true", Duration::from_secs(10));

    // The pixel buffer, not the 8x larger CSS box.
    let (w, h, rgb) = page.canvas_rgb("#c");
    assert_eq!((w, h), (W, H));
    let expected: Vec<u8> = (0..H)
        .flat_map(|y| (0..W).flat_map(move |x| pattern(x, y)))
        .collect();
    assert_eq!(rgb, expected, "the canvas differs from what the page drew");

    // A screenshot shows the same pixels, each as a SCALE x SCALE block.
    page.set_viewport(W * SCALE + 20, H * SCALE + 20);
    let png = page.screenshot_png();
    let (sw, sh, shot) = vgpu_emu::display::decode_png_rgb(&png).expect("screenshot PNG");
    assert_eq!((sw, sh), (W * SCALE + 20, H * SCALE + 20));
    for y in 0..H {
        for x in 0..W {
            let (px, py) = (x * SCALE + SCALE / 2, y * SCALE + SCALE / 2);
            let i = ((py * sw + px) * 3) as usize;
            assert_eq!(
                shot[i..i + 3],
                pattern(x, y),
                "screenshot pixel ({px}, {py}) is not canvas pixel ({x}, {y})"
            );
        }
    }

    // Navigating again loads a fresh document.
    page.navigate(&format!("http://127.0.0.1:{}/again.html", server.port));
    assert_eq!(page.eval("window.drawn === undefined"), true);
    page.wait_for("window.drawn", Duration::from_secs(10));
    assert_eq!(page.canvas_rgb("#c").2, expected);

    // A second page lives beside the first, and closes when dropped.
    let mut other = browser.open("about:blank");
    assert_eq!(other.eval("location.href"), "about:blank");
    let other_id = other.target_id().to_string();
    assert!(browser.page_ids().contains(&other_id));
    assert_eq!(page.eval("window.drawn"), true);
    drop(other);
    common::wait_until(Duration::from_secs(10), "the dropped page to close", || {
        !browser.page_ids().contains(&other_id)
    });

    // Dropping the browser ends every process it started.
    let home = browser.temp_dir().display().to_string();
    let port = browser.port();
    let running = processes_naming(&home);
    assert!(
        running.len() > 1,
        "expected Chromium and its helpers to run, found {running:?}"
    );
    drop(page);
    drop(browser);
    let left = processes_naming(&home);
    assert!(
        left.is_empty(),
        "Chromium processes {left:?} outlived the browser"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "Chromium still listens on {port}"
    );
    assert!(
        !std::path::Path::new(&home).exists(),
        "{home} was left behind"
    );
    eprintln!("done in {:?}", started.elapsed());
}

//! What a live viewer costs: the CPU of a `vgpu-emu serve --vnc` instance showing a static
//! 1920x1080 bochs console, with no viewer and with one viewer that always has an incremental
//! update request pending (as VNC viewers and noVNC do). Goals: 0 with none, under 3% of a
//! core with one at 1080p60. Run: `cargo bench --bench viewer`.
//!
//! bochs is the expensive case: its guest writes VRAM through a mapping, so the only way to
//! see a change is to sample and hash the scanout at the type's frame-rate limit (60 Hz for
//! EMU-64M). virtio-gpu heads copy nothing on a static screen (the guest's flushes say what
//! changed); the bench reports bochs.
//!
//! CPU is utime + stime of the server process (all threads) from /proc/PID/stat over a
//! measurement window, as a share of one core; the same window is measured idle first.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vfio_user::Client;
use vm_memory::{Bytes, MmapRegion, VolatileMemory};

const BIN: &str = env!("CARGO_BIN_EXE_vgpu-emu");
const WINDOW: Duration = Duration::from_secs(5);
const VRAM: u64 = 64 << 20;

struct Served(Child);
impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Share of one core `pid` used over `WINDOW` (while `during` runs, if given).
fn cpu_share(pid: u32, mut during: impl FnMut()) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let t0 = cpu_ticks(pid);
    let start = Instant::now();
    while start.elapsed() < WINDOW {
        during();
        std::thread::sleep(Duration::from_millis(20));
    }
    (cpu_ticks(pid) - t0) as f64 / hz / start.elapsed().as_secs_f64()
}

fn dispi(c: &mut Client, index: u64, value: u16) {
    c.region_write(2, 0x500 + 2 * index, &value.to_le_bytes())
        .unwrap();
}

/// A raw RFB 3.8 viewer (Raw encoding) that keeps one incremental request pending; returns
/// the stream after its first full update.
fn viewer(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut buf = [0u8; 64];
    s.read_exact(&mut buf[..12]).unwrap();
    s.write_all(b"RFB 003.008\n").unwrap();
    s.read_exact(&mut buf[..2]).unwrap();
    s.write_all(&[1]).unwrap();
    s.read_exact(&mut buf[..4]).unwrap();
    s.write_all(&[1]).unwrap();
    s.read_exact(&mut buf[..24]).unwrap();
    let name = u32::from_be_bytes(buf[20..24].try_into().unwrap()) as usize;
    let mut skip = vec![0u8; name];
    s.read_exact(&mut skip).unwrap();
    s.write_all(&[2, 0, 0, 1, 0, 0, 0, 0]).unwrap();
    let (w, h) = (1920u16, 1080u16);
    let mut req = vec![3, 0, 0, 0, 0, 0];
    req.extend_from_slice(&w.to_be_bytes());
    req.extend_from_slice(&h.to_be_bytes());
    s.write_all(&req).unwrap();
    // One full frame of Raw rectangles.
    let mut hdr = [0u8; 4];
    s.read_exact(&mut hdr).unwrap();
    for _ in 0..u16::from_be_bytes([hdr[2], hdr[3]]) {
        let mut r = [0u8; 12];
        s.read_exact(&mut r).unwrap();
        let px = usize::from(u16::from_be_bytes([r[4], r[5]]))
            * usize::from(u16::from_be_bytes([r[6], r[7]]));
        let mut data = vec![0u8; px * 4];
        s.read_exact(&mut data).unwrap();
    }
    req[1] = 1;
    s.write_all(&req).unwrap();
    s
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vgpu.sock");
    let child = Command::new(BIN)
        .args([
            "serve",
            "--type",
            "EMU-64M",
            "--vnc",
            "127.0.0.1:0",
            "--socket",
        ])
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let served = Served(child);
    let pid = served.0.id();
    let ctl = dir.path().join("vgpu.sock.ctl");
    let start = Instant::now();
    while !ctl.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = Client::new(&socket).unwrap();
    // bochs-drm's mode set: 1920x1080x32.
    c.region_write(2, 0x400 + 2, &[0x01]).unwrap();
    for (i, v) in [
        (4, 0),
        (3, 32),
        (1, 1920),
        (2, 1080),
        (5, 0),
        (6, 1920),
        (7, 8000),
    ] {
        dispi(&mut c, i, v);
    }
    dispi(&mut c, 4, 0x41);
    // A console: dark background, rows of glyph-like marks.
    let fd = c.region(0).unwrap().file_offset.as_ref().unwrap().clone();
    let vram = MmapRegion::<()>::from_file(fd, VRAM as usize).unwrap();
    let mut img = vec![0u8; 1920 * 1080 * 4];
    for (i, p) in img.chunks_exact_mut(4).enumerate() {
        let (x, y) = (i % 1920, i / 1920);
        let on =
            y % 16 < 12 && x % 8 < 6 && (x / 8 * 7 + y / 16 * 3) % 5 != 0 && (x * 3 + y) % 7 < 3;
        p.copy_from_slice(if on {
            &[0xaa, 0xaa, 0xaa, 0]
        } else {
            &[0x20, 0x10, 0x10, 0]
        });
    }
    vram.as_volatile_slice().write_slice(&img, 0).unwrap();

    let out = Command::new(BIN)
        .args(["status", "--json", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let addr = status["heads"][0]["vnc"].as_str().unwrap().to_string();
    assert!(status["heads"][0]["mode"]
        .as_str()
        .unwrap()
        .starts_with("1920x1080"));

    let none = cpu_share(pid, || {});
    let v = viewer(&addr);
    let first = cpu_share(pid, || {});
    let one = cpu_share(pid, || {});
    drop(v);
    std::thread::sleep(Duration::from_millis(200));
    let after = cpu_share(pid, || {});
    println!("vgpu-emu serve --type EMU-64M --vnc, static 1920x1080 console, sampled at 60 Hz:");
    println!(
        "  no viewer:                    {:5.2}% of a core (goal: 0)",
        none * 100.0
    );
    println!(
        "  one viewer, first {} s:         {:5.2}% of a core (the first second at 60 Hz)",
        WINDOW.as_secs(),
        first * 100.0
    );
    println!(
        "  one viewer, next {} s:          {:5.2}% of a core (goal: < 3%; 15 Hz once still)",
        WINDOW.as_secs(),
        one * 100.0
    );
    println!(
        "  after it left:                {:5.2}% of a core",
        after * 100.0
    );
}

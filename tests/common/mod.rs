//! Test fixture: a spawned `vgpu-emu serve`, readiness waits, and a raw vfio-user peer.
#![allow(dead_code)]

pub mod browser;
pub mod libvirt;
pub mod vnc;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_vgpu-emu");

/// Polls `cond` until it holds or `timeout` passes; panics with `what` on timeout.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::yield_now();
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The processes of this machine whose `/proc/PID` directory `keep` accepts.
pub fn processes_where(mut keep: impl FnMut(&Path) -> bool) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            keep(&e.path()).then_some(pid)
        })
        .collect()
}

/// Spawns `vgpu-emu daemon --root ROOT ARGS...` (log level `warn`) and returns once it printed
/// its readiness line (the tree is mounted, definitions started).
pub fn spawn_daemon(root: &Path, args: &[&str]) -> Child {
    use std::io::BufRead;
    let mut child = Command::new(BIN)
        .arg("daemon")
        .arg("--root")
        .arg(root)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the daemon");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("vgpu-emu daemon:"),
        "daemon did not come up: {line:?}"
    );
    child
}

/// Stops a spawned daemon (or server) with SIGTERM, a clean unmount, and reaps it.
pub fn terminate(child: &mut Child) {
    if child.try_wait().ok().flatten().is_none() {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
    }
}

/// Runs the provisioning script `script`, which prints `KEY=PATH` lines, and returns a lookup
/// of those paths that panics (naming the script and its output) on a key it did not print.
pub fn provisioned(script: &str) -> impl Fn(&str) -> PathBuf {
    fields_of(run_script(script), script)
}

/// The `KEY=PATH` lookup of [`provisioned`] over `out`, what `script` printed.
pub fn fields_of(out: String, script: &str) -> impl Fn(&str) -> PathBuf {
    let script = script.to_string();
    move |name: &str| -> PathBuf {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{script} printed no {name}= line:\n{out}"))
            .into()
    }
}

/// Runs `qemu-scripts/SCRIPT` (a provisioning script), asserts it succeeded, and returns its
/// trimmed stdout (what it provisioned).
pub fn run_script(script: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("qemu-scripts")
        .join(script);
    let out = Command::new(&path)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "qemu-scripts/{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs `vgpu-emu ARGS...`, asserts it succeeded, and returns its stdout.
/// Spawns `cmd` (stdin closed, stdout piped) and waits for its readiness line, which must start
/// with `ready`. Returns the child and that line.
pub fn spawn_ready(cmd: &mut Command, ready: &str) -> (Child, String) {
    use std::io::BufRead;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with(ready), "{cmd:?} did not come up: {line:?}");
    (child, line)
}

pub fn vgpu_emu_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    assert!(
        out.status.success(),
        "vgpu-emu {shown:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A running `vgpu-emu serve`, killed on drop.
pub struct Served {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl Served {
    /// Starts `vgpu-emu serve --type TYPE` on a fresh socket and waits until it listens.
    pub fn start(ty: &str) -> Served {
        Served::start_with(ty, None, &[])
    }

    /// Like [`Served::start_logged`], with more `serve` arguments.
    pub fn start_args(ty: &str, args: &[&str]) -> Served {
        Served::start_with(ty, Some("info"), args)
    }

    /// Like [`Served::start_logged`], on the socket `socket` (where another party must find
    /// it).
    pub fn start_on(ty: &str, socket: &Path) -> Served {
        Served::start_in(ty, Some("info"), &[], Some(socket))
    }

    /// Like [`Served::start`], with the server's log at `info` written to [`Served::log`].
    pub fn start_logged(ty: &str) -> Served {
        Served::start_with(ty, Some("info"), &[])
    }

    /// The server's log (with [`Served::start_logged`]).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn start_with(ty: &str, log: Option<&str>, args: &[&str]) -> Served {
        Served::start_in(ty, log, args, None)
    }

    fn start_in(ty: &str, log: Option<&str>, args: &[&str], socket: Option<&Path>) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let socket = socket.map_or_else(|| dir.path().join("vgpu.sock"), Path::to_path_buf);
        let level = match log {
            Some(level) => level.to_string(),
            None => std::env::var("VGPU_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        };
        let stderr = match log {
            Some(_) => Stdio::from(std::fs::File::create(dir.path().join("server.log")).unwrap()),
            None => Stdio::inherit(),
        };
        let child = Command::new(BIN)
            .args(["serve", "--type", ty, "--socket"])
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", level)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn vgpu-emu");
        let ctl = ctl_path(&socket);
        let mut served = Served { child, dir, socket };
        let pid = served.pid();
        wait_until(Duration::from_secs(20), "the server to listen", || {
            if let Ok(Some(status)) = served.child.try_wait() {
                panic!("vgpu-emu (pid {pid}) exited early: {status}");
            }
            ctl.exists() && UnixStream::connect(&ctl).is_ok()
        });
        served
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open descriptors of the server process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Asserts the server process is still running.
    pub fn assert_alive(&mut self) {
        assert!(self.child.try_wait().unwrap().is_none(), "vgpu-emu died");
    }

    /// Runs `vgpu-emu ARGS... --socket SOCKET`.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .unwrap()
    }

    /// `vgpu-emu status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `vgpu-emu screenshot` decoded to (width, height, RGB).
    pub fn screenshot(&self) -> Result<(u32, u32, Vec<u8>), String> {
        self.screenshot_head(0)
    }

    /// `vgpu-emu screenshot --head HEAD` decoded to (width, height, RGB).
    pub fn screenshot_head(&self, head: u32) -> Result<(u32, u32, Vec<u8>), String> {
        let png = self.dir.path().join("shot.png");
        let out = Command::new(BIN)
            .args(["screenshot", "--head", &head.to_string(), "--socket"])
            .arg(&self.socket)
            .arg("-o")
            .arg(&png)
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let bytes = std::fs::read(&png).unwrap();
        Ok(vgpu_emu::display::decode_png_rgb(&bytes).unwrap())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Linux bochs-drm's mode set (bochs_hw_setmode) for `w` x `h` at 32 bpp in a VRAM of `vram`
/// bytes, then its setbase at `fb_offset`, through the `vfio_user` crate's client.
pub fn bochs_linux_modeset(c: &mut vfio_user::Client, w: u16, h: u16, vram: u64, fb_offset: u64) {
    const BAR2: u32 = 2;
    let dispi = |c: &mut vfio_user::Client, index: u64, value: u16| {
        c.region_write(BAR2, 0x500 + 2 * index, &value.to_le_bytes())
            .unwrap();
    };
    c.region_write(BAR2, 0x400 + 2, &[0x01]).unwrap();
    let mut b = [0u8; 1];
    c.region_read(BAR2, 0x400 + 0x1a, &mut b).unwrap();
    c.region_write(BAR2, 0x400, &[0x20]).unwrap();
    let stride = u64::from(w) * 4;
    for (i, v) in [
        (4, 0),
        (3, 32),
        (1, w),
        (2, h),
        (5, 0),
        (6, w),
        (7, (vram / stride).min(0xffff) as u16),
        (8, 0),
        (9, 0),
        (4, 0x41),
    ] {
        dispi(c, i, v);
    }
    c.region_write(BAR2, 0x604, &0x1e1e_1e1eu32.to_le_bytes())
        .unwrap();
    dispi(c, 6, (stride / 4) as u16);
    dispi(c, 8, ((fb_offset % stride) / 4) as u16);
    dispi(c, 9, (fb_offset / stride) as u16);
}

pub fn ctl_path(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".ctl");
    PathBuf::from(s)
}

// ---- A raw vfio-user peer: builds messages byte by byte, independent of the server's structs.

pub const VERSION: u16 = 1;
pub const DMA_MAP: u16 = 2;
pub const DMA_UNMAP: u16 = 3;
pub const GET_INFO: u16 = 4;
pub const GET_REGION_INFO: u16 = 5;
pub const GET_IRQ_INFO: u16 = 7;
pub const SET_IRQS: u16 = 8;
pub const REGION_READ: u16 = 9;
pub const REGION_WRITE: u16 = 10;
pub const RESET: u16 = 13;
pub const NO_REPLY: u32 = 1 << 4;
pub const ERROR: u32 = 1 << 5;

/// A reply as read off the wire.
#[derive(Debug)]
pub struct Reply {
    pub id: u16,
    pub command: u16,
    pub flags: u32,
    pub errno: u32,
    pub payload: Vec<u8>,
}

impl Reply {
    /// From a 16-byte header and the payload.
    pub fn new(h: &[u8], payload: Vec<u8>) -> Reply {
        Reply {
            id: u16::from_le_bytes([h[0], h[1]]),
            command: u16::from_le_bytes([h[2], h[3]]),
            flags: u32::from_le_bytes(h[8..12].try_into().unwrap()),
            errno: u32::from_le_bytes(h[12..16].try_into().unwrap()),
            payload,
        }
    }

    pub fn is_error(&self) -> bool {
        self.flags & ERROR != 0
    }
}

pub fn message(id: u16, command: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + payload.len());
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&command.to_le_bytes());
    m.extend_from_slice(&((16 + payload.len()) as u32).to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(payload);
    m
}

pub fn region_access(region: u32, offset: u64, count: u32) -> Vec<u8> {
    let mut p = offset.to_le_bytes().to_vec();
    p.extend_from_slice(&region.to_le_bytes());
    p.extend_from_slice(&count.to_le_bytes());
    p
}

pub fn version_payload(json: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 0, 0, 0];
    p.extend_from_slice(json);
    p
}

/// QEMU 10.1's VERSION JSON.
pub const QEMU_CAPS: &str = r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"migration":{"pgsize":4096,"max_bitmap_size":268435456},"write_multiple":true}}"#;

pub struct Peer {
    pub stream: UnixStream,
    next_id: u16,
}

impl Peer {
    pub fn connect(socket: &Path) -> Peer {
        let stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Peer {
            stream,
            next_id: 100,
        }
    }

    /// Connects and negotiates like QEMU.
    pub fn negotiated(socket: &Path) -> Peer {
        let mut p = Peer::connect(socket);
        let mut json = QEMU_CAPS.as_bytes().to_vec();
        json.push(0);
        let r = p.call(VERSION, &version_payload(&json));
        assert!(!r.is_error(), "VERSION failed: {r:?}");
        p
    }

    pub fn next_id(&mut self) -> u16 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends `bytes` with `fds` in one sendmsg, with no limit on the count (to test limits).
    pub fn send_with_fds(&mut self, bytes: &[u8], fds: &[RawFd]) {
        let n = vgpu_emu::scm::send_fds_unlimited(self.stream.as_raw_fd(), bytes, fds).unwrap();
        assert_eq!(n, bytes.len());
    }

    pub fn read_reply(&mut self) -> Reply {
        self.try_read_reply().expect("a reply")
    }

    /// A reply, or None when the server closed the connection.
    pub fn try_read_reply(&mut self) -> Option<Reply> {
        let mut h = [0u8; 16];
        if self.stream.read_exact(&mut h).is_err() {
            return None;
        }
        let size = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        assert!(size >= 16, "reply size {size}");
        let mut payload = vec![0; size - 16];
        self.stream.read_exact(&mut payload).unwrap();
        Some(Reply::new(&h, payload))
    }

    /// A reply with the descriptors that came with it.
    pub fn read_reply_with_fds(&mut self) -> (Reply, Vec<std::os::fd::OwnedFd>) {
        let mut buf = vec![0u8; 4096];
        let mut have = 0;
        let mut fds = Vec::new();
        loop {
            let got =
                vgpu_emu::scm::recv_with_fds(self.stream.as_raw_fd(), &mut buf[have..]).unwrap();
            assert!(got.len > 0, "server closed");
            fds.extend(got.fds);
            have += got.len;
            if have >= 16 {
                let size = u32::from_le_bytes(buf[4..8].try_into().unwrap()) as usize;
                if have >= size {
                    return (Reply::new(&buf[..16], buf[16..size].to_vec()), fds);
                }
            }
        }
    }

    /// Sends a command and reads its reply, checking the id matches.
    pub fn call(&mut self, command: u16, payload: &[u8]) -> Reply {
        self.call_fds(command, payload, &[])
    }

    pub fn call_fds(&mut self, command: u16, payload: &[u8], fds: &[RawFd]) -> Reply {
        let id = self.next_id();
        self.send_with_fds(&message(id, command, 0, payload), fds);
        let r = self.read_reply();
        assert_eq!((r.id, r.command), (id, command), "reply matches request");
        r
    }

    /// Expects an error reply with `errno`.
    pub fn expect_errno(&mut self, command: u16, payload: &[u8], fds: &[RawFd], errno: i32) {
        let r = self.call_fds(command, payload, fds);
        assert!(r.is_error(), "expected errno {errno}, got success {r:?}");
        assert_eq!(r.errno, errno as u32, "{r:?}");
    }

    /// True once the server has closed the connection.
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0))
    }

    /// A DISPI register read (2 bytes at BAR2 0x500 + index * 2).
    pub fn dispi(&mut self, index: u64) -> u16 {
        let r = self.call(REGION_READ, &region_access(2, 0x500 + 2 * index, 2));
        assert!(!r.is_error(), "{r:?}");
        u16::from_le_bytes([r.payload[16], r.payload[17]])
    }

    pub fn set_dispi(&mut self, index: u64, value: u16) {
        let mut p = region_access(2, 0x500 + 2 * index, 2);
        p.extend_from_slice(&value.to_le_bytes());
        let r = self.call(REGION_WRITE, &p);
        assert!(!r.is_error(), "{r:?}");
    }
}

/// An eventfd owned by the test.
pub fn eventfd() -> std::os::fd::OwnedFd {
    vgpu_emu::irq::new_eventfd(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK).unwrap()
}

/// Reads and resets an eventfd counter (0 when not signalled).
pub fn eventfd_take(fd: &std::os::fd::OwnedFd) -> u64 {
    let mut v = [0u8; 8];
    // SAFETY: reads 8 bytes into a live buffer from a descriptor we own.
    let n = unsafe { libc::read(fd.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
    if n == 8 {
        u64::from_ne_bytes(v)
    } else {
        0
    }
}

//! Guest tier: QEMU (10.1+, provisioned by qemu-scripts) boots a stock Debian Linux guest whose
//! stock `bochs` DRM driver drives a vgpu-emu instance over vfio-user. The guest's /init
//! (qemu-scripts/guest-init) reports on the serial console; the host asserts on that and on
//! screenshots taken from the instance. Every wait is on a line or a condition, never a sleep.
//!
//! These tests boot real guests (about 6 s each under TCG here) and need QEMU and a guest image
//! that qemu-scripts download once into the cache; they are `#[ignore]`d so `cargo test` stays
//! quick, and the README's full test command (`cargo test --workspace -- --include-ignored`,
//! which .ci/run runs) includes them.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use vgpu_model::catalog::{Catalog, Resolution};
use vgpu_model::pci::VendorCapability;

const GUEST: &str = "boots a Linux guest under QEMU; run by the README's full test command";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu-scripts")
}

/// Provisions QEMU and the guest image once per test process (minutes the first time on a
/// machine, then cached outside the repository).
fn provisioned() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        run_script("provision-qemu");
        run_script("build-guest");
    });
}

/// A booted guest: its QEMU process and the lines of its serial console.
struct Guest {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    /// Every console line so far, for diagnostics and queries.
    log: Arc<Mutex<Vec<String>>>,
    /// The "VGPU:" lines of the current boot.
    report: Vec<String>,
}

impl Guest {
    fn boot(args: &[&str]) -> Guest {
        provisioned();
        let mut child = Command::new(scripts().join("run-guest"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start run-guest");
        let (tx, lines) = channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let (tx, log) = (tx.clone(), log.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                    let line = String::from_utf8_lossy(&line)
                        .trim_end_matches('\r')
                        .to_string();
                    log.lock().unwrap().push(line.clone());
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stdin = child.stdin.take().unwrap();
        let mut g = Guest {
            child,
            stdin,
            lines,
            log,
            report: Vec::new(),
        };
        g.expect("ready");
        g
    }

    fn console(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for the line `VGPU: <what>...`; keeps every VGPU line of the boot.
    fn expect(&mut self, what: &str) -> String {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let prefix = format!("VGPU: {what}");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(i) = line.find("VGPU: ") {
                        let line = line[i..].to_string();
                        if line.starts_with("VGPU: boot ") {
                            self.report.clear();
                        }
                        self.report.push(line.clone());
                        if line.starts_with(&prefix) {
                            return line;
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no `{prefix}` within {BOOT_TIMEOUT:?}; console:\n{}",
                        self.console()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "QEMU exited before `{prefix}`; console:\n{}",
                        self.console()
                    )
                }
            }
        }
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").expect("guest console");
    }

    /// The report line starting with `VGPU: <key> `.
    fn line(&self, key: &str) -> &str {
        let prefix = format!("VGPU: {key} ");
        self.report
            .iter()
            .find(|l| l.starts_with(&prefix))
            .map(|l| &l[prefix.len()..])
            .unwrap_or_else(|| panic!("no `{prefix}` line; console:\n{}", self.console()))
    }

    fn lines_of(&self, key: &str) -> Vec<&str> {
        let prefix = format!("VGPU: {key} ");
        self.report
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix))
            .collect()
    }

    /// Waits for a console line (any, not only the report) containing `text`.
    fn expect_output(&mut self, text: &str) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) && !line.contains("echo") => return,
                Ok(_) => {}
                Err(_) => panic!("no `{text}` on the console:\n{}", self.console()),
            }
        }
    }

    fn poweroff(self) {
        self.power_off_with("poweroff");
    }

    /// Sends `command` and waits for QEMU to exit cleanly.
    fn power_off_with(mut self, command: &str) {
        self.send(command);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "QEMU exited with {status}; console:\n{}",
                    self.console()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "QEMU did not power off; console:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fields(s: &str) -> HashMap<&str, &str> {
    s.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect()
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

fn resolution(s: &str) -> Resolution {
    let (w, h) = s.split_once('x').unwrap();
    let h = h.trim_end_matches(|c: char| !c.is_ascii_digit());
    Resolution::new(w.parse().unwrap(), h.parse().unwrap())
}

/// Boots a guest on `ty` and checks enumeration and the driver against the type.
fn enumerates_and_binds(ty_name: &str) {
    let catalog = Catalog::builtin().unwrap();
    let ty = catalog.resolve(ty_name).unwrap();
    let served = Served::start(ty_name);
    let guest = Guest::boot(&["--socket", served.socket.to_str().unwrap()]);

    // 1. Enumeration.
    let pci = fields(guest.line("pci"));
    assert_eq!(pci["vendor"], "0x1234");
    assert_eq!(pci["device"], "0x1111");
    assert_eq!(
        pci["subsystem_vendor"],
        format!("{:#06x}", ty.pci.subsystem_vendor)
    );
    assert_eq!(
        pci["subsystem_device"],
        format!("{:#06x}", ty.pci.subsystem_device)
    );
    assert_eq!(pci["class"], "0x038000");
    assert_eq!(pci["revision"], "0x02");
    assert_eq!(pci["driver"], "bochs-drm");
    let bars: HashMap<&str, HashMap<&str, &str>> = guest
        .lines_of("bar")
        .into_iter()
        .map(|l| (l.split_whitespace().next().unwrap(), fields(l)))
        .collect();
    assert_eq!(
        bars["0"]["size"],
        ty.framebuffer.to_string(),
        "BAR0 is the VRAM BAR"
    );
    assert_eq!(bars["2"]["size"], "4096", "BAR2 is the register BAR");
    let config = hex_bytes(guest.line("config"));
    assert_eq!(
        VendorCapability::find(&config),
        Some((ty.name.clone(), ty.version))
    );

    // 2. Driver: bochs binds with our EDID; the default resolution comes first, nothing above
    // the maximum.
    let dmesg = guest.lines_of("dmesg").join("\n");
    assert!(dmesg.contains("Found bochs VGA, ID 0xb0c5"), "{dmesg}");
    assert!(dmesg.contains("Found EDID data blob"), "{dmesg}");
    let connector = fields(guest.line("connector"));
    assert_eq!(connector["status"], "connected");
    let modes: Vec<Resolution> = connector["modes"]
        .split(',')
        .filter(|m| !m.is_empty())
        .map(resolution)
        .collect();
    assert_eq!(
        modes[0], ty.default_resolution,
        "preferred mode first: {modes:?}"
    );
    assert!(
        modes.iter().all(|m| m.fits_within(ty.max_resolution)),
        "{modes:?} above {}",
        ty.max_resolution
    );
    assert!(modes.contains(&ty.max_resolution), "{modes:?}");
    guest.poweroff();
}

#[test]
#[ignore = "boots a Linux guest under QEMU; run by the README's full test command"]
fn emu_16m_enumerates_and_binds_bochs() {
    enumerates_and_binds("EMU-16M");
}

#[test]
#[ignore = "boots a Linux guest under QEMU; run by the README's full test command"]
fn emu_1g_with_a_64bit_bar_enumerates_and_binds_bochs() {
    enumerates_and_binds("EMU-1G");
}

/// Reads a binary PPM (P6, maxval 255) as (width, height, RGB).
fn read_ppm(path: &Path) -> (u32, u32, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let mut fields = Vec::new();
    let mut i = 0;
    while fields.len() < 4 {
        while bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        while !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        fields.push(String::from_utf8_lossy(&bytes[start..i]).into_owned());
    }
    assert_eq!((fields[0].as_str(), fields[3].as_str()), ("P6", "255"));
    let (w, h): (u32, u32) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
    (w, h, bytes[i + 1..].to_vec())
}

/// One HMP command over a monitor socket; returns once the next prompt arrives.
fn hmp(socket: &Path, command: &str) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut prompt = |s: &mut UnixStream, buf: &mut Vec<u8>| {
        while !String::from_utf8_lossy(buf).contains("(qemu) ") {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "monitor closed");
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.clear();
    };
    prompt(&mut s, &mut buf);
    writeln!(s, "{command}").unwrap();
    prompt(&mut s, &mut buf);
}

fn lit_pixels(rgb: &[u8]) -> usize {
    rgb.chunks_exact(3)
        .filter(|p| p.iter().any(|&c| c > 0x20))
        .count()
}

/// Waits until the instance's screenshot shows the guest's console text.
fn wait_for_text(served: &Served, what: &str) {
    wait_until(Duration::from_secs(60), what, || {
        served
            .screenshot()
            .is_ok_and(|(_, _, rgb)| lit_pixels(&rgb) > 1000)
    });
}

#[test]
#[ignore = "boots a Linux guest under QEMU; run by the README's full test command"]
fn console_text_matches_qemus_own_bochs_display_pixel_for_pixel() {
    // The oracle: the same guest on QEMU's in-process bochs-display, dumped by QEMU itself.
    let dir = tempfile::tempdir().unwrap();
    let monitor = dir.path().join("monitor.sock");
    let monitor_arg = format!("unix:{},server=on,wait=off", monitor.display());
    let mut oracle = Guest::boot(&[
        "--bochs-display",
        "--mode",
        "1024x768",
        "--",
        "-monitor",
        &monitor_arg,
    ]);
    oracle.send("draw");
    oracle.expect("drawn");
    let dump = dir.path().join("oracle.ppm");
    let mut expected: Option<(u32, u32, Vec<u8>)> = None;
    wait_until(
        Duration::from_secs(60),
        "QEMU's bochs-display to show the text",
        || {
            hmp(&monitor, &format!("screendump {}", dump.display()));
            let now = read_ppm(&dump);
            let stable = expected.as_ref() == Some(&now) && lit_pixels(&now.2) > 1000;
            expected = Some(now);
            stable
        },
    );
    oracle.poweroff();
    let (ew, eh, expected) = expected.unwrap();
    assert_eq!((ew, eh), (1024, 768));

    // The same guest on a vgpu-emu instance, captured by `vgpu-emu screenshot`.
    let served = Served::start("EMU-64M");
    let mut guest = Guest::boot(&[
        "--socket",
        served.socket.to_str().unwrap(),
        "--mode",
        "1024x768",
    ]);
    guest.send("draw");
    guest.expect("drawn");
    let mut last = None;
    wait_until(
        Duration::from_secs(60),
        "the screenshot to equal QEMU's rendering",
        || {
            let shot = served.screenshot().ok();
            let equal = shot
                .as_ref()
                .is_some_and(|(w, h, rgb)| (*w, *h) == (ew, eh) && *rgb == expected);
            last = shot;
            equal
        },
    );
    let (_, _, rgb) = last.unwrap();
    std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-console.png"),
        vgpu_emu::display::encode_png(&vgpu_model::Frame {
            width: ew,
            height: eh,
            format: vgpu_model::PixelFormat::Xrgb8888,
            data: rgb
                .chunks_exact(3)
                .flat_map(|p| [p[2], p[1], p[0], 0])
                .collect(),
        })
        .unwrap(),
    )
    .unwrap();
    let status = served.status();
    assert!(
        status["heads"][0]["mode"]
            .as_str()
            .unwrap()
            .starts_with("1024x768 XRGB8888"),
        "{status}"
    );
    guest.poweroff();
}

#[test]
#[ignore = "boots a Linux guest under QEMU; run by the README's full test command"]
fn reboot_resets_the_device_and_the_console_lights_up_again() {
    let served = Served::start("EMU-16M");
    let mut guest = Guest::boot(&["--socket", served.socket.to_str().unwrap()]);
    let resets_first_boot = served.status()["accesses"]["resets"].as_u64().unwrap();
    assert!(resets_first_boot >= 1, "QEMU resets the device at VM start");
    guest.send("reboot");
    guest.expect("rebooting");
    guest.expect("boot");
    guest.expect("ready");
    assert_eq!(fields(guest.line("pci"))["driver"], "bochs-drm");
    assert_eq!(fields(guest.line("connector"))["status"], "connected");
    assert!(
        served.status()["accesses"]["resets"].as_u64().unwrap() > resets_first_boot,
        "DEVICE_RESET on reboot"
    );
    guest.send("draw");
    guest.expect("drawn");
    wait_for_text(&served, "text on the console after the reboot");
    guest.poweroff();
}

#[test]
#[ignore = "boots a Linux guest under QEMU; run by the README's full test command"]
fn an_instance_survives_its_qemu_being_killed() {
    let served = Served::start("EMU-16M");
    let mut first = Guest::boot(&["--socket", served.socket.to_str().unwrap()]);
    first.send("draw");
    first.expect("drawn");
    // SIGKILL: no orderly disconnect.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    wait_until(
        Duration::from_secs(10),
        "the instance to see the client gone",
        || served.status()["client_connected"] == false,
    );
    let mut second = Guest::boot(&["--socket", served.socket.to_str().unwrap()]);
    assert_eq!(fields(second.line("pci"))["driver"], "bochs-drm");
    second.send("draw");
    second.expect("drawn");
    wait_for_text(&served, "text from the second guest");
    assert_eq!(served.status()["server"]["connections"], 2);
    second.poweroff();
}

#[test]
#[ignore = "boots a Linux guest under QEMU; run by the README's full test command"]
fn two_guests_see_separate_vram() {
    let (a, b) = (Served::start("EMU-16M"), Served::start("EMU-16M"));
    let mut ga = Guest::boot(&["--socket", a.socket.to_str().unwrap()]);
    let mut gb = Guest::boot(&["--socket", b.socket.to_str().unwrap()]);
    ga.send("draw");
    ga.expect("drawn");
    wait_for_text(&a, "text in A");
    let (_, _, shot_b) = b.screenshot().expect("B displays its (empty) console");
    assert_eq!(lit_pixels(&shot_b), 0, "B's VRAM holds none of A's text");
    let (_, _, shot_a) = a.screenshot().unwrap();
    gb.send("draw");
    gb.expect("drawn");
    wait_for_text(&b, "text in B");
    assert_eq!(
        a.screenshot().unwrap().2,
        shot_a,
        "A is untouched by B's drawing"
    );
    ga.poweroff();
    gb.poweroff();
}

/// The gating itself, read from the sources: every test here that boots a guest is ignored with
/// the reason that names the README's full test command, that command runs ignored tests, and
/// .ci/run runs exactly that command.
#[test]
fn guest_tests_are_gated_with_the_documented_reason() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(root.join("tests/guest.rs")).unwrap();
    let ignore = format!("#[ignore = \"{GUEST}\"]");
    // Functions that boot a guest, directly or through a helper that does.
    let fns: Vec<(&str, &str)> = source
        .split("\nfn ")
        .skip(1)
        .filter_map(|f| Some((f.split('(').next()?, f)))
        .collect();
    let mut boots: Vec<&str> = vec!["Guest::boot"];
    loop {
        let more: Vec<&str> = fns
            .iter()
            .filter(|(name, body)| {
                !boots.contains(name) && boots.iter().any(|b| body.contains(&format!("{b}(")))
            })
            .map(|(name, _)| *name)
            .collect();
        if more.is_empty() {
            break;
        }
        boots.extend(more);
    }
    let mut booting = 0;
    // Each test function: the attributes before `fn`, then its name.
    for chunk in source.split("#[test]\n").skip(1) {
        let (attrs, body) = chunk.split_once("fn ").unwrap();
        let name = body.split('(').next().unwrap();
        if boots.contains(&name) {
            booting += 1;
            assert!(
                attrs.trim() == ignore,
                "{name} boots a guest but is not gated with {ignore:?}"
            );
        } else {
            assert!(
                !attrs.contains("#[ignore"),
                "{name} boots nothing yet is ignored"
            );
        }
    }
    assert!(booting >= 5, "found only {booting} guest-booting tests");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let command = "cargo test --workspace -- --include-ignored";
    assert!(readme.contains(command), "the README's full test command");
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(
        ci.lines()
            .any(|l| l.trim().starts_with("cargo test --workspace")
                && l.trim().ends_with("-- --include-ignored")),
        ".ci/run runs the README's command"
    );
}

#[test]
#[ignore = "boots a Linux guest under QEMU; run by the README's full test command"]
fn a_guest_boots_on_an_instance_created_through_the_mdev_tree() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, _) = spawn_ready(
        Command::new(BIN)
            .arg("daemon")
            .arg("--root")
            .arg(dir.path())
            .env("RUST_LOG", "warn"),
        "vgpu-emu daemon:",
    );
    // As the kernel's mdev interface (and mdevctl) would: write a UUID to the type's `create`.
    let uuid = "33333333-0000-4000-8000-000000000001";
    let sys = dir.path().join("sys");
    std::fs::write(
        sys.join("class/mdev_bus/emu0/mdev_supported_types/vgpu_emu-emu_256m-v1/create"),
        uuid,
    )
    .unwrap();
    let socket = sys.join(format!("bus/mdev/devices/{uuid}/vfio-user.sock"));
    let guest = Guest::boot(&["--socket", socket.to_str().unwrap()]);
    let pci = fields(guest.line("pci"));
    assert_eq!(
        (pci["driver"], pci["subsystem_device"]),
        ("bochs-drm", "0x1003"),
        "EMU-256M's identity"
    );
    let modes = fields(guest.line("connector"))["modes"].to_string();
    assert!(modes.starts_with("1920x1080,"), "{modes}");
    guest.poweroff();
    std::fs::write(sys.join(format!("bus/mdev/devices/{uuid}/remove")), "1").unwrap();
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success(), "the daemon stops cleanly");
}

/// A child process that is stopped (SIGTERM, then waited for) when the test ends, failed or not:
/// a daemon left running would keep its tree mounted.
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Removing an instance under a running guest, as `mdevctl stop` does: the device is not
/// yanked from under the guest. The daemon asks the client to release it (the request
/// interrupt, which QEMU 11's vfio-user-pci does not take: the log says so) and waits; when the
/// VM lets go (here: `device_del`, as libvirt detaches a device), QEMU unplugs it from the
/// guest, disconnects, and the removal completes.
#[test]
#[ignore = "boots a Linux guest under QEMU; run by the README's full test command"]
fn removing_an_instance_waits_for_the_running_guest_to_release_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Stopped(
        Command::new(BIN)
            .arg("daemon")
            .arg("--root")
            .arg(dir.path())
            .args(["--release-timeout", "120"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut ready = String::new();
    BufReader::new(daemon.0.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert!(ready.starts_with("vgpu-emu daemon:"), "{ready:?}");
    let log = Arc::new(Mutex::new(String::new()));
    {
        let (log, stderr) = (log.clone(), daemon.0.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
    }
    let uuid = "33333333-0000-4000-8000-000000000002";
    let sys = dir.path().join("sys");
    std::fs::write(
        sys.join("class/mdev_bus/emu0/mdev_supported_types/vgpu_emu-emu_16m-v1/create"),
        uuid,
    )
    .unwrap();
    let socket = sys.join(format!("bus/mdev/devices/{uuid}/vfio-user.sock"));
    let monitor = dir.path().join("monitor.sock");
    let monitor_arg = format!("unix:{},server=on,wait=off", monitor.display());
    let mut guest = Guest::boot(&[
        "--hotplug",
        "--socket",
        socket.to_str().unwrap(),
        "--",
        "-monitor",
        &monitor_arg,
    ]);
    guest.send("device");
    guest.expect("device present");
    let remove = sys.join(format!("bus/mdev/devices/{uuid}/remove"));
    let removal = std::thread::spawn(move || std::fs::write(remove, "1"));
    wait_until(Duration::from_secs(10), "the removal to wait", || {
        log.lock().unwrap().contains("waiting up to")
    });
    // Still there, and still the guest's, while the removal waits.
    assert!(!removal.is_finished());
    guest.send("device");
    guest.expect("device present");
    hmp(&monitor, "device_del vgpu0");
    removal
        .join()
        .unwrap()
        .expect("the removal succeeds once QEMU has released the device");
    assert!(!socket.exists(), "the instance is gone");
    guest.send("device");
    guest.expect("device absent");
    guest.poweroff();
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    assert!(daemon.0.wait().unwrap().success());
    let log = log.lock().unwrap();
    assert!(
        log.contains("cannot be asked") && log.contains("released the device after"),
        "the log says what happened:\n{log}"
    );
}

/// The guest kit on QEMU's own virtio-gpu (`virtio-gpu-pci,max_outputs=4`, no vGPU): the stock
/// `virtio_gpu` driver binds with four connected connectors (QEMU enables only the first output
/// without a display; run-guest forces the others on), `draw-heads` lights each head with the
/// picture of its index, and QEMU's own screen dump of every head equals, pixel for pixel, the
/// picture computed here with the guest tool's function (`vgpu_guest::picture`). Our own
/// virtio-gpu personality is to show the same pictures.
#[test]
#[ignore = "boots a Linux guest under QEMU; run by the README's full test command"]
fn the_guest_kit_lights_four_heads_of_qemus_virtio_gpu_with_the_known_pictures() {
    const HEADS: u32 = 4;
    const MODE: (u32, u32) = (1024, 768);
    let dir = tempfile::tempdir().unwrap();
    let monitor = dir.path().join("monitor.sock");
    let mut guest = Guest::boot(&["--virtio-gpu", "4", "--monitor", monitor.to_str().unwrap()]);
    let pci = fields(guest.line("pci"));
    assert_eq!(
        (pci["vendor"], pci["device"], pci["class"]),
        ("0x1af4", "0x1050", "0x038000"),
        "virtio-gpu, virtio-pci modern"
    );
    assert_eq!(pci["driver"], "virtio-pci");
    let card = fields(guest.line("drm-card"));
    assert_eq!(card["driver"], "virtio_gpu");
    assert_eq!(card["connectors"], HEADS.to_string());
    let connectors: Vec<HashMap<&str, &str>> = guest
        .lines_of("drm-connector")
        .into_iter()
        .map(fields)
        .collect();
    assert_eq!(connectors.len(), HEADS as usize, "{connectors:?}");
    for (i, c) in connectors.iter().enumerate() {
        assert_eq!(c["head"], i.to_string());
        assert_eq!(c["status"], "connected", "head {i}: {c:?}");
        let modes: Vec<&str> = c["modes"].split(',').collect();
        assert!(modes.contains(&"1024x768"), "head {i}: {modes:?}");
    }

    guest.send(&format!("draw-heads virtio_gpu {}x{}", MODE.0, MODE.1));
    let drawn = guest.expect("drawn");
    assert_eq!(drawn, format!("VGPU: drawn card=0 heads={HEADS}"));
    for head in 0..HEADS {
        let line = fields(guest.lines_of("head")[head as usize]);
        assert_eq!(line["index"], head.to_string());
        assert_eq!(line["mode"], format!("{}x{}", MODE.0, MODE.1));
        let expected = vgpu_guest::picture::rgb(head, MODE.0, MODE.1);
        // Kept beside the build for a look when it fails.
        let dump =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("virtio-gpu-head{head}.png"));
        let mut last = None;
        wait_until(
            Duration::from_secs(60),
            &format!("QEMU's dump of head {head} to equal its picture"),
            || {
                hmp(
                    &monitor,
                    &format!("screendump {} -f png virtio-gpu0 {head}", dump.display()),
                );
                let shot =
                    vgpu_emu::display::decode_png_rgb(&std::fs::read(&dump).unwrap()).unwrap();
                let equal = shot.0 == MODE.0 && shot.1 == MODE.1 && shot.2 == expected;
                last = Some((shot.0, shot.1));
                equal
            },
        );
        assert_eq!(last, Some(MODE));
    }
    guest.poweroff();
}

/// What a person running the guest by hand gets (`run-guest` with a terminal): the console on
/// the vGPU from boot, before anything is drawn, and a shell on the serial console.
#[test]
#[ignore = "boots a Linux guest under QEMU; run by the README's full test command"]
fn by_hand_the_guest_shows_its_console_from_boot_and_gives_a_shell() {
    let served = Served::start("EMU-16M");
    let mut guest = Guest::boot(&[
        "--shell",
        "--screen",
        "--socket",
        served.socket.to_str().unwrap(),
    ]);
    // Nothing drawn: the boot messages and the report are on the vGPU's console.
    wait_for_text(&served, "the console shown from boot");
    guest.expect("shell");
    guest.send("echo hello-$((6 * 7))");
    guest.expect_output("hello-42");
    guest.power_off_with("poweroff -f");
}

/// QEMU's `screendump` of head `head` of its device `id`, decoded to (width, height, RGB).
fn qemu_dump(monitor: &Path, id: &str, head: u32) -> (u32, u32, Vec<u8>) {
    let dump = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{id}-head{head}.png"));
    hmp(
        monitor,
        &format!("screendump {} -f png {id} {head}", dump.display()),
    );
    vgpu_emu::display::decode_png_rgb(&std::fs::read(&dump).unwrap()).unwrap()
}

/// Boots a guest with the `heads`-head vGPU `served` (card 0) and QEMU's own virtio-gpu-pci with
/// as many outputs (card 1), plus `more` run-guest options.
fn boot_beside_qemus_virtio_gpu(served: &Served, heads: u32, more: &[&str]) -> Guest {
    let heads = heads.to_string();
    let mut args = vec![
        "--socket",
        served.socket.to_str().unwrap(),
        "--heads",
        &heads,
        "--virtio-gpu",
        &heads,
    ];
    args.extend_from_slice(more);
    Guest::boot(&args)
}

/// A stock guest drives an M60 type with its stock `virtio_gpu` driver: one connected connector
/// per head, modes capped at the type's max resolution, the type's default resolution
/// preferred. The guest draws a different picture on each head of our vGPU and of QEMU's own
/// in-process `virtio-gpu-pci` with as many outputs, in the same VM and mode; each of our heads'
/// screenshots equals QEMU's dump of the same head, pixel for pixel (and the known picture).
/// A reboot resets the device and lights it up again.
fn m60_heads_match_qemus_own_virtio_gpu(ty_name: &str) {
    const MODE: (u32, u32) = (1024, 768);
    let catalog = Catalog::builtin().unwrap();
    let ty = catalog.resolve(ty_name).unwrap();
    let heads = ty.num_heads;
    let served = Served::start(ty_name);
    let dir = tempfile::tempdir().unwrap();
    let monitor = dir.path().join("monitor.sock");
    let mut guest =
        boot_beside_qemus_virtio_gpu(&served, heads, &["--monitor", monitor.to_str().unwrap()]);
    for boot in 0..2 {
        // Our device: the first card (slot 4, ahead of QEMU's).
        let ours = guest
            .lines_of("pci")
            .into_iter()
            .map(fields)
            .find(|p| p["subsystem_device"] == format!("{:#06x}", ty.pci.subsystem_device))
            .unwrap_or_else(|| panic!("no vGPU in {:?}", guest.lines_of("pci")));
        assert_eq!(
            (
                ours["vendor"],
                ours["device"],
                ours["revision"],
                ours["class"]
            ),
            ("0x1af4", "0x1050", "0x01", "0x038000")
        );
        assert_eq!(ours["driver"], "virtio-pci");
        let cards: Vec<HashMap<&str, &str>> =
            guest.lines_of("drm-card").into_iter().map(fields).collect();
        assert_eq!(cards.len(), 2, "{cards:?}");
        assert_eq!(cards[0]["driver"], "virtio_gpu");
        assert!(cards[0]["pci"].ends_with(":04.0"), "{cards:?}");
        assert_eq!(cards[0]["connectors"], heads.to_string());
        let connectors: Vec<HashMap<&str, &str>> = guest
            .lines_of("drm-connector")
            .into_iter()
            .map(fields)
            .filter(|c| c["card"] == "0")
            .collect();
        assert_eq!(connectors.len(), heads as usize);
        for c in &connectors {
            assert_eq!(c["status"], "connected", "{c:?}");
            assert_eq!(c["preferred"], ty.default_resolution.to_string(), "{c:?}");
            for m in c["modes"].split(',') {
                let r = resolution(m);
                assert!(
                    r.width <= ty.max_resolution.width && r.height <= ty.max_resolution.height,
                    "mode {m} above {}",
                    ty.max_resolution
                );
            }
            assert_eq!(c["largest"], ty.max_resolution.to_string(), "{c:?}");
        }

        for card in [0, 1] {
            guest.send(&format!("draw-heads {card} {}x{}", MODE.0, MODE.1));
            let drawn = guest.expect("drawn");
            assert_eq!(drawn, format!("VGPU: drawn card={card} heads={heads}"));
        }
        for head in 0..heads {
            let expected = vgpu_guest::picture::rgb(head, MODE.0, MODE.1);
            let mut last = None;
            wait_until(
                Duration::from_secs(60),
                &format!("head {head} (boot {boot}) to show its picture on both devices"),
                || {
                    let theirs = qemu_dump(&monitor, "virtio-gpu0", head);
                    let ours = served.screenshot_head(head);
                    let same = ours.as_ref().is_ok_and(|o| *o == theirs);
                    last = Some((
                        ours.map(|o| (o.0, o.1, o.2 == expected)),
                        (theirs.0, theirs.1, theirs.2 == expected),
                    ));
                    same && theirs.2 == expected
                },
            );
            assert_eq!(
                last,
                Some((Ok((MODE.0, MODE.1, true)), (MODE.0, MODE.1, true)))
            );
        }
        let status = served.status();
        for h in status["heads"].as_array().unwrap() {
            assert_eq!(h["displaying"], true, "{h}");
        }
        if boot == 0 {
            let resets = status["accesses"]["resets"].as_u64().unwrap();
            guest.send("reboot");
            guest.expect("ready");
            let after = served.status()["accesses"]["resets"].as_u64().unwrap();
            assert!(
                after > resets,
                "the reboot reset the device ({resets} -> {after})"
            );
        }
    }
    guest.poweroff();
}

#[test]
#[ignore = "boots a Linux guest under QEMU; run by the README's full test command"]
fn m60_0b_two_heads_match_qemus_own_virtio_gpu_pixel_for_pixel() {
    m60_heads_match_qemus_own_virtio_gpu("M60-0B");
}

#[test]
#[ignore = "boots a Linux guest under QEMU; run by the README's full test command"]
fn m60_2q_four_heads_match_qemus_own_virtio_gpu_pixel_for_pixel() {
    m60_heads_match_qemus_own_virtio_gpu("M60-2Q");
}

/// Real mdevctl starts an M60-2Q on the daemon's M60 parent, and a stock guest lights its four
/// heads with `virtio_gpu`; `mdevctl types` then counts one instance fewer.
#[test]
#[ignore = "boots a Linux guest under QEMU; run by the README's full test command"]
fn mdevctl_starts_an_m60_2q_and_a_guest_lights_its_four_heads() {
    provisioned();
    let mdevctl = PathBuf::from(run_script("provision-mdevctl"));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let daemon = Stopped(
        spawn_ready(
            Command::new(BIN)
                .arg("daemon")
                .arg("--root")
                .arg(&root)
                .env("RUST_LOG", "warn"),
            "vgpu-emu daemon:",
        )
        .0,
    );
    let mdevctl_ok = |args: &[&str]| -> String {
        let out = Command::new(&mdevctl)
            .args(args)
            .env("MDEVCTL_ENV_ROOT", &root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mdevctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let available = |json: &str| -> u64 {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p.get("m60-0"))
            .flat_map(|types| types.as_array().unwrap())
            .find_map(|t| t.get("vgpu_emu-m60_2q-v1"))
            .map(|t| t["available_instances"].as_u64().unwrap())
            .expect("the M60-2Q type on m60-0")
    };
    assert_eq!(available(&mdevctl_ok(&["types", "--dumpjson"])), 4);
    let uuid = "44444444-0000-4000-8000-000000000002";
    mdevctl_ok(&[
        "start",
        "-u",
        uuid,
        "-p",
        "m60-0",
        "--type",
        "vgpu_emu-m60_2q-v1",
    ]);
    assert_eq!(available(&mdevctl_ok(&["types", "--dumpjson"])), 3);
    let socket = root.join(format!("sys/bus/mdev/devices/{uuid}/vfio-user.sock"));
    let mut guest = Guest::boot(&["--socket", socket.to_str().unwrap(), "--heads", "4"]);
    let pci = fields(guest.line("pci"));
    assert_eq!(
        (pci["device"], pci["subsystem_device"], pci["driver"]),
        ("0x1050", "0x1105", "virtio-pci"),
        "M60-2Q's identity"
    );
    let card = fields(guest.line("drm-card"));
    assert_eq!((card["driver"], card["connectors"]), ("virtio_gpu", "4"));
    for c in guest.lines_of("drm-connector").into_iter().map(fields) {
        assert_eq!(
            (c["status"], c["preferred"], c["largest"]),
            ("connected", "1920x1080", "2560x1600"),
            "{c:?}"
        );
    }
    guest.send("draw-heads 0 800x600");
    assert_eq!(guest.expect("drawn"), "VGPU: drawn card=0 heads=4");
    let control = Command::new(BIN)
        .args(["screenshot", "--head", "3", "-o", "-", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(control.status.success(), "{control:?}");
    let (w, h, rgb) = vgpu_emu::display::decode_png_rgb(&control.stdout).unwrap();
    assert_eq!((w, h), (800, 600));
    assert_eq!(rgb, vgpu_guest::picture::rgb(3, 800, 600));
    guest.poweroff();
    mdevctl_ok(&["stop", "-u", uuid]);
    assert_eq!(available(&mdevctl_ok(&["types", "--dumpjson"])), 4);
    drop(daemon);
}

/// The last `heads` `flips` lines of `card`: each head's measured flip rate.
fn flip_rates(guest: &Guest, card: u32, heads: u32) -> Vec<f64> {
    let all: Vec<HashMap<&str, &str>> = guest
        .lines_of("flips")
        .into_iter()
        .map(fields)
        .filter(|f| f["card"] == card.to_string())
        .collect();
    assert!(all.len() >= heads as usize, "{all:?}");
    all[all.len() - heads as usize..]
        .iter()
        .map(|f| f["rate"].parse().unwrap())
        .collect()
}

/// The frame-rate limiter as the guest feels it. `vgpu-guest flip` page-flips every head at once
/// as fast as the guest can; each flip of a blob dumb buffer waits for the fence of its
/// RESOURCE_FLUSH, which the device completes on its FRL tick, so every head flips at the type's
/// FRL (within 1%). `vgpu-emu set frame_rate_limiter=0` lifts it at once, without a reset: the
/// same guest then flips far faster. QEMU's own virtio-gpu-pci in the same VM (2D buffers, no
/// fence to wait for) is measured for comparison.
fn flips_are_paced_at_the_frl(ty_name: &str) {
    const FLIPS: u32 = 300;
    let catalog = Catalog::builtin().unwrap();
    let ty = catalog.resolve(ty_name).unwrap();
    let heads = ty.num_heads;
    let frl = f64::from(ty.frl);
    let served = Served::start(ty_name);
    let mut guest = boot_beside_qemus_virtio_gpu(&served, heads, &[]);
    guest.send(&format!("flip 0 1024x768 {FLIPS}"));
    assert_eq!(
        guest.expect("flipped"),
        format!("VGPU: flipped card=0 heads={heads}")
    );
    let paced = flip_rates(&guest, 0, heads);
    for (head, rate) in paced.iter().enumerate() {
        assert!(
            (rate - frl).abs() <= frl * 0.01,
            "{ty_name} head {head}: {rate:.2} flips/s, FRL {frl}: {paced:?}"
        );
    }
    let status = served.status();
    for (head, h) in status["heads"].as_array().unwrap().iter().enumerate() {
        let presented = h["frames"]["presented"].as_u64().unwrap_or(0);
        assert!(
            presented >= u64::from(FLIPS),
            "head {head} presented {presented}: {h}"
        );
    }

    assert_eq!(status["server"]["errors"], 0, "{status}");
    let out = served.cli(&["set", "frame_rate_limiter=0"]);
    assert!(out.status.success(), "{out:?}");
    guest.send(&format!("flip 0 1024x768 {FLIPS}"));
    guest.expect("flipped");
    let free = flip_rates(&guest, 0, heads);
    for (head, rate) in free.iter().enumerate() {
        assert!(
            *rate > 3.0 * frl,
            "{ty_name} head {head} with the limiter off: {rate:.1} flips/s: {free:?}"
        );
    }
    guest.send(&format!("flip 1 1024x768 {FLIPS}"));
    guest.expect("flipped");
    let qemu = flip_rates(&guest, 1, heads);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    eprintln!(
        "{ty_name}: paced {:.2} flips/s per head (FRL {frl}); limiter off {:.0}; QEMU's own \
         virtio-gpu {:.0} ({:.1}x ours off)",
        mean(&paced),
        mean(&free),
        mean(&qemu),
        mean(&qemu) / mean(&free)
    );
    guest.poweroff();
}

#[test]
#[ignore = "boots a Linux guest under QEMU; run by the README's full test command"]
fn m60_0b_flips_at_45_fps_on_both_heads() {
    flips_are_paced_at_the_frl("M60-0B");
}

#[test]
#[ignore = "boots a Linux guest under QEMU; run by the README's full test command"]
fn m60_2q_flips_at_60_fps_on_all_four_heads() {
    flips_are_paced_at_the_frl("M60-2Q");
}

/// The live view, as a person uses it: `serve --web`, the page in a browser, a head opened in
/// noVNC. A bochs guest's console from boot, and each head of a four-head M60-2Q guest, show
/// in headless Chromium exactly what `vgpu-emu screenshot` shows (and, on the M60, the known
/// picture the guest drew).
#[test]
#[ignore = "boots a Linux guest under QEMU; run by the README's full test command"]
fn a_browser_shows_the_guest_console_and_every_head_of_a_multi_head_guest() {
    let mut browser = common::browser::Browser::launch();
    let novnc = browser.novnc_dir();
    let viewer_args = [
        "--web",
        "127.0.0.1:0",
        "--novnc-dir",
        novnc.to_str().unwrap(),
    ];
    let wait = Duration::from_secs(60);

    // bochs: the console from boot, then a shell with the cursor not blinking (so the screen
    // holds still while it is compared).
    let served = Served::start_args("EMU-16M", &viewer_args);
    let mut guest = Guest::boot(&[
        "--shell",
        "--screen",
        "--socket",
        served.socket.to_str().unwrap(),
    ]);
    let url = served.status()["heads"][0]["web"]
        .as_str()
        .unwrap()
        .to_string();
    let mut page = browser.open(&url);
    page.set_viewport(1280, 1024);
    wait_for_text(&served, "the console shown from boot");
    guest.expect("shell");
    guest.send("echo 0 > /sys/class/graphics/fbcon/cursor_blink; echo blink-off");
    guest.expect_output("blink-off");
    page.wait_novnc_shows(
        || served.screenshot().unwrap(),
        wait,
        "the bochs guest's console",
    );
    drop(page);
    guest.power_off_with("poweroff -f");

    // virtio-gpu: four heads, each with its own picture.
    let served = Served::start_args("M60-2Q", &viewer_args);
    let mut guest = Guest::boot(&["--socket", served.socket.to_str().unwrap(), "--heads", "4"]);
    guest.send("draw-heads 0 1024x768");
    assert_eq!(guest.expect("drawn"), "VGPU: drawn card=0 heads=4");
    let status = served.status();
    for head in 0..4u32 {
        let url = status["heads"][head as usize]["web"].as_str().unwrap();
        let mut page = browser.open(url);
        page.set_viewport(1280, 1024);
        let picture = vgpu_guest::picture::rgb(head, 1024, 768);
        page.wait_novnc_shows(
            || (1024, 768, picture.clone()),
            wait,
            &format!("head {head} of the M60-2Q guest"),
        );
        assert!(
            served.screenshot_head(head).unwrap() == (1024, 768, picture),
            "head {head}: the screenshot shows the guest's picture too"
        );
        if head == 3 {
            // The README's picture: a head of a live guest in noVNC.
            std::fs::write(
                Path::new(env!("CARGO_TARGET_TMPDIR")).join("novnc-head3.png"),
                page.screenshot_png(),
            )
            .unwrap();
        }
    }
    guest.poweroff();
}

//! The libvirt tier's harness: a private libvirt daemon for tests.
//!
//! [`Libvirt::start`] provisions Debian's libvirt (`qemu-scripts/provision-libvirt`, once into
//! the cache) and runs `qemu-scripts/libvirt-private run DIR` on a fresh temp dir: libvirtd in
//! system mode, chrooted into the provisioned tree in a mount and PID namespace of its own, with
//! its configuration, state, sockets and logs all under DIR, and provision-qemu's QEMU as its
//! emulator. [`Libvirt::virsh`] reaches that daemon and nothing else (a `qemu+unix` URI naming
//! its socket). [`GuestDomain`] writes the domain XML that direct-boots the test guest the way
//! `qemu-scripts/run-guest` does. Dropping the daemon stops it; its namespace ends with it, so
//! every QEMU it started is killed and its mounts disappear; DIR is removed.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long the daemon may take to answer after it starts (it probes QEMU first).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one virsh or virt-xml-validate call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("qemu-scripts")
        .join(name)
}

/// Runs `cmd` (stdin closed) to completion and returns its output; panics if it takes longer
/// than `timeout` (after killing it).
fn output_within(cmd: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {shown}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shown} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// The last `n` lines of the file at `path` (empty if there is none).
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Live processes (not zombies) in the PID namespace `ns` (as `/proc/PID/ns/pid` reads, e.g.
/// `pid:[4026532301]`).
pub fn processes_in_pid_namespace(ns: &str) -> Vec<u32> {
    super::processes_where(|proc| {
        let ours = std::fs::read_link(proc.join("ns/pid")).is_ok_and(|l| l.to_string_lossy() == ns);
        let zombie = std::fs::read_to_string(proc.join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(false);
        ours && !zombie
    })
}

/// A private libvirt daemon, stopped (with every QEMU it started) on drop, or when the thread
/// that started it ends (the parent-death signal of its process): start one per test.
#[derive(Debug)]
pub struct Libvirt {
    /// `libvirt-private run DIR`, which became the namespace's `unshare`.
    child: Child,
    /// The daemon's DIR: `etc/libvirt` (configuration, defined domains), `run` (sockets), `var`
    /// (QEMU state and logs, `var/log/libvirt`), `daemon.out` (its stdout and stderr).
    dir: tempfile::TempDir,
    uri: String,
    virsh: PathBuf,
    virt_xml_validate: PathBuf,
    qemu: PathBuf,
    /// The daemon's PID namespace (`pid:[INODE]`): every process it starts is in it.
    pid_ns: String,
    validations: AtomicU32,
}

impl Libvirt {
    /// Provisions libvirt (once; see `qemu-scripts/provision-libvirt`), starts a private
    /// daemon on a fresh temp dir and waits until `virsh version` answers.
    pub fn start() -> Libvirt {
        let out = super::run_script("provision-libvirt");
        let field = super::fields_of(out.clone(), "provision-libvirt");
        let virsh = field("virsh");
        let virt_xml_validate = field("virt_xml_validate");
        let qemu = field("qemu");

        let dir = tempfile::Builder::new()
            .prefix("vgpu-libvirt-")
            .tempdir()
            .expect("temp dir for libvirt");
        let uri = output_within(
            Command::new(script("libvirt-private"))
                .arg("uri")
                .arg(dir.path()),
            CALL_TIMEOUT,
        );
        assert!(
            uri.status.success(),
            "libvirt-private uri: {}",
            String::from_utf8_lossy(&uri.stderr)
        );
        let uri = String::from_utf8_lossy(&uri.stdout).trim().to_string();

        let log = std::fs::File::create(dir.path().join("daemon.out")).expect("daemon.out");
        // setpriv's parent-death signal stays with the process through the execs that make it
        // the namespace's unshare: should this test process die without dropping the daemon
        // (killed by a timeout, say), unshare is killed, and with it the namespace.
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(script("libvirt-private"))
            .arg("run")
            .arg(dir.path())
            // What provision-libvirt printed above: `run` need not ask it again.
            .env("VGPU_EMU_LIBVIRT_PROVISIONED", &out)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("daemon.out"))
            .stderr(log)
            // A group of its own: a ^C at the terminal is for the test, not the daemon.
            .process_group(0)
            .spawn()
            .expect("start libvirt-private run");
        let mut lv = Libvirt {
            child,
            dir,
            uri,
            virsh,
            virt_xml_validate,
            qemu,
            pid_ns: String::new(),
            validations: AtomicU32::new(0),
        };

        let deadline = Instant::now() + START_TIMEOUT;
        let mut last;
        loop {
            if let Some(status) = lv.child.try_wait().unwrap() {
                panic!(
                    "the libvirt daemon exited before it answered: {status}\n{}",
                    lv.log_tail()
                );
            }
            let out = lv.virsh(&["-q", "version"]);
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            if out.status.success() {
                break;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the libvirt daemon did not answer within {START_TIMEOUT:?}: {last}\n{}",
                    lv.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // The child is the namespace's unshare by now (libvirt-private run execs it); the
        // daemon lives in the PID namespace it made for its children.
        let pid = lv.child.id();
        lv.pid_ns = std::fs::read_link(format!("/proc/{pid}/ns/pid_for_children"))
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_else(|e| panic!("the daemon's PID namespace (pid {pid}): {e}"));
        let host_ns = std::fs::read_link("/proc/self/ns/pid")
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default();
        assert_ne!(
            lv.pid_ns, host_ns,
            "the daemon does not run in a PID namespace of its own"
        );
        lv
    }

    /// The URI that reaches this daemon (and no other).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The daemon's directory (see [`Libvirt`]); files for domains (console logs) can go here,
    /// the daemon sees it at the same path.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The emulator: provision-qemu's QEMU, the daemon's default `qemu-system-x86_64`.
    pub fn qemu(&self) -> PathBuf {
        self.qemu.clone()
    }

    /// The test guest's kernel and initramfs (`qemu-scripts/build-guest`).
    pub fn guest(&self) -> (PathBuf, PathBuf) {
        let out = super::run_script("build-guest");
        let mut parts = out.split_whitespace();
        match (parts.next(), parts.next()) {
            (Some(kernel), Some(initrd)) => (kernel.into(), initrd.into()),
            _ => panic!("build-guest printed {out:?}, not KERNEL INITRD"),
        }
    }

    /// The daemon's PID namespace (`pid:[INODE]`).
    pub fn pid_namespace(&self) -> &str {
        &self.pid_ns
    }

    /// The live processes of the daemon's namespace: the daemon and every QEMU it runs.
    pub fn processes(&self) -> Vec<u32> {
        processes_in_pid_namespace(&self.pid_ns)
    }

    /// `virsh -c URI ARGS...` (bounded).
    pub fn virsh(&self, args: &[&str]) -> Output {
        output_within(
            Command::new(&self.virsh)
                .arg("-c")
                .arg(&self.uri)
                .args(args),
            CALL_TIMEOUT,
        )
    }

    /// Like [`Libvirt::virsh`], asserting success; returns stdout. The panic shows virsh's
    /// stderr and the end of the daemon's logs.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        if !out.status.success() {
            panic!(
                "virsh {args:?} failed ({}):\n{}{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_tail()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The state `virsh domstate` reports of `domain` ("running", "shut off", ...).
    pub fn domstate(&self, domain: &str) -> String {
        self.virsh_ok(&["domstate", domain]).trim().to_string()
    }

    /// Checks `xml` against libvirt's domain schema with virt-xml-validate; the error is its
    /// output.
    pub fn validate(&self, xml: &str) -> Result<(), String> {
        let n = self.validations.fetch_add(1, Ordering::Relaxed);
        let path = self.dir().join(format!("validate-{n}.xml"));
        std::fs::write(&path, xml).expect("write the XML to validate");
        let out = output_within(
            Command::new(&self.virt_xml_validate)
                .arg(&path)
                .arg("domain"),
            CALL_TIMEOUT,
        );
        let _ = std::fs::remove_file(&path);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "virt-xml-validate: {}: {}",
                out.status,
                text.trim()
            ))
        }
    }

    /// A domain named `name` that direct-boots the test guest on the provisioned QEMU, its
    /// serial console in `DIR/NAME.console.log`.
    pub fn guest_domain(&self, name: &str) -> GuestDomain {
        let (kernel, initrd) = self.guest();
        GuestDomain {
            name: name.to_string(),
            emulator: self.qemu(),
            kernel,
            initrd,
            console: self.dir().join(format!("{name}.console.log")),
            memory_mib: 512,
            cmdline: "console=ttyS0 panic=-1 quiet".into(),
            devices: String::new(),
        }
    }

    /// The end of the daemon's output and log, and of each QEMU's log.
    pub fn log_tail(&self) -> String {
        let mut s = format!(
            "--- libvirt-private run (daemon.out):\n{}\n--- libvirtd.log:\n{}\n",
            tail(&self.dir().join("daemon.out"), 20),
            tail(&self.dir().join("var/log/libvirt/libvirtd.log"), 30)
        );
        if let Ok(entries) = std::fs::read_dir(self.dir().join("var/log/libvirt/qemu")) {
            for e in entries.flatten() {
                s.push_str(&format!(
                    "--- {}:\n{}\n",
                    e.file_name().to_string_lossy(),
                    tail(&e.path(), 15)
                ));
            }
        }
        s
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        // libvirtd is asked to stop; its namespace ends with it (the kernel kills the QEMUs).
        let stop = Command::new(script("libvirt-private"))
            .arg("stop")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .output();
        if !matches!(&stop, Ok(o) if o.status.success()) {
            eprintln!("libvirt-private stop: {stop:?}");
        }
        // Whatever happened: killing unshare takes the namespace along (--kill-child).
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        // The kernel empties a PID namespace before its init is reaped; this is a last resort.
        if !self.pid_ns.is_empty() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !processes_in_pid_namespace(&self.pid_ns).is_empty() && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// A domain that direct-boots the test guest the way `qemu-scripts/run-guest` does: q35 under
/// TCG (`type='qemu'`), guest RAM in a shared memfd (as vfio-user needs), the kernel and
/// initramfs of `build-guest` with a serial console, and nothing else that can be left out (no
/// network, USB, graphics or balloon).
#[derive(Debug, Clone)]
pub struct GuestDomain {
    pub name: String,
    pub emulator: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The serial console goes to this file (libvirt opens it; the daemon must see the path).
    pub console: PathBuf,
    pub memory_mib: u32,
    pub cmdline: String,
    /// More children of `<devices>` (raw XML): a `<video>`, say.
    pub devices: String,
}

impl GuestDomain {
    /// The domain XML.
    pub fn xml(&self) -> String {
        let e = |s: &str| xml_escape(s);
        let p = |p: &Path| xml_escape(&p.to_string_lossy());
        format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='{console}'/>
      <target type='serial' port='0'/>
    </console>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
{devices}  </devices>
</domain>
",
            name = e(&self.name),
            mem = self.memory_mib,
            kernel = p(&self.kernel),
            initrd = p(&self.initrd),
            cmdline = e(&self.cmdline),
            emulator = p(&self.emulator),
            console = p(&self.console),
            devices = self.devices,
        )
    }
}

/// `s` with the five XML special characters escaped (fit for text and quoted attributes).
pub fn xml_escape(s: &str) -> String {
    vgpu_emu::display::web::html_escape(s)
}

//! The libvirt tier's own check: a real libvirt daemon (Debian's, provisioned into the cache and
//! run privately by `tests/common/libvirt.rs`) defines, starts, destroys, starts again and
//! undefines a domain that direct-boots the test guest on the project's QEMU, and
//! virt-xml-validate checks the domain XML. Every wait is bounded.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::libvirt::{processes_in_pid_namespace, Libvirt};
use common::wait_until;

/// How long a boot of the guest may take (about 5 s under TCG here).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Waits until the console file at `path` holds `VGPU: ready`; panics (with the console and
/// the daemon's logs) on timeout or when the domain stops running.
fn wait_ready(lv: &Libvirt, domain: &str, path: &Path) -> String {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut checked = Instant::now();
    loop {
        let console = std::fs::read_to_string(path).unwrap_or_default();
        if console.lines().any(|l| l.trim_end() == "VGPU: ready") {
            return console;
        }
        if checked.elapsed() >= Duration::from_secs(1) {
            checked = Instant::now();
            let state = lv.domstate(domain);
            assert_eq!(
                state,
                "running",
                "the domain stopped before the guest was ready; console:\n{console}\n{}",
                lv.log_tail()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no 'VGPU: ready' on the console within {BOOT_TIMEOUT:?}; console:\n{console}\n{}",
            lv.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The mount table of this (the host's) mount namespace.
fn host_mounts() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap()
}

/// Command line of process `pid`, arguments joined by spaces.
fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

#[test]
#[ignore = "libvirt tier: provisions libvirt into the cache and runs a private daemon; run by the README's full test command"]
fn a_private_libvirt_defines_starts_destroys_restarts_and_undefines_a_guest() {
    let lv = Libvirt::start();
    let dir = lv.dir().to_path_buf();
    let pid_ns = lv.pid_namespace().to_string();

    // The daemon runs the provisioned QEMU, and its mounts are its own.
    let version = lv.virsh_ok(&["version"]);
    let qemu_version = std::process::Command::new(lv.qemu())
        .arg("--version")
        .output()
        .unwrap();
    let qemu_version = String::from_utf8_lossy(&qemu_version.stdout);
    let qemu_version = qemu_version
        .split_whitespace()
        .nth(3)
        .unwrap_or_else(|| panic!("{} --version: {qemu_version}", lv.qemu().display()));
    assert!(
        version.contains(&format!("Running hypervisor: QEMU {qemu_version}")),
        "virsh version: {version} (the provisioned QEMU is {qemu_version})"
    );
    let mounts = host_mounts();
    assert!(
        !mounts.contains("vgpu-libvirt-root") && !mounts.contains(&*dir.to_string_lossy()),
        "the daemon's mounts show in the host's mount table:\n{mounts}"
    );
    let daemon = lv.processes();
    assert!(
        daemon.iter().any(|&p| cmdline(p).contains("libvirtd")),
        "no libvirtd in the daemon's namespace: {:?}",
        daemon.iter().map(|&p| cmdline(p)).collect::<Vec<_>>()
    );

    // The domain: the test guest, with QEMU's own bochs-display so that the guest's /init finds
    // a display device at once (without one it waits 20 s for a card before it is ready).
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let mut domain = lv.guest_domain(&name);
    domain.devices = "    <video>\n      <model type='bochs'/>\n    </video>\n".into();
    let xml = domain.xml();
    lv.validate(&xml)
        .unwrap_or_else(|e| panic!("the domain XML does not validate: {e}\n{xml}"));
    // virt-xml-validate really checks: an invalid value, an unknown element and XML that is not
    // well-formed are all rejected.
    for (what, broken) in [
        (
            "an invalid <on_poweroff>",
            xml.replace(
                "<on_poweroff>destroy</on_poweroff>",
                "<on_poweroff>explode</on_poweroff>",
            ),
        ),
        (
            "an unknown element",
            xml.replace("<vcpu>1</vcpu>", "<vcpu>1</vcpu><no-such-element/>"),
        ),
        ("XML that is not well-formed", xml.replace("</domain>", "")),
    ] {
        assert_ne!(broken, xml, "{what}: the replacement did not apply");
        assert!(
            lv.validate(&broken).is_err(),
            "virt-xml-validate accepted {what}:\n{broken}"
        );
    }

    let xml_path = dir.join("domain.xml");
    std::fs::write(&xml_path, &xml).unwrap();
    let defined = lv.virsh_ok(&["define", &xml_path.to_string_lossy()]);
    assert!(defined.contains(&name), "virsh define: {defined}");
    assert_eq!(lv.domstate(&name), "shut off");
    let dumped = lv.virsh_ok(&["dumpxml", &name]);
    assert!(
        dumped.contains(&format!("<emulator>{}</emulator>", lv.qemu().display())),
        "the defined domain does not run the provisioned QEMU:\n{dumped}"
    );

    for boot in 1..=2 {
        // libvirt truncates the console file on start, or appends to it with append='on':
        // without the old file, what the file holds is this boot's either way.
        let _ = std::fs::remove_file(&domain.console);
        lv.virsh_ok(&["start", &name]);
        let console = wait_ready(&lv, &name, &domain.console);
        assert_eq!(
            console.matches("VGPU: ready").count(),
            1,
            "boot {boot}: the console holds more than this boot:\n{console}"
        );
        assert!(
            console.contains("VGPU: pci") && console.contains("vendor=0x1234 device=0x1111"),
            "boot {boot}: the guest did not see the bochs display:\n{console}"
        );
        assert_eq!(lv.domstate(&name), "running");
        // The guest runs in a QEMU of the daemon's namespace: the provisioned one.
        let qemu_root = lv.qemu().parent().unwrap().to_string_lossy().into_owned();
        let qemus: Vec<u32> = lv
            .processes()
            .into_iter()
            .filter(|&p| cmdline(p).contains(&format!("guest={name}")))
            .collect();
        assert_eq!(
            qemus.len(),
            1,
            "boot {boot}: QEMUs of the domain: {qemus:?}"
        );
        assert!(
            cmdline(qemus[0]).contains(&qemu_root),
            "boot {boot}: the domain's QEMU is not the provisioned one: {}",
            cmdline(qemus[0])
        );

        let destroyed = lv.virsh_ok(&["destroy", &name]);
        assert!(
            destroyed.contains("destroyed"),
            "virsh destroy: {destroyed}"
        );
        assert_eq!(lv.domstate(&name), "shut off");
        common::wait_until(Duration::from_secs(10), "the QEMU to end", || {
            !processes_in_pid_namespace(&pid_ns).contains(&qemus[0])
        });
    }

    let undefined = lv.virsh_ok(&["undefine", &name]);
    assert!(
        undefined.contains("undefined"),
        "virsh undefine: {undefined}"
    );
    let left = lv.virsh_ok(&["list", "--all", "--name"]);
    assert!(
        !left.lines().any(|l| l.trim() == name),
        "still defined: {left}"
    );

    // Nothing of the daemon outlives it: no process of its namespace, no mount, no directory
    // (its sockets were in it).
    drop(lv);
    let left = processes_in_pid_namespace(&pid_ns);
    assert!(
        left.is_empty(),
        "processes of the daemon's namespace outlive it: {:?}",
        left.iter().map(|&p| cmdline(p)).collect::<Vec<_>>()
    );
    assert!(!dir.exists(), "{} is left behind", dir.display());
    let mounts = host_mounts();
    assert!(
        !mounts.contains("vgpu-libvirt-root") && !mounts.contains(&*dir.to_string_lossy()),
        "mounts of the daemon are left:\n{mounts}"
    );
}

/// Boots `domain` (already defined) and returns its console once the guest is ready.
fn start_and_wait(lv: &Libvirt, domain: &str, console: &Path) -> String {
    let _ = std::fs::remove_file(console);
    lv.virsh_ok(&["start", domain]);
    wait_ready(lv, domain, console)
}

/// The `VGPU: pci ...` report line of the device with `vendor` and `device`, as fields.
fn pci_line(console: &str, vendor: &str, device: &str) -> String {
    console
        .lines()
        .find(|l| {
            l.starts_with("VGPU: pci ")
                && l.contains(&format!("vendor={vendor}"))
                && l.contains(&format!("device={device}"))
        })
        .unwrap_or_else(|| panic!("no {vendor}:{device} in the guest's report:\n{console}"))
        .to_string()
}

/// What a libvirt user does: a domain XML of their own (here without any memory backing), the
/// instance merged in by `vgpu-emu libvirt-xml`, validated by virt-xml-validate, defined and
/// started by libvirt. The stock driver binds and the console shows on the vGPU; destroying and
/// starting the domain again resets the device, and the instance outlives the domain, as an
/// mdev does. Both personalities: bochs (EMU-16M) and virtio-gpu (M60-0B), which needs the
/// shared memfd libvirt-xml adds.
#[test]
#[ignore = "libvirt tier: provisions libvirt into the cache and runs a private daemon; run by the README's full test command"]
fn a_domain_with_an_instance_merged_by_libvirt_xml_boots_resets_and_leaves_the_instance() {
    let lv = Libvirt::start();
    for (ty, vendor, device, driver) in [
        ("EMU-16M", "0x1234", "0x1111", "bochs-drm"),
        ("M60-0B", "0x1af4", "0x1050", "virtio-pci"),
    ] {
        // The socket where the daemon (and its QEMU) can see it.
        let socket = lv.dir().join(format!("{ty}.sock"));
        let mut served = common::Served::start_on(ty, &socket);
        let name = format!("vgpu-{}", ty.to_lowercase());
        let mut domain = lv.guest_domain(&name);
        domain.cmdline = "console=tty0 console=ttyS0 panic=-1 loglevel=6 vgpu.screen=1".into();
        let console = domain.console.clone();
        let mine = domain.xml();
        let backing = "  <memoryBacking>\n    <source type='memfd'/>\n    <access mode='shared'/>\n  </memoryBacking>\n";
        assert!(mine.contains(backing));
        let mine = mine.replace(backing, "");
        let file = lv.dir().join(format!("{name}.xml"));
        std::fs::write(&file, &mine).unwrap();
        let out = std::process::Command::new(common::BIN)
            .args(["libvirt-xml", "--socket"])
            .arg(&socket)
            .arg("--domain")
            .arg(&file)
            .arg("-o")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "libvirt-xml: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let merged = std::fs::read_to_string(&file).unwrap();
        assert!(merged.contains("<source type='memfd'/>"), "{merged}");
        lv.validate(&merged)
            .unwrap_or_else(|e| panic!("{ty}: the merged domain does not validate: {e}\n{merged}"));

        lv.virsh_ok(&["define", file.to_str().unwrap()]);
        let report = start_and_wait(&lv, &name, &console);
        let pci = pci_line(&report, vendor, device);
        assert!(pci.contains(&format!("driver={driver}")), "{ty}: {pci}");
        wait_until(Duration::from_secs(60), "the console on the vGPU", || {
            served
                .screenshot()
                .is_ok_and(|(_, _, rgb)| rgb.iter().any(|&b| b > 0x40))
        });
        let status = served.status();
        assert_eq!(status["client_connected"], true, "{status}");
        let resets = status["accesses"]["resets"].as_u64().unwrap();

        // Destroyed: QEMU goes, the instance stays, keeping its state for the next client.
        lv.virsh_ok(&["destroy", &name]);
        wait_until(Duration::from_secs(20), "the client to leave", || {
            served.status()["client_connected"] == false
        });
        served.assert_alive();
        // Started again: a reset device, the driver binds again.
        let report = start_and_wait(&lv, &name, &console);
        let pci = pci_line(&report, vendor, device);
        assert!(
            pci.contains(&format!("driver={driver}")),
            "{ty}, again: {pci}"
        );
        let after = served.status()["accesses"]["resets"].as_u64().unwrap();
        assert!(
            after > resets,
            "{ty}: the second start reset the device ({resets} -> {after})"
        );
        lv.virsh_ok(&["destroy", &name]);
        lv.virsh_ok(&["undefine", &name]);
        served.assert_alive();
        assert_eq!(served.status()["type"], format!("{ty}@1"));
    }
}

//! `vgpu-emu kubevirt-hook` as KubeVirt's virt-launcher meets it: a gRPC client here plays
//! virt-launcher (finds the socket in the sidecar's hook directory, asks `Info`, picks the newest
//! `Callbacks` version it knows, calls `OnDefineDomain` with a domain XML shaped like the ones
//! virt-launcher generates and the VMI as JSON, and `Shutdown` at the end). Malformed input gets
//! gRPC errors and the hook keeps serving. The libvirt tier checks the hook's domains with
//! `virt-xml-validate` and boots one under a real libvirt on a served instance.

mod common;

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_until, BIN};
use tonic::{Code, Status};
use vgpu_emu::integrate::kubevirt::proto::{
    info::info_client::InfoClient, v1alpha2, v1alpha3, InfoParams, InfoResult,
    OnDefineDomainParams, ShutdownParams,
};
use vgpu_emu::integrate::xml::{self, Element};

/// A KubeVirt-style domain, as virt-launcher generates it (Go's encoding/xml: tabs, no empty
/// element tags) for a q35 VMI with a container disk, cloud-init, a masqueraded interface and
/// six pcie-root-port controllers for hotplug; no `<memoryBacking>`, as KubeVirt's default.
const DOMAIN: &str = include_str!("data/kubevirt-domain.xml");
/// The VMI of that domain, as virt-launcher marshals it (it asks for `vgpu-emu.io/M60-2Q`).
const VMI: &str = include_str!("data/kubevirt-vmi.json");

/// Where the device plugin mounts the first instance of a VMI's `vgpu-emu.io/M60-2Q` in the
/// compute container (`/var/run/vgpu-emu/<RESOURCE>/<i>.sock`).
const PLUGIN_SOCKET: &str = "/var/run/vgpu-emu/M60-2Q/0.sock";

/// How long a spawned hook may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A spawned `vgpu-emu kubevirt-hook`, killed on drop.
struct Hook {
    child: Child,
    dir: tempfile::TempDir,
    /// The pod's hook volume as the compute container sees it (`/var/run/kubevirt-hooks`).
    hooks: PathBuf,
    socket: PathBuf,
}

impl Hook {
    /// Starts the hook with `args` (after `--socket`) and `env` (no other `VGPU_EMU_*`), its
    /// socket in a sidecar directory of a fresh hook volume, and waits until it answers.
    fn start(args: &[&str], env: &[(&str, &str)]) -> Hook {
        let dir = tempfile::tempdir().unwrap();
        let hooks = dir.path().join("kubevirt-hooks");
        // KubeVirt mounts the volume's subdirectory named after the sidecar container at the
        // sidecar's /var/run/kubevirt-hooks.
        let socket = hooks.join("hook-sidecar-0").join("vgpu-emu.sock");
        let mut cmd = Command::new(BIN);
        cmd.arg("kubevirt-hook")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("VGPU_EMU_SOCKET")
            .env_remove("VGPU_EMU_UUID")
            .env_remove("VGPU_EMU_TYPE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("hook.log")).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn vgpu-emu kubevirt-hook");
        let mut hook = Hook {
            child,
            dir,
            hooks,
            socket,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while UnixStream::connect(&hook.socket).is_err() {
            if let Some(status) = hook.child.try_wait().unwrap() {
                panic!("the hook exited early ({status}):\n{}", hook.log());
            }
            assert!(
                Instant::now() < deadline,
                "the hook did not listen within {START_TIMEOUT:?}:\n{}",
                hook.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        hook
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hook.log")).unwrap_or_default()
    }

    fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the hook died:\n{}",
            self.log()
        );
    }

    /// Waits (bounded) for the hook to exit; its exit status.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the hook did not exit within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What virt-launcher does with hook sockets, over gRPC on a Unix socket. Each call dials
/// anew and closes its connection at the end, as virt-launcher does (a runtime per call: its
/// connection tasks end with it).
struct Launcher {
    socket: PathBuf,
}

/// The versions virt-launcher knows, newest first: it takes the first the hook serves.
const LAUNCHER_VERSIONS: [&str; 3] = ["v1alpha3", "v1alpha2", "v1alpha1"];

impl Launcher {
    /// Collects the sidecar sockets as virt-launcher does: every file in every directory of
    /// the hook volume. There must be one, this hook's.
    fn collect(hooks: &Path) -> Launcher {
        let mut sockets = Vec::new();
        for sidecar in std::fs::read_dir(hooks).unwrap().flatten() {
            if sidecar.file_type().unwrap().is_dir() {
                for f in std::fs::read_dir(sidecar.path()).unwrap().flatten() {
                    if !f.file_type().unwrap().is_dir() {
                        sockets.push(f.path());
                    }
                }
            }
        }
        assert_eq!(
            sockets.len(),
            1,
            "virt-launcher dials every file of a sidecar's directory: {sockets:?}"
        );
        Launcher::on(&sockets[0])
    }

    fn on(socket: &Path) -> Launcher {
        Launcher {
            socket: socket.to_path_buf(),
        }
    }

    /// Runs `f` on a runtime of its own, dropped (with the connection) when it returns.
    fn call<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn uri(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    fn info(&self) -> Result<InfoResult, Status> {
        self.call(async {
            let mut c = InfoClient::connect(self.uri()).await.unwrap();
            c.info(InfoParams {}).await.map(|r| r.into_inner())
        })
    }

    /// The version virt-launcher would use with this hook.
    fn version(&self) -> &'static str {
        let info = self.info().unwrap();
        LAUNCHER_VERSIONS
            .into_iter()
            .find(|v| info.versions.iter().any(|s| s == v))
            .unwrap_or_else(|| panic!("no version virt-launcher knows: {info:?}"))
    }

    fn on_define_domain(&self, version: &str, domain: &[u8], vmi: &[u8]) -> Result<String, Status> {
        let params = OnDefineDomainParams {
            domain_xml: domain.to_vec(),
            vmi: vmi.to_vec(),
        };
        let result = self.call(async {
            match version {
                "v1alpha3" => v1alpha3::callbacks_client::CallbacksClient::connect(self.uri())
                    .await
                    .unwrap()
                    .on_define_domain(params)
                    .await
                    .map(|r| r.into_inner().domain_xml),
                "v1alpha2" => v1alpha2::callbacks_client::CallbacksClient::connect(self.uri())
                    .await
                    .unwrap()
                    .on_define_domain(params)
                    .await
                    .map(|r| r.into_inner().domain_xml),
                other => panic!("version {other}"),
            }
        })?;
        Ok(String::from_utf8(result).expect("the domain comes back as UTF-8"))
    }

    fn shutdown(&self) -> Result<(), Status> {
        self.call(async {
            v1alpha3::callbacks_client::CallbacksClient::connect(self.uri())
                .await
                .unwrap()
                .shutdown(ShutdownParams {})
                .await
                .map(|_| ())
        })
    }
}

/// The VMI with `annotation` as its `vgpu-emu.io/socket` annotation.
fn vmi_with_socket(annotation: &str) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_str(VMI).unwrap();
    v["metadata"]["annotations"]["vgpu-emu.io/socket"] = annotation.into();
    serde_json::to_vec(&v).unwrap()
}

/// The `-device` arguments (parsed JSON) in a domain's `<qemu:commandline>`.
fn device_args(d: &Element) -> Vec<serde_json::Value> {
    let Some(cl) = d.child("qemu:commandline") else {
        return Vec::new();
    };
    let args: Vec<&str> = cl.elements().filter_map(|a| a.attr("value")).collect();
    args.windows(2)
        .filter(|w| w[0] == "-device")
        .map(|w| serde_json::from_str(w[1]).unwrap())
        .collect()
}

/// `(index, alias)` of the domain's PCI controllers.
fn pci_controllers(d: &Element) -> Vec<(u32, Option<String>)> {
    d.child("devices")
        .unwrap()
        .elements()
        .filter(|c| c.name == "controller" && c.attr("type") == Some("pci"))
        .map(|c| {
            (
                c.attr("index").unwrap().parse().unwrap(),
                c.child("alias")
                    .and_then(|a| a.attr("name"))
                    .map(str::to_string),
            )
        })
        .collect()
}

/// Checks that `out` is `DOMAIN` with one vfio-user device per socket of `sockets` (in order)
/// on fresh root ports, guest RAM as a shared memfd, and everything else kept (written back
/// with single quotes and empty-element tags, as libvirt itself writes domains).
fn assert_merged(out: &str, sockets: &[&str]) {
    let d = xml::parse(out)
        .unwrap_or_else(|e| panic!("not XML: {e}\n{out}"))
        .root;
    let mb = d.child("memoryBacking").expect("a memory backing");
    assert_eq!(mb.child("source").unwrap().attr("type"), Some("memfd"));
    assert_eq!(mb.child("access").unwrap().attr("mode"), Some("shared"));
    let devices = device_args(&d);
    assert_eq!(devices.len(), sockets.len(), "{out}");
    let controllers = pci_controllers(&d);
    // KubeVirt's six root ports, untouched, then one of ours per device, at fresh indexes.
    assert_eq!(
        controllers[..6],
        (1..=6).map(|i| (i, None)).collect::<Vec<_>>()[..],
        "{out}"
    );
    assert_eq!(controllers.len(), 6 + sockets.len(), "{out}");
    for (i, (dev, socket)) in devices.iter().zip(sockets).enumerate() {
        assert_eq!(dev["driver"], "vfio-user-pci");
        assert_eq!(dev["socket"]["type"], "unix");
        assert_eq!(dev["socket"]["path"], *socket);
        let (index, alias) = &controllers[6 + i];
        assert_eq!(*index, 7 + i as u32, "a fresh index after KubeVirt's");
        assert_eq!(
            alias.as_deref(),
            dev["bus"].as_str(),
            "the device sits on its port"
        );
        assert!(
            dev["id"].as_str().unwrap().starts_with("vgpu-emu-"),
            "{dev}"
        );
    }
    // What virt-launcher put there is all still there.
    for kept in [
        "<name>default_testvmi</name>",
        "<uid>4f1b2c6e-7a0d-4a53-9b8e-0c1d2e3f4a5b</uid>",
        "<kubevirt xmlns='http://kubevirt.io'>",
        "<alias name='ua-containerdisk'/>",
        "<source file='/var/run/kubevirt/container-disks/disk_0.img'/>",
        "\t\t<controller type='pci' index='6' model='pcie-root-port'/>\n",
        "<timer name='hpet' present='no'/>",
        "<deletionGracePeriodSeconds>30</deletionGracePeriodSeconds>",
    ] {
        assert!(out.contains(kept), "{kept} is gone:\n{out}");
    }
}

/// Asserts `r` is a gRPC error with `code` whose message contains `what`.
fn assert_refused<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, what: &str) -> Status {
    let s = r.expect_err("refused");
    assert_eq!(s.code(), code, "{s:?}");
    assert!(s.message().contains(what), "{what:?} not in {s:?}");
    s
}

#[test]
fn virt_launcher_gets_the_vgpu_into_its_domain_and_stops_the_hook() {
    let mut hook = Hook::start(&["--vgpu-socket", PLUGIN_SOCKET], &[]);
    let launcher = Launcher::collect(&hook.hooks);

    let info = launcher.info().unwrap();
    assert_eq!(info.name, "vgpu-emu");
    assert_eq!(info.versions, ["v1alpha3", "v1alpha2"]);
    let points: Vec<&str> = info.hook_points.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(points, ["OnDefineDomain", "Shutdown"]);
    let version = launcher.version();
    assert_eq!(version, "v1alpha3");

    let out = launcher
        .on_define_domain(version, DOMAIN.as_bytes(), VMI.as_bytes())
        .unwrap();
    assert_merged(&out, &[PLUGIN_SOCKET]);
    // A KubeVirt that knows only v1alpha2 gets the same domain.
    let v2 = launcher
        .on_define_domain("v1alpha2", DOMAIN.as_bytes(), VMI.as_bytes())
        .unwrap();
    assert_eq!(v2, out);
    // Handed the merged domain again, the hook leaves it as it is.
    let again = launcher
        .on_define_domain(version, out.as_bytes(), VMI.as_bytes())
        .unwrap();
    assert_eq!(again, out);

    let log = hook.log();
    assert!(
        log.contains("OnDefineDomain (v1alpha3) for VMI default/testvmi: sockets from --vgpu-socket; added vgpu-emu-")
            && log.contains(&format!("on {PLUGIN_SOCKET}")),
        "{log}"
    );

    // The VM ended: virt-launcher calls Shutdown; the hook exits and takes its socket along.
    let asked = Instant::now();
    launcher.shutdown().unwrap();
    let status = hook.wait_exit(Duration::from_secs(15));
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "with no connection left open the hook stops at once ({:?}):\n{}",
        asked.elapsed(),
        hook.log()
    );
    assert!(status.success(), "{status}:\n{}", hook.log());
    assert!(!hook.socket.exists(), "the hook left its socket");
}

#[test]
fn malformed_input_gets_grpc_errors_and_the_hook_keeps_serving() {
    // No socket configured: each VMI's annotation names its sockets.
    let mut hook = Hook::start(&[], &[]);
    let launcher = Launcher::collect(&hook.hooks);
    let v = launcher.version();
    let good = vmi_with_socket(PLUGIN_SOCKET);
    let file_backed = DOMAIN.replace(
        "\t<os>",
        "\t<memoryBacking>\n\t\t<source type=\"file\"></source>\n\t</memoryBacking>\n\t<os>",
    );
    assert_ne!(file_backed, DOMAIN);
    let big_domain = format!("{DOMAIN}{}", " ".repeat(1 << 20));

    /// What is sent (domain, VMI), and the code and words of the refusal.
    type Case = (&'static str, Vec<u8>, Vec<u8>, Code, &'static str);
    let cases: Vec<Case> = vec![
        (
            "not XML",
            b"this is not a domain".to_vec(),
            good.clone(),
            Code::InvalidArgument,
            "cannot be read",
        ),
        (
            "unclosed XML",
            DOMAIN.replace("</domain>", "").into_bytes(),
            good.clone(),
            Code::InvalidArgument,
            "not closed",
        ),
        (
            "not a domain",
            b"<network><name>n</name></network>".to_vec(),
            good.clone(),
            Code::InvalidArgument,
            "not <domain>",
        ),
        (
            "a memory backing conflict",
            file_backed.into_bytes(),
            good.clone(),
            Code::FailedPrecondition,
            "memory backing conflicts: <source type='file'/>",
        ),
        (
            "no socket configured",
            DOMAIN.as_bytes().to_vec(),
            VMI.as_bytes().to_vec(),
            Code::FailedPrecondition,
            "no vfio-user socket is configured",
        ),
        (
            "a relative socket in the annotation",
            DOMAIN.as_bytes().to_vec(),
            vmi_with_socket("vgpu0.sock"),
            Code::InvalidArgument,
            "is not absolute",
        ),
        (
            "a VMI that is not JSON",
            DOMAIN.as_bytes().to_vec(),
            b"{\"metadata\":".to_vec(),
            Code::InvalidArgument,
            "not JSON",
        ),
        (
            "a domain XML over 1 MiB",
            big_domain.into_bytes(),
            good.clone(),
            Code::InvalidArgument,
            "more than the 1048576 accepted",
        ),
        (
            "a domain that is not UTF-8",
            vec![b'<', 0xff, b'>'],
            good.clone(),
            Code::InvalidArgument,
            "not UTF-8",
        ),
    ];
    for (what, domain, vmi, code, message) in cases {
        let s = assert_refused(launcher.on_define_domain(v, &domain, &vmi), code, message);
        eprintln!("{what}: {:?}: {}", s.code(), s.message());
        hook.assert_alive();
        // Still serving: a good domain goes through.
        let out = launcher
            .on_define_domain(v, DOMAIN.as_bytes(), &good)
            .unwrap_or_else(|e| panic!("after {what}: {e:?}"));
        assert_merged(&out, &[PLUGIN_SOCKET]);
    }

    // A message over the gRPC limit is refused before it is read.
    let huge = vec![b'x'; 5 << 20];
    let s = launcher.on_define_domain(v, &huge, &good).unwrap_err();
    assert!(
        matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{s:?}"
    );

    // Peers that are not gRPC clients: bytes that are not HTTP/2, and silent connections.
    let mut junk = UnixStream::connect(&hook.socket).unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01\x02garbage")
        .unwrap();
    junk.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    let _ = junk.read_to_end(&mut buf);
    let silent: Vec<UnixStream> = (0..32)
        .map(|_| UnixStream::connect(&hook.socket).unwrap())
        .collect();
    assert_eq!(launcher.info().unwrap().name, "vgpu-emu");
    let out = launcher
        .on_define_domain(v, DOMAIN.as_bytes(), &good)
        .unwrap();
    assert_merged(&out, &[PLUGIN_SOCKET]);
    drop(silent);
    hook.assert_alive();

    let log = hook.log();
    assert!(
        log.contains("refused, the domain is not changed: cannot add vgpu-emu-")
            && log.contains("the domain's memory backing conflicts: <source type='file'/>"),
        "{log}"
    );
    assert!(
        log.contains("sockets from the VMI annotation vgpu-emu.io/socket"),
        "{log}"
    );
}

#[test]
fn several_vgpus_from_the_environment_or_the_annotation_and_the_flag_wins() {
    let uuids = "74351e0c-e65b-4eae-aa34-df30b96c4889,0b9f3ed4-1b4c-4b59-9f7f-8f3a1d0e2c11";
    let a = "/var/run/vgpu-emu/M60-2Q/0.sock";
    let b = "/var/run/vgpu-emu/M60-2Q/1.sock";
    let env = [
        ("VGPU_EMU_SOCKET", &*format!("{a},{b}")),
        ("VGPU_EMU_UUID", uuids),
        ("VGPU_EMU_TYPE", "M60-2Q@1,M60-2Q@1"),
    ];
    let hook = Hook::start(&[], &env);
    let launcher = Launcher::collect(&hook.hooks);
    let out = launcher
        .on_define_domain(
            "v1alpha3",
            DOMAIN.as_bytes(),
            &vmi_with_socket("/ignored.sock"),
        )
        .unwrap();
    assert_merged(&out, &[a, b]);
    let d = xml::parse(&out).unwrap().root;
    let ids: Vec<String> = device_args(&d)
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["vgpu-emu-74351e0c", "vgpu-emu-0b9f3ed4"]);
    let log = hook.log();
    assert!(log.contains("sockets from $VGPU_EMU_SOCKET"), "{log}");
    assert!(
        log.contains("annotation (/ignored.sock) is ignored: $VGPU_EMU_SOCKET wins"),
        "{log}"
    );
    drop(hook);

    // The flag wins over the environment.
    let hook = Hook::start(&["--vgpu-socket", "/flag.sock"], &env);
    let out = Launcher::collect(&hook.hooks)
        .on_define_domain("v1alpha3", DOMAIN.as_bytes(), VMI.as_bytes())
        .unwrap();
    assert_merged(&out, &["/flag.sock"]);
    drop(hook);

    // Neither: the annotation, two sockets; names derived from the paths.
    let hook = Hook::start(&[], &[]);
    let out = Launcher::collect(&hook.hooks)
        .on_define_domain(
            "v1alpha3",
            DOMAIN.as_bytes(),
            &vmi_with_socket(&format!("{a}, {b}")),
        )
        .unwrap();
    assert_merged(&out, &[a, b]);
}

#[test]
fn bad_configuration_stops_the_hook_and_sockets_are_taken_only_when_stale() {
    // A bad list in the environment: exit code 2 and why.
    let out = Command::new(BIN)
        .args(["kubevirt-hook", "--socket", "/nonexistent/x.sock"])
        .env("VGPU_EMU_SOCKET", "/a.sock,/b.sock")
        .env("VGPU_EMU_UUID", "74351e0c-e65b-4eae-aa34-df30b96c4889")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("$VGPU_EMU_UUID has 1 values for 2 sockets"),
        "{err}"
    );

    // A stale socket (nobody listens) is replaced.
    let dir = tempfile::tempdir().unwrap();
    let stale = dir
        .path()
        .join("kubevirt-hooks/hook-sidecar-0/vgpu-emu.sock");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut first = Command::new(BIN)
        .args(["kubevirt-hook", "--vgpu-socket", "/s.sock", "--socket"])
        .arg(&stale)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(START_TIMEOUT, "the hook to take the stale socket", || {
        UnixStream::connect(&stale).is_ok()
    });
    // A live one is not: a second hook on it fails and leaves it alone.
    let second = Command::new(BIN)
        .args(["kubevirt-hook", "--vgpu-socket", "/s.sock", "--socket"])
        .arg(&stale)
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("another process serves on"), "{err}");
    assert_eq!(Launcher::on(&stale).info().unwrap().name, "vgpu-emu");
    // SIGTERM: the hook stops and removes its socket, even with a peer that keeps its
    // connection open (after a grace period).
    let _idle = UnixStream::connect(&stale).unwrap();
    let kill = Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = first.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the hook did not stop");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
    assert!(!stale.exists());
}

/// The `hooks.kubevirt.io/hookSidecars` value of `deploy/vmi.yaml` (a folded block scalar,
/// `>-`: its lines joined with spaces), as JSON.
fn example_hook_sidecars() -> serde_json::Value {
    let yaml =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/vmi.yaml"))
            .unwrap();
    let mut lines = yaml.lines();
    let key = lines
        .find(|l| {
            l.trim_start()
                .starts_with("hooks.kubevirt.io/hookSidecars:")
        })
        .expect("the example VMI names a hook sidecar");
    assert!(key.trim_end().ends_with(">-"), "{key}");
    let indent = key.len() - key.trim_start().len();
    let value: Vec<&str> = lines
        .take_while(|l| l.len() - l.trim_start().len() > indent)
        .map(str::trim)
        .collect();
    serde_json::from_str(&value.join(" ")).unwrap_or_else(|e| panic!("{e}: {value:?}"))
}

#[test]
fn the_example_vmis_hook_sidecar_adds_the_device_plugins_socket() {
    let sidecars = example_hook_sidecars();
    let args: Vec<&str> = sidecars[0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    // The image's entrypoint is the binary; KubeVirt passes the args.
    assert_eq!(args[0], "kubevirt-hook");
    let hook = Hook::start(&args[1..], &[]);
    let out = Launcher::collect(&hook.hooks)
        .on_define_domain("v1alpha3", DOMAIN.as_bytes(), VMI.as_bytes())
        .unwrap();
    assert_merged(&out, &[PLUGIN_SOCKET]);
}

// ---------------------------------------------------------------------------------------------
// The libvirt tier.

/// How long a boot of the guest may take (about 5 s under TCG here).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
#[ignore = "libvirt tier: provisions libvirt into the cache and runs a private daemon; run by the README's full test command"]
fn the_hooks_domain_validates_and_boots_a_vgpu_under_libvirt() {
    use common::libvirt::Libvirt;
    let lv = Libvirt::start();

    // An instance where the daemon (and its QEMU) sees it, as the device plugin's mount would
    // put it in the compute container; the hook is told of it as the device plugin tells the
    // container, through the environment.
    let socket = lv.dir().join("vgpu0.sock");
    let mut served = common::Served::start_on("EMU-16M", &socket);
    let status = served.status();
    let uuid = status["uuid"].as_str().unwrap().to_string();
    let socket_str = socket.to_str().unwrap();
    let hook = Hook::start(
        &[],
        &[
            ("VGPU_EMU_SOCKET", socket_str),
            ("VGPU_EMU_UUID", &uuid),
            ("VGPU_EMU_TYPE", "EMU-16M@1"),
        ],
    );
    let launcher = Launcher::collect(&hook.hooks);
    let v = launcher.version();

    // The KubeVirt domain, as the hook returns it, is a valid libvirt domain (and was before).
    lv.validate(DOMAIN)
        .unwrap_or_else(|e| panic!("the KubeVirt-style domain does not validate: {e}"));
    let out = launcher
        .on_define_domain(v, DOMAIN.as_bytes(), VMI.as_bytes())
        .unwrap();
    assert_merged(&out, &[socket_str]);
    lv.validate(&out)
        .unwrap_or_else(|e| panic!("the hook's domain does not validate: {e}\n{out}"));
    // And virt-xml-validate does check: the device's root port on a bad index is refused.
    let broken = out.replace(
        "index='7' model='pcie-root-port'",
        "index='x' model='pcie-root-port'",
    );
    assert_ne!(broken, out);
    assert!(lv.validate(&broken).is_err(), "{broken}");

    // The test guest's domain, without a memory backing (as KubeVirt's), through the hook as
    // virt-launcher would send it, then defined and started.
    let name = "kubevirt-hook";
    let mut domain = lv.guest_domain(name);
    domain.cmdline = "console=tty0 console=ttyS0 panic=-1 loglevel=6".into();
    let console = domain.console.clone();
    let backing = "  <memoryBacking>\n    <source type='memfd'/>\n    <access mode='shared'/>\n  </memoryBacking>\n";
    let xml = domain.xml();
    assert!(xml.contains(backing));
    let xml = xml.replace(backing, "");
    let merged = launcher
        .on_define_domain(v, xml.as_bytes(), VMI.as_bytes())
        .unwrap();
    assert!(merged.contains("<source type='memfd'/>"), "{merged}");
    let short = &uuid.replace('-', "")[..8];
    assert!(
        merged.contains(&format!("vgpu-emu-{short}")),
        "the device is named after $VGPU_EMU_UUID:\n{merged}"
    );
    lv.validate(&merged)
        .unwrap_or_else(|e| panic!("the hook's guest domain does not validate: {e}\n{merged}"));
    let file = lv.dir().join(format!("{name}.xml"));
    std::fs::write(&file, &merged).unwrap();
    lv.virsh_ok(&["define", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&console);
    lv.virsh_ok(&["start", name]);

    let deadline = Instant::now() + BOOT_TIMEOUT;
    let report = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.lines().any(|l| l.trim_end() == "VGPU: ready") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no 'VGPU: ready' within {BOOT_TIMEOUT:?}; console:\n{text}\n{}",
            lv.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let pci = report
        .lines()
        .find(|l| {
            l.starts_with("VGPU: pci ")
                && l.contains("vendor=0x1234")
                && l.contains("device=0x1111")
        })
        .unwrap_or_else(|| panic!("the guest did not see the vGPU:\n{report}"));
    assert!(pci.contains("driver=bochs-drm"), "{pci}");
    let status = served.status();
    assert_eq!(status["client_connected"], true, "{status}");

    lv.virsh_ok(&["destroy", name]);
    lv.virsh_ok(&["undefine", name]);
    wait_until(
        Duration::from_secs(20),
        "QEMU to leave the instance",
        || served.status()["client_connected"] == false,
    );
    served.assert_alive();
    drop(hook);
}

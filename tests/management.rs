//! Management tier: a spawned `vgpu-emu daemon` driven by real `mdevctl` 1.4 (installed into the
//! cache by qemu-scripts/provision-mdevctl) through the mdev tree it mounts with FUSE. Needs
//! root and /dev/fuse; `#[ignore]`d so `cargo test` stays quick, and run by the README's full
//! test command (`cargo test --workspace -- --include-ignored`, which .ci/run runs).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::{run_script, vgpu_emu_ok, wait_until, BIN};
use vgpu_model::Catalog;

fn mdevctl_bin() -> &'static Path {
    static BIN_PATH: OnceLock<PathBuf> = OnceLock::new();
    BIN_PATH.get_or_init(|| PathBuf::from(run_script("provision-mdevctl")))
}

/// A running daemon on a fresh root; stopped with SIGTERM (a clean unmount) on drop.
struct Daemon {
    child: Child,
    root: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Daemon {
    fn start(dir: tempfile::TempDir, args: &[&str]) -> Daemon {
        let root = dir.path().to_path_buf();
        let mut d = Daemon::start_at(&root, args);
        d._dir = Some(dir);
        d
    }

    fn start_at(root: &Path, args: &[&str]) -> Daemon {
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
        // Readiness: the line printed once the tree is mounted and definitions started.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("vgpu-emu daemon:"),
            "daemon did not come up: {line:?}"
        );
        Daemon {
            child,
            root: root.to_path_buf(),
            _dir: None,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn mdevctl(&self, args: &[&str]) -> Output {
        Command::new(mdevctl_bin())
            .args(args)
            .env("MDEVCTL_ENV_ROOT", &self.root)
            .output()
            .unwrap()
    }

    fn mdevctl_ok(&self, args: &[&str]) -> String {
        let out = self.mdevctl(args);
        assert!(
            out.status.success(),
            "mdevctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn sys(&self, rel: &str) -> PathBuf {
        self.root.join("sys").join(rel)
    }

    fn available(&self, parent: &str, ty: &str) -> u32 {
        let p = self.sys(&format!(
            "class/mdev_bus/{parent}/mdev_supported_types/{ty}/available_instances"
        ));
        std::fs::read_to_string(p).unwrap().trim().parse().unwrap()
    }

    fn create(&self, parent: &str, ty: &str, uuid: &str) -> std::io::Result<()> {
        std::fs::write(
            self.sys(&format!(
                "class/mdev_bus/{parent}/mdev_supported_types/{ty}/create"
            )),
            uuid,
        )
    }

    fn socket(&self, uuid: &str) -> PathBuf {
        self.sys(&format!("bus/mdev/devices/{uuid}/vfio-user.sock"))
    }

    fn status(&self, uuid: &str) -> serde_json::Value {
        let socket = self.socket(uuid);
        let out = vgpu_emu_ok(&[
            "status".as_ref(),
            "--json".as_ref(),
            "--socket".as_ref(),
            socket.as_os_str(),
        ]);
        serde_json::from_str(&out).unwrap()
    }

    fn count(&self, what: &str) -> usize {
        match what {
            "fd" => std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                .unwrap()
                .count(),
            "task" => std::fs::read_dir(format!("/proc/{}/task", self.pid()))
                .unwrap()
                .count(),
            "maps" => std::fs::read_to_string(format!("/proc/{}/maps", self.pid()))
                .unwrap()
                .lines()
                .count(),
            _ => unreachable!(),
        }
    }

    fn kill9(mut self) -> PathBuf {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        std::mem::take(&mut self.root)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

fn mounts_at(path: &Path) -> usize {
    let target = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(target.as_str()))
        .count()
}

const U1: &str = "11111111-0000-4000-8000-000000000001";
const U2: &str = "11111111-0000-4000-8000-000000000002";
const U3: &str = "11111111-0000-4000-8000-000000000003";
const GIB: &str = "vgpu_emu-emu_1g-v1";
const M64: &str = "vgpu_emu-emu_64m-v1";

#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn mdevctl_types_lists_every_type_version_as_the_daemon_computes_it() {
    let d = Daemon::start(tempfile::tempdir().unwrap(), &[]);
    let json: serde_json::Value =
        serde_json::from_str(&d.mdevctl_ok(&["types", "--dumpjson"])).unwrap();
    let mut seen: BTreeMap<(String, String), serde_json::Value> = BTreeMap::new();
    for parent in json.as_array().unwrap() {
        for (pname, types) in parent.as_object().unwrap() {
            for t in types.as_array().unwrap() {
                for (tdir, info) in t.as_object().unwrap() {
                    seen.insert((pname.clone(), tdir.clone()), info.clone());
                }
            }
        }
    }
    let catalog = Catalog::builtin().unwrap();
    assert_eq!(
        seen.len(),
        catalog.types().len(),
        "every type version, each in its own directory"
    );
    for ty in catalog.types() {
        let parent = if ty.family == "emu" { "emu0" } else { "m60-0" };
        let dir = format!(
            "vgpu_emu-{}-v{}",
            ty.name.to_lowercase().replace('-', "_"),
            ty.version
        );
        let info = &seen[&(parent.to_string(), dir.clone())];
        assert_eq!(info["name"], ty.key());
        assert_eq!(info["description"], ty.nvidia_description());
        assert_eq!(info["device_api"], "vfio-pci");
        let expected = if ty.personality.is_implemented() {
            catalog.instances_on_empty_parent(ty)
        } else {
            0
        };
        assert_eq!(info["available_instances"], expected, "{dir}");
    }
}

#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn mdevctl_start_list_attrs_capacity_and_stop() {
    let d = Daemon::start(tempfile::tempdir().unwrap(), &[]);
    d.mdevctl_ok(&["start", "-u", U1, "-p", "emu0", "--type", GIB]);
    let list = d.mdevctl_ok(&["list"]);
    assert!(list.contains(&format!("{U1} emu0 {GIB}")), "{list}");
    // The instance's socket, through the tree, accepts a vfio-user client.
    let client = vfio_user::Client::new(&d.socket(U1)).expect("a vfio-user client connects");
    assert_eq!(client.region(0).unwrap().size, 1 << 30);
    drop(client);
    // Capacity: one 1 GiB instance on a 4 GiB parent; other framebuffer sizes are closed.
    assert_eq!(d.available("emu0", GIB), 3);
    assert_eq!(
        d.available("emu0", M64),
        0,
        "one framebuffer size per parent"
    );
    let refused = d.mdevctl(&["start", "-u", U2, "-p", "emu0", "--type", M64]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("No available instances"));
    // An attribute set with --addattr reaches the instance when it starts.
    d.mdevctl_ok(&["define", "-u", U3, "-p", "emu0", "--type", GIB]);
    d.mdevctl_ok(&[
        "modify",
        "-u",
        U3,
        "--addattr",
        "frame_rate_limiter",
        "--value",
        "0",
    ]);
    d.mdevctl_ok(&["start", "-u", U3]);
    assert_eq!(d.status(U3)["frame_rate_limiter"], false);
    assert_eq!(d.status(U1)["frame_rate_limiter"], true);
    assert_eq!(d.available("emu0", GIB), 2);
    // Stop frees the capacity and the socket.
    d.mdevctl_ok(&["stop", "-u", U1]);
    d.mdevctl_ok(&["stop", "-u", U3]);
    assert_eq!(d.available("emu0", GIB), 4);
    assert_eq!(d.available("emu0", M64), 32);
    assert!(!d.root.join(format!("run/{U1}.sock")).exists());
    assert!(d.mdevctl_ok(&["list"]).trim().is_empty());
}

#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn bad_writes_to_create_fail_with_the_kernel_errno_and_change_nothing() {
    let d = Daemon::start(tempfile::tempdir().unwrap(), &[]);
    let errno = |r: std::io::Result<()>| r.unwrap_err().raw_os_error();
    assert_eq!(errno(d.create("emu0", GIB, "garbage")), Some(libc::EINVAL));
    d.create("emu0", GIB, U1).unwrap();
    assert_eq!(errno(d.create("emu0", GIB, U1)), Some(libc::EEXIST));
    assert_eq!(
        errno(d.create("emu0", M64, U2)),
        Some(libc::ENOSPC),
        "no capacity"
    );
    assert_eq!(d.available("emu0", GIB), 3);
    let list = d.mdevctl_ok(&["list"]);
    assert_eq!(list.lines().count(), 1, "{list}");
    // A read-only file and a bad remove are refused too.
    let ro = d.sys(&format!(
        "class/mdev_bus/emu0/mdev_supported_types/{GIB}/available_instances"
    ));
    assert!(std::fs::write(ro, "9").is_err());
    assert_eq!(
        errno(std::fs::write(
            d.sys(&format!("bus/mdev/devices/{U1}/remove")),
            "2"
        )),
        Some(libc::EINVAL)
    );
    assert_eq!(d.available("emu0", GIB), 3);
}

#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn definitions_survive_a_sigkill_and_autostart_on_the_same_type_version() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_at(dir.path(), &[]);
    d.mdevctl_ok(&["define", "-u", U2, "-p", "emu0", "--type", M64, "--auto"]);
    d.mdevctl_ok(&[
        "modify",
        "-u",
        U2,
        "--addattr",
        "frame_rate_limiter",
        "--value",
        "0",
    ]);
    d.mdevctl_ok(&["start", "-u", U1, "-p", "emu0", "--type", M64]);
    let root = d.kill9();
    assert_eq!(
        mounts_at(&root.join("sys")),
        1,
        "SIGKILL leaves the mount behind"
    );
    let d = Daemon::start_at(&root, &["--autostart"]);
    assert_eq!(
        mounts_at(&root.join("sys")),
        1,
        "the stale mount was replaced, not stacked"
    );
    let list = d.mdevctl_ok(&["list"]);
    assert!(
        list.contains(&format!("{U2} emu0 {M64} auto (defined)")),
        "{list}"
    );
    assert!(
        !list.contains(U1),
        "an undefined instance does not come back: {list}"
    );
    assert_eq!(d.status(U2)["type"], "EMU-64M@1");
    assert_eq!(d.status(U2)["frame_rate_limiter"], false);
    let sockets: Vec<String> = std::fs::read_dir(root.join("run"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !sockets.iter().any(|s| s.starts_with(U1)),
        "no stale socket of {U1}: {sockets:?}"
    );
    drop(d);
    assert_eq!(mounts_at(&root.join("sys")), 0, "SIGTERM unmounts");
}

#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn a_200_instance_churn_leaks_no_fd_mapping_or_thread() {
    let d = Daemon::start(tempfile::tempdir().unwrap(), &[]);
    // Settle: one full cycle first.
    d.create("emu0", M64, U1).unwrap();
    std::fs::write(d.sys(&format!("bus/mdev/devices/{U1}/remove")), "1").unwrap();
    let (fds, maps, tasks) = (d.count("fd"), d.count("maps"), d.count("task"));
    for i in 0..200u32 {
        let uuid = format!("22222222-0000-4000-8000-{i:012}");
        if i % 20 == 0 {
            // Through the CLI mirrors now and then.
            let root = d.root.to_str().unwrap();
            vgpu_emu_ok(&[
                "create", "--root", root, "--parent", "emu0", "--type", "EMU-64M", "--uuid", &uuid,
            ]);
            assert!(vgpu_emu_ok(&["list", "--root", root, "--json"]).contains(&uuid));
            vgpu_emu_ok(&["remove", "--root", root, &uuid]);
        } else {
            d.create("emu0", M64, &uuid).unwrap();
            std::fs::write(d.sys(&format!("bus/mdev/devices/{uuid}/remove")), "1").unwrap();
        }
    }
    wait_until(
        Duration::from_secs(10),
        "resources back to the baseline",
        || d.count("fd") == fds && d.count("maps") == maps && d.count("task") == tasks,
    );
    assert_eq!(d.available("emu0", M64), 32);
    assert!(d.mdevctl_ok(&["list"]).trim().is_empty());
}

#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn a_bare_name_creates_the_newest_version() {
    let dir = tempfile::tempdir().unwrap();
    // @2 has the smaller framebuffer, so it sorts before @1 in the table.
    let lab = |version: u32, fb: &str| {
        format!(
            "[[type]]\nname = \"LAB-32M\"\nversion = {version}\nfamily = \"emu\"\npersonality = \"bochs\"\n\
             pci = {{ vendor = 0x1234, device = 0x1111, subsystem_vendor = 0x1234, subsystem_device = 0x2001, class = 0x038000, revision = 2 }}\n\
             framebuffer = \"{fb}\"\nnum_heads = 1\nmax_resolution = \"2560x1440\"\n\
             default_resolution = \"1920x1080\"\nfrl = 30\nmax_instances = 8\n"
        )
    };
    let types = dir.path().join("lab.toml");
    std::fs::write(&types, lab(1, "64M") + &lab(2, "32M")).unwrap();
    let d = Daemon::start(dir, &["--types-file", types.to_str().unwrap()]);
    let root = d.root.to_str().unwrap();
    vgpu_emu_ok(&[
        "create", "--root", root, "--parent", "emu0", "--type", "LAB-32M", "--uuid", U1,
    ]);
    assert_eq!(d.status(U1)["type"], "LAB-32M@2");
    let list = d.mdevctl_ok(&["list"]);
    assert!(
        list.contains(&format!("{U1} emu0 vgpu_emu-lab_32m-v2")),
        "{list}"
    );
}

#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn create_and_remove_refusals_exit_2_for_bad_input_and_1_at_run_time() {
    let d = Daemon::start(tempfile::tempdir().unwrap(), &[]);
    let root = d.root.to_str().unwrap();
    let code = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let create = |parent: &str, ty: &str, uuid: &str| {
        code(&[
            "create", "--root", root, "--parent", parent, "--type", ty, "--uuid", uuid,
        ])
    };
    let (c, e) = create("emu0", "NOPE", U1);
    assert_eq!(c, Some(2), "{e}");
    assert!(e.contains("offers no type `NOPE`"), "{e}");
    let (c, e) = create("nope0", "EMU-64M", U1);
    assert_eq!(c, Some(2), "{e}");
    assert!(e.contains("no parent `nope0`"), "{e}");
    let (c, e) = create("emu0", "bad", "not-a-uuid");
    assert_eq!(c, Some(2), "{e}");
    let (c, e) = code(&["remove", "--root", root, U2]);
    assert_eq!(c, Some(2), "{e}");
    assert!(e.contains(&format!("no instance {U2}")), "{e}");
    // Run-time refusals: the UUID is taken, no capacity left.
    let (c, e) = create("emu0", "EMU-1G", U1);
    assert_eq!(c, Some(0), "{e}");
    let (c, e) = create("emu0", "EMU-1G", U1);
    assert_eq!(c, Some(1), "{e}");
    assert!(e.contains("already exists"), "{e}");
    let (c, e) = create("emu0", "EMU-64M", U2);
    assert_eq!(c, Some(1), "{e}");
    assert!(d.mdevctl_ok(&["list"]).contains(U1));
}

#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn refusals_give_their_reason_in_the_cli_and_the_tree() {
    let d = Daemon::start(tempfile::tempdir().unwrap(), &[]);
    let root = d.root.to_str().unwrap();
    let reason = |parent: &str, ty: &str| {
        std::fs::read_to_string(d.sys(&format!(
            "class/mdev_bus/{parent}/mdev_supported_types/{ty}/unavailable_reason"
        )))
        .unwrap()
    };
    let m60 = "vgpu_emu-m60_2q-v1";
    assert_eq!(
        reason("m60-0", m60),
        "personality `virtio-gpu` is listed but not served by this build yet\n"
    );
    assert_eq!(reason("emu0", M64), "", "instances are available");
    let create = |parent: &str, ty: &str, uuid: &str| {
        let out = Command::new(BIN)
            .args([
                "create", "--root", root, "--parent", parent, "--type", ty, "--uuid", uuid,
            ])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (c, e) = create("m60-0", "M60-2Q", U1);
    assert_eq!(c, Some(2), "{e}");
    assert!(
        e.contains("no available instances of M60-2Q@1 on m60-0: personality `virtio-gpu` is listed but not served"),
        "{e}"
    );
    d.create("emu0", GIB, U1).unwrap();
    let size_rule = "the parent hosts 1 instance(s) with a 1024M framebuffer, and a parent hosts one framebuffer size at a time (64M wanted)";
    assert_eq!(reason("emu0", M64), format!("{size_rule}\n"));
    let (c, e) = create("emu0", "EMU-64M", U2);
    assert_eq!(c, Some(1), "{e}");
    assert!(e.contains(size_rule), "{e}");
    // mdevctl still reads the type directories (the extra file is not in its way).
    let json: serde_json::Value =
        serde_json::from_str(&d.mdevctl_ok(&["types", "--dumpjson"])).unwrap();
    let emu0 = json
        .as_array()
        .unwrap()
        .iter()
        .find_map(|p| p.get("emu0"))
        .unwrap();
    let m64 = emu0
        .as_array()
        .unwrap()
        .iter()
        .find_map(|t| t.get(M64))
        .unwrap();
    assert_eq!(m64["available_instances"], 0);
    assert_eq!(
        m64["description"],
        Catalog::builtin()
            .unwrap()
            .resolve("EMU-64M@1")
            .unwrap()
            .nvidia_description()
    );
}

#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn a_deprecated_version_says_so_in_the_tree_and_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let lab = |version: u32, extra: &str| {
        format!(
            "[[type]]\nname = \"LAB-32M\"\nversion = {version}\nfamily = \"emu\"\npersonality = \"bochs\"\n\
             pci = {{ vendor = 0x1234, device = 0x1111, subsystem_vendor = 0x1234, subsystem_device = 0x2001, class = 0x038000, revision = 2 }}\n\
             framebuffer = \"32M\"\nnum_heads = 1\nmax_resolution = \"2560x1440\"\n\
             default_resolution = \"1920x1080\"\nfrl = 30\nmax_instances = 8\n{extra}\n"
        )
    };
    let types = dir.path().join("lab.toml");
    std::fs::write(&types, lab(1, "deprecated = true") + &lab(2, "")).unwrap();
    let root = dir.path().join("root");
    let mut child = Command::new(BIN)
        .arg("--types-file")
        .arg(&types)
        .arg("daemon")
        .arg("--root")
        .arg(&root)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("vgpu-emu daemon:"), "{line}");
    let name = |v: u32| {
        std::fs::read_to_string(root.join(format!(
            "sys/class/mdev_bus/emu0/mdev_supported_types/vgpu_emu-lab_32m-v{v}/name"
        )))
        .unwrap()
    };
    assert_eq!(name(1), "LAB-32M@1 (deprecated)\n");
    assert_eq!(name(2), "LAB-32M@2\n");
    std::fs::write(
        root.join("sys/class/mdev_bus/emu0/mdev_supported_types/vgpu_emu-lab_32m-v1/create"),
        U1,
    )
    .unwrap();
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{U1}: type LAB-32M@1 is deprecated; a bare LAB-32M resolves to LAB-32M@2"
        )),
        "{err}"
    );
}

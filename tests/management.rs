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

use common::{
    eventfd, eventfd_take, run_script, spawn_daemon, spawn_ready, terminate, vgpu_emu_ok,
    wait_until, Peer, BIN, SET_IRQS,
};
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
        Daemon {
            child: spawn_daemon(root, args),
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
            // Mappings of shared memory (VRAM, guest RAM): what an instance maps and must
            // unmap. Anonymous mappings are left out: the C library's allocator adds an arena
            // (two mappings) when threads contend, once, which is growth but not a leak.
            "maps" => std::fs::read_to_string(format!("/proc/{}/maps", self.pid()))
                .unwrap()
                .lines()
                .filter(|l| l.contains("/memfd:"))
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
        terminate(&mut self.child);
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
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = (d.count("fd"), d.count("maps"), d.count("task"));
        if now == (fds, maps, tasks) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "descriptors, mappings, threads not back to {:?}: {now:?}",
            (fds, maps, tasks)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(d.available("emu0", M64), 32);
    assert!(d.mdevctl_ok(&["list"]).trim().is_empty());
}

/// Runs `sh -c SCRIPT` as user and group `nobody` (65534) with no supplementary groups.
fn as_nobody(script: &str) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .output()
        .expect("run setpriv (util-linux)")
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn other_users_read_the_tree_but_cannot_manage_instances() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    // Let other users reach the root, as they reach /sys.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start(dir, &[]);
    d.create("emu0", M64, U1).unwrap();
    let ty = d.sys(&format!("class/mdev_bus/emu0/mdev_supported_types/{M64}"));
    let inst = d.sys(&format!("bus/mdev/devices/{U1}"));
    // sysfs's modes, owned by the daemon's user (root here).
    for (path, mode) in [
        (ty.clone(), 0o755),
        (ty.join("name"), 0o444),
        (ty.join("available_instances"), 0o444),
        (ty.join("create"), 0o200),
        (inst.join("remove"), 0o200),
        (inst.join("frame_rate_limiter"), 0o644),
    ] {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(mode_of(&path), mode, "{}", path.display());
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{}", path.display());
    }
    let ctl = d.root.join("run/daemon.ctl");
    let sock = d.root.join(format!("run/{U1}.sock"));
    for s in [&ctl, &sock, &common::ctl_path(&sock)] {
        assert_eq!(mode_of(s), 0o600, "{}", s.display());
    }

    // Reads are for everyone.
    let out = as_nobody(&format!(
        "cat {0}/name {0}/available_instances {1}/frame_rate_limiter",
        ty.display(),
        inst.display()
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "EMU-64M@1\n31\n1\n");

    // Writes are refused by the kernel, and change nothing.
    let refused = |script: String| {
        let out = as_nobody(&script);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "`{script}` worked as nobody");
        assert!(err.contains("Permission denied"), "`{script}`: {err}");
    };
    refused(format!("echo {U2} > {}/create", ty.display()));
    refused(format!("echo 1 > {}/remove", inst.display()));
    refused(format!("echo 0 > {}/frame_rate_limiter", inst.display()));
    // Nor can they reach the sockets that manage instances.
    refused(format!("{BIN} status --socket {}", sock.display()));
    refused(format!("{BIN} list --root {}", d.root.display()));
    let list = d.mdevctl_ok(&["list"]);
    assert_eq!(list.lines().count(), 1, "{list}");
    assert!(list.contains(U1) && !list.contains(U2), "{list}");
    assert_eq!(d.available("emu0", M64), 31);
    assert_eq!(d.status(U1)["frame_rate_limiter"], true);

    // The owner still manages.
    std::fs::write(inst.join("frame_rate_limiter"), "0").unwrap();
    assert_eq!(d.status(U1)["frame_rate_limiter"], false);
    std::fs::write(inst.join("remove"), "1").unwrap();
    assert_eq!(d.available("emu0", M64), 32);
}

/// Connects to `path` and says nothing for as long as the stream lives.
fn silent_client(path: &Path) -> std::os::unix::net::UnixStream {
    std::os::unix::net::UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("connect {}: {e}", path.display()))
}

#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn silent_control_clients_stall_neither_requests_nor_removal() {
    use std::time::Instant;
    let d = Daemon::start(tempfile::tempdir().unwrap(), &[]);
    d.create("emu0", M64, U1).unwrap();
    d.create("emu0", M64, U2).unwrap();
    let ctl = common::ctl_path(&d.root.join(format!("run/{U1}.sock")));

    // A client that connected and says nothing does not hold up the next one.
    let _silent = silent_client(&ctl);
    let silent_daemon = silent_client(&d.root.join("run/daemon.ctl"));
    let t = Instant::now();
    assert_eq!(d.status(U1)["uuid"], U1);
    let root = d.root.display().to_string();
    assert!(vgpu_emu_ok(&["list", "--root", &root]).contains(U1));
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "status and list took {took:?} behind silent clients"
    );

    // Many silent clients: the endpoint answers `busy` at once, and starts no thread for them.
    let tasks = d.count("task");
    let crowd: Vec<_> = (0..40).map(|_| silent_client(&ctl)).collect();
    let busy = Command::new(BIN)
        .args(["status", "--socket"])
        .arg(d.root.join(format!("run/{U1}.sock")))
        .output()
        .unwrap();
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("busy"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    assert_eq!(d.count("task"), tasks, "threads for 40 silent clients");
    // Another instance is not affected.
    assert_eq!(d.status(U2)["uuid"], U2);

    // Removal does not wait on the clients; the tree answers meanwhile.
    let t = Instant::now();
    std::fs::write(d.sys(&format!("bus/mdev/devices/{U1}/remove")), "1").unwrap();
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "removal with silent control clients took {took:?}"
    );
    assert_eq!(d.available("emu0", M64), 31);
    drop(crowd);
    // A silent client is cut off after its deadline.
    let mut silent = silent_daemon;
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    let t = Instant::now();
    assert_eq!(
        std::io::Read::read_to_end(&mut silent, &mut rest).unwrap(),
        0
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "cut off after {:?}",
        t.elapsed()
    );
}

/// Runs `vgpu-emu daemon --root ROOT` (through `wrapper` when given) expecting it to refuse to
/// start: returns its exit code and stderr. Fails if it comes up instead.
fn daemon_refuses(wrapper: &[&str], root: &Path) -> (i32, String) {
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    let mut child = cmd
        .arg("daemon")
        .arg("--root")
        .arg(root)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(Duration::from_secs(20), "the daemon to exit", || {
            status = child.try_wait().unwrap();
            status.is_some()
        })
    }));
    if waited.is_err() {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = child.wait_with_output().unwrap();
        panic!(
            "the daemon started on {} instead of refusing: {}",
            root.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).starts_with("vgpu-emu daemon:"),
        "it came up"
    );
    (
        status.unwrap().code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn the_daemon_cleans_up_only_what_is_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let sys = root.join("sys");
    // Someone else's filesystems where the tree goes: refused, and left mounted.
    for fstype in ["tmpfs", "sysfs"] {
        std::fs::create_dir_all(&sys).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", fstype, fstype])
            .arg(&sys)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount {fstype}");
        let (code, err) = daemon_refuses(&[], root);
        let still = mounts_at(&sys);
        let unmounted = Command::new("umount").arg(&sys).status().unwrap();
        assert_eq!(still, 1, "the {fstype} at {} was detached", sys.display());
        assert!(unmounted.success());
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains(&format!(
                "{} is a mount of {fstype} (source `{fstype}`), not a vgpu-emu tree",
                sys.display()
            )),
            "{err}"
        );
    }
    // Files in the tree's directory are not hidden under the mount.
    std::fs::write(sys.join("keep"), "x").unwrap();
    let (code, err) = daemon_refuses(&[], root);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{} is not empty", sys.display())),
        "{err}"
    );
    std::fs::remove_file(sys.join("keep")).unwrap();

    // Another service's dead socket in run/ survives; ours (a UUID's) are cleaned up.
    let run = root.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let foreign = run.join("other-service.sock");
    let stale = run.join(format!("{U1}.sock"));
    for s in [&foreign, &stale] {
        drop(std::os::unix::net::UnixListener::bind(s).unwrap());
        assert!(s.exists());
    }
    let d = Daemon::start_at(root, &[]);
    assert!(foreign.exists(), "a socket that is not ours was removed");
    assert!(!stale.exists(), "our stale socket stayed");
    // A SIGTERM right after the readiness line stops it cleanly.
    drop(d);
    assert_eq!(mounts_at(&sys), 0, "SIGTERM unmounts");
    assert!(
        !run.join("daemon.ctl").exists(),
        "SIGTERM removes the control socket"
    );
    assert!(foreign.exists());
}

#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn shared_system_directories_are_refused_as_roots() {
    // In a private mount namespace, so a daemon that wrongly went ahead could not harm the host.
    let private = ["unshare", "--mount", "--propagation", "private"];
    for root in ["/", "/tmp", "/run"] {
        let (code, err) = daemon_refuses(&private, Path::new(root));
        assert_eq!(code, 2, "{root}: {err}");
        assert!(
            err.contains(&format!("{root} is a shared system directory")),
            "{root}: {err}"
        );
    }
    assert!(
        Path::new("/sys/kernel").exists(),
        "the host keeps its sysfs"
    );
}

/// A fresh directory whose path is exactly `len` bytes long.
fn root_of_len(base: &Path, len: usize) -> PathBuf {
    let used = base.as_os_str().len() + 1;
    let root = base.join("r".repeat(len - used));
    assert_eq!(root.as_os_str().len(), len);
    root
}

#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn long_roots_are_refused_up_front_and_a_fitting_one_works() {
    let dir = tempfile::tempdir().unwrap();
    // 57 bytes is the most: DIR/run/<uuid>.sock.ctl is then 107 bytes.
    for len in [58, 86] {
        let root = root_of_len(dir.path(), len);
        let (code, err) = daemon_refuses(&[], &root);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains(&format!(
                "root {} is {len} bytes long: instance sockets under it",
                root.display()
            )) && err.contains(
                "over the 107 a UNIX socket path may have; use a root of at most 57 bytes"
            ),
            "{err}"
        );
    }
    // 57 bytes: the sockets fit, the tree's links to them do not; QEMU gets DIR/run/<uuid>.sock.
    let root = root_of_len(dir.path(), 57);
    let d = Daemon::start_at(&root, &[]);
    d.mdevctl_ok(&["start", "-u", U1, "-p", "emu0", "--type", M64]);
    let list: serde_json::Value = serde_json::from_str(&vgpu_emu_ok(&[
        "list",
        "--root",
        root.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let socket = PathBuf::from(list[0]["socket"].as_str().unwrap());
    assert_eq!(socket, root.join(format!("run/{U1}.sock")));
    let client = vfio_user::Client::new(&socket).expect("a vfio-user client connects");
    drop(client);
    // The CLI follows the tree's link itself.
    assert_eq!(d.status(U1)["uuid"], U1);
    d.mdevctl_ok(&["stop", "-u", U1]);
}

#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn accept_failures_are_logged_rate_limited_and_retried() {
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let log_path = dir.path().join("daemon.log");
    let (child, _) = spawn_ready(
        Command::new(BIN)
            .arg("daemon")
            .arg("--root")
            .arg(&root)
            .env("RUST_LOG", "warn")
            .stderr(std::fs::File::create(&log_path).unwrap()),
        "vgpu-emu daemon:",
    );
    let d = Daemon {
        child,
        root: root.clone(),
        _dir: None,
    };
    d.create("emu0", M64, U1).unwrap();
    let socket = root.join(format!("run/{U1}.sock"));
    let prlimit = |limit: usize| {
        let ok = Command::new("prlimit")
            .arg(format!("--pid={}", d.pid()))
            // The soft limit only: raising it again needs no privilege.
            .arg(format!("--nofile={limit}:"))
            .status()
            .unwrap();
        assert!(ok.success(), "prlimit");
    };
    // No descriptor left: every accept fails while a client waits in the backlog.
    // Descriptors 0-2 are open (stdin, stdout, stderr): with a limit of 3 no new one can be
    // made, while those already open stay usable.
    prlimit(3);
    let mut waiting = silent_client(&common::ctl_path(&socket));
    let failures = || {
        std::fs::read_to_string(&log_path)
            .unwrap()
            .lines()
            .filter(|l| l.contains("accept failed"))
            .count()
    };
    // (A design that blocks in accept(2) holds a descriptor taken before the limit, and fails
    // only on the connection after; a client that stalls it for its timeout delays that.)
    wait_until(Duration::from_secs(30), "an accept failure logged", || {
        failures() > 0
    });
    // A window of the retry loop: at most one burst of lines, however often it retried.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let logged = failures();
    assert!(logged <= 10, "{logged} accept failures logged in 1.5 s");
    // Descriptors back: the waiting client is served without connecting again.
    prlimit(1024);
    use std::io::Write;
    writeln!(waiting, r#"{{"op":"status"}}"#).unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = String::new();
    BufReader::new(&waiting).read_line(&mut reply).unwrap();
    assert!(reply.contains(r#""ok":true"#), "{reply}");
}

#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn a_failed_start_reports_its_cause_and_a_kernel_errno() {
    let d = Daemon::start(tempfile::tempdir().unwrap(), &[]);
    let run = d.root.join("run");
    // The run directory turns read-only under the daemon (its control socket still answers).
    let sh = |script: &str| {
        let ok = Command::new("sh").args(["-c", script]).status().unwrap();
        assert!(ok.success(), "{script}");
    };
    let r = run.display();
    sh(&format!(
        "mount --bind {r} {r} && mount -o remount,bind,ro {r}"
    ));
    let through_tree = d.create("emu0", M64, U1);
    let cli = Command::new(BIN)
        .args([
            "create", "--parent", "emu0", "--type", "EMU-64M", "--uuid", U2, "--root",
        ])
        .arg(&d.root)
        .output()
        .unwrap();
    sh(&format!("umount {r}"));
    assert_eq!(
        through_tree.unwrap_err().raw_os_error(),
        Some(libc::EROFS),
        "mdevctl sees the cause's errno, not EIO"
    );
    let err = String::from_utf8_lossy(&cli.stderr);
    assert!(!cli.status.success());
    assert!(
        err.contains(&format!(
            "cannot start the instance: cannot listen on {}/{U2}.sock: Read-only file system",
            run.display()
        )),
        "{err}"
    );
    assert!(d.mdevctl_ok(&["list"]).trim().is_empty());
    assert_eq!(d.available("emu0", M64), 32);
    // And once the directory is writable again, the same create works.
    d.create("emu0", M64, U1).unwrap();
}

#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn a_bare_name_creates_the_newest_version() {
    let dir = tempfile::tempdir().unwrap();
    // @2 has the smaller framebuffer, so it sorts before @1 in the table.
    let lab = |version: u32, framebuffer: &str| {
        vgpu_model::catalog::TestType {
            version,
            framebuffer,
            ..Default::default()
        }
        .toml()
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
    assert_eq!(reason("m60-0", m60), "", "the M60 family is served");
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
    // An unknown parent is bad input.
    let (c, e) = create("m60-9", "M60-2Q", U1);
    assert_eq!(c, Some(2), "{e}");
    assert!(e.contains("m60-9"), "{e}");
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
        vgpu_model::catalog::TestType {
            version,
            extra,
            ..Default::default()
        }
        .toml()
    };
    let types = dir.path().join("lab.toml");
    std::fs::write(&types, lab(1, "deprecated = true") + &lab(2, "")).unwrap();
    let root = dir.path().join("root");
    let (child, _) = spawn_ready(
        Command::new(BIN)
            .arg("--types-file")
            .arg(&types)
            .arg("daemon")
            .arg("--root")
            .arg(&root)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::piped()),
        "vgpu-emu daemon:",
    );
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

/// Removing an instance that a client uses asks the client to release it (the VFIO request
/// interrupt, which QEMU answers by unplugging the device from the guest and disconnecting),
/// waits for that without holding the tree, and fails with EBUSY when the client does not let
/// go in time. It once closed the client's connection under a running guest.
#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn removing_an_instance_in_use_asks_its_client_to_release_it() {
    use std::os::fd::AsRawFd;
    let d = Daemon::start(tempfile::tempdir().unwrap(), &["--release-timeout", "2"]);
    let ty = "vgpu_emu-emu_16m-v1";
    let uuid = "7e0e0000-0000-4000-8000-000000000001";
    d.create("emu0", ty, uuid).unwrap();
    let remove = d.sys(&format!("bus/mdev/devices/{uuid}/remove"));
    // A client with an eventfd on the REQ index (4), as QEMU assigns one.
    let req = |peer: &mut Peer, efd: &std::os::fd::OwnedFd| {
        let mut set = 20u32.to_le_bytes().to_vec();
        for v in [4u32 | 32, 4, 0, 1] {
            set.extend_from_slice(&v.to_le_bytes());
        }
        let r = peer.call_fds(SET_IRQS, &set, &[efd.as_raw_fd()]);
        assert!(!r.is_error(), "{r:?}");
    };

    // A client that ignores the request: EBUSY after the wait, the instance stays, and the tree
    // answered while the removal waited.
    let mut stubborn = Peer::negotiated(&d.socket(uuid));
    let efd = eventfd();
    req(&mut stubborn, &efd);
    let started = std::time::Instant::now();
    let waiter = {
        let remove = remove.clone();
        std::thread::spawn(move || std::fs::write(remove, "1"))
    };
    wait_until(Duration::from_secs(5), "the request interrupt", || {
        eventfd_take(&efd) > 0
    });
    let t = std::time::Instant::now();
    assert_eq!(
        d.available("emu0", ty),
        63,
        "the tree answers during the wait"
    );
    assert!(t.elapsed() < Duration::from_millis(500));
    let e = waiter.join().unwrap().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(d.socket(uuid).exists(), "the instance stays");
    assert_eq!(stubborn.dispi(0), 0xb0c5, "and its client is still served");

    // The same through `vgpu-emu remove`: it fails (exit 1, in use) after the wait, and the
    // daemon's control socket answers other requests meanwhile.
    let root = d.root.clone();
    let waiter = std::thread::spawn(move || {
        Command::new(BIN)
            .args(["remove", "--root"])
            .arg(&root)
            .arg(uuid)
            .output()
            .unwrap()
    });
    wait_until(Duration::from_secs(5), "the request interrupt", || {
        eventfd_take(&efd) > 0
    });
    let t = std::time::Instant::now();
    let list = vgpu_emu_ok(&["list".as_ref(), "--root".as_ref(), d.root.as_os_str()]);
    assert!(list.contains(uuid), "{list}");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "list waited {:?}",
        t.elapsed()
    );
    let out = waiter.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
    assert!(d.socket(uuid).exists(), "the instance stays");

    // A client that does as asked (as QEMU does): the removal succeeds once it has gone.
    let (tx, rx) = std::sync::mpsc::channel();
    let cooperative = std::thread::spawn(move || {
        let mut pfd = libc::pollfd {
            fd: efd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one live pollfd for up to 10 s.
        let ready = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        tx.send(ready).unwrap();
        drop(stubborn);
    });
    std::fs::write(&remove, "1").expect("removed once the client let go");
    assert_eq!(rx.recv().unwrap(), 1, "the client was asked");
    cooperative.join().unwrap();
    assert!(!d.socket(uuid).exists());
    assert_eq!(d.available("emu0", ty), 64);

    // Nobody attached: removed at once.
    d.create("emu0", ty, uuid).unwrap();
    let t = std::time::Instant::now();
    std::fs::write(&remove, "1").unwrap();
    assert!(t.elapsed() < Duration::from_secs(1));
}

/// A daemon holds about seven descriptors per instance: it raises its soft limit to the hard
/// one at start, so a default soft limit of 1024 does not stop it at about 140 instances.
#[test]
#[ignore = "needs root, FUSE and mdevctl (qemu-scripts/provision-mdevctl); run by the README's full test command"]
fn the_daemon_raises_its_descriptor_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _) = spawn_ready(
        Command::new("prlimit")
            .arg("--nofile=256:8192")
            .arg(BIN)
            .arg("daemon")
            .arg("--root")
            .arg(dir.path())
            .env("RUST_LOG", "warn"),
        "vgpu-emu daemon:",
    );
    let d = Daemon {
        child,
        root: dir.path().to_path_buf(),
        _dir: Some(dir),
    };
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = open_files.split_whitespace().collect();
    assert_eq!((fields[3], fields[4]), ("8192", "8192"), "{open_files}");
}

#[test]
#[ignore = "needs root and FUSE; run by the README's full test command"]
fn the_daemon_gives_every_head_a_vnc_port_from_its_range_and_takes_them_back() {
    // A range of eight ports somewhere above the ephemeral ones' usual start; a port someone
    // else holds is skipped, so the test does not need the range to be free.
    let first = 42000 + (std::process::id() % 2000) as u16 * 8;
    let range = format!("127.0.0.1:{first}-{}", first + 7);
    let d = Daemon::start(
        tempfile::tempdir().unwrap(),
        &[
            "--vnc",
            &range,
            "--web",
            "127.0.0.1:0",
            "--socket-owner",
            "65534:65534",
        ],
    );
    let root = d.root.display().to_string();
    d.create("m60-0", "vgpu_emu-m60_2q-v1", U1).unwrap();
    d.create("emu0", M64, U2).unwrap();
    let list: serde_json::Value =
        serde_json::from_str(&vgpu_emu_ok(&["list", "--root", &root, "--json"])).unwrap();
    let ports = |uuid: &str| -> Vec<u16> {
        let list: serde_json::Value =
            serde_json::from_str(&vgpu_emu_ok(&["list", "--root", &root, "--json"])).unwrap();
        let inst = list
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["uuid"] == uuid)
            .unwrap_or_else(|| panic!("{uuid} not listed: {list}"))
            .clone();
        inst["viewers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                let web = v["web"].as_str().unwrap();
                assert!(web.contains(&format!("ws/{uuid}/")), "{web}");
                v["vnc"]
                    .as_str()
                    .unwrap()
                    .rsplit(':')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect()
    };
    let m60 = ports(U1);
    let emu = ports(U2);
    assert_eq!((m60.len(), emu.len()), (4, 1), "{list}");
    let mut all: Vec<u16> = m60.iter().chain(&emu).copied().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 5, "distinct ports: {all:?}");
    assert!(
        all.iter().all(|p| (first..first + 8).contains(p)),
        "{all:?}"
    );
    // Instance sockets go to the VMMs' user (--socket-owner), still 0600.
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(d.root.join(format!("run/{U2}.sock"))).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    // The instance's own status agrees with the daemon's list.
    let status = d.status(U2);
    assert_eq!(
        status["heads"][0]["vnc"],
        format!("127.0.0.1:{}", emu[0]),
        "{status}"
    );
    // Each port serves RFB.
    for p in &all {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", *p)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut v = [0u8; 12];
        std::io::Read::read_exact(&mut s, &mut v).unwrap();
        assert_eq!(&v, b"RFB 003.008\n", "port {p}");
    }
    // Removing the M60 frees its four ports for the next instance.
    std::fs::write(d.sys(&format!("bus/mdev/devices/{U1}/remove")), "1").unwrap();
    d.create("m60-0", "vgpu_emu-m60_2q-v1", U3).unwrap();
    let mut again = ports(U3);
    again.sort();
    let mut freed = m60.clone();
    freed.sort();
    assert_eq!(again, freed, "the freed ports are handed out again");
    let text = vgpu_emu_ok(&["list", "--root", &root]);
    let head3 = ports(U3)[3];
    assert!(
        text.contains(&format!("head 3: vnc 127.0.0.1:{head3}")),
        "{text}"
    );
}

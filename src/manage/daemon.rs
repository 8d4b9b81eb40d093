//! `vgpu-emu daemon --root DIR`: many instances from one process, an mdev-shaped tree at
//! `DIR/sys` (FUSE), mdevctl's directories, persistence through mdevctl's own definitions, and a
//! control socket (`DIR/run/daemon.ctl`) for `vgpu-emu list/create/remove`.
//!
//! ```text
//! DIR/sys/                              the mdev tree (see mdevfs)
//! DIR/etc/mdevctl.d/<parent>/<uuid>     definitions, written by mdevctl define (JSON)
//! DIR/usr/lib/mdevctl/scripts.d/{callouts,notifiers}   required by mdevctl
//! DIR/run/<uuid>.sock, <uuid>.sock.ctl  instance sockets; daemon.ctl
//! ```
//!
//! A daemon killed with SIGKILL leaves its mount and sockets behind; the next start on the same
//! root detaches the stale mount and removes the stale sockets first, and nothing else: only a
//! FUSE mount named `vgpu-emu` (per /proc/self/mountinfo) and dead sockets named as above. Any
//! other mount or file where the tree goes, a shared system directory as the root, or a root too
//! long for its sockets' addresses ([`MAX_ROOT`]) is refused with a message that says why.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::error::CliError;
use crate::manage::control::{ControlServer, Later};
use crate::manage::manager::{InstanceInfo, Manager, ParentSpec};
use crate::manage::mdevfs::{MdevFs, SharedManager};
use crate::sys::socket;

/// The source (fsname) of the tree's FUSE mount, by which a later start knows it as ours.
pub const FS_NAME: &str = "vgpu-emu";

/// Validated `daemon` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonConfig {
    /// The root directory.
    pub root: PathBuf,
    /// Parents to simulate.
    pub parents: Vec<ParentSpec>,
    /// Start definitions marked `"start": "auto"`.
    pub autostart: bool,
    /// How long a removal waits for a client to release an instance.
    pub release_timeout: std::time::Duration,
    /// Live viewers of every instance's heads (off unless `--vnc` or `--web`).
    pub viewers: crate::display::config::ViewerConfig,
    /// Who instance sockets are handed to (the VMMs' user), if not the daemon's.
    pub socket_owner: Option<socket::Owner>,
}

/// The default root: `$XDG_RUNTIME_DIR/vgpu-emu`, else `/run/vgpu-emu`.
pub fn default_root() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => Path::new(&d).join("vgpu-emu"),
        _ => PathBuf::from("/run/vgpu-emu"),
    }
}

/// The daemon's control socket under `root`.
pub fn control_socket(root: &Path) -> PathBuf {
    root.join("run/daemon.ctl")
}

/// A control request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// All instances.
    List,
    /// Create an instance.
    Create {
        /// Parent name.
        parent: String,
        /// Type directory or `NAME[@VERSION]`.
        #[serde(rename = "type")]
        ty: String,
        /// UUID (random when absent).
        uuid: Option<String>,
    },
    /// Remove an instance.
    Remove {
        /// UUID.
        uuid: String,
    },
}

/// A control reply.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    /// Success.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The refusal is about bad input (see `ManageError::is_bad_input`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bad_input: bool,
    /// Instances (list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<Vec<InstanceInfo>>,
    /// The created instance (create).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

/// Why the daemon refuses a root.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// A directory the system or other services own.
    #[error(
        "{} is a shared system directory; give the daemon a directory of its own, such as /run/vgpu-emu",
        .0.display()
    )]
    Shared(PathBuf),
    /// Sockets under the root would not fit in a socket address.
    #[error(
        "root {} is {len} bytes long: instance sockets under it ({}/run/<uuid>.sock.ctl) would be {} bytes, over the {} a UNIX socket path may have; use a root of at most {} bytes",
        root.display(), root.display(), len + SOCKET_SUFFIX, socket::MAX_SOCKET_PATH, MAX_ROOT
    )]
    TooLong {
        /// The root.
        root: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// Something else is mounted where the tree goes.
    #[error(
        "{} is a mount of {fstype} (source `{device}`), not a vgpu-emu tree; the daemon replaces only its own stale mounts: unmount it or choose another root",
        path.display()
    )]
    ForeignMount {
        /// The mount point.
        path: PathBuf,
        /// Its filesystem type.
        fstype: String,
        /// Its source (device or fsname).
        device: String,
    },
    /// The tree's directory holds files.
    #[error(
        "{} is not empty; the daemon mounts its tree there: empty it or choose another root",
        .0.display()
    )]
    NotEmpty(PathBuf),
    /// The tree's directory is something else.
    #[error("{} exists and is not a directory", .0.display())]
    NotDir(PathBuf),
    /// A stale tree of ours could not be detached.
    #[error("cannot detach the stale vgpu-emu tree at {}", path.display())]
    Detach {
        /// The mount point.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The root could not be read or made.
    #[error("cannot prepare {}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What the longest socket under a root adds to it: `/run/<uuid>.sock.ctl`.
const SOCKET_SUFFIX: usize = "/run/".len() + 36 + ".sock.ctl".len();
/// The longest root whose sockets fit in a socket address.
pub const MAX_ROOT: usize = socket::MAX_SOCKET_PATH - SOCKET_SUFFIX;
/// What the tree's link to an instance socket adds to the root:
/// `/sys/bus/mdev/devices/<uuid>/vfio-user.sock`.
const TREE_LINK_SUFFIX: usize = "/sys/bus/mdev/devices/".len() + 36 + "/vfio-user.sock".len();

/// Directories the system or other services own: never a daemon's root.
const SHARED_DIRS: &[&str] = &[
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/lib64",
    "/media",
    "/mnt",
    "/opt",
    "/proc",
    "/root",
    "/run",
    "/run/user",
    "/sbin",
    "/srv",
    "/sys",
    "/tmp",
    "/usr",
    "/var",
    "/var/lib",
    "/var/run",
    "/var/tmp",
];

/// One line of /proc/self/mountinfo: mount point, filesystem type, source.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    point: PathBuf,
    fstype: String,
    source: String,
}

impl Mount {
    /// Our tree: a FUSE mount with our fsname.
    fn is_ours(&self) -> bool {
        (self.fstype == "fuse" || self.fstype == format!("fuse.{FS_NAME}"))
            && self.source == FS_NAME
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (b[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo (proc(5)): `id parent major:minor root point options [optional...] -
/// fstype source super-options`.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            Some(Mount {
                point: PathBuf::from(unescape(fields.get(4)?)),
                fstype: unescape(fields.get(dash + 1)?),
                source: unescape(fields.get(dash + 2)?),
            })
        })
        .collect()
}

/// The mounts at `point` (canonical), bottom first.
fn mounts_at(point: &Path) -> Result<Vec<Mount>, RootError> {
    let info = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(info).map_err(|source| RootError::Io {
        path: info.to_path_buf(),
        source,
    })?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.point == point)
        .collect())
}

/// Makes `root` absolute and checks it is one a daemon may own: not a shared system directory,
/// short enough for its sockets.
fn check_root(root: &Path) -> Result<PathBuf, RootError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RootError::Io { path, source }
    };
    let abs = std::path::absolute(root).map_err(io(root))?;
    // Refuse before creating anything.
    let shared = |p: &Path| SHARED_DIRS.iter().any(|d| p == Path::new(d));
    if shared(&abs) {
        return Err(RootError::Shared(abs));
    }
    let too_long = |root: PathBuf| {
        let len = root.as_os_str().len();
        match len > MAX_ROOT {
            true => Err(RootError::TooLong { root, len }),
            false => Ok(root),
        }
    };
    if !abs.exists() {
        // Nothing to resolve yet: refuse before creating it.
        too_long(abs.clone())?;
    }
    std::fs::create_dir_all(&abs).map_err(io(&abs))?;
    let root = std::fs::canonicalize(&abs).map_err(io(&abs))?;
    if shared(&root) {
        return Err(RootError::Shared(root));
    }
    too_long(root)
}

/// Readies `sys` for the tree: detaches a stale tree of ours, refuses any other mount and a
/// directory with something in it.
fn prepare_sys(sys: &Path) -> Result<(), RootError> {
    let mounts = mounts_at(sys)?;
    if let Some(m) = mounts.iter().find(|m| !m.is_ours()) {
        return Err(RootError::ForeignMount {
            path: sys.to_path_buf(),
            fstype: m.fstype.clone(),
            device: m.source.clone(),
        });
    }
    for _ in &mounts {
        let c = std::ffi::CString::new(sys.as_os_str().as_encoded_bytes())
            .map_err(|_| RootError::NotDir(sys.to_path_buf()))?;
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(RootError::Detach {
                path: sys.to_path_buf(),
                source: std::io::Error::last_os_error(),
            });
        }
        info!("detached a stale vgpu-emu tree at {}", sys.display());
    }
    match std::fs::symlink_metadata(sys) {
        Ok(meta) if meta.is_dir() => {
            let mut entries = std::fs::read_dir(sys).map_err(|source| RootError::Io {
                path: sys.to_path_buf(),
                source,
            })?;
            if entries.next().is_some() {
                return Err(RootError::NotEmpty(sys.to_path_buf()));
            }
            Ok(())
        }
        Ok(_) => Err(RootError::NotDir(sys.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(sys).map_err(|source| RootError::Io {
                path: sys.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(RootError::Io {
            path: sys.to_path_buf(),
            source,
        }),
    }
}

/// Whether `name` is a socket a daemon creates in `run/`: `daemon.ctl`, `<uuid>.sock`,
/// `<uuid>.sock.ctl`.
fn is_our_socket_name(name: &str) -> bool {
    let uuid = name
        .strip_suffix(".sock.ctl")
        .or_else(|| name.strip_suffix(".sock"));
    name == "daemon.ctl" || uuid.is_some_and(|u| u.len() == 36 && uuid::Uuid::parse_str(u).is_ok())
}

/// Creates the root's directories and removes what a killed daemon left behind, and nothing
/// else: only its own FUSE tree and sockets it names. Refuses a root another live daemon
/// serves, and any other mount or file where the tree goes. Returns the canonical root.
fn prepare_root(root: &Path) -> Result<PathBuf, CliError> {
    let root = check_root(root)?;
    let io = |path: &Path, source| CliError::Output {
        path: path.to_path_buf(),
        source,
    };
    let ctl = control_socket(&root);
    if UnixStream::connect(&ctl).is_ok() {
        return Err(CliError::Socket(socket::SocketError::InUse(ctl)));
    }
    prepare_sys(&root.join("sys"))?;
    for d in [
        "etc/mdevctl.d",
        "usr/lib/mdevctl/scripts.d/callouts",
        "usr/lib/mdevctl/scripts.d/notifiers",
        "run",
    ] {
        let p = root.join(d);
        std::fs::create_dir_all(&p).map_err(|e| io(&p, e))?;
    }
    let run = root.join("run");
    for entry in std::fs::read_dir(&run).map_err(|e| io(&run, e))?.flatten() {
        let ours = entry.file_name().to_str().is_some_and(is_our_socket_name);
        let is_socket = entry.file_type().is_ok_and(|t| t.is_socket());
        if ours && is_socket && UnixStream::connect(entry.path()).is_err() {
            let _ = std::fs::remove_file(entry.path());
            info!("removed stale socket {}", entry.path().display());
        }
    }
    if root.as_os_str().len() + TREE_LINK_SUFFIX > socket::MAX_SOCKET_PATH {
        warn!(
            "the tree's vfio-user.sock links under {} are longer than a socket address allows ({} bytes): give QEMU the socket itself, {}/run/<uuid>.sock (`vgpu-emu list` shows it)",
            root.display(),
            socket::MAX_SOCKET_PATH,
            root.display()
        );
    }
    Ok(root)
}

/// mdevctl's definitions: `etc/mdevctl.d/<parent>/<uuid>` with `mdev_type`, `start`, `attrs`.
fn autostart(root: &Path, manager: &SharedManager) {
    let Ok(parents) = std::fs::read_dir(root.join("etc/mdevctl.d")) else {
        return;
    };
    for parent in parents.flatten().filter(|e| e.path().is_dir()) {
        let pname = parent.file_name().to_string_lossy().into_owned();
        for def in std::fs::read_dir(parent.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let uuid = def.file_name().to_string_lossy().into_owned();
            let Ok(text) = std::fs::read_to_string(def.path()) else {
                continue;
            };
            let json: serde_json::Value = match serde_json::from_str(&text) {
                Ok(j) => j,
                Err(e) => {
                    warn!("definition {}: {e}", def.path().display());
                    continue;
                }
            };
            if json["start"].as_str() != Some("auto") {
                continue;
            }
            let Some(ty) = json["mdev_type"].as_str() else {
                warn!("definition {}: no mdev_type", def.path().display());
                continue;
            };
            let mut m = manager.lock().unwrap_or_else(|p| p.into_inner());
            match m.create(&pname, ty, &uuid) {
                Ok(u) => {
                    info!("autostarted {u} ({ty}) on {pname}");
                    for attr in json["attrs"].as_array().into_iter().flatten() {
                        for (k, v) in attr.as_object().into_iter().flatten() {
                            if let Err(e) = m.set_attr(&u, k, v.as_str().unwrap_or_default()) {
                                warn!("{u}: attribute {k}: {e}");
                            }
                        }
                    }
                }
                Err(e) => warn!(
                    "autostart of {uuid} ({ty}) on {pname} failed: {}",
                    crate::error::chain(&e)
                ),
            }
        }
    }
}

/// Answers one request line on the daemon's control socket (see [`ControlServer`]).
fn serve_control(
    line: &str,
    out: &mut Vec<u8>,
    later: &Later,
    manager: &SharedManager,
) -> std::io::Result<()> {
    let reply = match serde_json::from_str::<Request>(line) {
        Err(e) => Reply {
            error: Some(format!("bad request: {e}")),
            ..Reply::default()
        },
        Ok(Request::List) => {
            let m = manager.lock().unwrap_or_else(|p| p.into_inner());
            Reply {
                ok: true,
                instances: Some(m.list()),
                ..Reply::default()
            }
        }
        Ok(Request::Create { parent, ty, uuid }) => {
            let mut m = manager.lock().unwrap_or_else(|p| p.into_inner());
            // A type directory, or NAME[@VERSION] resolved as everywhere else.
            let dir = m.resolve_type_dir(&parent, &ty).unwrap_or(ty);
            let uuid = uuid.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            match m.create(&parent, &dir, &uuid) {
                Ok(u) => Reply {
                    ok: true,
                    uuid: Some(u.to_string()),
                    ..Reply::default()
                },
                Err(e) => {
                    // As a refused write to the tree's `create` is logged.
                    info!(
                        "create {uuid} on {parent}/{dir} refused: {}",
                        crate::error::chain(&e)
                    );
                    Reply {
                        error: Some(crate::error::chain(&e)),
                        bad_input: e.is_bad_input(),
                        ..Reply::default()
                    }
                }
            }
        }
        Ok(Request::Remove { uuid }) => {
            match uuid::Uuid::parse_str(&uuid).map_err(|_| format!("`{uuid}` is not a UUID")) {
                Ok(u) => {
                    let begun = manager
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .begin_remove(&u);
                    match begun {
                        Ok(None) => removal_reply(Ok(())),
                        // A client is attached and was asked to let go: the answer comes once
                        // the removal is decided, from a thread of its own, while this endpoint
                        // (and the tree) go on serving.
                        Ok(Some(release)) => {
                            let replier = later.defer();
                            let manager = manager.clone();
                            std::thread::Builder::new()
                                .name("daemon-remove".into())
                                .spawn(move || {
                                    release.wait();
                                    let done = manager
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .finish_remove(release);
                                    if let Ok(text) = serde_json::to_string(&removal_reply(done)) {
                                        replier.reply(format!("{text}\n").into_bytes());
                                    }
                                })?;
                            return Ok(());
                        }
                        Err(e) => removal_reply(Err(e)),
                    }
                }
                Err(e) => Reply {
                    error: Some(e),
                    bad_input: true,
                    ..Reply::default()
                },
            }
        }
    };
    let text = serde_json::to_string(&reply)?;
    writeln!(out, "{text}")
}

/// The reply to a removal.
fn removal_reply(done: Result<(), crate::manage::manager::ManageError>) -> Reply {
    match done {
        Ok(()) => Reply {
            ok: true,
            ..Reply::default()
        },
        Err(e) => Reply {
            error: Some(crate::error::chain(&e)),
            bad_input: e.is_bad_input(),
            ..Reply::default()
        },
    }
}

/// Raises the soft limit of open descriptors to the hard one: each instance holds about seven
/// (sockets, poll instances, its VRAM memfd), so the common default soft limit of 1024 would
/// stop a daemon at about 140 instances.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the live local `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur >= lim.rlim_max
    {
        return;
    }
    let old = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads one rlimit from the live local `lim`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        info!(
            "raised the open-descriptor limit from {old} to {}",
            lim.rlim_max
        );
    } else {
        warn!(
            "cannot raise the open-descriptor limit from {old}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// When the kernel still held entries of removed instances that could not be dropped (in use
/// at the time), how long until they are tried again.
const INVALIDATE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Sends one request to the daemon at `root`.
pub fn request(root: &Path, req: &Request) -> Result<Reply, CliError> {
    let path = control_socket(root);
    let stream = UnixStream::connect(&path).map_err(|source| {
        CliError::Control(crate::manage::control::ControlError::Connect {
            path: path.clone(),
            source,
        })
    })?;
    // A removal waits for an attached client to let go, as long as the daemon's
    // --release-timeout says; the daemon always answers once it has decided.
    let wait = match req {
        Request::Remove { .. } => Duration::from_secs(3600),
        _ => Duration::from_secs(30),
    };
    stream
        .set_read_timeout(Some(wait))
        .map_err(CliError::Runtime)?;
    let sent = writeln!(&stream, "{}", serde_json::to_string(req)?);
    let mut line = String::new();
    // A busy daemon answers and closes without reading: its answer is still there to read when
    // the send failed.
    let read = BufReader::new(&stream).read_line(&mut line);
    if line.trim().is_empty() {
        sent.map_err(CliError::Runtime)?;
        read.map_err(CliError::Runtime)?;
    }
    let reply: Reply = serde_json::from_str(line.trim())?;
    if !reply.ok {
        return Err(CliError::Refused {
            message: reply.error.unwrap_or_else(|| "refused".into()),
            bad_input: reply.bad_input,
        });
    }
    Ok(reply)
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(catalog: vgpu_model::Catalog, config: &DaemonConfig) -> Result<(), CliError> {
    // Before anything is mounted or announced: a SIGTERM that follows the readiness line at once
    // must unmount, not kill the process with the tree left behind.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(CliError::Runtime)?;
    raise_fd_limit();
    let root = &prepare_root(&config.root)?;
    let mut manager = Manager::new(catalog, config.parents.clone(), &root.join("run"))
        .map_err(CliError::Config)?;
    manager.set_release_timeout(config.release_timeout);
    manager.set_socket_owner(config.socket_owner);
    if config.viewers.enabled() {
        manager.set_viewers(crate::display::service::Viewers::start(
            config.viewers.clone(),
        )?);
    }
    let manager: SharedManager = Arc::new(Mutex::new(manager));
    let ctl_path = control_socket(root);
    let ctl = socket::bind(&ctl_path)?;
    let _ctl_guard = socket::RemoveOnDrop(ctl_path.clone());
    let sys = root.join("sys");
    let mut fuse_config = fuser::Config::default();
    fuse_config.mount_options = vec![
        fuser::MountOption::FSName(FS_NAME.into()),
        // The kernel checks each node's mode against the caller, as for sysfs: other users may
        // read (allow_other below), only the owner and root may write.
        fuser::MountOption::DefaultPermissions,
    ];
    // Management stacks may run as other users than the daemon (as sysfs, it is world-readable).
    fuse_config.acl = fuser::SessionACL::All;
    let tree = MdevFs::new(manager.clone());
    let invalidator = tree.invalidator();
    let session =
        fuser::spawn_mount(tree, &sys, &fuse_config).map_err(|source| CliError::Mount {
            path: sys.clone(),
            source,
        })?;
    // The kernel is told to drop its entries of removed instances (see `Invalidator`), off the
    // tree's own thread, which may be answering the very write that removed the instance.
    {
        let (tx, rx) = std::sync::mpsc::channel::<uuid::Uuid>();
        let notifier = session.notifier();
        std::thread::Builder::new()
            .name("mdev-invalidate".into())
            .spawn(move || {
                use std::sync::mpsc::RecvTimeoutError;
                // Idle (nothing stale): sleep until the next removal. Entries that could not be
                // dropped yet (still in use): look again a little later.
                let mut pending = false;
                loop {
                    let woke = if pending {
                        rx.recv_timeout(INVALIDATE_RETRY)
                    } else {
                        rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
                    };
                    if let Err(RecvTimeoutError::Disconnected) = woke {
                        return;
                    }
                    let stale = invalidator.stale_entries();
                    pending = !stale.is_empty();
                    for (dir, name) in stale {
                        // ENOENT: the kernel had dropped it already.
                        let _ = notifier.inval_entry(fuser::INodeNo(dir), name.as_ref());
                    }
                }
            })
            .map_err(CliError::Runtime)?;
        manager
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .notify_removals(tx);
    }
    let control = {
        let m = manager.clone();
        ControlServer::spawn_with(ctl, "daemon-control", move |line, out, later| {
            serve_control(line, out, later, &m)
        })
        .map_err(CliError::Runtime)?
    };
    if config.autostart {
        autostart(root, &manager);
    }
    let parents: Vec<String> = config
        .parents
        .iter()
        .map(|p| format!("{} ({})", p.name, p.family))
        .collect();
    // Readiness line; a closed stdout (the reader went away) must not stop the daemon.
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "vgpu-emu daemon: parents {} under {}",
        parents.join(", "),
        sys.display()
    );
    let _ = writeln!(
        out,
        "Use it with: MDEVCTL_ENV_ROOT={} mdevctl types",
        root.display()
    );
    if let Some((url, offer)) = manager
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .viewers_url()
    {
        let _ = writeln!(out, "Web: {url} (every instance's heads; {offer})");
    }
    let _ = out.flush();
    {
        let m = manager.lock().unwrap_or_else(|p| p.into_inner());
        for p in m.parents() {
            for (dir, t) in m.types_of(&p.name) {
                log::debug!("{}: {dir} = {}", p.name, t.key());
            }
        }
    }

    if let Some(sig) = signals.forever().next() {
        info!("signal {sig} received; stopping every instance");
    }
    control.stop();
    manager
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove_all();
    drop(session);
    info!("unmounted {}", sys.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed_and_only_our_tree_is_ours() {
        let text = "\
36 35 98:0 / /run/a\\040b rw,noatime master:1 - fuse vgpu-emu rw,user_id=0,group_id=0
37 35 0:22 / /r/sys rw,relatime shared:7 - sysfs sysfs rw
38 35 0:39 / /r/sys rw,relatime - tmpfs tmpfs rw
39 35 0:40 / /x rw - fuse.vgpu-emu vgpu-emu rw
40 35 0:41 / /y rw - fuse sshfs rw
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].point, Path::new("/run/a b"));
        assert_eq!(
            (m[1].fstype.as_str(), m[1].source.as_str()),
            ("sysfs", "sysfs")
        );
        let ours: Vec<bool> = m.iter().map(Mount::is_ours).collect();
        assert_eq!(ours, [true, false, false, true, false]);
        assert_eq!(unescape(r"a\134b\011"), "a\\b\t");
        assert_eq!(unescape(r"trailing\04"), r"trailing\04");
    }

    #[test]
    fn only_the_sockets_we_name_are_ours() {
        let u = "11111111-0000-4000-8000-000000000001";
        for name in ["daemon.ctl", &format!("{u}.sock"), &format!("{u}.sock.ctl")] {
            assert!(is_our_socket_name(name), "{name}");
        }
        for name in [
            "other-service.sock",
            "daemon.ctl.old",
            &format!("{u}.ctl"),
            &format!("x{u}.sock"),
            "11111111000040008000000000000001.sock",
        ] {
            assert!(!is_our_socket_name(name), "{name}");
        }
    }

    #[test]
    fn roots_are_checked_before_anything_is_created() {
        for shared in ["/", "/tmp", "/run", "/usr/../usr"] {
            assert!(
                matches!(check_root(Path::new(shared)), Err(RootError::Shared(_))),
                "{shared}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().as_os_str().len() + 1;
        let longest = dir.path().join("r".repeat(MAX_ROOT - base));
        assert_eq!(check_root(&longest).unwrap(), longest);
        let long = dir.path().join("s".repeat(MAX_ROOT + 1 - base));
        let e = check_root(&long).unwrap_err();
        assert!(
            matches!(e, RootError::TooLong { len, .. } if len == MAX_ROOT + 1),
            "{e}"
        );
        assert!(!long.exists(), "a refused root is not created");
        assert_eq!(MAX_ROOT, 57);
        assert_eq!(
            longest
                .join("run/11111111-0000-4000-8000-000000000001.sock.ctl")
                .as_os_str()
                .len(),
            socket::MAX_SOCKET_PATH
        );
    }
}

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
//! root detaches the stale mount and removes the stale sockets first.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::error::CliError;
use crate::manager::{InstanceInfo, Manager, ParentSpec};
use crate::mdevfs::{MdevFs, SharedManager};
use crate::socket;

/// Validated `daemon` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonConfig {
    /// The root directory.
    pub root: PathBuf,
    /// Parents to simulate.
    pub parents: Vec<ParentSpec>,
    /// Start definitions marked `"start": "auto"`.
    pub autostart: bool,
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
        /// Type directory or NAME[@VERSION].
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

fn is_mountpoint(path: &Path) -> bool {
    // A dead FUSE mount may refuse to be resolved (ENOTCONN): fall back to the absolute path.
    let Some(canon) = std::fs::canonicalize(path)
        .ok()
        .or_else(|| std::path::absolute(path).ok())
    else {
        return false;
    };
    let target = canon.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|mi| {
        mi.lines()
            .any(|l| l.split(' ').nth(4) == Some(target.as_str()))
    })
}

fn unmount_stale(path: &Path) {
    if is_mountpoint(path) {
        let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
            return;
        };
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        let r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        if r == 0 {
            info!("detached a stale mount at {}", path.display());
        } else {
            warn!(
                "cannot detach the stale mount at {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Creates the root's directories and removes what a killed daemon left behind. Refuses a root
/// another live daemon serves.
fn prepare_root(root: &Path) -> Result<(), CliError> {
    let io = |path: &Path, source| CliError::Output {
        path: path.to_path_buf(),
        source,
    };
    let ctl = control_socket(root);
    if UnixStream::connect(&ctl).is_ok() {
        return Err(CliError::Socket(socket::SocketError::InUse(ctl)));
    }
    for d in [
        "sys",
        "etc/mdevctl.d",
        "usr/lib/mdevctl/scripts.d/callouts",
        "usr/lib/mdevctl/scripts.d/notifiers",
        "run",
    ] {
        let p = root.join(d);
        if d == "sys" {
            unmount_stale(&p);
        }
        std::fs::create_dir_all(&p).map_err(|e| io(&p, e))?;
    }
    let run = root.join("run");
    for entry in std::fs::read_dir(&run).map_err(|e| io(&run, e))?.flatten() {
        let is_socket = entry.file_type().is_ok_and(|t| t.is_socket());
        if is_socket && UnixStream::connect(entry.path()).is_err() {
            let _ = std::fs::remove_file(entry.path());
            info!("removed stale socket {}", entry.path().display());
        }
    }
    Ok(())
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
                Err(e) => warn!("autostart of {uuid} ({ty}) on {pname} failed: {e}"),
            }
        }
    }
}

fn serve_control(listener: UnixListener, manager: SharedManager) {
    for conn in listener.incoming().flatten() {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        let mut line = String::new();
        if BufReader::new((&conn).take(4096))
            .read_line(&mut line)
            .is_err()
            || line.trim().is_empty()
        {
            continue;
        }
        let reply = match serde_json::from_str::<Request>(line.trim()) {
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
                        info!("create {uuid} on {parent}/{dir} refused: {e}");
                        Reply {
                            error: Some(e.to_string()),
                            bad_input: e.is_bad_input(),
                            ..Reply::default()
                        }
                    }
                }
            }
            Ok(Request::Remove { uuid }) => {
                let mut m = manager.lock().unwrap_or_else(|p| p.into_inner());
                match uuid::Uuid::parse_str(&uuid).map_err(|_| format!("`{uuid}` is not a UUID")) {
                    Ok(u) => match m.remove(&u) {
                        Ok(()) => Reply {
                            ok: true,
                            ..Reply::default()
                        },
                        Err(e) => Reply {
                            error: Some(e.to_string()),
                            bad_input: e.is_bad_input(),
                            ..Reply::default()
                        },
                    },
                    Err(e) => Reply {
                        error: Some(e),
                        bad_input: true,
                        ..Reply::default()
                    },
                }
            }
        };
        if let Ok(text) = serde_json::to_string(&reply) {
            let _ = writeln!(&conn, "{text}");
        }
    }
}

/// Sends one request to the daemon at `root`.
pub fn request(root: &Path, req: &Request) -> Result<Reply, CliError> {
    let path = control_socket(root);
    let stream = UnixStream::connect(&path).map_err(|source| {
        CliError::Control(crate::control::ControlError::Connect {
            path: path.clone(),
            source,
        })
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(CliError::Runtime)?;
    writeln!(&stream, "{}", serde_json::to_string(req)?).map_err(CliError::Runtime)?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(CliError::Runtime)?;
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
    let root = &config.root;
    prepare_root(root)?;
    let manager = Manager::new(catalog, config.parents.clone(), &root.join("run"))
        .map_err(CliError::Config)?;
    let manager: SharedManager = Arc::new(Mutex::new(manager));
    let ctl_path = control_socket(root);
    let ctl = socket::bind(&ctl_path)?;
    let _ctl_guard = socket::RemoveOnDrop(ctl_path.clone());
    let sys = root.join("sys");
    let mut fuse_config = fuser::Config::default();
    fuse_config.mount_options = vec![fuser::MountOption::FSName("vgpu-emu".into())];
    // Management stacks may run as other users than the daemon (as sysfs, it is world-readable).
    fuse_config.acl = fuser::SessionACL::All;
    let session =
        fuser::spawn_mount(MdevFs::new(manager.clone()), &sys, &fuse_config).map_err(|source| {
            CliError::Mount {
                path: sys.clone(),
                source,
            }
        })?;
    {
        let m = manager.clone();
        std::thread::Builder::new()
            .name("daemon-control".into())
            .spawn(move || serve_control(ctl, m))
            .map_err(CliError::Runtime)?;
    }
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
    let _ = out.flush();
    {
        let m = manager.lock().unwrap_or_else(|p| p.into_inner());
        for p in m.parents() {
            for (dir, t) in m.types_of(&p.name) {
                log::debug!("{}: {dir} = {}", p.name, t.key());
            }
        }
    }

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(CliError::Runtime)?;
    if let Some(sig) = signals.forever().next() {
        info!("signal {sig} received; stopping every instance");
    }
    manager
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove_all();
    drop(session);
    info!("unmounted {}", sys.display());
    Ok(())
}

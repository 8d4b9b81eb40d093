//! Creating listening sockets: mode 0600, a dead socket replaced, a live one refused.
//!
//! The socket is bound inside a fresh 0700 directory next to its path, made 0600 there, and
//! renamed into place: nobody else can reach it before it has its final mode, and the process
//! umask (shared by every thread) is never touched.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Longest UNIX socket path in bytes (`sun_path` is 108 bytes with its terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Why a socket path could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process serves on it.
    #[error("{} is in use by a running server", .0.display())]
    InUse(PathBuf),
    /// Something other than a socket is there.
    #[error("{} exists and is not a socket", .0.display())]
    NotSocket(PathBuf),
    /// The path does not fit in a socket address.
    #[error(
        "cannot listen on {}: the path is {len} bytes long, over the {MAX_SOCKET_PATH} a UNIX socket path may have",
        path.display()
    )]
    TooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// The OS refused.
    #[error("cannot listen on {}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Who a vfio-user socket is handed to (`--socket-owner USER[:GROUP]`): the user the VMM runs
/// as, so that it can connect to a 0600 socket (libvirt's QEMU runs as `libvirt-qemu` on Debian,
/// KubeVirt's as 107).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl std::str::FromStr for Owner {
    type Err = String;

    /// `USER[:GROUP]`, each a name (looked up in /etc/passwd and /etc/group) or a number;
    /// without GROUP, the user's primary group (a number alone: the same number).
    fn from_str(s: &str) -> Result<Owner, String> {
        let (user, group) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        let (uid, primary) = match user.parse::<u32>() {
            Ok(n) => (n, n),
            Err(_) => {
                let uid = lookup("/etc/passwd", user, 2)
                    .ok_or_else(|| format!("no user {user} in /etc/passwd (give a number)"))?;
                let gid = lookup("/etc/passwd", user, 3).unwrap_or(uid);
                (uid, gid)
            }
        };
        let gid = match group {
            None => primary,
            Some(g) => match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => lookup("/etc/group", g, 2)
                    .ok_or_else(|| format!("no group {g} in /etc/group (give a number)"))?,
            },
        };
        Ok(Owner { uid, gid })
    }
}

/// Field `field` (a number) of the line of colon-separated `file` whose first field is `name`.
fn lookup(file: &str, name: &str, field: usize) -> Option<u32> {
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&name))?
        .get(field)?
        .parse()
        .ok()
}

/// Hands the socket at `path` to `owner` (mode stays 0600: the owner connects, nobody else).
pub fn give(path: &Path, owner: Owner) -> Result<(), SocketError> {
    std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid)).map_err(|source| {
        SocketError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Names the private directories sockets are bound in.
static NEXT_TEMP: AtomicU32 = AtomicU32::new(0);

/// Binds a UNIX socket at `path` readable and writable by the owner only.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let io_err = |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = path.as_os_str().as_bytes().len();
    if len > MAX_SOCKET_PATH {
        return Err(SocketError::TooLong {
            path: path.to_path_buf(),
            len,
        });
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse(path.to_path_buf())),
            Err(_) => {
                log::info!("replacing stale socket {}", path.display());
                std::fs::remove_file(path).map_err(io_err)?;
            }
        },
        Ok(_) => return Err(SocketError::NotSocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let temp = parent.join(format!(
        ".vgpu-emu-{}-{}",
        std::process::id(),
        NEXT_TEMP.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&temp)
        .map_err(io_err)?;
    let bound = bind_in(&temp, path);
    if let Err(e) = std::fs::remove_dir_all(&temp) {
        log::warn!("cannot remove {}: {e}", temp.display());
    }
    bound.map_err(|e| match e.raw_os_error() {
        Some(libc::EEXIST) => SocketError::InUse(path.to_path_buf()),
        _ => io_err(e),
    })
}

/// Binds in the private directory `temp`, sets the mode, and moves the socket to `path`.
fn bind_in(temp: &Path, path: &Path) -> io::Result<UnixListener> {
    // The directory may be the owner's only, whatever the umask made of its mode.
    std::fs::set_permissions(temp, std::fs::Permissions::from_mode(0o700))?;
    let inner = temp.join("s");
    let listener = if inner.as_os_str().as_bytes().len() <= MAX_SOCKET_PATH {
        UnixListener::bind(&inner)?
    } else {
        // The private name is longer than the final one: reach the directory through its
        // descriptor, whose /proc name is short whatever the directory's path.
        let dir = std::fs::File::open(temp)?;
        use std::os::fd::AsRawFd;
        UnixListener::bind(format!("/proc/self/fd/{}/s", dir.as_raw_fd()))?
    };
    std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
    rename_noreplace(&inner, path)?;
    Ok(listener)
}

/// `rename(2)` that fails with EEXIST instead of replacing what another process put at `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: both arguments are valid NUL-terminated paths that outlive the call; AT_FDCWD
    // makes relative paths resolve as everywhere else in the process.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes a socket file when dropped (if it is still a socket).
#[derive(Debug)]
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.0).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// The control endpoint next to a vfio-user socket.
pub fn control_path(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".ctl");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_names_or_numbers() {
        let o = |s: &str| s.parse::<Owner>();
        assert_eq!(o("107:108"), Ok(Owner { uid: 107, gid: 108 }));
        assert_eq!(o("107"), Ok(Owner { uid: 107, gid: 107 }));
        // Every Linux system has root (uid 0, group root 0).
        assert_eq!(o("root"), Ok(Owner { uid: 0, gid: 0 }));
        assert_eq!(o("root:0"), Ok(Owner { uid: 0, gid: 0 }));
        assert_eq!(o("0:root"), Ok(Owner { uid: 0, gid: 0 }));
        for bad in ["no-such-user-here", "0:no-such-group-here", "", "root:"] {
            assert!(o(bad).is_err(), "{bad:?}");
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn mode_stale_live_and_non_socket() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let path = dir.join("a.sock");
        let l = bind(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert!(matches!(bind(&path), Err(SocketError::InUse(_))));
        drop(l);
        // The file is left behind but nobody listens: replaced.
        let l = bind(&path).unwrap();
        assert!(UnixStream::connect(&path).is_ok(), "the new socket listens");
        drop(l);
        let file = dir.join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(bind(&file), Err(SocketError::NotSocket(_))));
        assert_eq!(control_path(&path), dir.join("a.sock.ctl"));
        assert_eq!(
            entries(dir),
            ["a.sock", "plain"],
            "no private directory is left behind"
        );
    }

    /// Reads the process umask without changing it.
    fn umask_now() -> String {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .expect("the kernel reports the umask")
            .trim()
            .to_string()
    }

    #[test]
    fn binding_never_changes_the_process_umask() {
        let dir = tempfile::tempdir().unwrap();
        let before = umask_now();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let done = done.clone();
            let before = before.clone();
            std::thread::spawn(move || {
                let mut seen = None;
                while !done.load(Ordering::SeqCst) {
                    let now = umask_now();
                    if now != before {
                        seen.get_or_insert(now);
                    }
                }
                seen
            })
        };
        for i in 0..300 {
            let path = dir.path().join(format!("{i}.sock"));
            let l = bind(&path).unwrap();
            assert_eq!(mode(&path), 0o600);
            drop(l);
        }
        done.store(true, Ordering::SeqCst);
        let seen = watcher.join().unwrap();
        assert_eq!(
            seen, None,
            "another thread saw the umask change from {before}"
        );
        assert_eq!(umask_now(), before);
    }

    #[test]
    fn a_path_that_fits_binds_even_when_the_private_name_would_not() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().display().to_string().len();
        // A directory whose socket path is exactly the longest allowed.
        let sub = dir.path().join("d".repeat(MAX_SOCKET_PATH - base - 5));
        std::fs::create_dir(&sub).unwrap();
        let path = sub.join("a.s");
        assert_eq!(path.as_os_str().len(), MAX_SOCKET_PATH);
        let l = bind(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert!(UnixStream::connect(&path).is_ok());
        drop(l);
        let long = sub.join("ab.s");
        match bind(&long) {
            Err(e @ SocketError::TooLong { len: 108, .. }) => {
                assert!(e.to_string().contains("over the 107"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(entries(&sub), ["a.s"]);
    }
}

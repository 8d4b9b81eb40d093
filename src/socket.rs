//! Creating listening sockets: mode 0600, a dead socket replaced, a live one refused.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Why a socket path could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process serves on it.
    #[error("{} is in use by a running server", .0.display())]
    InUse(PathBuf),
    /// Something other than a socket is there.
    #[error("{} exists and is not a socket", .0.display())]
    NotSocket(PathBuf),
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

/// umask is process-wide: socket creation is serialised so a concurrent creation cannot see
/// the temporary mask.
static UMASK_LOCK: Mutex<()> = Mutex::new(());

/// Binds a UNIX socket at `path` readable and writable by the owner only.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let io_err = |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    };
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
    let _guard = UMASK_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: umask only swaps the process file-creation mask; it cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    bound.map_err(io_err)
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
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn mode_stale_live_and_non_socket() {
        let dir = std::env::temp_dir().join(format!("vgpu-emu-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.sock");
        let l = bind(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(bind(&path), Err(SocketError::InUse(_))));
        drop(l);
        // The file is left behind but nobody listens: replaced.
        let l = bind(&path).unwrap();
        drop(l);
        let file = dir.join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(bind(&file), Err(SocketError::NotSocket(_))));
        assert_eq!(control_path(&path), dir.join("a.sock.ctl"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

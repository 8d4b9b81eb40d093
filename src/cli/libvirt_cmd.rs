//! `vgpu-emu libvirt-xml`: what puts an instance into a libvirt domain, printed or merged into a
//! domain's XML file.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::error::CliError;
use crate::integrate::libvirt::{self, VgpuDevice, MAX_DOMAIN_XML};
use crate::manage::{control, daemon};
use crate::sys::socket::control_path;

/// Which instance, and what to do with the XML.
#[derive(Debug, Default)]
pub struct LibvirtXmlArgs {
    /// The instance's socket (`serve`'s default when neither this nor `uuid` is given).
    pub socket: Option<PathBuf>,
    /// The instance's UUID on the daemon at `root`.
    pub uuid: Option<String>,
    /// The daemon's root.
    pub root: Option<PathBuf>,
    /// A domain XML file to merge into.
    pub domain: Option<PathBuf>,
    /// Where to write the merged domain (stdout when `None`).
    pub output: Option<PathBuf>,
}

/// The instance as libvirt will reach it: its UUID, type and absolute socket.
fn instance(args: &LibvirtXmlArgs) -> Result<VgpuDevice, CliError> {
    let socket = match &args.uuid {
        Some(u) => {
            let uuid = Uuid::parse_str(u).map_err(|_| CliError::BadUuid(u.clone()))?;
            let root = args.root.clone().unwrap_or_else(daemon::default_root);
            let list = daemon::request(&root, &daemon::Request::List)?
                .instances
                .unwrap_or_default();
            let found = list
                .iter()
                .find(|i| Uuid::parse_str(&i.uuid).ok() == Some(uuid))
                .ok_or_else(|| CliError::Refused {
                    message: format!("the daemon at {} has no instance {uuid}", root.display()),
                    bad_input: true,
                })?;
            PathBuf::from(&found.socket)
        }
        None => args
            .socket
            .clone()
            .unwrap_or_else(crate::cli::serve::default_socket),
    };
    // QEMU resolves the path from its own working directory, as its own user: an absolute,
    // resolved path (the mdev tree's vfio-user.sock is a link).
    let socket = std::fs::canonicalize(&socket).map_err(|source| {
        CliError::Control(control::ControlError::Connect {
            path: socket.clone(),
            source,
        })
    })?;
    let status = control::status(&control_path(&socket))?;
    let uuid = Uuid::parse_str(&status.uuid).map_err(|_| CliError::BadUuid(status.uuid.clone()))?;
    Ok(VgpuDevice::new(uuid, &status.type_key, &socket))
}

/// Runs the command: the XML to print (empty when it was written to `--output`) and hints
/// for stderr.
pub fn run(args: &LibvirtXmlArgs) -> Result<(String, Vec<String>), CliError> {
    let dev = instance(args)?;
    let hints = access_hints(&dev.socket);
    let Some(domain) = &args.domain else {
        return Ok((libvirt::fragment(&dev), hints));
    };
    let xml = read_domain(domain)?;
    let merged = libvirt::merge(&xml, &dev).map_err(|e| CliError::Libvirt {
        path: domain.clone(),
        source: e,
    })?;
    match &args.output {
        None => Ok((merged, hints)),
        Some(out) => {
            write_atomically(out, merged.as_bytes())?;
            Ok((String::new(), hints))
        }
    }
}

fn read_domain(path: &Path) -> Result<String, CliError> {
    let err = |source| CliError::DomainFile {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(err)?
        .take(MAX_DOMAIN_XML + 1)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    if bytes.len() as u64 > MAX_DOMAIN_XML {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {} KiB", MAX_DOMAIN_XML >> 10),
        )));
    }
    String::from_utf8(bytes).map_err(|_| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8",
        ))
    })
}

/// Writes `bytes` to a temporary file beside `path` and renames it over `path`, so a reader
/// (or a failure) never sees half a domain.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    let err = |source| CliError::Output {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.vgpu-emu-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        if let Ok(meta) = std::fs::metadata(path) {
            std::fs::set_permissions(&tmp, meta.permissions())?;
        }
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// What the host needs before libvirt's QEMU can open the socket.
fn access_hints(socket: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt as _;
    let (mode, uid) = std::fs::metadata(socket)
        .map(|m| (m.permissions().mode(), m.uid()))
        .unwrap_or((0, 0));
    let mut hints = Vec::new();
    // SAFETY: getuid has no preconditions and cannot fail.
    let me = unsafe { libc::getuid() };
    if mode & 0o006 == 0 && uid == me {
        hints.push(format!(
            "note: {} is 0600; QEMU under libvirt's system daemon runs as libvirt-qemu on \
             Debian: serve it with --socket-owner libvirt-qemu (serve or daemon), or grant \
             access, e.g. setfacl -m u:libvirt-qemu:rw {0} (and x on the directories above it)",
            socket.display()
        ));
    }
    hints.push(
        "note: with AppArmor, libvirt's per-VM profile does not cover paths in \
         <qemu:commandline>: add the socket to /etc/apparmor.d/local/abstractions/libvirt-qemu \
         (see the README)"
            .to_string(),
    );
    hints
}

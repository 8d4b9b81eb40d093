//! What the device plugin needs from a node's `vgpu-emu daemon`: the type versions its parents
//! offer with their live `available_instances` (read from the daemon's mdev tree, as any mdev
//! tool would), its instances, and creating and removing instances (its control socket).
//!
//! [`Backend`] is the seam: [`DaemonBackend`] talks to a real daemon; the unit tests use a fake.
//! Its calls block (file reads on a FUSE tree, a control-socket round trip): the plugin makes them
//! off its async runtime, in `spawn_blocking`.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::error::CliError;
use crate::manage::daemon::{self, Request};
use crate::manage::manager::InstanceInfo;

/// A type version that a parent offers, as the daemon's tree shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// The parent.
    pub parent: String,
    /// The mdev type directory (`vgpu_emu-m60_2q-v1`).
    pub type_dir: String,
    /// Type name (`M60-2Q`).
    pub name: String,
    /// Type version.
    pub version: u32,
    /// The version is deprecated: a bare name does not resolve to it.
    pub deprecated: bool,
    /// This build serves the type's personality.
    pub servable: bool,
    /// Live `available_instances`.
    pub available: u32,
}

impl Offer {
    /// `NAME@VERSION`.
    pub fn key(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// Why a backend call failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendError {
    /// The daemon could not be reached at all (rather than refusing).
    pub unreachable: bool,
    /// What happened.
    pub message: String,
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A node's daemon, as the plugin uses it. Every call may block.
pub trait Backend: Send + Sync + 'static {
    /// Every type version of every parent, with live availability.
    fn offers(&self) -> Result<Vec<Offer>, BackendError>;
    /// The daemon's instances.
    fn instances(&self) -> Result<Vec<InstanceInfo>, BackendError>;
    /// Creates an instance; returns its vfio-user socket once it listens.
    fn create(&self, parent: &str, type_dir: &str, uuid: &Uuid) -> Result<String, BackendError>;
    /// Removes an instance. An instance that is already gone is not an error.
    fn remove(&self, uuid: &Uuid) -> Result<(), BackendError>;
}

/// Most parents, and most type directories of a parent, the plugin reads from a tree.
const MAX_ENTRIES: usize = 1024;
/// Longest attribute file the plugin reads from the tree.
const MAX_ATTR: u64 = 4096;

/// The text the daemon's `unavailable_reason` gives for a personality this build does not serve
/// (`Unavailable::NotServed`); a unit test keeps the two in step.
const NOT_SERVED: &str = "not served by this build";

/// A daemon at a root: the tree at `ROOT/sys`, the control socket at `ROOT/run/daemon.ctl`.
#[derive(Clone, Debug)]
pub struct DaemonBackend {
    root: PathBuf,
}

impl DaemonBackend {
    /// The daemon whose root is `root`.
    pub fn new(root: &Path) -> Self {
        DaemonBackend {
            root: root.to_path_buf(),
        }
    }

    fn request(&self, req: &Request) -> Result<daemon::Reply, BackendError> {
        daemon::request(&self.root, req).map_err(|e| {
            let unreachable = !matches!(e, CliError::Refused { .. });
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message = format!("{message}: {s}");
                source = s.source();
            }
            BackendError {
                unreachable,
                message,
            }
        })
    }
}

fn read_attr(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut s = String::new();
    std::fs::File::open(path)?
        .take(MAX_ATTR)
        .read_to_string(&mut s)?;
    Ok(s.trim().to_string())
}

/// `NAME@VERSION`, with ` (deprecated)` after a deprecated version: the tree's `name` file.
pub fn parse_type_name(text: &str) -> Option<(String, u32, bool)> {
    let text = text.trim();
    let (key, deprecated) = match text.strip_suffix(" (deprecated)") {
        Some(k) => (k, true),
        None => (text, false),
    };
    let (name, version) = key.split_once('@')?;
    let version = version.parse().ok()?;
    (!name.is_empty()).then(|| (name.to_string(), version, deprecated))
}

fn entries(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir)?.take(MAX_ENTRIES) {
        if let Some(n) = e?.file_name().to_str() {
            names.push(n.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Reads every parent's type directories under an mdev tree (`ROOT/sys`).
pub fn read_offers(sys: &Path) -> std::io::Result<Vec<Offer>> {
    let class = sys.join("class/mdev_bus");
    let mut offers = Vec::new();
    for parent in entries(&class)? {
        let types = class.join(&parent).join("mdev_supported_types");
        for type_dir in entries(&types)? {
            let dir = types.join(&type_dir);
            let Some((name, version, deprecated)) = parse_type_name(&read_attr(&dir.join("name"))?)
            else {
                continue;
            };
            let available = read_attr(&dir.join("available_instances"))?
                .parse()
                .unwrap_or(0);
            let reason = read_attr(&dir.join("unavailable_reason")).unwrap_or_default();
            offers.push(Offer {
                parent: parent.clone(),
                type_dir,
                name,
                version,
                deprecated,
                servable: !reason.contains(NOT_SERVED),
                available,
            });
        }
    }
    Ok(offers)
}

impl Backend for DaemonBackend {
    fn offers(&self) -> Result<Vec<Offer>, BackendError> {
        let sys = self.root.join("sys");
        read_offers(&sys).map_err(|e| BackendError {
            unreachable: true,
            message: format!("cannot read the daemon's tree at {}: {e}", sys.display()),
        })
    }

    fn instances(&self) -> Result<Vec<InstanceInfo>, BackendError> {
        Ok(self.request(&Request::List)?.instances.unwrap_or_default())
    }

    fn create(&self, parent: &str, type_dir: &str, uuid: &Uuid) -> Result<String, BackendError> {
        self.request(&Request::Create {
            parent: parent.to_string(),
            ty: type_dir.to_string(),
            uuid: Some(uuid.to_string()),
        })?;
        let uuid = uuid.to_string();
        self.instances()?
            .into_iter()
            .find(|i| i.uuid == uuid)
            .map(|i| i.socket)
            .ok_or_else(|| BackendError {
                unreachable: false,
                message: format!("instance {uuid} was created but is not listed"),
            })
    }

    fn remove(&self, uuid: &Uuid) -> Result<(), BackendError> {
        match self.request(&Request::Remove {
            uuid: uuid.to_string(),
        }) {
            Ok(_) => Ok(()),
            Err(e) if e.unreachable => Err(e),
            Err(e) => {
                // Refused: fine when the instance is gone already (removed by hand, daemon
                // restarted).
                let uuid = uuid.to_string();
                match self.instances()?.iter().any(|i| i.uuid == uuid) {
                    true => Err(e),
                    false => Ok(()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manage::manager::Unavailable;

    #[test]
    fn not_served_matches_the_daemons_reason() {
        let reason = Unavailable::NotServed {
            personality: "x".into(),
        }
        .to_string();
        assert!(reason.contains(NOT_SERVED), "{reason}");
        let other = Unavailable::MaxInstances { max: 4 }.to_string();
        assert!(!other.contains(NOT_SERVED));
    }

    #[test]
    fn type_names() {
        assert_eq!(
            parse_type_name("M60-2Q@1\n"),
            Some(("M60-2Q".into(), 1, false))
        );
        assert_eq!(
            parse_type_name("EMU-64M@12 (deprecated)"),
            Some(("EMU-64M".into(), 12, true))
        );
        assert_eq!(parse_type_name("M60-2Q"), None);
        assert_eq!(parse_type_name("@1"), None);
        assert_eq!(parse_type_name("A@x"), None);
    }

    #[test]
    fn reads_a_tree() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path();
        let t = sys.join("class/mdev_bus/p0/mdev_supported_types/vgpu_emu-a-v1");
        std::fs::create_dir_all(&t).unwrap();
        std::fs::write(t.join("name"), "A@1 (deprecated)\n").unwrap();
        std::fs::write(t.join("available_instances"), "3\n").unwrap();
        std::fs::write(t.join("unavailable_reason"), "").unwrap();
        let offers = read_offers(sys).unwrap();
        assert_eq!(
            offers,
            [Offer {
                parent: "p0".into(),
                type_dir: "vgpu_emu-a-v1".into(),
                name: "A".into(),
                version: 1,
                deprecated: true,
                servable: true,
                available: 3,
            }]
        );
    }
}

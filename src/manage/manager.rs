//! Instance management: parents (simulated physical GPUs) with a VRAM pool, live capacity, and
//! the instances a daemon serves.
//!
//! Capacity follows NVIDIA's placement rule: a parent hosts instances of one framebuffer size at
//! a time. `available_instances` of a type on a parent is therefore 0 when the parent hosts an
//! instance of another framebuffer size (or the type belongs to another family, or its
//! personality is not served by this build); otherwise it is what the remaining VRAM allows,
//! capped by the type's `max_instances` less the instances already there.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};
use serde::Serialize;
use uuid::Uuid;
use vgpu_model::{Catalog, VgpuType};

use crate::instance::runtime::Runtime;
use crate::instance::{lock, start_runtime, Instance, Knob, SharedInstance};
use crate::manage::control::ControlServer;
use crate::sys::socket::{self, control_path, RemoveOnDrop};
use crate::vfio_user::irq::Signalled;
use crate::vfio_user::server::{Server, StopHandle};

/// The `device_api` every type reports.
pub const DEVICE_API: &str = "vfio-pci";

/// A parent: one simulated physical GPU of a family.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParentSpec {
    /// Device name under `class/mdev_bus`.
    pub name: String,
    /// Type family it offers (and whose VRAM size it has).
    pub family: String,
}

impl std::str::FromStr for ParentSpec {
    type Err = String;
    /// `NAME=FAMILY`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, family) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not NAME=FAMILY (e.g. emu0=emu)"))?;
        valid_parent_name(name).map_err(|why| format!("`{s}`: parent name {why}"))?;
        if family.is_empty()
            || !family
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "`{s}`: family `{family}` is not a family name (letters, digits, - _ .)"
            ));
        }
        Ok(ParentSpec {
            name: name.to_string(),
            family: family.to_string(),
        })
    }
}

/// Longest parent name (a device name under `class/mdev_bus`).
pub const MAX_PARENT_NAME: usize = 64;

/// A parent name is one directory entry under `class/mdev_bus` and `devices`, and a directory of
/// mdevctl's definitions: a single path component in a conservative character set (letters,
/// digits, `-`, `_`, `.`, `:` as in PCI addresses like `0000:00:02.0`), starting with a letter
/// or digit, so neither `.`, `..`, a hidden name nor something an option parser takes for an
/// option.
pub fn valid_parent_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_PARENT_NAME {
        return Err(format!("must be 1 to {MAX_PARENT_NAME} characters"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!("`{name}` must start with a letter or digit"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.:".contains(*c)))
    {
        return Err(format!(
            "`{name}` contains `{c}`; use letters, digits and - _ . :"
        ));
    }
    Ok(())
}

/// Why a management operation failed; each maps to the errno the kernel's mdev core returns.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    /// Not a UUID.
    #[error("`{0}` is not a UUID")]
    BadUuid(String),
    /// The UUID is taken.
    #[error("instance {0} already exists")]
    Exists(Uuid),
    /// No such parent.
    #[error("no parent `{0}`")]
    NoParent(String),
    /// No such type on that parent.
    #[error("parent `{parent}` offers no type `{ty}`")]
    NoType {
        /// Parent.
        parent: String,
        /// Type asked for.
        ty: String,
    },
    /// No capacity left for the type.
    #[error("no available instances of {ty} on {parent}: {reason}")]
    NoCapacity {
        /// Parent.
        parent: String,
        /// Type key.
        ty: String,
        /// Why.
        reason: Unavailable,
    },
    /// No such instance.
    #[error("no instance {0}")]
    NoInstance(Uuid),
    /// A bad attribute value.
    #[error("invalid value for {attr}: {value}")]
    BadAttr {
        /// Attribute.
        attr: String,
        /// Value.
        value: String,
    },
    /// The instance could not be started.
    #[error("cannot start the instance")]
    Start(#[from] StartError),
    /// A client still uses the instance: it was asked to release it (the VFIO request
    /// interrupt) and did not within the wait.
    #[error(
        "instance {uuid} is in use: its client did not release it within {waited:?} of being asked"
    )]
    InUse {
        /// The instance.
        uuid: Uuid,
        /// How long it was given.
        waited: Duration,
    },
    /// Another removal of the instance is in progress.
    #[error("instance {0} is being removed already")]
    Removing(Uuid),
}

/// Why a new instance could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Its socket or control socket.
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    /// Its device or VRAM.
    #[error(transparent)]
    Instance(#[from] crate::instance::InstanceError),
    /// Its server or threads.
    #[error("cannot start the instance's server")]
    Server(#[source] std::io::Error),
}

impl StartError {
    /// The errno the kernel would report for a parent driver's failure of this kind: the
    /// cause's own errno where the kernel uses it too, EIO otherwise.
    fn errno(&self) -> i32 {
        let io = |e: &std::io::Error| match e.raw_os_error() {
            Some(n @ (libc::ENOMEM | libc::EMFILE | libc::ENFILE | libc::ENOSPC | libc::EROFS)) => {
                n
            }
            _ => libc::EIO,
        };
        match self {
            StartError::Socket(socket::SocketError::TooLong { .. }) => libc::ENAMETOOLONG,
            StartError::Socket(
                socket::SocketError::InUse(_) | socket::SocketError::NotSocket(_),
            ) => libc::EBUSY,
            StartError::Socket(socket::SocketError::Io { source, .. }) => io(source),
            StartError::Instance(crate::instance::InstanceError::Vram { source, .. }) => io(source),
            StartError::Instance(_) => libc::EIO,
            StartError::Server(source) => io(source),
        }
    }
}

impl ManageError {
    /// The errno a sysfs write reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            ManageError::BadUuid(_) | ManageError::BadAttr { .. } => libc::EINVAL,
            ManageError::Exists(_) => libc::EEXIST,
            ManageError::NoParent(_) | ManageError::NoType { .. } | ManageError::NoInstance(_) => {
                libc::ENODEV
            }
            // What a VRAM-accounting parent driver answers (the kernel's mbochs sample returns
            // ENOSPC from probe; the mdev core itself said EUSERS only in 5.16-6.0).
            ManageError::NoCapacity { .. } => libc::ENOSPC,
            ManageError::Start(e) => e.errno(),
            // What the kernel answers for a device that is still open.
            ManageError::InUse { .. } | ManageError::Removing(_) => libc::EBUSY,
        }
    }

    /// Whether the request named something wrong (a bad UUID or value, an unknown parent, type
    /// or instance) rather than meeting a run-time condition (no capacity, a taken UUID, a
    /// failed start). The CLI exits 2 for the first, 1 for the second.
    pub fn is_bad_input(&self) -> bool {
        match self {
            ManageError::BadUuid(_)
            | ManageError::BadAttr { .. }
            | ManageError::NoParent(_)
            | ManageError::NoType { .. }
            | ManageError::NoInstance(_) => true,
            // Serving a type this build cannot serve is bad input, as for `vgpu-emu serve`.
            ManageError::NoCapacity { reason, .. } => matches!(
                reason,
                Unavailable::NotServed { .. } | Unavailable::OtherFamily { .. }
            ),
            ManageError::Exists(_)
            | ManageError::Start(_)
            | ManageError::InUse { .. }
            | ManageError::Removing(_) => false,
        }
    }
}

/// Why a parent has no available instance of a type: the reason behind `available_instances`
/// reading 0, given in refusals, the daemon's log and the tree's `unavailable_reason` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// The type belongs to another family than the parent.
    OtherFamily {
        /// The type's family.
        family: String,
        /// The parent's family.
        parent_family: String,
    },
    /// This build has no device model for the type's personality.
    NotServed {
        /// The personality.
        personality: String,
    },
    /// The parent hosts instances of another framebuffer size (NVIDIA's placement rule).
    OtherFramebufferSize {
        /// Instances on the parent.
        instances: usize,
        /// Their framebuffer, bytes.
        hosted: u64,
        /// The type's framebuffer, bytes.
        wanted: u64,
    },
    /// The type's `max_instances` per parent are all in use.
    MaxInstances {
        /// The type's limit.
        max: u32,
    },
    /// Not enough free VRAM on the parent.
    NoVram {
        /// Free bytes.
        free: u64,
        /// The parent's VRAM, bytes.
        total: u64,
        /// The type's framebuffer, bytes.
        wanted: u64,
    },
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::OtherFamily {
                family,
                parent_family,
            } => write!(
                f,
                "the type belongs to family `{family}`, the parent to `{parent_family}`"
            ),
            Unavailable::NotServed { personality } => write!(
                f,
                "personality `{personality}` is listed but not served by this build yet"
            ),
            Unavailable::OtherFramebufferSize {
                instances,
                hosted,
                wanted,
            } => write!(
                f,
                "the parent hosts {instances} instance(s) with a {}M framebuffer, and a parent \
                 hosts one framebuffer size at a time ({}M wanted)",
                hosted >> 20,
                wanted >> 20
            ),
            Unavailable::MaxInstances { max } => write!(
                f,
                "the parent already hosts {max} instance(s) of this size, the type's max_instances"
            ),
            Unavailable::NoVram {
                free,
                total,
                wanted,
            } => write!(
                f,
                "{}M of the parent's {}M VRAM is free, {}M wanted",
                free >> 20,
                total >> 20,
                wanted >> 20
            ),
        }
    }
}

/// A running instance.
#[derive(Debug)]
struct Managed {
    parent: String,
    ty: VgpuType,
    shared: SharedInstance,
    stop: StopHandle,
    /// A removal is waiting for the client to release the instance.
    removing: bool,
    server: Option<JoinHandle<()>>,
    /// The frame-rate limiter's tick.
    runtime: Option<Runtime>,
    control: Option<ControlServer>,
    _socket_guards: [RemoveOnDrop; 2],
}

impl Managed {
    fn shutdown(mut self) {
        self.stop.stop();
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
        if let Some(r) = self.runtime.take() {
            r.stop();
        }
        if let Some(c) = self.control.take() {
            c.stop();
        }
        // The guards remove both sockets.
    }
}

/// One row of `vgpu-emu list`.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct InstanceInfo {
    /// UUID.
    pub uuid: String,
    /// Parent.
    pub parent: String,
    /// Type directory (mdev type name).
    pub mdev_type: String,
    /// `name@version`.
    #[serde(rename = "type")]
    pub type_key: String,
    /// vfio-user socket.
    pub socket: String,
    /// Frame-rate limiter on.
    pub frame_rate_limiter: bool,
    /// A client is attached.
    pub client_connected: bool,
    /// Where each head can be viewed (empty without `--vnc`/`--web`).
    #[serde(default)]
    pub viewers: Vec<crate::display::service::HeadEndpoint>,
}

/// The type directories of one parent: built once, because the tree looks a type up on every
/// path it resolves (mdevctl reads four files of every type directory).
#[derive(Debug, Default)]
struct TypeIndex {
    /// Type directory and index into `Catalog::types`, in catalog order.
    dirs: Vec<(String, usize)>,
    /// Type directory to index into `Catalog::types`.
    by_dir: HashMap<String, usize>,
}

/// All parents and instances of a daemon.
#[derive(Debug)]
pub struct Manager {
    catalog: Catalog,
    parents: Vec<ParentSpec>,
    /// Per parent name. The catalog and the parents are fixed for a manager's life, so the
    /// index is built once, in [`Manager::new`].
    type_index: HashMap<String, TypeIndex>,
    run_dir: PathBuf,
    instances: BTreeMap<Uuid, Managed>,
    /// How long a removal waits for a client to release the instance.
    release_timeout: Duration,
    /// Told the UUID of every removed instance (the daemon drops the tree's entries of it).
    removed: Option<std::sync::mpsc::Sender<Uuid>>,
    /// Live viewers of every instance's heads, when the daemon serves them.
    viewers: Option<crate::display::service::Viewers>,
    /// Who instance sockets are handed to.
    socket_owner: Option<socket::Owner>,
}

/// How long a removal waits, by default, for the client to release the instance after the
/// request interrupt. QEMU unplugs the device from the guest first; under PCIe native hotplug
/// the guest takes about 5 s for that (the attention-button delay).
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(15);

/// A removal waiting for the instance's client to let go (see [`Manager::begin_remove`]).
#[derive(Debug)]
pub struct Release {
    uuid: Uuid,
    shared: SharedInstance,
    since: Instant,
    timeout: Duration,
}

impl Release {
    /// The instance being removed.
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// Waits until the client has disconnected or the timeout has passed. Takes the instance
    /// lock only for a moment at a time, and never the manager.
    pub fn wait(&self) {
        let deadline = self.since + self.timeout;
        while lock(&self.shared).client_since.is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The mdev type directory of a type version: `vgpu_emu-<name>-v<version>`, lower case.
pub fn type_dir(ty: &VgpuType) -> String {
    format!(
        "vgpu_emu-{}-v{}",
        ty.name.to_ascii_lowercase().replace(['-', '.'], "_"),
        ty.version
    )
}

impl Manager {
    /// A manager whose instance sockets live in `run_dir`.
    pub fn new(catalog: Catalog, parents: Vec<ParentSpec>, run_dir: &Path) -> Result<Self, String> {
        for p in &parents {
            if catalog.family(&p.family).is_none() {
                let known: Vec<&str> = catalog.families().iter().map(|f| f.name.as_str()).collect();
                return Err(format!(
                    "parent {}: unknown family `{}` (known: {})",
                    p.name,
                    p.family,
                    known.join(", ")
                ));
            }
        }
        let mut names: Vec<&str> = parents.iter().map(|p| p.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err("parent names must be unique".into());
        }
        let mut type_index: HashMap<String, TypeIndex> = HashMap::new();
        for p in &parents {
            let mut index = TypeIndex::default();
            for (i, t) in catalog.types().iter().enumerate() {
                if t.family != p.family {
                    continue;
                }
                let dir = type_dir(t);
                if let Some(&other) = index.by_dir.get(&dir) {
                    return Err(format!(
                        "types {} and {} would share the mdev type directory {dir} (names may not \
                         differ only in `-`, `_` and `.`); rename one",
                        catalog.types()[other].key(),
                        t.key()
                    ));
                }
                index.by_dir.insert(dir.clone(), i);
                index.dirs.push((dir, i));
            }
            type_index.insert(p.name.clone(), index);
        }
        Ok(Manager {
            catalog,
            parents,
            type_index,
            run_dir: run_dir.to_path_buf(),
            instances: BTreeMap::new(),
            release_timeout: RELEASE_TIMEOUT,
            removed: None,
            viewers: None,
            socket_owner: None,
        })
    }

    /// Parents.
    pub fn parents(&self) -> &[ParentSpec] {
        &self.parents
    }

    fn parent(&self, name: &str) -> Result<&ParentSpec, ManageError> {
        self.parents
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| ManageError::NoParent(name.to_string()))
    }

    /// The type versions a parent offers, by type directory, in catalog order (none for an
    /// unknown parent).
    pub fn types_of(&self, parent: &str) -> impl Iterator<Item = (&str, &VgpuType)> + '_ {
        let types = self.catalog.types();
        self.type_index
            .get(parent)
            .into_iter()
            .flat_map(|index| index.dirs.iter())
            .map(move |(dir, i)| (dir.as_str(), &types[*i]))
    }

    /// A type of a parent by its directory name.
    pub fn type_by_dir(&self, parent: &str, dir: &str) -> Option<&VgpuType> {
        let i = *self.type_index.get(parent)?.by_dir.get(dir)?;
        self.catalog.types().get(i)
    }

    /// The type directory `spec` names on `parent`: a type directory itself, or `NAME[@VERSION]`
    /// resolved as everywhere else (a bare name: the newest non-deprecated version).
    pub fn resolve_type_dir(&self, parent: &str, spec: &str) -> Option<String> {
        if self.type_by_dir(parent, spec).is_some() {
            return Some(spec.to_string());
        }
        let p = self.parent(parent).ok()?;
        let ty = self.catalog.resolve(spec).ok()?;
        (ty.family == p.family).then(|| type_dir(ty))
    }

    /// Live `available_instances` of `ty` on `parent`.
    pub fn available(&self, parent: &str, ty: &VgpuType) -> u32 {
        self.availability(parent, ty).unwrap_or(0)
    }

    /// Live `available_instances` of `ty` on `parent` when it is not 0, else why it is 0.
    /// An unknown parent has nothing available: `Ok(0)`.
    pub fn availability(&self, parent: &str, ty: &VgpuType) -> Result<u32, Unavailable> {
        let Ok(p) = self.parent(parent) else {
            return Ok(0);
        };
        let Some(family) = self.catalog.family(&p.family) else {
            return Ok(0);
        };
        if ty.family != p.family {
            return Err(Unavailable::OtherFamily {
                family: ty.family.clone(),
                parent_family: p.family.clone(),
            });
        }
        if !ty.personality.is_implemented() {
            return Err(Unavailable::NotServed {
                personality: ty.personality.to_string(),
            });
        }
        let here: Vec<&Managed> = self
            .instances
            .values()
            .filter(|m| m.parent == parent)
            .collect();
        if let Some(other) = here.iter().find(|m| m.ty.framebuffer != ty.framebuffer) {
            return Err(Unavailable::OtherFramebufferSize {
                instances: here.len(),
                hosted: other.ty.framebuffer,
                wanted: ty.framebuffer,
            });
        }
        let used: u64 = here.iter().map(|m| m.ty.framebuffer).sum();
        let free = family.vram.saturating_sub(used);
        let by_vram = (free / ty.framebuffer.max(1)).min(u64::from(u32::MAX)) as u32;
        let by_count = ty.max_instances.saturating_sub(here.len() as u32);
        if by_count == 0 {
            return Err(Unavailable::MaxInstances {
                max: ty.max_instances,
            });
        }
        if by_vram == 0 {
            return Err(Unavailable::NoVram {
                free,
                total: family.vram,
                wanted: ty.framebuffer,
            });
        }
        Ok(by_vram.min(by_count))
    }

    /// The socket of an instance.
    pub fn socket_path(&self, uuid: &Uuid) -> PathBuf {
        self.run_dir.join(format!("{uuid}.sock"))
    }

    /// Creates and starts an instance; returns once its socket listens.
    pub fn create(
        &mut self,
        parent: &str,
        type_dir_name: &str,
        uuid: &str,
    ) -> Result<Uuid, ManageError> {
        let uuid = Uuid::parse_str(uuid.trim())
            .map_err(|_| ManageError::BadUuid(uuid.trim().to_string()))?;
        self.parent(parent)?;
        let ty = self
            .type_by_dir(parent, type_dir_name)
            .ok_or_else(|| ManageError::NoType {
                parent: parent.to_string(),
                ty: type_dir_name.to_string(),
            })?
            .clone();
        if self.instances.contains_key(&uuid) {
            return Err(ManageError::Exists(uuid));
        }
        match self.availability(parent, &ty) {
            Ok(0) => return Err(ManageError::NoParent(parent.to_string())),
            Ok(_) => {}
            Err(reason) => {
                return Err(ManageError::NoCapacity {
                    parent: parent.to_string(),
                    ty: ty.key(),
                    reason,
                })
            }
        }
        let socket = self.socket_path(&uuid);
        let listener = socket::bind(&socket).map_err(StartError::from)?;
        let guard = RemoveOnDrop(socket.clone());
        if let Some(owner) = self.socket_owner {
            socket::give(&socket, owner).map_err(StartError::from)?;
        }
        let ctl = control_path(&socket);
        let ctl_listener = socket::bind(&ctl).map_err(StartError::from)?;
        let ctl_guard = RemoveOnDrop(ctl.clone());
        let (instance, vram) =
            Instance::new(&ty, uuid, socket.clone()).map_err(StartError::from)?;
        let shared = Arc::new(Mutex::new(instance));
        // Viewers first: once the control socket answers, `status` names their addresses.
        // Without every port it still serves: a head without one is on the web page.
        if let Some(v) = &self.viewers {
            if let Err(e) = v.add(&shared, false) {
                warn!("{uuid}: no viewers: {e}");
            }
        }
        let unview = |viewers: &Option<crate::display::service::Viewers>| {
            if let Some(v) = viewers {
                v.remove(uuid);
            }
        };
        let runtime = match start_runtime(&shared) {
            Ok(r) => r,
            Err(e) => {
                unview(&self.viewers);
                return Err(StartError::Server(e).into());
            }
        };
        let control = match ControlServer::spawn(ctl_listener, shared.clone()) {
            Ok(c) => c,
            Err(e) => {
                runtime.stop();
                unview(&self.viewers);
                return Err(StartError::Server(e).into());
            }
        };
        let (mut server, stop) = match Server::new(listener, shared.clone(), vram) {
            Ok(s) => s,
            Err(e) => {
                control.stop();
                runtime.stop();
                unview(&self.viewers);
                return Err(StartError::Server(e).into());
            }
        };
        let thread = std::thread::Builder::new()
            .name(format!("instance-{}", &uuid.to_string()[..8]))
            .spawn(move || {
                if let Err(e) = server.run() {
                    warn!("instance server failed: {e}");
                }
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                control.stop();
                runtime.stop();
                unview(&self.viewers);
                return Err(StartError::Server(e).into());
            }
        };
        info!(
            "created {uuid} ({}) on {parent}, socket {}",
            ty.key(),
            socket.display()
        );
        if let Some(warning) = crate::cli::catalog_cmd::deprecation_warning(&self.catalog, &ty) {
            warn!("{uuid}: {warning}");
        }
        self.instances.insert(
            uuid,
            Managed {
                parent: parent.to_string(),
                ty,
                removing: false,
                shared,
                stop,
                server: Some(thread),
                runtime: Some(runtime),
                control: Some(control),
                _socket_guards: [guard, ctl_guard],
            },
        );
        Ok(uuid)
    }

    /// Stops and removes an instance; its capacity returns to the parent.
    pub fn remove(&mut self, uuid: &Uuid) -> Result<(), ManageError> {
        let m = self
            .instances
            .remove(uuid)
            .ok_or(ManageError::NoInstance(*uuid))?;
        let (parent, key) = (m.parent.clone(), m.ty.key());
        let attached = lock(&m.shared).client_since.is_some();
        if let Some(v) = &self.viewers {
            v.remove(*uuid);
        }
        m.shutdown();
        if let Some(to) = &self.removed {
            let _ = to.send(*uuid);
        }
        if attached {
            warn!("removed {uuid} ({key}) from {parent}, disconnecting its client");
        } else {
            info!("removed {uuid} ({key}) from {parent}");
        }
        Ok(())
    }

    /// Hands the vfio-user socket of every instance created from now on to `owner`.
    pub fn set_socket_owner(&mut self, owner: Option<socket::Owner>) {
        self.socket_owner = owner;
    }

    /// Serves the heads of every instance created from now on to viewers.
    pub fn set_viewers(&mut self, viewers: crate::display::service::Viewers) {
        self.viewers = Some(viewers);
    }

    /// The web page of the viewers, when `--web` is on, and what it offers.
    pub fn viewers_url(&self) -> Option<(String, &'static str)> {
        let v = self.viewers.as_ref()?;
        Some((v.web_url()?, v.web_offer()))
    }

    /// Sends the UUID of every instance removed from now on to `to`.
    pub fn notify_removals(&mut self, to: std::sync::mpsc::Sender<Uuid>) {
        self.removed = Some(to);
    }

    /// Sets how long a removal waits for a client to release an instance.
    pub fn set_release_timeout(&mut self, timeout: Duration) {
        self.release_timeout = timeout;
    }

    /// Starts removing `uuid` the way the kernel removes a device that is in use: when a client
    /// is attached, it is asked to release the device (the VFIO request interrupt; QEMU then
    /// unplugs it from the guest and disconnects). Removes at once when nobody is attached;
    /// otherwise returns a [`Release`] to wait on without holding the manager, then to pass
    /// to [`Manager::finish_remove`].
    pub fn begin_remove(&mut self, uuid: &Uuid) -> Result<Option<Release>, ManageError> {
        let m = self
            .instances
            .get_mut(uuid)
            .ok_or(ManageError::NoInstance(*uuid))?;
        if m.removing {
            return Err(ManageError::Removing(*uuid));
        }
        if lock(&m.shared).client_since.is_none() {
            self.remove(uuid)?;
            return Ok(None);
        }
        m.removing = true;
        let timeout = self.release_timeout;
        match m.stop.request_release() {
            Signalled::Raised | Signalled::AlreadyPending => info!(
                "remove {uuid}: a client is attached; asked it to release the device (request interrupt), waiting up to {timeout:?}"
            ),
            Signalled::NotAssigned => info!(
                "remove {uuid}: a client is attached and assigned no request interrupt (QEMU's vfio-user-pci assigns none), so it cannot be asked to release the device; waiting up to {timeout:?} for it to let go (for instance after QEMU's device_del)"
            ),
            Signalled::Failed(errno) => warn!(
                "remove {uuid}: a client is attached; raising its request interrupt failed ({}), waiting up to {timeout:?} for it to let go",
                std::io::Error::from_raw_os_error(errno)
            ),
        }
        Ok(Some(Release {
            uuid: *uuid,
            shared: m.shared.clone(),
            since: Instant::now(),
            timeout: self.release_timeout,
        }))
    }

    /// Ends a removal started by [`Manager::begin_remove`] once [`Release::wait`] returned:
    /// removes the instance if its client let go, or keeps it and answers EBUSY.
    pub fn finish_remove(&mut self, release: Release) -> Result<(), ManageError> {
        let uuid = release.uuid;
        let m = self
            .instances
            .get_mut(&uuid)
            .ok_or(ManageError::NoInstance(uuid))?;
        m.removing = false;
        if lock(&m.shared).client_since.is_some() {
            let e = ManageError::InUse {
                uuid,
                waited: release.timeout,
            };
            warn!("remove {uuid} refused: {e}; the instance stays");
            return Err(e);
        }
        info!(
            "remove {uuid}: the client released the device after {} ms",
            release.since.elapsed().as_millis()
        );
        self.remove(&uuid)
    }

    /// Gives up a removal started by [`Manager::begin_remove`] without deciding it.
    pub fn abort_remove(&mut self, uuid: &Uuid) {
        if let Some(m) = self.instances.get_mut(uuid) {
            m.removing = false;
        }
    }

    /// Stops every instance.
    pub fn remove_all(&mut self) {
        let all: Vec<Uuid> = self.instances.keys().copied().collect();
        for u in all {
            let _ = self.remove(&u);
        }
    }

    /// Instance UUIDs on `parent` (all parents when `None`).
    pub fn uuids(&self, parent: Option<&str>) -> Vec<Uuid> {
        self.instances
            .iter()
            .filter(|(_, m)| parent.is_none_or(|p| m.parent == p))
            .map(|(u, _)| *u)
            .collect()
    }

    /// The parent and type directory of an instance.
    pub fn placement(&self, uuid: &Uuid) -> Option<(String, String)> {
        self.instances
            .get(uuid)
            .map(|m| (m.parent.clone(), type_dir(&m.ty)))
    }

    /// Reads a runtime attribute.
    pub fn attr(&self, uuid: &Uuid, attr: &str) -> Option<String> {
        let m = self.instances.get(uuid)?;
        match attr {
            "frame_rate_limiter" => Some(
                if lock(&m.shared).frl_enabled {
                    "1"
                } else {
                    "0"
                }
                .to_string(),
            ),
            _ => None,
        }
    }

    /// Writes a runtime attribute (not guest ABI).
    pub fn set_attr(&mut self, uuid: &Uuid, attr: &str, value: &str) -> Result<(), ManageError> {
        let m = self
            .instances
            .get(uuid)
            .ok_or(ManageError::NoInstance(*uuid))?;
        let knob = Knob::parse(attr, value).map_err(|_| ManageError::BadAttr {
            attr: attr.to_string(),
            value: value.trim().to_string(),
        })?;
        // At once, on the device too, and the runtime is woken (a deadline may have gone).
        knob.apply(&m.shared);
        info!("{uuid}: {knob}");
        Ok(())
    }

    /// Runtime attributes every instance has.
    pub const ATTRS: [&'static str; 1] = crate::instance::KNOBS;

    /// `vgpu-emu list`.
    pub fn list(&self) -> Vec<InstanceInfo> {
        self.instances
            .iter()
            .map(|(u, m)| {
                let inst = lock(&m.shared);
                InstanceInfo {
                    uuid: u.to_string(),
                    parent: m.parent.clone(),
                    mdev_type: type_dir(&m.ty),
                    type_key: m.ty.key(),
                    socket: self.socket_path(u).display().to_string(),
                    frame_rate_limiter: inst.frl_enabled,
                    client_connected: inst.client_since.is_some(),
                    viewers: inst.viewers.clone(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manager(dir: &Path) -> Manager {
        let parents = vec!["emu0=emu".parse().unwrap(), "m60-0=m60".parse().unwrap()];
        Manager::new(Catalog::builtin().unwrap(), parents, dir).unwrap()
    }

    fn avail(m: &Manager, parent: &str, name: &str) -> u32 {
        let c = Catalog::builtin().unwrap();
        m.available(parent, c.resolve(name).unwrap())
    }

    #[test]
    fn capacity_follows_the_one_framebuffer_size_rule() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = manager(dir.path());
        assert_eq!(avail(&m, "emu0", "EMU-1G"), 4);
        assert_eq!(avail(&m, "emu0", "EMU-64M"), 32);
        assert_eq!(avail(&m, "emu0", "M60-2Q"), 0, "another family");
        // The seed's table: 8 GiB per M60 parent, max_instances per type.
        for (name, n) in [
            ("M60-0B", 16),
            ("M60-1Q", 8),
            ("M60-2Q", 4),
            ("M60-4Q", 2),
            ("M60-8Q", 1),
        ] {
            assert_eq!(avail(&m, "m60-0", name), n, "{name}");
        }
        let a = m
            .create(
                "emu0",
                "vgpu_emu-emu_1g-v1",
                "11111111-1111-1111-1111-111111111111",
            )
            .unwrap();
        assert_eq!(avail(&m, "emu0", "EMU-1G"), 3);
        assert_eq!(
            avail(&m, "emu0", "EMU-64M"),
            0,
            "one framebuffer size per parent"
        );
        for i in 2..=4 {
            m.create(
                "emu0",
                "vgpu_emu-emu_1g-v1",
                &format!("{i}1111111-1111-1111-1111-111111111111"),
            )
            .unwrap();
        }
        assert_eq!(avail(&m, "emu0", "EMU-1G"), 0);
        let e = m
            .create(
                "emu0",
                "vgpu_emu-emu_1g-v1",
                "51111111-1111-1111-1111-111111111111",
            )
            .unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC);
        assert_eq!(
            e.to_string(),
            "no available instances of EMU-1G@1 on emu0: the parent already hosts 4 instance(s) \
             of this size, the type's max_instances"
        );
        let e = m
            .create(
                "emu0",
                "vgpu_emu-emu_64m-v1",
                "61111111-1111-1111-1111-111111111111",
            )
            .unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC);
        assert!(!e.is_bad_input());
        assert_eq!(
            e.to_string(),
            "no available instances of EMU-64M@1 on emu0: the parent hosts 4 instance(s) with a \
             1024M framebuffer, and a parent hosts one framebuffer size at a time (64M wanted)"
        );
        m.create(
            "m60-0",
            "vgpu_emu-m60_2q-v1",
            "71111111-1111-1111-1111-111111111111",
        )
        .unwrap();
        assert_eq!(avail(&m, "m60-0", "M60-2Q"), 3);
        assert_eq!(avail(&m, "m60-0", "M60-2B"), 3, "the same 2048M size");
        assert_eq!(avail(&m, "m60-0", "M60-1Q"), 0, "one framebuffer size");
        assert_eq!(avail(&m, "m60-0", "M60-8Q"), 0);
        let c = Catalog::builtin().unwrap();
        assert_eq!(
            m.availability("emu0", c.resolve("M60-2Q").unwrap()),
            Err(Unavailable::OtherFamily {
                family: "m60".into(),
                parent_family: "emu".into()
            })
        );
        let e = m
            .create("emu0", "vgpu_emu-emu_1g-v1", &a.to_string())
            .unwrap_err();
        assert_eq!(e.errno(), libc::EEXIST);
        let e = m
            .create("emu0", "vgpu_emu-emu_1g-v1", "garbage")
            .unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(m.socket_path(&a).exists());
        m.remove(&a).unwrap();
        assert!(
            !m.socket_path(&a).exists(),
            "the socket goes with the instance"
        );
        assert_eq!(avail(&m, "emu0", "EMU-1G"), 1, "capacity returns");
        m.remove_all();
        assert_eq!(avail(&m, "emu0", "EMU-64M"), 32);
    }

    #[test]
    fn attributes_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = manager(dir.path());
        let u = m
            .create(
                "emu0",
                "vgpu_emu-emu_16m-v1",
                "22222222-2222-2222-2222-222222222222",
            )
            .unwrap();
        assert_eq!(m.attr(&u, "frame_rate_limiter").as_deref(), Some("1"));
        m.set_attr(&u, "frame_rate_limiter", "0\n").unwrap();
        assert_eq!(m.attr(&u, "frame_rate_limiter").as_deref(), Some("0"));
        assert_eq!(
            m.set_attr(&u, "frame_rate_limiter", "2")
                .unwrap_err()
                .errno(),
            libc::EINVAL
        );
        assert_eq!(m.list()[0].mdev_type, "vgpu_emu-emu_16m-v1");
        assert_eq!(
            m.resolve_type_dir("emu0", "emu-16m").as_deref(),
            Some("vgpu_emu-emu_16m-v1")
        );
        assert_eq!(
            m.resolve_type_dir("emu0", "EMU-64M@1").as_deref(),
            Some("vgpu_emu-emu_64m-v1")
        );
        assert_eq!(
            m.resolve_type_dir("emu0", "vgpu_emu-emu_1g-v1").as_deref(),
            Some("vgpu_emu-emu_1g-v1")
        );
        assert_eq!(m.resolve_type_dir("emu0", "M60-2Q"), None, "another family");
        m.remove_all();
    }

    #[test]
    fn the_type_index_serves_every_type_and_refuses_shared_directories() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path());
        let c = Catalog::builtin().unwrap();
        for p in ["emu0", "m60-0"] {
            let listed: Vec<(&str, &VgpuType)> = m.types_of(p).collect();
            let family = if p == "emu0" { "emu" } else { "m60" };
            let expected: Vec<&VgpuType> =
                c.types().iter().filter(|t| t.family == family).collect();
            assert_eq!(listed.len(), expected.len());
            for ((d, t), e) in listed.iter().zip(&expected) {
                assert_eq!((*d, t.key()), (type_dir(e).as_str(), e.key()));
                assert_eq!(m.type_by_dir(p, d).map(VgpuType::key), Some(e.key()));
            }
        }
        assert_eq!(m.types_of("nope").count(), 0);
        assert!(m.type_by_dir("nope", "vgpu_emu-emu_64m-v1").is_none());
        assert!(m.type_by_dir("m60-0", "vgpu_emu-emu_64m-v1").is_none());

        let mut c = Catalog::builtin().unwrap();
        let record = |name: &str| {
            format!(
                "[[type]]\nname = \"{name}\"\nversion = 1\nfamily = \"emu\"\npersonality = \"bochs\"\n\
                 pci = {{ vendor = 0x1234, device = 0x1111, subsystem_vendor = 0x1234, subsystem_device = 0x2001, class = 0x038000, revision = 2 }}\n\
                 framebuffer = \"32M\"\nnum_heads = 1\nmax_resolution = \"2560x1440\"\n\
                 default_resolution = \"1920x1080\"\nfrl = 30\nmax_instances = 8\n"
            )
        };
        c.add_toml("lab.toml", &(record("LAB-X") + &record("LAB_X")))
            .unwrap();
        let e = Manager::new(c, vec!["emu0=emu".parse().unwrap()], dir.path()).unwrap_err();
        assert!(
            e.contains("LAB-X@1 and LAB_X@1 would share the mdev type directory vgpu_emu-lab_x-v1"),
            "{e}"
        );
    }

    #[test]
    fn a_bare_name_creates_the_newest_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut catalog = Catalog::builtin().unwrap();
        let lab = |version: u32, fb: &str| {
            format!(
                "[[type]]\nname = \"LAB-32M\"\nversion = {version}\nfamily = \"emu\"\npersonality = \"bochs\"\n\
                 pci = {{ vendor = 0x1234, device = 0x1111, subsystem_vendor = 0x1234, subsystem_device = 0x2001, class = 0x038000, revision = 2 }}\n\
                 framebuffer = \"{fb}\"\nnum_heads = 1\nmax_resolution = \"2560x1440\"\n\
                 default_resolution = \"1920x1080\"\nfrl = 30\nmax_instances = 8\n"
            )
        };
        // @2 has the smaller framebuffer: it sorts first in the table.
        catalog
            .add_toml("lab.toml", &(lab(2, "32M") + &lab(1, "64M")))
            .unwrap();
        let mut m = Manager::new(catalog, vec!["emu0=emu".parse().unwrap()], dir.path()).unwrap();
        let dir_name = m.resolve_type_dir("emu0", "LAB-32M").unwrap();
        assert_eq!(dir_name, "vgpu_emu-lab_32m-v2");
        m.create("emu0", &dir_name, "44444444-4444-4444-4444-444444444444")
            .unwrap();
        assert_eq!(m.list()[0].type_key, "LAB-32M@2");
        assert!("bad".parse::<ParentSpec>().is_err());
        for good in ["emu0", "m60-0", "0000:00:02.0", "gpu_1.a"] {
            let spec: ParentSpec = format!("{good}=emu").parse().unwrap();
            assert_eq!(spec.name, good);
        }
        let long = "a".repeat(MAX_PARENT_NAME + 1);
        for bad in [
            ".", "..", "", ".hidden", "-p", "a/b", "/", "a b", "é", "a\n", &long,
        ] {
            let e = format!("{bad}=emu").parse::<ParentSpec>().unwrap_err();
            assert!(e.contains("parent name"), "{bad:?}: {e}");
        }
        assert!("emu0=".parse::<ParentSpec>().is_err());
        assert!("emu0=../x".parse::<ParentSpec>().is_err());
        assert!(Manager::new(
            Catalog::builtin().unwrap(),
            vec!["x=nope".parse().unwrap()],
            dir.path()
        )
        .is_err());
        m.remove_all();
    }

    #[test]
    fn start_failures_keep_their_cause_and_a_kernel_errno() {
        let dir = tempfile::tempdir().unwrap();
        let ty = "vgpu_emu-emu_16m-v1";
        let uuid = "44444444-4444-4444-4444-444444444444";
        // The run directory went away under the manager.
        let mut m = manager(&dir.path().join("gone"));
        let e = m.create("emu0", ty, uuid).unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        let why = crate::error::chain(&e);
        assert!(
            why.starts_with("cannot start the instance: cannot listen on ")
                && why.ends_with(&std::io::Error::from_raw_os_error(libc::ENOENT).to_string()),
            "{why}"
        );
        // A socket path too long for a socket address.
        let long = dir.path().join("d".repeat(100));
        std::fs::create_dir(&long).unwrap();
        let mut m = manager(&long);
        let e = m.create("emu0", ty, uuid).unwrap_err();
        assert_eq!(e.errno(), libc::ENAMETOOLONG);
        let why = crate::error::chain(&e);
        assert!(
            why.contains("over the 107 a UNIX socket path may have"),
            "{why}"
        );
        assert_eq!(m.uuids(None), Vec::<Uuid>::new(), "nothing was created");
        assert!(
            std::fs::read_dir(&long).unwrap().next().is_none(),
            "nothing left behind"
        );
    }
}

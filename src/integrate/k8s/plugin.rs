//! The device plugin proper: which resources a daemon's types become, the devices each one
//! lists, Allocate, the record of the instances the plugin created (its state file) and their
//! removal once no container holds them.
//!
//! Resources: `vgpu-emu.io/<NAME>.v<VERSION>` for every servable type version, and
//! `vgpu-emu.io/<NAME>` for the newest non-deprecated version of each name, fixed when the plugin
//! starts (a resource name is the only thing a pod can ask for: the bare name follows the
//! catalog's own meaning of a bare name; the versioned one pins the guest ABI). `@` is not
//! allowed in a resource name, hence `.v`.
//!
//! Devices of a resource: `<SUFFIX>-<n>` (`M60-2Q-0`, `M60-2Q.v1-3`). Those the plugin allocated
//! keep their ID for as long as the instance is held (Healthy while the daemon lists the
//! instance, Unhealthy once it is gone); the free ones are the lowest unused numbers, as many as
//! the daemon's parents have room for (the sum of `available_instances` over the parents that
//! offer the type).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{info, warn};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::backend::{Backend, BackendError, Offer};
use super::proto::v1beta1::{
    self, device_plugin_server::DevicePlugin, AllocateRequest, AllocateResponse,
    ContainerAllocateResponse, ContainerPreferredAllocationResponse, Device, DevicePluginOptions,
    Empty, ListAndWatchResponse, Mount, PreStartContainerRequest, PreStartContainerResponse,
    PreferredAllocationRequest, PreferredAllocationResponse,
};

/// The domain of every resource name.
pub const DOMAIN: &str = "vgpu-emu.io";
/// Where a container finds its instance sockets: `<CONTAINER_DIR>/<SUFFIX>/<i>.sock`.
pub const CONTAINER_DIR: &str = "/var/run/vgpu-emu";
/// Most devices one resource lists.
pub const MAX_DEVICES: usize = 4096;
/// Most device IDs one Allocate may name (over all its containers).
pub const MAX_REQUEST_IDS: usize = 256;
/// Largest state file the plugin reads.
const MAX_STATE: u64 = 16 << 20;

/// One resource the plugin registers: a type version, under a bare or a versioned name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    /// What follows `vgpu-emu.io/`: `M60-2Q` or `M60-2Q.v1`.
    pub suffix: String,
    /// Type name.
    pub name: String,
    /// The type version it hands out.
    pub version: u32,
}

impl Resource {
    /// `vgpu-emu.io/<suffix>`.
    pub fn resource_name(&self) -> String {
        resource_name(&self.suffix)
    }

    /// `NAME@VERSION`.
    pub fn type_key(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// The part of its environment variables' names: the suffix in upper case, every
    /// character other than a letter or digit as `_` (`M60-2Q.v1`: `M60_2Q_V1`).
    pub fn env_key(&self) -> String {
        self.suffix
            .chars()
            .map(|c| match c.is_ascii_alphanumeric() {
                true => c.to_ascii_uppercase(),
                false => '_',
            })
            .collect()
    }

    /// Device `n`'s ID.
    pub fn device_id(&self, n: usize) -> String {
        format!("{}-{n}", self.suffix)
    }

    /// The number of one of this resource's device IDs.
    pub fn device_number(&self, id: &str) -> Option<usize> {
        let n = id.strip_prefix(&self.suffix)?.strip_prefix('-')?;
        // Canonical numbers only: `01` is not device 1.
        (n == "0" || !n.starts_with('0'))
            .then(|| n.parse().ok())
            .flatten()
    }

    fn offered_by(&self, o: &Offer) -> bool {
        o.servable && o.name == self.name && o.version == self.version
    }
}

/// `vgpu-emu.io/<suffix>`.
pub fn resource_name(suffix: &str) -> String {
    format!("{DOMAIN}/{suffix}")
}

/// A resource name's part after the domain must be a Kubernetes qualified name: up to 63
/// letters, digits, `-`, `_`, `.`, starting and ending with a letter or digit.
fn valid_suffix(s: &str) -> bool {
    let b = s.as_bytes();
    let edge = |c: Option<&u8>| c.is_some_and(u8::is_ascii_alphanumeric);
    s.len() <= 63
        && edge(b.first())
        && edge(b.last())
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
}

/// One entry of `--types`: `NAME` (the bare resource) or `NAME@VERSION` (the versioned one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeSel {
    /// Type name.
    pub name: String,
    /// Version, for the versioned resource.
    pub version: Option<u32>,
}

impl std::str::FromStr for TypeSel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, version) = match s.split_once('@') {
            Some((n, v)) => (
                n,
                Some(
                    v.parse()
                        .map_err(|_| format!("`{s}`: `{v}` is not a version number"))?,
                ),
            ),
            None => (s, None),
        };
        if name.is_empty() {
            return Err(format!("`{s}` is not NAME or NAME@VERSION"));
        }
        Ok(TypeSel {
            name: name.to_string(),
            version,
        })
    }
}

impl std::fmt::Display for TypeSel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.version {
            Some(v) => write!(f, "{}@{v}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// The resources for what the daemon's parents offer (servable type versions only), limited to
/// `only` when it is not empty; also the warnings about types left out.
pub fn resources(
    offers: &[Offer],
    only: &[TypeSel],
) -> Result<(Vec<Resource>, Vec<String>), String> {
    // name -> version -> deprecated
    let mut by_name: std::collections::BTreeMap<&str, std::collections::BTreeMap<u32, bool>> =
        Default::default();
    for o in offers.iter().filter(|o| o.servable) {
        by_name
            .entry(&o.name)
            .or_default()
            .insert(o.version, o.deprecated);
    }
    let mut all = Vec::new();
    for (name, versions) in &by_name {
        for v in versions.keys() {
            all.push(Resource {
                suffix: format!("{name}.v{v}"),
                name: name.to_string(),
                version: *v,
            });
        }
        if let Some((v, _)) = versions.iter().rev().find(|(_, deprecated)| !**deprecated) {
            all.push(Resource {
                suffix: name.to_string(),
                name: name.to_string(),
                version: *v,
            });
        }
    }
    let mut warnings = Vec::new();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for r in all {
        if !valid_suffix(&r.suffix) {
            warnings.push(format!(
                "type {}: `{}` is not a valid resource name; not registered",
                r.type_key(),
                r.resource_name()
            ));
        } else if !seen.insert(r.suffix.clone()) {
            warnings.push(format!(
                "type {}: `{}` is taken by another type; not registered",
                r.type_key(),
                r.resource_name()
            ));
        } else {
            out.push(r);
        }
    }
    if only.is_empty() {
        return Ok((out, warnings));
    }
    let mut picked = Vec::new();
    for sel in only {
        let bare = |r: &&Resource| r.name == sel.name && r.suffix == r.name;
        let found = out.iter().find(|r| match sel.version {
            Some(v) => r.name == sel.name && r.version == v && r.suffix != r.name,
            None => bare(r),
        });
        match found {
            Some(r) if !picked.contains(r) => picked.push(r.clone()),
            Some(_) => {}
            None => {
                return Err(format!(
                    "--types {sel}: no parent of the daemon offers a servable type {sel}{}",
                    match sel.version {
                        None => " (with a non-deprecated version)",
                        Some(_) => "",
                    }
                ))
            }
        }
    }
    Ok((picked, warnings))
}

/// An instance the plugin created for a device; the state file lists them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allocation {
    /// The resource's suffix.
    pub resource: String,
    /// The device ID.
    pub device: String,
    /// The instance.
    pub uuid: String,
    /// Its parent.
    pub parent: String,
    /// Its type, `NAME@VERSION`.
    #[serde(rename = "type")]
    pub type_key: String,
    /// Its vfio-user socket on the host.
    pub socket: String,
    /// When it was allocated, ms since the epoch.
    pub since_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    allocations: Vec<Allocation>,
}

/// `STATE_DIR/allocations.json`.
pub fn state_file(state_dir: &Path) -> PathBuf {
    state_dir.join("allocations.json")
}

/// Reads the state file; none there is no allocation.
pub fn load_state(path: &Path) -> Result<Vec<Allocation>, String> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut text = String::new();
    file.take(MAX_STATE + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_STATE {
        return Err(format!("{} is over {MAX_STATE} bytes", path.display()));
    }
    let state: StateFile = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{} is not a device-plugin state file ({e}); move it away to start afresh (the \
             instances it lists are then no longer removed by the plugin)",
            path.display()
        )
    })?;
    if state.version != 1 {
        return Err(format!(
            "{}: state version {} is not 1",
            path.display(),
            state.version
        ));
    }
    Ok(state.allocations)
}

/// Writes the state file atomically (a temporary file renamed over it).
pub fn save_state(path: &Path, allocations: &[Allocation]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(&StateFile {
        version: 1,
        allocations: allocations.to_vec(),
    })
    .map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text + "\n")?;
    std::fs::rename(&tmp, path)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The devices of a resource: its allocated devices (Healthy while their instance is live),
/// then as many free ones as `available` says, numbered from the lowest unused number; in
/// number order, at most [`MAX_DEVICES`].
pub fn device_list(
    r: &Resource,
    allocated: &[&Allocation],
    live: &HashSet<String>,
    available: usize,
) -> Vec<Device> {
    let mut out: Vec<(usize, Device)> = Vec::new();
    let mut used = HashSet::new();
    for a in allocated.iter().take(MAX_DEVICES) {
        let n = r.device_number(&a.device).unwrap_or(usize::MAX);
        used.insert(n);
        let health = match live.contains(&a.uuid) {
            true => v1beta1::HEALTHY,
            false => v1beta1::UNHEALTHY,
        };
        out.push((
            n,
            Device {
                id: a.device.clone(),
                health: health.into(),
                topology: None,
            },
        ));
    }
    let mut free = available.min(MAX_DEVICES - out.len());
    let mut n = 0;
    while free > 0 {
        if !used.contains(&n) {
            out.push((
                n,
                Device {
                    id: r.device_id(n),
                    health: v1beta1::HEALTHY.into(),
                    topology: None,
                },
            ));
            free -= 1;
        }
        n += 1;
    }
    out.sort_by_key(|(n, _)| *n);
    out.into_iter().map(|(_, d)| d).collect()
}

/// What a refresh saw of the daemon.
#[derive(Debug, Default)]
struct Seen {
    offers: Vec<Offer>,
    /// Live instance UUIDs; `None` when the daemon could not be asked.
    live: Option<HashSet<String>>,
}

#[derive(Debug, Default)]
struct Shared {
    allocations: Vec<Allocation>,
    /// The last trouble reaching the daemon, logged once.
    last_error: Option<String>,
}

/// Settings of a [`Plugin`].
#[derive(Clone, Debug)]
pub struct PluginSettings {
    /// The resources to serve.
    pub resources: Vec<Resource>,
    /// The state file.
    pub state_file: PathBuf,
    /// How long an allocation no container holds is kept (an Allocate comes before the pod
    /// shows in the pod-resources list).
    pub grace: Duration,
}

/// The plugin's state, shared by every resource's endpoint and the background loops.
pub struct Plugin {
    backend: Arc<dyn Backend>,
    settings: PluginSettings,
    /// Held by Allocate and by removals, so the two never interleave.
    ops: tokio::sync::Mutex<()>,
    shared: Mutex<Shared>,
    /// Each resource's current device list, by suffix.
    watches: HashMap<String, watch::Sender<Vec<Device>>>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn internal(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("a daemon call failed: {e}"))
}

fn backend_status(e: &BackendError) -> Status {
    match e.unreachable {
        true => Status::unavailable(format!("vgpu-emu daemon: {e}")),
        false => Status::resource_exhausted(format!("vgpu-emu daemon: {e}")),
    }
}

/// An instance made for a device by Allocate.
#[derive(Debug)]
struct Created {
    uuid: Uuid,
    parent: String,
    socket: String,
}

/// Creates `count` instances of a type on the parents in `room` (parent, type dir, available),
/// filling the fullest parent first (least available: NVIDIA's one-size-per-GPU rule makes
/// parents already hosting this size the right place). On any failure, removes what it
/// created and fails.
fn create_many(
    backend: &dyn Backend,
    mut room: Vec<(String, String, u32)>,
    count: usize,
) -> Result<Vec<Created>, Status> {
    room.retain(|r| r.2 > 0);
    room.sort_by(|a, b| a.2.cmp(&b.2).then(a.0.cmp(&b.0)));
    let mut made: Vec<Created> = Vec::new();
    let rollback = |made: &[Created]| {
        for c in made {
            if let Err(e) = backend.remove(&c.uuid) {
                warn!(
                    "cannot remove instance {} after a failed Allocate: {e}",
                    c.uuid
                );
            }
        }
    };
    for _ in 0..count {
        let mut last: Option<BackendError> = None;
        let mut done = false;
        for (parent, dir, avail) in room.iter_mut().filter(|r| r.2 > 0) {
            let uuid = Uuid::new_v4();
            match backend.create(parent, dir, &uuid) {
                Ok(socket) => {
                    *avail -= 1;
                    made.push(Created {
                        uuid,
                        parent: parent.clone(),
                        socket,
                    });
                    done = true;
                    break;
                }
                Err(e) if e.unreachable => {
                    rollback(&made);
                    return Err(backend_status(&e));
                }
                Err(e) => {
                    // Full after all (capacity is shared with other types): try the next.
                    *avail = 0;
                    last = Some(e);
                }
            }
        }
        if !done {
            rollback(&made);
            return Err(Status::resource_exhausted(match last {
                Some(e) => format!("no parent has room for another instance: {e}"),
                None => "no parent has room for another instance".into(),
            }));
        }
    }
    Ok(made)
}

impl Plugin {
    /// A plugin over `backend` with the allocations of an earlier run.
    pub fn new(
        backend: Arc<dyn Backend>,
        settings: PluginSettings,
        allocations: Vec<Allocation>,
    ) -> Arc<Plugin> {
        let watches = settings
            .resources
            .iter()
            .map(|r| (r.suffix.clone(), watch::channel(Vec::new()).0))
            .collect();
        Arc::new(Plugin {
            backend,
            settings,
            ops: tokio::sync::Mutex::new(()),
            shared: Mutex::new(Shared {
                allocations,
                last_error: None,
            }),
            watches,
        })
    }

    /// The resources served.
    pub fn resources(&self) -> &[Resource] {
        &self.settings.resources
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The instances the plugin holds.
    pub fn allocations(&self) -> Vec<Allocation> {
        self.shared().allocations.clone()
    }

    /// A resource's current devices.
    pub fn devices(&self, suffix: &str) -> Vec<Device> {
        self.watches
            .get(suffix)
            .map(|w| w.borrow().clone())
            .unwrap_or_default()
    }

    /// Asks the daemon for capacity and instances and updates every device list (watchers are
    /// woken only for a list that changed).
    pub async fn refresh(&self) {
        self.refresh_seen().await;
    }

    async fn refresh_seen(&self) -> Seen {
        let b = self.backend.clone();
        let (offers, instances) = tokio::task::spawn_blocking(move || (b.offers(), b.instances()))
            .await
            .unwrap_or_else(|e| {
                let e = BackendError {
                    unreachable: true,
                    message: e.to_string(),
                };
                (Err(e.clone()), Err(e))
            });
        let mut trouble = None;
        let offers = offers.unwrap_or_else(|e| {
            trouble = Some(e.message);
            Vec::new()
        });
        let live = match instances {
            Ok(list) => Some(list.into_iter().map(|i| i.uuid).collect::<HashSet<_>>()),
            Err(e) => {
                trouble.get_or_insert(e.message);
                None
            }
        };
        let mut shared = self.shared();
        if trouble != shared.last_error {
            match &trouble {
                Some(t) => warn!("vgpu-emu daemon: {t}; advertising no free device"),
                None => info!("vgpu-emu daemon: reachable"),
            }
            shared.last_error = trouble;
        }
        let none = HashSet::new();
        for r in &self.settings.resources {
            let available: usize = offers
                .iter()
                .filter(|o| r.offered_by(o))
                .map(|o| o.available as usize)
                .sum();
            let allocated: Vec<&Allocation> = shared
                .allocations
                .iter()
                .filter(|a| a.resource == r.suffix)
                .collect();
            let list = device_list(r, &allocated, live.as_ref().unwrap_or(&none), available);
            if let Some(w) = self.watches.get(&r.suffix) {
                w.send_if_modified(|cur| {
                    let changed = *cur != list;
                    if changed {
                        *cur = list;
                    }
                    changed
                });
            }
        }
        Seen { offers, live }
    }

    fn persist(&self, allocations: &[Allocation]) -> Result<(), Status> {
        save_state(&self.settings.state_file, allocations).map_err(|e| {
            Status::internal(format!(
                "cannot write {}: {e}",
                self.settings.state_file.display()
            ))
        })
    }

    /// Allocate for one resource: an instance per device ID (the one it has when already
    /// allocated and live, else a new one), all or nothing.
    pub async fn allocate(
        &self,
        suffix: &str,
        req: AllocateRequest,
    ) -> Result<AllocateResponse, Status> {
        let r = self
            .settings
            .resources
            .iter()
            .find(|r| r.suffix == suffix)
            .ok_or_else(|| Status::not_found(format!("no resource {suffix}")))?
            .clone();
        // The request's shape, before anything is looked at.
        if req.container_requests.is_empty() {
            return Err(Status::invalid_argument("Allocate names no container"));
        }
        let total: usize = req
            .container_requests
            .iter()
            .map(|c| c.devices_ids.len())
            .sum();
        if total > MAX_REQUEST_IDS {
            return Err(Status::invalid_argument(format!(
                "Allocate names {total} devices; at most {MAX_REQUEST_IDS} at once"
            )));
        }
        let mut ids = HashSet::new();
        for c in &req.container_requests {
            if c.devices_ids.is_empty() {
                return Err(Status::invalid_argument(
                    "a container request names no device",
                ));
            }
            for id in &c.devices_ids {
                if !ids.insert(id.as_str()) {
                    return Err(Status::invalid_argument(format!(
                        "device {id} is named twice"
                    )));
                }
            }
        }

        let _ops = self.ops.lock().await;
        let seen = self.refresh_seen().await;
        let advertised = self.devices(suffix);
        if total > advertised.len() {
            return Err(Status::resource_exhausted(format!(
                "{total} devices of {} asked for, {} exist",
                r.resource_name(),
                advertised.len()
            )));
        }
        for id in &ids {
            if !advertised.iter().any(|d| d.id == *id) {
                return Err(Status::invalid_argument(format!(
                    "unknown device {id} of {}",
                    r.resource_name()
                )));
            }
        }
        let Some(live) = seen.live else {
            return Err(Status::unavailable("the vgpu-emu daemon cannot be reached"));
        };
        // Devices whose instance is live keep it; the others get new instances.
        let held: HashMap<String, Allocation> = self
            .shared()
            .allocations
            .iter()
            .filter(|a| a.resource == r.suffix && live.contains(&a.uuid))
            .map(|a| (a.device.clone(), a.clone()))
            .collect();
        let fresh: Vec<String> = req
            .container_requests
            .iter()
            .flat_map(|c| c.devices_ids.iter())
            .filter(|id| !held.contains_key(*id))
            .cloned()
            .collect();
        let room: Vec<(String, String, u32)> = seen
            .offers
            .iter()
            .filter(|o| r.offered_by(o))
            .map(|o| (o.parent.clone(), o.type_dir.clone(), o.available))
            .collect();
        let backend = self.backend.clone();
        let count = fresh.len();
        let made = tokio::task::spawn_blocking(move || create_many(&*backend, room, count))
            .await
            .map_err(internal)??;
        let since_ms = now_ms();
        let new: Vec<Allocation> = fresh
            .iter()
            .zip(&made)
            .map(|(id, c)| Allocation {
                resource: r.suffix.clone(),
                device: id.clone(),
                uuid: c.uuid.to_string(),
                parent: c.parent.clone(),
                type_key: r.type_key(),
                socket: c.socket.clone(),
                since_ms,
            })
            .collect();
        let persisted = {
            let mut shared = self.shared();
            let mut next: Vec<Allocation> = shared
                .allocations
                .iter()
                .filter(|a| !(a.resource == r.suffix && fresh.contains(&a.device)))
                .cloned()
                .collect();
            next.extend(new.iter().cloned());
            let done = self.persist(&next);
            if done.is_ok() {
                shared.allocations = next;
            }
            done
        };
        if let Err(e) = persisted {
            let backend = self.backend.clone();
            let undo: Vec<Uuid> = made.iter().map(|c| c.uuid).collect();
            let _ = tokio::task::spawn_blocking(move || {
                for u in undo {
                    if let Err(e) = backend.remove(&u) {
                        warn!("cannot remove instance {u} after a failed Allocate: {e}");
                    }
                }
            })
            .await;
            return Err(e);
        }
        for a in &new {
            info!(
                "allocated {} {}: instance {} ({}) on {}",
                r.resource_name(),
                a.device,
                a.uuid,
                a.type_key,
                a.parent
            );
        }
        let by_id: HashMap<&str, &Allocation> = held
            .values()
            .chain(new.iter())
            .map(|a| (a.device.as_str(), a))
            .collect();
        let response = AllocateResponse {
            container_responses: req
                .container_requests
                .iter()
                .map(|c| container_response(&r, c.devices_ids.iter().map(|id| by_id[id.as_str()])))
                .collect(),
        };
        drop(_ops);
        self.refresh().await;
        Ok(response)
    }

    /// Removes the instances the plugin created whose device no container holds
    /// (`assigned`: resource name and device ID pairs, from kubelet's pod-resources list), once
    /// their grace period is over. Returns how many it removed.
    pub async fn reconcile(&self, assigned: &HashSet<(String, String)>) -> usize {
        let _ops = self.ops.lock().await;
        let now = now_ms();
        let grace = self.settings.grace.as_millis() as u64;
        let stale: Vec<Allocation> = self
            .shared()
            .allocations
            .iter()
            .filter(|a| {
                !assigned.contains(&(resource_name(&a.resource), a.device.clone()))
                    && now.saturating_sub(a.since_ms) >= grace
            })
            .cloned()
            .collect();
        if stale.is_empty() {
            return 0;
        }
        let backend = self.backend.clone();
        let removed: Vec<String> = tokio::task::spawn_blocking(move || {
            stale
                .into_iter()
                .filter_map(|a| {
                    let uuid = Uuid::parse_str(&a.uuid).ok();
                    let result = match uuid {
                        Some(u) => backend.remove(&u),
                        // Not a UUID: nothing the daemon has; forget it.
                        None => Ok(()),
                    };
                    match result {
                        Ok(()) => {
                            info!(
                                "{} {} is no longer held: removed instance {}",
                                resource_name(&a.resource),
                                a.device,
                                a.uuid
                            );
                            Some(a.uuid)
                        }
                        Err(e) => {
                            warn!("cannot remove instance {} (will retry): {e}", a.uuid);
                            None
                        }
                    }
                })
                .collect()
        })
        .await
        .unwrap_or_default();
        if !removed.is_empty() {
            let mut shared = self.shared();
            let next: Vec<Allocation> = shared
                .allocations
                .iter()
                .filter(|a| !removed.contains(&a.uuid))
                .cloned()
                .collect();
            // On a write failure the file keeps listing removed instances: removing them again
            // later is harmless.
            if let Err(e) = self.persist(&next) {
                warn!("{}", e.message());
            }
            shared.allocations = next;
        }
        drop(_ops);
        self.refresh().await;
        removed.len()
    }
}

/// The response for one container: per device `i` (in the order asked), its socket mounted at
/// `CONTAINER_DIR/<suffix>/<i>.sock`, environment variables listing the sockets, UUIDs and
/// types (comma-separated, in that order) under generic names and names specific to the
/// resource, and an annotation per device naming its instance.
fn container_response<'a>(
    r: &Resource,
    allocations: impl Iterator<Item = &'a Allocation>,
) -> ContainerAllocateResponse {
    let mut out = ContainerAllocateResponse::default();
    let (mut sockets, mut uuids, mut types) = (Vec::new(), Vec::new(), Vec::new());
    for (i, a) in allocations.enumerate() {
        let container_path = format!("{CONTAINER_DIR}/{}/{i}.sock", r.suffix);
        out.mounts.push(Mount {
            container_path: container_path.clone(),
            host_path: a.socket.clone(),
            read_only: false,
        });
        out.annotations
            .insert(format!("{DOMAIN}/{}", a.device), a.uuid.clone());
        sockets.push(container_path);
        uuids.push(a.uuid.clone());
        types.push(a.type_key.clone());
    }
    let key = r.env_key();
    for (what, values) in [("SOCKET", sockets), ("UUID", uuids), ("TYPE", types)] {
        let v = values.join(",");
        out.envs.insert(format!("VGPU_EMU_{what}"), v.clone());
        out.envs.insert(format!("VGPU_EMU_{key}_{what}"), v);
    }
    out
}

/// One resource's gRPC endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    plugin: Arc<Plugin>,
    suffix: String,
}

impl Endpoint {
    /// The endpoint of resource `suffix`.
    pub fn new(plugin: Arc<Plugin>, suffix: &str) -> Self {
        Endpoint {
            plugin,
            suffix: suffix.to_string(),
        }
    }
}

/// The options every endpoint registers with: no PreStartContainer, no preferred allocation.
pub fn options() -> DevicePluginOptions {
    DevicePluginOptions {
        pre_start_required: false,
        get_preferred_allocation_available: false,
    }
}

type DeviceStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for Endpoint {
    async fn get_device_plugin_options(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(options()))
    }

    type ListAndWatchStream = DeviceStream;

    async fn list_and_watch(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let rx = self
            .plugin
            .watches
            .get(&self.suffix)
            .ok_or_else(|| Status::not_found("no such resource"))?
            .subscribe();
        // The current list at once, then every change.
        let stream = tokio_stream::wrappers::WatchStream::new(rx)
            .map(|devices| Ok(ListAndWatchResponse { devices }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        req: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        // Not advertised; answered simply: the must-include devices, then the first available.
        let container_responses = req
            .into_inner()
            .container_requests
            .into_iter()
            .map(|c| {
                let size = usize::try_from(c.allocation_size).unwrap_or(0);
                let mut ids: BTreeSet<String> = BTreeSet::new();
                let mut picked = Vec::new();
                for id in c
                    .must_include_device_ids
                    .into_iter()
                    .chain(c.available_device_ids)
                {
                    if picked.len() >= size.min(MAX_REQUEST_IDS) {
                        break;
                    }
                    if ids.insert(id.clone()) {
                        picked.push(id);
                    }
                }
                ContainerPreferredAllocationResponse { device_ids: picked }
            })
            .take(MAX_REQUEST_IDS)
            .collect();
        Ok(Response::new(PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        req: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        self.plugin
            .allocate(&self.suffix, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn pre_start_container(
        &self,
        _: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        Ok(Response::new(PreStartContainerResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrate::k8s::proto::v1beta1::ContainerAllocateRequest;
    use crate::manage::manager::InstanceInfo;

    /// A daemon in memory: parents with a per-type capacity.
    #[derive(Default)]
    struct Fake {
        state: Mutex<FakeState>,
    }

    #[derive(Default)]
    struct FakeState {
        /// parent, type name, version, deprecated, capacity
        types: Vec<(&'static str, &'static str, u32, bool, u32)>,
        /// uuid, parent, type dir
        instances: Vec<(String, String, String)>,
        /// Creations that succeed before every later one is refused.
        creates_left: Option<usize>,
        down: bool,
    }

    fn dir(name: &str, version: u32) -> String {
        format!("vgpu_emu-{}-v{version}", name.to_ascii_lowercase())
    }

    impl Fake {
        fn new(types: Vec<(&'static str, &'static str, u32, bool, u32)>) -> Arc<Fake> {
            Arc::new(Fake {
                state: Mutex::new(FakeState {
                    types,
                    ..Default::default()
                }),
            })
        }
        fn st(&self) -> MutexGuard<'_, FakeState> {
            self.state.lock().unwrap()
        }
        fn count(&self) -> usize {
            self.st().instances.len()
        }
        fn down_err() -> BackendError {
            BackendError {
                unreachable: true,
                message: "down".into(),
            }
        }
    }

    impl Backend for Fake {
        fn offers(&self) -> Result<Vec<Offer>, BackendError> {
            let st = self.st();
            if st.down {
                return Err(Fake::down_err());
            }
            Ok(st
                .types
                .iter()
                .map(|&(p, n, v, deprecated, cap)| {
                    let used = st
                        .instances
                        .iter()
                        .filter(|i| i.1 == p && i.2 == dir(n, v))
                        .count() as u32;
                    Offer {
                        parent: p.into(),
                        type_dir: dir(n, v),
                        name: n.into(),
                        version: v,
                        deprecated,
                        servable: true,
                        available: cap.saturating_sub(used),
                    }
                })
                .collect())
        }
        fn instances(&self) -> Result<Vec<InstanceInfo>, BackendError> {
            let st = self.st();
            if st.down {
                return Err(Fake::down_err());
            }
            Ok(st
                .instances
                .iter()
                .map(|(u, p, d)| InstanceInfo {
                    uuid: u.clone(),
                    parent: p.clone(),
                    mdev_type: d.clone(),
                    type_key: String::new(),
                    socket: format!("/run/{u}.sock"),
                    frame_rate_limiter: true,
                    client_connected: false,
                    viewers: Vec::new(),
                })
                .collect())
        }
        fn create(
            &self,
            parent: &str,
            type_dir: &str,
            uuid: &Uuid,
        ) -> Result<String, BackendError> {
            let offers = self.offers()?;
            let mut st = self.st();
            let refuse = |m: &str| BackendError {
                unreachable: false,
                message: m.into(),
            };
            if let Some(left) = &mut st.creates_left {
                if *left == 0 {
                    return Err(refuse("refused"));
                }
                *left -= 1;
            }
            let o = offers
                .iter()
                .find(|o| o.parent == parent && o.type_dir == type_dir)
                .ok_or_else(|| refuse("no type"))?;
            if o.available == 0 {
                return Err(refuse("no room"));
            }
            st.instances
                .push((uuid.to_string(), parent.into(), type_dir.into()));
            Ok(format!("/run/{uuid}.sock"))
        }
        fn remove(&self, uuid: &Uuid) -> Result<(), BackendError> {
            let mut st = self.st();
            if st.down {
                return Err(Fake::down_err());
            }
            st.instances.retain(|i| i.0 != uuid.to_string());
            Ok(())
        }
    }

    fn sel(s: &str) -> TypeSel {
        s.parse().unwrap()
    }

    fn offer(p: &str, n: &str, v: u32, deprecated: bool) -> Offer {
        Offer {
            parent: p.into(),
            type_dir: dir(n, v),
            name: n.into(),
            version: v,
            deprecated,
            servable: true,
            available: 1,
        }
    }

    fn suffixes(rs: &[Resource]) -> Vec<String> {
        rs.iter().map(|r| r.suffix.clone()).collect()
    }

    #[test]
    fn resource_names() {
        let offers = [
            offer("p0", "A", 1, false),
            offer("p0", "A", 2, false),
            offer("p0", "A", 3, true),
            offer("p1", "A", 1, false),
            offer("p0", "B", 1, true),
            Offer {
                servable: false,
                ..offer("p0", "C", 1, false)
            },
            offer("p0", "-bad", 1, false),
        ];
        let (rs, warnings) = resources(&offers, &[]).unwrap();
        // Every version, and the bare name for the newest non-deprecated version (none for
        // B, whose only version is deprecated; nothing for the unserved C).
        assert_eq!(suffixes(&rs), ["A.v1", "A.v2", "A.v3", "A", "B.v1"]);
        let bare = rs.iter().find(|r| r.suffix == "A").unwrap();
        assert_eq!(
            (bare.version, bare.resource_name()),
            (2, "vgpu-emu.io/A".into())
        );
        assert_eq!(warnings.len(), 2, "{warnings:?}"); // -bad.v1 and -bad
        let (rs, _) = resources(&offers, &[sel("A@1"), sel("A"), sel("A@1")]).unwrap();
        assert_eq!(suffixes(&rs), ["A.v1", "A"]);
        assert!(resources(&offers, &[sel("B")]).is_err());
        assert!(resources(&offers, &[sel("A@9")]).is_err());
        assert!(resources(&offers, &[sel("C@1")]).is_err());
        assert!("A@x".parse::<TypeSel>().is_err());
        assert!("@1".parse::<TypeSel>().is_err());
        // A versioned name that another type's bare name takes is left out.
        let (rs, warnings) = resources(
            &[offer("p", "X", 1, false), offer("p", "X.v1", 1, false)],
            &[],
        )
        .unwrap();
        assert_eq!(suffixes(&rs), ["X.v1", "X", "X.v1.v1"]);
        assert_eq!(warnings.len(), 1);
    }

    #[test]
    fn device_ids_and_env_keys() {
        let r = Resource {
            suffix: "M60-2Q.v1".into(),
            name: "M60-2Q".into(),
            version: 1,
        };
        assert_eq!(r.device_id(3), "M60-2Q.v1-3");
        assert_eq!(r.device_number("M60-2Q.v1-3"), Some(3));
        assert_eq!(r.device_number("M60-2Q.v1-0"), Some(0));
        for bad in [
            "M60-2Q.v1-03",
            "M60-2Q.v1-",
            "M60-2Q.v1--1",
            "M60-2Q-3",
            "x",
        ] {
            assert_eq!(r.device_number(bad), None, "{bad}");
        }
        assert_eq!(r.env_key(), "M60_2Q_V1");
        assert_eq!(r.type_key(), "M60-2Q@1");
    }

    #[test]
    fn device_lists() {
        let r = Resource {
            suffix: "A".into(),
            name: "A".into(),
            version: 1,
        };
        let a = |dev: &str, uuid: &str| Allocation {
            resource: "A".into(),
            device: dev.into(),
            uuid: uuid.into(),
            parent: "p".into(),
            type_key: "A@1".into(),
            socket: String::new(),
            since_ms: 0,
        };
        let (a1, a3) = (a("A-1", "u1"), a("A-3", "u3"));
        let live: HashSet<String> = ["u1".to_string()].into();
        let list = device_list(&r, &[&a1, &a3], &live, 3);
        let got: Vec<(&str, &str)> = list
            .iter()
            .map(|d| (d.id.as_str(), d.health.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("A-0", "Healthy"),
                ("A-1", "Healthy"),
                ("A-2", "Healthy"),
                ("A-3", "Unhealthy"),
                ("A-4", "Healthy"),
            ]
        );
        assert_eq!(device_list(&r, &[], &live, 1 << 30).len(), MAX_DEVICES);
    }

    struct Rig {
        fake: Arc<Fake>,
        plugin: Arc<Plugin>,
        _dir: tempfile::TempDir,
        state: PathBuf,
    }

    fn rig(types: Vec<(&'static str, &'static str, u32, bool, u32)>, grace: Duration) -> Rig {
        let fake = Fake::new(types);
        let offers = fake.offers().unwrap();
        let (rs, _) = resources(&offers, &[]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let state = state_file(dir.path());
        let settings = PluginSettings {
            resources: rs,
            state_file: state.clone(),
            grace,
        };
        let plugin = Plugin::new(fake.clone(), settings, Vec::new());
        Rig {
            fake,
            plugin,
            _dir: dir,
            state,
        }
    }

    fn req(containers: &[&[&str]]) -> AllocateRequest {
        AllocateRequest {
            container_requests: containers
                .iter()
                .map(|ids| ContainerAllocateRequest {
                    devices_ids: ids.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn ids(devices: &[Device]) -> Vec<String> {
        devices
            .iter()
            .map(|d| format!("{}:{}", d.id, d.health))
            .collect()
    }

    #[test]
    fn allocate_and_watch() {
        rt().block_on(async {
            let rig = rig(
                vec![("p0", "A", 1, false, 2), ("p1", "A", 1, false, 1)],
                Duration::ZERO,
            );
            let p = &rig.plugin;
            let ep = Endpoint::new(p.clone(), "A");
            let mut stream = ep
                .list_and_watch(Request::new(Empty {}))
                .await
                .unwrap()
                .into_inner();
            p.refresh().await;
            let first = stream.next().await.unwrap().unwrap();
            assert_eq!(first.devices.len(), 3, "{:?}", first.devices);

            let resp = ep
                .allocate(Request::new(req(&[&["A-2", "A-0"], &["A-1"]])))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(rig.fake.count(), 3);
            let c0 = &resp.container_responses[0];
            assert_eq!(c0.mounts.len(), 2);
            assert_eq!(c0.mounts[0].container_path, "/var/run/vgpu-emu/A/0.sock");
            assert_eq!(c0.mounts[1].container_path, "/var/run/vgpu-emu/A/1.sock");
            let allocs = p.allocations();
            let a2 = allocs.iter().find(|a| a.device == "A-2").unwrap();
            assert_eq!(c0.mounts[0].host_path, a2.socket);
            assert_eq!(
                c0.envs["VGPU_EMU_SOCKET"],
                "/var/run/vgpu-emu/A/0.sock,/var/run/vgpu-emu/A/1.sock"
            );
            assert_eq!(c0.envs["VGPU_EMU_A_SOCKET"], c0.envs["VGPU_EMU_SOCKET"]);
            assert!(c0.envs["VGPU_EMU_UUID"].starts_with(&a2.uuid));
            assert_eq!(c0.envs["VGPU_EMU_TYPE"], "A@1,A@1");
            assert_eq!(c0.annotations["vgpu-emu.io/A-2"], a2.uuid);
            // Best fit: p1 (one free) filled first, then p0.
            assert_eq!(a2.parent, "p1");
            // The state file lists them.
            assert_eq!(load_state(&rig.state).unwrap(), allocs);

            // The devices: all three allocated, healthy; no free one (the same list as
            // before, so nothing is sent).
            assert_eq!(
                ids(&p.devices("A")),
                ["A-0:Healthy", "A-1:Healthy", "A-2:Healthy"]
            );

            // Asked again: the same instance.
            let again = ep
                .allocate(Request::new(req(&[&["A-2"]])))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(again.container_responses[0].envs["VGPU_EMU_UUID"], a2.uuid);
            assert_eq!(rig.fake.count(), 3);

            // The instance removed behind the plugin's back: Unhealthy, and its room is a
            // new free device.
            rig.fake.st().instances.retain(|i| i.0 != a2.uuid);
            p.refresh().await;
            let next = stream.next().await.unwrap().unwrap();
            assert_eq!(
                ids(&next.devices),
                ["A-0:Healthy", "A-1:Healthy", "A-2:Unhealthy", "A-3:Healthy"]
            );
            // Allocated again, it gets a new instance.
            let again = p.allocate("A", req(&[&["A-2"]])).await.unwrap();
            let uuid = &again.container_responses[0].envs["VGPU_EMU_UUID"];
            assert_ne!(uuid, &a2.uuid);
            assert_eq!(rig.fake.count(), 3);
            assert_eq!(p.allocations().len(), 3);
            // The versioned resource shares the capacity: nothing free there.
            assert!(p.devices("A.v1").is_empty());
        });
    }

    #[test]
    fn bad_requests_leak_nothing() {
        rt().block_on(async {
            let rig = rig(vec![("p0", "A", 1, false, 2)], Duration::ZERO);
            let p = &rig.plugin;
            p.refresh().await;
            let code = |r: Result<AllocateResponse, Status>| r.unwrap_err().code();
            use tonic::Code;
            assert_eq!(code(p.allocate("A", req(&[])).await), Code::InvalidArgument);
            assert_eq!(
                code(p.allocate("A", req(&[&[]])).await),
                Code::InvalidArgument
            );
            assert_eq!(
                code(p.allocate("A", req(&[&["A-0"], &["A-0"]])).await),
                Code::InvalidArgument
            );
            assert_eq!(
                code(p.allocate("A", req(&[&["A-7"]])).await),
                Code::InvalidArgument
            );
            assert_eq!(
                code(p.allocate("A", req(&[&["B-0"]])).await),
                Code::InvalidArgument
            );
            assert_eq!(
                code(p.allocate("A", req(&[&["A-0", "A-1", "A-2"]])).await),
                Code::ResourceExhausted
            );
            let many: Vec<String> = (0..=MAX_REQUEST_IDS).map(|n| format!("A-{n}")).collect();
            let many: Vec<&str> = many.iter().map(String::as_str).collect();
            assert_eq!(
                code(p.allocate("A", req(&[&many])).await),
                Code::InvalidArgument
            );
            assert_eq!(rig.fake.count(), 0);
            // The second creation refused (capacity taken meanwhile): the first is undone.
            rig.fake.st().creates_left = Some(1);
            assert_eq!(
                code(p.allocate("A", req(&[&["A-0", "A-1"]])).await),
                Code::ResourceExhausted
            );
            assert_eq!(rig.fake.count(), 0);
            assert!(p.allocations().is_empty());
            // The daemon down: UNAVAILABLE, and the devices drop to none.
            rig.fake.st().creates_left = None;
            rig.fake.st().down = true;
            p.refresh().await;
            assert!(p.devices("A").is_empty());
            assert_eq!(
                code(p.allocate("A", req(&[&["A-0"]])).await),
                Code::ResourceExhausted
            );
            assert_eq!(rig.fake.count(), 0);
        });
    }

    #[test]
    fn reconcile_removes_what_no_container_holds() {
        rt().block_on(async {
            let rig = rig(vec![("p0", "A", 1, false, 4)], Duration::from_secs(3600));
            let p = &rig.plugin;
            p.refresh().await;
            p.allocate("A", req(&[&["A-0"], &["A-1"]])).await.unwrap();
            assert_eq!(rig.fake.count(), 2);
            // Within the grace period nothing goes.
            assert_eq!(p.reconcile(&HashSet::new()).await, 0);
            assert_eq!(rig.fake.count(), 2);
            // A restart with the state file and no grace: A-1 is held, A-0 is not.
            let allocations = load_state(&rig.state).unwrap();
            let settings = PluginSettings {
                grace: Duration::ZERO,
                ..p.settings.clone()
            };
            let p2 = Plugin::new(rig.fake.clone(), settings, allocations);
            p2.refresh().await;
            let held: HashSet<(String, String)> =
                [("vgpu-emu.io/A".to_string(), "A-1".to_string())].into();
            assert_eq!(p2.reconcile(&held).await, 1);
            assert_eq!(rig.fake.count(), 1);
            let left = p2.allocations();
            assert_eq!(left.len(), 1);
            assert_eq!(left[0].device, "A-1");
            assert_eq!(load_state(&rig.state).unwrap(), left);
            assert_eq!(ids(&p2.devices("A"))[..2], ["A-0:Healthy", "A-1:Healthy"]);
            // An instance already gone is forgotten all the same; the daemon down: kept.
            rig.fake.st().down = true;
            assert_eq!(p2.reconcile(&HashSet::new()).await, 0);
            assert_eq!(p2.allocations().len(), 1);
            rig.fake.st().down = false;
            rig.fake.st().instances.clear();
            assert_eq!(p2.reconcile(&HashSet::new()).await, 1);
            assert!(p2.allocations().is_empty());
        });
    }

    #[test]
    fn state_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = state_file(&dir.path().join("sub"));
        assert_eq!(load_state(&f).unwrap(), []);
        let a = Allocation {
            resource: "A".into(),
            device: "A-0".into(),
            uuid: Uuid::nil().to_string(),
            parent: "p".into(),
            type_key: "A@1".into(),
            socket: "/s".into(),
            since_ms: 5,
        };
        save_state(&f, std::slice::from_ref(&a)).unwrap();
        assert_eq!(load_state(&f).unwrap(), [a]);
        std::fs::write(&f, "{}").unwrap();
        assert!(load_state(&f).is_err());
        std::fs::write(&f, r#"{"version":2,"allocations":[]}"#).unwrap();
        assert!(load_state(&f).is_err());
    }
}

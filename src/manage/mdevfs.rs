//! The mdev-shaped tree a daemon mounts (FUSE) at `ROOT/sys`, with the kernel's sysfs layout and
//! semantics, so `mdevctl` (with `MDEVCTL_ENV_ROOT=ROOT`) and other vGPU tools drive it unchanged:
//!
//! ```text
//! class/mdev_bus/<parent>                      -> ../../devices/<parent>
//! bus/mdev/devices/<uuid>                      -> ../../../devices/<parent>/<uuid>
//! devices/<parent>/mdev_supported_types/<type>/
//!     name  description  device_api  available_instances   (read)
//!     unavailable_reason       (read; why available_instances is 0, empty otherwise)
//!     create                                               (write a UUID)
//!     devices/<uuid>                           -> ../../../<uuid>
//! devices/<parent>/<uuid>/
//!     mdev_type                                -> ../mdev_supported_types/<type>
//!     remove                                   (write 1)
//!     vfio-user.sock                           -> the instance's socket
//!     frame_rate_limiter                       (read/write 0 or 1; not guest ABI)
//! ```
//!
//! Modes and ownership are sysfs's (see `MdevFs::attr`) and the kernel enforces them
//! (`default_permissions`): every user may read the tree, only the daemon's user and root may
//! create, remove or change an instance.
//!
//! Every node is computed from the manager's live state on each request and files are opened
//! for direct I/O, so a read always reflects the current state. The kernel may cache the entries
//! and attributes of nodes that exist for the daemon's whole life (parents, type directories and
//! their files: their contents are still read live); those of instances are never cached
//! (TTL 0). A write to `create` returns only once the instance listens, or fails with the
//! kernel's errno: EINVAL bad UUID, EEXIST taken, ENOSPC no capacity (as the kernel's
//! VRAM-accounting mbochs parent answers).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};
use uuid::Uuid;

use crate::manage::manager::{ManageError, Manager, DEVICE_API};

/// The manager as the filesystem and the daemon's control thread share it.
pub type SharedManager = Arc<Mutex<Manager>>;

fn lock(m: &SharedManager) -> MutexGuard<'_, Manager> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a path names.
#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir(Vec<(String, FileType)>),
    /// A regular file: its content (None: write-only), and whether it is writable.
    File(Option<String>, bool),
    Link(String),
}

/// The filesystem.
#[derive(Debug)]
pub struct MdevFs {
    manager: SharedManager,
    inodes: Arc<Mutex<Inodes>>,
    started: SystemTime,
    /// Owner (uid, gid) of every node: the daemon's own, root when it runs as root.
    owner: (u32, u32),
}

/// Inode numbers of paths. The kernel holds an inode from a lookup until it forgets it; an
/// entry it holds no reference to (given out by readdir, or forgotten) is dropped when the
/// table outgrows what is referenced, so instances created and removed for the daemon's whole
/// life do not grow it. Numbers are never reused.
#[derive(Debug)]
struct Inodes {
    by_path: HashMap<String, u64>,
    /// Inode -> (path, lookups the kernel holds).
    nodes: HashMap<u64, (String, u64)>,
    next: u64,
    /// Table size at which entries without references are dropped next.
    prune_at: usize,
}

/// The root's inode.
const ROOT_INO: u64 = 1;
/// The fewest entries the table keeps before pruning.
const PRUNE_MIN: usize = 1024;

impl Default for Inodes {
    fn default() -> Self {
        let mut inodes = Inodes {
            by_path: HashMap::new(),
            nodes: HashMap::new(),
            next: ROOT_INO,
            prune_at: PRUNE_MIN,
        };
        inodes.intern("");
        inodes
    }
}

impl Inodes {
    /// The inode of `path` (the root, "", is 1).
    fn intern(&mut self, path: &str) -> u64 {
        if let Some(&ino) = self.by_path.get(path) {
            return ino;
        }
        if self.nodes.len() >= self.prune_at {
            self.prune();
        }
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(ino, (path.to_string(), 0));
        self.by_path.insert(path.to_string(), ino);
        ino
    }

    /// The inode of `path`, for a lookup reply: the kernel holds one more reference.
    fn looked_up(&mut self, path: &str) -> u64 {
        let ino = self.intern(path);
        if let Some((_, n)) = self.nodes.get_mut(&ino) {
            *n += 1;
        }
        ino
    }

    /// The kernel dropped `n` references to `ino`.
    fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        if let Some((path, held)) = self.nodes.get_mut(&ino) {
            *held = held.saturating_sub(n);
            if *held == 0 {
                let path = std::mem::take(path);
                self.nodes.remove(&ino);
                self.by_path.remove(&path);
            }
        }
    }

    /// Drops the entries the kernel holds no reference to.
    fn prune(&mut self) {
        self.nodes
            .retain(|&ino, (_, held)| ino == ROOT_INO || *held > 0);
        let nodes = &self.nodes;
        self.by_path.retain(|_, ino| nodes.contains_key(ino));
        self.prune_at = (self.nodes.len() * 2).max(PRUNE_MIN);
    }

    fn path(&self, ino: u64) -> Option<String> {
        self.nodes.get(&ino).map(|(p, _)| p.clone())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.nodes.len()
    }
}

fn dir(names: impl IntoIterator<Item = (String, FileType)>) -> Node {
    Node::Dir(names.into_iter().collect())
}

fn names<'a>(names: impl IntoIterator<Item = &'a str>, kind: FileType) -> Vec<(String, FileType)> {
    names.into_iter().map(|n| (n.to_string(), kind)).collect()
}

/// Resolves `path` (relative to the mount, `/`-separated, "" for the root) against the state,
/// with every directory's entries.
fn resolve(m: &Manager, path: &str) -> Option<Node> {
    resolve_node(m, path, true)
}

/// As [`resolve`]; with `list` false, a type list (`mdev_supported_types`) comes back without
/// its entries: the kernel walks it on every path lookup beneath it, and only readdir needs them.
fn resolve_node(m: &Manager, path: &str, list: bool) -> Option<Node> {
    let parts: Vec<&str> = if path.is_empty() {
        Vec::new()
    } else {
        path.split('/').collect()
    };
    let parent_names = || m.parents().iter().map(|p| p.name.clone());
    let is_parent = |p: &str| m.parents().iter().any(|x| x.name == p);
    let instance_on = |p: &str, u: &str| -> Option<Uuid> {
        let u = Uuid::parse_str(u).ok()?;
        (m.placement(&u)?.0 == p).then_some(u)
    };
    use FileType::{Directory, RegularFile, Symlink};
    Some(match parts.as_slice() {
        [] => dir(names(["class", "bus", "devices"], Directory)),
        ["class"] => dir(names(["mdev_bus"], Directory)),
        ["class", "mdev_bus"] => dir(parent_names().map(|n| (n, Symlink))),
        ["class", "mdev_bus", p] if is_parent(p) => Node::Link(format!("../../devices/{p}")),
        ["bus"] => dir(names(["mdev"], Directory)),
        ["bus", "mdev"] => dir(names(["devices"], Directory)),
        ["bus", "mdev", "devices"] => dir(m.uuids(None).iter().map(|u| (u.to_string(), Symlink))),
        ["bus", "mdev", "devices", u] => {
            let uuid = Uuid::parse_str(u).ok()?;
            let (p, _) = m.placement(&uuid)?;
            Node::Link(format!("../../../devices/{p}/{uuid}"))
        }
        ["devices"] => dir(parent_names().map(|n| (n, Directory))),
        ["devices", p] if is_parent(p) => {
            let mut entries = names(["mdev_supported_types"], Directory);
            entries.extend(m.uuids(Some(p)).iter().map(|u| (u.to_string(), Directory)));
            dir(entries)
        }
        ["devices", p, "mdev_supported_types"] if is_parent(p) => {
            if list {
                dir(m.types_of(p).map(|(d, _)| (d.to_string(), Directory)))
            } else {
                // Thousands of entries: listed only for readdir, not on every path walk.
                Node::Dir(Vec::new())
            }
        }
        ["devices", p, "mdev_supported_types", t, rest @ ..] => {
            let ty = m.type_by_dir(p, t)?;
            match rest {
                [] => {
                    let mut e = names(
                        [
                            "name",
                            "description",
                            "device_api",
                            "available_instances",
                            "unavailable_reason",
                            "create",
                        ],
                        RegularFile,
                    );
                    e.push(("devices".into(), Directory));
                    dir(e)
                }
                ["name"] => Node::File(
                    Some(if ty.deprecated {
                        format!("{} (deprecated)\n", ty.key())
                    } else {
                        format!("{}\n", ty.key())
                    }),
                    false,
                ),
                ["description"] => {
                    Node::File(Some(format!("{}\n", ty.nvidia_description())), false)
                }
                ["device_api"] => Node::File(Some(format!("{DEVICE_API}\n")), false),
                ["available_instances"] => {
                    Node::File(Some(format!("{}\n", m.available(p, ty))), false)
                }
                ["unavailable_reason"] => Node::File(
                    Some(match m.availability(p, ty) {
                        Ok(_) => String::new(),
                        Err(reason) => format!("{reason}\n"),
                    }),
                    false,
                ),
                ["create"] => Node::File(None, true),
                ["devices"] => dir(m
                    .uuids(Some(p))
                    .into_iter()
                    .filter(|u| m.placement(u).is_some_and(|(_, d)| d == *t))
                    .map(|u| (u.to_string(), Symlink))),
                ["devices", u] => {
                    let uuid = instance_on(p, u)?;
                    (m.placement(&uuid)?.1 == *t).then(|| Node::Link(format!("../../../{uuid}")))?
                }
                _ => return None,
            }
        }
        ["devices", p, u, rest @ ..] => {
            let uuid = instance_on(p, u)?;
            match rest {
                [] => {
                    let mut e = names(["mdev_type", "vfio-user.sock"], Symlink);
                    e.extend(names(["remove"], RegularFile));
                    e.extend(names(Manager::ATTRS, RegularFile));
                    dir(e)
                }
                ["mdev_type"] => {
                    Node::Link(format!("../mdev_supported_types/{}", m.placement(&uuid)?.1))
                }
                ["vfio-user.sock"] => Node::Link(m.socket_path(&uuid).display().to_string()),
                ["remove"] => Node::File(None, true),
                [attr] if Manager::ATTRS.contains(attr) => {
                    Node::File(Some(format!("{}\n", m.attr(&uuid, attr)?)), true)
                }
                _ => return None,
            }
        }
        _ => return None,
    })
}

const TTL: Duration = Duration::ZERO;

/// How long the kernel may keep an entry and its attributes of a node that exists for the
/// daemon's whole life: parents, type directories and their files never change (their
/// *contents* are still read live, with direct I/O). Without it every path walk of `mdevctl
/// types` asks again for each component, about a hundred requests per type.
const STATIC_TTL: Duration = Duration::from_secs(3600);

/// The TTL of `path`'s entry and attributes: nodes of instances (a UUID in the path) come and go
/// and are never cached; all the others are fixed when the daemon starts.
fn ttl(path: &str) -> Duration {
    if path.split('/').any(|c| Uuid::parse_str(c).is_ok()) {
        TTL
    } else {
        STATIC_TTL
    }
}

fn errno(e: &ManageError) -> Errno {
    Errno::from_i32(e.errno())
}

impl MdevFs {
    /// A filesystem over `manager`.
    pub fn new(manager: SharedManager) -> Self {
        let inodes = Inodes::default();
        // SAFETY: geteuid and getegid have no preconditions and cannot fail.
        let owner = unsafe { (libc::geteuid(), libc::getegid()) };
        MdevFs {
            manager,
            inodes: Arc::new(Mutex::new(inodes)),
            started: SystemTime::now(),
            owner,
        }
    }

    fn inodes(&self) -> MutexGuard<'_, Inodes> {
        self.inodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What finds the kernel's entries of removed instances; see [`Invalidator`].
    pub fn invalidator(&self) -> Invalidator {
        Invalidator {
            inodes: self.inodes.clone(),
            manager: self.manager.clone(),
        }
    }

    /// Attributes as sysfs has them: directories 0755, read-only files 0444, read-write files
    /// 0644, write-only files (`create`, `remove`) 0200, all owned by the daemon's user. The tree
    /// is mounted with `default_permissions`, so the kernel checks these modes against the
    /// caller: anyone may read, only the owner (and root) may write.
    fn attr(&self, ino: u64, node: &Node) -> FileAttr {
        let (kind, perm, size, nlink) = match node {
            Node::Dir(_) => (FileType::Directory, 0o755, 0, 2),
            Node::File(Some(c), w) => (
                FileType::RegularFile,
                if *w { 0o644 } else { 0o444 },
                4096.max(c.len() as u64),
                1,
            ),
            Node::File(None, _) => (FileType::RegularFile, 0o200, 4096, 1),
            Node::Link(t) => (FileType::Symlink, 0o777, t.len() as u64, 1),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: self.owner.0,
            gid: self.owner.1,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// The path and current node of an inode.
    fn lookup_ino(&self, ino: INodeNo) -> Option<(String, Node)> {
        let path = self.inodes().path(ino.0)?;
        let node = resolve_node(&lock(&self.manager), &path, false)?;
        Some((path, node))
    }

    fn write_node(&self, path: &str, data: &[u8]) -> Result<Written, Errno> {
        let text = std::str::from_utf8(data).map_err(|_| Errno::EINVAL)?;
        let parts: Vec<&str> = path.split('/').collect();
        let mut m = lock(&self.manager);
        match parts.as_slice() {
            ["devices", p, "mdev_supported_types", t, "create"] => {
                m.create(p, t, text).map(|_| Written::Done).map_err(|e| {
                    let why = crate::error::chain(&e);
                    match e {
                        // Ours: the writer did nothing wrong.
                        ManageError::Start(_) => {
                            log::warn!("create {} on {p}/{t} failed: {why}", text.trim())
                        }
                        // The writer's mistake, answered with the kernel's errno.
                        _ => log::info!("create {} on {p}/{t} refused: {why}", text.trim()),
                    }
                    errno(&e)
                })
            }
            ["devices", _, u, "remove"] => {
                if text.trim() != "1" {
                    return Err(Errno::EINVAL);
                }
                let uuid = Uuid::parse_str(u).map_err(|_| Errno::ENOENT)?;
                match m.begin_remove(&uuid) {
                    Ok(None) => Ok(Written::Done),
                    // The client was asked to release the instance: the caller waits for
                    // that on a thread of its own, so the tree goes on serving meanwhile.
                    Ok(Some(release)) => Ok(Written::Release(release)),
                    Err(e) => Err(errno(&e)),
                }
            }
            ["devices", _, u, attr] => {
                let uuid = Uuid::parse_str(u).map_err(|_| Errno::ENOENT)?;
                m.set_attr(&uuid, attr, text)
                    .map(|()| Written::Done)
                    .map_err(|e| errno(&e))
            }
            _ => Err(Errno::EACCES),
        }
    }
}

/// Drops the kernel's cached entries of removed instances. The kernel keeps a looked-up entry
/// (and so our inode for it) until it forgets it, which for an entry nobody touches again happens
/// only under memory pressure: a daemon that creates and removes instances for its whole life
/// would keep growing. So after a removal, and again a second later while any are left (an
/// entry that is busy, such as the `remove` file whose write did the removal, cannot be dropped
/// at once), the daemon asks the kernel to invalidate every entry it holds whose node no longer
/// exists; the kernel then forgets them, and their inodes go.
#[derive(Clone, Debug)]
pub struct Invalidator {
    inodes: Arc<Mutex<Inodes>>,
    manager: SharedManager,
}

impl Invalidator {
    /// (directory inode, name) of every entry the kernel holds whose node is gone, deepest
    /// first.
    pub fn stale_entries(&self) -> Vec<(u64, String)> {
        let held: Vec<String> = {
            let inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
            inodes
                .nodes
                .values()
                .filter(|(_, n)| *n > 0)
                .map(|(p, _)| p.clone())
                .collect()
        };
        let mut stale: Vec<String> = {
            let m = lock(&self.manager);
            held.into_iter()
                .filter(|p| resolve_node(&m, p, false).is_none())
                .collect()
        };
        stale.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
        let inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
        stale
            .iter()
            .filter_map(|p| {
                let (dir, name) = p.rsplit_once('/')?;
                inodes.by_path.get(dir).map(|&d| (d, name.to_string()))
            })
            .collect()
    }
}

/// What a write to the tree did.
enum Written {
    /// It took effect.
    Done,
    /// A removal waits for the instance's client to release it.
    Release(crate::manage::manager::Release),
}

impl Filesystem for MdevFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(parent_path) = self.inodes().path(parent.0) else {
            return reply.error(Errno::ENOENT);
        };
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        let path = if parent_path.is_empty() {
            name.to_string()
        } else {
            format!("{parent_path}/{name}")
        };
        let node = resolve_node(&lock(&self.manager), &path, false);
        match node {
            Some(node) => {
                let ino = self.inodes().looked_up(&path);
                reply.entry(&ttl(&path), &self.attr(ino, &node), Generation(0));
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes().forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.lookup_ino(ino) {
            Some((path, node)) => reply.attr(&ttl(&path), &self.attr(ino.0, &node)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Truncation (the O_TRUNC of a shell redirect) is meaningless for attributes, as in sysfs.
        self.getattr(_req, ino, None, reply);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.lookup_ino(ino) {
            Some((_, Node::Link(target))) => reply.data(target.as_bytes()),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.lookup_ino(ino) {
            // Direct I/O: every read goes to the live state, nothing is cached.
            Some((_, Node::File(..))) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.lookup_ino(ino) {
            Some((_, Node::File(Some(content), _))) => {
                let bytes = content.as_bytes();
                let start = (offset as usize).min(bytes.len());
                let end = start.saturating_add(size as usize).min(bytes.len());
                reply.data(&bytes[start..end]);
            }
            Some((_, Node::File(None, _))) => reply.error(Errno::EACCES),
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some((path, node)) = self.lookup_ino(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if !matches!(node, Node::File(_, true)) {
            return reply.error(Errno::EACCES);
        }
        let len = data.len() as u32;
        match self.write_node(&path, data) {
            Ok(Written::Done) => reply.written(len),
            Ok(Written::Release(release)) => {
                // At most one such thread per instance (a second removal is EBUSY meanwhile),
                // and the writer, like the kernel's, returns only when the removal is decided.
                let manager = self.manager.clone();
                let uuid = release.uuid();
                let spawned = std::thread::Builder::new()
                    .name("mdev-remove".into())
                    .spawn(move || {
                        release.wait();
                        match lock(&manager).finish_remove(release) {
                            Ok(()) => reply.written(len),
                            Err(e) => reply.error(errno(&e)),
                        }
                    });
                if let Err(e) = spawned {
                    // The reply went with the closure: the writer sees EIO.
                    log::warn!("cannot wait for the client of {uuid} to release it: {e}");
                    lock(&self.manager).abort_remove(&uuid);
                }
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        // Writes take effect when written; there is nothing to flush.
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        // sysfs has no extended attributes.
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.size(0);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(path) = self.inodes().path(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let Some(Node::Dir(children)) = resolve(&lock(&self.manager), &path) else {
            return reply.error(Errno::ENOTDIR);
        };
        let dots = [".", ".."].map(|d| (d.to_string(), FileType::Directory));
        let mut inodes = self.inodes();
        // Only the entries this reply carries get an inode: a large directory is read in many
        // replies, each starting at `offset`.
        for (i, (name, kind)) in dots
            .into_iter()
            .chain(children)
            .enumerate()
            .skip(offset as usize)
        {
            let child_ino = if i < 2 {
                ino.0
            } else if path.is_empty() {
                inodes.intern(&name)
            } else {
                inodes.intern(&format!("{path}/{name}"))
            };
            if reply.add(INodeNo(child_ino), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Instances created and removed for the daemon's whole life once grew the inode table
    /// without end (the soak found it: +250 KiB a minute).
    #[test]
    fn the_inode_table_does_not_grow_with_churn() {
        let mut t = Inodes::default();
        let held = t.looked_up("class");
        let mut last = held;
        for i in 0..100_000u32 {
            // An instance appears in a readdir, is looked up, and is forgotten when removed.
            let path = format!("devices/emu0/{i:08}");
            let listed = t.intern(&path);
            assert_eq!(t.looked_up(&path), listed);
            assert!(listed > last, "inode numbers are never reused");
            last = listed;
            t.intern(&format!("{path}/remove"));
            t.forget(listed, 1);
        }
        assert!(t.len() <= 2 * PRUNE_MIN, "{} entries", t.len());
        assert_eq!(t.path(held).as_deref(), Some("class"), "held entries stay");
        assert_eq!(t.path(ROOT_INO).as_deref(), Some(""));
        t.forget(ROOT_INO, 1_000);
        assert_eq!(
            t.path(ROOT_INO).as_deref(),
            Some(""),
            "the root is never forgotten"
        );
    }
    use crate::manage::manager::ParentSpec;
    use vgpu_model::Catalog;

    #[test]
    fn the_tree_follows_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let parents: Vec<ParentSpec> = vec!["emu0=emu".parse().unwrap()];
        let mut m = Manager::new(Catalog::builtin().unwrap(), parents, dir.path()).unwrap();
        let t = "vgpu_emu-emu_64m-v1";
        let avail = |m: &Manager| {
            resolve(
                m,
                &format!("devices/emu0/mdev_supported_types/{t}/available_instances"),
            )
        };
        assert_eq!(
            resolve(&m, "class/mdev_bus/emu0"),
            Some(Node::Link("../../devices/emu0".into()))
        );
        assert_eq!(avail(&m), Some(Node::File(Some("32\n".into()), false)));
        assert_eq!(
            resolve(
                &m,
                &format!("devices/emu0/mdev_supported_types/{t}/device_api")
            ),
            Some(Node::File(Some("vfio-pci\n".into()), false))
        );
        let u = m
            .create("emu0", t, "33333333-3333-3333-3333-333333333333")
            .unwrap();
        assert_eq!(avail(&m), Some(Node::File(Some("31\n".into()), false)));
        assert_eq!(
            resolve(&m, &format!("bus/mdev/devices/{u}")),
            Some(Node::Link(format!("../../../devices/emu0/{u}")))
        );
        assert_eq!(
            resolve(&m, &format!("devices/emu0/{u}/mdev_type")),
            Some(Node::Link(format!("../mdev_supported_types/{t}")))
        );
        assert_eq!(
            resolve(
                &m,
                &format!("devices/emu0/mdev_supported_types/{t}/devices/{u}")
            ),
            Some(Node::Link(format!("../../../{u}")))
        );
        assert!(resolve(
            &m,
            "devices/emu0/mdev_supported_types/vgpu_emu-emu_16m-v1/devices"
        )
        .is_some_and(|n| n == Node::Dir(Vec::new())));
        m.remove(&u).unwrap();
        assert_eq!(
            resolve(&m, &format!("bus/mdev/devices/{u}")),
            None,
            "gone with the instance"
        );
        assert_eq!(resolve(&m, "devices/nope"), None);
        assert_eq!(
            resolve(&m, "devices/emu0/mdev_supported_types/vgpu_emu-nope-v1"),
            None
        );
    }

    /// A path walk through the types directory does not list it (thousands of entries); only
    /// readdir does. Nodes that never change may be cached by the kernel; instance nodes not.
    #[test]
    fn path_walks_skip_the_type_list_and_only_instance_nodes_are_uncached() {
        let dir = tempfile::tempdir().unwrap();
        let parents: Vec<ParentSpec> = vec!["emu0=emu".parse().unwrap()];
        let m = Manager::new(Catalog::builtin().unwrap(), parents, dir.path()).unwrap();
        let types = "devices/emu0/mdev_supported_types";
        assert_eq!(resolve_node(&m, types, false), Some(Node::Dir(Vec::new())));
        let Some(Node::Dir(listed)) = resolve(&m, types) else {
            panic!("not a directory")
        };
        assert_eq!(listed.len(), m.types_of("emu0").count());
        assert!(listed.iter().any(|(n, _)| n == "vgpu_emu-emu_64m-v1"));
        assert_eq!(
            resolve_node(&m, &format!("{types}/vgpu_emu-emu_64m-v1/name"), false),
            Some(Node::File(Some("EMU-64M@1\n".into()), false))
        );
        for fixed in [
            "",
            "class/mdev_bus/emu0",
            &format!("{types}/vgpu_emu-emu_64m-v1/name"),
        ] {
            assert_eq!(ttl(fixed), STATIC_TTL, "{fixed}");
        }
        let u = "33333333-3333-3333-3333-333333333333";
        for live in [
            format!("bus/mdev/devices/{u}"),
            format!("devices/emu0/{u}/remove"),
            format!("{types}/vgpu_emu-emu_64m-v1/devices/{u}"),
        ] {
            assert_eq!(ttl(&live), TTL, "{live}");
        }
    }
}

//! A served vGPU instance: the device model plus what the server and control endpoint report,
//! its runtime knobs, and its runtime thread ([`runtime`]: the frame-rate limiter's tick).

pub mod runtime;

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use std::time::SystemTime;

use serde::Serialize;
use uuid::Uuid;
use vgpu_model::device::AccessCounters;
use vgpu_model::device::HeadImage;
use vgpu_model::frl::HeadFrames;
use vgpu_model::scanout::{Frame, NotDisplaying};
use vgpu_model::{Device, DeviceError, Personality, VgpuType, VramRead};

use crate::sys::clock::MonotonicClock;
use crate::sys::memfd::MemfdVram;
pub use crate::sys::memfd::VramView;
use crate::vfio_user::irq::MsixSink;
use runtime::{Runtime, RuntimeCounters, RuntimeStats, Waker};

/// Protocol-level counters of the vfio-user server, as `status` reports them.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize)]
pub struct ServerCounters {
    /// Clients accepted since start.
    pub connections: u64,
    /// Connections refused because a client was already attached (each was answered EBUSY
    /// when it sent a message in time).
    pub refused_connections: u64,
    /// Messages handled.
    pub messages: u64,
    /// Messages answered with an error.
    pub errors: u64,
    /// Descriptors closed because they could not belong to a valid message.
    #[serde(default)]
    pub stray_fds_closed: u64,
}

/// The live counters behind [`ServerCounters`]: atomics, so the server counts without taking
/// the instance lock.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// See [`ServerCounters::connections`].
    pub connections: AtomicU64,
    /// See [`ServerCounters::refused_connections`].
    pub refused_connections: AtomicU64,
    /// See [`ServerCounters::messages`].
    pub messages: AtomicU64,
    /// See [`ServerCounters::errors`].
    pub errors: AtomicU64,
    /// See [`ServerCounters::stray_fds_closed`].
    pub stray_fds_closed: AtomicU64,
}

impl ServerStats {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A snapshot.
    pub fn get(&self) -> ServerCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ServerCounters {
            connections: g(&self.connections),
            refused_connections: g(&self.refused_connections),
            messages: g(&self.messages),
            errors: g(&self.errors),
            stray_fds_closed: g(&self.stray_fds_closed),
        }
    }
}

/// One instance: device, identity, and live counters.
#[derive(Debug)]
pub struct Instance {
    /// The device model.
    pub device: Device,
    /// Instance UUID (EDID serial).
    pub uuid: Uuid,
    /// The vfio-user socket.
    pub socket: PathBuf,
    /// When the current client connected, if one is.
    pub client_since: Option<SystemTime>,
    /// Protocol counters, shared with the server without the lock.
    pub stats: Arc<ServerStats>,
    /// A read-only view of VRAM, for copying frames without the lock (memfd VRAM only).
    pub vram_view: Option<VramView>,
    /// Runtime knob (not guest ABI): whether the frame-rate limiter holds fenced completions
    /// (and applies to viewers). Kept equal to the device's own knob by
    /// [`Instance::set_frame_rate_limiter`].
    pub frl_enabled: bool,
    /// Wakes the instance's runtime thread, while one runs ([`start_runtime`]).
    pub frl_waker: Option<Arc<Waker>>,
    /// The runtime thread's counters.
    pub frl_stats: Arc<RuntimeStats>,
    /// The MSI-X vectors the device raised under the lock, written out by [`InstanceGuard`]
    /// once it is released (set by the server).
    pub msix: Option<Arc<MsixSink>>,
    /// Where each head can be viewed (empty when no viewer listens), for `status`.
    pub viewers: Vec<crate::display::service::HeadEndpoint>,
}

/// The instance as the server thread and the control thread share it.
pub type SharedInstance = Arc<Mutex<Instance>>;

/// Locks `shared`, recovering from a poisoned lock (a panicked holder cannot leave the model in
/// a state that is unsafe to read: every access is bounds-checked).
pub fn lock(shared: &SharedInstance) -> InstanceGuard<'_> {
    InstanceGuard(Some(shared.lock().unwrap_or_else(|p| p.into_inner())))
}

/// The instance lock held. Dropping it releases the lock first and then writes the eventfds of
/// the MSI-X vectors the device raised meanwhile, so whoever drove the device (a register
/// access, a frame-rate tick, the knob) never writes a client's descriptor under the lock.
#[derive(Debug)]
pub struct InstanceGuard<'a>(Option<MutexGuard<'a, Instance>>);

impl std::ops::Deref for InstanceGuard<'_> {
    type Target = Instance;
    fn deref(&self) -> &Instance {
        self.0.as_deref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for InstanceGuard<'_> {
    fn deref_mut(&mut self) -> &mut Instance {
        self.0.as_deref_mut().expect("held until dropped")
    }
}

impl Drop for InstanceGuard<'_> {
    fn drop(&mut self) {
        let sink = self.0.as_ref().and_then(|g| g.msix.clone());
        drop(self.0.take());
        if let Some(sink) = sink {
            sink.flush();
        }
    }
}

/// Copies head `head`'s image. The instance lock is held only to find where the image lies;
/// the frame itself (up to 33 MB at 4K) is copied after the lock is released (through the VRAM
/// view, or from the resource or guest RAM the head source holds), so the guest's register
/// accesses and virtqueue work never wait for a screenshot.
pub fn capture(shared: &SharedInstance, head: u32) -> Result<Frame, NotDisplaying> {
    let (source, view) = {
        let inst = lock(shared);
        let source = inst.device.head_source(head)?;
        match (&source, &inst.vram_view) {
            (HeadImage::Vram(_), None) => {
                // VRAM of another backing (tests): copied under the lock.
                let vram = inst.device.vram();
                return source
                    .capture(vram.map(|v| v as &dyn VramRead))
                    .ok_or(NotDisplaying::Disabled);
            }
            (_, view) => (source, view.clone()),
        }
    };
    source
        .capture(view.as_ref().map(|v| v as &dyn VramRead))
        .ok_or(NotDisplaying::Disabled)
}

/// Why an instance could not be created.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// VRAM could not be allocated.
    #[error("cannot create {size}-byte VRAM memfd")]
    Vram {
        /// Requested size.
        size: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The device model refused the type.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

impl Instance {
    /// Creates an instance of `ty`, with memfd VRAM for a personality that has VRAM. Returns it
    /// with the VRAM file, which the server passes to clients as the region fd (the instance
    /// itself keeps only the mapping).
    pub fn new(
        ty: &VgpuType,
        uuid: Uuid,
        socket: PathBuf,
    ) -> Result<(Self, Option<File>), InstanceError> {
        if !ty.personality.is_implemented() {
            return Err(DeviceError::UnimplementedPersonality(ty.personality).into());
        }
        if ty.personality != Personality::Bochs {
            // No VRAM: the framebuffer is the budget of host-side resources and scanouts live
            // in guest RAM.
            let mut device = Device::new(ty, uuid.as_bytes(), None)?;
            device.attach_clock(Arc::new(MonotonicClock));
            return Ok((Instance::from_device(device, uuid, socket), None));
        }
        let name = format!("vgpu-emu-vram-{uuid}");
        let (vram, file) =
            MemfdVram::new(&name, ty.framebuffer).map_err(|source| InstanceError::Vram {
                size: ty.framebuffer,
                source,
            })?;
        let view = vram.view();
        let mut device = Device::new(ty, uuid.as_bytes(), Some(Box::new(vram)))?;
        device.attach_clock(Arc::new(MonotonicClock));
        let mut instance = Instance::from_device(device, uuid, socket);
        instance.vram_view = Some(view);
        Ok((instance, Some(file)))
    }

    /// An instance around an existing device (tests and fuzzing; VRAM of any backing; the
    /// device keeps whatever clock it has, none unless the caller attached one).
    pub fn from_device(device: Device, uuid: Uuid, socket: PathBuf) -> Self {
        let frl_enabled = device.frame_rate_limiter();
        Instance {
            device,
            uuid,
            socket,
            client_since: None,
            stats: Arc::default(),
            vram_view: None,
            frl_enabled,
            frl_waker: None,
            frl_stats: Arc::default(),
            msix: None,
            viewers: Vec::new(),
        }
    }

    /// Sets the frame-rate-limiter knob, on the device too (at once, without a reset: it is not
    /// guest ABI; turning it off completes whatever is held). Returns the runtime's waker, to
    /// wake it once the lock is released (the deadline may have changed).
    #[must_use = "wake the runtime after releasing the lock"]
    pub fn set_frame_rate_limiter(&mut self, on: bool) -> Option<Arc<Waker>> {
        self.frl_enabled = on;
        self.device.set_frame_rate_limiter(on);
        self.frl_waker.clone()
    }

    /// The limiter's deadline now, to compare after a device call with [`Instance::waker_if_sooner`].
    pub fn frl_deadline(&self) -> Option<Duration> {
        self.device.frl_deadline()
    }

    /// The runtime's waker when the limiter's deadline is now sooner than `before` (it appeared
    /// or moved earlier): the runtime sleeps until the old one and must look again. Wake it
    /// after releasing the lock.
    pub fn waker_if_sooner(&self, before: Option<Duration>) -> Option<Arc<Waker>> {
        if runtime::sooner(before, self.device.frl_deadline()) {
            self.frl_waker.clone()
        } else {
            None
        }
    }

    /// What `vgpu-emu status` shows.
    pub fn status(&self) -> Status {
        let ty = self.device.vgpu_type();
        let mut heads: Vec<HeadStatus> = match self.device.virtio_gpu() {
            Some(t) => t
                .gpu()
                .heads_status()
                .into_iter()
                .map(|h| HeadStatus {
                    head: h.head,
                    displaying: h.mode.is_some(),
                    mode: match (h.mode, h.not_displaying) {
                        (Some(m), _) => m,
                        (None, Some(why)) => format!("not displaying: {why}"),
                        (None, None) => "not displaying".to_string(),
                    },
                    frames: None,
                    vnc: String::new(),
                    web: String::new(),
                })
                .collect(),
            None => (0..ty.num_heads)
                .map(|head| match self.device.scanout(head) {
                    Ok(s) => HeadStatus {
                        head,
                        displaying: true,
                        mode: s.to_string(),
                        frames: None,
                        vnc: String::new(),
                        web: String::new(),
                    },
                    Err(e) => HeadStatus {
                        head,
                        displaying: false,
                        mode: format!("not displaying: {e}"),
                        frames: None,
                        vnc: String::new(),
                        web: String::new(),
                    },
                })
                .collect(),
        };
        for e in &self.viewers {
            if let Some(h) = heads.iter_mut().find(|h| h.head == e.head) {
                h.vnc.clone_from(&e.vnc);
                h.web.clone_from(&e.web);
            }
        }
        for f in self.device.frl_counters() {
            if let Some(h) = heads.iter_mut().find(|h| h.head == f.head) {
                h.frames = Some(f);
            }
        }
        Status {
            type_key: ty.key(),
            uuid: self.uuid.to_string(),
            socket: self.socket.display().to_string(),
            client_connected: self.client_since.is_some(),
            heads,
            blanked: self.device.blanked(),
            frame_rate_limiter: self.frl_enabled,
            frl: ty.frl,
            frl_runtime: self.frl_stats.get(),
            server: self.stats.get(),
            accesses: self.device.counters(),
        }
    }
}

/// One head's display state.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct HeadStatus {
    /// Head index.
    pub head: u32,
    /// Whether it shows an image.
    pub displaying: bool,
    /// The mode, or why nothing is shown.
    pub mode: String,
    /// The frame-rate limiter's counters of this head (personalities with fences).
    #[serde(default)]
    pub frames: Option<HeadFrames>,
    /// `ADDR:PORT` of the head's raw VNC listener (empty when `--vnc` is off).
    #[serde(default)]
    pub vnc: String,
    /// URL of the head's noVNC page (empty when `--web` is off).
    #[serde(default)]
    pub web: String,
}

/// `vgpu-emu status` output.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Status {
    /// `name@version`.
    #[serde(rename = "type")]
    pub type_key: String,
    /// Instance UUID.
    pub uuid: String,
    /// vfio-user socket.
    pub socket: String,
    /// A client is attached.
    pub client_connected: bool,
    /// Per-head display state.
    pub heads: Vec<HeadStatus>,
    /// The VGA attribute index says the display is blanked.
    pub blanked: bool,
    /// The runtime frame-rate-limiter knob.
    pub frame_rate_limiter: bool,
    /// The type's frame-rate limit (fps, 0 = off).
    pub frl: u32,
    /// The runtime thread of the limiter: wake-ups, ticks.
    #[serde(default)]
    pub frl_runtime: RuntimeCounters,
    /// Protocol counters.
    pub server: ServerCounters,
    /// Device access counters.
    pub accesses: AccessCounters,
}

/// Starts the runtime thread of `shared` (the frame-rate limiter's tick) and hands the instance
/// its waker. Stop it with [`Runtime::stop`] when the instance goes.
pub fn start_runtime(shared: &SharedInstance) -> std::io::Result<Runtime> {
    let (uuid, stats) = {
        let inst = lock(shared);
        (inst.uuid, inst.frl_stats.clone())
    };
    let name = format!("frl-{}", &uuid.simple().to_string()[..8]);
    let rt = Runtime::spawn(&name, shared.clone(), stats)?;
    // (The thread reads the deadline before it first sleeps: nothing held before this point
    // is missed.)
    lock(shared).frl_waker = Some(rt.waker());
    Ok(rt)
}

/// A runtime setting of an instance (not guest ABI), as `vgpu-emu set`, the mdev tree's files
/// and mdevctl's attributes name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Knob {
    /// `frame_rate_limiter=0|1`.
    FrameRateLimiter(bool),
}

/// Names of every runtime setting.
pub const KNOBS: [&str; 1] = ["frame_rate_limiter"];

/// Why a setting was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KnobError {
    /// No such setting.
    #[error("unknown setting `{0}` (settings: frame_rate_limiter)")]
    Unknown(String),
    /// A value the setting does not take.
    #[error("invalid value `{value}` for {key}: {expected}")]
    BadValue {
        /// The setting.
        key: String,
        /// The value given.
        value: String,
        /// What it takes.
        expected: &'static str,
    },
}

impl Knob {
    /// Parses `key` = `value` (surrounding white space ignored, as a sysfs write's newline).
    pub fn parse(key: &str, value: &str) -> Result<Knob, KnobError> {
        match key.trim() {
            "frame_rate_limiter" => match value.trim() {
                "1" => Ok(Knob::FrameRateLimiter(true)),
                "0" => Ok(Knob::FrameRateLimiter(false)),
                other => Err(KnobError::BadValue {
                    key: "frame_rate_limiter".into(),
                    value: other.to_string(),
                    expected: "0 or 1",
                }),
            },
            other => Err(KnobError::Unknown(other.to_string())),
        }
    }

    /// Applies it to `shared` at once (and wakes the runtime, outside the lock).
    pub fn apply(self, shared: &SharedInstance) {
        let waker = match self {
            Knob::FrameRateLimiter(on) => lock(shared).set_frame_rate_limiter(on),
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl std::fmt::Display for Knob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Knob::FrameRateLimiter(on) => write!(f, "frame_rate_limiter={}", u8::from(*on)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(ty: &str) -> SharedInstance {
        let c = vgpu_model::Catalog::builtin().unwrap();
        let ty = c.resolve(ty).unwrap();
        let (inst, _) = Instance::new(ty, Uuid::nil(), "t.sock".into()).unwrap();
        Arc::new(std::sync::Mutex::new(inst))
    }

    #[test]
    fn knobs_parse_and_apply_to_the_device_too() {
        assert_eq!(
            Knob::parse("frame_rate_limiter", "0\n"),
            Ok(Knob::FrameRateLimiter(false))
        );
        assert_eq!(
            Knob::parse("frame_rate_limiter", " 1"),
            Ok(Knob::FrameRateLimiter(true))
        );
        assert_eq!(
            Knob::parse("frame_rate_limiter", "on")
                .unwrap_err()
                .to_string(),
            "invalid value `on` for frame_rate_limiter: 0 or 1"
        );
        assert_eq!(
            Knob::parse("fps", "1").unwrap_err().to_string(),
            "unknown setting `fps` (settings: frame_rate_limiter)"
        );
        for key in KNOBS {
            assert!(Knob::parse(key, "1").is_ok(), "{key}");
        }
        for ty in ["EMU-16M", "M60-0B"] {
            let shared = served(ty);
            let rt = start_runtime(&shared).unwrap();
            Knob::FrameRateLimiter(false).apply(&shared);
            assert!(!lock(&shared).frl_enabled);
            assert!(!lock(&shared).status().frame_rate_limiter);
            Knob::FrameRateLimiter(true).apply(&shared);
            assert!(lock(&shared).frl_enabled);
            // (The device's own knob follows; with the model's limiter stubbed it reads `on`
            // whatever was set, so only the instance's side is asserted here.)
            rt.stop();
        }
    }

    #[test]
    fn an_idle_instance_runtime_never_wakes_and_stops_with_it() {
        let shared = served("M60-2Q");
        let rt = start_runtime(&shared).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let s = lock(&shared).status();
        assert_eq!(s.frl_runtime.wakeups, 0);
        assert_eq!(s.frl_runtime.ticks, 0);
        assert_eq!(s.heads.len(), 4);
        rt.stop();
        assert_eq!(Arc::strong_count(&shared), 1, "the runtime let go of it");
    }
}

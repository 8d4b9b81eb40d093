//! A served vGPU instance: the device model plus what the server and control endpoint report.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::Serialize;
use uuid::Uuid;
use vgpu_model::device::AccessCounters;
use vgpu_model::device::HeadImage;
use vgpu_model::scanout::{Frame, NotDisplaying};
use vgpu_model::{Device, DeviceError, Personality, VgpuType, VramRead};

use crate::sys::memfd::{MemfdVram, VramView};

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
    /// Runtime knob (not guest ABI): whether the frame-rate limiter applies to viewers.
    pub frl_enabled: bool,
}

/// The instance as the server thread and the control thread share it.
pub type SharedInstance = Arc<Mutex<Instance>>;

/// Locks `shared`, recovering from a poisoned lock (a panicked holder cannot leave the model in
/// a state that is unsafe to read: every access is bounds-checked).
pub fn lock(shared: &SharedInstance) -> MutexGuard<'_, Instance> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
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
            let device = Device::new(ty, uuid.as_bytes(), None)?;
            return Ok((Instance::from_device(device, uuid, socket), None));
        }
        let name = format!("vgpu-emu-vram-{uuid}");
        let (vram, file) =
            MemfdVram::new(&name, ty.framebuffer).map_err(|source| InstanceError::Vram {
                size: ty.framebuffer,
                source,
            })?;
        let view = vram.view();
        let device = Device::new(ty, uuid.as_bytes(), Some(Box::new(vram)))?;
        let mut instance = Instance::from_device(device, uuid, socket);
        instance.vram_view = Some(view);
        Ok((instance, Some(file)))
    }

    /// An instance around an existing device (tests and fuzzing; VRAM of any backing).
    pub fn from_device(device: Device, uuid: Uuid, socket: PathBuf) -> Self {
        Instance {
            device,
            uuid,
            socket,
            client_since: None,
            stats: Arc::default(),
            vram_view: None,
            frl_enabled: true,
        }
    }

    /// What `vgpu-emu status` shows.
    pub fn status(&self) -> Status {
        let ty = self.device.vgpu_type();
        let heads = match self.device.virtio_gpu() {
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
                })
                .collect(),
            None => (0..ty.num_heads)
                .map(|head| match self.device.scanout(head) {
                    Ok(s) => HeadStatus {
                        head,
                        displaying: true,
                        mode: s.to_string(),
                    },
                    Err(e) => HeadStatus {
                        head,
                        displaying: false,
                        mode: format!("not displaying: {e}"),
                    },
                })
                .collect(),
        };
        Status {
            type_key: ty.key(),
            uuid: self.uuid.to_string(),
            socket: self.socket.display().to_string(),
            client_connected: self.client_since.is_some(),
            heads,
            blanked: self.device.blanked(),
            frame_rate_limiter: self.frl_enabled,
            frl: ty.frl,
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
    /// Protocol counters.
    pub server: ServerCounters,
    /// Device access counters.
    pub accesses: AccessCounters,
}

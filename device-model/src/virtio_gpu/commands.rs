//! The GPU behind the queues: control- and cursor-queue requests decoded into typed commands
//! ([`protocol`](super::protocol)) and executed against the resources
//! ([`resources`](super::resources)), the heads' scanouts and cursors.
//!
//! Every guest error is a `VIRTIO_GPU_RESP_ERR_*` response ([`ErrorCode`]); executing returns
//! `Result<Response, ErrorCode>`, so no guest error path can panic.
//!
//! Choices where the spec is silent (QEMU's `virtio-gpu` and the stock Linux driver decided
//! them; see the tests):
//! - TRANSFER_TO_HOST_2D on a guest blob succeeds and does nothing: Linux sends it for every
//!   dumb buffer, and those are blobs once VIRTIO_GPU_F_RESOURCE_BLOB is offered; the head
//!   reads the blob's guest memory directly.
//! - ATTACH/DETACH_BACKING on a blob: ERR_INVALID_PARAMETER (a blob's memory is fixed at
//!   creation). SET_SCANOUT on a blob and SET_SCANOUT_BLOB on a 2D resource: the same.
//! - A scanout rectangle must be at least 16x16 (as QEMU) and at most the type's
//!   `max_resolution` (the contract the EDID advertises).
//! - Backing entries must lie in guest RAM when attached (ERR_UNSPEC otherwise, as a range the
//!   device cannot map) and cover the resource; a later read that fails reads zeros.
//! - The cursor queue answers nothing (Linux reads no response there) and carries no fences.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use vm_memory::GuestMemory;

use super::protocol::{
    encode_response, pixel_format, Command, CtrlHeader, CursorCmd, DisplayOne, ErrorCode, Rect,
    Response, SetScanoutBlob, BLOB_MEM_GUEST, MAX_SCANOUTS,
};
use super::resources::{Backing, Kind, Resources};
use crate::bus::GuestRam;
use crate::catalog::{Resolution, VgpuType};
use crate::damage::{self, Damage};
use crate::scanout::{Frame, NotDisplaying, PixelFormat};

/// Largest device-readable part of one request the transport gathers (header, payload and
/// backing entries); a longer chain is answered ERR_INVALID_PARAMETER without being read.
pub const MAX_REQUEST: usize = 1 << 20;

/// Cursor images are 64x64 (virtio 1.2 section 5.7.6.10).
pub const CURSOR_SIZE: u32 = 64;

/// Smallest scanout rectangle side accepted.
pub const MIN_SCANOUT: u32 = 16;

/// Flush rectangles a head remembers for its viewers; a viewer further behind gets
/// [`Damage::Full`].
pub const FLUSH_LOG: usize = 64;

/// What one request produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// The response (a `virtio_gpu_ctrl_hdr` first) for the chain's device-writable part.
    pub response: Vec<u8>,
    /// The request carried VIRTIO_GPU_FLAG_FENCE: its fence id.
    pub fence: Option<u64>,
    /// The request's command type (`virtio_gpu_ctrl_hdr.type`; `None`: no header).
    pub ctrl_type: Option<u32>,
    /// A RESOURCE_FLUSH that succeeded: the heads showing the flushed resource (bit n = head
    /// n), whose frame it presents. 0 for every other request.
    pub flushed_heads: u32,
}

impl Completion {
    /// Whether the request was a RESOURCE_FLUSH (the command a blob-scanout guest fences per
    /// frame and waits on).
    pub fn is_flush(&self) -> bool {
        self.ctrl_type == Some(super::protocol::ty::RESOURCE_FLUSH)
    }
}

/// What a head shows, held so a frame can be copied without holding the device.
#[derive(Clone, Debug)]
pub enum HeadSource {
    /// A host-side 2D resource (copy-on-write: a later transfer never waits for a copy).
    Host {
        /// The resource's pixels (empty until the guest first transferred: reads black).
        pixels: Arc<Vec<u8>>,
        /// Bytes per resource row.
        stride: u32,
        /// Visible rectangle inside the resource.
        x: u32,
        /// Visible rectangle inside the resource.
        y: u32,
        /// Visible width.
        width: u32,
        /// Visible height.
        height: u32,
        /// Pixel layout.
        format: PixelFormat,
    },
    /// A guest-memory blob.
    Guest {
        /// Guest RAM.
        mem: Arc<GuestRam>,
        /// The blob's guest ranges.
        backing: Arc<Backing>,
        /// Byte offset of the first visible pixel inside the blob.
        offset: u64,
        /// Bytes from one row to the next.
        stride: u32,
        /// Visible width.
        width: u32,
        /// Visible height.
        height: u32,
        /// Pixel layout.
        format: PixelFormat,
    },
}

impl HeadSource {
    /// The visible width and height.
    pub fn size(&self) -> (u32, u32) {
        match self {
            HeadSource::Host { width, height, .. } | HeadSource::Guest { width, height, .. } => {
                (*width, *height)
            }
        }
    }

    /// Copies the visible image. A part outside the pixels or outside guest RAM reads black.
    pub fn capture(&self) -> Frame {
        let (width, height, format) = match self {
            HeadSource::Host {
                width,
                height,
                format,
                ..
            }
            | HeadSource::Guest {
                width,
                height,
                format,
                ..
            } => (*width, *height, *format),
        };
        let row = width as usize * format.bytes_per_pixel() as usize;
        let mut data = vec![0u8; row * height as usize];
        for (line, dst) in data.chunks_exact_mut(row.max(1)).enumerate() {
            let line = line as u64;
            match self {
                HeadSource::Host {
                    pixels,
                    stride,
                    x,
                    y,
                    ..
                } => {
                    let at = (u64::from(*y) + line) * u64::from(*stride)
                        + u64::from(*x) * u64::from(format.bytes_per_pixel());
                    let src = usize::try_from(at)
                        .ok()
                        .and_then(|at| pixels.get(at..at.checked_add(row)?));
                    if let Some(src) = src {
                        dst.copy_from_slice(src);
                    }
                }
                HeadSource::Guest {
                    mem,
                    backing,
                    offset,
                    stride,
                    ..
                } => {
                    let at = offset.saturating_add(line * u64::from(*stride));
                    backing.read(&**mem, at, dst);
                }
            }
        }
        Frame {
            width,
            height,
            format,
            data,
        }
    }
}

/// A head's cursor (the cursor queue's state).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Image resource (0: hidden).
    pub resource_id: u32,
    /// Hot spot inside the image.
    pub hot_x: u32,
    /// Hot spot inside the image.
    pub hot_y: u32,
    /// Position on the head.
    pub x: u32,
    /// Position on the head.
    pub y: u32,
    /// The 64x64 image copied at UPDATE_CURSOR (`None` when hidden or not copyable: a 2D
    /// resource that is not 64x64, or a blob smaller than 64x64x4 bytes).
    pub image: Option<Frame>,
}

/// A head's scanout as the guest set it.
#[derive(Clone, Debug)]
enum Scanout {
    /// SET_SCANOUT: a rectangle of a 2D resource.
    Image { resource_id: u32, r: Rect },
    /// SET_SCANOUT_BLOB.
    Blob {
        resource_id: u32,
        r: Rect,
        format: PixelFormat,
        stride: u32,
        /// Byte offset of the rectangle's first pixel in the blob.
        offset: u64,
        backing: Arc<Backing>,
    },
}

/// Per-head counters (kept across device resets: they describe the instance's life).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HeadCounters {
    /// RESOURCE_FLUSH of the resource the head showed.
    pub flushes: u64,
    /// Successful SET_SCANOUT / SET_SCANOUT_BLOB naming the head (disables included).
    pub set_scanouts: u64,
}

/// One head, for `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeadStatus {
    /// Head index.
    pub head: u32,
    /// What it shows, e.g. `1280x1024 XRGB8888 resource 3`.
    pub mode: Option<String>,
    /// Why it shows nothing.
    pub not_displaying: Option<NotDisplaying>,
    /// Counters.
    #[serde(flatten)]
    pub counters: HeadCounters,
}

impl fmt::Display for HeadStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "head {}: ", self.head)?;
        match (&self.mode, &self.not_displaying) {
            (Some(m), _) => f.write_str(m)?,
            (None, Some(why)) => write!(f, "{why}")?,
            (None, None) => f.write_str("-")?,
        }
        write!(
            f,
            ", {} flushes, {} set-scanouts",
            self.counters.flushes, self.counters.set_scanouts
        )
    }
}

/// The resource-memory budget, for `status` and invariant checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryStatus {
    /// The type's framebuffer bytes.
    pub budget: u64,
    /// Bytes charged to live resources.
    pub used: u64,
    /// Host bytes of 2D pixels actually allocated (at most `used`).
    pub allocated: u64,
    /// Live resources.
    pub resources: usize,
}

/// The GPU of one instance.
#[derive(Debug)]
pub struct Gpu {
    num_scanouts: u32,
    default_resolution: Resolution,
    max_resolution: Resolution,
    edids: Vec<[u8; crate::edid::EDID_BLOCK]>,
    resources: Resources,
    scanouts: Vec<Option<Scanout>>,
    cursors: Vec<Cursor>,
    counters: Vec<HeadCounters>,
    events: u32,
    last_fence: Option<u64>,
    /// Heads the RESOURCE_FLUSH being executed touched (bit n = head n).
    flushed: u32,
    /// What changed on each head, for viewers (kept across device resets, like the counters).
    damage: Vec<FlushLog>,
}

/// One head's damage since each generation: the guest's flush rectangles, in head coordinates,
/// tagged with the generation that recorded them. Host-side bookkeeping only: the guest never
/// sees it.
#[derive(Clone, Debug)]
struct FlushLog {
    /// The latest generation (starts at 1: a viewer at 0 has seen nothing).
    generation: u64,
    /// The generation of the last change that damaged everything (scanout set, reset).
    full: u64,
    /// The newest generation dropped from `rects` (a viewer before it gets everything).
    dropped: u64,
    /// At most [`FLUSH_LOG`] rectangles, oldest first.
    rects: VecDeque<(u64, damage::Rect)>,
}

impl FlushLog {
    fn new() -> FlushLog {
        FlushLog {
            generation: 1,
            full: 1,
            dropped: 0,
            rects: VecDeque::new(),
        }
    }

    fn full(&mut self) {
        self.generation += 1;
        self.full = self.generation;
        self.rects.clear();
    }

    fn record(&mut self, r: damage::Rect) {
        if r.is_empty() {
            return;
        }
        self.generation += 1;
        // A guest flushing the same (or a growing) rectangle every frame keeps one entry.
        if let Some(last) = self.rects.back_mut() {
            if r.contains(&last.1) {
                *last = (self.generation, r);
                return;
            }
        }
        self.rects.push_back((self.generation, r));
        if self.rects.len() > FLUSH_LOG {
            if let Some((g, _)) = self.rects.pop_front() {
                self.dropped = g;
            }
        }
    }
}

impl Gpu {
    /// A GPU for `ty` (heads, budget, EDIDs) of instance `uuid`.
    pub fn new(ty: &VgpuType, uuid: &[u8; 16]) -> Gpu {
        let heads = ty.num_heads.clamp(1, MAX_SCANOUTS);
        let edids = (0..heads).map(|h| head_edid(ty, uuid, h)).collect();
        Gpu {
            num_scanouts: heads,
            default_resolution: ty.default_resolution,
            max_resolution: ty.max_resolution,
            edids,
            resources: Resources::new(ty.framebuffer),
            scanouts: vec![None; heads as usize],
            cursors: vec![Cursor::default(); heads as usize],
            counters: vec![HeadCounters::default(); heads as usize],
            events: 0,
            last_fence: None,
            flushed: 0,
            damage: vec![FlushLog::new(); heads as usize],
        }
    }

    /// `num_scanouts` of the device configuration.
    pub fn num_scanouts(&self) -> u32 {
        self.num_scanouts
    }

    /// Pending `events_read` bits (VIRTIO_GPU_EVENT_DISPLAY). None are raised yet (heads never
    /// change while the device runs).
    pub fn events_read(&self) -> u32 {
        self.events
    }

    /// The guest wrote `events_clear`.
    pub fn events_clear(&mut self, bits: u32) {
        self.events &= !bits;
    }

    /// Executes one control-queue request.
    pub fn control<M: GuestMemory>(&mut self, mem: &M, request: &[u8]) -> Completion {
        let Some(hdr) = CtrlHeader::parse(request) else {
            return Completion {
                response: encode_response(None, &Err(ErrorCode::Unspec)),
                ..Completion::default()
            };
        };
        self.flushed = 0;
        let result = if request.len() > MAX_REQUEST {
            Err(ErrorCode::InvalidParameter)
        } else {
            match Command::decode(&hdr, request) {
                Ok(cmd) => self.execute(mem, cmd),
                Err(_) => Err(ErrorCode::Unspec),
            }
        };
        let fence = hdr.is_fenced().then_some(hdr.fence_id);
        if fence.is_some() {
            self.last_fence = fence;
        }
        let flushed_heads = if result.is_ok() { self.flushed } else { 0 };
        Completion {
            response: encode_response(Some(&hdr), &result),
            fence,
            ctrl_type: Some(hdr.ty),
            flushed_heads,
        }
    }

    /// Executes one cursor-queue request. The response is empty: Linux reads none on this
    /// queue; a malformed or non-cursor request is dropped.
    pub fn cursor<M: GuestMemory>(&mut self, mem: &M, request: &[u8]) -> Completion {
        if let Some(hdr) = CtrlHeader::parse(request) {
            match Command::decode(&hdr, request) {
                Ok(Command::UpdateCursor(c)) => self.update_cursor(mem, &c),
                Ok(Command::MoveCursor(c)) => {
                    if let Some(cur) = self.cursors.get_mut(c.scanout_id as usize) {
                        (cur.x, cur.y) = (c.x, c.y);
                    }
                }
                _ => {}
            }
        }
        Completion::default()
    }

    /// Device reset: drops every resource, scanout, cursor and pending fence, and frees the
    /// budget. The per-head counters are kept.
    pub fn reset(&mut self) {
        self.resources.clear();
        self.scanouts.iter_mut().for_each(|s| *s = None);
        self.cursors.iter_mut().for_each(|c| *c = Cursor::default());
        self.events = 0;
        self.last_fence = None;
        self.damage.iter_mut().for_each(FlushLog::full);
    }

    /// Head `head`'s EDID.
    pub fn edid(&self, head: u32) -> Option<&[u8]> {
        self.edids.get(head as usize).map(|e| &e[..])
    }

    /// What head `head` shows. A blob scanout needs guest memory `mem`.
    pub fn head(
        &self,
        head: u32,
        mem: Option<&Arc<GuestRam>>,
    ) -> Result<HeadSource, NotDisplaying> {
        let slot = self
            .scanouts
            .get(head as usize)
            .ok_or(NotDisplaying::NoSuchHead(head))?;
        match slot {
            None => Err(NotDisplaying::Disabled),
            Some(Scanout::Image { resource_id, r }) => {
                let Some(Kind::Image(image)) = self.resources.get(*resource_id).map(|r| &r.kind)
                else {
                    // Unref disables the heads showing a resource; not reached.
                    return Err(NotDisplaying::Disabled);
                };
                Ok(HeadSource::Host {
                    pixels: image.pixels.clone().unwrap_or_default(),
                    stride: image.stride(),
                    x: r.x,
                    y: r.y,
                    width: r.width,
                    height: r.height,
                    format: image.format,
                })
            }
            Some(Scanout::Blob {
                r,
                format,
                stride,
                offset,
                backing,
                ..
            }) => Ok(HeadSource::Guest {
                mem: Arc::clone(mem.ok_or(NotDisplaying::NoGuestMemory)?),
                backing: Arc::clone(backing),
                offset: *offset,
                stride: *stride,
                width: r.width,
                height: r.height,
                format: *format,
            }),
        }
    }

    /// Head `head`'s cursor.
    pub fn cursor_state(&self, head: u32) -> Option<&Cursor> {
        self.cursors.get(head as usize)
    }

    /// What changed on head `head` since generation `since` (0: nothing seen yet), and the
    /// generation to pass next time; each viewer keeps its own. The guest's RESOURCE_FLUSH
    /// rectangles of the resource the head shows, clamped to the head's visible rectangle and
    /// in its coordinates; [`Damage::Full`] after a SET_SCANOUT(_BLOB) that changed the head, a
    /// reset, a disabled head, or when the viewer is further behind than [`FLUSH_LOG`]
    /// rectangles. `None`: no such head. Pure bookkeeping: nothing the guest sees.
    pub fn damage_since(&self, head: u32, since: u64) -> Option<(Damage, u64)> {
        let log = self.damage.get(head as usize)?;
        let size = match self.scanouts.get(head as usize)? {
            Some(s) => {
                let r = s.rect();
                Some((r.width, r.height))
            }
            None => None,
        };
        let d = match size {
            Some((w, h))
                if since >= log.full && since >= log.dropped && since <= log.generation =>
            {
                Damage::from_rects(
                    log.rects
                        .iter()
                        .filter(|(g, _)| *g > since)
                        .map(|(_, r)| *r),
                    w,
                    h,
                )
            }
            _ => Damage::Full,
        };
        Some((d, log.generation))
    }

    /// Each head's scanout and counters.
    pub fn heads_status(&self) -> Vec<HeadStatus> {
        (0..self.num_scanouts)
            .map(|head| {
                let (mode, not_displaying) = match self.describe(head) {
                    Ok(m) => (Some(m), None),
                    Err(why) => (None, Some(why)),
                };
                HeadStatus {
                    head,
                    mode,
                    not_displaying,
                    counters: self
                        .counters
                        .get(head as usize)
                        .copied()
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// The resource-memory budget and its use.
    pub fn memory(&self) -> MemoryStatus {
        MemoryStatus {
            budget: self.resources.budget(),
            used: self.resources.used(),
            allocated: self.resources.allocated(),
            resources: self.resources.len(),
        }
    }

    /// Sum of the live resources' charges, recounted (equals `memory().used`; for the fuzz
    /// harness's invariant check).
    #[doc(hidden)]
    pub fn recount_charges(&self) -> u64 {
        self.resources.charged()
    }

    /// The last fence id a request carried since reset.
    pub fn last_fence(&self) -> Option<u64> {
        self.last_fence
    }

    fn describe(&self, head: u32) -> Result<String, NotDisplaying> {
        match self.scanouts.get(head as usize) {
            None => Err(NotDisplaying::NoSuchHead(head)),
            Some(None) => Err(NotDisplaying::Disabled),
            Some(Some(Scanout::Image { resource_id, r })) => {
                let format = match self.resources.get(*resource_id).map(|r| &r.kind) {
                    Some(Kind::Image(i)) => i.format,
                    _ => return Err(NotDisplaying::Disabled),
                };
                let mut s = format!(
                    "{}x{} {} resource {resource_id}",
                    r.width,
                    r.height,
                    format.as_str()
                );
                if r.x != 0 || r.y != 0 {
                    s.push_str(&format!(" at {},{}", r.x, r.y));
                }
                Ok(s)
            }
            Some(Some(Scanout::Blob {
                resource_id,
                r,
                format,
                stride,
                offset,
                ..
            })) => Ok(format!(
                "{}x{} {} blob {resource_id} stride {stride} offset {offset:#x}",
                r.width,
                r.height,
                format.as_str()
            )),
        }
    }

    fn execute<M: GuestMemory>(&mut self, mem: &M, cmd: Command) -> Result<Response, ErrorCode> {
        match cmd {
            Command::GetDisplayInfo => Ok(self.display_info()),
            Command::GetEdid { scanout } => self
                .edid(scanout)
                .map(|e| Response::Edid(e.to_vec()))
                .ok_or(ErrorCode::InvalidParameter),
            Command::ResourceCreate2d {
                resource_id,
                format,
                width,
                height,
            } => {
                self.resources.check_new_id(resource_id)?;
                let format = pixel_format(format).ok_or(ErrorCode::InvalidParameter)?;
                self.resources
                    .create_image(resource_id, format, width, height)?;
                Ok(Response::OkNoData)
            }
            Command::ResourceUnref { resource_id } => {
                self.resources.unref(resource_id)?;
                for (s, log) in self.scanouts.iter_mut().zip(self.damage.iter_mut()) {
                    if s.as_ref().is_some_and(|s| s.resource_id() == resource_id) {
                        *s = None;
                        log.full();
                    }
                }
                Ok(Response::OkNoData)
            }
            Command::AttachBacking {
                resource_id,
                entries,
            } => {
                if self.resources.get(resource_id).is_none() {
                    return Err(ErrorCode::InvalidResourceId);
                }
                let backing = Backing::new(mem, entries)?;
                self.resources.attach(resource_id, backing)?;
                Ok(Response::OkNoData)
            }
            Command::DetachBacking { resource_id } => {
                self.resources.detach(resource_id)?;
                Ok(Response::OkNoData)
            }
            Command::TransferToHost2d {
                r,
                offset,
                resource_id,
            } => self.transfer(mem, resource_id, r, offset),
            Command::SetScanout {
                r,
                scanout_id,
                resource_id,
            } => self.set_scanout(scanout_id, resource_id, r),
            Command::ResourceFlush { r, resource_id } => self.flush(resource_id, r),
            Command::CreateBlob {
                resource_id,
                blob_mem,
                size,
                entries,
                ..
            } => {
                self.resources.check_new_id(resource_id)?;
                if blob_mem != BLOB_MEM_GUEST {
                    // HOST3D and HOST3D_GUEST need VIRGL, which is never offered.
                    return Err(ErrorCode::InvalidParameter);
                }
                let backing = Backing::new(mem, entries)?;
                self.resources.create_blob(resource_id, size, backing)?;
                Ok(Response::OkNoData)
            }
            Command::SetScanoutBlob(s) => self.set_scanout_blob(&s),
            // Cursor commands belong on the cursor queue.
            Command::UpdateCursor(_) | Command::MoveCursor(_) | Command::Unsupported(_) => {
                Err(ErrorCode::Unspec)
            }
        }
    }

    fn display_info(&self) -> Response {
        let res = Resolution::new(
            self.default_resolution.width.min(self.max_resolution.width),
            self.default_resolution
                .height
                .min(self.max_resolution.height),
        );
        Response::DisplayInfo(
            (0..self.num_scanouts)
                .map(|_| DisplayOne {
                    r: Rect {
                        x: 0,
                        y: 0,
                        width: res.width,
                        height: res.height,
                    },
                    enabled: true,
                })
                .collect(),
        )
    }

    fn transfer<M: GuestMemory>(
        &mut self,
        mem: &M,
        id: u32,
        r: Rect,
        offset: u64,
    ) -> Result<Response, ErrorCode> {
        let res = self
            .resources
            .get_mut(id)
            .ok_or(ErrorCode::InvalidResourceId)?;
        let image = match &mut res.kind {
            // The head reads the blob's guest memory itself.
            Kind::Blob(_) => return Ok(Response::OkNoData),
            Kind::Image(image) => image,
        };
        if !r.fits_in(image.width, image.height) {
            return Err(ErrorCode::InvalidParameter);
        }
        let backing = image.backing.clone().ok_or(ErrorCode::Unspec)?;
        if r.width == 0 || r.height == 0 {
            return Ok(Response::OkNoData);
        }
        // The backing has the resource's layout: `stride` bytes per row.
        let stride = u64::from(image.stride());
        let row = u64::from(r.width) * 4;
        let src_end = (u64::from(r.height) - 1)
            .checked_mul(stride)
            .and_then(|v| v.checked_add(row))
            .and_then(|v| v.checked_add(offset));
        if src_end.is_none_or(|end| end > backing.len()) {
            return Err(ErrorCode::InvalidParameter);
        }
        let pixels = image.pixels_mut()?;
        // All in range: r fits the resource, and pixels holds width * height * 4 bytes.
        let row = row as usize;
        let whole_rows = r.x == 0 && u64::from(r.width) * 4 == stride;
        let first = (u64::from(r.y) * stride + u64::from(r.x) * 4) as usize;
        if whole_rows {
            let len = row * r.height as usize;
            if let Some(dst) = pixels.get_mut(first..first + len) {
                backing.read(mem, offset, dst);
            }
        } else {
            for line in 0..r.height as usize {
                let at = first + line * stride as usize;
                if let Some(dst) = pixels.get_mut(at..at + row) {
                    backing.read(mem, offset + line as u64 * stride, dst);
                }
            }
        }
        Ok(Response::OkNoData)
    }

    fn check_scanout_id(&self, scanout_id: u32) -> Result<usize, ErrorCode> {
        if scanout_id >= self.num_scanouts {
            return Err(ErrorCode::InvalidScanoutId);
        }
        Ok(scanout_id as usize)
    }

    fn check_rect_size(&self, r: &Rect) -> Result<(), ErrorCode> {
        if r.width < MIN_SCANOUT
            || r.height < MIN_SCANOUT
            || r.width > self.max_resolution.width
            || r.height > self.max_resolution.height
        {
            return Err(ErrorCode::InvalidParameter);
        }
        Ok(())
    }

    fn set_head(&mut self, head: usize, scanout: Option<Scanout>) -> Result<Response, ErrorCode> {
        if let Some(slot) = self.scanouts.get_mut(head) {
            let same = match (&*slot, &scanout) {
                (Some(a), Some(b)) => a.same_image(b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                if let Some(log) = self.damage.get_mut(head) {
                    log.full();
                }
            }
            *slot = scanout;
        }
        if let Some(c) = self.counters.get_mut(head) {
            c.set_scanouts += 1;
        }
        Ok(Response::OkNoData)
    }

    fn set_scanout(&mut self, scanout_id: u32, id: u32, r: Rect) -> Result<Response, ErrorCode> {
        let head = self.check_scanout_id(scanout_id)?;
        if id == 0 {
            return self.set_head(head, None);
        }
        let res = self.resources.get(id).ok_or(ErrorCode::InvalidResourceId)?;
        let Kind::Image(image) = &res.kind else {
            return Err(ErrorCode::InvalidParameter);
        };
        if !r.fits_in(image.width, image.height) {
            return Err(ErrorCode::InvalidParameter);
        }
        self.check_rect_size(&r)?;
        self.set_head(head, Some(Scanout::Image { resource_id: id, r }))
    }

    fn set_scanout_blob(&mut self, s: &SetScanoutBlob) -> Result<Response, ErrorCode> {
        let head = self.check_scanout_id(s.scanout_id)?;
        if s.resource_id == 0 {
            return self.set_head(head, None);
        }
        let res = self
            .resources
            .get(s.resource_id)
            .ok_or(ErrorCode::InvalidResourceId)?;
        let Kind::Blob(blob) = &res.kind else {
            return Err(ErrorCode::InvalidParameter);
        };
        let format = pixel_format(s.format).ok_or(ErrorCode::InvalidParameter)?;
        let bpp = u64::from(format.bytes_per_pixel());
        let r = s.r;
        if !r.fits_in(s.width, s.height) {
            return Err(ErrorCode::InvalidParameter);
        }
        self.check_rect_size(&r)?;
        // Plane 0 only: every supported format is packed.
        let stride = s.strides[0];
        if u64::from(stride) < u64::from(s.width) * bpp {
            return Err(ErrorCode::InvalidParameter);
        }
        let stride64 = u64::from(stride);
        // u32 inputs: none of these u64 sums can overflow.
        let offset = u64::from(s.offsets[0]) + u64::from(r.y) * stride64 + u64::from(r.x) * bpp;
        let end = offset + u64::from(r.height - 1) * stride64 + u64::from(r.width) * bpp;
        if end > blob.size {
            return Err(ErrorCode::InvalidParameter);
        }
        let scanout = Scanout::Blob {
            resource_id: s.resource_id,
            r,
            format,
            stride,
            offset,
            backing: Arc::clone(&blob.backing),
        };
        self.set_head(head, Some(scanout))
    }

    fn flush(&mut self, id: u32, r: Rect) -> Result<Response, ErrorCode> {
        let res = self.resources.get(id).ok_or(ErrorCode::InvalidResourceId)?;
        if let Kind::Image(image) = &res.kind {
            if !r.fits_in(image.width, image.height) {
                return Err(ErrorCode::InvalidParameter);
            }
        }
        for (i, ((s, c), log)) in self
            .scanouts
            .iter()
            .zip(self.counters.iter_mut())
            .zip(self.damage.iter_mut())
            .enumerate()
        {
            if let Some(s) = s.as_ref().filter(|s| s.resource_id() == id) {
                c.flushes += 1;
                // The flushed part of what the head shows, in the head's coordinates.
                let shown = s.rect();
                let part = to_damage_rect(&r).intersect(&to_damage_rect(&shown));
                log.record(damage::Rect::new(
                    part.x - shown.x,
                    part.y - shown.y,
                    part.width,
                    part.height,
                ));
                // At most MAX_SCANOUTS (16) heads.
                self.flushed |= 1u32.checked_shl(i as u32).unwrap_or(0);
            }
        }
        Ok(Response::OkNoData)
    }

    fn update_cursor<M: GuestMemory>(&mut self, mem: &M, c: &CursorCmd) {
        let Some(head) = self.check_scanout_id(c.scanout_id).ok() else {
            return;
        };
        let image = if c.resource_id == 0 {
            None
        } else {
            self.cursor_image(mem, c.resource_id)
        };
        if let Some(cur) = self.cursors.get_mut(head) {
            *cur = Cursor {
                resource_id: c.resource_id,
                hot_x: c.hot_x,
                hot_y: c.hot_y,
                x: c.x,
                y: c.y,
                image,
            };
        }
    }

    /// A copy of the 64x64 cursor image in resource `id`.
    fn cursor_image<M: GuestMemory>(&self, mem: &M, id: u32) -> Option<Frame> {
        let len = (CURSOR_SIZE * CURSOR_SIZE * 4) as usize;
        let (format, data) = match &self.resources.get(id)?.kind {
            Kind::Image(i) if i.width == CURSOR_SIZE && i.height == CURSOR_SIZE => (
                i.format,
                i.pixels
                    .as_ref()
                    .and_then(|p| p.get(..len))
                    .map_or_else(|| vec![0; len], <[u8]>::to_vec),
            ),
            Kind::Blob(b) if b.size >= len as u64 => {
                // Linux's cursor buffers are ARGB8888.
                let mut data = vec![0; len];
                b.backing.read(mem, 0, &mut data);
                (PixelFormat::Argb8888, data)
            }
            _ => return None,
        };
        Some(Frame {
            width: CURSOR_SIZE,
            height: CURSOR_SIZE,
            format,
            data,
        })
    }
}

impl Scanout {
    fn resource_id(&self) -> u32 {
        match self {
            Scanout::Image { resource_id, .. } | Scanout::Blob { resource_id, .. } => *resource_id,
        }
    }

    /// The visible rectangle inside the resource.
    fn rect(&self) -> Rect {
        match self {
            Scanout::Image { r, .. } | Scanout::Blob { r, .. } => *r,
        }
    }

    /// Whether `other` shows the same pixels the same way (a repeated SET_SCANOUT).
    fn same_image(&self, other: &Scanout) -> bool {
        match (self, other) {
            (
                Scanout::Image { resource_id, r },
                Scanout::Image {
                    resource_id: id2,
                    r: r2,
                },
            ) => resource_id == id2 && r == r2,
            (
                Scanout::Blob {
                    resource_id,
                    r,
                    format,
                    stride,
                    offset,
                    ..
                },
                Scanout::Blob {
                    resource_id: id2,
                    r: r2,
                    format: f2,
                    stride: s2,
                    offset: o2,
                    ..
                },
            ) => resource_id == id2 && r == r2 && format == f2 && stride == s2 && offset == o2,
            _ => false,
        }
    }
}

fn to_damage_rect(r: &Rect) -> damage::Rect {
    damage::Rect::new(r.x, r.y, r.width, r.height)
}

/// Head `head`'s EDID: the instance's, with the serial number offset by the head so a desktop
/// tells identical monitors apart (head 0's is the instance's EDID unchanged).
fn head_edid(ty: &VgpuType, uuid: &[u8; 16], head: u32) -> [u8; crate::edid::EDID_BLOCK] {
    let mut u = *uuid;
    let serial = u32::from_be_bytes([u[0], u[1], u[2], u[3]]).wrapping_add(head);
    u[..4].copy_from_slice(&serial.to_be_bytes());
    crate::edid::generate(ty, &u)
}

#[cfg(test)]
mod tests;

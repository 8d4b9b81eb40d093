//! The virtio-gpu wire format (virtio 1.2 section 5.7.6): requests decoded once into a typed
//! [`Command`], responses encoded from a typed [`Response`].
//!
//! Every structure is little-endian and starts with a 24-byte control header:
//!
//! ```text
//!  0        4        8                16       20  21      24
//!  +--------+--------+----------------+--------+---+-------+
//!  | type   | flags  | fence_id       | ctx_id |idx| pad   |
//!  +--------+--------+----------------+--------+---+-------+
//! ```
//!
//! Sizes and constants come from `virtio-bindings`; the fields are read at their documented
//! offsets with checked slice access, so a short request is a [`DecodeError`], never a panic.
//! Bytes past a command's structure (other than its memory entries) are ignored, as the spec
//! leaves them to the driver.

use std::mem::size_of;

use virtio_bindings::virtio_gpu as b;

use crate::scanout::PixelFormat;

/// Control header flag: the driver wants a fence for this request.
pub const FLAG_FENCE: u32 = b::VIRTIO_GPU_FLAG_FENCE;
/// Blob memory type: the blob lives in guest memory (the only one offered).
pub const BLOB_MEM_GUEST: u32 = b::VIRTIO_GPU_BLOB_MEM_GUEST;
/// Blob memory type: host 3D memory (needs VIRGL; refused).
pub const BLOB_MEM_HOST3D: u32 = b::VIRTIO_GPU_BLOB_MEM_HOST3D;
/// Blob memory type: host 3D memory with guest backing (needs VIRGL; refused).
pub const BLOB_MEM_HOST3D_GUEST: u32 = b::VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST;
/// Largest number of heads the protocol can describe.
pub const MAX_SCANOUTS: u32 = b::VIRTIO_GPU_MAX_SCANOUTS;

/// Request and response type codes.
#[allow(missing_docs)]
pub mod ty {
    use virtio_bindings::virtio_gpu as b;

    pub const GET_DISPLAY_INFO: u32 = b::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_GET_DISPLAY_INFO;
    pub const RESOURCE_CREATE_2D: u32 = b::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_RESOURCE_CREATE_2D;
    pub const RESOURCE_UNREF: u32 = b::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_RESOURCE_UNREF;
    pub const SET_SCANOUT: u32 = b::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_SET_SCANOUT;
    pub const RESOURCE_FLUSH: u32 = b::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_RESOURCE_FLUSH;
    pub const TRANSFER_TO_HOST_2D: u32 = b::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D;
    pub const RESOURCE_ATTACH_BACKING: u32 =
        b::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING;
    pub const RESOURCE_DETACH_BACKING: u32 =
        b::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING;
    pub const GET_CAPSET_INFO: u32 = b::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_GET_CAPSET_INFO;
    pub const GET_CAPSET: u32 = b::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_GET_CAPSET;
    pub const GET_EDID: u32 = b::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_GET_EDID;
    pub const RESOURCE_ASSIGN_UUID: u32 =
        b::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID;
    pub const RESOURCE_CREATE_BLOB: u32 =
        b::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB;
    pub const SET_SCANOUT_BLOB: u32 = b::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_SET_SCANOUT_BLOB;
    pub const CTX_CREATE: u32 = b::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_CTX_CREATE;
    pub const RESOURCE_UNMAP_BLOB: u32 = b::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB;
    pub const UPDATE_CURSOR: u32 = b::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_UPDATE_CURSOR;
    pub const MOVE_CURSOR: u32 = b::virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_MOVE_CURSOR;

    pub const RESP_OK_NODATA: u32 = b::virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_OK_NODATA;
    pub const RESP_OK_DISPLAY_INFO: u32 = b::virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_OK_DISPLAY_INFO;
    pub const RESP_OK_EDID: u32 = b::virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_OK_EDID;
    pub const RESP_ERR_UNSPEC: u32 = b::virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_ERR_UNSPEC;
    pub const RESP_ERR_OUT_OF_MEMORY: u32 =
        b::virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY;
    pub const RESP_ERR_INVALID_SCANOUT_ID: u32 =
        b::virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID;
    pub const RESP_ERR_INVALID_RESOURCE_ID: u32 =
        b::virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID;
    pub const RESP_ERR_INVALID_PARAMETER: u32 =
        b::virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER;
}

/// Bytes of the control header.
pub const HDR_LEN: usize = size_of::<b::virtio_gpu_ctrl_hdr>();
/// Bytes of one `virtio_gpu_mem_entry`.
pub const MEM_ENTRY_LEN: usize = size_of::<b::virtio_gpu_mem_entry>();
/// Bytes of `virtio_gpu_resp_display_info`.
pub const DISPLAY_INFO_LEN: usize = size_of::<b::virtio_gpu_resp_display_info>();
/// Bytes of `virtio_gpu_resp_edid`.
pub const RESP_EDID_LEN: usize = size_of::<b::virtio_gpu_resp_edid>();
/// Bytes of the EDID field of `virtio_gpu_resp_edid`.
pub const EDID_FIELD_LEN: usize = 1024;
/// Most memory entries one request may carry (QEMU's limit too; a 4K dumb buffer in 4 KiB
/// pages needs about 8100).
pub const MAX_MEM_ENTRIES: u32 = 16384;

/// The control header of a request or response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtrlHeader {
    /// Command or response type.
    pub ty: u32,
    /// `VIRTIO_GPU_FLAG_*`.
    pub flags: u32,
    /// Fence id (meaningful with [`FLAG_FENCE`]).
    pub fence_id: u64,
    /// 3D context id (echoed only).
    pub ctx_id: u32,
    /// Ring index (VIRTIO_GPU_F_CONTEXT_INIT, not offered; echoed only).
    pub ring_idx: u8,
}

impl CtrlHeader {
    /// Reads the header at the start of `request`; `None` when it is shorter than a header.
    pub fn parse(request: &[u8]) -> Option<CtrlHeader> {
        if request.len() < HDR_LEN {
            return None;
        }
        Some(CtrlHeader {
            ty: u32_at(request, 0)?,
            flags: u32_at(request, 4)?,
            fence_id: u64_at(request, 8)?,
            ctx_id: u32_at(request, 16)?,
            ring_idx: *request.get(20)?,
        })
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut out = [0u8; HDR_LEN];
        out[0..4].copy_from_slice(&self.ty.to_le_bytes());
        out[4..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..16].copy_from_slice(&self.fence_id.to_le_bytes());
        out[16..20].copy_from_slice(&self.ctx_id.to_le_bytes());
        out[20] = self.ring_idx;
        out
    }

    /// The request asks for a fence.
    pub fn is_fenced(&self) -> bool {
        self.flags & FLAG_FENCE != 0
    }
}

/// `virtio_gpu_rect`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rect {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

impl Rect {
    fn at(b: &[u8], off: usize) -> Option<Rect> {
        Some(Rect {
            x: u32_at(b, off)?,
            y: u32_at(b, off + 4)?,
            width: u32_at(b, off + 8)?,
            height: u32_at(b, off + 12)?,
        })
    }

    /// Lies inside a `width` x `height` area (u64 math: no wrap-around).
    pub fn fits_in(&self, width: u32, height: u32) -> bool {
        u64::from(self.x) + u64::from(self.width) <= u64::from(width)
            && u64::from(self.y) + u64::from(self.height) <= u64::from(height)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.x, self.y, self.width, self.height] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// `virtio_gpu_mem_entry`: one guest-physical range of a backing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemEntry {
    /// Guest-physical address.
    pub addr: u64,
    /// Bytes.
    pub length: u32,
}

/// `virtio_gpu_set_scanout_blob` past its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetScanoutBlob {
    /// Visible rectangle inside the framebuffer.
    pub r: Rect,
    /// Head.
    pub scanout_id: u32,
    /// Blob resource (0 disables the head).
    pub resource_id: u32,
    /// Framebuffer width.
    pub width: u32,
    /// Framebuffer height.
    pub height: u32,
    /// `VIRTIO_GPU_FORMAT_*`.
    pub format: u32,
    /// Bytes per row of each plane (only plane 0 is used by the packed formats).
    pub strides: [u32; 4],
    /// Byte offset of each plane in the blob.
    pub offsets: [u32; 4],
}

/// `virtio_gpu_update_cursor` past its header (also MOVE_CURSOR's layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CursorCmd {
    /// Head.
    pub scanout_id: u32,
    /// Position on the head.
    pub x: u32,
    /// Position on the head.
    pub y: u32,
    /// Cursor image resource (0 hides the cursor; UPDATE only).
    pub resource_id: u32,
    /// Hot spot (UPDATE only).
    pub hot_x: u32,
    /// Hot spot (UPDATE only).
    pub hot_y: u32,
}

/// One decoded request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// VIRTIO_GPU_CMD_GET_DISPLAY_INFO.
    GetDisplayInfo,
    /// VIRTIO_GPU_CMD_GET_EDID.
    GetEdid {
        /// Head.
        scanout: u32,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_CREATE_2D.
    ResourceCreate2d {
        /// New resource id.
        resource_id: u32,
        /// `VIRTIO_GPU_FORMAT_*`.
        format: u32,
        /// Pixels per row.
        width: u32,
        /// Rows.
        height: u32,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_UNREF.
    ResourceUnref {
        /// Resource.
        resource_id: u32,
    },
    /// VIRTIO_GPU_CMD_SET_SCANOUT.
    SetScanout {
        /// Visible rectangle inside the resource.
        r: Rect,
        /// Head.
        scanout_id: u32,
        /// Resource (0 disables the head).
        resource_id: u32,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_FLUSH.
    ResourceFlush {
        /// Damaged rectangle inside the resource.
        r: Rect,
        /// Resource.
        resource_id: u32,
    },
    /// VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D.
    TransferToHost2d {
        /// Rectangle inside the resource to update.
        r: Rect,
        /// Byte offset in the backing of the rectangle's first pixel.
        offset: u64,
        /// Resource.
        resource_id: u32,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING.
    AttachBacking {
        /// Resource.
        resource_id: u32,
        /// The backing's guest ranges, in order.
        entries: Vec<MemEntry>,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING.
    DetachBacking {
        /// Resource.
        resource_id: u32,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB.
    CreateBlob {
        /// New resource id.
        resource_id: u32,
        /// `VIRTIO_GPU_BLOB_MEM_*`.
        blob_mem: u32,
        /// `VIRTIO_GPU_BLOB_FLAG_*`.
        blob_flags: u32,
        /// Host blob id (3D only).
        blob_id: u64,
        /// Bytes.
        size: u64,
        /// The blob's guest ranges, in order.
        entries: Vec<MemEntry>,
    },
    /// VIRTIO_GPU_CMD_SET_SCANOUT_BLOB.
    SetScanoutBlob(SetScanoutBlob),
    /// VIRTIO_GPU_CMD_UPDATE_CURSOR.
    UpdateCursor(CursorCmd),
    /// VIRTIO_GPU_CMD_MOVE_CURSOR.
    MoveCursor(CursorCmd),
    /// A defined command this device does not implement (capsets, 3D contexts, UUIDs,
    /// host-visible blob mapping): answered ERR_UNSPEC.
    Unsupported(u32),
}

/// Why a request could not be decoded (answered ERR_UNSPEC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the control header.
    #[error("request of {0} bytes is shorter than the control header")]
    NoHeader(usize),
    /// Shorter than its command's structure.
    #[error("command {ty:#x} needs {need} bytes, got {got}")]
    Truncated {
        /// Command type.
        ty: u32,
        /// Bytes its structure needs.
        need: usize,
        /// Bytes received.
        got: usize,
    },
    /// Not a virtio-gpu command.
    #[error("unknown command type {0:#x}")]
    UnknownType(u32),
    /// More memory entries than [`MAX_MEM_ENTRIES`].
    #[error("{0} memory entries exceed the limit of {MAX_MEM_ENTRIES}")]
    TooManyEntries(u32),
    /// The memory entries reach past the request.
    #[error("{entries} memory entries need {need} bytes, got {got}")]
    EntriesTruncated {
        /// Entries announced.
        entries: u32,
        /// Bytes they need after the structure.
        need: usize,
        /// Bytes received after the structure.
        got: usize,
    },
}

impl Command {
    /// Decodes `request` (header included) whose header is `hdr`.
    pub fn decode(hdr: &CtrlHeader, request: &[u8]) -> Result<Command, DecodeError> {
        let need = |n: usize| {
            if request.len() < n {
                Err(DecodeError::Truncated {
                    ty: hdr.ty,
                    need: n,
                    got: request.len(),
                })
            } else {
                Ok(())
            }
        };
        // After `need`, the fixed-offset reads below cannot fail; `?` on a missing field is
        // still mapped to Truncated rather than trusted.
        let r = request;
        let trunc = || DecodeError::Truncated {
            ty: hdr.ty,
            need: HDR_LEN,
            got: r.len(),
        };
        let u32f = |off: usize| u32_at(r, off).ok_or_else(trunc);
        Ok(match hdr.ty {
            ty::GET_DISPLAY_INFO => Command::GetDisplayInfo,
            ty::GET_EDID => {
                need(size_of::<b::virtio_gpu_cmd_get_edid>())?;
                Command::GetEdid { scanout: u32f(24)? }
            }
            ty::RESOURCE_CREATE_2D => {
                need(size_of::<b::virtio_gpu_resource_create_2d>())?;
                Command::ResourceCreate2d {
                    resource_id: u32f(24)?,
                    format: u32f(28)?,
                    width: u32f(32)?,
                    height: u32f(36)?,
                }
            }
            ty::RESOURCE_UNREF => {
                need(size_of::<b::virtio_gpu_resource_unref>())?;
                Command::ResourceUnref {
                    resource_id: u32f(24)?,
                }
            }
            ty::SET_SCANOUT => {
                need(size_of::<b::virtio_gpu_set_scanout>())?;
                Command::SetScanout {
                    r: Rect::at(r, 24).ok_or_else(trunc)?,
                    scanout_id: u32f(40)?,
                    resource_id: u32f(44)?,
                }
            }
            ty::RESOURCE_FLUSH => {
                need(size_of::<b::virtio_gpu_resource_flush>())?;
                Command::ResourceFlush {
                    r: Rect::at(r, 24).ok_or_else(trunc)?,
                    resource_id: u32f(40)?,
                }
            }
            ty::TRANSFER_TO_HOST_2D => {
                need(size_of::<b::virtio_gpu_transfer_to_host_2d>())?;
                Command::TransferToHost2d {
                    r: Rect::at(r, 24).ok_or_else(trunc)?,
                    offset: u64_at(r, 40).ok_or_else(trunc)?,
                    resource_id: u32f(48)?,
                }
            }
            ty::RESOURCE_ATTACH_BACKING => {
                let len = size_of::<b::virtio_gpu_resource_attach_backing>();
                need(len)?;
                Command::AttachBacking {
                    resource_id: u32f(24)?,
                    entries: entries(r, len, u32f(28)?)?,
                }
            }
            ty::RESOURCE_DETACH_BACKING => {
                need(size_of::<b::virtio_gpu_resource_detach_backing>())?;
                Command::DetachBacking {
                    resource_id: u32f(24)?,
                }
            }
            ty::RESOURCE_CREATE_BLOB => {
                let len = size_of::<b::virtio_gpu_resource_create_blob>();
                need(len)?;
                Command::CreateBlob {
                    resource_id: u32f(24)?,
                    blob_mem: u32f(28)?,
                    blob_flags: u32f(32)?,
                    blob_id: u64_at(r, 40).ok_or_else(trunc)?,
                    size: u64_at(r, 48).ok_or_else(trunc)?,
                    entries: entries(r, len, u32f(36)?)?,
                }
            }
            ty::SET_SCANOUT_BLOB => {
                need(size_of::<b::virtio_gpu_set_scanout_blob>())?;
                let mut strides = [0u32; 4];
                let mut offsets = [0u32; 4];
                for i in 0..4 {
                    strides[i] = u32f(64 + 4 * i)?;
                    offsets[i] = u32f(80 + 4 * i)?;
                }
                Command::SetScanoutBlob(SetScanoutBlob {
                    r: Rect::at(r, 24).ok_or_else(trunc)?,
                    scanout_id: u32f(40)?,
                    resource_id: u32f(44)?,
                    width: u32f(48)?,
                    height: u32f(52)?,
                    format: u32f(56)?,
                    strides,
                    offsets,
                })
            }
            ty::UPDATE_CURSOR | ty::MOVE_CURSOR => {
                need(size_of::<b::virtio_gpu_update_cursor>())?;
                let c = CursorCmd {
                    scanout_id: u32f(24)?,
                    x: u32f(28)?,
                    y: u32f(32)?,
                    resource_id: u32f(40)?,
                    hot_x: u32f(44)?,
                    hot_y: u32f(48)?,
                };
                if hdr.ty == ty::UPDATE_CURSOR {
                    Command::UpdateCursor(c)
                } else {
                    Command::MoveCursor(c)
                }
            }
            ty::GET_CAPSET_INFO..=ty::RESOURCE_ASSIGN_UUID
            | ty::CTX_CREATE..=ty::RESOURCE_UNMAP_BLOB => Command::Unsupported(hdr.ty),
            other => return Err(DecodeError::UnknownType(other)),
        })
    }
}

/// The `n` memory entries following a `fixed`-byte structure.
fn entries(request: &[u8], fixed: usize, n: u32) -> Result<Vec<MemEntry>, DecodeError> {
    if n > MAX_MEM_ENTRIES {
        return Err(DecodeError::TooManyEntries(n));
    }
    let rest = request.get(fixed..).unwrap_or_default();
    // n <= 16384, so this cannot overflow.
    let need = n as usize * MEM_ENTRY_LEN;
    if rest.len() < need {
        return Err(DecodeError::EntriesTruncated {
            entries: n,
            need,
            got: rest.len(),
        });
    }
    Ok(rest
        .chunks_exact(MEM_ENTRY_LEN)
        .take(n as usize)
        .filter_map(|e| {
            Some(MemEntry {
                addr: u64_at(e, 0)?,
                length: u32_at(e, 8)?,
            })
        })
        .collect())
}

/// A guest-visible error (`VIRTIO_GPU_RESP_ERR_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// VIRTIO_GPU_RESP_ERR_UNSPEC.
    Unspec,
    /// VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY.
    OutOfMemory,
    /// VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID.
    InvalidScanoutId,
    /// VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID.
    InvalidResourceId,
    /// VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER.
    InvalidParameter,
}

impl ErrorCode {
    /// The response type.
    pub fn code(self) -> u32 {
        match self {
            ErrorCode::Unspec => ty::RESP_ERR_UNSPEC,
            ErrorCode::OutOfMemory => ty::RESP_ERR_OUT_OF_MEMORY,
            ErrorCode::InvalidScanoutId => ty::RESP_ERR_INVALID_SCANOUT_ID,
            ErrorCode::InvalidResourceId => ty::RESP_ERR_INVALID_RESOURCE_ID,
            ErrorCode::InvalidParameter => ty::RESP_ERR_INVALID_PARAMETER,
        }
    }
}

/// One head of a display-info response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DisplayOne {
    /// Preferred mode as a rectangle.
    pub r: Rect,
    /// Connected.
    pub enabled: bool,
}

/// A successful response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// VIRTIO_GPU_RESP_OK_NODATA.
    OkNoData,
    /// VIRTIO_GPU_RESP_OK_DISPLAY_INFO (up to [`MAX_SCANOUTS`] heads; the rest disabled).
    DisplayInfo(Vec<DisplayOne>),
    /// VIRTIO_GPU_RESP_OK_EDID (at most [`EDID_FIELD_LEN`] bytes).
    Edid(Vec<u8>),
}

/// Encodes the response to a request with header `req` (the fence flag, fence id, context id
/// and ring index are echoed, as the spec requires of fenced requests).
pub fn encode_response(req: Option<&CtrlHeader>, result: &Result<Response, ErrorCode>) -> Vec<u8> {
    let ty = match result {
        Ok(Response::OkNoData) => ty::RESP_OK_NODATA,
        Ok(Response::DisplayInfo(_)) => ty::RESP_OK_DISPLAY_INFO,
        Ok(Response::Edid(_)) => ty::RESP_OK_EDID,
        Err(e) => e.code(),
    };
    let mut hdr = CtrlHeader {
        ty,
        ..CtrlHeader::default()
    };
    if let Some(req) = req.filter(|h| h.is_fenced()) {
        hdr.flags = FLAG_FENCE;
        hdr.fence_id = req.fence_id;
        hdr.ctx_id = req.ctx_id;
        hdr.ring_idx = req.ring_idx;
    }
    let mut out = Vec::with_capacity(HDR_LEN);
    out.extend_from_slice(&hdr.encode());
    match result {
        Ok(Response::DisplayInfo(heads)) => {
            for i in 0..MAX_SCANOUTS as usize {
                let one = heads.get(i).copied().unwrap_or_default();
                one.r.encode(&mut out);
                out.extend_from_slice(&u32::from(one.enabled).to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
            }
            debug_assert_eq!(out.len(), DISPLAY_INFO_LEN);
        }
        Ok(Response::Edid(edid)) => {
            let n = edid.len().min(EDID_FIELD_LEN);
            out.extend_from_slice(&(n as u32).to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            let start = out.len();
            out.resize(start + EDID_FIELD_LEN, 0);
            if let (Some(dst), Some(src)) = (out.get_mut(start..start + n), edid.get(..n)) {
                dst.copy_from_slice(src);
            }
            debug_assert_eq!(out.len(), RESP_EDID_LEN);
        }
        _ => {}
    }
    out
}

/// The scanout pixel layout of a `VIRTIO_GPU_FORMAT_*` (the names give the byte order in
/// memory); `None` for a format this device does not support.
pub fn pixel_format(format: u32) -> Option<PixelFormat> {
    Some(match format {
        b::virtio_gpu_formats_VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM => PixelFormat::Argb8888,
        b::virtio_gpu_formats_VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM => PixelFormat::Xrgb8888,
        b::virtio_gpu_formats_VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM => PixelFormat::Bgra8888,
        b::virtio_gpu_formats_VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM => PixelFormat::Bgrx8888,
        b::virtio_gpu_formats_VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM => PixelFormat::Abgr8888,
        b::virtio_gpu_formats_VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM => PixelFormat::Rgbx8888,
        b::virtio_gpu_formats_VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM => PixelFormat::Rgba8888,
        b::virtio_gpu_formats_VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM => PixelFormat::Xbgr8888,
        _ => return None,
    })
}

/// `VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM`: what Linux uses for XRGB8888 framebuffers.
pub const FORMAT_B8G8R8X8: u32 = b::virtio_gpu_formats_VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM;
/// `VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM`: what Linux uses for ARGB8888 cursors.
pub const FORMAT_B8G8R8A8: u32 = b::virtio_gpu_formats_VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM;

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

/// Request builders, the inverse of [`Command::decode`] (tests, the fuzz harness and its seed
/// corpus).
pub mod encode {
    use super::*;

    /// A request header of type `ty`, fenced with `fence` when given.
    pub fn header(ty: u32, fence: Option<u64>) -> Vec<u8> {
        CtrlHeader {
            ty,
            flags: if fence.is_some() { FLAG_FENCE } else { 0 },
            fence_id: fence.unwrap_or(0),
            ..CtrlHeader::default()
        }
        .encode()
        .to_vec()
    }

    fn with(ty: u32, fence: Option<u64>, words: &[u32]) -> Vec<u8> {
        let mut v = header(ty, fence);
        for w in words {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v
    }

    fn push_entries(v: &mut Vec<u8>, entries: &[MemEntry]) {
        for e in entries {
            v.extend_from_slice(&e.addr.to_le_bytes());
            v.extend_from_slice(&e.length.to_le_bytes());
            v.extend_from_slice(&0u32.to_le_bytes());
        }
    }

    /// GET_DISPLAY_INFO.
    pub fn get_display_info() -> Vec<u8> {
        header(ty::GET_DISPLAY_INFO, None)
    }

    /// GET_EDID.
    pub fn get_edid(scanout: u32) -> Vec<u8> {
        with(ty::GET_EDID, None, &[scanout, 0])
    }

    /// RESOURCE_CREATE_2D.
    pub fn create_2d(id: u32, format: u32, width: u32, height: u32) -> Vec<u8> {
        with(ty::RESOURCE_CREATE_2D, None, &[id, format, width, height])
    }

    /// RESOURCE_UNREF.
    pub fn unref(id: u32) -> Vec<u8> {
        with(ty::RESOURCE_UNREF, None, &[id, 0])
    }

    /// RESOURCE_ATTACH_BACKING with `entries` (nr_entries = their number).
    pub fn attach_backing(id: u32, entries: &[MemEntry]) -> Vec<u8> {
        let mut v = with(
            ty::RESOURCE_ATTACH_BACKING,
            None,
            &[id, entries.len() as u32],
        );
        push_entries(&mut v, entries);
        v
    }

    /// RESOURCE_DETACH_BACKING.
    pub fn detach_backing(id: u32) -> Vec<u8> {
        with(ty::RESOURCE_DETACH_BACKING, None, &[id, 0])
    }

    /// TRANSFER_TO_HOST_2D.
    pub fn transfer_2d(id: u32, r: Rect, offset: u64) -> Vec<u8> {
        let mut v = with(
            ty::TRANSFER_TO_HOST_2D,
            None,
            &[r.x, r.y, r.width, r.height],
        );
        v.extend_from_slice(&offset.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v
    }

    /// SET_SCANOUT.
    pub fn set_scanout(scanout: u32, id: u32, r: Rect) -> Vec<u8> {
        with(
            ty::SET_SCANOUT,
            None,
            &[r.x, r.y, r.width, r.height, scanout, id],
        )
    }

    /// RESOURCE_FLUSH, fenced with `fence` when given.
    pub fn flush(id: u32, r: Rect, fence: Option<u64>) -> Vec<u8> {
        with(
            ty::RESOURCE_FLUSH,
            fence,
            &[r.x, r.y, r.width, r.height, id, 0],
        )
    }

    /// RESOURCE_CREATE_BLOB (blob_flags SHAREABLE, as Linux sends for dumb buffers).
    pub fn create_blob(id: u32, blob_mem: u32, size: u64, entries: &[MemEntry]) -> Vec<u8> {
        let mut v = with(
            ty::RESOURCE_CREATE_BLOB,
            None,
            &[
                id,
                blob_mem,
                b::VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE,
                entries.len() as u32,
            ],
        );
        v.extend_from_slice(&0u64.to_le_bytes());
        v.extend_from_slice(&size.to_le_bytes());
        push_entries(&mut v, entries);
        v
    }

    /// SET_SCANOUT_BLOB with one plane.
    pub fn set_scanout_blob(
        scanout: u32,
        id: u32,
        r: Rect,
        (width, height, format): (u32, u32, u32),
        stride: u32,
        offset: u32,
    ) -> Vec<u8> {
        with(
            ty::SET_SCANOUT_BLOB,
            None,
            &[
                r.x, r.y, r.width, r.height, scanout, id, width, height, format, 0, stride, 0, 0,
                0, offset, 0, 0, 0,
            ],
        )
    }

    /// UPDATE_CURSOR or MOVE_CURSOR (`update` chooses).
    pub fn cursor(update: bool, c: CursorCmd) -> Vec<u8> {
        let t = if update {
            ty::UPDATE_CURSOR
        } else {
            ty::MOVE_CURSOR
        };
        with(
            t,
            None,
            &[
                c.scanout_id,
                c.x,
                c.y,
                0,
                c.resource_id,
                c.hot_x,
                c.hot_y,
                0,
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_bindings() {
        assert_eq!(HDR_LEN, 24);
        assert_eq!(MEM_ENTRY_LEN, 16);
        assert_eq!(DISPLAY_INFO_LEN, 24 + 16 * 24);
        assert_eq!(RESP_EDID_LEN, 24 + 8 + EDID_FIELD_LEN);
        assert_eq!(encode::create_2d(1, 2, 3, 4).len(), 40);
        assert_eq!(encode::transfer_2d(1, Rect::default(), 0).len(), 56);
        assert_eq!(encode::set_scanout(0, 1, Rect::default()).len(), 48);
        assert_eq!(encode::flush(1, Rect::default(), None).len(), 48);
        assert_eq!(encode::create_blob(1, 1, 0, &[]).len(), 56);
        let blob = encode::set_scanout_blob(0, 1, Rect::default(), (0, 0, 0), 0, 0);
        assert_eq!(blob.len(), 96);
        let c = CursorCmd {
            scanout_id: 0,
            x: 0,
            y: 0,
            resource_id: 0,
            hot_x: 0,
            hot_y: 0,
        };
        assert_eq!(encode::cursor(true, c).len(), 56);
    }

    #[test]
    fn decode_round_trips_every_builder() {
        let r = Rect {
            x: 1,
            y: 2,
            width: 3,
            height: 4,
        };
        let e = [MemEntry {
            addr: 0x1234_5678_9abc,
            length: 4096,
        }];
        let c = CursorCmd {
            scanout_id: 1,
            x: 10,
            y: 20,
            resource_id: 7,
            hot_x: 3,
            hot_y: 4,
        };
        let cases = [
            (encode::get_display_info(), Command::GetDisplayInfo),
            (encode::get_edid(3), Command::GetEdid { scanout: 3 }),
            (
                encode::create_2d(5, 2, 640, 480),
                Command::ResourceCreate2d {
                    resource_id: 5,
                    format: 2,
                    width: 640,
                    height: 480,
                },
            ),
            (encode::unref(5), Command::ResourceUnref { resource_id: 5 }),
            (
                encode::attach_backing(5, &e),
                Command::AttachBacking {
                    resource_id: 5,
                    entries: e.to_vec(),
                },
            ),
            (
                encode::detach_backing(5),
                Command::DetachBacking { resource_id: 5 },
            ),
            (
                encode::transfer_2d(5, r, 99),
                Command::TransferToHost2d {
                    r,
                    offset: 99,
                    resource_id: 5,
                },
            ),
            (
                encode::set_scanout(1, 5, r),
                Command::SetScanout {
                    r,
                    scanout_id: 1,
                    resource_id: 5,
                },
            ),
            (
                encode::flush(5, r, Some(9)),
                Command::ResourceFlush { r, resource_id: 5 },
            ),
            (
                encode::create_blob(6, BLOB_MEM_GUEST, 4096, &e),
                Command::CreateBlob {
                    resource_id: 6,
                    blob_mem: BLOB_MEM_GUEST,
                    blob_flags: b::VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE,
                    blob_id: 0,
                    size: 4096,
                    entries: e.to_vec(),
                },
            ),
            (
                encode::set_scanout_blob(1, 6, r, (64, 64, 2), 256, 8),
                Command::SetScanoutBlob(SetScanoutBlob {
                    r,
                    scanout_id: 1,
                    resource_id: 6,
                    width: 64,
                    height: 64,
                    format: 2,
                    strides: [256, 0, 0, 0],
                    offsets: [8, 0, 0, 0],
                }),
            ),
            (encode::cursor(true, c), Command::UpdateCursor(c)),
            (encode::cursor(false, c), Command::MoveCursor(c)),
        ];
        for (bytes, want) in cases {
            let hdr = CtrlHeader::parse(&bytes).unwrap();
            assert_eq!(Command::decode(&hdr, &bytes), Ok(want.clone()));
            // Every strict prefix past the header is refused, never misread.
            if !matches!(want, Command::GetDisplayInfo) {
                for n in HDR_LEN..bytes.len() {
                    assert!(Command::decode(&hdr, &bytes[..n]).is_err(), "{want:?} {n}");
                }
            }
        }
    }

    #[test]
    fn entry_counts_are_bounded_by_the_request_and_the_cap() {
        let mut req = encode::attach_backing(1, &[]);
        req[28..32].copy_from_slice(&2u32.to_le_bytes());
        req.extend_from_slice(&[0u8; 16]);
        let hdr = CtrlHeader::parse(&req).unwrap();
        assert_eq!(
            Command::decode(&hdr, &req),
            Err(DecodeError::EntriesTruncated {
                entries: 2,
                need: 32,
                got: 16
            })
        );
        req[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            Command::decode(&hdr, &req),
            Err(DecodeError::TooManyEntries(u32::MAX))
        );
    }

    #[test]
    fn unknown_and_unsupported_types() {
        let hdr = CtrlHeader {
            ty: 0x9999,
            ..CtrlHeader::default()
        };
        assert_eq!(
            Command::decode(&hdr, &hdr.encode()),
            Err(DecodeError::UnknownType(0x9999))
        );
        let hdr = CtrlHeader {
            ty: ty::GET_CAPSET_INFO,
            ..CtrlHeader::default()
        };
        assert_eq!(
            Command::decode(&hdr, &hdr.encode()),
            Ok(Command::Unsupported(ty::GET_CAPSET_INFO))
        );
        assert_eq!(CtrlHeader::parse(&[0u8; 23]), None);
    }

    #[test]
    fn fenced_responses_echo_the_fence() {
        let req = CtrlHeader {
            ty: ty::RESOURCE_FLUSH,
            flags: FLAG_FENCE,
            fence_id: 77,
            ctx_id: 5,
            ring_idx: 0,
        };
        let out = encode_response(Some(&req), &Err(ErrorCode::InvalidParameter));
        let got = CtrlHeader::parse(&out).unwrap();
        assert_eq!(got.ty, ty::RESP_ERR_INVALID_PARAMETER);
        assert_eq!((got.flags, got.fence_id, got.ctx_id), (FLAG_FENCE, 77, 5));
        let plain = encode_response(None, &Ok(Response::OkNoData));
        assert_eq!(plain.len(), HDR_LEN);
        assert_eq!(CtrlHeader::parse(&plain).unwrap().flags, 0);
    }
}

//! vfio-user wire format (QEMU `docs/interop/vfio-user.rst`, `hw/vfio-user/protocol.h`).
//!
//! Every message starts with a 16-byte header; all fields are little-endian:
//!
//! ```text
//!  0      2        4              8              12             16
//!  +------+--------+--------------+--------------+--------------+
//!  | id   | command| message size | flags        | error (errno)|
//!  +------+--------+--------------+--------------+--------------+
//!  flags: bits 0-3 type (0 command, 1 reply), bit 4 no-reply, bit 5 error
//! ```
//!
//! `message size` counts the header. Payload structs reuse the VFIO ioctl layouts (constants
//! come from `vfio-bindings`); they are declared here with explicit little-endian fields and
//! zerocopy derives, so parsing is a bounds-checked copy, never a pointer cast.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Header size.
pub const HEADER_SIZE: usize = 16;

/// Command numbers.
pub mod cmd {
    /// Version and capability negotiation.
    pub const VERSION: u16 = 1;
    /// Add a DMA region (guest memory), with or without an fd.
    pub const DMA_MAP: u16 = 2;
    /// Remove DMA regions.
    pub const DMA_UNMAP: u16 = 3;
    /// Device flags and region/IRQ counts.
    pub const DEVICE_GET_INFO: u16 = 4;
    /// One region's size, flags, capabilities and fd.
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    /// ioeventfd/ioregionfd descriptors (not supported).
    pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
    /// One IRQ index's flags and count.
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    /// Assign, trigger, mask or de-assign IRQ eventfds.
    pub const DEVICE_SET_IRQS: u16 = 8;
    /// Read from a region.
    pub const REGION_READ: u16 = 9;
    /// Write to a region.
    pub const REGION_WRITE: u16 = 10;
    /// Server-to-client DMA read (never received by a server).
    pub const DMA_READ: u16 = 11;
    /// Server-to-client DMA write (never received by a server).
    pub const DMA_WRITE: u16 = 12;
    /// Device reset.
    pub const DEVICE_RESET: u16 = 13;
    /// Several region writes in one message (QEMU's extension).
    pub const REGION_WRITE_MULTI: u16 = 15;

    /// A name for logs.
    pub fn name(command: u16) -> &'static str {
        match command {
            VERSION => "VERSION",
            DMA_MAP => "DMA_MAP",
            DMA_UNMAP => "DMA_UNMAP",
            DEVICE_GET_INFO => "DEVICE_GET_INFO",
            DEVICE_GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
            DEVICE_GET_REGION_IO_FDS => "DEVICE_GET_REGION_IO_FDS",
            DEVICE_GET_IRQ_INFO => "DEVICE_GET_IRQ_INFO",
            DEVICE_SET_IRQS => "DEVICE_SET_IRQS",
            REGION_READ => "REGION_READ",
            REGION_WRITE => "REGION_WRITE",
            DMA_READ => "DMA_READ",
            DMA_WRITE => "DMA_WRITE",
            DEVICE_RESET => "DEVICE_RESET",
            REGION_WRITE_MULTI => "REGION_WRITE_MULTI",
            _ => "unknown",
        }
    }
}

/// Header flag bits.
pub mod flags {
    /// Mask of the message type.
    pub const TYPE_MASK: u32 = 0xf;
    /// Type: command.
    pub const TYPE_COMMAND: u32 = 0;
    /// Type: reply.
    pub const TYPE_REPLY: u32 = 1;
    /// The sender wants no reply.
    pub const NO_REPLY: u32 = 1 << 4;
    /// The reply reports an error in the `error` field.
    pub const ERROR: u32 = 1 << 5;
}

/// Message header.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Header {
    /// Message ID, echoed in the reply.
    pub id: U16,
    /// Command.
    pub command: U16,
    /// Total size including this header.
    pub size: U32,
    /// Type and flags.
    pub flags: U32,
    /// errno in error replies.
    pub error: U32,
}

impl Header {
    /// A reply header to `req` carrying `payload_len` bytes.
    pub fn reply_to(req: &Header, payload_len: usize) -> Header {
        Header {
            id: req.id,
            command: req.command,
            size: U32::new((HEADER_SIZE + payload_len) as u32),
            flags: U32::new(flags::TYPE_REPLY),
            error: U32::new(0),
        }
    }

    /// An error reply to `req`. `errno` must be non-zero: QEMU reads 0 as success.
    pub fn error_reply(req: &Header, errno: i32) -> Header {
        Header {
            id: req.id,
            command: req.command,
            size: U32::new(HEADER_SIZE as u32),
            flags: U32::new(flags::TYPE_REPLY | flags::ERROR),
            error: U32::new(errno.max(1) as u32),
        }
    }
}

/// VERSION payload head (a NUL-terminated JSON string follows).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Version {
    /// Major version (0).
    pub major: U16,
    /// Minor version.
    pub minor: U16,
}

/// DMA_MAP payload (`struct vfio_user_dma_map`).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DmaMap {
    /// Size of this struct.
    pub argsz: U32,
    /// READ / WRITE.
    pub flags: U32,
    /// Offset into the fd.
    pub offset: U64,
    /// Guest (IOVA) address.
    pub addr: U64,
    /// Length.
    pub size: U64,
}

/// DMA_UNMAP payload (`struct vfio_user_dma_unmap`, without a bitmap).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DmaUnmap {
    /// Size of this struct.
    pub argsz: U32,
    /// GET_DIRTY_BITMAP (bit 0), ALL (bit 1).
    pub flags: U32,
    /// Guest address.
    pub addr: U64,
    /// Length.
    pub size: U64,
}

/// DEVICE_GET_INFO payload (`struct vfio_device_info` without capabilities).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DeviceInfo {
    /// Size of the client's buffer / of the reply.
    pub argsz: U32,
    /// VFIO_DEVICE_FLAGS_*.
    pub flags: U32,
    /// Region indexes.
    pub num_regions: U32,
    /// IRQ indexes.
    pub num_irqs: U32,
}

/// DEVICE_GET_REGION_INFO payload (`struct vfio_region_info`); capabilities follow.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RegionInfo {
    /// Size of the client's buffer; in the reply, the size needed with capabilities.
    pub argsz: U32,
    /// VFIO_REGION_INFO_FLAG_*.
    pub flags: U32,
    /// Region index.
    pub index: U32,
    /// Offset of the first capability from the start of this struct (0: none).
    pub cap_offset: U32,
    /// Region size.
    pub size: U64,
    /// Offset into the region fd at which the region can be mmapped.
    pub offset: U64,
}

/// Sparse-mmap capability head (`struct vfio_region_info_cap_sparse_mmap`); areas follow.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SparseMmapCap {
    /// VFIO_REGION_INFO_CAP_SPARSE_MMAP.
    pub id: U16,
    /// Capability version (1).
    pub version: U16,
    /// Offset of the next capability (0: last).
    pub next: U32,
    /// Number of areas.
    pub nr_areas: U32,
    /// Reserved.
    pub reserved: U32,
}

/// One sparse-mmap area.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SparseMmapArea {
    /// Offset in the region.
    pub offset: U64,
    /// Length.
    pub size: U64,
}

/// DEVICE_GET_IRQ_INFO payload (`struct vfio_irq_info`).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct IrqInfo {
    /// Size of this struct.
    pub argsz: U32,
    /// VFIO_IRQ_INFO_*.
    pub flags: U32,
    /// IRQ index.
    pub index: U32,
    /// Vectors.
    pub count: U32,
}

/// DEVICE_SET_IRQS payload head (`struct vfio_irq_set`); bools follow for DATA_BOOL.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct IrqSet {
    /// Size of the struct and data (may be 20 with eventfds passed as fds).
    pub argsz: U32,
    /// VFIO_IRQ_SET_DATA_* | VFIO_IRQ_SET_ACTION_*.
    pub flags: U32,
    /// IRQ index.
    pub index: U32,
    /// First vector.
    pub start: U32,
    /// Vectors.
    pub count: U32,
}

/// REGION_READ / REGION_WRITE payload head; data follows for writes and read replies.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RegionAccess {
    /// Offset in the region.
    pub offset: U64,
    /// Region index.
    pub region: U32,
    /// Bytes.
    pub count: U32,
}

/// Data bytes carried by one REGION_WRITE_MULTI entry.
pub const MULTI_DATA: usize = 8;
/// Most entries in one REGION_WRITE_MULTI.
pub const MULTI_MAX: usize = 200;

/// One REGION_WRITE_MULTI entry.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct WriteOne {
    /// Offset in the region.
    pub offset: U64,
    /// Region index.
    pub region: U32,
    /// Bytes used of `data` (1 to 8).
    pub count: U32,
    /// The data.
    pub data: [u8; MULTI_DATA],
}

/// Reads a `T` from the start of `bytes`; `None` when too short.
pub fn read<T: FromBytes>(bytes: &[u8]) -> Option<T> {
    T::read_from_prefix(bytes).ok().map(|(v, _)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_protocol() {
        assert_eq!(size_of::<Header>(), HEADER_SIZE);
        assert_eq!(size_of::<DmaMap>(), 32);
        assert_eq!(size_of::<DmaUnmap>(), 24);
        assert_eq!(size_of::<DeviceInfo>(), 16);
        assert_eq!(size_of::<RegionInfo>(), 32);
        assert_eq!(size_of::<SparseMmapCap>(), 16);
        assert_eq!(size_of::<SparseMmapArea>(), 16);
        assert_eq!(size_of::<IrqInfo>(), 16);
        assert_eq!(size_of::<IrqSet>(), 20);
        assert_eq!(size_of::<RegionAccess>(), 16);
        assert_eq!(size_of::<WriteOne>(), 24);
    }

    #[test]
    fn error_replies_never_carry_errno_zero() {
        let req = Header {
            id: U16::new(7),
            command: U16::new(9),
            ..Header::default()
        };
        let e = Header::error_reply(&req, 0);
        assert_eq!((e.id.get(), e.command.get(), e.error.get()), (7, 9, 1));
        assert_eq!(e.flags.get(), flags::TYPE_REPLY | flags::ERROR);
        assert!(read::<Header>(&[0u8; 15]).is_none());
    }
}

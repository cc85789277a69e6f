//! The region layout: the control block, the record format and the size arithmetic.

use crate::sync::{AtomicU32, AtomicU64};
use crate::RingError;

/// The first eight bytes of an initialised region.
pub const MAGIC: [u8; 8] = *b"HWRING01";
/// The layout version this build writes and accepts.
pub const LAYOUT_VERSION: u32 = 1;
/// Required alignment of the region's start address (one cache line).
pub const REGION_ALIGN: usize = 64;
/// Smallest data-area capacity, in bytes.
pub const MIN_CAPACITY: usize = 32;
/// Largest data-area capacity, in bytes (2 GiB), so that record lengths fit in a `u32`.
pub const MAX_CAPACITY: usize = 1 << 31;
/// Size of a record header: `u32` payload length, `u32` marker.
pub const RECORD_HEADER_LEN: usize = 8;

/// Marker of a record header.
pub(crate) const MARKER_RECORD: u32 = 0x4857_5245;
/// Marker of a padding header: the rest of the data area up to its end is skipped.
pub(crate) const MARKER_PADDING: u32 = 0x4857_5044;

/// Bytes 0..64: the fields fixed at initialisation.
#[repr(C, align(64))]
pub(crate) struct Header {
    pub(crate) magic: AtomicU64,
    pub(crate) version: AtomicU32,
    pub(crate) reserved: AtomicU32,
    pub(crate) capacity: AtomicU64,
}

/// One value on a cache line of its own.
#[repr(C, align(64))]
pub(crate) struct CachePadded<T>(pub(crate) T);

/// Bytes 0..192 of the region.
#[repr(C)]
pub(crate) struct Control {
    pub(crate) header: Header,
    /// Written by the consumer only.
    pub(crate) head: CachePadded<AtomicU64>,
    /// Written by the producer only.
    pub(crate) tail: CachePadded<AtomicU64>,
    #[cfg(loom)]
    pub(crate) shadow: crate::sync::Shadow,
}

impl Control {
    pub(crate) fn new(capacity: u64) -> Control {
        Control {
            header: Header {
                magic: AtomicU64::new(0),
                version: AtomicU32::new(LAYOUT_VERSION),
                reserved: AtomicU32::new(0),
                capacity: AtomicU64::new(capacity),
            },
            head: CachePadded(AtomicU64::new(0)),
            tail: CachePadded(AtomicU64::new(0)),
            #[cfg(loom)]
            shadow: crate::sync::Shadow::new(capacity as usize),
        }
    }
}

/// Offset of the data area from the start of the region (192 in normal builds).
pub(crate) const DATA_OFFSET: usize = std::mem::size_of::<Control>();

// The documented layout, checked at compile time (loom's atomics are larger).
#[cfg(not(loom))]
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(offset_of!(Control, header) == 0);
    assert!(offset_of!(Header, magic) == 0);
    assert!(offset_of!(Header, version) == 8);
    assert!(offset_of!(Header, reserved) == 12);
    assert!(offset_of!(Header, capacity) == 16);
    assert!(offset_of!(Control, head) == 64);
    assert!(offset_of!(Control, tail) == 128);
    assert!(size_of::<Control>() == 192);
    assert!(align_of::<Control>() == REGION_ALIGN);
};

/// Bytes a region must have for a ring of `capacity` data bytes: the 192-byte control block
/// plus the data area. (Saturates instead of overflowing for absurd capacities.)
pub fn required_size(capacity: usize) -> usize {
    DATA_OFFSET.saturating_add(capacity)
}

/// The largest payload a ring of `capacity` bytes accepts: `capacity / 2 - 8`.
///
/// Bounding a record's footprint by half the capacity guarantees that it fits in an empty ring
/// wherever the positions stand, padding included.
pub fn max_record_len(capacity: usize) -> usize {
    (capacity / 2).saturating_sub(RECORD_HEADER_LEN)
}

/// Bytes a record with a `len`-byte payload occupies in the data area: header plus payload
/// rounded up to a multiple of 8. (Saturates for absurd lengths.)
pub fn record_footprint(len: usize) -> usize {
    RECORD_HEADER_LEN.saturating_add(len.saturating_add(7) & !7)
}

pub(crate) fn check_capacity(capacity: usize) -> Result<(), RingError> {
    if capacity.is_power_of_two() && (MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
        Ok(())
    } else {
        Err(RingError::InvalidCapacity { capacity })
    }
}

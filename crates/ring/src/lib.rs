//! A lock-free single-producer/single-consumer ring of variable-length records over a
//! caller-provided memory region.
//!
//! The region may be a shared-memory segment mapped at different addresses in different
//! processes: it holds **offsets and positions only, never pointers**. One process (or thread)
//! holds the [`Producer`], another the [`Consumer`]; the types are `Send` but neither `Sync` nor
//! `Clone`, so the single-producer/single-consumer discipline is enforced by the type system
//! within a process (and by the caller's contract on [`attach_producer`] / [`attach_consumer`]
//! across processes).
//!
//! # Layout
//!
//! The region starts 64-byte aligned and is [`required_size`]`(capacity)` bytes long. All
//! integers are native-endian (both sides share one host); the control words are atomics.
//!
//! ```text
//! offset  size  field                                        written by
//! 0       8     magic, b"HWRING01" as a little-endian u64   init (stored last, Release)
//! 8       4     layout version = 1                           init
//! 12      4     reserved = 0                                 init
//! 16      8     capacity of the data area in bytes (u64)     init
//! 24      40    padding to the cache line
//! 64      8     head: position of the next byte to read      consumer  (own cache line)
//! 128     8     tail: position one past the last published   producer  (own cache line)
//! 192     cap   data area
//! ```
//!
//! `head` and `tail` are monotonically increasing byte positions (wrapping at 2⁶⁴); the offset
//! of a position in the data area is `position & (capacity - 1)`. The capacity is a power of two
//! in [`MIN_CAPACITY`]`..=`[`MAX_CAPACITY`]. Invariants: `tail - head <= capacity`, and both are
//! multiples of 8.
//!
//! A record is an 8-byte header — `u32` payload length, `u32` marker — followed by the payload,
//! padded to a multiple of 8 ([`record_footprint`]). The marker is `0x4857_5245` for a record and
//! `0x4857_5044` for padding. A record never straddles the end of the data area: when it does not
//! fit before the end, the producer writes a padding header there (its length field counts the
//! padding bytes after the header) and places the record at offset 0, publishing both at once.
//! The largest payload is [`max_record_len`]`(capacity) = capacity / 2 - 8`, which guarantees that
//! any record that is refused as [`RingError::Full`] fits once the consumer has drained the ring.
//!
//! # Memory ordering
//!
//! * The producer writes the payload and header into free space, then stores `tail` with
//!   `Release`. The consumer loads `tail` with `Acquire`, so it sees the bytes before it sees the
//!   new tail.
//! * The consumer reads the record in place, then stores `head` with `Release`. The producer
//!   loads `head` with `Acquire` before it reuses the bytes, so the consumer's reads are finished.
//! * Each side caches the other side's index and reloads it only when the cached value says the
//!   ring is full (producer) or empty (consumer), so the two cache lines are not ping-ponged on
//!   every record.
//!
//! The peer may be a crashed or hostile process: every index and record header read from the
//! region is validated before use, and a violation surfaces as [`RingError::Corrupt`], never as
//! an out-of-bounds access, a panic or an endless loop.
//!
//! Under `--cfg loom` the atomics come from `loom`, and every access to the data area is shadowed
//! by a loom cell, so the loom models in `tests/loom.rs` check the protocol itself.
//!
//! # Example
//!
//! ```
//! use hivewire_ring::{heap_ring, RingError};
//!
//! let (mut producer, mut consumer) = heap_ring(1024)?;
//!
//! // Write in place, then publish.
//! let mut grant = producer.reserve(5)?;
//! grant.copy_from_slice(b"hello");
//! grant.commit();
//! producer.try_push(b"world")?;
//!
//! // Read in place; dropping the guard releases the space.
//! let record = consumer.read()?.expect("a record");
//! assert_eq!(&*record, b"hello");
//! drop(record);
//! let mut buf = Vec::new();
//! assert!(consumer.try_pop_into(&mut buf)?);
//! assert_eq!(buf, b"world");
//! assert!(consumer.is_empty());
//!
//! // Records larger than capacity / 2 - 8 are refused with a typed error.
//! assert!(matches!(producer.reserve(600), Err(RingError::RecordTooLarge { .. })));
//! # Ok::<(), RingError>(())
//! ```
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod consumer;
mod copy;
mod heap;
mod layout;
mod producer;
mod sync;

pub use consumer::{Consumer, ReadGuard};
pub use copy::{copy_streaming, copy_streaming_uninit, STREAMING_COPY_MIN};
pub use heap::heap_ring;
pub use layout::{
    max_record_len, record_footprint, required_size, LAYOUT_VERSION, MAGIC, MAX_CAPACITY, MIN_CAPACITY,
    RECORD_HEADER_LEN, REGION_ALIGN,
};
pub use producer::{Producer, WriteGrant};

use layout::{check_capacity, Control, DATA_OFFSET};
use std::ptr::NonNull;
use sync::{Arc, Ordering};

/// Everything that can go wrong with a ring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// There is not enough free space for the record right now; retry after the consumer has
    /// released records. A record within [`max_record_len`] always fits in an empty ring.
    #[error("ring is full")]
    Full,
    /// The record is larger than [`max_record_len`] for this ring's capacity.
    #[error("record of {len} bytes exceeds the maximum of {max} bytes")]
    RecordTooLarge {
        /// Requested payload length.
        len: usize,
        /// Largest payload this ring accepts.
        max: usize,
    },
    /// The requested capacity is not a power of two in `MIN_CAPACITY..=MAX_CAPACITY`.
    #[error("capacity {capacity} is not a power of two in {}..={}", MIN_CAPACITY, MAX_CAPACITY)]
    InvalidCapacity {
        /// The capacity asked for.
        capacity: usize,
    },
    /// The region is shorter than the layout requires.
    #[error("region of {len} bytes is too small: {required} bytes required")]
    TooSmall {
        /// Length of the region given.
        len: usize,
        /// Length the layout requires.
        required: usize,
    },
    /// The region pointer is null or not aligned to [`REGION_ALIGN`].
    #[error("region address {addr:#x} is null or not {} byte aligned", REGION_ALIGN)]
    Misaligned {
        /// The address given.
        addr: usize,
    },
    /// The region does not start with [`MAGIC`]: it is not an initialised ring.
    #[error("bad magic {found:#018x}: not a hivewire ring")]
    BadMagic {
        /// The first eight bytes of the region, as a little-endian `u64`.
        found: u64,
    },
    /// The region was initialised with a layout version this build does not understand.
    #[error("unsupported ring layout version {found} (this build supports {})", LAYOUT_VERSION)]
    UnsupportedVersion {
        /// The version found in the region.
        found: u32,
    },
    /// The region's control words or a record header violate the layout; the peer crashed
    /// mid-write or is hostile. The ring cannot be used further.
    #[error("ring region is corrupt: {0}")]
    Corrupt(&'static str),
}

/// What a producer and a consumer share: where the region is and its geometry.
pub(crate) struct Raw {
    ctrl: NonNull<Control>,
    data: NonNull<u8>,
    capacity: u64,
    /// Keeps a heap region alive; `None` for caller-provided regions.
    _owner: Option<Arc<heap::HeapRegion>>,
}

impl Raw {
    /// # Safety
    /// `ptr` must point to an initialised ring region of `capacity` data bytes (validated
    /// geometry) that stays valid for the lifetime of the returned value.
    unsafe fn new(ptr: NonNull<u8>, capacity: u64) -> Raw {
        // SAFETY: the caller guarantees the region is at least `DATA_OFFSET + capacity` bytes,
        // so the data area start is in bounds (and non-null, being derived from a non-null
        // in-bounds pointer).
        let data = unsafe { ptr.add(DATA_OFFSET) };
        Raw { ctrl: ptr.cast(), data, capacity, _owner: None }
    }

    fn ctrl(&self) -> &Control {
        // SAFETY: `Raw` is only built (by `init`, the attach functions or `heap_ring`) over a
        // valid, aligned region holding an initialised `Control`, which the caller's contract
        // (or `owner`) keeps alive as long as `self`. Every field of `Control` is an atomic, so
        // shared references are sound even while the peer writes.
        unsafe { self.ctrl.as_ref() }
    }

    fn mask(&self) -> u64 {
        self.capacity - 1
    }

    fn max_record_len(&self) -> usize {
        // `capacity` was validated to be at most MAX_CAPACITY, which fits in usize.
        max_record_len(self.capacity as usize)
    }

    /// Reads the record header at `offset` (a multiple of 8, at most `capacity - 8`) once, with
    /// volatile loads, so a peer changing it cannot make a validated value change under us.
    fn read_header(&self, offset: usize) -> (u32, u32) {
        debug_assert!(offset.is_multiple_of(8) && offset + RECORD_HEADER_LEN <= self.capacity as usize);
        #[cfg(loom)]
        self.ctrl().shadow.read(offset, RECORD_HEADER_LEN);
        // SAFETY: `offset + 8 <= capacity` (callers derive `offset` by masking a position and
        // both are multiples of 8), so both loads are inside the data area and 4-byte aligned
        // (the data area is 64-byte aligned). Volatile: the bytes live in memory shared with
        // another process.
        unsafe {
            let p = self.data.as_ptr().add(offset);
            let len = p.cast::<u32>().read_volatile();
            let marker = p.add(4).cast::<u32>().read_volatile();
            (len, marker)
        }
    }
}

/// Checks what can be checked about a region before reading it.
fn check_region(ptr: *mut u8, len: usize, required: usize) -> Result<NonNull<u8>, RingError> {
    let addr = ptr as usize;
    let Some(ptr) = NonNull::new(ptr) else {
        return Err(RingError::Misaligned { addr });
    };
    if !addr.is_multiple_of(REGION_ALIGN) {
        return Err(RingError::Misaligned { addr });
    }
    if len < required {
        return Err(RingError::TooSmall { len, required });
    }
    Ok(ptr)
}

/// Checks that `head` and `tail` positions satisfy the layout's invariants.
fn check_positions(head: u64, tail: u64, capacity: u64) -> Result<(), RingError> {
    if !head.is_multiple_of(8) || !tail.is_multiple_of(8) {
        return Err(RingError::Corrupt("head or tail is not 8-byte aligned"));
    }
    if tail.wrapping_sub(head) > capacity {
        return Err(RingError::Corrupt("tail is behind head or beyond head + capacity"));
    }
    Ok(())
}

/// Initialises a ring of `capacity` data bytes in the region at `ptr` and returns its producer
/// and consumer.
///
/// Either handle may be dropped (dropping has no effect on the region) and the other side
/// attached elsewhere with [`attach_producer`] / [`attach_consumer`], e.g. from another
/// process that maps the same shared-memory segment.
///
/// # Errors
///
/// [`RingError::InvalidCapacity`] unless `capacity` is a power of two in
/// [`MIN_CAPACITY`]`..=`[`MAX_CAPACITY`]; [`RingError::Misaligned`] if `ptr` is null or not
/// [`REGION_ALIGN`]-aligned; [`RingError::TooSmall`] if `len < required_size(capacity)`.
///
/// # Safety
///
/// * `ptr` must be valid for reads and writes of `len` bytes for as long as any handle to the
///   ring (the ones returned, and any later attached) is alive.
/// * Nothing else may access the region while `init` runs; afterwards it may be accessed only
///   through this crate's handles, with at most one producer and one consumer at a time.
pub unsafe fn init(ptr: *mut u8, len: usize, capacity: usize) -> Result<(Producer, Consumer), RingError> {
    check_capacity(capacity)?;
    let ptr = check_region(ptr, len, required_size(capacity))?;
    let ctrl = ptr.cast::<Control>();
    // SAFETY: `ptr` is non-null and 64-byte aligned (checked; `Control` has alignment 64), the
    // region is at least `size_of::<Control>()` bytes (checked against `required_size`) and is
    // valid for writes and not accessed by anyone else during `init` (caller's contract).
    unsafe { ctrl.as_ptr().write(Control::new(capacity as u64)) };
    // SAFETY: just initialised above; see `Raw::ctrl` for why a shared reference is sound.
    let control = unsafe { ctrl.as_ref() };
    // Publish: an attacher that loads the magic with Acquire sees the fields written above.
    control.header.magic.store(u64::from_le_bytes(MAGIC), Ordering::Release);
    let cap = capacity as u64;
    // SAFETY: the region holds an initialised `Control` and `capacity` data bytes (checked), and
    // the caller keeps it valid while the handles live.
    let (p, c) = unsafe { (Raw::new(ptr, cap), Raw::new(ptr, cap)) };
    Ok((Producer::new(p, 0, 0), Consumer::new(c, 0, 0)))
}

/// Validates an initialised region and returns its geometry and current positions.
///
/// # Safety
/// As for [`attach_producer`].
unsafe fn attach(ptr: *mut u8, len: usize) -> Result<(Raw, u64, u64), RingError> {
    let ptr = check_region(ptr, len, DATA_OFFSET)?;
    // SAFETY: `ptr` is non-null and 64-byte aligned (checked), valid for reads of `len >=
    // size_of::<Control>()` bytes (checked; validity is the caller's contract). In normal builds
    // every field of `Control` is an atomic integer, valid for any bit pattern, so viewing
    // arbitrary bytes through it is sound and nothing below trusts a value before checking it.
    // (Under `cfg(loom)` only initialised regions may be attached.)
    let control = unsafe { ptr.cast::<Control>().as_ref() };
    let header = &control.header;
    let magic = header.magic.load(Ordering::Acquire);
    if magic != u64::from_le_bytes(MAGIC) {
        return Err(RingError::BadMagic { found: magic });
    }
    let version = header.version.load(Ordering::Relaxed);
    if version != LAYOUT_VERSION {
        return Err(RingError::UnsupportedVersion { found: version });
    }
    let capacity = header.capacity.load(Ordering::Relaxed);
    let cap_usize =
        usize::try_from(capacity).map_err(|_| RingError::Corrupt("capacity out of range")).and_then(|c| {
            check_capacity(c).map_err(|_| RingError::Corrupt("capacity out of range"))?;
            Ok(c)
        })?;
    let required = required_size(cap_usize);
    if len < required {
        return Err(RingError::TooSmall { len, required });
    }
    let head = control.head.0.load(Ordering::Acquire);
    let tail = control.tail.0.load(Ordering::Acquire);
    check_positions(head, tail, capacity)?;
    // SAFETY: the region holds a validated `Control` and `capacity` data bytes (checked), and
    // the caller keeps it valid while the handle lives.
    let raw = unsafe { Raw::new(ptr, capacity) };
    Ok((raw, head, tail))
}

/// Attaches a producer to a ring that [`init`] initialised in the region at `ptr`.
///
/// # Errors
///
/// [`RingError::Misaligned`], [`RingError::TooSmall`], [`RingError::BadMagic`],
/// [`RingError::UnsupportedVersion`] or [`RingError::Corrupt`] when the region is not a valid
/// ring; its contents are never trusted before they are checked.
///
/// # Safety
///
/// * `ptr` must be valid for reads and writes of `len` bytes for as long as the handle lives.
/// * No other producer may be attached to the ring while this one lives, and the region may be
///   accessed only through this crate's handles.
pub unsafe fn attach_producer(ptr: *mut u8, len: usize) -> Result<Producer, RingError> {
    // SAFETY: forwarded caller contract.
    let (raw, head, tail) = unsafe { attach(ptr, len)? };
    Ok(Producer::new(raw, tail, head))
}

/// Attaches a consumer to a ring that [`init`] initialised in the region at `ptr`.
///
/// # Errors
///
/// As for [`attach_producer`].
///
/// # Safety
///
/// * `ptr` must be valid for reads and writes of `len` bytes for as long as the handle lives.
/// * No other consumer may be attached to the ring while this one lives, and the region may be
///   accessed only through this crate's handles.
pub unsafe fn attach_consumer(ptr: *mut u8, len: usize) -> Result<Consumer, RingError> {
    // SAFETY: forwarded caller contract.
    let (raw, head, tail) = unsafe { attach(ptr, len)? };
    Ok(Consumer::new(raw, head, tail))
}

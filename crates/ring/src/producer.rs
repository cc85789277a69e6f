//! The writing side.

use crate::layout::{record_footprint, MARKER_PADDING, MARKER_RECORD, RECORD_HEADER_LEN};
use crate::sync::Ordering;
use crate::{check_positions, Raw, RingError};
use std::ops::{Deref, DerefMut};

/// The writing side of a ring. `Send`, not `Sync`, not `Clone`: one producer per ring.
///
/// ```compile_fail
/// fn shared<T: Sync>() {}
/// shared::<hivewire_ring::Producer>();
/// ```
///
/// ```compile_fail
/// fn cloned<T: Clone>() {}
/// cloned::<hivewire_ring::Producer>();
/// ```
pub struct Producer {
    raw: Raw,
    /// Our own tail position; the region's copy is only ever written by us.
    tail: u64,
    /// Last head position loaded from the region; reloaded only when the ring looks full.
    cached_head: u64,
}

// SAFETY: a `Producer` owns the producer role of the ring; the region is valid for as long as it
// lives (constructor contracts, or the `Arc` owner for heap rings) and is accessed only through
// atomics and the producer-owned free space, so moving it to another thread is sound. It is
// deliberately not `Sync`: two threads producing at once would break the SPSC protocol.
unsafe impl Send for Producer {}

impl Producer {
    pub(crate) fn new(raw: Raw, tail: u64, head: u64) -> Producer {
        Producer { raw, tail, cached_head: head }
    }

    /// Makes the handle keep a heap region alive.
    pub(crate) fn set_owner(&mut self, owner: crate::sync::Arc<crate::heap::HeapRegion>) {
        self.raw._owner = Some(owner);
    }

    /// Capacity of the data area in bytes.
    pub fn capacity(&self) -> usize {
        self.raw.capacity as usize
    }

    /// The largest payload [`reserve`](Self::reserve) accepts ([`crate::max_record_len`]).
    pub fn max_record_len(&self) -> usize {
        self.raw.max_record_len()
    }

    /// Free bytes in the data area right now (0 if the consumer has corrupted the head).
    ///
    /// A record needs [`crate::record_footprint`] bytes, plus the bytes left before the end of
    /// the data area when it does not fit there, so a record may be refused as
    /// [`RingError::Full`] even when its footprint is below `free_space()`.
    pub fn free_space(&self) -> usize {
        let head = self.raw.ctrl().head.0.load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(head);
        self.raw.capacity.saturating_sub(used) as usize
    }

    /// Reloads the consumer's head and validates it.
    fn refresh_head(&mut self) -> Result<(), RingError> {
        let head = self.raw.ctrl().head.0.load(Ordering::Acquire);
        check_positions(head, self.tail, self.raw.capacity)?;
        self.cached_head = head;
        Ok(())
    }

    /// Reserves space for a record of exactly `len` payload bytes and lends it for writing in
    /// place. Nothing is visible to the consumer until [`WriteGrant::commit`]; dropping the
    /// grant without committing publishes nothing.
    ///
    /// # Errors
    ///
    /// [`RingError::RecordTooLarge`] if `len > max_record_len()`; [`RingError::Full`] if the
    /// record does not fit now (retry later); [`RingError::Corrupt`] if the head position in the
    /// region is invalid.
    pub fn reserve(&mut self, len: usize) -> Result<WriteGrant<'_>, RingError> {
        let max = self.max_record_len();
        if len > max {
            return Err(RingError::RecordTooLarge { len, max });
        }
        let capacity = self.raw.capacity;
        let footprint = record_footprint(len) as u64;
        let offset = self.tail & self.raw.mask();
        let room_to_end = capacity - offset;
        // A record never straddles the end: pad to the end and start again at offset 0.
        let (pad, record_offset) = if footprint <= room_to_end { (0, offset) } else { (room_to_end, 0) };
        let needed = pad + footprint;
        if self.tail.wrapping_sub(self.cached_head) + needed > capacity {
            self.refresh_head()?;
            if self.tail.wrapping_sub(self.cached_head) + needed > capacity {
                return Err(RingError::Full);
            }
        }
        #[cfg(loom)]
        {
            let shadow = &self.raw.ctrl().shadow;
            if pad > 0 {
                shadow.write(offset as usize, RECORD_HEADER_LEN);
            }
            shadow.write(record_offset as usize, footprint as usize);
        }
        Ok(WriteGrant { producer: self, pad, offset: record_offset as usize, len })
    }

    /// Copies `payload` into the ring as one record.
    ///
    /// # Errors
    ///
    /// As for [`reserve`](Self::reserve); on error nothing is written.
    pub fn try_push(&mut self, payload: &[u8]) -> Result<(), RingError> {
        let mut grant = self.reserve(payload.len())?;
        grant.copy_from_slice(payload);
        grant.commit();
        Ok(())
    }

    /// Writes a record header at `offset` (a multiple of 8, at most `capacity - 8`).
    fn write_header(&mut self, offset: usize, len: u32, marker: u32) {
        debug_assert!(offset.is_multiple_of(8) && offset + RECORD_HEADER_LEN <= self.capacity());
        // SAFETY: `offset + 8 <= capacity`, so both stores are inside the data area and 4-byte
        // aligned (the data area is 64-byte aligned, `offset` a multiple of 8). The bytes are in
        // free space, between tail and head + capacity, which only the producer may write and
        // which the consumer does not read until the tail is published.
        unsafe {
            let p = self.raw.data.as_ptr().add(offset);
            p.cast::<u32>().write_volatile(len);
            p.add(4).cast::<u32>().write_volatile(marker);
        }
    }
}

/// Space for one record, lent in place by [`Producer::reserve`]; derefs to exactly the
/// requested number of bytes. [`commit`](Self::commit) publishes it; dropping it does not.
pub struct WriteGrant<'a> {
    producer: &'a mut Producer,
    /// Padding bytes before the record (non-zero when the record wraps to offset 0).
    pad: u64,
    /// Offset of the record header in the data area.
    offset: usize,
    /// Payload length.
    len: usize,
}

impl WriteGrant<'_> {
    /// Publishes the record: writes its header (and the padding header, if the record wrapped)
    /// and stores the new tail with `Release`.
    pub fn commit(self) {
        let producer = self.producer;
        let capacity = producer.capacity();
        if self.pad > 0 {
            let pad_offset = capacity - self.pad as usize;
            producer.write_header(pad_offset, (self.pad as usize - RECORD_HEADER_LEN) as u32, MARKER_PADDING);
        }
        // `len <= max_record_len < 2^30`, so it fits in a u32.
        producer.write_header(self.offset, self.len as u32, MARKER_RECORD);
        producer.tail = producer.tail.wrapping_add(self.pad + record_footprint(self.len) as u64);
        producer.raw.ctrl().tail.0.store(producer.tail, Ordering::Release);
    }
}

impl Deref for WriteGrant<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `offset + 8 + len <= capacity` (reserve placed the record so that it does not
        // straddle the end), so the range is inside the data area. It is free space reserved for
        // this grant, which borrows the producer mutably, so no other reference into it exists.
        unsafe {
            std::slice::from_raw_parts(
                self.producer.raw.data.as_ptr().add(self.offset + RECORD_HEADER_LEN),
                self.len,
            )
        }
    }
}

impl DerefMut for WriteGrant<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference into the range, and
        // the consumer does not read free space before the tail is published.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.producer.raw.data.as_ptr().add(self.offset + RECORD_HEADER_LEN),
                self.len,
            )
        }
    }
}

impl std::fmt::Debug for WriteGrant<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteGrant").field("offset", &self.offset).field("len", &self.len).finish()
    }
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.raw.capacity)
            .field("tail", &self.tail)
            .field("cached_head", &self.cached_head)
            .finish()
    }
}

//! The reading side.

use crate::layout::{record_footprint, MARKER_PADDING, MARKER_RECORD, RECORD_HEADER_LEN};
use crate::sync::Ordering;
use crate::{check_positions, Raw, RingError};
use std::ops::Deref;

/// The reading side of a ring. `Send`, not `Sync`, not `Clone`: one consumer per ring.
///
/// ```compile_fail
/// fn shared<T: Sync>() {}
/// shared::<hivewire_ring::Consumer>();
/// ```
///
/// ```compile_fail
/// fn cloned<T: Clone>() {}
/// cloned::<hivewire_ring::Consumer>();
/// ```
pub struct Consumer {
    raw: Raw,
    /// Our own head position; the region's copy is only ever written by us.
    head: u64,
    /// Last tail position loaded from the region; reloaded only when the ring looks empty.
    cached_tail: u64,
}

// SAFETY: a `Consumer` owns the consumer role of the ring; the region is valid for as long as it
// lives (constructor contracts, or the `Arc` owner for heap rings) and is accessed only through
// atomics and published records, so moving it to another thread is sound. It is deliberately
// not `Sync`: two threads consuming at once would break the SPSC protocol.
unsafe impl Send for Consumer {}

impl Consumer {
    pub(crate) fn new(raw: Raw, head: u64, tail: u64) -> Consumer {
        Consumer { raw, head, cached_tail: tail }
    }

    /// Makes the handle keep a heap region alive.
    pub(crate) fn set_owner(&mut self, owner: crate::sync::Arc<crate::heap::HeapRegion>) {
        self.raw._owner = Some(owner);
    }

    /// Capacity of the data area in bytes.
    pub fn capacity(&self) -> usize {
        self.raw.capacity as usize
    }

    /// Whether no record is published right now.
    pub fn is_empty(&self) -> bool {
        self.raw.ctrl().tail.0.load(Ordering::Acquire) == self.head
    }

    /// Published bytes not yet released, reloading the tail if the cached one says none.
    fn available(&mut self) -> Result<u64, RingError> {
        if self.cached_tail == self.head {
            let tail = self.raw.ctrl().tail.0.load(Ordering::Acquire);
            check_positions(self.head, tail, self.raw.capacity)?;
            self.cached_tail = tail;
        }
        Ok(self.cached_tail.wrapping_sub(self.head))
    }

    /// Moves the head forward by `n` bytes and publishes it with `Release`.
    fn advance(&mut self, n: u64) {
        self.head = self.head.wrapping_add(n);
        self.raw.ctrl().head.0.store(self.head, Ordering::Release);
    }

    /// Lends the next record in place, or `Ok(None)` if the ring is empty. Dropping the guard
    /// (or calling [`ReadGuard::release`]) frees its space for the producer.
    ///
    /// # Errors
    ///
    /// [`RingError::Corrupt`] if the tail position or the record header in the region violates
    /// the layout (bad marker, length beyond the maximum or the published bytes). The error
    /// repeats on every later call: the ring cannot be used further.
    pub fn read(&mut self) -> Result<Option<ReadGuard<'_>>, RingError> {
        let capacity = self.raw.capacity;
        // At most two rounds: after a padding header the head is at offset 0, where padding is
        // invalid.
        loop {
            let available = self.available()?;
            if available == 0 {
                return Ok(None);
            }
            let offset = self.head & self.raw.mask();
            let (len, marker) = self.raw.read_header(offset as usize);
            let room_to_end = capacity - offset;
            match marker {
                MARKER_PADDING => {
                    if offset == 0 || u64::from(len) + RECORD_HEADER_LEN as u64 != room_to_end {
                        return Err(RingError::Corrupt("padding header with a bad length"));
                    }
                    if room_to_end > available {
                        return Err(RingError::Corrupt("padding beyond the published tail"));
                    }
                    self.advance(room_to_end);
                }
                MARKER_RECORD => {
                    let len = len as usize;
                    if len > self.raw.max_record_len() {
                        return Err(RingError::Corrupt("record length beyond the maximum"));
                    }
                    let footprint = record_footprint(len) as u64;
                    if footprint > room_to_end {
                        return Err(RingError::Corrupt("record straddles the end of the ring"));
                    }
                    if footprint > available {
                        return Err(RingError::Corrupt("record beyond the published tail"));
                    }
                    #[cfg(loom)]
                    self.raw.ctrl().shadow.read(offset as usize, footprint as usize);
                    return Ok(Some(ReadGuard { consumer: self, offset: offset as usize, len, footprint }));
                }
                _ => return Err(RingError::Corrupt("bad record marker")),
            }
        }
    }

    /// Pops the next record into `buf` (replacing its contents); `Ok(false)` if the ring is
    /// empty.
    ///
    /// # Errors
    ///
    /// As for [`read`](Self::read).
    pub fn try_pop_into(&mut self, buf: &mut Vec<u8>) -> Result<bool, RingError> {
        match self.read()? {
            Some(record) => {
                buf.clear();
                buf.extend_from_slice(&record);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// One record, lent in place by [`Consumer::read`]; derefs to its payload. Its space is
/// released (the head advanced with `Release`) when it is dropped.
///
/// The bytes are read from the shared region: they stay as written as long as the producer
/// follows the protocol (it never writes between head and tail). A hostile producer can change
/// them under the reader, but never make the ring read outside the region.
pub struct ReadGuard<'a> {
    consumer: &'a mut Consumer,
    /// Offset of the record header in the data area.
    offset: usize,
    /// Payload length.
    len: usize,
    /// Bytes to advance the head by on release.
    footprint: u64,
}

impl ReadGuard<'_> {
    /// Releases the record's space to the producer (the same as dropping the guard).
    pub fn release(self) {}
}

impl Deref for ReadGuard<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `read` checked `offset + footprint <= capacity` and `footprint >= 8 + len`, so
        // the range is inside the data area; it lies between head and the published tail, which
        // the producer does not write until the head passes it, and the data behind the tail
        // was made visible by the Acquire load of the tail.
        unsafe {
            std::slice::from_raw_parts(
                self.consumer.raw.data.as_ptr().add(self.offset + RECORD_HEADER_LEN),
                self.len,
            )
        }
    }
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.consumer.advance(self.footprint);
    }
}

impl std::fmt::Debug for ReadGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadGuard").field("offset", &self.offset).field("len", &self.len).finish()
    }
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &self.raw.capacity)
            .field("head", &self.head)
            .field("cached_tail", &self.cached_tail)
            .finish()
    }
}

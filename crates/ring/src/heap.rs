//! A ring over an owned heap allocation, for tests, benches and in-process use.

use crate::layout::{check_capacity, required_size, Control, REGION_ALIGN};
use crate::sync::Arc;
use crate::{Consumer, Producer, RingError};
use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::ptr::NonNull;

/// An initialised region on the heap, freed when the last handle drops.
pub(crate) struct HeapRegion {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: `HeapRegion` only owns the allocation; all access to its contents goes through the
// producer and consumer, which follow the ring protocol (atomics plus disjoint data ranges).
unsafe impl Send for HeapRegion {}
// SAFETY: as above; `&HeapRegion` gives no access to the contents at all.
unsafe impl Sync for HeapRegion {}

impl Drop for HeapRegion {
    fn drop(&mut self) {
        // SAFETY: the region holds a `Control` written by `init` (a `HeapRegion` is only built
        // after `init` succeeded), and this is the last reference to it, so dropping the control
        // block in place (a no-op outside loom) and then freeing the allocation with the layout
        // it was made with is sound.
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr().cast::<Control>());
            dealloc(self.ptr.as_ptr(), self.layout);
        }
    }
}

/// Creates a ring of `capacity` data bytes in a fresh 64-byte-aligned heap allocation and
/// returns its producer and consumer, which share ownership of the allocation.
///
/// # Errors
///
/// [`RingError::InvalidCapacity`] unless `capacity` is a power of two in
/// [`crate::MIN_CAPACITY`]`..=`[`crate::MAX_CAPACITY`].
pub fn heap_ring(capacity: usize) -> Result<(Producer, Consumer), RingError> {
    check_capacity(capacity)?;
    let size = required_size(capacity);
    let layout =
        Layout::from_size_align(size, REGION_ALIGN).map_err(|_| RingError::InvalidCapacity { capacity })?;
    // SAFETY: `layout` has a non-zero size (at least the control block).
    let ptr = unsafe { alloc_zeroed(layout) };
    let Some(ptr) = NonNull::new(ptr) else { handle_alloc_error(layout) };
    // SAFETY: the allocation is `size` bytes, 64-byte aligned, exclusively ours, and is kept
    // alive by the `Arc<HeapRegion>` stored in both handles below.
    let (mut producer, mut consumer) = match unsafe { crate::init(ptr.as_ptr(), size, capacity) } {
        Ok(handles) => handles,
        Err(e) => {
            // SAFETY: allocated above with `layout`; `init` failed, so no `Control` lives there
            // and no handle refers to it.
            unsafe { dealloc(ptr.as_ptr(), layout) };
            return Err(e);
        }
    };
    let region = Arc::new(HeapRegion { ptr, layout });
    producer.set_owner(Arc::clone(&region));
    consumer.set_owner(region);
    Ok((producer, consumer))
}

//! The synchronisation primitives the ring uses: `std`'s in normal builds, `loom`'s under
//! `--cfg loom`, so that the loom models in `tests/loom.rs` explore the real code.

#[cfg(loom)]
pub(crate) use loom::sync::{
    atomic::{AtomicU32, AtomicU64},
    Arc,
};
#[cfg(not(loom))]
pub(crate) use std::sync::{
    atomic::{AtomicU32, AtomicU64},
    Arc,
};

pub(crate) use std::sync::atomic::Ordering;

/// Under loom, one tracked cell per 8-byte word of the data area: the producer marks the words
/// it writes (`with_mut`), the consumer the words it reads (`with`). Loom then reports any access
/// to the data area that is not ordered by the head/tail protocol, which raw memory alone cannot
/// show it.
#[cfg(loom)]
pub(crate) struct Shadow(Box<[loom::cell::UnsafeCell<()>]>);

#[cfg(loom)]
impl Shadow {
    pub(crate) fn new(capacity: usize) -> Self {
        Shadow((0..capacity / 8).map(|_| loom::cell::UnsafeCell::new(())).collect())
    }

    fn words(offset: usize, len: usize) -> std::ops::Range<usize> {
        offset / 8..(offset + len).div_ceil(8)
    }

    pub(crate) fn write(&self, offset: usize, len: usize) {
        for w in Self::words(offset, len) {
            self.0[w].with_mut(|_| ());
        }
    }

    pub(crate) fn read(&self, offset: usize, len: usize) {
        for w in Self::words(offset, len) {
            self.0[w].with(|_| ());
        }
    }
}

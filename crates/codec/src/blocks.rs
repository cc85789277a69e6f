//! Receive blocks for large frames, recycled process-wide.
//!
//! A reader that slices payloads out of the bytes it read (no copy) hands every message a share
//! of the read's memory, so that memory lives as long as the application keeps the message.
//! For large frames that is one allocation per frame, released by whichever task drops the
//! message, usually after a queue has let the reader run some frames ahead. With glibc's
//! allocator that pattern (many blocks of 64 KiB – 1 MiB allocated by one thread, released
//! together by another) returns the heap's top to the kernel at every drain and faults the
//! memory in afresh for the next burst: measured on a 64 KiB WebSocket stream, 30,000 page
//! faults per 5,000 messages and a third of the receive time.
//!
//! This module keeps released blocks instead, up to [`POOL_BYTES`] in the whole process, and
//! hands them to the next large frame, so a steady stream of large messages does not reach the
//! allocator at all. Memory stays bounded: a block larger than [`MAX_BLOCK`] is never kept,
//! and a release that would take the pool past its bound frees the block.
//!
//! ```
//! let mut block = hivewire_codec::blocks::take(100_000);
//! block.extend_from_slice(&[7u8; 100_000]);
//! let frame = hivewire_codec::blocks::freeze(block);
//! let payload = frame.slice(8..);
//! drop(frame);
//! assert_eq!(payload.len(), 99_992); // the block goes back to the pool when `payload` drops
//! ```

use std::sync::Mutex;

use bytes::Bytes;

/// The most bytes of released blocks the process keeps for reuse.
pub const POOL_BYTES: usize = 8 * 1024 * 1024;
/// Blocks larger than this are returned to the allocator, never kept.
pub const MAX_BLOCK: usize = 1024 * 1024;
/// Frames shorter than this are not worth a block of their own (readers keep them in their
/// shared read buffer).
pub const MIN_BLOCK: usize = 16 * 1024;

/// A bounded pool of released blocks. The process has one ([`take`], [`freeze`]); tests make
/// their own.
struct Pool {
    inner: Mutex<Kept>,
    bound: usize,
}

struct Kept {
    blocks: Vec<Vec<u8>>,
    bytes: usize,
}

static POOL: Pool = Pool::new(POOL_BYTES);

/// An empty buffer with room for at least `len` bytes: a released block of a fitting size
/// (at least `len`, at most twice that) if the pool holds one, else a new allocation.
pub fn take(len: usize) -> Vec<u8> {
    POOL.take(len)
}

/// The bytes of `block` as a [`Bytes`]; once it and every slice of it are dropped, the block
/// goes back to the pool (or to the allocator when it is outside the pool's sizes or the pool
/// is full).
pub fn freeze(block: Vec<u8>) -> Bytes {
    POOL.freeze(block)
}

/// The bytes the pool keeps now.
pub fn pooled_bytes() -> usize {
    POOL.kept().bytes
}

fn poolable(cap: usize) -> bool {
    (MIN_BLOCK..=MAX_BLOCK).contains(&cap)
}

impl Pool {
    const fn new(bound: usize) -> Self {
        Pool { inner: Mutex::new(Kept { blocks: Vec::new(), bytes: 0 }), bound }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        // The pool holds plain buffers: a panic while it was locked cannot leave it
        // inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, len: usize) -> Vec<u8> {
        if poolable(len) {
            let mut k = self.kept();
            if let Some(i) = k.blocks.iter().rposition(|b| b.capacity() >= len && b.capacity() <= 2 * len) {
                let block = k.blocks.swap_remove(i);
                k.bytes -= block.capacity();
                return block;
            }
        }
        Vec::with_capacity(len)
    }

    fn freeze(&'static self, block: Vec<u8>) -> Bytes {
        if poolable(block.capacity()) {
            Bytes::from_owner(Block { block, pool: self })
        } else {
            Bytes::from(block)
        }
    }

    /// Keeps `block`'s memory if it fits the pool's sizes and bound.
    fn release(&self, mut block: Vec<u8>) {
        let cap = block.capacity();
        if !poolable(cap) {
            return;
        }
        block.clear();
        let mut k = self.kept();
        if k.bytes + cap <= self.bound {
            k.bytes += cap;
            k.blocks.push(block);
        }
    }
}

/// A frozen block: its memory returns to its pool on drop.
struct Block {
    block: Vec<u8>,
    pool: &'static Pool,
}

impl AsRef<[u8]> for Block {
    fn as_ref(&self) -> &[u8] {
        &self.block
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.pool.release(std::mem::take(&mut self.block));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(bound: usize) -> &'static Pool {
        Box::leak(Box::new(Pool::new(bound)))
    }

    fn filled(p: &'static Pool, len: usize) -> (Bytes, *const u8) {
        let mut b = p.take(len);
        b.resize(len, 7);
        let ptr = b.as_ptr();
        (p.freeze(b), ptr)
    }

    #[test]
    fn a_released_block_is_handed_out_again_once_every_slice_is_gone() {
        let p = pool(POOL_BYTES);
        let (bytes, ptr) = filled(p, 20_000);
        let tail = bytes.slice(10..);
        drop(bytes);
        assert_eq!(p.kept().bytes, 0, "a slice keeps the block in use");
        let fresh = p.take(20_000);
        assert_ne!(fresh.as_ptr(), ptr);
        drop(tail);
        assert!(p.kept().bytes >= 20_000);
        let again = p.take(20_000);
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), ptr, "the same memory is reused");
        assert_eq!(p.kept().bytes, 0);
    }

    #[test]
    fn sizes_outside_the_pool_are_never_kept() {
        let p = pool(POOL_BYTES);
        for len in [MIN_BLOCK - 1, MAX_BLOCK + 1] {
            let (bytes, _) = filled(p, len);
            drop(bytes);
            assert_eq!(p.kept().bytes, 0, "len {len} was kept");
        }
        let (bytes, _) = filled(p, MIN_BLOCK);
        drop(bytes);
        assert_eq!(p.kept().bytes, MIN_BLOCK, "the smallest pooled size is kept");
        let (bytes, _) = filled(p, MAX_BLOCK);
        drop(bytes);
        assert_eq!(p.kept().bytes, MIN_BLOCK + MAX_BLOCK, "the largest pooled size is kept");
    }

    #[test]
    fn a_block_much_larger_than_asked_is_not_handed_out() {
        let p = pool(POOL_BYTES);
        let (bytes, ptr) = filled(p, 700_000);
        drop(bytes);
        // 300 kB would waste more than half of a 700 kB block.
        let small = p.take(300_000);
        assert_ne!(small.as_ptr(), ptr);
        let fitting = p.take(350_000);
        assert_eq!(fitting.as_ptr(), ptr);
    }

    #[test]
    fn the_pool_keeps_up_to_its_bound_and_frees_the_rest() {
        let len = 100_000;
        let p = pool(3 * len);
        let held: Vec<Bytes> = (0..5).map(|_| filled(p, len).0).collect();
        for (i, b) in held.into_iter().enumerate() {
            drop(b);
            assert_eq!(p.kept().bytes, len * (i + 1).min(3));
        }
        assert_eq!(p.kept().blocks.len(), 3);
    }

    #[test]
    fn the_process_pool_serves_the_public_calls() {
        let mut b = take(MAX_BLOCK);
        b.resize(MAX_BLOCK, 1);
        let frame = freeze(b);
        assert_eq!(frame.len(), MAX_BLOCK);
        assert!(frame.iter().all(|&x| x == 1));
        drop(frame);
        assert!(pooled_bytes() <= POOL_BYTES);
    }
}

//! Copying a large payload into a record past the caches.
//!
//! A sender's copy of a multi-megabyte payload into a ring lands on memory the caches no longer
//! hold (a 32 MiB ring cycles through more than the caches keep). An ordinary copy first reads
//! every destination line into the cache (read-for-ownership), then evicts it again: on the
//! development machine a 10 MiB `memcpy` into successive places of a 32 MiB buffer moves
//! 7–11 GB/s, the same copy with non-temporal stores 21–26 GB/s. The consumer reads the record
//! from memory either way (it was evicted long before it is read).

/// Payloads at least this large are worth copying with [`copy_streaming`]: smaller ones are
/// likely read by the consumer while still in the caches, which non-temporal stores bypass.
pub const STREAMING_COPY_MIN: usize = 1 << 20;

/// Copies `src` into `dst` with non-temporal stores for the bulk of it where the target has
/// them (x86_64: SSE2 `movntdq`), followed by a store fence, so that every byte is ordered
/// before any later store — a [`WriteGrant::commit`](crate::WriteGrant::commit)'s `Release`
/// store of the tail included (non-temporal stores are not ordered by `Release` alone).
/// Elsewhere it is `copy_from_slice`.
///
/// # Panics
///
/// If the lengths differ, as `copy_from_slice` does.
pub fn copy_streaming(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_streaming: source and destination lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        let n = dst.len();
        // Up to the first 16-byte boundary of the destination, then whole 64-byte blocks
        // streamed, then the rest.
        let head = dst.as_ptr().align_offset(16).min(n);
        dst[..head].copy_from_slice(&src[..head]);
        let body = (n - head) / 64 * 64;
        // SAFETY: `head + body <= n`, so both ranges lie inside `dst` and `src`, which are
        // distinct (a `&mut` and a `&` slice cannot overlap); `dst + head` is 16-byte aligned
        // by the choice of `head` (when `head == n`, `body` is 0 and nothing is accessed).
        unsafe { stream(dst.as_mut_ptr().add(head), src.as_ptr().add(head), body) };
        dst[head + body..].copy_from_slice(&src[head + body..]);
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// [`copy_streaming`] into the spare capacity of a buffer: `dst` (as long as `src`) is written
/// whole, after which the caller may treat it as initialised (e.g. `set_len` over it).
///
/// # Panics
///
/// If the lengths differ.
pub fn copy_streaming_uninit(dst: &mut [std::mem::MaybeUninit<u8>], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_streaming: source and destination lengths differ");
    // SAFETY: `MaybeUninit<u8>` has the layout of `u8`; every byte of the slice is written by
    // `copy_streaming` before anything reads it (it only stores into `dst`), and `u8` has no
    // invalid bit patterns, so viewing the not yet written bytes as `u8` for writing is sound.
    let dst = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<u8>(), dst.len()) };
    copy_streaming(dst, src);
}

/// Streams `len` bytes (a multiple of 64) from `src` to `dst` with non-temporal stores, then
/// fences them.
///
/// # Safety
///
/// `dst` is 16-byte aligned and valid for `len` bytes of writes, `src` valid for `len` bytes
/// of reads, and the two ranges do not overlap.
#[cfg(target_arch = "x86_64")]
unsafe fn stream(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    debug_assert!(len.is_multiple_of(64));
    debug_assert!(len == 0 || (dst as usize).is_multiple_of(16));
    let mut i = 0;
    while i < len {
        // SAFETY: `i + 64 <= len`, so the four 16-byte loads and stores are inside the ranges
        // the caller vouches for; `dst + i` is 16-byte aligned (`dst` is, and `i` is a
        // multiple of 64), as `_mm_stream_si128` requires; SSE2 is part of x86_64.
        unsafe {
            let s = src.add(i).cast::<__m128i>();
            let d = dst.add(i).cast::<__m128i>();
            let (a, b) = (_mm_loadu_si128(s), _mm_loadu_si128(s.add(1)));
            let (c, e) = (_mm_loadu_si128(s.add(2)), _mm_loadu_si128(s.add(3)));
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
        }
        i += 64;
    }
    // SAFETY: `sfence` has no operands; SSE is part of x86_64. It orders the streamed stores
    // (weakly ordered) before every later store.
    unsafe { _mm_sfence() };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
    }

    /// Every length around the block size and every alignment of both sides: the bytes arrive
    /// exactly, and nothing around the destination is touched.
    #[test]
    fn copies_exactly_at_every_alignment_and_length_edge() {
        let src_buf = pattern(4096 + 64, 3);
        for len in [0, 1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 1000, 4095, 4096] {
            for s_off in [0, 1, 7, 8, 15, 16] {
                for d_off in [0, 1, 7, 8, 15, 16, 33] {
                    let mut dst_buf = vec![0xAAu8; len + 64];
                    let src = &src_buf[s_off..s_off + len];
                    copy_streaming(&mut dst_buf[d_off..d_off + len], src);
                    assert_eq!(&dst_buf[d_off..d_off + len], src, "len {len} s {s_off} d {d_off}");
                    assert!(dst_buf[..d_off].iter().all(|&b| b == 0xAA), "before the destination");
                    assert!(dst_buf[d_off + len..].iter().all(|&b| b == 0xAA), "after the destination");
                }
            }
        }
    }

    /// Into a buffer's spare capacity, as a receiver copies a record out.
    #[test]
    fn copies_into_spare_capacity() {
        let src = pattern(100_003, 9);
        let mut buf: Vec<u8> = Vec::with_capacity(src.len() + 5);
        buf.extend_from_slice(b"head:");
        copy_streaming_uninit(&mut buf.spare_capacity_mut()[..src.len()], &src);
        // SAFETY: the bytes after the first five were just written by `copy_streaming_uninit`.
        unsafe { buf.set_len(5 + src.len()) };
        assert_eq!(&buf[..5], b"head:");
        assert!(buf[5..] == src[..]);
    }

    #[test]
    #[should_panic(expected = "lengths differ")]
    fn refuses_different_lengths() {
        copy_streaming(&mut [0u8; 3], &[1u8; 4]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Arbitrary lengths (up to past `STREAMING_COPY_MIN`) and offsets against
        /// `copy_from_slice`.
        #[test]
        fn matches_copy_from_slice(
            len in 0usize..(STREAMING_COPY_MIN + 300),
            s_off in 0usize..64,
            d_off in 0usize..64,
            seed in proptest::prelude::any::<u8>(),
        ) {
            let src_buf = pattern(len + 64, seed);
            let src = &src_buf[s_off..s_off + len];
            let mut ours = vec![0x55u8; len + 64];
            let mut want = ours.clone();
            copy_streaming(&mut ours[d_off..d_off + len], src);
            want[d_off..d_off + len].copy_from_slice(src);
            proptest::prop_assert!(ours == want);
        }
    }
}

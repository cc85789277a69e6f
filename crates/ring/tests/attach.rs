//! Attach validation and corrupted-region handling: a region that is not a valid ring, or a
//! ring whose control words or record headers were damaged by a crashed or hostile peer, must
//! produce a typed error, never a panic, an out-of-bounds read or an endless loop.

use hivewire_ring::{
    attach_consumer, attach_producer, init, required_size, RingError, LAYOUT_VERSION, MAGIC, REGION_ALIGN,
};
use proptest::prelude::*;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::sync::atomic::{AtomicU64, Ordering};

/// Documented offsets (see the crate docs).
const VERSION_OFFSET: usize = 8;
const CAPACITY_OFFSET: usize = 16;
const HEAD_OFFSET: usize = 64;
const TAIL_OFFSET: usize = 128;
const DATA_OFFSET: usize = 192;

/// A zeroed, 64-byte-aligned region (with 64 spare bytes, for misalignment tests).
struct Region {
    ptr: *mut u8,
    layout: Layout,
    len: usize,
}

impl Region {
    fn new(len: usize) -> Region {
        let layout = Layout::from_size_align(len + REGION_ALIGN, REGION_ALIGN).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Region { ptr, layout, len }
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len + REGION_ALIGN);
        // SAFETY: in bounds (asserted); u8 has no alignment.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(offset), bytes.len()) }
    }

    fn store_u64(&self, offset: usize, value: u64) {
        assert!(offset.is_multiple_of(8) && offset + 8 <= self.len);
        // SAFETY: in bounds and 8-aligned (region is 64-aligned); the ring accesses these words
        // only atomically.
        unsafe { (*self.ptr.add(offset).cast::<AtomicU64>()).store(value, Ordering::SeqCst) }
    }

    fn consumer(&self) -> Result<hivewire_ring::Consumer, RingError> {
        // SAFETY: the region outlives every handle in these tests.
        unsafe { attach_consumer(self.ptr, self.len) }
    }

    fn producer(&self) -> Result<hivewire_ring::Producer, RingError> {
        // SAFETY: as above.
        unsafe { attach_producer(self.ptr, self.len) }
    }

    fn init(&self, capacity: usize) -> (hivewire_ring::Producer, hivewire_ring::Consumer) {
        // SAFETY: as above; nothing else touches the region during init.
        unsafe { init(self.ptr, self.len, capacity) }.expect("init")
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

fn fill_garbage(region: &Region, seed: u64) {
    let mut x = seed | 1;
    let bytes: Vec<u8> = (0..region.len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    region.write(0, &bytes);
}

#[test]
fn zeroed_region_has_bad_magic() {
    let region = Region::new(required_size(256));
    assert_eq!(region.consumer().unwrap_err(), RingError::BadMagic { found: 0 });
    assert_eq!(region.producer().unwrap_err(), RingError::BadMagic { found: 0 });
}

#[test]
fn garbage_region_is_rejected() {
    for seed in 1..50 {
        let region = Region::new(required_size(256));
        fill_garbage(&region, seed);
        assert!(matches!(region.consumer(), Err(RingError::BadMagic { .. })));
        assert!(matches!(region.producer(), Err(RingError::BadMagic { .. })));
    }
}

#[test]
fn wrong_magic_is_rejected() {
    let region = Region::new(required_size(256));
    drop(region.init(256));
    region.write(0, b"HWRING02");
    assert_eq!(
        region.consumer().unwrap_err(),
        RingError::BadMagic { found: u64::from_le_bytes(*b"HWRING02") }
    );
}

#[test]
fn wrong_version_is_rejected() {
    let region = Region::new(required_size(256));
    drop(region.init(256));
    region.write(VERSION_OFFSET, &(LAYOUT_VERSION + 1).to_ne_bytes());
    assert_eq!(region.producer().unwrap_err(), RingError::UnsupportedVersion { found: LAYOUT_VERSION + 1 });
}

#[test]
fn too_small_regions_are_rejected() {
    let region = Region::new(required_size(256));
    drop(region.init(256));
    // Shorter than the header.
    // SAFETY: the region outlives the (failed) handle.
    let err = unsafe { attach_consumer(region.ptr, 100) }.unwrap_err();
    assert_eq!(err, RingError::TooSmall { len: 100, required: DATA_OFFSET });
    // Header readable but the data area is cut short.
    let len = required_size(256) - 1;
    // SAFETY: as above.
    let err = unsafe { attach_producer(region.ptr, len) }.unwrap_err();
    assert_eq!(err, RingError::TooSmall { len, required: required_size(256) });
    // Init refuses a short region too.
    // SAFETY: as above.
    let err = unsafe { init(region.ptr, len, 256) }.unwrap_err();
    assert_eq!(err, RingError::TooSmall { len, required: required_size(256) });
}

#[test]
fn capacity_beyond_the_region_is_rejected() {
    let region = Region::new(required_size(256));
    drop(region.init(256));
    region.store_u64(CAPACITY_OFFSET, 512);
    assert_eq!(
        region.consumer().unwrap_err(),
        RingError::TooSmall { len: required_size(256), required: required_size(512) }
    );
    region.store_u64(CAPACITY_OFFSET, 100);
    assert!(matches!(region.consumer(), Err(RingError::Corrupt(_))));
    region.store_u64(CAPACITY_OFFSET, u64::MAX);
    assert!(matches!(region.producer(), Err(RingError::Corrupt(_))));
}

#[test]
fn misaligned_and_null_regions_are_rejected() {
    let region = Region::new(required_size(256));
    // SAFETY: in bounds (the region has 64 spare bytes).
    let shifted = unsafe { region.ptr.add(8) };
    // SAFETY: the region outlives the (failed) handles.
    unsafe {
        assert!(matches!(init(shifted, region.len, 256), Err(RingError::Misaligned { .. })));
        assert!(matches!(attach_consumer(shifted, region.len), Err(RingError::Misaligned { .. })));
        assert!(matches!(
            attach_producer(std::ptr::null_mut(), 4096),
            Err(RingError::Misaligned { addr: 0 })
        ));
    }
}

#[test]
fn invalid_capacities_are_rejected() {
    let region = Region::new(required_size(256));
    for capacity in [0, 16, 100, 255, 257] {
        // SAFETY: the region outlives the (failed) handles.
        let err = unsafe { init(region.ptr, region.len, capacity) }.unwrap_err();
        assert_eq!(err, RingError::InvalidCapacity { capacity });
    }
    assert!(hivewire_ring::heap_ring(1000).is_err());
}

#[test]
fn bad_positions_are_rejected() {
    let region = Region::new(required_size(256));
    drop(region.init(256));
    for (head, tail) in [(8, 0), (0, 264), (0, 4), (3, 8), (u64::MAX - 7, 256)] {
        region.store_u64(HEAD_OFFSET, head);
        region.store_u64(TAIL_OFFSET, tail);
        assert!(matches!(region.consumer(), Err(RingError::Corrupt(_))), "{head} {tail}");
        assert!(matches!(region.producer(), Err(RingError::Corrupt(_))), "{head} {tail}");
    }
    // Positions that wrapped past 2^64 are fine.
    region.store_u64(HEAD_OFFSET, u64::MAX - 7);
    region.store_u64(TAIL_OFFSET, 8);
    assert!(region.consumer().is_ok());
}

#[test]
fn reattached_handles_continue_the_stream() {
    let region = Region::new(required_size(128));
    let (mut p, c) = region.init(128);
    drop(c);
    p.try_push(b"one").unwrap();
    p.try_push(b"two").unwrap();
    drop(p);
    let mut c = region.consumer().unwrap();
    let mut p = region.producer().unwrap();
    let mut buf = Vec::new();
    assert!(c.try_pop_into(&mut buf).unwrap());
    assert_eq!(buf, b"one");
    p.try_push(b"three").unwrap();
    drop(c);
    let mut c = region.consumer().unwrap();
    for want in [&b"two"[..], b"three"] {
        assert!(c.try_pop_into(&mut buf).unwrap());
        assert_eq!(buf, want);
    }
    assert!(!c.try_pop_into(&mut buf).unwrap());
}

#[test]
fn corrupted_record_length_is_reported() {
    let region = Region::new(required_size(128));
    let (mut p, mut c) = region.init(128);
    p.try_push(b"hello").unwrap();
    // Length field of the first record: far beyond the ring.
    region.write(DATA_OFFSET, &1_000_000u32.to_ne_bytes());
    assert!(matches!(c.read(), Err(RingError::Corrupt(_))));
    // It stays corrupt (no progress, no panic).
    assert!(matches!(c.read(), Err(RingError::Corrupt(_))));
    // Within the maximum but beyond the published tail (16 bytes published; a 13-byte payload
    // needs 24).
    for len in [40u32, 13] {
        region.write(DATA_OFFSET, &len.to_ne_bytes());
        assert!(matches!(c.read(), Err(RingError::Corrupt(_))), "{len}");
    }
    // Restored, the record reads.
    region.write(DATA_OFFSET, &5u32.to_ne_bytes());
    assert_eq!(&*c.read().unwrap().unwrap(), b"hello");
}

#[test]
fn corrupted_marker_and_padding_are_reported() {
    let region = Region::new(required_size(128));
    let (mut p, mut c) = region.init(128);
    p.try_push(b"x").unwrap();
    region.write(DATA_OFFSET + 4, &0xDEAD_BEEFu32.to_ne_bytes());
    assert!(matches!(c.read(), Err(RingError::Corrupt(_))));
    // A padding marker at offset 0 is never valid.
    region.write(DATA_OFFSET, &(128u32 - 8).to_ne_bytes());
    region.write(DATA_OFFSET + 4, &0x4857_5044u32.to_ne_bytes());
    assert!(matches!(c.read(), Err(RingError::Corrupt(_))));
}

#[test]
fn corrupted_tail_is_reported_by_the_consumer_and_head_by_the_producer() {
    let region = Region::new(required_size(128));
    let (mut p, mut c) = region.init(128);
    region.store_u64(TAIL_OFFSET, 1024);
    assert!(matches!(c.read(), Err(RingError::Corrupt(_))));
    region.store_u64(TAIL_OFFSET, 0);
    // The producer reloads the head only when the ring looks full.
    for _ in 0..8 {
        p.try_push(&[1; 8]).unwrap();
    }
    region.store_u64(HEAD_OFFSET, 4096);
    assert!(matches!(p.try_push(&[1; 8]), Err(RingError::Corrupt(_))));
    assert_eq!(p.free_space(), 0);
}

#[test]
fn magic_constant_is_what_the_docs_say() {
    assert_eq!(&MAGIC, b"HWRING01");
    assert_eq!(required_size(1024), DATA_OFFSET + 1024);
}

proptest! {
    /// A valid header over arbitrary positions and data: the consumer returns records or
    /// `Corrupt`, never panics, and stops after at most `capacity / 8` records.
    #[test]
    fn arbitrary_data_never_panics(
        data in proptest::collection::vec(any::<u8>(), 256),
        head in any::<u64>(),
        used in 0u64..=256,
        words in proptest::collection::vec((0usize..32, 0u32..300, prop_oneof![
            Just(0x4857_5245u32), Just(0x4857_5044u32), any::<u32>()]), 0..8),
    ) {
        let region = Region::new(required_size(256));
        drop(region.init(256));
        region.write(DATA_OFFSET, &data);
        // Plant plausible-looking headers too, so the validation paths past the marker check
        // are exercised.
        for (slot, len, marker) in words {
            region.write(DATA_OFFSET + slot * 8, &len.to_ne_bytes());
            region.write(DATA_OFFSET + slot * 8 + 4, &marker.to_ne_bytes());
        }
        let head = head & !7;
        let used = used & !7;
        region.store_u64(HEAD_OFFSET, head);
        region.store_u64(TAIL_OFFSET, head.wrapping_add(used));
        let mut c = region.consumer().expect("valid positions");
        let mut records = 0;
        loop {
            match c.read() {
                Ok(Some(record)) => {
                    prop_assert!(record.len() <= 120);
                    records += 1;
                    prop_assert!(records <= 32);
                }
                Ok(None) => break,
                Err(RingError::Corrupt(_)) => break,
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }
}

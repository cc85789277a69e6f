//! Property test: arbitrary push / abandoned-reserve / pop sequences against a `VecDeque` model
//! that replays the layout rules (8-byte headers, payload padded to 8, padding to the end of the
//! data area when a record would straddle it), on small rings so that wrap-around, full and
//! empty happen constantly. `Full` must be returned exactly when the model says the record
//! cannot fit.

use hivewire_ring::{heap_ring, max_record_len, record_footprint, RingError};
use proptest::prelude::*;
use std::collections::VecDeque;

#[derive(Debug, Clone)]
enum Op {
    /// Push a record whose length is derived from the value (0..=max + 8).
    Push(u16),
    /// Reserve, write, and drop the grant without committing.
    Abandon(u16),
    /// Pop one record.
    Pop,
    /// Read a record but look only at its length before releasing it.
    Peek,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u16>().prop_map(Op::Push),
        1 => any::<u16>().prop_map(Op::Abandon),
        3 => Just(Op::Pop),
        1 => Just(Op::Peek),
    ]
}

/// The model: published records with the bytes each one advances the head by.
struct Model {
    capacity: u64,
    head: u64,
    tail: u64,
    records: VecDeque<(Vec<u8>, u64)>,
}

impl Model {
    /// Bytes a push of `len` needs at the current tail: padding (if it would straddle the end)
    /// plus its footprint.
    fn needed(&self, len: usize) -> u64 {
        let footprint = record_footprint(len) as u64;
        let room_to_end = self.capacity - self.tail % self.capacity;
        if footprint <= room_to_end {
            footprint
        } else {
            room_to_end + footprint
        }
    }

    fn fits(&self, len: usize) -> bool {
        self.tail - self.head + self.needed(len) <= self.capacity
    }
}

fn payload(seq: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seq as u8).wrapping_mul(31).wrapping_add(i as u8)).collect()
}

fn run(capacity: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let (mut producer, mut consumer) = heap_ring(capacity).expect("valid capacity");
    let max = max_record_len(capacity);
    prop_assert_eq!(producer.max_record_len(), max);
    let mut model = Model { capacity: capacity as u64, head: 0, tail: 0, records: VecDeque::new() };
    let mut seq = 0u64;
    let mut buf = Vec::new();
    for op in ops {
        match op {
            Op::Push(r) => {
                let len = r as usize % (max + 9);
                seq += 1;
                let data = payload(seq, len);
                let result = producer.try_push(&data);
                if len > max {
                    prop_assert_eq!(result, Err(RingError::RecordTooLarge { len, max }));
                } else if model.fits(len) {
                    prop_assert_eq!(result, Ok(()));
                    let needed = model.needed(len);
                    model.tail += needed;
                    model.records.push_back((data, needed));
                } else {
                    prop_assert_eq!(result, Err(RingError::Full));
                }
            }
            Op::Abandon(r) => {
                let len = r as usize % (max + 1);
                match producer.reserve(len) {
                    Ok(mut grant) => {
                        prop_assert!(model.fits(len));
                        prop_assert_eq!(grant.len(), len);
                        grant.fill(0xEE);
                        // Dropped here without `commit`.
                    }
                    Err(e) => {
                        prop_assert_eq!(e, RingError::Full);
                        prop_assert!(!model.fits(len));
                    }
                }
            }
            Op::Pop => {
                let popped = consumer.try_pop_into(&mut buf).expect("not corrupt");
                match model.records.pop_front() {
                    Some((expected, needed)) => {
                        prop_assert!(popped);
                        prop_assert_eq!(&buf, &expected);
                        model.head += needed;
                    }
                    None => prop_assert!(!popped),
                }
            }
            Op::Peek => {
                let record = consumer.read().expect("not corrupt");
                match (record, model.records.pop_front()) {
                    (Some(record), Some((expected, needed))) => {
                        prop_assert_eq!(record.len(), expected.len());
                        record.release();
                        model.head += needed;
                    }
                    (None, None) => {}
                    (got, want) => prop_assert!(
                        false,
                        "ring gave {:?}, model expected {:?}",
                        got.map(|r| r.to_vec()),
                        want
                    ),
                }
            }
        }
        prop_assert_eq!(producer.free_space() as u64, model.capacity - (model.tail - model.head));
        prop_assert_eq!(consumer.is_empty(), model.records.is_empty());
    }
    // Drain, then a record of the maximum length fits wherever the positions stand.
    while let Some((expected, _)) = model.records.pop_front() {
        prop_assert!(consumer.try_pop_into(&mut buf).expect("not corrupt"));
        prop_assert_eq!(&buf, &expected);
    }
    prop_assert!(!consumer.try_pop_into(&mut buf).expect("not corrupt"));
    for len in [max, 0, max] {
        let data = payload(7, len);
        prop_assert_eq!(producer.try_push(&data), Ok(()));
        prop_assert!(consumer.try_pop_into(&mut buf).expect("not corrupt"));
        prop_assert_eq!(&buf, &data);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn ring_matches_model(
        capacity in prop_oneof![Just(64usize), Just(128), Just(256)],
        ops in proptest::collection::vec(op(), 1..300),
    ) {
        run(capacity, ops)?;
    }
}

#[test]
fn minimum_capacity_wraps_with_padding() {
    // 32-byte ring: max payload 8. Footprints 8 + 16 leave 8 bytes at the end; a 16-byte
    // footprint then needs padding and wraps to offset 0.
    let (mut p, mut c) = heap_ring(32).unwrap();
    let mut buf = Vec::new();
    p.try_push(b"").unwrap();
    p.try_push(b"12345678").unwrap();
    assert_eq!(p.try_push(b"abcdefgh"), Err(RingError::Full));
    assert!(c.try_pop_into(&mut buf).unwrap());
    assert_eq!(buf, b"");
    // Head at 8: 8 free at the end + 8 at the start is not enough for padding + 16.
    assert_eq!(p.try_push(b"abcdefgh"), Err(RingError::Full));
    assert!(c.try_pop_into(&mut buf).unwrap());
    assert_eq!(buf, b"12345678");
    p.try_push(b"abcdefgh").unwrap();
    assert_eq!(p.free_space(), 32 - 8 - 16);
    assert!(c.try_pop_into(&mut buf).unwrap());
    assert_eq!(buf, b"abcdefgh");
    assert!(c.is_empty());
    assert_eq!(p.free_space(), 32);
}

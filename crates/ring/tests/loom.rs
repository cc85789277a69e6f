//! Loom models of the publication protocol. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p hivewire-ring --test loom --release`.
//!
//! Under `cfg(loom)` the ring's head/tail are loom atomics and every access to the data area is
//! shadowed by a loom cell, so loom reports a read of record bytes that is not ordered after
//! their write (or a reuse of bytes the consumer may still be reading) as well as wrong
//! contents or order.
#![cfg(loom)]

use hivewire_ring::{heap_ring, Consumer, Producer, RingError};
use loom::thread;

/// Explores every interleaving (no preemption bound unless `LOOM_MAX_PREEMPTIONS` is set):
/// these models are small enough for that to take about a second.
fn model(f: impl Fn() + Send + Sync + 'static) {
    loom::model::Builder::new().check(f);
}

/// Explores interleavings with at most `bound` preemptions (unless `LOOM_MAX_PREEMPTIONS` is
/// set), for a model too large to explore exhaustively.
fn bounded_model(bound: usize, f: impl Fn() + Send + Sync + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound.get_or_insert(bound);
    builder.check(f);
}

fn push(producer: &mut Producer, payload: &[u8]) {
    loop {
        match producer.reserve(payload.len()) {
            Ok(mut grant) => {
                grant.copy_from_slice(payload);
                grant.commit();
                return;
            }
            Err(RingError::Full) => thread::yield_now(),
            Err(e) => panic!("reserve failed: {e}"),
        }
    }
}

fn pop(consumer: &mut Consumer) -> Vec<u8> {
    loop {
        match consumer.read() {
            Ok(Some(record)) => return record.to_vec(),
            Ok(None) => thread::yield_now(),
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

#[test]
fn records_are_published_in_order() {
    model(|| {
        let (mut producer, mut consumer) = heap_ring(64).unwrap();
        let writer = thread::spawn(move || {
            push(&mut producer, b"first");
            push(&mut producer, b"second!!x");
            push(&mut producer, b"");
        });
        assert_eq!(pop(&mut consumer), b"first");
        assert_eq!(pop(&mut consumer), b"second!!x");
        assert_eq!(pop(&mut consumer), b"");
        assert!(consumer.read().unwrap().is_none());
        writer.join().unwrap();
    });
}

#[test]
fn wrap_around_with_padding_on_a_tiny_ring() {
    // 32-byte ring, max payload 8. Footprints: 8 at offset 0, 16 at offset 8, then a 16-byte
    // record does not fit in the 8 bytes left at the end: padding, and it wraps to offset 0,
    // reusing bytes the consumer read before. The producer waits for space as needed.
    model(|| {
        let (mut producer, mut consumer) = heap_ring(32).unwrap();
        let writer = thread::spawn(move || {
            push(&mut producer, b"");
            push(&mut producer, b"12345678");
            push(&mut producer, b"abcdefgh");
        });
        assert_eq!(pop(&mut consumer), b"");
        assert_eq!(pop(&mut consumer), b"12345678");
        assert_eq!(pop(&mut consumer), b"abcdefgh");
        writer.join().unwrap();
    });
}

#[test]
fn wraps_twice_while_the_producer_waits_for_space() {
    // 32-byte ring: 16 @0, 8 @16, then padding 8 @24 + 16 @0 (needs the first record
    // released), 16 @16, and an 8-byte record that wraps exactly to offset 0 (no padding).
    bounded_model(4, || {
        let (mut producer, mut consumer) = heap_ring(32).unwrap();
        let writer = thread::spawn(move || {
            for payload in [&b"aaaaaaaa"[..], b"", b"bbbbbbbb", b"cccccccc", b""] {
                push(&mut producer, payload);
            }
        });
        let mut buf = Vec::new();
        for want in [&b"aaaaaaaa"[..], b"", b"bbbbbbbb", b"cccccccc", b""] {
            while !consumer.try_pop_into(&mut buf).unwrap() {
                thread::yield_now();
            }
            assert_eq!(buf, want);
        }
        writer.join().unwrap();
        assert!(consumer.is_empty());
    });
}

#[test]
fn abandoned_grant_publishes_nothing() {
    model(|| {
        let (mut producer, mut consumer) = heap_ring(32).unwrap();
        let writer = thread::spawn(move || {
            {
                let mut grant = producer.reserve(8).unwrap();
                grant.copy_from_slice(b"dropped!");
                // Dropped here without `commit`.
            }
            push(&mut producer, b"kept");
        });
        assert_eq!(pop(&mut consumer), b"kept");
        writer.join().unwrap();
        assert!(consumer.read().unwrap().is_none());
    });
}

//! Two-thread stress: a producer thread pushes 1,000,000 records of varying length, each
//! carrying its sequence number and an FNV-1a checksum of its payload, through a small ring
//! (so it is full and empty often); a consumer thread verifies every record, in order.

use hivewire_ring::{heap_ring, RingError};
use std::thread;

const RECORDS: u64 = 1_000_000;
const CAPACITY: usize = 4096;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Payload length for record `seq`: 0..=299 bytes, scattered.
fn payload_len(seq: u64) -> usize {
    (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 55) as usize % 300
}

fn fill_payload(seq: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = (seq as u8).wrapping_add((i as u8).wrapping_mul(7));
    }
}

fn backoff(spins: &mut u32) {
    *spins += 1;
    if spins.is_multiple_of(32) {
        thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

#[test]
fn one_million_records_two_threads() {
    let (mut producer, mut consumer) = heap_ring(CAPACITY).unwrap();
    let writer = thread::spawn(move || {
        let mut spins = 0;
        for seq in 0..RECORDS {
            let len = payload_len(seq);
            let mut grant = loop {
                match producer.reserve(16 + len) {
                    Ok(grant) => break grant,
                    Err(RingError::Full) => backoff(&mut spins),
                    Err(e) => panic!("reserve failed: {e}"),
                }
            };
            let (head, payload) = grant.split_at_mut(16);
            fill_payload(seq, payload);
            head[..8].copy_from_slice(&seq.to_le_bytes());
            head[8..].copy_from_slice(&fnv1a(payload).to_le_bytes());
            grant.commit();
        }
    });
    let reader = thread::spawn(move || {
        let mut spins = 0;
        let mut expected_payload = Vec::new();
        let mut bytes = 0u64;
        for seq in 0..RECORDS {
            let record = loop {
                match consumer.read() {
                    Ok(Some(record)) => break record,
                    Ok(None) => backoff(&mut spins),
                    Err(e) => panic!("read failed at {seq}: {e}"),
                }
            };
            let len = payload_len(seq);
            assert_eq!(record.len(), 16 + len, "length of record {seq}");
            let got_seq = u64::from_le_bytes(record[..8].try_into().unwrap());
            assert_eq!(got_seq, seq, "records out of order");
            let sum = u64::from_le_bytes(record[8..16].try_into().unwrap());
            assert_eq!(sum, fnv1a(&record[16..]), "checksum of record {seq}");
            expected_payload.resize(len, 0);
            fill_payload(seq, &mut expected_payload);
            assert_eq!(&record[16..], &expected_payload[..], "payload of record {seq}");
            bytes += record.len() as u64;
        }
        assert!(consumer.read().unwrap().is_none(), "no extra records");
        bytes
    });
    writer.join().expect("producer thread");
    let bytes = reader.join().expect("consumer thread");
    assert!(bytes > RECORDS * 16);
}

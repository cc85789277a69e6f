//! Two-thread push/pop throughput of the ring for 64 B and 4 KiB records, beside a
//! `std::sync::mpsc::sync_channel` of `Vec<u8>` with the same bound as the baseline.
//! Both sides spin (with an occasional yield) when the ring is full or empty.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hivewire_ring::{heap_ring, RingError};
use std::hint::black_box;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const RING_CAPACITY: usize = 1 << 20;

/// Spin, yielding to the scheduler now and then (the machine may have few cores).
fn backoff(spins: &mut u32) {
    *spins += 1;
    if spins.is_multiple_of(64) {
        thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

fn ring_transfer(iters: u64, size: usize) -> Duration {
    let (mut producer, mut consumer) = heap_ring(RING_CAPACITY).expect("valid capacity");
    let payload = vec![0xA5u8; size];
    let start = Instant::now();
    let writer = thread::spawn(move || {
        let mut spins = 0;
        for i in 0..iters {
            loop {
                match producer.reserve(size) {
                    Ok(mut grant) => {
                        grant.copy_from_slice(&payload);
                        grant[0] = i as u8;
                        grant.commit();
                        break;
                    }
                    Err(RingError::Full) => backoff(&mut spins),
                    Err(e) => panic!("push failed: {e}"),
                }
            }
        }
    });
    let mut received = 0u64;
    let mut spins = 0;
    while received < iters {
        match consumer.read() {
            Ok(Some(record)) => {
                black_box(&*record);
                received += 1;
            }
            Ok(None) => backoff(&mut spins),
            Err(e) => panic!("pop failed: {e}"),
        }
    }
    writer.join().expect("producer thread");
    start.elapsed()
}

fn channel_transfer(iters: u64, size: usize) -> Duration {
    let bound = RING_CAPACITY / (size + 8);
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(bound);
    let payload = vec![0xA5u8; size];
    let start = Instant::now();
    let writer = thread::spawn(move || {
        for i in 0..iters {
            let mut msg = payload.clone();
            msg[0] = i as u8;
            tx.send(msg).expect("receiver alive");
        }
    });
    for _ in 0..iters {
        black_box(rx.recv().expect("sender alive"));
    }
    writer.join().expect("producer thread");
    start.elapsed()
}

fn spsc(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring_spsc");
    group.throughput(Throughput::Elements(1));
    for size in [64usize, 4096] {
        group.bench_with_input(BenchmarkId::new("ring", size), &size, |b, &size| {
            b.iter_custom(|iters| ring_transfer(iters, size))
        });
        group.bench_with_input(BenchmarkId::new("baseline_sync_channel", size), &size, |b, &size| {
            b.iter_custom(|iters| channel_transfer(iters, size))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = spsc
}
criterion_main!(benches);

//! criterion: the in-process round trip (send an event, get it echoed back) beside a raw pair
//! of tokio mpsc channels carrying the same `Message`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use hivewire::{InProcessTransport, Message, MessageType, TransportConfig};
use tokio::runtime::Runtime;

fn small_event() -> Message {
    Message::new("a", MessageType::Event { topic: "bench.small".into() })
        .with_payload_bytes(Bytes::from(vec![7u8; 64]))
}

fn round_trip(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("inproc_round_trip_64B");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(30);

    let (a, b) = rt.block_on(async {
        let (a, b) =
            InProcessTransport::create_pair("a", "b", TransportConfig::default()).await.expect("pair");
        let echo = b.clone();
        tokio::spawn(async move {
            while let Ok((from, m)) = echo.receive().await {
                if echo.send(from, m).await.is_err() {
                    break;
                }
            }
        });
        (a, b)
    });
    let msg = small_event();
    group.bench_function("hivewire_inproc", |bench| {
        bench.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    a.send("b", msg.clone()).await.expect("send");
                    a.receive().await.expect("receive");
                }
                start.elapsed()
            })
        })
    });

    let (to_echo, mut echo_rx) = tokio::sync::mpsc::channel::<Message>(1024);
    let (back, mut rx) = tokio::sync::mpsc::channel::<Message>(1024);
    rt.spawn(async move {
        while let Some(m) = echo_rx.recv().await {
            if back.send(m).await.is_err() {
                break;
            }
        }
    });
    group.bench_function("raw_tokio_mpsc", |bench| {
        bench.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    to_echo.send(msg.clone()).await.expect("send");
                    rx.recv().await.expect("recv");
                }
                start.elapsed()
            })
        })
    });
    group.finish();
    rt.block_on(async {
        a.close().await;
        b.close().await;
    });
}

criterion_group!(benches, round_trip);
criterion_main!(benches);

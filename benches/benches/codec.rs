//! criterion: envelope encode + decode, MessagePack (our codec) vs serde_json of the same
//! `Message`, with and without compression.

use std::time::Duration;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hivewire_benches::event;
use hivewire_codec::{CodecConfig, Compression, FrameCodec};
use hivewire_protocol::Message;

fn codec_bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope_encode_decode");
    group.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(20);
    for size in [64usize, 1024, 64 * 1024] {
        let msg = event(size);
        group.throughput(Throughput::Elements(1));
        for (name, algo) in [
            ("msgpack", Compression::None),
            ("msgpack_gzip", Compression::Gzip),
            ("msgpack_zstd", Compression::Zstd),
        ] {
            let mut codec = FrameCodec::new(CodecConfig {
                compression: algo,
                compression_threshold: 0,
                accept_gzip: true,
                accept_zstd: true,
                ..CodecConfig::default()
            });
            let mut buf = BytesMut::with_capacity(2 * size + 1024);
            group.bench_with_input(BenchmarkId::new(name, size), &msg, |b, msg| {
                b.iter(|| {
                    codec.encode_into(msg, &mut buf).expect("encode");
                    codec.decode_from(&mut buf).expect("decode").expect("whole frame")
                })
            });
        }
        group.bench_with_input(BenchmarkId::new("serde_json", size), &msg, |b, msg| {
            b.iter(|| {
                let v = serde_json::to_vec(msg).expect("encode");
                serde_json::from_slice::<Message>(&v).expect("decode")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, codec_bench);
criterion_main!(benches);

//! The in-process rows of `cargo xtask bench`: one-way throughput and round-trip latency of a
//! small event through the whole engine, beside a raw `tokio::sync::mpsc` carrying the same
//! `Message` in the same run.

use std::time::Instant;

use bytes::Bytes;
use hivewire::{InProcessTransport, Message, MessageType, TransportConfig};

use crate::bench::{median, mpsc_baseline_rtt, mpsc_baseline_throughput, percentile, BenchOpts, BenchRow};

const SMALL: usize = 64;

fn small_event() -> Message {
    Message::new("a", MessageType::Event { topic: "bench.small".into() })
        .with_payload_bytes(Bytes::from(vec![7u8; SMALL]))
}

fn row(
    scenario: &str,
    metric: &str,
    value: f64,
    unit: &str,
    baseline: &str,
    baseline_value: f64,
) -> BenchRow {
    BenchRow {
        backend: "inproc".into(),
        scenario: scenario.into(),
        msg_bytes: SMALL,
        metric: metric.into(),
        value,
        unit: unit.into(),
        baseline: baseline.into(),
        baseline_value,
        ratio: if baseline_value != 0.0 { value / baseline_value } else { f64::NAN },
    }
}

async fn throughput(n: usize) -> Result<f64, hivewire::TransportError> {
    let (a, b) = InProcessTransport::create_pair("a", "b", TransportConfig::default()).await?;
    let msg = small_event();
    // Producer and consumer both run as runtime tasks, as in the baseline.
    let consumer = tokio::spawn({
        let b = b.clone();
        async move {
            for _ in 0..n {
                b.receive().await?;
            }
            Ok::<_, hivewire::TransportError>(Instant::now())
        }
    });
    let start = Instant::now();
    crate::bench::send_from_task(&a, "b", msg, n).await?;
    let join = |e: tokio::task::JoinError| hivewire::TransportError::ConnectionError(e.to_string());
    let end = consumer.await.map_err(join)??;
    a.close().await;
    b.close().await;
    Ok(n as f64 / (end - start).as_secs_f64())
}

async fn round_trips(iters: usize) -> Result<Vec<f64>, hivewire::TransportError> {
    let (a, b) = InProcessTransport::create_pair("a", "b", TransportConfig::default()).await?;
    let echo = b.clone();
    tokio::spawn(async move {
        while let Ok((from, m)) = echo.receive().await {
            if echo.send(from, m).await.is_err() {
                break;
            }
        }
    });
    let msg = small_event();
    let mut samples = Vec::with_capacity(iters);
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        a.send("b", msg.clone()).await?;
        a.receive().await?;
        if i >= iters / 10 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    a.close().await;
    b.close().await;
    Ok(samples)
}

/// In-process rows.
pub async fn rows(opts: &BenchOpts) -> Vec<BenchRow> {
    let (n, iters) = if opts.quick { (200_000, 5_000) } else { (2_000_000, 50_000) };
    let mut out = Vec::new();
    let base_tp = mpsc_baseline_throughput(small_event(), n).await;
    match throughput(n).await {
        Ok(tp) => out.push(row("one_way_event", "throughput", tp, "msgs/s", "tokio_mpsc_message", base_tp)),
        Err(e) => eprintln!("inproc throughput failed: {e}"),
    }
    let mut base = mpsc_baseline_rtt(small_event(), iters).await;
    let (bm, bp) = (median(&mut base), percentile(&mut base, 99.0));
    match round_trips(iters).await {
        Ok(mut s) => {
            out.push(row("round_trip_event", "rtt_median", median(&mut s), "us", "tokio_mpsc_message", bm));
            out.push(row(
                "round_trip_event",
                "rtt_p99",
                percentile(&mut s, 99.0),
                "us",
                "tokio_mpsc_message",
                bp,
            ));
        }
        Err(e) => eprintln!("inproc round trip failed: {e}"),
    }
    out
}

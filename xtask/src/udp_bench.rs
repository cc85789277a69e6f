//! UDP rows of `cargo xtask bench`, beside raw tokio `UdpSocket`s in the same run (one datagram
//! per message, one syscall each). Unreliable on both sides: one-way rates count what arrived.

use std::time::{Duration, Instant};

use bytes::Bytes;
use hivewire::{Message, MessageType, Node, TransportConfig};
use tokio::net::UdpSocket;

use crate::bench::{interleaved, interleaved_samples, median, percentile, BenchOpts, BenchRow};

const SMALL: usize = 64;
const BASELINE: &str = "raw_tokio_udp_socket";

fn row(scenario: &str, metric: &str, value: f64, unit: &str, base: f64) -> BenchRow {
    BenchRow {
        backend: "udp".into(),
        scenario: scenario.into(),
        msg_bytes: SMALL,
        metric: metric.into(),
        value,
        unit: unit.into(),
        baseline: BASELINE.into(),
        baseline_value: base,
        ratio: if base != 0.0 { value / base } else { f64::NAN },
    }
}

async fn raw_pair() -> std::io::Result<(UdpSocket, UdpSocket)> {
    let a = UdpSocket::bind("127.0.0.1:0").await?;
    let b = UdpSocket::bind("127.0.0.1:0").await?;
    a.connect(b.local_addr()?).await?;
    b.connect(a.local_addr()?).await?;
    Ok((a, b))
}

async fn raw_rtt(iters: usize) -> std::io::Result<Vec<f64>> {
    let (a, b) = raw_pair().await?;
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok(n) = b.recv(&mut buf).await {
            if b.send(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    crate::bench::in_task(async move {
        let payload = [7u8; SMALL];
        let mut buf = [0u8; 2048];
        let mut samples = Vec::with_capacity(iters);
        for i in 0..iters + iters / 10 {
            let t = Instant::now();
            a.send(&payload).await?;
            // A lost datagram would hang a ping-pong: give up on it after 100 ms.
            if tokio::time::timeout(Duration::from_millis(100), a.recv(&mut buf)).await.is_err() {
                continue;
            }
            if i >= iters / 10 {
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(samples)
    })
    .await
}

async fn raw_one_way(n: usize) -> std::io::Result<f64> {
    let (a, b) = raw_pair().await?;
    let consumer = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        let (mut got, mut last) = (0usize, Instant::now());
        while got < n {
            match tokio::time::timeout(Duration::from_millis(200), b.recv(&mut buf)).await {
                Ok(Ok(_)) => {
                    got += 1;
                    last = Instant::now();
                }
                _ => break,
            }
        }
        (got, last)
    });
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        let payload = [7u8; SMALL];
        for _ in 0..n {
            a.send(&payload).await?;
        }
        Ok::<_, std::io::Error>(a)
    });
    let _a = sender.await.map_err(std::io::Error::other)??;
    let (got, end) = consumer.await.map_err(std::io::Error::other)?;
    Ok(got as f64 / (end - start).as_secs_f64())
}

async fn pair() -> Result<(Node, Node), hivewire::TransportError> {
    let hub = hivewire::listen_with("udp://127.0.0.1:0", "hub", TransportConfig::default()).await?;
    let url = hub.listen_url().unwrap_or_default();
    let client = hivewire::connect_with(&url, "a", TransportConfig::default()).await?;
    Ok((hub, client))
}

async fn project_rtt(iters: usize) -> Result<Vec<f64>, hivewire::TransportError> {
    let (hub, a) = pair().await?;
    // Lossy: a request whose datagram was lost is skipped after 100 ms.
    crate::bench::project_round_trips(hub, a, iters, SMALL, true).await
}

async fn project_one_way(n: usize) -> Result<f64, hivewire::TransportError> {
    let (hub, a) = pair().await?;
    let consumer = tokio::spawn({
        let hub = hub.clone();
        async move {
            let (mut got, mut last) = (0usize, Instant::now());
            while got < n {
                match tokio::time::timeout(Duration::from_millis(200), hub.receive()).await {
                    Ok(Ok(_)) => {
                        got += 1;
                        last = Instant::now();
                    }
                    _ => break,
                }
            }
            (got, last)
        }
    });
    let msg = Message::new("a", MessageType::Event { topic: "bench".into() })
        .with_payload_bytes(Bytes::from(vec![7u8; SMALL]));
    let start = Instant::now();
    crate::bench::send_from_task(&a, "hub", msg, n).await?;
    let (got, end) = consumer.await.map_err(|e| hivewire::TransportError::ConnectionError(e.to_string()))?;
    a.close().await;
    hub.close().await;
    Ok(got as f64 / (end - start).as_secs_f64())
}

/// The udp rows.
pub async fn rows(opts: &BenchOpts) -> Vec<BenchRow> {
    if !opts.wants("udp") {
        return Vec::new();
    }
    // `n`: messages per round of the throughput row (`ROUNDS` rounds per side).
    let (iters, n) = if opts.quick { (2_000, 33_000) } else { (20_000, 330_000) };
    let mut out = Vec::new();
    if opts.wants_scenario("rtt") {
        match interleaved_samples("udp", iters, async |n| raw_rtt(n).await, async |n| project_rtt(n).await)
            .await
        {
            Ok((mut ours, mut base)) if !base.is_empty() && !ours.is_empty() => {
                let (bm, bp) = (median(&mut base), percentile(&mut base, 99.0));
                out.push(row("request_response", "rtt_median", median(&mut ours), "us", bm));
                out.push(row("request_response", "rtt_p99", percentile(&mut ours, 99.0), "us", bp));
            }
            Ok(_) => eprintln!("bench udp rtt: no samples"),
            Err(e) => eprintln!("bench udp rtt failed: {e}"),
        }
    }
    if opts.wants_scenario("small") {
        let per_round = n;
        match interleaved(async || raw_one_way(per_round).await, async || project_one_way(per_round).await)
            .await
        {
            Ok((ours, base)) => out.push(row("one_way_event", "throughput", ours, "msgs/s", base)),
            Err(e) => eprintln!("bench udp throughput failed: {e}"),
        }
    }
    out
}

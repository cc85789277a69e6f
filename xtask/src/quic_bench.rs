//! QUIC rows of `cargo xtask bench`, beside raw quinn in the same run: one bidirectional stream
//! carrying length-prefixed frames (`LengthDelimitedCodec`), same certificates, same loopback.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hivewire::{Message, MessageType, Node, TransportConfig};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::bench::{interleaved, interleaved_samples, median, percentile, BenchOpts, BenchRow};

const SMALL: usize = 64;
const LARGE: usize = 64 * 1024;
const BASELINE: &str = "raw_quinn_len_prefixed";

fn pki() -> &'static hivewire_tcp::test_pki::TestPki {
    static PKI: std::sync::OnceLock<hivewire_tcp::test_pki::TestPki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| hivewire_tcp::test_pki::generate().expect("generate test certificates"))
}

fn tls(server: bool) -> hivewire::TlsConfig {
    if server {
        pki().server_tls()
    } else {
        pki().client_tls()
    }
}

fn row(scenario: &str, bytes: usize, metric: &str, value: f64, unit: &str, base: f64) -> BenchRow {
    BenchRow {
        backend: "quic".into(),
        scenario: scenario.into(),
        msg_bytes: bytes,
        metric: metric.into(),
        value,
        unit: unit.into(),
        baseline: BASELINE.into(),
        baseline_value: base,
        ratio: if base != 0.0 { value / base } else { f64::NAN },
    }
}

type Stream = tokio::io::Join<quinn::RecvStream, quinn::SendStream>;

/// A raw quinn connection with one bidirectional stream, framed: (client, server, endpoints).
async fn raw_pair() -> std::io::Result<(
    Framed<Stream, LengthDelimitedCodec>,
    Framed<Stream, LengthDelimitedCodec>,
    Vec<quinn::Endpoint>,
)> {
    let mut server_tls =
        (*hivewire_core_tls::server_config(&tls(true)).map_err(std::io::Error::other)?).clone();
    server_tls.alpn_protocols = vec![b"raw".to_vec()];
    let server_cfg = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).map_err(std::io::Error::other)?,
    ));
    let server = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().map_err(std::io::Error::other)?)?;
    let addr = server.local_addr()?;
    let mut client_tls =
        (*hivewire_core_tls::client_config(&tls(false)).map_err(std::io::Error::other)?).clone();
    client_tls.alpn_protocols = vec![b"raw".to_vec()];
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().map_err(std::io::Error::other)?)?;
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).map_err(std::io::Error::other)?,
    )));
    let accept = async {
        let conn = server
            .accept()
            .await
            .ok_or_else(|| std::io::Error::other("no connection"))?
            .await
            .map_err(std::io::Error::other)?;
        let (s, r) = conn.accept_bi().await.map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>((conn, s, r))
    };
    let dial = async {
        let conn = client
            .connect(addr, "localhost")
            .map_err(std::io::Error::other)?
            .await
            .map_err(std::io::Error::other)?;
        let (mut s, r) = conn.open_bi().await.map_err(std::io::Error::other)?;
        // A stream is announced by its first bytes: a zero-length frame.
        s.write_all(&[0, 0, 0, 0]).await.map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>((conn, s, r))
    };
    let (a, d) = tokio::join!(accept, dial);
    let ((_sc, ss, sr), (_cc, cs, cr)) = (a?, d?);
    let codec = || LengthDelimitedCodec::builder().max_frame_length(1 << 20).new_codec();
    let mut server_side = Framed::new(tokio::io::join(sr, ss), codec());
    // Swallow the announcing empty frame.
    server_side.next().await.ok_or_else(|| std::io::Error::other("closed"))??;
    std::mem::forget((_sc, _cc));
    Ok((Framed::new(tokio::io::join(cr, cs), codec()), server_side, vec![server, client]))
}

use hivewire_core::tls as hivewire_core_tls;

async fn raw_rtt(iters: usize) -> std::io::Result<Vec<f64>> {
    let (mut c, mut s, _eps) = raw_pair().await?;
    tokio::spawn(async move {
        while let Some(Ok(frame)) = s.next().await {
            if s.send(frame.freeze()).await.is_err() {
                break;
            }
        }
    });
    crate::bench::in_task(async move {
        let payload = Bytes::from(vec![7u8; SMALL]);
        let mut samples = Vec::with_capacity(iters);
        for i in 0..iters + iters / 10 {
            let t = Instant::now();
            c.send(payload.clone()).await?;
            c.next().await.ok_or_else(|| std::io::Error::other("closed"))??;
            if i >= iters / 10 {
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(samples)
    })
    .await
}

async fn raw_one_way(len: usize, n: usize) -> std::io::Result<f64> {
    // `_eps` keeps the endpoints open for the run.
    let (c, s, _eps) = raw_pair().await?;
    crate::bench::raw_framed_one_way(c, s, len, n).await
}

async fn pair() -> Result<(Node, Node), hivewire::TransportError> {
    let hub_cfg = TransportConfig { tls: tls(true), ..TransportConfig::default() };
    let hub = hivewire::listen_with("quic://127.0.0.1:0", "hub", hub_cfg).await?;
    let url = hub.listen_url().unwrap_or_default().replace("127.0.0.1", "localhost");
    let client_cfg = TransportConfig { tls: tls(false), ..TransportConfig::default() };
    let client = hivewire::connect_with(&url, "a", client_cfg).await?;
    Ok((hub, client))
}

async fn project_rtt(iters: usize) -> Result<Vec<f64>, hivewire::TransportError> {
    let (hub, a) = pair().await?;
    crate::bench::project_round_trips(hub, a, iters, SMALL, false).await
}

async fn project_one_way(len: usize, n: usize) -> Result<f64, hivewire::TransportError> {
    let (hub, a) = pair().await?;
    let consumer = tokio::spawn({
        let hub = hub.clone();
        async move {
            for _ in 0..n {
                hub.receive().await?;
            }
            Ok::<_, hivewire::TransportError>(Instant::now())
        }
    });
    let msg = Message::new("a", MessageType::Event { topic: "bench".into() })
        .with_payload_bytes(Bytes::from(vec![7u8; len]));
    let start = Instant::now();
    crate::bench::send_from_task(&a, "hub", msg, n).await?;
    let end = consumer.await.map_err(|e| hivewire::TransportError::ConnectionError(e.to_string()))??;
    a.close().await;
    hub.close().await;
    Ok(n as f64 / (end - start).as_secs_f64())
}

/// The quic rows.
pub async fn rows(opts: &BenchOpts) -> Vec<BenchRow> {
    if !opts.wants("quic") {
        return Vec::new();
    }
    // Messages per round of a throughput row (each row runs `ROUNDS` rounds per side): each
    // round is a new connection, whose congestion window ramps up at its start, so a round
    // must be long enough for the ramp not to weigh on the figure.
    let (iters, n_small, n_large) =
        if opts.quick { (2_000, 66_000, 1_700) } else { (20_000, 660_000, 16_600) };
    let mut out = Vec::new();
    if opts.wants_scenario("rtt") {
        match interleaved_samples("quic", iters, async |n| raw_rtt(n).await, async |n| project_rtt(n).await)
            .await
        {
            Ok((mut ours, mut base)) => {
                let (bm, bp) = (median(&mut base), percentile(&mut base, 99.0));
                out.push(row("request_response", SMALL, "rtt_median", median(&mut ours), "us", bm));
                out.push(row("request_response", SMALL, "rtt_p99", percentile(&mut ours, 99.0), "us", bp));
            }
            Err(e) => eprintln!("bench quic rtt failed: {e}"),
        }
    }
    if opts.wants_scenario("small") {
        let n = n_small;
        match interleaved(async || raw_one_way(SMALL, n).await, async || project_one_way(SMALL, n).await)
            .await
        {
            Ok((ours, base)) => out.push(row("one_way_event", SMALL, "throughput", ours, "msgs/s", base)),
            Err(e) => eprintln!("bench quic throughput failed: {e}"),
        }
    }
    if opts.wants_scenario("large") {
        let n = n_large;
        match interleaved(async || raw_one_way(LARGE, n).await, async || project_one_way(LARGE, n).await)
            .await
        {
            Ok((ours, base)) => {
                let mb = |rate: f64| rate * LARGE as f64 / 1e6;
                out.push(row("one_way_event", LARGE, "throughput", mb(ours), "MB/s", mb(base)));
            }
            Err(e) => eprintln!("bench quic 64 KiB failed: {e}"),
        }
    }
    out
}

//! Stream-backend rows (tcp, tls, uds, ws) of `cargo xtask bench`, each beside a raw baseline in
//! the same run: tokio length-prefixed frames (`LengthDelimitedCodec`) over the same kind of
//! socket, and for ws raw tokio-tungstenite (one binary message per payload).

use std::time::Instant;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hivewire::{Message, MessageType, Node, TransportConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::bench::{interleaved, interleaved_samples, median, percentile, BenchOpts, BenchRow};

const SMALL: usize = 64;
const LARGE: usize = 64 * 1024;

#[derive(Clone, Copy)]
enum Kind {
    Tcp,
    Tls,
    Uds,
    Ws,
}

/// Certificates for the tls rows, generated once per run.
fn pki() -> &'static hivewire_tcp::test_pki::TestPki {
    static PKI: std::sync::OnceLock<hivewire_tcp::test_pki::TestPki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| hivewire_tcp::test_pki::generate().expect("generate test certificates"))
}

fn tls_config(server: bool) -> hivewire::TlsConfig {
    if server {
        pki().server_tls()
    } else {
        pki().client_tls()
    }
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Tls => "tls",
            Kind::Uds => "uds",
            Kind::Ws => "ws",
        }
    }
    fn baseline(self) -> &'static str {
        match self {
            Kind::Tcp => "raw_tcp_len_prefixed",
            Kind::Tls => "raw_rustls_len_prefixed",
            Kind::Uds => "raw_uds_len_prefixed",
            Kind::Ws => "raw_tokio_tungstenite",
        }
    }
}

fn row(
    kind: Kind,
    scenario: &str,
    bytes: usize,
    metric: &str,
    value: f64,
    unit: &str,
    base: f64,
) -> BenchRow {
    BenchRow {
        backend: kind.name().into(),
        scenario: scenario.into(),
        msg_bytes: bytes,
        metric: metric.into(),
        value,
        unit: unit.into(),
        baseline: kind.baseline().into(),
        baseline_value: base,
        ratio: if base != 0.0 { value / base } else { f64::NAN },
    }
}

fn event(len: usize) -> Message {
    Message::new("a", MessageType::Event { topic: "bench".into() })
        .with_payload_bytes(Bytes::from(vec![7u8; len]))
}

// ----- raw baseline -----------------------------------------------------------------------------

trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().max_frame_length(1 << 20).new_codec()
}

/// A connected raw pair (client, server) over the given medium.
async fn raw_pair(
    kind: Kind,
    dir: &std::path::Path,
) -> std::io::Result<(Box<dyn StreamBox>, Box<dyn StreamBox>)> {
    match kind {
        Kind::Tcp => {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = l.local_addr()?;
            let (c, s) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
            let (c, (s, _)) = (c?, s?);
            c.set_nodelay(true)?;
            s.set_nodelay(true)?;
            Ok((Box::new(c), Box::new(s)))
        }
        Kind::Tls => {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = l.local_addr()?;
            let server_cfg = hivewire_tcp::server_config(&tls_config(true)).map_err(std::io::Error::other)?;
            let client_cfg =
                hivewire_tcp::client_config(&tls_config(false)).map_err(std::io::Error::other)?;
            let (c, s) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
            let (c, (s, _)) = (c?, s?);
            c.set_nodelay(true)?;
            s.set_nodelay(true)?;
            let name = rustls_pki_types::ServerName::try_from("localhost").map_err(std::io::Error::other)?;
            let (c, s) = tokio::join!(
                tokio_rustls::TlsConnector::from(client_cfg).connect(name, c),
                tokio_rustls::TlsAcceptor::from(server_cfg).accept(s)
            );
            Ok((Box::new(c?), Box::new(s?)))
        }
        Kind::Ws => Err(std::io::Error::other("ws has its own raw baseline")),
        Kind::Uds => {
            let p = dir.join("raw.sock");
            let _ = std::fs::remove_file(&p);
            let l = tokio::net::UnixListener::bind(&p)?;
            let (c, s) = tokio::join!(tokio::net::UnixStream::connect(&p), l.accept());
            Ok((Box::new(c?), Box::new(s?.0)))
        }
    }
}

trait StreamBox: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: Stream> StreamBox for T {}

async fn raw_rtt(kind: Kind, dir: &std::path::Path, iters: usize) -> std::io::Result<Vec<f64>> {
    if let Kind::Ws = kind {
        return raw_ws_rtt(iters).await;
    }
    let (c, s) = raw_pair(kind, dir).await?;
    tokio::spawn(async move {
        let mut f = Framed::new(s, codec());
        while let Some(Ok(frame)) = f.next().await {
            if f.send(frame.freeze()).await.is_err() {
                break;
            }
        }
    });
    let mut f = Framed::new(c, codec());
    crate::bench::in_task(async move {
        let payload = Bytes::from(vec![7u8; SMALL]);
        let mut samples = Vec::with_capacity(iters);
        for i in 0..iters + iters / 10 {
            let t = Instant::now();
            f.send(payload.clone()).await?;
            f.next().await.ok_or_else(|| std::io::Error::other("closed"))??;
            if i >= iters / 10 {
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(samples)
    })
    .await
}

/// One-way: msgs/s and MB/s of `n` frames of `len` bytes (writes coalesced by the codec's
/// buffer, as any efficient raw sender would).
async fn raw_one_way(kind: Kind, dir: &std::path::Path, len: usize, n: usize) -> std::io::Result<f64> {
    if let Kind::Ws = kind {
        return raw_ws_one_way(len, n).await;
    }
    let (c, s) = raw_pair(kind, dir).await?;
    crate::bench::raw_framed_one_way(Framed::new(c, codec()), Framed::new(s, codec()), len, n).await
}

// ----- raw tokio-tungstenite ------------------------------------------------------------------

type RawWs = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A connected raw WebSocket pair (client, server) over loopback TCP, no subprotocol.
async fn raw_ws_pair() -> std::io::Result<(RawWs, RawWs)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let (c, s) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
    let (c, (s, _)) = (c?, s?);
    c.set_nodelay(true)?;
    s.set_nodelay(true)?;
    let url = format!("ws://{addr}/");
    let (c, s) = tokio::join!(tokio_tungstenite::client_async(url, c), tokio_tungstenite::accept_async(s));
    Ok((c.map_err(std::io::Error::other)?.0, s.map_err(std::io::Error::other)?))
}

async fn raw_ws_rtt(iters: usize) -> std::io::Result<Vec<f64>> {
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    let (mut c, mut s) = raw_ws_pair().await?;
    tokio::spawn(async move {
        while let Some(Ok(m)) = s.next().await {
            if m.is_binary() && s.send(m).await.is_err() {
                break;
            }
        }
    });
    crate::bench::in_task(async move {
        let payload = Bytes::from(vec![7u8; SMALL]);
        let mut samples = Vec::with_capacity(iters);
        for i in 0..iters + iters / 10 {
            let t = Instant::now();
            c.send(WsMessage::Binary(payload.clone())).await.map_err(std::io::Error::other)?;
            c.next().await.ok_or_else(|| std::io::Error::other("closed"))?.map_err(std::io::Error::other)?;
            if i >= iters / 10 {
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(samples)
    })
    .await
}

/// One-way over raw tokio-tungstenite: one binary message per payload, fed and flushed once
/// (tungstenite's write buffer coalesces the writes).
async fn raw_ws_one_way(len: usize, n: usize) -> std::io::Result<f64> {
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    let (mut c, mut s) = raw_ws_pair().await?;
    let consumer = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            match s.next().await {
                Some(Ok(WsMessage::Binary(_))) => got += 1,
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        (got, Instant::now())
    });
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        let payload = Bytes::from(vec![7u8; len]);
        for _ in 0..n {
            c.feed(WsMessage::Binary(payload.clone())).await.map_err(std::io::Error::other)?;
        }
        c.flush().await.map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>(c)
    });
    let _c = sender.await.map_err(std::io::Error::other)??;
    let (got, end) = consumer.await.map_err(std::io::Error::other)?;
    Ok(got as f64 / (end - start).as_secs_f64())
}

// ----- project --------------------------------------------------------------------------------

async fn pair(
    kind: Kind,
    dir: &std::path::Path,
    cfg: TransportConfig,
) -> Result<(Node, Node), hivewire::TransportError> {
    let url = match kind {
        Kind::Tcp => "tcp://127.0.0.1:0".to_string(),
        Kind::Tls => "tls://127.0.0.1:0".to_string(),
        Kind::Uds => format!("unix://{}", dir.join("hub.sock").display()),
        Kind::Ws => "ws://127.0.0.1:0/".to_string(),
    };
    let (mut hub_cfg, mut client_cfg) = (cfg.clone(), cfg);
    if let Kind::Tls = kind {
        hub_cfg.tls = tls_config(true);
        client_cfg.tls = tls_config(false);
    }
    let hub = hivewire::listen_with(&url, "hub", hub_cfg).await?;
    let bound = hub.listen_url().unwrap_or(url).replace("127.0.0.1", "localhost");
    let client = hivewire::connect_with(&bound, "a", client_cfg).await?;
    Ok((hub, client))
}

async fn project_rtt(
    kind: Kind,
    dir: &std::path::Path,
    iters: usize,
) -> Result<Vec<f64>, hivewire::TransportError> {
    let (hub, a) = pair(kind, dir, TransportConfig::default()).await?;
    crate::bench::project_round_trips(hub, a, iters, SMALL, false).await
}

async fn project_one_way(
    kind: Kind,
    dir: &std::path::Path,
    len: usize,
    n: usize,
) -> Result<f64, hivewire::TransportError> {
    let (hub, a) = pair(kind, dir, TransportConfig::default()).await?;
    let consumer = tokio::spawn({
        let hub = hub.clone();
        async move {
            for _ in 0..n {
                hub.receive().await?;
            }
            Ok::<_, hivewire::TransportError>(Instant::now())
        }
    });
    let msg = event(len);
    let start = Instant::now();
    crate::bench::send_from_task(&a, "hub", msg, n).await?;
    let end = consumer.await.map_err(|e| hivewire::TransportError::ConnectionError(e.to_string()))??;
    a.close().await;
    hub.close().await;
    Ok(n as f64 / (end - start).as_secs_f64())
}

/// The tcp, tls, uds and ws rows.
pub async fn rows(opts: &BenchOpts) -> Vec<BenchRow> {
    // Messages per round of a throughput row (each row runs `ROUNDS` rounds per side).
    let (iters, n_small, n_large) =
        if opts.quick { (2_000, 66_000, 1_700) } else { (20_000, 660_000, 16_600) };
    let dir = std::env::temp_dir().join(format!("hivewire-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("bench: cannot create {}: {e}", dir.display());
        return Vec::new();
    }
    let mut out = Vec::new();
    for kind in [Kind::Tcp, Kind::Tls, Kind::Uds, Kind::Ws] {
        if !opts.wants(kind.name()) {
            continue;
        }
        let _ = std::fs::remove_file(dir.join("hub.sock"));
        if opts.wants_scenario("rtt") {
            match interleaved_samples(
                kind.name(),
                iters,
                async |n| {
                    let _ = std::fs::remove_file(dir.join("hub.sock"));
                    raw_rtt(kind, &dir, n).await
                },
                async |n| {
                    let _ = std::fs::remove_file(dir.join("hub.sock"));
                    project_rtt(kind, &dir, n).await
                },
            )
            .await
            {
                Ok((mut ours, mut base)) => {
                    let (bm, bp) = (median(&mut base), percentile(&mut base, 99.0));
                    out.push(row(kind, "request_response", SMALL, "rtt_median", median(&mut ours), "us", bm));
                    out.push(row(
                        kind,
                        "request_response",
                        SMALL,
                        "rtt_p99",
                        percentile(&mut ours, 99.0),
                        "us",
                        bp,
                    ));
                }
                Err(e) => eprintln!("bench {} rtt failed: {e}", kind.name()),
            }
        }
        let _ = std::fs::remove_file(dir.join("hub.sock"));
        if opts.wants_scenario("small") {
            let n = n_small;
            match interleaved(
                async || raw_one_way(kind, &dir, SMALL, n).await,
                async || project_one_way(kind, &dir, SMALL, n).await,
            )
            .await
            {
                Ok((ours, base)) => {
                    out.push(row(kind, "one_way_event", SMALL, "throughput", ours, "msgs/s", base))
                }
                Err(e) => eprintln!("bench {} throughput failed: {e}", kind.name()),
            }
        }
        let _ = std::fs::remove_file(dir.join("hub.sock"));
        if opts.wants_scenario("large") {
            let n = n_large;
            match interleaved(
                async || raw_one_way(kind, &dir, LARGE, n).await,
                async || project_one_way(kind, &dir, LARGE, n).await,
            )
            .await
            {
                Ok((ours, base)) => {
                    let mb = |rate: f64| rate * LARGE as f64 / 1e6;
                    out.push(row(kind, "one_way_event", LARGE, "throughput", mb(ours), "MB/s", mb(base)));
                }
                Err(e) => eprintln!("bench {} 64 KiB failed: {e}", kind.name()),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}

//! 10,000 messages of mixed sizes over a lossy, delaying, reordering path: over udp every
//! delivered message is intact and none is delivered twice (the delivery ratio is printed);
//! over quic every message arrives, in order.
//!
//! The issue asks for `tc netem` between two network namespaces. This machine's kernel has no
//! netem qdisc (`tc qdisc add … netem` fails with "Specified qdisc kind is unknown", and there
//! are no kernel modules to load), so the test probes for netem, says so, and impairs the path
//! in user space instead: a UDP relay on loopback between the two peers applies what
//! `netem loss 5% delay 1ms reorder 25%` would — it drops 5% of datagrams and delays the others
//! by 1 ms, except a quarter that it sends at once, ahead of earlier ones.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hivewire_core::{Message, MessageType, Node, TransportConfig};
use tokio::net::UdpSocket;

const MESSAGES: u32 = 10_000;
const SIZES: [usize; 6] = [16, 200, 1_000, 3_000, 9_000, 40];

/// Whether `tc … netem` works here (it needs the sch_netem kernel module).
fn netem_available() -> Result<(), String> {
    static N: AtomicU64 = AtomicU64::new(0);
    let ns = format!("hwprobe{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let run = |args: &[&str]| {
        std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .map_err(|e| format!("{}: {e}", args[0]))
            .and_then(|o| {
                if o.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
                }
            })
    };
    run(&["ip", "netns", "add", &ns])?;
    let r =
        run(&["ip", "netns", "exec", &ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "loss", "5%"]);
    let _ = run(&["ip", "netns", "del", &ns]);
    r
}

/// Counts of what the relay did.
#[derive(Default)]
struct RelayStats {
    forwarded: AtomicU64,
    dropped: AtomicU64,
    overtaking: AtomicU64,
}

/// A UDP relay that impairs the path: 5% loss, 1 ms delay, a quarter sent at once (reordered).
/// Returns the relay's address and its counters. The first peer other than `server` to send
/// becomes the client.
async fn relay(server: SocketAddr, seed: u64) -> (SocketAddr, Arc<RelayStats>) {
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = sock.local_addr().unwrap();
    let stats = Arc::new(RelayStats::default());
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    let (s, st) = (sock.clone(), stats.clone());
    tokio::spawn(async move {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let to = if from == server {
                match *client.lock().unwrap() {
                    Some(c) => c,
                    None => continue,
                }
            } else {
                *client.lock().unwrap() = Some(from);
                server
            };
            if rng.f64() < 0.05 {
                st.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let mut delay = Duration::from_millis(1);
            if rng.f64() < 0.25 {
                // Sent at once: it overtakes the datagrams still held for their 1 ms.
                delay = Duration::ZERO;
                st.overtaking.fetch_add(1, Ordering::Relaxed);
            }
            let d = buf[..n].to_vec();
            let (s, st) = (s.clone(), st.clone());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if s.send_to(&d, to).await.is_ok() {
                    st.forwarded.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, stats)
}

/// Payload of message `seq`: its number, its size class, and bytes derived from both, with a
/// checksum at the end.
fn payload(seq: u32) -> Bytes {
    let size = SIZES[seq as usize % SIZES.len()];
    let mut p = Vec::with_capacity(size + 12);
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend((0..size).map(|i| (seq as usize * 7 + i * 13) as u8));
    let sum = p.iter().fold(0u32, |a, &b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
    p.extend_from_slice(&sum.to_be_bytes());
    Bytes::from(p)
}

/// The sequence number of an intact payload, or `None` if it was damaged.
fn check(p: &[u8]) -> Option<u32> {
    if p.len() < 8 {
        return None;
    }
    let (body, sum) = p.split_at(p.len() - 4);
    let want = body.iter().fold(0u32, |a, &b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
    let seq = u32::from_be_bytes(body[..4].try_into().ok()?);
    (u32::from_be_bytes(sum.try_into().ok()?) == want && Bytes::copy_from_slice(p) == payload(seq))
        .then_some(seq)
}

fn event(seq: u32) -> Message {
    Message::new("client", MessageType::Event { topic: "loss.test".into() }).with_payload_bytes(payload(seq))
}

/// Receives until `idle` passes with nothing new; returns the sequence numbers in arrival order
/// and how many payloads were damaged.
async fn drain(hub: &Node, idle: Duration, expect: usize) -> (Vec<u32>, usize) {
    let (mut seqs, mut damaged) = (Vec::new(), 0);
    while let Ok(Ok((_, m))) = tokio::time::timeout(idle, hub.receive()).await {
        match check(&m.payload) {
            Some(s) => seqs.push(s),
            None => damaged += 1,
        }
        if seqs.len() == expect {
            break;
        }
    }
    (seqs, damaged)
}

fn probe_note() {
    match netem_available() {
        Ok(()) => eprintln!("netem is available here, but this test impairs the path in user space"),
        Err(why) => eprintln!("tc netem unavailable ({why}); impairing the path with a user-space relay"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_over_a_lossy_path_delivers_intact_messages_at_most_once() {
    probe_note();
    let cfg = TransportConfig { connection_timeout_ms: 5_000, ..TransportConfig::default() };
    let hub = hivewire_udp::UdpTransport::listen("127.0.0.1:0", "hub", cfg.clone(), Default::default())
        .await
        .unwrap();
    let hub_addr: SocketAddr = hub.listen_url().unwrap().trim_start_matches("udp://").parse().unwrap();
    let (via, stats) = relay(hub_addr, 5).await;
    // The handshake itself crosses the lossy path (control messages are sent three times).
    let client = hivewire_udp::UdpTransport::connect(&via.to_string(), "client", cfg, Default::default())
        .await
        .unwrap();
    let start = Instant::now();
    // The hub consumes while the client sends, as a sensor stream's reader would: a session's
    // datagrams wait in its socket's kernel buffer until its link reads them, so a hub that read
    // nothing until the end would lose to its own buffers what this test means to lose to the
    // path.
    let receiver = tokio::spawn({
        let hub = hub.clone();
        async move { drain(&hub, Duration::from_secs(3), MESSAGES as usize).await }
    });
    for seq in 0..MESSAGES {
        client.send("hub", event(seq)).await.unwrap();
        if seq % 50 == 0 {
            // Paced like a sensor stream, so loss comes from the path, not from socket buffers.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let (seqs, damaged) = receiver.await.unwrap();
    let unique: HashSet<u32> = seqs.iter().copied().collect();
    let ratio = seqs.len() as f64 / f64::from(MESSAGES);
    eprintln!(
        "udp over the lossy path: {} of {MESSAGES} delivered ({:.1}%) in {:?}; relay dropped {} and sent {} datagrams ahead of earlier ones; {:?}",
        seqs.len(),
        ratio * 100.0,
        start.elapsed(),
        stats.dropped.load(Ordering::Relaxed),
        stats.overtaking.load(Ordering::Relaxed),
        hub.stats().backend,
    );
    assert_eq!(damaged, 0, "damaged messages were delivered");
    assert_eq!(unique.len(), seqs.len(), "a message was delivered twice");
    assert!(stats.dropped.load(Ordering::Relaxed) > 0, "the relay dropped nothing: the path was not lossy");
    // Whole-frame messages survive with ~95% probability, 9 KB ones (8 fragments) with ~66%.
    assert!(ratio > 0.6 && ratio < 1.0, "delivery ratio {ratio}");
    client.close().await;
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_over_a_lossy_path_delivers_everything_in_order() {
    probe_note();
    let pki = hivewire_core::test_pki::generate().unwrap();
    let mut server = TransportConfig { connection_timeout_ms: 10_000, ..TransportConfig::default() };
    server.tls.cert_chain_pem = Some(pki.server.cert_pem.clone().into_bytes());
    server.tls.key_pem = Some(pki.server.key_pem.clone().into_bytes());
    let hub =
        hivewire_quic::QuicTransport::listen("127.0.0.1:0", "hub", server, Default::default()).await.unwrap();
    let port: u16 = hub.listen_url().unwrap().rsplit(':').next().unwrap().parse().unwrap();
    let (via, stats) = relay(([127, 0, 0, 1], port).into(), 6).await;
    let mut client_cfg = TransportConfig { connection_timeout_ms: 10_000, ..TransportConfig::default() };
    client_cfg.tls.ca_pem = Some(pki.ca_pem.clone().into_bytes());
    let client = hivewire_quic::QuicTransport::connect(
        &format!("localhost:{}", via.port()),
        "client",
        client_cfg,
        Default::default(),
    )
    .await
    .unwrap();
    let start = Instant::now();
    let sender = {
        let client = client.clone();
        tokio::spawn(async move {
            for seq in 0..MESSAGES {
                client.send("hub", event(seq)).await.unwrap();
            }
        })
    };
    let (seqs, damaged) = drain(&hub, Duration::from_secs(20), MESSAGES as usize).await;
    sender.await.unwrap();
    eprintln!(
        "quic over the lossy path: {} of {MESSAGES} delivered in {:?}; relay dropped {} and sent {} datagrams ahead of earlier ones",
        seqs.len(),
        start.elapsed(),
        stats.dropped.load(Ordering::Relaxed),
        stats.overtaking.load(Ordering::Relaxed),
    );
    assert_eq!(damaged, 0);
    assert!(stats.dropped.load(Ordering::Relaxed) > 0, "the relay dropped nothing: the path was not lossy");
    assert_eq!(seqs.len(), MESSAGES as usize, "over quic every message must arrive");
    assert!(seqs.windows(2).all(|w| w[0] + 1 == w[1]) && seqs[0] == 0, "out of order over quic");
    client.close().await;
    hub.close().await;
}

//! Hostile datagrams against a real UDP listener on loopback. A well-behaved agent stays
//! connected throughout and must still get answers; what is dropped shows in the stats.

use std::time::Duration;

use hivewire_core::{Node, TransportConfig};
use hivewire_udp::{UdpOptions, UdpTransport};
use tokio::net::UdpSocket;

mod common;
use common::{counter, hub_and_agent, still_served, WAIT};

/// `name` once it reaches `at_least`, or as it stands after [`WAIT`]. A session's own socket
/// on the hub is read by its link's task, so what a hostile session sent is counted there, not
/// necessarily before the good agent's answer (which travels on its own socket).
async fn counter_reaching(node: &Node, name: &str, at_least: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = counter(node, name);
        if v >= at_least || tokio::time::Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A datagram header (see `hivewire_udp::datagram`).
fn header(fragment: bool, session: u64, msg_id: u32, index: u16, count: u16) -> Vec<u8> {
    let mut d = b"HU\x01".to_vec();
    d.push(u8::from(fragment));
    d.extend_from_slice(&session.to_be_bytes());
    d.extend_from_slice(&msg_id.to_be_bytes());
    d.extend_from_slice(&index.to_be_bytes());
    d.extend_from_slice(&count.to_be_bytes());
    d
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_datagrams_are_dropped_and_counted() {
    let (hub, addr, agent) = hub_and_agent(UdpOptions::default()).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rng = fastrand::Rng::with_seed(11);
    for _ in 0..3_000 {
        let d: Vec<u8> = (0..rng.usize(1..1500)).map(|_| rng.u8(..)).collect();
        sock.send_to(&d, addr).await.unwrap();
    }
    still_served(&agent).await;
    assert!(counter_reaching(&hub, "udp.malformed", 2_900).await >= 2_900, "{:?}", hub.stats().backend);
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_fragments_are_dropped_and_counted() {
    let (hub, addr, agent) = hub_and_agent(UdpOptions::default()).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let session = 0xBAD5_E551;
    // A session opens (the hub makes a link that will time out waiting for a Hello) …
    sock.send_to(&header(false, session, 1, 0, 1), addr).await.unwrap();
    // … and claims a 65,535-fragment message (far over max_message_size), oversized fragments,
    // and fragments whose count changes within a set.
    for i in 0..100u32 {
        let mut d = header(true, session, 10 + i, 0, u16::MAX);
        d.extend_from_slice(&[0u8; 100]);
        sock.send_to(&d, addr).await.unwrap();
    }
    let mut big = header(true, session, 500, 0, 3);
    big.extend_from_slice(&vec![0u8; 4000]);
    sock.send_to(&big, addr).await.unwrap();
    let mut a = header(true, session, 600, 0, 3);
    a.extend_from_slice(&[1u8; 1180]);
    sock.send_to(&a, addr).await.unwrap();
    let mut b = header(true, session, 600, 1, 9);
    b.extend_from_slice(&[1u8; 1180]);
    sock.send_to(&b, addr).await.unwrap();
    still_served(&agent).await;
    assert!(counter_reaching(&hub, "udp.bad_fragments", 102).await >= 102, "{:?}", hub.stats().backend);
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_incomplete_sets_stays_bounded() {
    let opts = UdpOptions { reassembly_timeout: Duration::from_millis(300), ..UdpOptions::default() };
    let (hub, addr, agent) = hub_and_agent(opts).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let before = rss_kib();
    // 20 sessions, each opening 2,000 sets of which only the first fragment ever comes: 40,000
    // incomplete messages that would hold ~46 MiB if kept.
    for s in 0..20u64 {
        let session = 0x5EED_0000 + s;
        sock.send_to(&header(false, session, 1, 0, 1), addr).await.unwrap();
        for m in 0..2_000u32 {
            let mut d = header(true, session, 2 + m, 0, 8);
            d.extend_from_slice(&[9u8; 1180]);
            sock.send_to(&d, addr).await.unwrap();
            if m % 200 == 0 {
                // Paced so that the kernel's socket buffer (capped by rmem_max) drops little.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    still_served(&agent).await;
    // Each session keeps at most 64 incomplete sets; every other one is let go and counted:
    // evicted for a newer one, timed out (a set whose session's flood took longer than the
    // timeout on a loaded machine), or dropped before reassembly because the session's reader
    // was behind. (A few may have been dropped by the kernel before reaching the hub.)
    let disposed = |hub: &Node| {
        counter(hub, "udp.reassembly_evicted")
            + counter(hub, "udp.reassembly_timeouts")
            + counter(hub, "udp.reader_behind")
    };
    let target = 20 * (2_000 - 64) * 8 / 10;
    let deadline = tokio::time::Instant::now() + WAIT;
    while disposed(&hub) < target && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let grown = rss_kib().saturating_sub(before);
    assert!(disposed(&hub) >= target, "only {} let go: {:?}", disposed(&hub), hub.stats().backend);
    let evicted = counter(&hub, "udp.reassembly_evicted");
    assert!(evicted > 0, "no set evicted: {:?}", hub.stats().backend);
    assert!(grown < 32 * 1024, "RSS grew by {grown} KiB");
    eprintln!("flood of incomplete sets: RSS grew by {grown} KiB, {evicted} sets evicted");
    // The rest time out.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(counter(&hub, "udp.reassembly_timeouts") > 0, "{:?}", hub.stats().backend);
    still_served(&agent).await;
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_travel_in_fragments() {
    let (hub, _addr, agent) = hub_and_agent(UdpOptions::default()).await;
    for size in [1_100usize, 1_200, 5_000, 100_000, 1 << 20] {
        let payload =
            serde_bytes::ByteBuf::from((0..size).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>());
        let r = agent.request("hub", "echo", &payload, WAIT).await.unwrap_or_else(|e| panic!("{size}: {e}"));
        assert_eq!(r.payload_as::<serde_bytes::ByteBuf>().unwrap(), payload, "{size} bytes changed");
    }
    hub.close().await;
}

#[tokio::test]
async fn options_are_checked() {
    let cfg = TransportConfig::default();
    for bad in [10usize, 70_000] {
        let opts = UdpOptions { max_packet_size: bad, ..UdpOptions::default() };
        let r = UdpTransport::listen("127.0.0.1:0", "hub", cfg.clone(), opts).await;
        assert!(r.is_err(), "max_packet_size {bad} accepted");
    }
    let opts = UdpOptions { broadcast: true, multicast_ttl: Some(4), ..UdpOptions::default() };
    let hub = UdpTransport::listen("127.0.0.1:0", "hub", cfg, opts).await.unwrap();
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_limited_to_twice_max_peers() {
    let cfg = TransportConfig { max_peers: 2, connection_timeout_ms: 3_000, ..TransportConfig::default() };
    let hub = UdpTransport::listen("127.0.0.1:0", "hub", cfg.clone(), UdpOptions::default()).await.unwrap();
    let addr = hub.listen_url().unwrap().trim_start_matches("udp://").to_string();
    let responder = hub.clone();
    tokio::spawn(async move {
        while let Ok((_, req)) = responder.receive().await {
            let _ = responder.respond_bytes(&req, req.payload.clone()).await;
        }
    });
    let agent = UdpTransport::connect(&addr, "good", cfg, UdpOptions::default()).await.unwrap();
    // The agent holds one of the 4 sessions; 3 more open, the next 7 are refused.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for s in 0..10u64 {
        sock.send_to(&header(false, 0xC0FF_EE00 + s, 1, 0, 1), &addr).await.unwrap();
    }
    still_served(&agent).await;
    counter_reaching(&hub, "udp.sessions_refused", 7).await;
    // Settled: no more than 7 either.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(counter(&hub, "udp.sessions_refused"), 7, "{:?}", hub.stats().backend);
    hub.close().await;
}

/// Forwards datagrams between one client and `hub`, dropping the client's first `drop_first`.
async fn dropping_relay(hub: std::net::SocketAddr, drop_first: usize) -> std::net::SocketAddr {
    let sock = std::sync::Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut client, mut dropped) = (None, 0);
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            if from == hub {
                if let Some(c) = client {
                    let _ = sock.send_to(&buf[..n], c).await;
                }
                continue;
            }
            client = Some(from);
            if dropped < drop_first {
                dropped += 1;
                continue;
            }
            let _ = sock.send_to(&buf[..n], hub).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_lost_whole_is_sent_again() {
    let cfg = TransportConfig { connection_timeout_ms: 3_000, ..TransportConfig::default() };
    let hub = UdpTransport::listen("127.0.0.1:0", "hub", cfg.clone(), UdpOptions::default()).await.unwrap();
    let hub_addr = hub.listen_url().unwrap().trim_start_matches("udp://").parse().unwrap();
    // The session's opening datagrams and every copy of the Hello are lost.
    let via = dropping_relay(hub_addr, 6).await;
    // Without a resend the handshake would time out (3 s) and the dial fail.
    let agent = UdpTransport::connect(&via.to_string(), "agent", cfg, UdpOptions::default()).await;
    assert!(agent.is_ok(), "the handshake was not sent again: {agent:?}");
    hub.close().await;
}

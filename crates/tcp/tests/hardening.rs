//! Hostile and careless clients against a real TCP listener. In every test the listener must
//! keep serving a well-behaved client throughout.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use hivewire_core::{Backpressure, Message, MessageType, Node, PeerEvent, TransportConfig, TransportError};
use hivewire_tcp::{TcpOptions, TcpTransport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

async fn hub(cfg: TransportConfig) -> (Node, String) {
    let hub = TcpTransport::listen("127.0.0.1:0", "hub", cfg, TcpOptions::default()).await.unwrap();
    let addr = hub.listen_url().unwrap().trim_start_matches("tcp://").to_string();
    (hub, addr)
}

/// A well-behaved client still gets an answer from the hub.
async fn still_serving(hub: &Node, addr: &str, id: &str) {
    let c = TcpTransport::connect(addr, id, TransportConfig::default(), TcpOptions::default()).await.unwrap();
    c.send("hub", Message::event(id, "ping", &1u32).unwrap()).await.unwrap();
    let (from, _) = tokio::time::timeout(WAIT, hub.receive()).await.expect("hub stopped serving").unwrap();
    assert_eq!(from.as_str(), id);
    c.close().await;
}

/// Reads until the server closes the connection; returns how long that took.
async fn closed_within(mut s: TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("server did not close the connection within {limit:?}"),
        }
    }
}

fn hello_frame(id: &str) -> BytesMut {
    let hello = Message::control(
        id,
        hivewire_core::protocol::ControlOperation::Hello {
            version: hivewire_core::ProtocolVersion::CURRENT,
            capabilities: vec![],
            metadata: Default::default(),
        },
    );
    let mut codec = hivewire_codec::FrameCodec::new(Default::default());
    let mut buf = BytesMut::new();
    codec.encode_into(&hello, &mut buf).unwrap();
    buf
}

#[tokio::test]
async fn random_bytes_close_only_that_connection() {
    let (hub, addr) = hub(TransportConfig::default()).await;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let junk: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let _ = s.write_all(&junk).await;
    closed_within(s, WAIT).await;
    still_serving(&hub, &addr, "good").await;
    assert!(hub.stats().handshake_failures >= 1);
    hub.close().await;
}

#[tokio::test]
async fn a_4_gib_header_is_refused_without_allocating() {
    let (hub, addr) = hub(TransportConfig::default()).await;
    // After a valid handshake, so the frame reaches the engine's reader.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&hello_frame("liar")).await.unwrap();
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).await.unwrap();
    let mut events = hub.peer_events();
    let mut header = BytesMut::new();
    header.put_slice(b"HW\x01\x00");
    header.put_u32(u32::MAX);
    s.write_all(&header).await.unwrap();
    let down = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(PeerEvent::Down { agent, reason }) = events.recv().await {
                if agent == "liar" {
                    return reason;
                }
            }
        }
    })
    .await
    .expect("the liar was not disconnected");
    assert!(down.contains("frame too large"), "{down}");
    still_serving(&hub, &addr, "good").await;
    hub.close().await;
}

#[tokio::test]
async fn truncated_frame_then_silence_is_closed_at_the_handshake_timeout() {
    let cfg = TransportConfig { connection_timeout_ms: 300, ..TransportConfig::default() };
    let (hub, addr) = hub(cfg).await;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let hello = hello_frame("half");
    s.write_all(&hello[..hello.len() / 2]).await.unwrap();
    let took = closed_within(s, WAIT).await;
    assert!(took >= Duration::from_millis(250), "closed after {took:?}, before the timeout");
    still_serving(&hub, &addr, "good").await;
    hub.close().await;
}

#[tokio::test]
async fn silent_after_connect_is_closed_at_the_handshake_timeout() {
    let cfg = TransportConfig { connection_timeout_ms: 300, ..TransportConfig::default() };
    let (hub, addr) = hub(cfg).await;
    let s = TcpStream::connect(&addr).await.unwrap();
    let took = closed_within(s, WAIT).await;
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    still_serving(&hub, &addr, "good").await;
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_at_once() {
    let _ = rlimit::increase_nofile_limit(8192);
    let cfg = TransportConfig { max_peers: 2000, ..TransportConfig::default() };
    let (hub, addr) = hub(cfg).await;
    let dials = (0..1000).map(|i| {
        let addr = addr.clone();
        tokio::spawn(async move {
            TcpTransport::connect(&addr, format!("c{i}"), TransportConfig::default(), TcpOptions::default())
                .await
        })
    });
    let nodes: Vec<Node> = futures::future::join_all(dials)
        .await
        .into_iter()
        .map(|r| r.expect("join").expect("every connection is served"))
        .collect();
    assert_eq!(hub.peers().len(), 1000);
    // Every one of them can be reached.
    hub.broadcast(Message::broadcast("hub", "all", &7u32).unwrap()).await.unwrap();
    for n in &nodes {
        let (from, m) = tokio::time::timeout(WAIT, n.receive()).await.expect("broadcast lost").unwrap();
        assert_eq!(from.as_str(), "hub");
        assert_eq!(m.payload_as::<u32>().unwrap(), 7);
    }
    still_serving(&hub, &addr, "good").await;
    for n in nodes {
        n.close().await;
    }
    hub.close().await;
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Connects a raw client that completes the handshake as `name` and then never reads again.
async fn sloth(addr: &str, name: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hello_frame(name)).await.unwrap();
    let mut ack = vec![0u8; 8];
    s.read_exact(&mut ack).await.unwrap();
    let len = u32::from_be_bytes([ack[4], ack[5], ack[6], ack[7]]) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    s
}

/// Sends 64 KiB events to `to` until the hub refuses one (at most 100,000); each payload is its
/// own allocation when `distinct`. Returns how many were accepted and the refusal.
async fn flood(hub: &Node, to: &str, distinct: bool) -> (usize, Option<TransportError>) {
    let shared = Bytes::from(vec![1u8; 64 * 1024]);
    let mut accepted = 0usize;
    for _ in 0..100_000 {
        let payload = if distinct { Bytes::from(vec![accepted as u8; 64 * 1024]) } else { shared.clone() };
        let big =
            Message::new("hub", MessageType::Event { topic: "flood".into() }).with_payload_bytes(payload);
        match hub.send(to, big).await {
            Ok(()) => accepted += 1,
            Err(e) => return (accepted, Some(e)),
        }
        if accepted.is_multiple_of(16) {
            tokio::task::yield_now().await;
        }
    }
    (accepted, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_hits_the_queue_bound_not_the_memory() {
    // The count bound alone (the byte bound set far above it).
    let cfg = TransportConfig {
        outbound_queue_capacity: 64,
        outbound_queue_bytes: 1 << 30,
        backpressure: Backpressure::Error,
        heartbeat_timeout_ms: 60_000,
        ..TransportConfig::default()
    };
    let (hub, addr) = hub(cfg).await;
    let s = sloth(&addr, "sloth").await;
    let before = rss_kib();
    let (accepted, full) = flood(&hub, "sloth", false).await;
    assert!(matches!(full, Some(TransportError::QueueFull { capacity: 64 })), "{full:?} after {accepted}");
    let grown = rss_kib().saturating_sub(before);
    eprintln!(
        "slow reader: {accepted} messages of 64 KiB accepted before QueueFull; hub RSS grew by {grown} KiB"
    );
    // 64 queued messages share one payload; socket buffers and one write batch hold the rest.
    assert!(grown < 64 * 1024, "RSS grew by {grown} KiB");
    still_serving(&hub, &addr, "good").await;
    drop(s);
    hub.close().await;
}

/// With the default bounds (4,096 messages, 2 MiB of large payloads) and a distinct 64 KiB
/// payload per message, the byte bound is what stops the flood: without it the hub would hold
/// 256 MiB for a peer that reads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_hits_the_byte_bound_with_distinct_payloads() {
    let cfg = TransportConfig {
        backpressure: Backpressure::Error,
        heartbeat_timeout_ms: 60_000,
        ..TransportConfig::default()
    };
    let limit = cfg.outbound_queue_bytes;
    let (hub, addr) = hub(cfg).await;
    let s = sloth(&addr, "sloth").await;
    let before = rss_kib();
    let (accepted, full) = flood(&hub, "sloth", true).await;
    assert!(
        matches!(full, Some(TransportError::QueueBytesFull { limit: l }) if l == limit),
        "{full:?} after {accepted}"
    );
    let queued = hub.stats().peers.iter().find(|p| p.agent.as_str() == "sloth").unwrap().queued_bytes;
    assert!(queued <= limit && queued + 64 * 1024 > limit, "{queued} bytes queued at the refusal");
    let grown = rss_kib().saturating_sub(before);
    eprintln!(
        "slow reader, distinct payloads: {accepted} messages of 64 KiB accepted before QueueBytesFull; \
         hub RSS grew by {grown} KiB"
    );
    // The queue's 2 MiB, one write batch in the writer's hands and the socket buffers.
    assert!(grown < 48 * 1024, "RSS grew by {grown} KiB");
    still_serving(&hub, &addr, "good").await;
    drop(s);
    hub.close().await;
}

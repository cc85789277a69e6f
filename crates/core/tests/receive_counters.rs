//! A link's reader counts what it receives once per run of messages rather than once per
//! message; the node's and the peer's counters must still come out exact (nothing lost,
//! nothing counted twice) once the link goes quiet.

use std::time::{Duration, Instant};

use bytes::Bytes;
use hivewire_core::{framed_link, Message, MessageType, Node, PeerInfo, TransportConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_counters_are_exact_after_runs_of_every_length() {
    let cfg = TransportConfig::default();
    let hub = Node::new("hub", cfg.clone(), "duplex");
    let (a, b) = tokio::io::duplex(1 << 16);
    hub.accept_link(framed_link(a, cfg.max_message_size, cfg.compression_threshold, PeerInfo::default()));
    let client = Node::new("client", cfg.clone(), "duplex");
    client
        .connect_link(framed_link(b, cfg.max_message_size, cfg.compression_threshold, PeerInfo::default()))
        .await
        .expect("handshake");
    let base = hub.stats();
    let (mut sent, mut bytes) = (0u64, 0u64);
    // Bursts of 1 to 100 messages: runs shorter than, equal to and longer than the reader's
    // counting period, with the link going quiet between bursts.
    for burst in [1usize, 31, 32, 33, 64, 100, 7] {
        for i in 0..burst {
            let len = (i * 37) % 300;
            let m = Message::new("client", MessageType::Event { topic: "count".into() })
                .with_payload_bytes(Bytes::from(vec![1u8; len]));
            client.send("hub", m).await.expect("send");
            sent += 1;
            bytes += len as u64;
        }
        for _ in 0..burst {
            tokio::time::timeout(Duration::from_secs(10), hub.receive())
                .await
                .expect("a message")
                .expect("open");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = hub.stats();
            let got = (s.messages_received - base.messages_received, s.bytes_received - base.bytes_received);
            let peer = s.peers.iter().find(|p| p.agent.as_str() == "client").map(|p| p.messages_received);
            if got == (sent, bytes) && peer.is_some_and(|p| p >= sent) {
                // Exact, and the peer's count holds this link's messages (plus its handshake).
                assert!(peer.unwrap() - sent <= 2, "peer count {peer:?} for {sent} sent");
                break;
            }
            assert!(
                got.0 <= sent && got.1 <= bytes,
                "counted more than was sent: {got:?} of {sent}, {bytes}"
            );
            assert!(
                Instant::now() < deadline,
                "after a burst of {burst}: counted {got:?} of ({sent}, {bytes})"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    client.close().await;
    hub.close().await;
}

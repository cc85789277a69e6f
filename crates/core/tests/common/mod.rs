//! Nodes joined by in-memory duplex links (`tokio::io::duplex`) through the real framing: the
//! set-up the engine's own tests share.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use hivewire_core::{framed_link, Node, PeerInfo, TransportConfig};

/// A node named "hub" that relays between its peers.
pub fn hub(cfg: TransportConfig) -> Node {
    let hub = Node::new("hub", cfg, "duplex");
    hub.set_hub(true);
    hub
}

/// A node `name` dialed into `hub` over a duplex link with `buffer` bytes in each direction;
/// returns once the handshake is done.
pub async fn join(hub: &Node, name: &str, cfg: TransportConfig, buffer: usize) -> Node {
    let (a, b) = tokio::io::duplex(buffer);
    let hub_cfg = hub.config();
    hub.accept_link(framed_link(
        a,
        hub_cfg.max_message_size,
        hub_cfg.compression_threshold,
        PeerInfo::default(),
    ));
    let node = Node::new(name, cfg.clone(), "duplex");
    node.connect_link(framed_link(b, cfg.max_message_size, cfg.compression_threshold, PeerInfo::default()))
        .await
        .expect("handshake");
    node
}

/// A hub and one node "client" joined to it.
pub async fn pair(hub_cfg: TransportConfig, client_cfg: TransportConfig, buffer: usize) -> (Node, Node) {
    let hub = hub(hub_cfg);
    let client = join(&hub, "client", client_cfg, buffer).await;
    (hub, client)
}

/// A payload of `len` bytes (at least 4) that carries its number `n`.
pub fn numbered(n: u32, len: usize) -> bytes::Bytes {
    let mut v = vec![(n % 251) as u8; len];
    v[..4].copy_from_slice(&n.to_be_bytes());
    bytes::Bytes::from(v)
}

/// An event on topic "t" with payload [`numbered`]`(n, len)`.
pub fn numbered_event(n: u32, len: usize) -> hivewire_core::Message {
    hivewire_core::Message::new("sender", hivewire_core::MessageType::Event { topic: "t".into() })
        .with_payload_bytes(numbered(n, len))
}

/// Spawns a task that sends `to` the numbered events `0..count` of `len` bytes, in order,
/// each send unwrapped.
pub fn spawn_numbered_sends(node: &Node, to: &str, count: u32, len: usize) -> tokio::task::JoinHandle<()> {
    let (node, to) = (node.clone(), to.to_string());
    tokio::spawn(async move {
        for n in 0..count {
            node.send(&to, numbered_event(n, len)).await.unwrap();
        }
    })
}

/// Receives one message per entry of `sizes` through `receive` (each within 10 s): message
/// `n` must be [`numbered`]`(n, sizes[n])`, intact and in order.
pub async fn expect_numbered(node: &Node, sizes: impl IntoIterator<Item = usize>) {
    for (n, len) in sizes.into_iter().enumerate() {
        let (_, m) = tokio::time::timeout(std::time::Duration::from_secs(10), node.receive())
            .await
            .unwrap_or_else(|_| panic!("message {n} never came"))
            .unwrap();
        assert_eq!(m.payload, numbered(n as u32, len), "message {n}");
    }
}

/// An event `i` whose payload of `len` bytes is a pattern of `i` (every payload differs).
pub fn patterned(i: usize, len: usize) -> hivewire_core::Message {
    let payload: Vec<u8> = (0..len).map(|j| (i.wrapping_mul(131) ^ j ^ (j >> 8)) as u8).collect();
    hivewire_core::Message::new("a", hivewire_core::MessageType::Event { topic: format!("t.{i}").into() })
        .with_payload_bytes(bytes::Bytes::from(payload))
}

/// The frames of `msgs` as the codec (default config) writes them, back to back.
pub fn wire(msgs: &[hivewire_core::Message]) -> Vec<u8> {
    let mut codec = hivewire_codec::FrameCodec::new(hivewire_codec::CodecConfig::default());
    let mut out = bytes::BytesMut::new();
    for m in msgs {
        codec.encode_into(m, &mut out).unwrap();
    }
    out.to_vec()
}

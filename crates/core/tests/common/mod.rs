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

//! What the udp test binaries share: a hub answering `echo`, an agent dialed into it, the
//! hub's counters.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::time::Duration;

use hivewire_core::{Node, TransportConfig};
use hivewire_udp::{UdpOptions, UdpTransport};

pub const WAIT: Duration = Duration::from_secs(10);

/// A hub on an ephemeral loopback port that answers every request with its payload.
pub async fn echo_hub(cfg: TransportConfig, opts: UdpOptions) -> (Node, std::net::SocketAddr) {
    let hub = UdpTransport::listen("127.0.0.1:0", "hub", cfg, opts).await.unwrap();
    let addr: std::net::SocketAddr = hub.listen_url().unwrap().trim_start_matches("udp://").parse().unwrap();
    let responder = hub.clone();
    tokio::spawn(async move {
        while let Ok((_, req)) = responder.receive().await {
            if req.method().is_some() {
                let _ = responder.respond_bytes(&req, req.payload.clone()).await;
            }
        }
    });
    (hub, addr)
}

/// An echo hub and an agent "good" connected to it.
pub async fn hub_and_agent(opts: UdpOptions) -> (Node, std::net::SocketAddr, Node) {
    let cfg = TransportConfig { connection_timeout_ms: 3_000, ..TransportConfig::default() };
    let (hub, addr) = echo_hub(cfg.clone(), opts.clone()).await;
    let agent = UdpTransport::connect(&addr.to_string(), "good", cfg, opts).await.unwrap();
    (hub, addr, agent)
}

pub async fn still_served(agent: &Node) {
    let r = agent.request("hub", "echo", &"still here", WAIT).await.expect("the hub stopped serving others");
    assert_eq!(r.payload_as::<String>().unwrap(), "still here");
}

pub fn counter(node: &Node, name: &str) -> u64 {
    node.stats()
        .backend
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {name}"))
}

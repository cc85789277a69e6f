//! hivewire's engine: the [`Transport`] API, [`TransportConfig`], [`TransportError`], and the
//! [`Node`] that runs the protocol over any backend's [`Link`]s.
//!
//! A backend crate turns its medium into links and hands them to a node; the node does the
//! handshake, heartbeats and dead-peer detection, request/response, hub routing with TTL,
//! pub/sub with subscription filtering, broadcast, priorities, bounded queues and statistics —
//! the same for every backend. See `docs/ARCHITECTURE.md`.
//!
//! ```
//! use hivewire_core::{framed_link, Node, TransportConfig};
//! use hivewire_protocol::handshake::PeerInfo;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), hivewire_core::TransportError> {
//! // Any byte stream becomes a link; here an in-memory duplex stands in for a socket.
//! let (a, b) = tokio::io::duplex(64 * 1024);
//! let cfg = TransportConfig::default();
//! let hub = Node::new("hub", cfg.clone(), "duplex");
//! hub.set_hub(true);
//! hub.accept_link(framed_link(a, cfg.max_message_size, cfg.compression_threshold, PeerInfo::default()));
//! let client = Node::new("client", cfg.clone(), "duplex");
//! let peer = client.connect_link(framed_link(b, cfg.max_message_size, cfg.compression_threshold, PeerInfo::default())).await?;
//! assert_eq!(peer.as_str(), "hub");
//!
//! let responder = hub.clone();
//! tokio::spawn(async move {
//!     let (_, req) = responder.receive().await?;
//!     responder.respond(&req, &"pong").await
//! });
//! let resp = client.request("hub", "ping", &(), std::time::Duration::from_secs(5)).await?;
//! assert_eq!(resp.payload_as::<String>()?, "pong");
//! client.close().await;
//! hub.close().await;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod budget;
mod config;
mod error;
mod inbox;
pub mod link;
pub mod net;
mod node;
pub mod queue;
mod stats;
#[cfg(feature = "test-pki")]
pub mod test_pki;
pub mod tls;
mod transport;

pub use config::{Backpressure, TlsConfig, TransportConfig};
pub use error::TransportError;
pub use link::{
    framed_halves, framed_link, try_send_once, FramedLink, FramedRx, FramedTx, Link, LinkRx, LinkSettings,
    LinkTx, TrySend,
};
pub use node::{Acceptor, Node, PeerEvent, Subscription, MAX_PEER_SUBSCRIPTIONS};
pub use stats::{PeerStats, TransportStats};
pub use transport::Transport;

/// The first address `host:port` resolves to, for backends that dial or bind one address;
/// failures are `InvalidUrl` naming `scheme://addr`.
pub async fn resolve_one(scheme: &str, addr: &str) -> Result<std::net::SocketAddr, TransportError> {
    let bad = |reason: String| TransportError::InvalidUrl { url: format!("{scheme}://{addr}"), reason };
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("resolves to no address".into()))
}

pub use hivewire_codec::Compression;
pub use hivewire_protocol as protocol;
pub use hivewire_protocol::handshake::{Authenticator, HelloInfo, PeerInfo};
pub use hivewire_protocol::{AgentId, Message, MessageType, Name, ProtocolVersion};

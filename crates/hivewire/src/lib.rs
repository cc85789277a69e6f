//! **hivewire**: one messaging API for swarms of cooperating agents — request/response,
//! events, topic pub/sub, broadcast, heartbeats, version negotiation, compression, MessagePack —
//! over interchangeable backends chosen by URL.
//!
//! Changing the URL is the only change needed to move an application between backends:
//!
//! ```
//! use std::time::Duration;
//! use hivewire::{Message, TransportConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), hivewire::TransportError> {
//! let url = "inproc://readme-example";
//! let hub = hivewire::listen_with(url, "hub", TransportConfig::default()).await?;
//! let worker = hivewire::connect_with(url, "worker", TransportConfig::default()).await?;
//!
//! // The hub answers requests.
//! let responder = hub.clone();
//! tokio::spawn(async move {
//!     while let Ok((_from, req)) = responder.receive().await {
//!         let n: u64 = req.payload_as()?;
//!         responder.respond(&req, &(n * 2)).await?;
//!     }
//!     Ok::<_, hivewire::TransportError>(())
//! });
//! let resp = worker.request("hub", "double", &21u64, Duration::from_secs(5)).await?;
//! assert_eq!(resp.payload_as::<u64>()?, 42);
//!
//! // Pub/sub with wildcards.
//! let mut sub = hub.subscribe("sensors.*.temperature").await?;
//! worker.publish("sensors.arm.temperature", &serde_json::json!({"celsius": 41.5})).await?;
//! let event = sub.recv().await.expect("event");
//! assert_eq!(event.topic(), Some("sensors.arm.temperature"));
//!
//! worker.close().await;
//! hub.close().await;
//! # Ok(())
//! # }
//! ```
//!
//! Feature flags: one per backend (`inproc`, on by default), and `full` for all of them.
//! A URL whose backend is not compiled in fails with [`TransportError::InvalidUrl`] naming the
//! feature to enable.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub use hivewire_core::{
    framed_link, Authenticator, Backpressure, HelloInfo, Link, LinkRx, LinkSettings, LinkTx, Node, PeerEvent,
    PeerInfo, PeerStats, Subscription, TlsConfig, Transport, TransportConfig, TransportError, TransportStats,
};
pub use hivewire_protocol as protocol;
pub use hivewire_protocol::{
    AgentId, ControlOperation, Message, MessageType, Name, ProtocolVersion, ResponseStatus,
};

/// The in-process backend (feature `inproc`).
#[cfg(feature = "inproc")]
pub mod inproc {
    pub use hivewire_inproc::*;
}
#[cfg(feature = "inproc")]
pub use hivewire_inproc::InProcessTransport;

/// The TCP backend (feature `tcp`).
#[cfg(feature = "tcp")]
pub mod tcp {
    pub use hivewire_tcp::*;
}

/// The Unix-socket backend (feature `uds`).
#[cfg(feature = "uds")]
pub mod uds {
    pub use hivewire_uds::*;
}

/// The WebSocket backend (feature `ws`).
#[cfg(feature = "ws")]
pub mod ws {
    pub use hivewire_ws::*;
}

/// The QUIC backend (feature `quic`).
#[cfg(feature = "quic")]
pub mod quic {
    pub use hivewire_quic::*;
}

/// The UDP backend (feature `udp`).
#[cfg(feature = "udp")]
pub mod udp {
    pub use hivewire_udp::*;
}

/// The shared-memory backend (feature `shm`).
#[cfg(feature = "shm")]
pub mod shm {
    pub use hivewire_shm::*;
}

/// The schemes hivewire knows, with the cargo feature that builds each backend.
pub const SCHEMES: &[(&str, &str)] = &[
    ("inproc", "inproc"),
    ("shm", "shm"),
    ("unix", "uds"),
    ("tcp", "tcp"),
    ("tls", "tcp"),
    ("ws", "ws"),
    ("wss", "ws"),
    ("quic", "quic"),
    ("udp", "udp"),
];

/// A parsed endpoint URL: `scheme://rest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The scheme, lower-case (`inproc`, `tcp`, …).
    pub scheme: String,
    /// Everything after `://`.
    pub address: String,
}

impl Endpoint {
    /// Parses `scheme://address`; the scheme must be one of [`SCHEMES`].
    pub fn parse(url: &str) -> Result<Self, TransportError> {
        let bad = |reason: String| TransportError::InvalidUrl { url: url.to_string(), reason };
        let (scheme, address) = url.split_once("://").ok_or_else(|| {
            bad("expected scheme://address, e.g. inproc://hub or tcp://127.0.0.1:7000".into())
        })?;
        let scheme = scheme.to_ascii_lowercase();
        if !SCHEMES.iter().any(|(s, _)| *s == scheme) {
            let known: Vec<&str> = SCHEMES.iter().map(|(s, _)| *s).collect();
            return Err(bad(format!("unknown scheme {scheme:?}; known schemes: {}", known.join(", "))));
        }
        if address.is_empty() {
            return Err(bad("empty address".into()));
        }
        Ok(Endpoint { scheme, address: address.to_string() })
    }

    /// The cargo feature of the `hivewire` crate that builds this endpoint's backend.
    pub fn feature(&self) -> &'static str {
        SCHEMES.iter().find(|(s, _)| *s == self.scheme).map_or("full", |(_, f)| f)
    }
}

fn not_built(url: &str, ep: &Endpoint) -> TransportError {
    TransportError::InvalidUrl {
        url: url.to_string(),
        reason: format!(
            "the {} backend is not built: enable the `{}` feature of the hivewire crate",
            ep.scheme,
            ep.feature()
        ),
    }
}

/// A fresh random agent id, `agent-` and 16 hex digits.
pub fn random_agent_id() -> AgentId {
    AgentId::from(format!("agent-{:016x}", fastrand::u64(..)))
}

/// Listens on `url` as a hub with a random agent id and the default configuration.
pub async fn listen(url: &str) -> Result<Node, TransportError> {
    listen_with(url, random_agent_id(), TransportConfig::default()).await
}

/// Connects to the hub at `url` with a random agent id and the default configuration.
pub async fn connect(url: &str) -> Result<Node, TransportError> {
    connect_with(url, random_agent_id(), TransportConfig::default()).await
}

/// Listens on `url` as a hub named `agent_id`.
pub async fn listen_with(
    url: &str,
    agent_id: impl Into<AgentId>,
    config: TransportConfig,
) -> Result<Node, TransportError> {
    let ep = Endpoint::parse(url)?;
    let _ = (&agent_id, &config);
    match ep.scheme.as_str() {
        #[cfg(feature = "inproc")]
        "inproc" => hivewire_inproc::InProcessTransport::listen(&ep.address, agent_id, config).await,
        #[cfg(feature = "tcp")]
        "tcp" => hivewire_tcp::TcpTransport::listen(&ep.address, agent_id, config, Default::default()).await,
        #[cfg(feature = "tcp")]
        "tls" => hivewire_tcp::TlsTransport::listen(&ep.address, agent_id, config, Default::default()).await,
        #[cfg(feature = "uds")]
        "unix" => hivewire_uds::UdsTransport::listen(&ep.address, agent_id, config, Default::default()).await,
        #[cfg(feature = "ws")]
        "ws" | "wss" => {
            hivewire_ws::WebSocketTransport::listen_url(url, agent_id, config, Default::default()).await
        }
        #[cfg(feature = "quic")]
        "quic" => {
            hivewire_quic::QuicTransport::listen(&ep.address, agent_id, config, Default::default()).await
        }
        #[cfg(feature = "udp")]
        "udp" => hivewire_udp::UdpTransport::listen(&ep.address, agent_id, config, Default::default()).await,
        #[cfg(feature = "shm")]
        "shm" => {
            hivewire_shm::SharedMemoryTransport::listen(&ep.address, agent_id, config, Default::default())
                .await
        }
        _ => Err(not_built(url, &ep)),
    }
}

/// Connects to the hub at `url` as agent `agent_id`; returns after the handshake.
pub async fn connect_with(
    url: &str,
    agent_id: impl Into<AgentId>,
    config: TransportConfig,
) -> Result<Node, TransportError> {
    let ep = Endpoint::parse(url)?;
    let _ = (&agent_id, &config);
    match ep.scheme.as_str() {
        #[cfg(feature = "inproc")]
        "inproc" => hivewire_inproc::InProcessTransport::connect(&ep.address, agent_id, config).await,
        #[cfg(feature = "tcp")]
        "tcp" => hivewire_tcp::TcpTransport::connect(&ep.address, agent_id, config, Default::default()).await,
        #[cfg(feature = "tcp")]
        "tls" => hivewire_tcp::TlsTransport::connect(&ep.address, agent_id, config, Default::default()).await,
        #[cfg(feature = "uds")]
        "unix" => hivewire_uds::UdsTransport::connect(&ep.address, agent_id, config).await,
        #[cfg(feature = "ws")]
        "ws" | "wss" => {
            hivewire_ws::WebSocketTransport::connect(url, agent_id, config, Default::default()).await
        }
        #[cfg(feature = "quic")]
        "quic" => {
            hivewire_quic::QuicTransport::connect(&ep.address, agent_id, config, Default::default()).await
        }
        #[cfg(feature = "udp")]
        "udp" => hivewire_udp::UdpTransport::connect(&ep.address, agent_id, config, Default::default()).await,
        #[cfg(feature = "shm")]
        "shm" => hivewire_shm::SharedMemoryTransport::connect(&ep.address, agent_id, config).await,
        _ => Err(not_built(url, &ep)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_scheme_lists_the_known_ones() {
        let e = Endpoint::parse("carrier-pigeon://coop").unwrap_err();
        assert!(e.to_string().contains("known schemes: inproc"), "{e}");
        assert!(Endpoint::parse("no-scheme").is_err());
        assert!(Endpoint::parse("inproc://").is_err());
    }

    #[tokio::test]
    async fn backend_not_built_names_the_feature() {
        // Which backends this build has depends on feature unification (the workspace's tests
        // build `full`), so test every scheme whose backend is not compiled in.
        let compiled = [
            ("inproc", cfg!(feature = "inproc")),
            ("tcp", cfg!(feature = "tcp")),
            ("uds", cfg!(feature = "uds")),
            ("ws", cfg!(feature = "ws")),
            ("quic", cfg!(feature = "quic")),
            ("udp", cfg!(feature = "udp")),
            ("shm", cfg!(feature = "shm")),
        ];
        let built = |feature: &str| compiled.iter().any(|(f, on)| *f == feature && *on);
        let mut checked = 0;
        for (scheme, feature) in SCHEMES.iter().filter(|(_, f)| !built(f)) {
            let url = format!("{scheme}://127.0.0.1:1/x");
            let e = connect(&url).await.unwrap_err();
            assert!(e.to_string().contains(&format!("enable the `{feature}` feature")), "{url}: {e}");
            let e = listen(&url).await.unwrap_err();
            assert!(e.to_string().contains(&format!("`{feature}` feature")), "{url}: {e}");
            checked += 1;
        }
        // Without `full` some backend is always left out (the default build has inproc only).
        assert!(cfg!(feature = "full") || checked > 0, "no scheme was checked");
    }
}

/// The README's examples, compiled and run as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

//! The hivewire message model and protocol state machines, sans-IO.
//!
//! Nothing in this crate touches a socket, a runtime or a clock: the state machines take the
//! current time (`now: Instant`) as an input and return what to send and when they next need to
//! be woken, in the manner of `quinn-proto` and `rustls`. `hivewire-core` drives them.
//!
//! ```
//! use hivewire_protocol::{Message, MessageType};
//!
//! let req = Message::request("agent_1", "compute_fibonacci", &serde_json::json!({"n": 42}))?
//!     .with_header("trace", "abc")
//!     .with_priority(255)
//!     .with_ttl(10);
//! assert!(matches!(req.kind, MessageType::Request { .. }));
//! let n: serde_json::Value = req.payload_as()?;
//! assert_eq!(n["n"], 42);
//! # Ok::<(), hivewire_protocol::PayloadError>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod handshake;
pub mod heartbeat;
pub mod message;
pub mod requests;
pub mod topic;
pub mod version;

pub use message::{
    decode_payload, encode_payload, error_codes, next_message_id, AgentId, ControlOperation, Headers,
    Message, MessageId, MessageType, Metadata, Name, PayloadError, RejectReason, ResponseStatus,
    DEFAULT_PRIORITY, DEFAULT_TTL,
};
pub use version::ProtocolVersion;

pub use handshake::{
    AllowAll, Authenticator, ClientHandshake, HandshakeConfig, HandshakeError, HelloInfo, Negotiated,
    PeerInfo, ServerHandshake, ServerOutcome,
};
pub use heartbeat::{HeartbeatAction, HeartbeatConfig, HeartbeatTracker};
pub use requests::{RequestError, RequestTracker};
pub use topic::{topic_matches, validate_pattern, validate_topic, TopicError, TopicPattern};

/// Well-known capability names offered in `Hello` and intersected in `HelloAck`.
pub mod capabilities {
    /// The sender can decode gzip-compressed frames.
    pub const COMPRESSION_GZIP: &str = "compression.gzip";
    /// The sender can decode zstd-compressed frames.
    pub const COMPRESSION_ZSTD: &str = "compression.zstd";
    /// The sender relays messages between its peers (it is a hub).
    pub const RELAY: &str = "relay";
    /// The sender filters published events by the peer's subscriptions.
    pub const PUBSUB: &str = "pubsub";
}

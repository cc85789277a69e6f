//! [`TransportError`]: every way a transport call can fail, as typed variants.

use hivewire_codec::CodecError;
use hivewire_protocol::handshake::HandshakeError;
use hivewire_protocol::topic::TopicError;
use hivewire_protocol::{AgentId, PayloadError, ProtocolVersion, RejectReason};

/// An error from a transport operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The payload exceeds `max_message_size` (or the envelope its allowance); nothing was sent
    /// and the link stays usable.
    #[error("message too large: {size} bytes, max {max}")]
    MessageTooLarge {
        /// Size of the offending payload (or envelope).
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// The medium failed: dial refused, link broken, I/O error.
    #[error("connection error: {0}")]
    ConnectionError(String),
    /// The operation did not complete in time (dial, handshake or request).
    #[error("timed out")]
    Timeout,
    /// The peer speaks an incompatible protocol version.
    #[error("protocol mismatch: ours {ours}, theirs {theirs}")]
    ProtocolMismatch {
        /// Our version.
        ours: ProtocolVersion,
        /// The peer's version.
        theirs: ProtocolVersion,
    },
    /// The peer refused the handshake.
    #[error("handshake rejected: {0}")]
    Rejected(RejectReason),
    /// A bounded queue is full and the backpressure policy is `Error`.
    #[error("queue full (capacity {capacity})")]
    QueueFull {
        /// The queue's bound.
        capacity: usize,
    },
    /// Large payloads waiting for one peer already fill `outbound_queue_bytes` and the
    /// backpressure policy is `Error`.
    #[error("queue full: large payloads waiting for the peer fill its {limit}-byte bound")]
    QueueBytesFull {
        /// The configured bound (`outbound_queue_bytes`).
        limit: usize,
    },
    /// The node is closed.
    #[error("transport closed")]
    Closed,
    /// No connected peer is, or leads to, this agent.
    #[error("unknown agent {0:?}")]
    UnknownAgent(AgentId),
    /// The peer holding a pending request went down before answering.
    #[error("peer {agent:?} went down: {reason}")]
    PeerDown {
        /// The peer.
        agent: AgentId,
        /// Why.
        reason: String,
    },
    /// Too many requests await responses.
    #[error("too many pending requests (max {max})")]
    TooManyPendingRequests {
        /// The configured bound.
        max: usize,
    },
    /// The responder answered with an error status.
    #[error("request failed with code {code}: {message}")]
    RequestFailed {
        /// Error code (see `hivewire_protocol::error_codes`).
        code: u32,
        /// Description.
        message: String,
    },
    /// A URL could not be parsed or names no backend.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The message is not valid for the operation (e.g. `broadcast` of a request).
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// A topic or pattern is malformed.
    #[error(transparent)]
    InvalidTopic(#[from] TopicError),
    /// A typed payload could not be encoded or decoded.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// A frame could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// An I/O error from the medium.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<HandshakeError> for TransportError {
    fn from(e: HandshakeError) -> Self {
        match e {
            HandshakeError::Rejected(RejectReason::VersionMismatch { ours, theirs }) => {
                // `ours` in the reason is the rejecting peer's version.
                TransportError::ProtocolMismatch { ours: theirs, theirs: ours }
            }
            HandshakeError::Refused(RejectReason::VersionMismatch { ours, theirs }) => {
                TransportError::ProtocolMismatch { ours, theirs }
            }
            HandshakeError::Rejected(r) | HandshakeError::Refused(r) => TransportError::Rejected(r),
            HandshakeError::Timeout => TransportError::Timeout,
            HandshakeError::Unexpected(why) => {
                TransportError::ConnectionError(format!("handshake failed: {why}"))
            }
        }
    }
}

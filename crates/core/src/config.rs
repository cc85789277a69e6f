//! [`TransportConfig`]: every knob of a node, with defaults that suit a local swarm.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use hivewire_codec::Compression;
use hivewire_protocol::handshake::Authenticator;
use hivewire_protocol::{Metadata, ProtocolVersion};

/// What a sender experiences when a bounded queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backpressure {
    /// The sender waits until there is room (default).
    #[default]
    Wait,
    /// The sender gets [`TransportError::QueueFull`](crate::TransportError::QueueFull) at once.
    Error,
}

/// Configuration of a node (one agent's end of the transport).
///
/// The first five fields are the seeds' names and meanings; the rest bound every queue and
/// set the liveness timers.
#[derive(Clone)]
pub struct TransportConfig {
    /// Largest payload, in bytes, a message may carry (the envelope may add up to
    /// [`hivewire_codec::ENVELOPE_ALLOWANCE`] more). Checked on send: one byte more is
    /// [`MessageTooLarge`](crate::TransportError::MessageTooLarge).
    pub max_message_size: usize,
    /// Time allowed to dial a peer and complete the handshake, in milliseconds.
    pub connection_timeout_ms: u64,
    /// How many times a dialing node redials after its link to the hub dropped, before it gives
    /// up on that peer (pending sends and requests then fail with typed errors).
    pub retry_attempts: u32,
    /// First redial delay, in milliseconds; it doubles on every failed attempt (with jitter).
    pub reconnect_base_delay_ms: u64,
    /// Largest redial delay, in milliseconds.
    pub reconnect_max_delay_ms: u64,
    /// Offer gzip and zstd compression in the handshake (used only when both sides agree).
    pub enable_compression: bool,
    /// The algorithms offered when `enable_compression` is on, in order of preference
    /// (default zstd, then gzip). `Compression::None` entries are ignored.
    pub compression_codecs: Vec<Compression>,
    /// Envelopes larger than this many bytes are compressed when compression was negotiated.
    pub compression_threshold: usize,
    /// Interval between heartbeat probes, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// A peer silent for this long is declared down, in milliseconds.
    pub heartbeat_timeout_ms: u64,
    /// Default timeout of [`Node::request`](crate::Node::request) callers that pass none, in
    /// milliseconds.
    pub request_timeout_ms: u64,
    /// Messages that may wait to go out to one peer.
    pub outbound_queue_capacity: usize,
    /// Payload bytes that may wait to go out to one peer, counting payloads of 4 KiB or more
    /// (smaller ones are bounded by `outbound_queue_capacity`). Past it a sender meets the
    /// [`backpressure`](Self::backpressure) policy (it waits, or gets
    /// [`QueueBytesFull`](crate::TransportError::QueueBytesFull)), and a hub relaying to a slow
    /// peer holds back the link the message came from. A single message larger than this goes
    /// in when nothing else counted is waiting. Without it, a peer that stops reading could hold
    /// `outbound_queue_capacity` × `max_message_size` bytes of its node's memory.
    pub outbound_queue_bytes: usize,
    /// Received messages that may wait for [`Node::receive`](crate::Node::receive).
    pub inbound_queue_capacity: usize,
    /// Payload bytes that may wait for [`Node::receive`](crate::Node::receive), and as many
    /// in each [`Subscription`](crate::Subscription), counting payloads of 4 KiB or more
    /// (smaller ones are bounded by `inbound_queue_capacity` and `subscription_capacity`);
    /// beyond, links' readers wait. A single message larger than this is let in when nothing
    /// else counted is waiting. Keeps a stream of large messages from piling up (the memory
    /// and the cache misses cost more than the wait: see docs/PERFORMANCE.md).
    pub inbound_queue_bytes: usize,
    /// Events that may wait in one [`Subscription`](crate::Subscription).
    pub subscription_capacity: usize,
    /// Requests that may await a response at once.
    pub max_pending_requests: usize,
    /// Peers a listening node accepts at once.
    pub max_peers: usize,
    /// What a sender experiences at a full outbound queue.
    pub backpressure: Backpressure,
    /// The protocol version offered in the handshake (override only to test negotiation).
    pub protocol_version: ProtocolVersion,
    /// Metadata sent in this node's `Hello` / `HelloAck` (e.g. a token for the authenticator).
    pub metadata: Metadata,
    /// Decides whether a listening node accepts a peer; `None` accepts everyone.
    pub authenticator: Option<Arc<dyn Authenticator>>,
    /// Certificates and verification for the TLS-based schemes (`tls://`, later `wss://` and
    /// `quic://`); ignored by the others.
    pub tls: TlsConfig,
}

/// TLS material and policy, as PEM bytes (no TLS library types, so every TLS-based backend
/// shares it).
///
/// A listener needs `cert_chain_pem` and `key_pem`; with `require_client_cert` it also needs
/// `ca_pem`, the CAs client certificates must chain to (mutual TLS). A dialer verifies the
/// server against `ca_pem` (and the name in the URL, or `server_name`); it presents
/// `client_cert_pem`/`client_key_pem` when the listener asks. Verification is never skipped
/// unless `dangerous_accept_any_server_certificate` is set.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// The listener's certificate chain, leaf first (PEM).
    pub cert_chain_pem: Option<Vec<u8>>,
    /// The listener's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Option<Vec<u8>>,
    /// CA certificates (PEM): the dialer's trust roots, and the listener's roots for client
    /// certificates under mutual TLS.
    pub ca_pem: Option<Vec<u8>>,
    /// The dialer's certificate chain for mutual TLS (PEM).
    pub client_cert_pem: Option<Vec<u8>>,
    /// The dialer's private key for mutual TLS (PEM).
    pub client_key_pem: Option<Vec<u8>>,
    /// The listener refuses clients without a certificate signed by `ca_pem`.
    pub require_client_cert: bool,
    /// The name the dialer verifies the server certificate against (default: the URL's host).
    pub server_name: Option<String>,
    /// Accept any server certificate: no protection against an active attacker. For tests and
    /// closed networks only; the name says so on purpose.
    pub dangerous_accept_any_server_certificate: bool,
}

impl TlsConfig {
    /// A listener's certificate chain and key, read from PEM files.
    pub fn from_pem_files(
        cert_chain: impl AsRef<std::path::Path>,
        key: impl AsRef<std::path::Path>,
    ) -> std::io::Result<Self> {
        Ok(TlsConfig {
            cert_chain_pem: Some(std::fs::read(cert_chain)?),
            key_pem: Some(std::fs::read(key)?),
            ..TlsConfig::default()
        })
    }

    /// Adds trusted CA certificates read from a PEM file.
    pub fn with_ca_file(mut self, ca: impl AsRef<std::path::Path>) -> std::io::Result<Self> {
        self.ca_pem = Some(std::fs::read(ca)?);
        Ok(self)
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        let some = |o: &Option<Vec<u8>>| if o.is_some() { "<pem>" } else { "-" };
        f.debug_struct("TlsConfig")
            .field("cert_chain_pem", &some(&self.cert_chain_pem))
            .field("key_pem", &some(&self.key_pem))
            .field("ca_pem", &some(&self.ca_pem))
            .field("client_cert_pem", &some(&self.client_cert_pem))
            .field("client_key_pem", &some(&self.client_key_pem))
            .field("require_client_cert", &self.require_client_cert)
            .field("server_name", &self.server_name)
            .field("dangerous_accept_any_server_certificate", &self.dangerous_accept_any_server_certificate)
            .finish()
    }
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            max_message_size: 16 * 1024 * 1024,
            connection_timeout_ms: 10_000,
            retry_attempts: 5,
            reconnect_base_delay_ms: 100,
            reconnect_max_delay_ms: 5_000,
            enable_compression: false,
            compression_codecs: vec![Compression::Zstd, Compression::Gzip],
            compression_threshold: 4096,
            heartbeat_interval_ms: 5_000,
            heartbeat_timeout_ms: 15_000,
            request_timeout_ms: 30_000,
            outbound_queue_capacity: 4096,
            outbound_queue_bytes: 2 * 1024 * 1024,
            inbound_queue_capacity: 4096,
            inbound_queue_bytes: 2 * 1024 * 1024,
            subscription_capacity: 1024,
            max_pending_requests: 65_536,
            max_peers: 4096,
            backpressure: Backpressure::Wait,
            protocol_version: ProtocolVersion::CURRENT,
            metadata: Metadata::new(),
            authenticator: None,
            tls: TlsConfig::default(),
        }
    }
}

impl TransportConfig {
    /// [`connection_timeout_ms`](Self::connection_timeout_ms) as a `Duration`.
    pub fn connection_timeout(&self) -> Duration {
        Duration::from_millis(self.connection_timeout_ms)
    }

    /// The delay before redial attempt `attempt` (1-based): exponential from
    /// `reconnect_base_delay_ms`, capped at `reconnect_max_delay_ms`, with "equal jitter" (a
    /// random point in the upper half) so that many clients of one hub do not redial in step.
    pub fn reconnect_delay(&self, attempt: u32) -> Duration {
        let exp = self.reconnect_base_delay_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(30));
        let capped = exp.min(self.reconnect_max_delay_ms).max(1);
        let half = capped / 2;
        Duration::from_millis(half + fastrand::u64(0..=capped - half))
    }

    /// [`heartbeat_interval_ms`](Self::heartbeat_interval_ms) as a `Duration`.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.max(1))
    }

    /// [`heartbeat_timeout_ms`](Self::heartbeat_timeout_ms) as a `Duration`.
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms.max(1))
    }

    /// [`request_timeout_ms`](Self::request_timeout_ms) as a `Duration`.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Sets the authenticator (builder style).
    pub fn with_authenticator(mut self, auth: impl Authenticator) -> Self {
        self.authenticator = Some(Arc::new(auth));
        self
    }
}

impl fmt::Debug for TransportConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportConfig")
            .field("max_message_size", &self.max_message_size)
            .field("connection_timeout_ms", &self.connection_timeout_ms)
            .field("retry_attempts", &self.retry_attempts)
            .field("reconnect_base_delay_ms", &self.reconnect_base_delay_ms)
            .field("reconnect_max_delay_ms", &self.reconnect_max_delay_ms)
            .field("enable_compression", &self.enable_compression)
            .field("compression_codecs", &self.compression_codecs)
            .field("compression_threshold", &self.compression_threshold)
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("heartbeat_timeout_ms", &self.heartbeat_timeout_ms)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("outbound_queue_capacity", &self.outbound_queue_capacity)
            .field("outbound_queue_bytes", &self.outbound_queue_bytes)
            .field("inbound_queue_capacity", &self.inbound_queue_capacity)
            .field("subscription_capacity", &self.subscription_capacity)
            .field("max_pending_requests", &self.max_pending_requests)
            .field("max_peers", &self.max_peers)
            .field("backpressure", &self.backpressure)
            .field("protocol_version", &self.protocol_version)
            .field("metadata", &self.metadata)
            .field("authenticator", &self.authenticator.as_ref().map(|_| "<authenticator>"))
            .field("tls", &self.tls)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delay_grows_is_capped_and_jittered() {
        let c = TransportConfig {
            reconnect_base_delay_ms: 100,
            reconnect_max_delay_ms: 1000,
            ..Default::default()
        };
        for _ in 0..100 {
            let d1 = c.reconnect_delay(1).as_millis();
            assert!((50..=100).contains(&d1), "{d1}");
            let d3 = c.reconnect_delay(3).as_millis();
            assert!((200..=400).contains(&d3), "{d3}");
            let d20 = c.reconnect_delay(20).as_millis();
            assert!((500..=1000).contains(&d20), "{d20}");
        }
        let spread: std::collections::BTreeSet<u128> =
            (0..50).map(|_| c.reconnect_delay(4).as_millis()).collect();
        assert!(spread.len() > 1, "no jitter");
    }
}

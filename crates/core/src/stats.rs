//! Statistics: counters kept with relaxed atomics, read as a [`TransportStats`] snapshot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hivewire_protocol::AgentId;

/// A snapshot of a node's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Messages handed to links (all peers).
    pub messages_sent: u64,
    /// Messages received from links (all peers).
    pub messages_received: u64,
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Link failures, protocol violations and failed sends.
    pub errors: u64,
    /// Messages dropped because their hop limit reached zero.
    pub dropped_ttl: u64,
    /// Messages dropped because no peer leads to their destination.
    pub dropped_unroutable: u64,
    /// Events no subscription wanted, responses no request awaited, spoofed sources.
    pub dropped_unmatched: u64,
    /// Handshakes that failed (rejected, timed out or malformed).
    pub handshake_failures: u64,
    /// Time since the node was created.
    pub uptime: Duration,
    /// One entry per connected peer.
    pub peers: Vec<PeerStats>,
    /// The backend's own counters (e.g. udp's malformed datagrams, reassembly timeouts), by
    /// name; empty for backends that keep none.
    pub backend: Vec<(&'static str, u64)>,
}

/// Counters of one connected peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    /// The peer's agent id.
    pub agent: AgentId,
    /// Smoothed heartbeat round-trip time, once measured.
    pub rtt: Option<Duration>,
    /// Messages sent to this peer.
    pub messages_sent: u64,
    /// Messages received from this peer.
    pub messages_received: u64,
    /// Messages waiting in the outbound queue.
    pub queued: usize,
    /// Payload bytes of the large messages (4 KiB or more) among them: what
    /// `outbound_queue_bytes` bounds.
    pub queued_bytes: usize,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub messages_sent: AtomicU64,
    pub messages_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub errors: AtomicU64,
    pub dropped_ttl: AtomicU64,
    pub dropped_unroutable: AtomicU64,
    pub dropped_unmatched: AtomicU64,
    pub handshake_failures: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self, uptime: Duration, peers: Vec<PeerStats>) -> TransportStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TransportStats {
            messages_sent: g(&self.messages_sent),
            messages_received: g(&self.messages_received),
            bytes_sent: g(&self.bytes_sent),
            bytes_received: g(&self.bytes_received),
            errors: g(&self.errors),
            dropped_ttl: g(&self.dropped_ttl),
            dropped_unroutable: g(&self.dropped_unroutable),
            dropped_unmatched: g(&self.dropped_unmatched),
            handshake_failures: g(&self.handshake_failures),
            uptime,
            peers,
            backend: Vec::new(),
        }
    }
}

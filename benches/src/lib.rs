//! Criterion benchmarks of hivewire: `cargo bench -p hivewire-benches`.
//!
//! * `codec`: encode + decode of the envelope with 64 B, 1 KiB and 64 KiB payloads, MessagePack
//!   (the project's codec) beside serde_json of the same `Message`, with and without gzip/zstd;
//! * `inproc`: the in-process round trip beside a raw pair of tokio mpsc channels.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use bytes::Bytes;
use hivewire_protocol::{Message, MessageType};

/// An event with a payload of `len` bytes (compressible: a repeated pattern of text).
pub fn event(len: usize) -> Message {
    let text = b"sensor reading 41.5 celsius, arm joint 3, nominal. ";
    let payload: Vec<u8> = text.iter().copied().cycle().take(len).collect();
    let mut m = Message::new("bench-agent", MessageType::Event { topic: "sensors.arm.temp".into() })
        .with_payload_bytes(Bytes::from(payload))
        .with_header("trace", "4bf92f3577b34da6");
    m.timestamp_ms = 1_700_000_000_000;
    m
}

#[cfg(test)]
mod tests {
    #[test]
    fn event_has_the_requested_size() {
        assert_eq!(super::event(1024).payload.len(), 1024);
        assert_eq!(super::event(0).payload.len(), 0);
    }
}

//! hivewire's frame format: one versioned frame for every byte-oriented backend.
//!
//! ```text
//! offset  size  field
//! 0       2     magic 0x48 0x57 ("HW")
//! 2       1     frame version = 1
//! 3       1     flags: bits 0-1 compression (0 none, 1 gzip, 2 zstd, 3 reserved); bits 2-7 zero
//! 4       4     body length, u32 big-endian
//! 8       len   body: the MessagePack envelope of a Message, compressed as a whole if flagged
//! ```
//!
//! Every limit is checked before memory is committed: the header's length against
//! `max_message_size + ENVELOPE_ALLOWANCE` before anything is reserved, and decompression stops
//! at that same bound (no decompression bombs). Compression is used only when the two sides
//! negotiated it, only for envelopes over `compression_threshold`, and only if the result is
//! smaller. The full specification is `docs/WIRE.md`.
//!
//! ```
//! use bytes::BytesMut;
//! use hivewire_codec::{CodecConfig, Compression, FrameCodec};
//! use hivewire_protocol::Message;
//!
//! let config = CodecConfig { compression: Compression::Zstd, accept_zstd: true, ..CodecConfig::default() };
//! let mut codec = FrameCodec::new(config);
//! let msg = Message::event("sensor-1", "sensors.arm.temp", &41.5f64)?;
//! let mut wire = BytesMut::new();
//! codec.encode_into(&msg, &mut wire)?;
//! assert_eq!(&wire[..2], b"HW");
//! let back = codec.decode_from(&mut wire)?.expect("a whole frame");
//! assert_eq!(back, msg);
//! assert!(wire.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod blocks;
mod compress;
mod fast;
mod frame;

pub use frame::{
    decode_envelope, decode_envelope_serde, encode_envelope, encode_envelope_serde, CodecConfig, CodecError,
    Compression, FrameCodec, InPlace, ENVELOPE_ALLOWANCE, FRAME_VERSION, HEADER_LEN, MAGIC,
    SPLIT_PAYLOAD_MIN,
};

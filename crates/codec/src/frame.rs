//! The frame: header, envelope, compression, limits, and the tokio-util codec.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hivewire_protocol::Message;
use tokio_util::codec::{Decoder, Encoder};

use crate::compress::Compressors;

/// The first two bytes of every frame: `HW`.
pub const MAGIC: [u8; 2] = *b"HW";
/// The frame version this codec writes and reads.
pub const FRAME_VERSION: u8 = 1;
/// Bytes of the frame header.
pub const HEADER_LEN: usize = 8;
/// Bytes of envelope (ids, topic, headers, …) allowed beyond `max_message_size` of payload.
pub const ENVELOPE_ALLOWANCE: usize = 64 * 1024;

const FLAG_COMPRESSION_MASK: u8 = 0b0000_0011;

/// Payloads of at least this many bytes are left out of the frame by
/// [`FrameCodec::encode_split`], for the caller to write from their own memory.
pub const SPLIT_PAYLOAD_MIN: usize = 8 * 1024;

/// A compression algorithm for frame bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Compression {
    /// No compression.
    #[default]
    None,
    /// gzip (RFC 1952), via flate2's zlib-rs backend.
    Gzip,
    /// zstd (RFC 8878), with the content size in the frame header.
    Zstd,
}

impl Compression {
    fn flag(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Zstd => 2,
        }
    }
}

/// Limits and compression settings of one codec (one direction pair of one link).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecConfig {
    /// Largest payload in bytes; a frame body may be up to this plus [`ENVELOPE_ALLOWANCE`],
    /// compressed and decompressed.
    pub max_message_size: usize,
    /// Compression of outgoing frames (set only when both sides negotiated it).
    pub compression: Compression,
    /// Only envelopes larger than this are compressed.
    pub compression_threshold: usize,
    /// Incoming gzip frames are accepted.
    pub accept_gzip: bool,
    /// Incoming zstd frames are accepted.
    pub accept_zstd: bool,
}

impl Default for CodecConfig {
    fn default() -> Self {
        CodecConfig {
            max_message_size: 16 * 1024 * 1024,
            compression: Compression::None,
            compression_threshold: 4096,
            accept_gzip: false,
            accept_zstd: false,
        }
    }
}

impl CodecConfig {
    /// The largest frame body accepted or produced.
    pub fn max_body(&self) -> usize {
        self.max_message_size.saturating_add(ENVELOPE_ALLOWANCE).min(u32::MAX as usize)
    }
}

/// Why a frame could not be encoded or decoded. After a decode error the stream is corrupt:
/// the link must be closed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The payload exceeds `max_message_size` (or the envelope its allowance); nothing written.
    #[error("message too large: {size} bytes, max {max}")]
    MessageTooLarge {
        /// Offending size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A frame header announces a body over the limit (nothing was allocated for it).
    #[error("frame too large: {size} bytes, max {max}")]
    FrameTooLarge {
        /// Announced body length.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The frame does not start with `HW`.
    #[error("bad magic {0:02x?}: not a hivewire frame")]
    BadMagic([u8; 2]),
    /// A frame version this codec does not speak.
    #[error("unsupported frame version {0}")]
    UnsupportedVersion(u8),
    /// Reserved flag bits are set.
    #[error("reserved flag bits set: {0:#010b}")]
    ReservedFlags(u8),
    /// The compression field holds the reserved value 3.
    #[error("unknown compression {0}")]
    UnknownCompression(u8),
    /// A compressed frame arrived with an algorithm that was not negotiated.
    #[error("{0:?} frame received but not negotiated")]
    CompressionNotNegotiated(Compression),
    /// Decompression would exceed the limit (a decompression bomb).
    #[error("decompressed body exceeds {max} bytes")]
    DecompressedTooLarge {
        /// The limit.
        max: usize,
    },
    /// The compressed body is corrupt.
    #[error("decompression failed: {0}")]
    Decompress(String),
    /// The compressor failed.
    #[error("compression failed: {0}")]
    Compress(String),
    /// The message could not be encoded.
    #[error("envelope encode failed: {0}")]
    Encode(String),
    /// The body is not a valid envelope.
    #[error("envelope decode failed: {0}")]
    Decode(String),
    /// A buffer that must hold exactly one frame holds more or fewer bytes than its header
    /// announces (see [`FrameCodec::decode_in_place`]).
    #[error("{actual} bytes where one frame of {expected} was expected")]
    FrameLength {
        /// Header plus body length, from the header.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// The underlying stream failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// A frame decoded where it lies (see [`FrameCodec::decode_in_place`]).
#[derive(Debug)]
pub enum InPlace {
    /// Every field of the message but its payload, which is left empty; the payload is the
    /// range `payload` of the frame, not copied.
    Lent {
        /// The message with an empty payload.
        envelope: Message,
        /// Where the payload lies in the frame.
        payload: std::ops::Range<usize>,
    },
    /// A frame whose payload cannot be read where it lies (a compressed frame, or an envelope
    /// laid out by another encoder): decoded as [`FrameCodec::decode_from`] does, with a copy.
    Copied(Message),
}

/// Appends the bare MessagePack envelope of `msg` to `dst` (no header, no compression).
pub fn encode_envelope(msg: &Message, dst: &mut BytesMut) -> Result<(), CodecError> {
    crate::fast::encode(msg, dst).map_err(|e| CodecError::Encode(e.to_string()))
}

/// The same envelope through rmp-serde's generic path (the reference the hand-written encoder
/// is checked against).
pub fn encode_envelope_serde(msg: &Message, dst: &mut BytesMut) -> Result<(), CodecError> {
    let mut w = dst.writer();
    rmp_serde::encode::write(&mut w, msg).map_err(|e| CodecError::Encode(e.to_string()))
}

/// The envelope as it is decoded: the same layout as `Message`, with the payload borrowed from
/// the frame so that the message's payload can share the frame's memory instead of copying it.
#[derive(serde::Deserialize)]
struct EnvelopeRef<'a> {
    id: hivewire_protocol::MessageId,
    correlation_id: Option<hivewire_protocol::MessageId>,
    source: hivewire_protocol::AgentId,
    destination: Option<hivewire_protocol::AgentId>,
    kind: hivewire_protocol::MessageType,
    headers: hivewire_protocol::Headers,
    priority: u8,
    ttl: u8,
    timestamp_ms: u64,
    sequence: u64,
    #[serde(borrow, with = "serde_bytes")]
    payload: &'a [u8],
}

/// Decodes a bare MessagePack envelope. The payload of the result is a slice of `src` (no copy).
pub fn decode_envelope(src: Bytes) -> Result<Message, CodecError> {
    if let Some(m) = crate::fast::decode(&src) {
        return Ok(m);
    }
    decode_envelope_serde(src)
}

/// The same decoding through rmp-serde only (the reference the hand-written decoder is checked
/// against; it also accepts encodings the fast path does not, such as structs as maps).
pub fn decode_envelope_serde(src: Bytes) -> Result<Message, CodecError> {
    let e: EnvelopeRef<'_> = rmp_serde::from_slice(&src).map_err(|e| CodecError::Decode(e.to_string()))?;
    let payload = src.slice_ref(e.payload);
    Ok(Message {
        id: e.id,
        correlation_id: e.correlation_id,
        source: e.source,
        destination: e.destination,
        kind: e.kind,
        headers: e.headers,
        priority: e.priority,
        ttl: e.ttl,
        timestamp_ms: e.timestamp_ms,
        sequence: e.sequence,
        payload,
    })
}

/// The frame codec: encoder and decoder with reusable buffers and compression contexts.
pub struct FrameCodec {
    config: CodecConfig,
    compressors: Compressors,
    scratch: BytesMut,
    zbuf: Vec<u8>,
    ids: crate::fast::IdCache,
    /// The encoder's side of what `ids` is to the decoder: the last middle fields written.
    sent: Option<Box<crate::fast::Middle>>,
}

impl std::fmt::Debug for FrameCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameCodec").field("config", &self.config).finish()
    }
}

impl FrameCodec {
    /// A codec with `config`.
    pub fn new(config: CodecConfig) -> Self {
        FrameCodec {
            config,
            compressors: Compressors::new(),
            scratch: BytesMut::new(),
            zbuf: Vec::new(),
            ids: Default::default(),
            sent: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CodecConfig {
        &self.config
    }

    /// Sets the compression of outgoing frames.
    pub fn set_compression(&mut self, c: Compression) {
        self.config.compression = c;
    }

    /// Sets which compressed incoming frames are accepted.
    pub fn set_accept(&mut self, gzip: bool, zstd: bool) {
        self.config.accept_gzip = gzip;
        self.config.accept_zstd = zstd;
    }

    /// Appends one frame carrying `msg` to `dst`.
    pub fn encode_into(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode_frame(msg, dst, true)
    }

    /// Like [`encode_into`](Self::encode_into), but for a payload of at least
    /// [`SPLIT_PAYLOAD_MIN`] bytes, when this codec does not compress, it leaves the payload's bytes
    /// out: `Ok(true)` means `dst` ends with a frame that the caller completes by writing
    /// `msg.payload` right after it (a vectored write sends a large payload without copying
    /// it). `Ok(false)`: the frame in `dst` is whole.
    pub fn encode_split(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<bool, CodecError> {
        // A compressing codec compresses the whole body: only an uncompressed frame splits.
        let split = msg.payload.len() >= SPLIT_PAYLOAD_MIN && self.config.compression == Compression::None;
        self.encode_frame(msg, dst, !split)?;
        Ok(split)
    }

    fn encode_frame(
        &mut self,
        msg: &Message,
        dst: &mut BytesMut,
        with_payload: bool,
    ) -> Result<(), CodecError> {
        let max = self.config.max_message_size;
        if msg.payload.len() > max {
            return Err(CodecError::MessageTooLarge { size: msg.payload.len(), max });
        }
        let start = dst.len();
        if with_payload {
            dst.reserve(HEADER_LEN + msg.payload.len() + 128);
        }
        // Flags and length are filled in below, once known.
        dst.put_slice(&[MAGIC[0], MAGIC[1], FRAME_VERSION, 0, 0, 0, 0, 0]);
        let body_start = dst.len();
        if let Err(e) = crate::fast::encode_head(msg, dst, with_payload, Some(&mut self.sent)) {
            dst.truncate(start);
            return Err(CodecError::Encode(e.to_string()));
        }
        let written = dst.len() - body_start;
        let body_len = if with_payload { written } else { written + msg.payload.len() };
        let envelope = body_len - msg.payload.len();
        if envelope > ENVELOPE_ALLOWANCE {
            dst.truncate(start);
            return Err(CodecError::MessageTooLarge { size: envelope, max: ENVELOPE_ALLOWANCE });
        }
        let mut flags = 0u8;
        let mut final_len = body_len;
        if with_payload
            && self.config.compression != Compression::None
            && body_len > self.config.compression_threshold
        {
            let body = &dst[body_start..];
            let r = match self.config.compression {
                Compression::Gzip => self.compressors.gzip(body, &mut self.zbuf),
                Compression::Zstd => self.compressors.zstd(body, &mut self.zbuf),
                Compression::None => Ok(()),
            };
            if let Err(e) = r {
                dst.truncate(start);
                return Err(e);
            }
            // Keep the compressed form only when it actually saves bytes.
            if self.zbuf.len() < body_len {
                dst.truncate(body_start);
                dst.extend_from_slice(&self.zbuf);
                flags = self.config.compression.flag();
                final_len = self.zbuf.len();
            }
        }
        if final_len > self.config.max_body() {
            dst.truncate(start);
            return Err(CodecError::MessageTooLarge { size: final_len, max: self.config.max_body() });
        }
        dst[start + 3] = flags;
        // final_len <= max_body <= u32::MAX.
        dst[start + 4..start + 8].copy_from_slice(&(final_len as u32).to_be_bytes());
        Ok(())
    }

    /// Takes one frame off the front of `src`: `Ok(None)` if more bytes are needed. Nothing is
    /// reserved in `src` then: the reader decides where the rest goes ([`frame_len`] gives the
    /// frame's length once its header is in; a large frame may go to a block of its own).
    ///
    /// [`frame_len`]: Self::frame_len
    pub fn decode_from(&mut self, src: &mut BytesMut) -> Result<Option<Message>, CodecError> {
        let Some((compression, len)) = self.check_head(src)? else {
            return Ok(None);
        };
        if src.len() < HEADER_LEN + len {
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let body = src.split_to(len).freeze();
        self.decode_frame_body(compression, body)
    }

    /// Takes one frame off the front of `src`, as [`decode_from`](Self::decode_from) does,
    /// from bytes that are already frozen (a receive block of [`crate::blocks`]): `Ok(None)` if
    /// `src` does not hold a whole frame, and then nothing is taken.
    pub fn decode_from_bytes(&mut self, src: &mut Bytes) -> Result<Option<Message>, CodecError> {
        let Some((compression, len)) = self.check_head(src)? else {
            return Ok(None);
        };
        if src.len() < HEADER_LEN + len {
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let body = src.split_to(len);
        self.decode_frame_body(compression, body)
    }

    /// The length of the frame at the front of `src`, header included, once its header is in
    /// `src` (checked as decoding checks it); `Ok(None)` while `src` is shorter than a header.
    /// Lets a reader make room for the whole frame before reading the rest of it.
    pub fn frame_len(&self, src: &[u8]) -> Result<Option<usize>, CodecError> {
        Ok(self.check_head(src)?.map(|(_, len)| HEADER_LEN + len))
    }

    /// Decodes a frame's body. Returns `Option` although it always decodes a message: the
    /// common frame goes straight from the decoder into the caller's result (a message is
    /// ~200 bytes, and every re-wrapping on the way out, such as `.map(Some)`, moves it once
    /// more).
    #[inline(always)]
    fn decode_frame_body(
        &mut self,
        compression: Compression,
        body: Bytes,
    ) -> Result<Option<Message>, CodecError> {
        if matches!(compression, Compression::None) {
            // Wrapped as it comes (not bound and re-wrapped, one move more).
            let decoded = crate::fast::decode_cached(&body, &mut self.ids);
            if let Some(msg) = &decoded {
                self.check_payload(msg.payload.len())?;
                return Ok(decoded);
            }
        }
        self.decode_body(compression, body).map(Some)
    }

    /// Decodes a frame body the fast decoder did not take: compressed, or an uncompressed
    /// envelope laid out by another encoder.
    #[cold]
    fn decode_body(&mut self, compression: Compression, body: Bytes) -> Result<Message, CodecError> {
        let msg = match compression {
            Compression::None => decode_envelope_serde(body)?,
            Compression::Gzip => {
                self.compressors.gunzip(&body, self.config.max_body(), &mut self.zbuf)?;
                self.decode_scratch()?
            }
            Compression::Zstd => {
                self.compressors.unzstd(&body, self.config.max_body(), &mut self.zbuf)?;
                self.decode_scratch()?
            }
        };
        self.check_payload(msg.payload.len())?;
        Ok(msg)
    }

    /// Decodes `frame`, which must be exactly one whole frame (a shared-memory ring record),
    /// without copying its payload when it can be read where it lies: an uncompressed frame
    /// laid out as this codec encodes gives [`InPlace::Lent`], anything else valid is decoded
    /// with a copy ([`InPlace::Copied`]). The same checks and limits as
    /// [`decode_from`](Self::decode_from) apply.
    pub fn decode_in_place(&mut self, frame: &[u8]) -> Result<InPlace, CodecError> {
        let head = self.check_head(frame)?;
        let expected = head.map_or(HEADER_LEN, |(_, len)| HEADER_LEN + len);
        if frame.len() != expected || head.is_none() {
            return Err(CodecError::FrameLength { expected, actual: frame.len() });
        }
        if let Some((Compression::None, _)) = head {
            if let Some((envelope, at)) = crate::fast::decode_head(&frame[HEADER_LEN..], &mut self.ids) {
                let payload = HEADER_LEN + at..frame.len();
                self.check_payload(payload.len())?;
                return Ok(InPlace::Lent { envelope, payload });
            }
        }
        let mut copy = BytesMut::from(frame);
        match self.decode_from(&mut copy)? {
            Some(m) => Ok(InPlace::Copied(m)),
            None => Err(CodecError::FrameLength { expected, actual: frame.len() }),
        }
    }

    fn check_payload(&self, len: usize) -> Result<(), CodecError> {
        if len > self.config.max_message_size {
            return Err(CodecError::FrameTooLarge { size: len, max: self.config.max_message_size });
        }
        Ok(())
    }

    /// Checks a frame's header: its compression and body length, or `None` if `src` is
    /// shorter than a header.
    #[inline]
    fn check_head(&self, src: &[u8]) -> Result<Option<(Compression, usize)>, CodecError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        if src[0..2] != MAGIC {
            return Err(CodecError::BadMagic([src[0], src[1]]));
        }
        if src[2] != FRAME_VERSION {
            return Err(CodecError::UnsupportedVersion(src[2]));
        }
        let flags = src[3];
        if flags & !FLAG_COMPRESSION_MASK != 0 {
            return Err(CodecError::ReservedFlags(flags));
        }
        let compression = match flags & FLAG_COMPRESSION_MASK {
            0 => Compression::None,
            1 => Compression::Gzip,
            2 => Compression::Zstd,
            other => return Err(CodecError::UnknownCompression(other)),
        };
        let len = u32::from_be_bytes([src[4], src[5], src[6], src[7]]) as usize;
        let max_body = self.config.max_body();
        if len > max_body {
            return Err(CodecError::FrameTooLarge { size: len, max: max_body });
        }
        match compression {
            Compression::Gzip if !self.config.accept_gzip => {
                return Err(CodecError::CompressionNotNegotiated(compression))
            }
            Compression::Zstd if !self.config.accept_zstd => {
                return Err(CodecError::CompressionNotNegotiated(compression))
            }
            _ => {}
        }
        Ok(Some((compression, len)))
    }

    fn decode_scratch(&mut self) -> Result<Message, CodecError> {
        self.scratch.clear();
        self.scratch.extend_from_slice(&self.zbuf);
        let body = self.scratch.split().freeze();
        match crate::fast::decode_cached(&body, &mut self.ids) {
            Some(m) => Ok(m),
            None => decode_envelope_serde(body),
        }
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = CodecError;
    fn encode(&mut self, item: Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode_into(&item, dst)
    }
}

impl Encoder<&Message> for FrameCodec {
    type Error = CodecError;
    fn encode(&mut self, item: &Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode_into(item, dst)
    }
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = CodecError;
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, CodecError> {
        let msg = self.decode_from(src)?;
        if msg.is_none() {
            // Room for the rest of the frame (its length is within the checked limit).
            if let Some(total) = self.frame_len(src)? {
                src.reserve(total.saturating_sub(src.len()));
            }
        }
        Ok(msg)
    }
}

//! An upgraded WebSocket connection as an engine [`Link`]: binary messages carry whole codec
//! frames.
//!
//! tungstenite does the HTTP upgrade; after it, this module frames the WebSocket itself
//! (RFC 6455 §5: a 2–14 byte header, the client's mask), because the data path then costs what
//! a raw socket costs:
//!
//! * outgoing, the frames of one engine batch are encoded straight after a reserved WebSocket
//!   header into one buffer of up to [`BATCH_BYTES`] (a frame is never split across messages),
//!   masked in place by a client, and handed to the shared writer, which writes it (and any
//!   rest a cancelled write left) progressively, so a cancelled send never cuts a frame;
//! * incoming, a message is unmasked in place in the read buffer and split off it, so the codec
//!   slices payloads out of the bytes read from the socket without copying them again.
//!
//! Incoming binary messages may hold one or more whole frames, in one WebSocket frame or
//! fragmented over several. A text message, a message that ends inside a frame, reserved bits
//! (no extension is negotiated), an unmasked frame from a client or a masked one from a server,
//! or a message over the limit is a protocol error that closes this link only. Pings are
//! answered; pings are sent every `ping_every`.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hivewire_codec::blocks;
use hivewire_codec::{CodecConfig, FrameCodec, HEADER_LEN};
use hivewire_core::link::{begin_block, fill_block, read_some};
use hivewire_core::{Link, LinkRx, LinkSettings, LinkTx, Message, PeerInfo, TransportError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Mutex, OwnedSemaphorePermit};
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

/// Frames of one batch are packed into binary messages of about this many bytes.
pub const BATCH_BYTES: usize = 64 * 1024;
/// Room reserved in front of a message for its WebSocket header (2 + 8 length + 4 mask).
const WS_HEADER_MAX: usize = 14;
const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Which end of the connection this is: a client masks what it sends (RFC 6455 §5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Client,
    Server,
}

/// The write half and its buffer, shared by the engine's writer, the pinger and the reader
/// (which answers pings).
///
/// Cancel-safe: a WebSocket frame goes into `out` whole before any of it is written, and each
/// write consumes what it wrote, so a write abandoned midway (a sender's future dropped, the
/// reader's `recv` polled once and dropped while answering a ping) leaves the rest of its frame
/// in `out`, and whoever writes next sends that first. Frames are never cut or interleaved.
struct Writer<S> {
    io: WriteHalf<S>,
    role: Role,
    closed: bool,
    /// Whole frames committed to the connection and not yet written.
    out: BytesMut,
}

impl<S: AsyncWrite> Writer<S> {
    /// Writes what `out` holds.
    async fn drain(&mut self) -> std::io::Result<()> {
        while !self.out.is_empty() {
            let n = self.io.write(&self.out).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.out.advance(n);
        }
        Ok(())
    }

    /// Writes one control frame (ping, pong, close).
    async fn control(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        if self.closed {
            return Ok(());
        }
        self.drain().await?;
        self.out.put_bytes(0, WS_HEADER_MAX);
        self.out.extend_from_slice(payload);
        let key = mask_key(self.role);
        if let Some(key) = key {
            apply_mask(&mut self.out[WS_HEADER_MAX..], key);
        }
        let start = finish_message(&mut self.out, opcode, key);
        self.out.advance(start);
        self.drain().await?;
        self.io.flush().await
    }
}

/// A fresh masking key for a message sent by a client (RFC 6455 §5.3); none for a server.
fn mask_key(role: Role) -> Option<[u8; 4]> {
    (role == Role::Client).then(|| fastrand::u32(..).to_ne_bytes())
}

/// Fills in the WebSocket header in front of `buf[WS_HEADER_MAX..]` (the payload, already
/// masked with `key` by a client); returns where the message starts in `buf`.
fn finish_message(buf: &mut BytesMut, opcode: u8, key: Option<[u8; 4]>) -> usize {
    let len = buf.len() - WS_HEADER_MAX;
    let mut header = [0u8; WS_HEADER_MAX];
    header[0] = 0x80 | opcode;
    let mask_bit = if key.is_some() { 0x80 } else { 0 };
    let mut n = 2;
    if len < 126 {
        header[1] = mask_bit | len as u8;
    } else if len <= u16::MAX as usize {
        header[1] = mask_bit | 126;
        header[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        n = 4;
    } else {
        header[1] = mask_bit | 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        n = 10;
    }
    if let Some(key) = key {
        header[n..n + 4].copy_from_slice(&key);
        n += 4;
    }
    let start = WS_HEADER_MAX - n;
    buf[start..WS_HEADER_MAX].copy_from_slice(&header[..n]);
    start
}

/// `key` rotated so that masking a slice that starts `offset` bytes into a message lines up
/// with the message's first byte.
fn key_at(key: [u8; 4], offset: usize) -> [u8; 4] {
    let r = offset % 4;
    [key[r], key[(r + 1) % 4], key[(r + 2) % 4], key[(r + 3) % 4]]
}

/// Appends `src` masked with `key` (already rotated to `dst`'s position in its message) in
/// one pass over `src`: each piece is copied in and masked where it landed while it is still
/// in the L1 cache, so a large payload is read once and written once, as a plain copy would.
fn extend_masked(dst: &mut BytesMut, src: &[u8], key: [u8; 4]) {
    // A multiple of 4, so every piece starts at the same phase of the key.
    const PIECE: usize = 4096;
    dst.reserve(src.len());
    for piece in src.chunks(PIECE) {
        let at = dst.len();
        dst.extend_from_slice(piece);
        apply_mask(&mut dst[at..], key);
    }
}

/// XORs `data` with the repeating 4-byte `key`, eight bytes at a time.
pub(crate) fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) ^ wide;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// Sending half of a WebSocket link.
pub struct WsTx<S> {
    writer: Arc<Mutex<Writer<S>>>,
    role: Role,
    codec: FrameCodec,
    /// The binary message being built: `WS_HEADER_MAX` bytes of room for its header, then
    /// its frames, masked as they are appended by a client.
    buf: BytesMut,
    /// The masking key of the message in `buf` (a client's).
    key: Option<[u8; 4]>,
}

/// Receiving half of a WebSocket link.
pub struct WsRx<S> {
    io: ReadHalf<S>,
    writer: Arc<Mutex<Writer<S>>>,
    role: Role,
    codec: FrameCodec,
    /// Bytes read from the socket, not yet parsed.
    buf: BytesMut,
    /// A large WebSocket frame being read into a receive block of its own, and its header.
    large: Option<(Vec<u8>, FrameHead)>,
    /// The last frame was large: read the next header alone, so that a large frame's payload
    /// goes straight into its block instead of through `buf`.
    header_first: bool,
    /// The current message's frames, not yet decoded.
    ready: Bytes,
    /// A fragmented message being assembled.
    partial: Option<BytesMut>,
    max_message: usize,
    /// The listener's connection slot, released when the engine drops this half.
    _slot: Option<OwnedSemaphorePermit>,
}

impl<S> std::fmt::Debug for WsTx<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsTx").field("buffered", &self.buf.len()).finish_non_exhaustive()
    }
}

impl<S> std::fmt::Debug for WsRx<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsRx")
            .field("role", &self.role)
            .field("ready", &self.ready.len())
            .finish_non_exhaustive()
    }
}

/// The largest binary message a peer may send: one batch plus one frame of the largest body.
pub(crate) fn max_ws_message(max_message_size: usize) -> usize {
    let body = CodecConfig { max_message_size, ..CodecConfig::default() }.max_body();
    BATCH_BYTES + HEADER_LEN + body
}

/// tungstenite's limits for the upgrade (its buffers are not used after it).
pub(crate) fn ws_config(max_message_size: usize) -> WebSocketConfig {
    let max = max_ws_message(max_message_size);
    WebSocketConfig::default().max_message_size(Some(max)).max_frame_size(Some(max))
}

/// Turns an upgraded WebSocket into a link. `ping_every` sends WebSocket pings on that period
/// (keep-alive for proxies and load balancers, beside the protocol heartbeat).
pub(crate) fn ws_link<S>(
    ws: WebSocketStream<S>,
    role: Role,
    max_message_size: usize,
    compression_threshold: usize,
    ping_every: Option<Duration>,
    slot: Option<OwnedSemaphorePermit>,
    peer: PeerInfo,
) -> Link<WsTx<S>, WsRx<S>>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // The upgrade is complete and neither side sends before the other's first message (the
    // client's Hello), so tungstenite holds no unread bytes: the raw stream continues here.
    let (r, w) = tokio::io::split(ws.into_inner());
    let config = CodecConfig { max_message_size, compression_threshold, ..CodecConfig::default() };
    let writer = Arc::new(Mutex::new(Writer { io: w, role, closed: false, out: BytesMut::new() }));
    if let Some(period) = ping_every {
        tokio::spawn(pinger(Arc::downgrade(&writer), period));
    }
    Link::new(
        WsTx {
            writer: writer.clone(),
            role,
            codec: FrameCodec::new(config.clone()),
            buf: BytesMut::with_capacity(WS_HEADER_MAX + BATCH_BYTES),
            key: None,
        },
        WsRx {
            io: r,
            writer,
            role,
            codec: FrameCodec::new(config),
            buf: BytesMut::with_capacity(BATCH_BYTES * 2),
            large: None,
            header_first: false,
            ready: Bytes::new(),
            partial: None,
            max_message: max_ws_message(max_message_size),
            _slot: slot,
        },
        peer,
    )
}

/// Sends a ping every `period` until the link's halves are gone or the socket fails.
async fn pinger<S>(writer: Weak<Mutex<Writer<S>>>, period: Duration)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tick.tick().await;
        let Some(writer) = writer.upgrade() else { return };
        let mut w = writer.lock().await;
        if w.closed || w.control(OP_PING, b"hw").await.is_err() {
            return;
        }
    }
}

/// Maps tungstenite's errors (of the upgrade) onto the engine's.
pub(crate) fn ws_error(e: WsError) -> TransportError {
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            TransportError::MessageTooLarge { size, max: max_size }
        }
        WsError::Io(e) => TransportError::Io(e),
        WsError::ConnectionClosed | WsError::AlreadyClosed => TransportError::Closed,
        other => TransportError::ConnectionError(format!("WebSocket: {other}")),
    }
}

fn protocol_error(what: impl Into<String>) -> TransportError {
    TransportError::InvalidMessage(format!("WebSocket: {}", what.into()))
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> WsTx<S> {
    /// Completes the binary message in `buf` and writes it. `w.out` is empty here (drained
    /// at the start of the batch and after each message): the message's buffer becomes the
    /// writer's, without a copy, and whatever a cancelled write leaves stays there.
    async fn write_message(&mut self, w: &mut Writer<S>) -> Result<(), TransportError> {
        debug_assert!(w.out.is_empty());
        let start = finish_message(&mut self.buf, OP_BINARY, self.key);
        let large = self.buf.len() > 4 * (WS_HEADER_MAX + BATCH_BYTES);
        std::mem::swap(&mut w.out, &mut self.buf);
        w.out.advance(start);
        self.buf.clear();
        w.drain().await?;
        if large {
            // Do not keep a large message's memory for the link's lifetime.
            w.out = BytesMut::new();
        }
        Ok(())
    }

    fn begin_message(&mut self) {
        if self.buf.is_empty() {
            self.buf.put_bytes(0, WS_HEADER_MAX);
            self.key = mask_key(self.role);
        }
    }

    /// Appends `msg`'s frame to the message in `buf`. A client masks it on the way: the
    /// frame's head in place while it is in the cache, a large payload (which the codec leaves
    /// out of the head) while copying it in. Masking the whole message afterwards would read
    /// and write every payload byte a second time.
    fn append_frame(&mut self, msg: &Message) -> Result<(), TransportError> {
        let from = self.buf.len();
        let split = self.codec.encode_split(msg, &mut self.buf)?;
        match self.key {
            Some(key) => {
                apply_mask(&mut self.buf[from..], key_at(key, from - WS_HEADER_MAX));
                if split {
                    let at = self.buf.len() - WS_HEADER_MAX;
                    extend_masked(&mut self.buf, &msg.payload, key_at(key, at));
                }
            }
            None if split => self.buf.extend_from_slice(&msg.payload),
            None => {}
        }
        Ok(())
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> LinkTx for WsTx<S> {
    async fn send_batch(&mut self, batch: &mut Vec<Message>) -> Result<(), TransportError> {
        let writer = self.writer.clone();
        let mut w = writer.lock().await;
        if w.closed {
            batch.clear();
            return Err(TransportError::Closed);
        }
        // The rest of a message whose send was cancelled midway goes first.
        w.drain().await?;
        self.buf.clear();
        for msg in batch.drain(..) {
            if self.buf.len() >= WS_HEADER_MAX + BATCH_BYTES {
                self.write_message(&mut w).await?;
            }
            self.begin_message();
            self.append_frame(&msg)?;
        }
        if self.buf.len() > WS_HEADER_MAX {
            self.write_message(&mut w).await?;
        }
        self.buf.clear();
        if self.buf.capacity() > 4 * (WS_HEADER_MAX + BATCH_BYTES) {
            // A large message grew the buffer: do not keep its memory for the link's lifetime.
            self.buf = BytesMut::with_capacity(WS_HEADER_MAX + BATCH_BYTES);
        }
        w.io.flush().await?;
        Ok(())
    }

    async fn close(&mut self) {
        let mut w = self.writer.lock().await;
        let _ = w.control(OP_CLOSE, &1000u16.to_be_bytes()).await;
        w.closed = true;
        let _ = w.io.shutdown().await;
    }

    fn configure(&mut self, settings: &LinkSettings) {
        self.codec.set_compression(settings.compression);
    }
}

/// A parsed WebSocket frame header.
#[derive(Debug, Clone, Copy)]
struct FrameHead {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    header_len: usize,
    payload_len: usize,
}

/// Parses a frame header at the start of `buf`; `Ok(None)` if more bytes are needed.
fn parse_head(buf: &[u8], max: usize) -> Result<Option<FrameHead>, TransportError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(protocol_error("reserved bits set (no extension was negotiated)"));
    }
    let masked = b1 & 0x80 != 0;
    let mut n = 2;
    let len = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            n = 4;
            u16::from_be_bytes([buf[2], buf[3]]) as u64
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            n = 10;
            u64::from_be_bytes([buf[2], buf[3], buf[4], buf[5], buf[6], buf[7], buf[8], buf[9]])
        }
        l => u64::from(l),
    };
    if len > max as u64 {
        return Err(TransportError::MessageTooLarge {
            size: usize::try_from(len).unwrap_or(usize::MAX),
            max,
        });
    }
    let mask = if masked {
        if buf.len() < n + 4 {
            return Ok(None);
        }
        let k = [buf[n], buf[n + 1], buf[n + 2], buf[n + 3]];
        n += 4;
        Some(k)
    } else {
        None
    };
    Ok(Some(FrameHead {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0F,
        mask,
        header_len: n,
        payload_len: len as usize,
    }))
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> WsRx<S> {
    /// Reads until `buf` holds at least `n` bytes; `Ok(false)` on a clean end of stream before
    /// any byte of a new frame.
    async fn fill(&mut self, n: usize) -> Result<bool, TransportError> {
        while self.buf.len() < n {
            self.buf.reserve(n - self.buf.len());
            let limit =
                (self.header_first && self.buf.len() < WS_HEADER_MAX).then(|| WS_HEADER_MAX - self.buf.len());
            if read_some(&mut self.io, &mut self.buf, limit).await? == 0 {
                if self.buf.is_empty() && self.partial.is_none() {
                    return Ok(false);
                }
                return Err(protocol_error("the connection ended inside a frame"));
            }
        }
        Ok(true)
    }

    /// Reads the next WebSocket frame: its header and its unmasked payload; `Ok(None)` when
    /// the peer closed. A frame that is not in `buf` yet and is at least
    /// [`blocks::MIN_BLOCK`] long is read into a receive block of its own, whose memory is
    /// recycled once the messages sliced out of it are dropped.
    /// Cancel-safe: bytes read stay in `buf` or in the block, both in `self`.
    async fn next_frame(&mut self) -> Result<Option<(FrameHead, Bytes)>, TransportError> {
        if self.large.is_none() {
            let head = loop {
                match parse_head(&self.buf, self.max_message)? {
                    Some(h) => break h,
                    None => {
                        let want = self.buf.len() + 1;
                        if !self.fill(want).await? {
                            return Ok(None);
                        }
                    }
                }
            };
            match (self.role, head.mask.is_some()) {
                (Role::Server, false) => return Err(protocol_error("a client frame without a mask")),
                (Role::Client, true) => return Err(protocol_error("a masked frame from the server")),
                _ => {}
            }
            let total = head.header_len + head.payload_len;
            if total <= self.buf.len() || total < blocks::MIN_BLOCK {
                if !self.fill(total).await? {
                    return Ok(None);
                }
                self.buf.advance(head.header_len);
                let mut payload = self.buf.split_to(head.payload_len);
                if let Some(key) = head.mask {
                    apply_mask(&mut payload, key);
                }
                self.header_first = false;
                return Ok(Some((head, payload.freeze())));
            }
            self.large = Some((begin_block(&mut self.buf, total), head));
        }
        if let Some((block, head)) = &mut self.large {
            if !fill_block(&mut self.io, block, head.header_len + head.payload_len, &mut self.buf).await? {
                return Err(protocol_error("the connection ended inside a frame"));
            }
            let (mut block, head) = (std::mem::take(block), *head);
            self.large = None;
            if let Some(key) = head.mask {
                apply_mask(&mut block[head.header_len..], key);
            }
            self.header_first = true;
            return Ok(Some((head, blocks::freeze(block).slice(head.header_len..))));
        }
        Ok(None)
    }

    /// Reads WebSocket frames until a whole binary message is in `ready`; `Ok(false)` when the
    /// peer closed.
    async fn next_message(&mut self) -> Result<bool, TransportError> {
        loop {
            let Some((head, payload)) = self.next_frame().await? else {
                return Ok(false);
            };
            match head.opcode {
                OP_BINARY | OP_CONTINUATION => {
                    let fragmented = self.partial.is_some();
                    if (head.opcode == OP_CONTINUATION) != fragmented {
                        return Err(protocol_error("continuation frames out of order"));
                    }
                    if head.fin && !fragmented {
                        self.ready = payload;
                        return Ok(true);
                    }
                    let mut partial = self.partial.take().unwrap_or_default();
                    if partial.len() + payload.len() > self.max_message {
                        return Err(TransportError::MessageTooLarge {
                            size: partial.len() + payload.len(),
                            max: self.max_message,
                        });
                    }
                    partial.extend_from_slice(&payload);
                    if head.fin {
                        self.ready = partial.freeze();
                        return Ok(true);
                    }
                    self.partial = Some(partial);
                }
                OP_TEXT => {
                    return Err(protocol_error("a text message: hivewire frames travel in binary messages"))
                }
                OP_CLOSE => {
                    debug!("WebSocket closed by the peer");
                    let mut w = self.writer.lock().await;
                    let _ = w.control(OP_CLOSE, &payload[..payload.len().min(2)]).await;
                    w.closed = true;
                    return Ok(false);
                }
                OP_PING => {
                    if !head.fin || payload.len() > 125 {
                        return Err(protocol_error("a fragmented or oversized ping"));
                    }
                    let mut w = self.writer.lock().await;
                    w.control(OP_PONG, &payload).await?;
                }
                OP_PONG => {}
                other => return Err(protocol_error(format!("unknown opcode {other:#x}"))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> LinkRx for WsRx<S> {
    async fn recv(&mut self) -> Result<Option<Message>, TransportError> {
        loop {
            if let Some(m) = self.try_recv_buffered()? {
                return Ok(Some(m));
            }
            if !self.next_message().await? {
                return Ok(None);
            }
        }
    }

    /// The next hivewire frame of the WebSocket message in hand (frames are never split
    /// across WebSocket messages).
    fn try_recv_buffered(&mut self) -> Result<Option<Message>, TransportError> {
        if self.ready.is_empty() {
            return Ok(None);
        }
        match self.codec.decode_from_bytes(&mut self.ready)? {
            Some(m) => Ok(Some(m)),
            None => Err(TransportError::InvalidMessage(format!(
                "a WebSocket binary message ends inside a frame ({} bytes left over)",
                self.ready.len()
            ))),
        }
    }

    fn configure(&mut self, settings: &LinkSettings) {
        self.codec.set_accept(settings.accept_gzip, settings.accept_zstd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    #[test]
    fn masking_is_its_own_inverse_and_matches_bytewise_xor() {
        let key = [0x12, 0x34, 0x56, 0x78];
        for len in [0usize, 1, 3, 7, 8, 9, 15, 16, 17, 100] {
            let data: Vec<u8> = (0..len as u32).map(|i| (i * 7 + 3) as u8).collect();
            let mut fast = data.clone();
            apply_mask(&mut fast, key);
            let slow: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect();
            assert_eq!(fast, slow, "len {len}");
            apply_mask(&mut fast, key);
            assert_eq!(fast, data);
        }
    }

    #[test]
    fn headers_round_trip_for_each_length_form() {
        for (len, role) in
            [(5usize, Role::Server), (126, Role::Client), (70_000, Role::Client), (125, Role::Server)]
        {
            let mut buf = BytesMut::new();
            buf.put_bytes(0, WS_HEADER_MAX);
            buf.extend((0..len).map(|i| i as u8));
            let key = mask_key(role);
            if let Some(key) = key {
                apply_mask(&mut buf[WS_HEADER_MAX..], key);
            }
            let start = finish_message(&mut buf, OP_BINARY, key);
            let head = parse_head(&buf[start..], 1 << 20).unwrap().unwrap();
            assert!(head.fin);
            assert_eq!(head.opcode, OP_BINARY);
            assert_eq!(head.payload_len, len);
            assert_eq!(head.mask.is_some(), role == Role::Client);
            let mut payload = buf[start + head.header_len..].to_vec();
            if let Some(k) = head.mask {
                apply_mask(&mut payload, k);
            }
            assert!(payload.iter().enumerate().all(|(i, b)| *b == i as u8));
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        assert!(parse_head(&[0x82], 100).unwrap().is_none());
        assert!(parse_head(&[0xC2, 0x01], 100).is_err(), "RSV1 without an extension");
        let too_long = [0x82, 127, 0, 0, 0, 1, 0, 0, 0, 0];
        assert!(matches!(parse_head(&too_long, 1 << 20), Err(TransportError::MessageTooLarge { .. })));
        assert!(parse_head(&[0x82, 126, 0], 100).unwrap().is_none(), "incomplete extended length");
    }

    fn event(i: usize, len: usize) -> Message {
        let payload: Vec<u8> = (0..len).map(|j| (i.wrapping_mul(31) ^ j) as u8).collect();
        Message::new("a", hivewire_core::MessageType::Event { topic: format!("t.{i}").into() })
            .with_payload_bytes(bytes::Bytes::from(payload))
    }

    /// A client and a server link over an in-memory pipe of `capacity` bytes: a writer blocks
    /// (mid-frame) as soon as the pipe is full and the other side does not read.
    async fn pipe_pair(
        capacity: usize,
    ) -> (Link<WsTx<DuplexStream>, WsRx<DuplexStream>>, Link<WsTx<DuplexStream>, WsRx<DuplexStream>>) {
        let (c, s) = tokio::io::duplex(capacity);
        let (c, s) = tokio::join!(
            tokio_tungstenite::client_async("ws://localhost/", c),
            tokio_tungstenite::accept_async(s)
        );
        let (c, s) = (c.expect("client upgrade").0, s.expect("server upgrade"));
        let max = 1 << 22;
        (
            ws_link(c, Role::Client, max, usize::MAX, None, None, PeerInfo::default()),
            ws_link(s, Role::Server, max, usize::MAX, None, None, PeerInfo::default()),
        )
    }

    #[tokio::test]
    async fn a_send_cancelled_midway_leaves_the_connection_intact() {
        let (client, mut server) = pipe_pair(4096).await;
        let Link { tx: mut client_tx, rx: mut client_rx, .. } = client;
        // 300 kB cannot pass a 4 kB pipe nobody reads: the send blocks inside its message.
        let big = event(0, 300_000);
        let cancelled =
            tokio::time::timeout(Duration::from_millis(50), client_tx.send_batch(&mut vec![big.clone()]))
                .await;
        assert!(cancelled.is_err(), "the send must have blocked mid-message");
        // A pong is owed too: the reader answers a ping while the writer holds the rest.
        server.tx.writer.lock().await.control(OP_PING, b"p").await.expect("ping");
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < 3 {
                match server.rx.recv().await {
                    Ok(Some(m)) => got.push(m),
                    other => panic!("the connection broke after a cancelled send: {other:?}"),
                }
            }
            got
        });
        let pong = tokio::spawn(async move {
            // Reading lets the client answer the ping (its pong goes after the rest of `big`).
            let _ = tokio::time::timeout(Duration::from_millis(500), client_rx.recv()).await;
            client_rx
        });
        let mut more = vec![event(1, 10), event(2, 70_000)];
        client_tx.send_batch(&mut more).await.expect("send after the cancelled one");
        let got =
            tokio::time::timeout(Duration::from_secs(10), reader).await.expect("reader finished").unwrap();
        // The message already started when its send was cancelled is completed, not cut.
        assert_eq!(got.len(), 3);
        for (m, want) in got.iter().zip([&big, &event(1, 10), &event(2, 70_000)]) {
            assert_eq!(m.topic(), want.topic());
            assert_eq!(m.payload, want.payload, "payload of {:?}", want.topic());
        }
        drop(pong.await);
    }

    #[tokio::test]
    async fn frames_masked_while_appended_unmask_at_every_key_phase() {
        // One batch, so its frames share one binary message and one key: the odd sizes put
        // the heads and the large payloads (masked while copied in) at every offset modulo 4.
        let (client, server) = pipe_pair(1 << 20).await;
        let (Link { tx: mut ctx, .. }, Link { rx: mut srx, .. }) = (client, server);
        let sizes = [1usize, 9_000, 2, 8_193, 3, hivewire_codec::SPLIT_PAYLOAD_MIN, 0, 20_001, 5, 10_002];
        let sent: Vec<Message> = sizes.iter().enumerate().map(|(i, &len)| event(i, len)).collect();
        ctx.send_batch(&mut sent.clone()).await.expect("send");
        let mut got = Vec::new();
        while got.len() < sent.len() {
            let m = tokio::time::timeout(Duration::from_secs(10), srx.recv()).await.expect("in time");
            got.push(m.expect("receive").expect("a message"));
        }
        assert_eq!(got, sent);
    }

    /// Receives `n` messages, dropping each receive that is not done after two polls (the
    /// sender runs in between); returns them and how many receives were dropped.
    async fn recv_cancelling(rx: &mut WsRx<DuplexStream>, n: usize) -> (Vec<Message>, usize) {
        let (mut got, mut cancelled) = (Vec::new(), 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while got.len() < n && std::time::Instant::now() < deadline {
            tokio::select! {
                biased;
                r = rx.recv() => got.push(r.expect("receive").expect("a message")),
                _ = tokio::task::yield_now() => cancelled += 1,
            }
        }
        (got, cancelled)
    }

    #[tokio::test]
    async fn large_messages_survive_receives_cancelled_midway_in_both_directions() {
        // Through a 4 kB pipe every large WebSocket message (read into a block of its own)
        // takes many reads, and the receiver gives up on most of them.
        let (client, server) = pipe_pair(4096).await;
        let sizes = [100_000, 10, blocks::MIN_BLOCK, 0, 40_000, 3];
        let sent: Vec<Message> = sizes.iter().enumerate().map(|(i, &len)| event(i, len)).collect();
        let (Link { tx: ctx, rx: mut crx, .. }, Link { tx: stx, rx: mut srx, .. }) = (client, server);
        // Each message a batch of its own, sent from a task while the other side receives.
        let send_each = |mut tx: WsTx<DuplexStream>, msgs: Vec<Message>| {
            tokio::spawn(async move {
                for m in msgs {
                    tx.send_batch(&mut vec![m]).await.expect("send");
                }
                tx
            })
        };
        for (name, tx, rx) in
            [("client to server (masked)", ctx, &mut srx), ("server to client", stx, &mut crx)]
        {
            let sender = send_each(tx, sent.clone());
            let (got, cancelled) = recv_cancelling(rx, sent.len()).await;
            assert_eq!(got, sent, "{name}");
            assert!(cancelled > 10, "{name}: receives cancelled midway: {cancelled}");
            drop(sender.await);
        }
    }
}

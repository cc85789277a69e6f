//! What a backend hands to the engine: a [`Link`], a duplex of messages with two owned halves.
//!
//! A backend crate only turns its medium into a link (and listens or dials); the engine in
//! [`Node`](crate::Node) does the handshake, heartbeats, routing and requests identically for
//! every backend. Byte-stream backends wrap their stream in [`FramedLink`], which frames
//! messages with `hivewire-codec`; `inproc` carries `Message` values directly.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use hivewire_codec::{CodecConfig, Compression, FrameCodec, HEADER_LEN};
use hivewire_protocol::handshake::PeerInfo;
use hivewire_protocol::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::TransportError;

/// A [`LinkTx`] behind a pointer, so that the engine can share one link's sending half between
/// its writer task and senders that write directly when the link is idle.
pub(crate) trait DynTx: Send {
    fn send_dyn<'a>(
        &'a mut self,
        batch: &'a mut Vec<Message>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), TransportError>> + Send + 'a>>;
    fn close_dyn(&mut self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// Sends `msg` (or, with `None`, finishes what an earlier [`LinkTx::try_send_now`] began)
    /// with the sending half moved into the future, which hands it back when done: a direct
    /// write that has to wait for the medium can go on in a task of its own.
    fn send_owned(self: Box<Self>, msg: Option<Message>) -> OwnedSend;
    /// [`LinkTx::try_send_now`] through the pointer.
    fn try_send_dyn(&mut self, cx: &mut Context<'_>, msg: &Message) -> TrySend;
}

/// The future of [`DynTx::send_owned`].
pub(crate) type OwnedSend =
    std::pin::Pin<Box<dyn Future<Output = (Box<dyn DynTx>, Result<(), TransportError>)> + Send>>;

impl<T: LinkTx> DynTx for T {
    fn send_dyn<'a>(
        &'a mut self,
        batch: &'a mut Vec<Message>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), TransportError>> + Send + 'a>> {
        Box::pin(self.send_batch(batch))
    }

    fn close_dyn(&mut self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.close())
    }

    fn send_owned(self: Box<Self>, msg: Option<Message>) -> OwnedSend {
        Box::pin(async move {
            let mut tx = self;
            let r = tx.send_batch(&mut msg.into_iter().collect()).await;
            (tx as Box<dyn DynTx>, r)
        })
    }

    fn try_send_dyn(&mut self, cx: &mut Context<'_>, msg: &Message) -> TrySend {
        self.try_send_now(cx, msg)
    }
}

/// What [`LinkTx::try_send_now`] did with a message.
#[derive(Debug)]
pub enum TrySend {
    /// The medium took the whole message.
    Sent,
    /// The message is taken, but part of it still waits in the link's own buffer:
    /// [`LinkTx::send_batch`] with an empty batch writes the rest.
    Started,
    /// This link does not write this message without waiting: nothing of it was taken, and it
    /// goes through [`LinkTx::send_batch`].
    Declined,
    /// The write failed, as a failed `send_batch` would have.
    Failed(TransportError),
}

/// Offers `msg` to [`LinkTx::try_send_now`] once, with the calling task's context, as the
/// engine's direct write does: for a backend's tests of its link (what it returns, and that a
/// `Started` write is finished by an empty `send_batch`).
pub async fn try_send_once(tx: &mut impl LinkTx, msg: &Message) -> TrySend {
    let mut msg = Some(msg);
    std::future::poll_fn(|cx| match msg.take() {
        Some(m) => Poll::Ready(tx.try_send_now(cx, m)),
        // Ready at the first poll, so never polled again.
        None => Poll::Pending,
    })
    .await
}

/// Settings the engine applies to a link once the handshake negotiated them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkSettings {
    /// Compression for outgoing frames.
    pub compression: Compression,
    /// Accept incoming gzip frames.
    pub accept_gzip: bool,
    /// Accept incoming zstd frames.
    pub accept_zstd: bool,
}

/// The sending half of a link.
pub trait LinkTx: Send + 'static {
    /// Sends every message of `batch` in order and leaves `batch` empty. Implementations should
    /// write the whole batch with as few syscalls as the medium allows.
    fn send_batch(
        &mut self,
        batch: &mut Vec<Message>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Flushes and closes the sending direction.
    fn close(&mut self) -> impl Future<Output = ()> + Send;

    /// Applies negotiated settings (compression) to outgoing messages.
    fn configure(&mut self, _settings: &LinkSettings) {}

    /// Writes `msg` now if the medium takes it without waiting, without building a
    /// `send_batch` future (and without moving the message): the engine's direct write of one
    /// message to an idle link (a request or its response) goes through here first. `cx` is
    /// the sending task's: a link that starts the write but cannot finish it
    /// ([`TrySend::Started`]) may register it, and the engine then finishes with `send_batch`
    /// of an empty batch. The default declines, and the message goes through `send_batch`.
    fn try_send_now(&mut self, _cx: &mut Context<'_>, _msg: &Message) -> TrySend {
        TrySend::Declined
    }

    /// How long the link must have been quiet before a sender writes a message to it itself
    /// instead of handing it to the engine's writer task (after the peer's turn, 2 µs of quiet
    /// suffice: docs/ARCHITECTURE.md). The default (20 µs) suits a stream, where a burst is better
    /// left to the writer, which batches it into few syscalls, and shared memory too, where the
    /// writer's batches save the direct path's per-message work. Zero sends every message whose
    /// queue is empty straight from its sender, without a task hand-off.
    fn direct_write_idle(&self) -> std::time::Duration {
        DEFAULT_DIRECT_WRITE_IDLE
    }
}

/// The default of [`LinkTx::direct_write_idle`].
pub const DEFAULT_DIRECT_WRITE_IDLE: std::time::Duration = std::time::Duration::from_micros(20);

/// The receiving half of a link.
pub trait LinkRx: Send + 'static {
    /// The next message; `Ok(None)` when the peer closed the link cleanly.
    ///
    /// Must be cancel-safe: the engine polls it once without waiting and drops the future if
    /// nothing is ready, so a message must never be lost by dropping a pending `recv`.
    fn recv(&mut self) -> impl Future<Output = Result<Option<Message>, TransportError>> + Send;

    /// A message already received and buffered, taken without building a `recv` future:
    /// `Ok(None)` when none is (the engine then calls `recv`). The engine drains a busy link
    /// through this; the default never has one.
    fn try_recv_buffered(&mut self) -> Result<Option<Message>, TransportError> {
        Ok(None)
    }

    /// Applies negotiated settings (accepted compression) to incoming messages.
    fn configure(&mut self, _settings: &LinkSettings) {}
}

/// A duplex of messages to one peer, as a backend hands it to the engine.
#[derive(Debug)]
pub struct Link<T, R> {
    /// Sending half.
    pub tx: T,
    /// Receiving half.
    pub rx: R,
    /// What the backend knows of the peer (shown to the authenticator).
    pub peer: PeerInfo,
}

impl<T: LinkTx, R: LinkRx> Link<T, R> {
    /// Builds a link from its halves.
    pub fn new(tx: T, rx: R, peer: PeerInfo) -> Self {
        Link { tx, rx, peer }
    }
}

/// Sending half of a [`FramedLink`]: encodes a batch into one buffer and writes it with as few
/// syscalls as the stream allows. On a stream with vectored writes, a large payload
/// (`hivewire_codec::SPLIT_PAYLOAD_MIN` bytes or more, uncompressed) is written from the
/// message's own memory instead of being copied into the buffer.
pub struct FramedTx<W> {
    w: W,
    codec: FrameCodec,
    /// Encoded frames not yet handed to `chunks` or written.
    buf: BytesMut,
    /// Pieces to write in order, when a batch held a split frame: frame heads and payloads.
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    chunked: usize,
}

impl<W> std::fmt::Debug for FramedTx<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FramedTx").field("codec", &self.codec).field("buffered", &self.buf.len()).finish()
    }
}

/// Buffered bytes at which a batch is written out before the rest is encoded.
const WRITE_BOUNDARY: usize = 64 * 1024;
/// A write buffer that grew past this (a run of large messages) is released after the write.
const BUFFER_KEEP: usize = 1024 * 1024;
/// Slices passed to one vectored write.
const MAX_IOV: usize = 64;

/// Receiving half of a [`FramedLink`]: reads into one buffer and decodes frames out of it;
/// each payload is a slice of that buffer (no copy). A large frame is read into a receive block
/// of its own ([`hivewire_codec::blocks`]), recycled once its message is dropped.
pub struct FramedRx<R> {
    r: R,
    codec: FrameCodec,
    buf: BytesMut,
    /// A large frame being read into its own block, and the frame's length.
    large: Option<(Vec<u8>, usize)>,
    /// The last frame was large: read the next header alone, so that a large frame's body
    /// goes straight into its block instead of through the read buffer.
    header_first: bool,
}

impl<R> std::fmt::Debug for FramedRx<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FramedRx").field("codec", &self.codec).field("buffered", &self.buf.len()).finish()
    }
}

/// Bytes a read may fill at least; the buffer grows to this when less room is left.
const READ_CHUNK: usize = 64 * 1024;
/// Room below which the read buffer is grown before a read.
const READ_MIN_ROOM: usize = 4 * 1024;

/// A link over any byte stream, framed by `hivewire-codec`.
pub type FramedLink<S> = Link<FramedTx<WriteHalf<S>>, FramedRx<ReadHalf<S>>>;

/// Wraps a byte stream (TCP, TLS, Unix socket, an in-memory duplex…) as a [`FramedLink`].
pub fn framed_link<S>(
    stream: S,
    max_message_size: usize,
    compression_threshold: usize,
    peer: PeerInfo,
) -> FramedLink<S>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    framed_halves(r, w, max_message_size, compression_threshold, peer)
}

/// Wraps separate read and write halves as a framed link.
pub fn framed_halves<R, W>(
    r: R,
    w: W,
    max_message_size: usize,
    compression_threshold: usize,
    peer: PeerInfo,
) -> Link<FramedTx<W>, FramedRx<R>>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let config = CodecConfig { max_message_size, compression_threshold, ..CodecConfig::default() };
    let tx = FramedTx {
        w,
        codec: FrameCodec::new(config.clone()),
        buf: BytesMut::new(),
        chunks: VecDeque::new(),
        chunked: 0,
    };
    Link {
        tx,
        rx: FramedRx {
            r,
            codec: FrameCodec::new(config),
            buf: BytesMut::with_capacity(READ_CHUNK),
            large: None,
            header_first: false,
        },
        peer,
    }
}

impl<W> FramedTx<W> {
    /// The stream underneath (e.g. to wait for a QUIC stream's acknowledgement after close).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }
}

/// Drops the `n` bytes written from the front of `buf`. All of them (the usual case) by
/// clearing it: the next frame is then encoded at the start of the same memory, where
/// advancing would leave it further on, for `reserve` to move back later.
#[inline]
fn consume(buf: &mut BytesMut, n: usize) {
    if n >= buf.len() {
        buf.clear();
    } else {
        buf.advance(n);
    }
}

impl<W: AsyncWrite + Unpin> FramedTx<W> {
    /// Writes everything encoded so far, in order.
    async fn write_out(&mut self) -> std::io::Result<()> {
        // Every write consumes what it wrote before the next await: a send cancelled midway
        // leaves exactly the unwritten rest, which the next send writes first.
        if self.chunks.is_empty() {
            while !self.buf.is_empty() {
                let n = self.w.write(&self.buf).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                consume(&mut self.buf, n);
            }
        } else {
            if !self.buf.is_empty() {
                self.chunked += self.buf.len();
                self.chunks.push_back(self.buf.split().freeze());
            }
            while !self.chunks.is_empty() {
                let slices: Vec<IoSlice<'_>> =
                    self.chunks.iter().take(MAX_IOV).map(|c| IoSlice::new(c)).collect();
                let mut n = self.w.write_vectored(&slices).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                self.chunked -= n;
                while n > 0 {
                    let Some(front) = self.chunks.front_mut() else { break };
                    if n >= front.len() {
                        n -= front.len();
                        self.chunks.pop_front();
                    } else {
                        front.advance(n);
                        n = 0;
                    }
                }
            }
        }
        if self.buf.capacity() > BUFFER_KEEP {
            self.buf = BytesMut::new();
        }
        Ok(())
    }
}

impl<W: AsyncWrite + Send + Unpin + 'static> FramedTx<W> {
    /// Encodes `batch` into the write buffer (a large payload as a chunk of its own, when the
    /// writer is vectored), writing out whenever the buffer reaches the boundary. Messages are
    /// encoded where they lie, not moved out one by one (a message is ~200 bytes).
    async fn encode_and_write(&mut self, batch: &mut [Message]) -> Result<(), TransportError> {
        let vectored = self.w.is_write_vectored();
        for msg in batch.iter_mut() {
            if vectored {
                if self.codec.encode_split(msg, &mut self.buf)? {
                    // The frame's head, then the payload from the message's own memory.
                    self.chunked += self.buf.len() + msg.payload.len();
                    self.chunks.push_back(self.buf.split().freeze());
                    self.chunks.push_back(std::mem::take(&mut msg.payload));
                }
            } else {
                self.codec.encode_into(msg, &mut self.buf)?;
            }
            if self.buf.len() + self.chunked >= WRITE_BOUNDARY {
                self.write_out().await?;
            }
        }
        Ok(())
    }
}

impl<W: AsyncWrite + Send + Unpin + 'static> LinkTx for FramedTx<W> {
    async fn send_batch(&mut self, batch: &mut Vec<Message>) -> Result<(), TransportError> {
        let written = self.encode_and_write(batch).await;
        batch.clear();
        written?;
        self.write_out().await?;
        self.w.flush().await?;
        Ok(())
    }

    /// A message below the split size, with nothing left over from an earlier send, is encoded
    /// into the buffer and written with `poll_write`; what the stream does not take stays in
    /// the buffer, where the next `send_batch` writes it first (as after a cancelled send).
    fn try_send_now(&mut self, cx: &mut Context<'_>, msg: &Message) -> TrySend {
        if msg.payload.len() >= hivewire_codec::SPLIT_PAYLOAD_MIN
            || !self.buf.is_empty()
            || !self.chunks.is_empty()
        {
            return TrySend::Declined;
        }
        if let Err(e) = self.codec.encode_into(msg, &mut self.buf) {
            return TrySend::Failed(e.into());
        }
        while !self.buf.is_empty() {
            match Pin::new(&mut self.w).poll_write(cx, &self.buf) {
                Poll::Ready(Ok(0)) => {
                    return TrySend::Failed(std::io::Error::from(std::io::ErrorKind::WriteZero).into())
                }
                Poll::Ready(Ok(n)) => consume(&mut self.buf, n),
                Poll::Ready(Err(e)) => return TrySend::Failed(e.into()),
                Poll::Pending => return TrySend::Started,
            }
        }
        match Pin::new(&mut self.w).poll_flush(cx) {
            Poll::Ready(Ok(())) => TrySend::Sent,
            Poll::Ready(Err(e)) => TrySend::Failed(e.into()),
            Poll::Pending => TrySend::Started,
        }
    }

    async fn close(&mut self) {
        let _ = self.write_out().await;
        let _ = self.w.shutdown().await;
    }

    fn configure(&mut self, settings: &LinkSettings) {
        self.codec.set_compression(settings.compression);
    }
}

impl<R> FramedRx<R> {
    /// The next message if a whole frame is already buffered, without reading: lets a backend
    /// that also waits on other sources (QUIC's side streams) skip that wait while the stream
    /// has frames in hand.
    pub fn try_buffered(&mut self) -> Result<Option<Message>, TransportError> {
        self.codec.decode_from(&mut self.buf).map_err(TransportError::from)
    }
}

/// Moves the start of a large frame, which `buf` holds from the frame's first byte on, into a
/// receive block of its own with room for the whole frame (`total` bytes; see
/// [`hivewire_codec::blocks`]); `buf` is left empty. Stream readers (this module's and the
/// WebSocket backend's) read large frames this way, then [`fill_block`] and `blocks::freeze`.
pub fn begin_block(buf: &mut BytesMut, total: usize) -> Vec<u8> {
    let mut block = hivewire_codec::blocks::take(total + BLOCK_LOOKAHEAD);
    block.extend_from_slice(buf);
    buf.clear();
    block
}

/// Bytes a large frame's reads may take past the frame: enough for the next frame's header
/// (a WebSocket header and more), so that a stream of large frames does not cost one more read
/// per frame for a header alone.
pub const BLOCK_LOOKAHEAD: usize = 16;

/// Reads from `r` into `block` until it holds `total` bytes, and up to [`BLOCK_LOOKAHEAD`]
/// bytes past them when the stream already has them; those are moved to `spill` (the reader's
/// buffer, empty since [`begin_block`]) and `block` is cut to `total`. `Ok(false)` if the stream
/// ended first. Cancel-safe: whatever a read returned is in `block` (or, once it is whole, in
/// `spill`).
pub async fn fill_block<R: AsyncRead + Unpin>(
    r: &mut R,
    block: &mut Vec<u8>,
    total: usize,
    spill: &mut BytesMut,
) -> std::io::Result<bool> {
    while block.len() < total {
        if r.take((total + BLOCK_LOOKAHEAD - block.len()) as u64).read_buf(block).await? == 0 {
            return Ok(false);
        }
    }
    if block.len() > total {
        spill.extend_from_slice(&block[total..]);
        block.truncate(total);
    }
    Ok(true)
}

/// Reads once from `r` into `buf`: at most `limit` bytes when one is given (after a large
/// frame a reader takes the next header alone, so that a large body that follows goes straight
/// into its block), else as much as `buf` has room for.
pub async fn read_some<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    limit: Option<usize>,
) -> std::io::Result<usize> {
    match limit {
        Some(n) => r.take(n as u64).read_buf(buf).await,
        None => r.read_buf(buf).await,
    }
}

impl<R: AsyncRead + Send + Unpin + 'static> FramedRx<R> {
    /// Reads the rest of the large frame in hand into its block and decodes it.
    /// Cancel-safe: what a read returns lands in the block, which stays in `self`.
    async fn finish_large(&mut self) -> Result<Option<Message>, TransportError> {
        let Some((block, total)) = &mut self.large else { return Ok(None) };
        if !fill_block(&mut self.r, block, *total, &mut self.buf).await? {
            return Err(TransportError::ConnectionError(format!(
                "the stream ended inside a frame ({} of {} bytes read)",
                block.len(),
                total
            )));
        }
        let block = std::mem::take(block);
        self.large = None;
        let mut frame = hivewire_codec::blocks::freeze(block);
        self.header_first = true;
        match self.codec.decode_from_bytes(&mut frame)? {
            // The block holds exactly the frame whose header sized it.
            Some(m) if frame.is_empty() => Ok(Some(m)),
            _ => Err(TransportError::InvalidMessage("a large frame's block is not exactly one frame".into())),
        }
    }

    /// Makes room for the frame whose start `buf` holds (decoding found it incomplete): a
    /// large one moves to a block of its own, a small one gets room in `buf`.
    fn make_room(&mut self) -> Result<(), TransportError> {
        let len = self.buf.len();
        let total = self.codec.frame_len(&self.buf)?.unwrap_or(0);
        if total >= hivewire_codec::blocks::MIN_BLOCK {
            self.large = Some((begin_block(&mut self.buf, total), total));
            return Ok(());
        }
        // Asking for no more than is needed lets a buffer whose messages are all gone be
        // reclaimed in place (its bytes moved to the front); a shared one is replaced by one of
        // its original capacity (READ_CHUNK) at least.
        let need = total.saturating_sub(len).max(READ_MIN_ROOM);
        if self.buf.capacity() - len < need {
            self.buf.reserve(need);
        }
        Ok(())
    }
}

impl<R: AsyncRead + Send + Unpin + 'static> LinkRx for FramedRx<R> {
    async fn recv(&mut self) -> Result<Option<Message>, TransportError> {
        // Cancel-safe: a read either lands in `buf` (or the large frame's block) or does not
        // happen; decoding never waits.
        loop {
            if self.large.is_some() {
                return self.finish_large().await;
            }
            if !self.buf.is_empty() {
                if let Some(m) = self.codec.decode_from(&mut self.buf)? {
                    self.header_first = false;
                    return Ok(Some(m));
                }
                self.make_room()?;
                if self.large.is_some() {
                    continue;
                }
            } else if self.buf.capacity() < READ_MIN_ROOM {
                // What `make_room` does for an empty buffer (the common case: a link waiting
                // for its next message, whose wait is polled once per message or more).
                self.buf.reserve(READ_MIN_ROOM);
            }
            let limit =
                (self.header_first && self.buf.len() < HEADER_LEN).then(|| HEADER_LEN - self.buf.len());
            if read_some(&mut self.r, &mut self.buf, limit).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(TransportError::ConnectionError(format!(
                        "the stream ended inside a frame ({} bytes left over)",
                        self.buf.len()
                    )))
                };
            }
        }
    }

    fn try_recv_buffered(&mut self) -> Result<Option<Message>, TransportError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None); // as `decode_from` would find
        }
        Ok(self.codec.decode_from(&mut self.buf)?)
    }

    fn configure(&mut self, settings: &LinkSettings) {
        self.codec.set_accept(settings.accept_gzip, settings.accept_zstd);
    }
}

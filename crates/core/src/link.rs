//! What a backend hands to the engine: a [`Link`], a duplex of messages with two owned halves.
//!
//! A backend crate only turns its medium into a link (and listens or dials); the engine in
//! [`Node`](crate::Node) does the handshake, heartbeats, routing and requests identically for
//! every backend. Byte-stream backends wrap their stream in [`FramedLink`], which frames
//! messages with `hivewire-codec`; `inproc` carries `Message` values directly.

use std::future::Future;

use futures::{SinkExt, StreamExt};
use hivewire_codec::{CodecConfig, Compression, FrameCodec};
use hivewire_protocol::handshake::PeerInfo;
use hivewire_protocol::Message;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::TransportError;

/// A [`LinkTx`] behind a pointer, so that the engine can share one link's sending half between
/// its writer task and senders that write directly when the link is idle.
pub(crate) trait DynTx: Send {
    fn send_dyn<'a>(
        &'a mut self,
        batch: &'a mut Vec<Message>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), TransportError>> + Send + 'a>>;
    fn close_dyn(&mut self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

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
}

/// The receiving half of a link.
pub trait LinkRx: Send + 'static {
    /// The next message; `Ok(None)` when the peer closed the link cleanly.
    ///
    /// Must be cancel-safe: the engine polls it once without waiting and drops the future if
    /// nothing is ready, so a message must never be lost by dropping a pending `recv`.
    fn recv(&mut self) -> impl Future<Output = Result<Option<Message>, TransportError>> + Send;

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

/// Sending half of a [`FramedLink`].
#[derive(Debug)]
pub struct FramedTx<W> {
    inner: FramedWrite<W, FrameCodec>,
}

/// Receiving half of a [`FramedLink`].
#[derive(Debug)]
pub struct FramedRx<R> {
    inner: FramedRead<R, FrameCodec>,
}

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
    let mut write = FramedWrite::new(w, FrameCodec::new(config.clone()));
    // Coalesce: frames accumulate in the write buffer and go out together on flush.
    write.set_backpressure_boundary(64 * 1024);
    Link {
        tx: FramedTx { inner: write },
        rx: FramedRx { inner: FramedRead::with_capacity(r, FrameCodec::new(config), 64 * 1024) },
        peer,
    }
}

impl<W> FramedTx<W> {
    /// The stream underneath (e.g. to wait for a QUIC stream's acknowledgement after close).
    pub fn get_mut(&mut self) -> &mut W {
        self.inner.get_mut()
    }
}

impl<W: AsyncWrite + Send + Unpin + 'static> LinkTx for FramedTx<W> {
    async fn send_batch(&mut self, batch: &mut Vec<Message>) -> Result<(), TransportError> {
        for msg in batch.drain(..) {
            self.inner.feed(msg).await?;
        }
        SinkExt::<Message>::flush(&mut self.inner).await?;
        Ok(())
    }

    async fn close(&mut self) {
        let _ = SinkExt::<Message>::close(&mut self.inner).await;
    }

    fn configure(&mut self, settings: &LinkSettings) {
        self.inner.encoder_mut().set_compression(settings.compression);
    }
}

impl<R: AsyncRead + Send + Unpin + 'static> LinkRx for FramedRx<R> {
    async fn recv(&mut self) -> Result<Option<Message>, TransportError> {
        match self.inner.next().await {
            None => Ok(None),
            Some(Ok(m)) => Ok(Some(m)),
            Some(Err(e)) => Err(e.into()),
        }
    }

    fn configure(&mut self, settings: &LinkSettings) {
        self.inner.decoder_mut().set_accept(settings.accept_gzip, settings.accept_zstd);
    }
}

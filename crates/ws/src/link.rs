//! A WebSocket connection as an engine [`Link`]: binary messages carry whole codec frames.
//!
//! Outgoing frames of one batch are packed into one binary message of up to
//! [`BATCH_BYTES`] (a frame is never split across messages), so many small messages cost one
//! WebSocket frame header, one mask and one write. Incoming binary messages may hold one or more
//! whole frames; a message that ends inside a frame, or a text message, is a protocol error that
//! closes this link only.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::BytesMut;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use hivewire_codec::{CodecConfig, FrameCodec, HEADER_LEN};
use hivewire_core::{Link, LinkRx, LinkSettings, LinkTx, Message, PeerInfo, TransportError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Mutex, OwnedSemaphorePermit};
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

/// Frames of one batch are packed into binary messages of about this many bytes.
pub const BATCH_BYTES: usize = 64 * 1024;

type Sink<S> = SplitSink<WebSocketStream<S>, WsMessage>;

/// Sending half of a WebSocket link.
pub struct WsTx<S> {
    sink: Arc<Mutex<Sink<S>>>,
    codec: FrameCodec,
    buf: BytesMut,
}

/// Receiving half of a WebSocket link.
pub struct WsRx<S> {
    stream: SplitStream<WebSocketStream<S>>,
    codec: FrameCodec,
    pending: BytesMut,
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
        f.debug_struct("WsRx").field("pending", &self.pending.len()).finish_non_exhaustive()
    }
}

/// The largest binary message a peer may send: one batch plus one frame of the largest body.
pub(crate) fn max_ws_message(max_message_size: usize) -> usize {
    let body = CodecConfig { max_message_size, ..CodecConfig::default() }.max_body();
    BATCH_BYTES + HEADER_LEN + body
}

/// tungstenite's limits and buffers for a link carrying at most `max_message_size` payloads.
pub(crate) fn ws_config(max_message_size: usize) -> WebSocketConfig {
    let max = max_ws_message(max_message_size);
    WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        .write_buffer_size(BATCH_BYTES)
        .read_buffer_size(BATCH_BYTES)
}

/// Turns an upgraded WebSocket into a link. `ping_every` sends WebSocket pings on that period
/// (keep-alive for proxies and load balancers, beside the protocol heartbeat).
pub(crate) fn ws_link<S>(
    ws: WebSocketStream<S>,
    max_message_size: usize,
    compression_threshold: usize,
    ping_every: Option<Duration>,
    slot: Option<OwnedSemaphorePermit>,
    peer: PeerInfo,
) -> Link<WsTx<S>, WsRx<S>>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let config = CodecConfig { max_message_size, compression_threshold, ..CodecConfig::default() };
    let (sink, stream) = ws.split();
    let sink = Arc::new(Mutex::new(sink));
    if let Some(period) = ping_every {
        tokio::spawn(pinger(Arc::downgrade(&sink), period));
    }
    Link::new(
        WsTx { sink, codec: FrameCodec::new(config.clone()), buf: BytesMut::with_capacity(BATCH_BYTES) },
        WsRx { stream, codec: FrameCodec::new(config), pending: BytesMut::new(), _slot: slot },
        peer,
    )
}

/// Sends a ping every `period` until the link's sending half is gone or the socket fails.
async fn pinger<S>(sink: Weak<Mutex<Sink<S>>>, period: Duration)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tick.tick().await;
        let Some(sink) = sink.upgrade() else { return };
        let mut sink = sink.lock().await;
        if sink.send(WsMessage::Ping(Default::default())).await.is_err() {
            return;
        }
    }
}

/// Maps tungstenite's errors onto the engine's.
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

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> LinkTx for WsTx<S> {
    async fn send_batch(&mut self, batch: &mut Vec<Message>) -> Result<(), TransportError> {
        let mut sink = self.sink.lock().await;
        for msg in batch.drain(..) {
            if self.buf.len() >= BATCH_BYTES {
                sink.feed(WsMessage::Binary(self.buf.split().freeze())).await.map_err(ws_error)?;
            }
            if self.buf.capacity() == 0 {
                // The last message took the allocation; take a whole batch's worth at once
                // rather than growing by doubling frame after frame.
                self.buf.reserve(BATCH_BYTES);
            }
            self.codec.encode_into(&msg, &mut self.buf)?;
        }
        if !self.buf.is_empty() {
            sink.feed(WsMessage::Binary(self.buf.split().freeze())).await.map_err(ws_error)?;
        }
        sink.flush().await.map_err(ws_error)
    }

    async fn close(&mut self) {
        let mut sink = self.sink.lock().await;
        let _ = sink.close().await;
    }

    fn configure(&mut self, settings: &LinkSettings) {
        self.codec.set_compression(settings.compression);
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> LinkRx for WsRx<S> {
    async fn recv(&mut self) -> Result<Option<Message>, TransportError> {
        loop {
            if !self.pending.is_empty() {
                return match self.codec.decode_from(&mut self.pending)? {
                    Some(m) => Ok(Some(m)),
                    None => Err(TransportError::InvalidMessage(format!(
                        "a WebSocket binary message ends inside a frame ({} bytes left over)",
                        self.pending.len()
                    ))),
                };
            }
            match self.stream.next().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(ws_error(e)),
                Some(Ok(WsMessage::Binary(b))) => self.pending = BytesMut::from(b),
                Some(Ok(WsMessage::Text(_))) => {
                    return Err(TransportError::InvalidMessage(
                        "a text WebSocket message: hivewire frames travel in binary messages".into(),
                    ))
                }
                Some(Ok(WsMessage::Close(frame))) => {
                    debug!(?frame, "WebSocket closed by the peer");
                    return Ok(None);
                }
                // Pongs are answered by tungstenite; pings and pongs only keep the path alive.
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {}
            }
        }
    }

    fn configure(&mut self, settings: &LinkSettings) {
        self.codec.set_accept(settings.accept_gzip, settings.accept_zstd);
    }
}

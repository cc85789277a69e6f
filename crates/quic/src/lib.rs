//! hivewire's QUIC backend (quinn): `quic://host:port`.
//!
//! A connection carries one link:
//!
//! * the **main stream**, a bidirectional stream the client opens with its Hello, carries codec
//!   frames in order: the handshake, control, heartbeats, events and broadcasts — so events
//!   keep their order and a subscription reaches the hub before the events that follow it;
//! * each **request and each response travels on its own unidirectional stream**, so a 50 MiB
//!   event (or response) in flight holds back no request (QUIC streams have no head-of-line
//!   blocking between them). Consequence: a request is not ordered with the events and control
//!   messages sent before it on the same link (it may overtake them). Requests and responses
//!   whose frame is over [`LARGE_FRAME`] are written by their own task; at most
//!   `max_concurrent_streams` are in flight at once;
//! * a message with the header [`BEST_EFFORT_HEADER`] = `1` whose frame fits the path's datagram
//!   size travels as a **QUIC datagram**: unreliable, unordered, never retransmitted (larger
//!   ones go reliably).
//!
//! Certificates are `TransportConfig::tls`, as for `tls://` (CA verification by default, the
//! named opt-out, optional mutual TLS with the client's fingerprint in `PeerInfo`); ALPN is
//! `hivewire/1`.
//!
//! ```
//! use hivewire_core::TransportConfig;
//! use hivewire_quic::{QuicOptions, QuicTransport};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pki = hivewire_core::test_pki::generate()?;
//! let mut server = TransportConfig::default();
//! server.tls.cert_chain_pem = Some(pki.server.cert_pem.into_bytes());
//! server.tls.key_pem = Some(pki.server.key_pem.into_bytes());
//! let hub = QuicTransport::listen("127.0.0.1:0", "hub", server, QuicOptions::default()).await?;
//! let port = hub.listen_url().unwrap().rsplit(':').next().unwrap().to_string();
//!
//! let mut client = TransportConfig::default();
//! client.tls.ca_pem = Some(pki.ca_pem.into_bytes());
//! let agent = QuicTransport::connect(&format!("localhost:{port}"), "agent", client, QuicOptions::default()).await?;
//! assert_eq!(agent.peers()[0].as_str(), "hub");
//! agent.close().await;
//! hub.close().await;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hivewire_codec::{CodecConfig, FrameCodec, HEADER_LEN};
use hivewire_core::link::{FramedRx, FramedTx};
use hivewire_core::tls::{
    cert_fingerprint, client_config, server_config, server_name_for, CLIENT_CERT_SHA256,
};
use hivewire_core::{
    framed_halves, Acceptor, AgentId, Link, LinkRx, LinkSettings, LinkTx, Message, Node, PeerInfo,
    TransportConfig, TransportError, TrySend,
};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

/// URL scheme of this backend.
pub const SCHEME: &str = "quic";
/// The ALPN protocol both sides must speak.
pub const ALPN: &[u8] = b"hivewire/1";
/// Request and response frames larger than this are written by their own task.
pub const LARGE_FRAME: usize = 64 * 1024;
/// A message with this header set to `1` may travel as an unreliable QUIC datagram.
pub const BEST_EFFORT_HEADER: &str = "hw.best-effort";
/// Frames from side streams and datagrams waiting for the link's reader.
const SIDE_QUEUE: usize = 64;

/// QUIC settings (the seeds' `QuicConfig` knobs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicOptions {
    /// Streams (large messages) a peer may have open towards us at once, and that we open at
    /// once towards it (default 100).
    pub max_concurrent_streams: u32,
    /// QUIC keep-alive (PING frames) period (default 5 s); `None` sends none.
    pub keep_alive_interval: Option<Duration>,
    /// A connection silent this long is closed by QUIC itself (default 30 s).
    pub max_idle_timeout: Duration,
    /// Bytes the peer may send on all streams before we read them (default 16 MiB).
    pub connection_window: u32,
    /// Bytes the peer may send on one stream before we read them (default 4 MiB).
    pub stream_window: u32,
    /// Accept and send best-effort messages as datagrams (default on).
    pub datagrams: bool,
}

impl Default for QuicOptions {
    fn default() -> Self {
        QuicOptions {
            max_concurrent_streams: 100,
            keep_alive_interval: Some(Duration::from_secs(5)),
            max_idle_timeout: Duration::from_secs(30),
            connection_window: 16 << 20,
            stream_window: 4 << 20,
            datagrams: true,
        }
    }
}

fn err(what: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::ConnectionError(format!("QUIC {what}: {e}"))
}

fn transport(opts: &QuicOptions) -> Result<Arc<quinn::TransportConfig>, TransportError> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(1))
        .max_concurrent_uni_streams(VarInt::from_u32(opts.max_concurrent_streams))
        .keep_alive_interval(opts.keep_alive_interval)
        .max_idle_timeout(Some(opts.max_idle_timeout.try_into().map_err(|e| err("max_idle_timeout", e))?))
        .receive_window(VarInt::from_u32(opts.connection_window))
        .stream_receive_window(VarInt::from_u32(opts.stream_window))
        .datagram_receive_buffer_size(opts.datagrams.then_some(1 << 20));
    Ok(Arc::new(t))
}

async fn resolve(addr: &str) -> Result<SocketAddr, TransportError> {
    hivewire_core::resolve_one(SCHEME, addr).await
}

/// Constructors of QUIC nodes.
#[derive(Debug, Clone, Copy)]
pub struct QuicTransport;

struct QuicAcceptor(Endpoint);

impl Acceptor for QuicAcceptor {
    type Conn = quinn::Incoming;
    async fn accept(&mut self) -> std::io::Result<Option<Self::Conn>> {
        Ok(self.0.accept().await)
    }
}

impl QuicTransport {
    /// A hub listening on `addr` (`host:port`, UDP; port 0 picks a free one).
    pub async fn listen(
        addr: &str,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
        opts: QuicOptions,
    ) -> Result<Node, TransportError> {
        let mut tls = (*server_config(&config.tls)?).clone();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicServerConfig::try_from(tls).map_err(|e| err("server TLS", e))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport(&opts)?);
        server.max_incoming(config.max_peers.max(1));
        let endpoint = bind_server(server, resolve(addr).await?).await?;
        let local = endpoint.local_addr()?;
        let timeout = config.connection_timeout();
        let handshakes = Arc::new(Semaphore::new(config.max_peers.max(1)));
        let node = Node::new(agent_id, config, SCHEME);
        node.set_hub(true);
        node.set_listen_url(format!("{SCHEME}://{local}"));
        info!(%local, agent = %node.agent_id(), "quic listener up");
        let closer = endpoint.clone();
        node.on_closed(move || close_endpoint(closer, LISTENER_DRAIN));
        node.spawn_accept_loop(QuicAcceptor(endpoint), move |hub, incoming| {
            let remote = incoming.remote_address();
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                warn!(%remote, "too many QUIC handshakes in progress; refusing");
                incoming.refuse();
                return;
            };
            let (hub, opts) = (hub.clone(), opts.clone());
            tokio::spawn(async move {
                let _permit = permit;
                // The main stream is accepted by the link's first `recv`, so a client that opens
                // it and never says Hello meets the engine's handshake timeout.
                let accepted = async { incoming.await.map_err(|e| err("handshake", e)) };
                match tokio::time::timeout(timeout, accepted).await {
                    Ok(Ok(conn)) => {
                        let mut info = PeerInfo {
                            transport: SCHEME.into(),
                            remote_addr: Some(remote.to_string()),
                            ..PeerInfo::default()
                        };
                        if let Some(fp) = client_fingerprint(&conn) {
                            info.attributes.insert(CLIENT_CERT_SHA256.into(), fp);
                        }
                        let cfg = hub.config();
                        hub.accept_link(quic_link(
                            conn,
                            None,
                            cfg.max_message_size,
                            cfg.compression_threshold,
                            &opts,
                            info,
                        ));
                    }
                    Ok(Err(e)) => warn!(%remote, error = %e, "QUIC connection failed"),
                    Err(_) => warn!(%remote, "QUIC handshake timed out"),
                }
            });
        });
        Ok(node)
    }

    /// An agent connected to the hub at `addr` (`host:port`); verifies the server certificate
    /// against `config.tls.ca_pem` and the host name. Redials when the connection drops.
    pub async fn connect(
        addr: &str,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
        opts: QuicOptions,
    ) -> Result<Node, TransportError> {
        let dialer = Arc::new(Dialer::new(addr, &config, &opts).await?);
        let endpoint = dialer.endpoint.clone();
        let d = dialer.clone();
        let node = Node::dial(agent_id, config, SCHEME, move || {
            let d = d.clone();
            async move { d.dial().await }
        })
        .await;
        match node {
            Ok(node) => {
                node.on_closed(move || close_endpoint(endpoint, DIALER_DRAIN));
                Ok(node)
            }
            Err(e) => {
                endpoint.close(VarInt::from_u32(0), b"dial failed");
                Err(e)
            }
        }
    }
}

/// Dials `addr` and opens the main stream; returns the link without the protocol handshake
/// (for tests and tools that speak the wire protocol themselves).
pub async fn dial_link(
    addr: &str,
    config: &TransportConfig,
    opts: &QuicOptions,
) -> Result<Link<QuicTx, QuicRx>, TransportError> {
    Dialer::new(addr, config, opts).await?.dial().await
}

/// A client endpoint and what it needs to (re)dial one hub.
struct Dialer {
    endpoint: Endpoint,
    remote: SocketAddr,
    name: String,
    timeout: Duration,
    max: usize,
    threshold: usize,
    opts: QuicOptions,
}

impl Dialer {
    async fn new(addr: &str, config: &TransportConfig, opts: &QuicOptions) -> Result<Self, TransportError> {
        let mut tls = (*client_config(&config.tls)?).clone();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| err("client TLS", e))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(transport(opts)?);
        let name = server_name_for(&config.tls, addr)?.to_str().to_string();
        let remote = resolve(addr).await?;
        let bind: SocketAddr =
            if remote.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
        let mut endpoint = Endpoint::client(bind).map_err(|e| err("client endpoint", e))?;
        endpoint.set_default_client_config(client);
        Ok(Dialer {
            endpoint,
            remote,
            name,
            timeout: config.connection_timeout(),
            max: config.max_message_size,
            threshold: config.compression_threshold,
            opts: opts.clone(),
        })
    }

    async fn dial(&self) -> Result<Link<QuicTx, QuicRx>, TransportError> {
        let remote = self.remote;
        let open = async {
            let conn = self
                .endpoint
                .connect(remote, &self.name)
                .map_err(|e| err("connect", e))?
                .await
                .map_err(|e| err(&format!("connection to {remote}"), e))?;
            let (send, recv) = conn.open_bi().await.map_err(|e| err("main stream", e))?;
            Ok::<_, TransportError>((conn, send, recv))
        };
        let (conn, send, recv) =
            tokio::time::timeout(self.timeout, open).await.map_err(|_| TransportError::Timeout)??;
        let info = PeerInfo {
            transport: SCHEME.into(),
            remote_addr: Some(remote.to_string()),
            ..PeerInfo::default()
        };
        Ok(quic_link(conn, Some((send, recv)), self.max, self.threshold, &self.opts, info))
    }
}

/// Binds a server endpoint. A listener closed a moment ago on the same address releases its
/// socket from quinn's driver task just after `close` returns, so `AddrInUse` is retried for
/// up to a second (a live listener still fails, after that second).
async fn bind_server(server: quinn::ServerConfig, addr: SocketAddr) -> Result<Endpoint, TransportError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        match Endpoint::server(server.clone(), addr) {
            Ok(e) => return Ok(e),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(err(&format!("cannot listen on {addr}"), e)),
        }
    }
}

/// How long a listener's `Node::close` waits for its connections to drain, so that its UDP port
/// is free when it returns (a listener restarted on the same address binds it again).
const LISTENER_DRAIN: Duration = Duration::from_secs(2);

/// How long a dialer's `Node::close` waits for the same. Its port is ephemeral, so this only
/// gives the closing packets time to leave (the peer already has our Goodbye: the link's close
/// waited until it read everything); quinn's endpoint driver goes on draining in the
/// background. Waiting for the whole drain cost every dialer ~80 ms on loopback, and ~3 s once
/// its hub had closed first: the node was redialing by then, and a connection attempt nobody
/// answers drains for three probe timeouts computed from the initial 333 ms RTT estimate.
const DIALER_DRAIN: Duration = Duration::from_millis(20);

/// Closes an endpoint once its links are flushed, and waits at most `bound` until its
/// connections have drained.
async fn close_endpoint(endpoint: Endpoint, bound: Duration) {
    endpoint.close(VarInt::from_u32(0), b"closed");
    let _ = tokio::time::timeout(bound, endpoint.wait_idle()).await;
}

fn client_fingerprint(conn: &Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| cert_fingerprint(c.as_ref()))
}

type MainTx = FramedTx<SendStream>;
type MainRx = FramedRx<RecvStream>;
/// Where the server's reader leaves the main stream's sending half for the writer.
type MainSlot = Arc<std::sync::Mutex<Option<MainTx>>>;

/// Payload bytes (plus [`MAIN_ENVELOPE`] per message) that may wait for the main stream's
/// writer task; beyond, a send of events waits (and the engine's queue fills: its
/// backpressure). A batch larger than this waits for everything queued before it.
pub const MAIN_BUDGET: usize = 8 << 20;
/// Per-message allowance for the envelope in [`MAIN_BUDGET`].
pub const MAIN_ENVELOPE: usize = 64;

/// The main stream's writer task and its feed. Ordered messages (events, control, heartbeats)
/// go through it, so a large event that the peer's flow control holds back holds only the main
/// stream, never the link's writer: requests and responses, on streams of their own, go on
/// meanwhile (the multiplexing QUIC is chosen for).
struct MainWriter {
    tx: mpsc::Sender<MainCmd>,
    budget: Arc<Semaphore>,
    /// Why the main stream failed, once it has.
    failed: Arc<std::sync::Mutex<Option<String>>>,
    /// Settings for frames queued from now on (compression), taken by the task.
    settings: Arc<std::sync::Mutex<Option<LinkSettings>>>,
}

enum MainCmd {
    Batch(Vec<Message>, OwnedSemaphorePermit),
    /// Settings for the frames queued after this command.
    Configure(LinkSettings),
    /// Finish the stream after what is queued, wait (at most the duration) until the peer has
    /// read it all, then report.
    Close(Duration, oneshot::Sender<()>),
}

async fn main_writer(
    mut main: MainTx,
    mut rx: mpsc::Receiver<MainCmd>,
    failed: Arc<std::sync::Mutex<Option<String>>>,
    settings: Arc<std::sync::Mutex<Option<LinkSettings>>>,
) {
    while let Some(cmd) = rx.recv().await {
        if let Some(s) = lock(&settings).take() {
            main.configure(&s);
        }
        match cmd {
            MainCmd::Batch(mut batch, permit) => {
                if let Err(e) = main.send_batch(&mut batch).await {
                    debug!(error = %e, "QUIC main stream failed");
                    *lock(&failed) = Some(e.to_string());
                    return;
                }
                drop(permit);
            }
            MainCmd::Configure(s) => main.configure(&s),
            MainCmd::Close(linger, done) => {
                main.close().await;
                let _ = tokio::time::timeout(linger, main.get_mut().stopped()).await;
                let _ = done.send(());
                return;
            }
        }
    }
}

/// Sending half of a QUIC link.
pub struct QuicTx {
    main: Option<MainWriter>,
    slot: MainSlot,
    settings: Option<LinkSettings>,
    conn: Connection,
    codec: FrameCodec,
    ordered: Vec<Message>,
    streams: Arc<Semaphore>,
    datagrams: bool,
    linger: Duration,
}

/// Receiving half of a QUIC link.
pub struct QuicRx {
    main: Option<MainRx>,
    slot: MainSlot,
    conn: Connection,
    limits: (usize, usize),
    side: mpsc::Receiver<Result<Bytes, TransportError>>,
    side_open: bool,
    /// Hands streams not complete on arrival to tasks that finish reading them.
    side_tx: mpsc::Sender<Result<Bytes, TransportError>>,
    accepting: bool,
    max_frame: usize,
    codec: FrameCodec,
    settings: Option<LinkSettings>,
    side_task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for QuicTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicTx").field("remote", &self.conn.remote_address()).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for QuicRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicRx").field("side_open", &self.side_open).finish_non_exhaustive()
    }
}

impl Drop for QuicRx {
    fn drop(&mut self) {
        self.side_task.abort();
    }
}

/// The link of one QUIC connection: its main stream (opened by a client: `Some`; accepted by
/// the link's first `recv` on a server: `None`) plus side streams and datagrams.
pub fn quic_link(
    conn: Connection,
    main: Option<(SendStream, RecvStream)>,
    max_message_size: usize,
    compression_threshold: usize,
    opts: &QuicOptions,
    peer: PeerInfo,
) -> Link<QuicTx, QuicRx> {
    let config = CodecConfig { max_message_size, compression_threshold, ..CodecConfig::default() };
    let (main_tx, main_rx) = match main {
        Some((send, recv)) => {
            let l = framed_halves(recv, send, max_message_size, compression_threshold, peer.clone());
            (Some(l.tx), Some(l.rx))
        }
        None => (None, None),
    };
    let slot: MainSlot = Arc::new(std::sync::Mutex::new(main_tx));
    let (side_tx, side) = mpsc::channel(SIDE_QUEUE);
    let max_frame = HEADER_LEN + config.max_body();
    let side_task = tokio::spawn(datagram_reader(conn.clone(), side_tx.clone()));
    Link::new(
        QuicTx {
            main: None,
            slot: slot.clone(),
            settings: None,
            conn: conn.clone(),
            codec: FrameCodec::new(config.clone()),
            ordered: Vec::new(),
            streams: Arc::new(Semaphore::new(opts.max_concurrent_streams.max(1) as usize)),
            datagrams: opts.datagrams,
            linger: Duration::from_secs(2),
        },
        QuicRx {
            main: main_rx,
            slot,
            conn,
            limits: (max_message_size, compression_threshold),
            side,
            side_open: true,
            side_tx,
            accepting: true,
            max_frame,
            codec: FrameCodec::new(config),
            settings: None,
            side_task,
        },
        peer,
    )
}

/// Hands the peer's datagrams to the link's reader (dropping them when it is behind).
async fn datagram_reader(conn: Connection, out: mpsc::Sender<Result<Bytes, TransportError>>) {
    loop {
        match conn.read_datagram().await {
            Ok(d) => {
                if let Err(mpsc::error::TrySendError::Closed(_)) = out.try_send(Ok(d)) {
                    return;
                }
            }
            Err(e) => {
                debug!(error = %e, "no more datagrams");
                return;
            }
        }
    }
}

/// Appends `chunk` to `buf` within the frame limit.
fn append(buf: &mut BytesMut, chunk: &[u8], max_frame: usize) -> Result<(), TransportError> {
    if buf.len() + chunk.len() > max_frame {
        return Err(TransportError::MessageTooLarge { size: buf.len() + chunk.len(), max: max_frame });
    }
    buf.extend_from_slice(chunk);
    Ok(())
}

/// Finishes reading a side stream that was not complete on arrival, then hands its frame over.
async fn finish_stream(
    mut s: RecvStream,
    mut buf: BytesMut,
    max_frame: usize,
    out: mpsc::Sender<Result<Bytes, TransportError>>,
) {
    let r = loop {
        match s.read_chunk(usize::MAX, true).await {
            Ok(Some(c)) => {
                if let Err(e) = append(&mut buf, &c.bytes, max_frame) {
                    break Err(e);
                }
            }
            Ok(None) => break Ok(buf.freeze()),
            Err(quinn::ReadError::Reset(code)) => {
                debug!(%code, "side stream abandoned by its sender; discarded");
                return;
            }
            Err(e) => break Err(err("side stream", e)),
        }
    };
    let _ = out.send(r).await;
}

/// A side stream being written: dropped before it is finished (its send cancelled, e.g. a
/// request whose caller gave up while flow control held the write), it is reset, not finished
/// (quinn finishes a dropped stream), so the receiver discards it instead of taking the part
/// written for a whole frame.
struct ResetUnlessFinished(Option<quinn::SendStream>);

impl ResetUnlessFinished {
    /// Writes `data` and finishes the stream; a stream that fails on the way is reset.
    async fn write_and_finish(mut self, data: Bytes) -> Result<(), TransportError> {
        let Some(stream) = self.0.as_mut() else { return Ok(()) };
        stream.write_chunk(data).await.map_err(|e| err("write stream", e))?;
        stream.finish().map_err(|e| err("finish stream", e))?;
        self.0 = None;
        Ok(())
    }
}

impl Drop for ResetUnlessFinished {
    fn drop(&mut self) {
        if let Some(mut s) = self.0.take() {
            let _ = s.reset(VarInt::from_u32(0));
        }
    }
}

fn best_effort(msg: &Message) -> bool {
    msg.headers.get(BEST_EFFORT_HEADER).is_some_and(|v| v == "1")
}

fn own_stream(msg: &Message) -> bool {
    use hivewire_core::MessageType;
    matches!(msg.kind, MessageType::Request { .. } | MessageType::Response { .. })
}

impl QuicTx {
    /// The main stream's writer, started on first use; on a server the stream appears once
    /// the reader accepted it.
    fn main(&mut self) -> Result<&MainWriter, TransportError> {
        if self.main.is_none() {
            if let Some(mut stream) = lock(&self.slot).take() {
                if let Some(settings) = &self.settings {
                    stream.configure(settings);
                }
                let (tx, rx) = mpsc::channel(64);
                let failed = Arc::new(std::sync::Mutex::new(None));
                let settings = Arc::new(std::sync::Mutex::new(None));
                tokio::spawn(main_writer(stream, rx, failed.clone(), settings.clone()));
                self.main =
                    Some(MainWriter { tx, budget: Arc::new(Semaphore::new(MAIN_BUDGET)), failed, settings });
            }
        }
        self.main
            .as_ref()
            .ok_or_else(|| TransportError::ConnectionError("QUIC main stream not open yet".into()))
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LinkTx for QuicTx {
    async fn send_batch(&mut self, batch: &mut Vec<Message>) -> Result<(), TransportError> {
        // `ordered` leaves with each batch: size the next one at once rather than growing it
        // message by message (a reallocation and a copy of every message so far at each step).
        self.ordered.reserve(batch.len());
        for msg in batch.drain(..) {
            let datagram = self.datagrams && best_effort(&msg);
            if !datagram && !own_stream(&msg) {
                self.ordered.push(msg);
                continue;
            }
            let mut buf = BytesMut::new();
            self.codec.encode_into(&msg, &mut buf)?;
            if datagram {
                match self.conn.max_datagram_size() {
                    Some(max) if buf.len() <= max => {
                        if let Err(e) = self.conn.send_datagram(buf.freeze()) {
                            debug!(error = %e, "datagram not sent (best effort)");
                        }
                        continue;
                    }
                    _ if !own_stream(&msg) => {
                        self.ordered.push(msg);
                        continue;
                    }
                    _ => {}
                }
            }
            let large = buf.len() > LARGE_FRAME;
            let permit = self.streams.clone().acquire_owned().await.map_err(|_| TransportError::Closed)?;
            let conn = self.conn.clone();
            let write = async move {
                let _permit = permit;
                let s = ResetUnlessFinished(Some(conn.open_uni().await.map_err(|e| err("open stream", e))?));
                s.write_and_finish(buf.freeze()).await
            };
            if large {
                // Its own task: the writer goes on with the next messages meanwhile.
                tokio::spawn(async move {
                    if let Err(e) = write.await {
                        debug!(error = %e, "message on its own stream not delivered");
                    }
                });
            } else {
                write.await?;
            }
        }
        if self.ordered.is_empty() {
            return Ok(());
        }
        let ordered = std::mem::take(&mut self.ordered);
        let bytes: usize = ordered.iter().map(|m| m.payload.len() + MAIN_ENVELOPE).sum();
        let main = self.main()?;
        let main_failed = |main: &MainWriter| {
            let why = lock(&main.failed).clone().unwrap_or_else(|| "closed".into());
            TransportError::ConnectionError(format!("QUIC main stream: {why}"))
        };
        if lock(&main.failed).is_some() {
            return Err(main_failed(main));
        }
        // A batch over the whole budget waits for everything before it to be written.
        let permits = u32::try_from(bytes.min(MAIN_BUDGET)).unwrap_or(u32::MAX);
        let permit =
            main.budget.clone().acquire_many_owned(permits).await.map_err(|_| TransportError::Closed)?;
        main.tx.send(MainCmd::Batch(ordered, permit)).await.map_err(|_| main_failed(main))
    }

    /// A request or response (not a best-effort datagram, not over [`LARGE_FRAME`]) is
    /// written on a stream of its own without building `send_batch`'s future: the stream is
    /// opened, written and finished at once when quinn has a stream and window for it (the
    /// usual case), or finished by a task of its own when the window is full; with no stream
    /// free it is declined and waits for one in `send_batch`.
    fn try_send_now(&mut self, _cx: &mut std::task::Context<'_>, msg: &Message) -> TrySend {
        use futures::FutureExt;
        if !own_stream(msg) || (self.datagrams && best_effort(msg)) || msg.payload.len() > LARGE_FRAME {
            return TrySend::Declined;
        }
        let Ok(permit) = self.streams.clone().try_acquire_owned() else {
            return TrySend::Declined;
        };
        let mut buf = BytesMut::new();
        if let Err(e) = self.codec.encode_into(msg, &mut buf) {
            return TrySend::Failed(e.into());
        }
        if buf.len() > LARGE_FRAME {
            return TrySend::Declined;
        }
        // Polled once each (quinn registers nothing that outlives a dropped future).
        let stream = match self.conn.open_uni().now_or_never() {
            Some(Ok(s)) => s,
            Some(Err(e)) => return TrySend::Failed(err("open stream", e)),
            None => return TrySend::Declined,
        };
        let mut s = ResetUnlessFinished(Some(stream));
        let Some(stream) = s.0.as_mut() else { return TrySend::Declined };
        // `write_chunks` is cancel-safe and leaves in the chunk what it did not write.
        let mut rest = [buf.freeze()];
        while !rest[0].is_empty() {
            match stream.write_chunks(&mut rest).now_or_never() {
                Some(Ok(_)) => {}
                Some(Err(e)) => return TrySend::Failed(err("write stream", e)),
                None => {
                    // Flow control holds the rest: a task finishes it, as for a large message
                    // (the stream is this message's alone, so nothing waits behind it).
                    let [rest] = rest;
                    tokio::spawn(async move {
                        let _permit = permit;
                        if let Err(e) = s.write_and_finish(rest).await {
                            debug!(error = %e, "message on its own stream not delivered");
                        }
                    });
                    return TrySend::Sent;
                }
            }
        }
        let finished = stream.finish();
        drop(permit);
        match finished {
            Ok(()) => {
                s.0 = None;
                TrySend::Sent
            }
            Err(e) => TrySend::Failed(err("finish stream", e)),
        }
    }

    async fn close(&mut self) {
        let linger = self.linger;
        if let Ok(main) = self.main() {
            // The main stream is finished after what is queued for it; then wait (bounded)
            // until the peer has read everything before closing the connection: closing at
            // once would discard what is still in flight.
            let (done, finished) = oneshot::channel();
            let tx = main.tx.clone();
            let _ = tokio::time::timeout(2 * linger, async move {
                if tx.send(MainCmd::Close(linger, done)).await.is_ok() {
                    let _ = finished.await;
                }
            })
            .await;
        }
        self.conn.close(VarInt::from_u32(0), b"closed");
    }

    fn configure(&mut self, settings: &LinkSettings) {
        self.settings = Some(*settings);
        if let Some(main) = &self.main {
            // In order with the batches already queued (the engine configures a link right
            // after its handshake, so there is room); if the queue were full, the task takes
            // the settings before the next batch it writes.
            if main.tx.try_send(MainCmd::Configure(*settings)).is_err() {
                *lock(&main.settings) = Some(*settings);
            }
        }
        self.codec.set_compression(settings.compression);
    }
}

impl QuicRx {
    /// A frame already read from the main stream. (A plain match: the combinator chain it
    /// replaces moved the ~200-byte message once per step.)
    fn main_buffered(&mut self) -> Result<Option<Message>, TransportError> {
        match self.main.as_mut() {
            Some(main) => main.try_buffered(),
            None => Ok(None),
        }
    }

    /// Decodes a side stream's or datagram's bytes, which must be exactly one frame.
    fn one_frame(&mut self, bytes: Bytes) -> Result<Message, TransportError> {
        let mut buf = bytes;
        match self.codec.decode_from_bytes(&mut buf)? {
            Some(m) if buf.is_empty() => Ok(m),
            _ => Err(TransportError::InvalidMessage(
                "a QUIC side stream or datagram that is not exactly one frame".into(),
            )),
        }
    }
}

impl LinkRx for QuicRx {
    async fn recv(&mut self) -> Result<Option<Message>, TransportError> {
        if self.main.is_none() {
            let (send, recv) = self.conn.accept_bi().await.map_err(|e| err("main stream", e))?;
            let (max, threshold) = self.limits;
            let mut l = framed_halves(recv, send, max, threshold, PeerInfo::default());
            if let Some(settings) = &self.settings {
                l.rx.configure(settings);
                l.tx.configure(settings);
            }
            *lock(&self.slot) = Some(l.tx);
            self.main = Some(l.rx);
        }
        // Frames already read from the main stream first: no side-stream or datagram wait is
        // set up per message while a batch is in hand (side streams are looked at again as
        // soon as the buffer runs dry, so they wait at most one read's worth of frames).
        if let Some(m) = self.main_buffered()? {
            return Ok(Some(m));
        }
        loop {
            let Some(main) = self.main.as_mut() else { return Ok(None) };
            tokio::select! {
                biased;
                side = self.side.recv(), if self.side_open => match side {
                    Some(Ok(bytes)) => return self.one_frame(bytes).map(Some),
                    Some(Err(e)) => return Err(e),
                    None => self.side_open = false,
                },
                // A request or response stream usually arrives whole (data and FIN in one
                // packet): read it here, without a hand-off; one still arriving is finished by
                // a task, so a large one never holds up the main stream.
                s = self.conn.accept_uni(), if self.accepting => match s {
                    Ok(mut s) => {
                        let mut buf = BytesMut::new();
                        loop {
                            match futures::FutureExt::now_or_never(s.read_chunk(usize::MAX, true)) {
                                Some(Ok(Some(c))) => append(&mut buf, &c.bytes, self.max_frame)?,
                                Some(Ok(None)) => return self.one_frame(buf.freeze()).map(Some),
                                Some(Err(quinn::ReadError::Reset(code))) => {
                                    debug!(%code, "side stream abandoned by its sender; discarded");
                                    break;
                                }
                                Some(Err(e)) => return Err(err("side stream", e)),
                                None => {
                                    tokio::spawn(finish_stream(s, buf, self.max_frame, self.side_tx.clone()));
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        debug!(error = %e, "no more side streams");
                        self.accepting = false;
                    }
                },
                m = main.recv() => return m,
            }
        }
    }

    fn try_recv_buffered(&mut self) -> Result<Option<Message>, TransportError> {
        // As `recv` does first: frames already read from the main stream.
        self.main_buffered()
    }

    fn configure(&mut self, settings: &LinkSettings) {
        self.settings = Some(*settings);
        if let Some(main) = &mut self.main {
            main.configure(settings);
        }
        self.codec.set_accept(settings.accept_gzip, settings.accept_zstd);
    }
}

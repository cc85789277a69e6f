//! hivewire's UDP backend: `udp://host:port`. Unreliable and unordered by declaration.
//!
//! Each datagram carries the header of [`datagram`] and either several whole codec frames
//! (small messages of one batch share a datagram) or one fragment of a frame larger than
//! `max_packet_size`. The receiver reassembles fragments within bounds (bytes and incomplete
//! messages per session, and a timeout), drops duplicates by message id, and delivers a message
//! whole and intact or not at all. What it drops is counted in `TransportStats::backend`.
//!
//! Peers are sessions, not addresses: a dialer picks a random 64-bit session id, carried by
//! every datagram both ways, and the engine's handshake names the agent behind it; a session
//! whose address changes (NAT rebinding) keeps its link. Session ids are not secrets: where an
//! attacker can see or guess traffic, use `quic://`.
//!
//! The engine's control messages (handshake, subscriptions, goodbye) are sent
//! [`UdpOptions::control_copies`] times (duplicates are dropped by id), so a 5% loss rarely costs
//! a handshake. Nothing else is retransmitted.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod datagram;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use datagram::{Header, Limits, Reassembler, UdpCounters, HEADER_LEN};
use hivewire_codec::{CodecConfig, FrameCodec, HEADER_LEN as FRAME_HEADER_LEN};
use hivewire_core::{
    AgentId, Link, LinkRx, LinkSettings, LinkTx, Message, MessageType, Node, PeerInfo, TransportConfig,
    TransportError,
};
use socket2::SockRef;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// URL scheme of this backend.
pub const SCHEME: &str = "udp";
/// Complete messages waiting for a link's reader (a bound on their count; their bytes are
/// bounded by [`Inbound`]); beyond, new ones are dropped and counted.
const LINK_QUEUE: usize = 16_384;
/// Bytes of complete messages waiting for one link's reader, beyond twice the largest message.
const LINK_BYTES: usize = 8 << 20;

/// The demultiplexer's end of a link's inbound queue, bounded in count and in bytes.
struct Inbound {
    tx: mpsc::Sender<Bytes>,
    bytes: Arc<std::sync::atomic::AtomicUsize>,
    budget: usize,
}

impl Inbound {
    fn new(max_message: usize) -> (Inbound, mpsc::Receiver<Bytes>, Arc<std::sync::atomic::AtomicUsize>) {
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (Inbound { tx, bytes: bytes.clone(), budget: 2 * max_message + LINK_BYTES }, rx, bytes)
    }

    /// Queues `data` for the reader; `Ok(false)` if dropped because the reader is behind,
    /// `Err(())` if the link is gone.
    fn offer(&self, data: Bytes) -> Result<bool, ()> {
        use std::sync::atomic::Ordering::Relaxed;
        let len = data.len();
        if self.bytes.load(Relaxed) + len > self.budget {
            return Ok(false);
        }
        match self.tx.try_send(data) {
            Ok(()) => {
                self.bytes.fetch_add(len, Relaxed);
                Ok(true)
            }
            Err(mpsc::error::TrySendError::Full(_)) => Ok(false),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        }
    }
}
/// Socket buffers asked of the kernel, so a burst of fragments is not dropped on arrival.
const SOCKET_BUFFER: usize = 4 << 20;

/// UDP settings (the seeds' `UdpConfig` knobs plus the reassembly bounds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpOptions {
    /// Largest datagram sent, header included (default 1200: below the usual 1280–1500 MTU).
    pub max_packet_size: usize,
    /// `SO_BROADCAST` on the socket.
    pub broadcast: bool,
    /// IPv4 multicast TTL; `None` leaves the system default.
    pub multicast_ttl: Option<u32>,
    /// An incomplete message is dropped this long after its first fragment (default 2 s).
    pub reassembly_timeout: Duration,
    /// Bytes that incomplete messages of one session may hold (default: twice
    /// `max_message_size` plus 1 MiB).
    pub reassembly_budget: Option<usize>,
    /// Incomplete messages one session may have at once (default 64).
    pub max_incomplete: usize,
    /// Times each control message is sent (default 3).
    pub control_copies: u8,
}

impl Default for UdpOptions {
    fn default() -> Self {
        UdpOptions {
            max_packet_size: 1200,
            broadcast: false,
            multicast_ttl: None,
            reassembly_timeout: Duration::from_secs(2),
            reassembly_budget: None,
            max_incomplete: 64,
            control_copies: 3,
        }
    }
}

impl UdpOptions {
    fn limits(&self, max_message_size: usize) -> Result<Limits, TransportError> {
        if self.max_packet_size <= HEADER_LEN + FRAME_HEADER_LEN || self.max_packet_size > 65_507 {
            return Err(TransportError::ConnectionError(format!(
                "max_packet_size {} is outside {}..=65507",
                self.max_packet_size,
                HEADER_LEN + FRAME_HEADER_LEN + 1
            )));
        }
        let max_message =
            FRAME_HEADER_LEN + CodecConfig { max_message_size, ..CodecConfig::default() }.max_body();
        let chunk = self.max_packet_size - HEADER_LEN;
        if max_message.div_ceil(chunk) > u16::MAX as usize {
            return Err(TransportError::ConnectionError(format!(
                "max_message_size {max_message_size} needs more than 65535 fragments of {chunk} bytes"
            )));
        }
        Ok(Limits {
            max_message,
            chunk,
            budget: self.reassembly_budget.unwrap_or(2 * max_message + (1 << 20)).max(max_message),
            max_incomplete: self.max_incomplete.max(1),
            timeout: self.reassembly_timeout,
        })
    }
}

fn configure(sock: &UdpSocket, opts: &UdpOptions) -> std::io::Result<()> {
    let s = SockRef::from(sock);
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    sock.set_broadcast(opts.broadcast)?;
    if let Some(ttl) = opts.multicast_ttl {
        sock.set_multicast_ttl_v4(ttl)?;
    }
    Ok(())
}

async fn resolve(addr: &str) -> Result<SocketAddr, TransportError> {
    hivewire_core::resolve_one(SCHEME, addr).await
}

/// Constructors of UDP nodes.
#[derive(Debug, Clone, Copy)]
pub struct UdpTransport;

/// A listener's view of one session.
struct Session {
    to_link: Inbound,
    addr: Arc<Mutex<SocketAddr>>,
    reasm: Reassembler,
}

type Sessions = Arc<Mutex<HashMap<u64, Session>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl UdpTransport {
    /// A hub listening on `addr` (`host:port`; port 0 picks a free one).
    pub async fn listen(
        addr: &str,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
        opts: UdpOptions,
    ) -> Result<Node, TransportError> {
        let limits = opts.limits(config.max_message_size)?;
        let sock = UdpSocket::bind(resolve(addr).await?)
            .await
            .map_err(|e| TransportError::ConnectionError(format!("cannot listen on {addr}: {e}")))?;
        configure(&sock, &opts)?;
        let local = sock.local_addr()?;
        let sock = Arc::new(sock);
        let max_sessions = config.max_peers.max(1) * 2;
        let node = Node::new(agent_id, config, SCHEME);
        node.set_hub(true);
        node.set_listen_url(format!("{SCHEME}://{local}"));
        let counters = Arc::new(UdpCounters::default());
        let c = counters.clone();
        node.set_backend_stats(move || c.snapshot());
        info!(%local, agent = %node.agent_id(), "udp listener up");
        let sessions: Sessions = Arc::default();
        tokio::spawn(serve(node.clone(), sock, sessions, limits, opts, counters, max_sessions));
        Ok(node)
    }

    /// An agent connected to the hub at `addr`; returns after the handshake (which the hub must
    /// answer within `connection_timeout_ms`). Redials with a new session when the link drops.
    pub async fn connect(
        addr: &str,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
        opts: UdpOptions,
    ) -> Result<Node, TransportError> {
        let limits = opts.limits(config.max_message_size)?;
        let remote = resolve(addr).await?;
        let counters = Arc::new(UdpCounters::default());
        let cfg = config.clone();
        let c = counters.clone();
        let node = Node::dial(agent_id, config, SCHEME, move || {
            let (cfg, opts, c) = (cfg.clone(), opts.clone(), c.clone());
            async move { dial(remote, &cfg, &opts, limits, c).await }
        })
        .await?;
        node.set_backend_stats(move || counters.snapshot());
        Ok(node)
    }
}

/// Dials `addr` with a fresh session; returns the link without the protocol handshake (for
/// tests and tools that speak the wire protocol themselves).
pub async fn dial_link(
    addr: &str,
    config: &TransportConfig,
    opts: &UdpOptions,
) -> Result<Link<UdpTx, UdpRx>, TransportError> {
    let limits = opts.limits(config.max_message_size)?;
    dial(resolve(addr).await?, config, opts, limits, Arc::default()).await
}

/// Opens a client socket towards `remote` with a fresh session; returns its link.
async fn dial(
    remote: SocketAddr,
    config: &TransportConfig,
    opts: &UdpOptions,
    limits: Limits,
    counters: Arc<UdpCounters>,
) -> Result<Link<UdpTx, UdpRx>, TransportError> {
    let bind: SocketAddr = if remote.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let sock = UdpSocket::bind(bind).await?;
    configure(&sock, opts)?;
    sock.connect(remote).await?;
    let sock = Arc::new(sock);
    let session = fastrand::u64(1..);
    // Open the session at once, so the hub knows of it (and times it out) even before a Hello.
    let mut open = BytesMut::new();
    Header { fragment: false, close: false, session, msg_id: 1, index: 0, count: 1 }.write(&mut open);
    for _ in 0..opts.control_copies.max(1) {
        let _ = sock.send(&open).await;
    }
    let start = Arc::new(SessionStart::default());
    let resender = tokio::spawn(resend_start(sock.clone(), start.clone(), config.connection_timeout()));
    let info =
        PeerInfo { transport: SCHEME.into(), remote_addr: Some(remote.to_string()), ..PeerInfo::default() };
    let cleanup = Cleanup::Tasks(vec![resender]);
    let source = Source::Socket(Box::new(SocketReader {
        sock: sock.clone(),
        session,
        buf: vec![0u8; 65_536],
        reasm: Reassembler::default(),
        limits,
        last_sweep: Instant::now(),
        start: start.clone(),
        refused: None,
        ended: false,
    }));
    let mut l =
        link(sock, Arc::new(Mutex::new(remote)), session, config, opts, source, cleanup, counters, info);
    l.tx.start = Some(start);
    Ok(l)
}

/// A dialer's session until the hub is first heard from: the control datagrams sent so far
/// (the Hello), which [`resend_start`] repeats, so a handshake lost whole (all its copies, or
/// sent a moment before the hub was listening) is not left to the handshake timeout.
#[derive(Default)]
struct SessionStart {
    heard: std::sync::atomic::AtomicBool,
    sent: Mutex<Vec<Bytes>>,
}

/// Most control datagrams kept for resending.
const START_KEEP: usize = 8;
/// Resend period of a session's first control datagrams.
const START_RESEND: Duration = Duration::from_millis(250);

impl SessionStart {
    fn heard(&self) -> bool {
        self.heard.load(std::sync::atomic::Ordering::Acquire)
    }
}

async fn resend_start(sock: Arc<UdpSocket>, start: Arc<SessionStart>, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        tokio::time::sleep(START_RESEND).await;
        if start.heard() || tokio::time::Instant::now() > deadline {
            return;
        }
        let again: Vec<Bytes> = lock(&start.sent).clone();
        for d in again {
            let _ = sock.send(&d).await;
        }
    }
}

/// The dialer's socket, read by its link's reading half itself (no task and no channel in
/// between: one wake-up less per message than the listener's side, where one socket serves
/// every session). Only datagrams of its own session count.
struct SocketReader {
    sock: Arc<UdpSocket>,
    session: u64,
    buf: Vec<u8>,
    reasm: Reassembler,
    limits: Limits,
    last_sweep: Instant,
    start: Arc<SessionStart>,
    /// Set once the hub's port was reported closed: datagrams read since (at most 4,096, then
    /// the session ends) are what the kernel still held.
    refused: Option<u32>,
    ended: bool,
}

impl SocketReader {
    /// The next complete message data of the session; `None` once the session has ended (the
    /// hub closed it, or its port is closed and what it sent before has been read).
    ///
    /// Cancel-safe: nothing is held across the one await but the socket's own readiness.
    /// Incomplete messages are swept as datagrams arrive (their memory is bounded by the
    /// reassembly limits meanwhile; the hub's heartbeats bring a datagram at least every
    /// heartbeat interval).
    async fn next(&mut self, counters: &UdpCounters) -> Option<Bytes> {
        while !self.ended {
            let received = match self.refused.as_mut() {
                None => self.sock.recv(&mut self.buf).await,
                Some(drained) => {
                    *drained += 1;
                    if *drained > 4096 {
                        break;
                    }
                    match self.sock.try_recv(&mut self.buf) {
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                        Err(_) => break,
                        ok => ok,
                    }
                }
            };
            let n = match received {
                Ok(n) => n,
                Err(e) => {
                    // A connected UDP socket reports ICMP port-unreachable here — possibly before
                    // datagrams that arrived earlier, which are read before giving up.
                    debug!(error = %e, "udp receive failed");
                    if e.kind() == std::io::ErrorKind::ConnectionRefused && self.refused.is_none() {
                        self.refused = Some(0);
                    }
                    continue;
                }
            };
            let now = Instant::now();
            if now.duration_since(self.last_sweep) > self.limits.timeout / 2 {
                self.reasm.sweep(now, &self.limits, counters);
                self.last_sweep = now;
            }
            let d = &self.buf[..n];
            let Some(h) = Header::parse(d).filter(|h| h.session == self.session) else {
                UdpCounters::bump(&counters.malformed);
                continue;
            };
            if !self.start.heard() {
                self.start.heard.store(true, std::sync::atomic::Ordering::Release);
                lock(&self.start.sent).clear();
            }
            if h.close {
                debug!("the hub closed the udp session");
                break;
            }
            let body = Bytes::copy_from_slice(&d[HEADER_LEN..]);
            if let Some(data) = self.reasm.accept(h, body, now, &self.limits, counters) {
                return Some(data);
            }
        }
        self.ended = true;
        None
    }
}

/// The listener's socket reader: demultiplexes datagrams by session, creating a link for each
/// new session (the engine's handshake then decides whether it stays).
async fn serve(
    node: Node,
    sock: Arc<UdpSocket>,
    sessions: Sessions,
    limits: Limits,
    opts: UdpOptions,
    counters: Arc<UdpCounters>,
    max_sessions: usize,
) {
    let shutdown = node.shutdown_token();
    let mut buf = vec![0u8; 65_536];
    let mut last_sweep = Instant::now();
    // One cancellation future and one timer for the whole loop: a `timeout` around each
    // receive would put a timer in and out of the wheel at every wait (every round trip).
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let mut sweep_tick = tokio::time::interval(limits.timeout / 2);
    sweep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let received = tokio::select! {
            biased;
            _ = &mut cancelled => break,
            r = sock.recv_from(&mut buf) => Some(r),
            _ = sweep_tick.tick() => None,
        };
        let now = Instant::now();
        if received.is_none() || now.duration_since(last_sweep) > limits.timeout / 2 {
            for s in lock(&sessions).values_mut() {
                s.reasm.sweep(now, &limits, &counters);
            }
            last_sweep = now;
        }
        let (n, from) = match received {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                debug!(error = %e, "udp receive failed");
                continue;
            }
            None => continue,
        };
        let d = &buf[..n];
        let Some(h) = Header::parse(d) else {
            UdpCounters::bump(&counters.malformed);
            continue;
        };
        let body = Bytes::copy_from_slice(&d[HEADER_LEN..]);
        let mut map = lock(&sessions);
        if h.close {
            // Dropping the session's sender ends its link's reader.
            map.remove(&h.session);
            continue;
        }
        if !map.contains_key(&h.session) {
            if map.len() >= max_sessions {
                UdpCounters::bump(&counters.sessions_refused);
                continue;
            }
            let (to_link, from_net, queued) = Inbound::new(limits.max_message);
            let addr = Arc::new(Mutex::new(from));
            map.insert(h.session, Session { to_link, addr: addr.clone(), reasm: Reassembler::default() });
            let info = PeerInfo {
                transport: SCHEME.into(),
                remote_addr: Some(from.to_string()),
                ..PeerInfo::default()
            };
            let cleanup = Cleanup::Session(sessions.clone(), h.session);
            let l = link(
                sock.clone(),
                addr,
                h.session,
                node.config(),
                &opts,
                Source::Demux { from_net, queued },
                cleanup,
                counters.clone(),
                info,
            );
            node.accept_link(l);
        }
        let Some(s) = map.get_mut(&h.session) else { continue };
        let Some(data) = s.reasm.accept(h, body, now, &limits, &counters) else { continue };
        {
            let mut a = lock(&s.addr);
            if *a != from {
                debug!(old = %*a, new = %from, "udp session moved");
                *a = from;
            }
        }
        if let Ok(false) = s.to_link.offer(data) {
            UdpCounters::bump(&counters.reader_behind);
        }
    }
    // The sessions stay: each link removes its own when the engine drops it. Clearing them
    // here would end the links' readers while `Node::close` is still flushing their goodbyes.
}

/// What to undo when a link's reading half is dropped.
enum Cleanup {
    /// The dialer's reader and resender tasks.
    Tasks(Vec<tokio::task::JoinHandle<()>>),
    /// The listener's session entry.
    Session(Sessions, u64),
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        match self {
            Cleanup::Tasks(ts) => ts.iter().for_each(|t| t.abort()),
            Cleanup::Session(map, id) => {
                lock(map).remove(id);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn link(
    sock: Arc<UdpSocket>,
    peer: Arc<Mutex<SocketAddr>>,
    session: u64,
    config: &TransportConfig,
    opts: &UdpOptions,
    source: Source,
    cleanup: Cleanup,
    counters: Arc<UdpCounters>,
    info: PeerInfo,
) -> Link<UdpTx, UdpRx> {
    let codec_cfg = CodecConfig {
        max_message_size: config.max_message_size,
        compression_threshold: config.compression_threshold,
        ..CodecConfig::default()
    };
    Link::new(
        UdpTx {
            sock,
            peer,
            session,
            next_id: 2,
            codec: FrameCodec::new(codec_cfg.clone()),
            frame: BytesMut::new(),
            packed: BytesMut::new(),
            packed_copies: 1,
            max_packet: opts.max_packet_size,
            control_copies: opts.control_copies.max(1),
            start: None,
        },
        UdpRx {
            source,
            codec: FrameCodec::new(codec_cfg),
            ready: BytesMut::new(),
            counters,
            _cleanup: cleanup,
        },
        info,
    )
}

/// Sending half of a UDP link.
pub struct UdpTx {
    sock: Arc<UdpSocket>,
    peer: Arc<Mutex<SocketAddr>>,
    session: u64,
    next_id: u32,
    codec: FrameCodec,
    frame: BytesMut,
    packed: BytesMut,
    packed_copies: u8,
    max_packet: usize,
    control_copies: u8,
    /// The dialer's session start, while the hub has not been heard from.
    start: Option<Arc<SessionStart>>,
}

/// Where a link's reading half gets its sessions's complete messages.
enum Source {
    /// The listener's demultiplexer hands them over through a channel (and counts their bytes
    /// in `queued` until they are taken).
    Demux { from_net: mpsc::Receiver<Bytes>, queued: Arc<std::sync::atomic::AtomicUsize> },
    /// The dialer reads its own connected socket.
    Socket(Box<SocketReader>),
}

/// Receiving half of a UDP link.
pub struct UdpRx {
    source: Source,
    codec: FrameCodec,
    ready: BytesMut,
    counters: Arc<UdpCounters>,
    _cleanup: Cleanup,
}

impl std::fmt::Debug for UdpTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpTx").field("session", &self.session).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for UdpRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpRx").field("ready", &self.ready.len()).finish_non_exhaustive()
    }
}

impl UdpTx {
    fn take_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    async fn send(&self, d: &[u8]) -> Result<(), TransportError> {
        let to = *lock(&self.peer);
        match self.sock.send_to(d, to).await {
            Ok(_) => Ok(()),
            // Unreliable by declaration: a refused or full path loses this datagram, not the link.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Err(TransportError::ConnectionError(format!("udp peer {to} unreachable (port closed)")))
            }
            Err(e) => {
                debug!(error = %e, "udp send failed; datagram lost");
                Ok(())
            }
        }
    }

    async fn flush_packed(&mut self) -> Result<(), TransportError> {
        if self.packed.len() > HEADER_LEN {
            let d = self.packed.split().freeze();
            for _ in 0..self.packed_copies.max(1) {
                self.send(&d).await?;
            }
            if let Some(start) = self.start.as_ref().filter(|s| self.packed_copies > 1 && !s.heard()) {
                let mut sent = lock(&start.sent);
                if sent.len() < START_KEEP {
                    sent.push(d);
                }
            }
        }
        self.packed.clear();
        self.packed_copies = 1;
        Ok(())
    }

    fn start_packed(&mut self) {
        let id = self.take_id();
        Header { fragment: false, close: false, session: self.session, msg_id: id, index: 0, count: 1 }
            .write(&mut self.packed);
    }
}

impl LinkTx for UdpTx {
    async fn send_batch(&mut self, batch: &mut Vec<Message>) -> Result<(), TransportError> {
        for msg in batch.drain(..) {
            self.frame.clear();
            self.codec.encode_into(&msg, &mut self.frame)?;
            let copies = if matches!(msg.kind, MessageType::Control(_)) { self.control_copies } else { 1 };
            if HEADER_LEN + self.frame.len() <= self.max_packet {
                // Whole frames share datagrams; a datagram holding a control message is sent
                // `control_copies` times (the receiver keeps the first copy).
                if !self.packed.is_empty() && self.packed.len() + self.frame.len() > self.max_packet {
                    self.flush_packed().await?;
                }
                if self.packed.is_empty() {
                    self.start_packed();
                }
                self.packed.extend_from_slice(&self.frame);
                self.packed_copies = self.packed_copies.max(copies);
                continue;
            }
            self.flush_packed().await?;
            let id = self.take_id();
            let frame = self.frame.split().freeze();
            let mut d = BytesMut::with_capacity(self.max_packet);
            let chunk = self.max_packet - HEADER_LEN;
            let count = frame.len().div_ceil(chunk);
            let count = u16::try_from(count).map_err(|_| TransportError::MessageTooLarge {
                size: frame.len(),
                max: chunk * u16::MAX as usize,
            })?;
            for _ in 0..copies {
                for (i, part) in frame.chunks(chunk).enumerate() {
                    d.clear();
                    Header {
                        fragment: true,
                        close: false,
                        session: self.session,
                        msg_id: id,
                        index: i as u16,
                        count,
                    }
                    .write(&mut d);
                    d.extend_from_slice(part);
                    self.send(&d).await?;
                }
            }
        }
        self.flush_packed().await
    }

    async fn close(&mut self) {
        let _ = self.flush_packed().await;
        let mut d = BytesMut::new();
        let id = self.take_id();
        Header { fragment: false, close: true, session: self.session, msg_id: id, index: 0, count: 1 }
            .write(&mut d);
        for _ in 0..self.control_copies {
            let _ = self.send(&d).await;
        }
    }

    fn configure(&mut self, settings: &LinkSettings) {
        self.codec.set_compression(settings.compression);
    }
}

impl UdpRx {
    /// The next message of the datagram in hand, if any. A damaged datagram is dropped like a
    /// lost one (the link stays).
    fn take_ready(&mut self) -> Option<Message> {
        if self.ready.is_empty() {
            return None;
        }
        match self.codec.decode_from(&mut self.ready) {
            Ok(Some(m)) => Some(m),
            Ok(None) | Err(_) => {
                warn!(left = self.ready.len(), "undecodable udp message dropped");
                UdpCounters::bump(&self.counters.malformed);
                self.ready.clear();
                None
            }
        }
    }

    /// The next datagram's messages from the network; false once the session has ended.
    async fn next_datagram(&mut self) -> bool {
        let data = match &mut self.source {
            Source::Demux { from_net, queued } => match from_net.recv().await {
                Some(data) => {
                    queued.fetch_sub(data.len(), std::sync::atomic::Ordering::Relaxed);
                    data
                }
                None => return false,
            },
            Source::Socket(reader) => match reader.next(&self.counters).await {
                Some(data) => data,
                None => return false,
            },
        };
        self.ready = BytesMut::from(data);
        true
    }
}

impl LinkRx for UdpRx {
    async fn recv(&mut self) -> Result<Option<Message>, TransportError> {
        loop {
            if let Some(m) = self.take_ready() {
                return Ok(Some(m));
            }
            if !self.next_datagram().await {
                return Ok(None);
            }
        }
    }

    /// Only what the datagram in hand still holds: the next datagram comes through `recv`,
    /// whose channel or socket receive counts against tokio's cooperative budget (a flood then still
    /// lets the reader's worker run its other tasks).
    fn try_recv_buffered(&mut self) -> Result<Option<Message>, TransportError> {
        Ok(self.take_ready())
    }

    fn configure(&mut self, settings: &LinkSettings) {
        self.codec.set_accept(settings.accept_gzip, settings.accept_zstd);
    }
}

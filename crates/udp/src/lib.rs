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
//! whose address changes (NAT rebinding) keeps its link. On the hub each session gets a socket
//! connected to its address (`SO_REUSEPORT` on the listener's address), read by its own link;
//! the listener's socket takes what no session socket does. Session ids are not secrets: where an
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
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use datagram::{Header, Limits, Reassembler, UdpCounters, HEADER_LEN};
use hivewire_codec::{CodecConfig, FrameCodec, HEADER_LEN as FRAME_HEADER_LEN};
use hivewire_core::{
    AgentId, Link, LinkRx, LinkSettings, LinkTx, Message, MessageType, Node, PeerInfo, TransportConfig,
    TransportError, TrySend,
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
    /// Shared with the session's own socket, if it has one: a message whose datagrams (or
    /// copies) come partly through each is reassembled, and delivered, once.
    reasm: Arc<Mutex<Reassembler>>,
    /// The peer address the session's own connected socket is connected to, if it has one.
    own_to: Option<SocketAddr>,
}

/// Datagrams a session's own socket received for other sessions (several sessions may come
/// from one address; the kernel hands all of that address's datagrams to the first session's
/// socket), on their way to the listener, which demultiplexes them. Bounded in count and bytes.
#[derive(Clone)]
struct Foreign {
    tx: mpsc::Sender<(Bytes, SocketAddr)>,
    bytes: Arc<std::sync::atomic::AtomicUsize>,
}

/// Bytes of foreign datagrams waiting for the listener.
const FOREIGN_BYTES: usize = 8 << 20;

impl Foreign {
    fn offer(&self, d: &[u8], from: SocketAddr, counters: &UdpCounters) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.bytes.load(Relaxed) + d.len() > FOREIGN_BYTES {
            UdpCounters::bump(&counters.reader_behind);
            return;
        }
        match self.tx.try_send((Bytes::copy_from_slice(d), from)) {
            Ok(()) => {
                self.bytes.fetch_add(d.len(), Relaxed);
            }
            Err(_) => UdpCounters::bump(&counters.reader_behind),
        }
    }

    /// The listener took `d` off the queue: its bytes no longer count.
    fn taken(&self, d: &[u8]) {
        self.bytes.fetch_sub(d.len(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// A UDP socket with `SO_REUSEPORT`, bound to `local` and, for a session's own socket,
/// connected to `peer`: the kernel then hands that peer's datagrams to it rather than to the
/// listener (a connected socket is the closer match), so the session's link reads them itself,
/// without the listener's demultiplexing and one task hop less per message.
fn reuse_port_socket(
    local: SocketAddr,
    peer: Option<SocketAddr>,
    opts: &UdpOptions,
) -> std::io::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(local),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&local.into())?;
    if let Some(peer) = peer {
        s.connect(&peer.into())?;
    }
    let sock = UdpSocket::from_std(s.into())?;
    configure(&sock, opts)?;
    Ok(sock)
}

/// The listener's socket. A plain bind first (no `SO_REUSEPORT`) claims the address, so that a
/// port anybody holds, another hub included, is refused with `AddrInUse` rather than shared;
/// then the listener binds that port with `SO_REUSEPORT` so the sessions' sockets can too.
/// (Between the probe's release and the second bind a second hub starting in the same
/// microsecond could also pass its probe; `SO_REUSEPORT` only ever groups sockets of one user.)
fn bind_listener(addr: SocketAddr, opts: &UdpOptions) -> std::io::Result<UdpSocket> {
    let probe = std::net::UdpSocket::bind(addr)?;
    let local = probe.local_addr()?;
    drop(probe);
    reuse_port_socket(local, None, opts)
}

type Sessions = Arc<Mutex<HashMap<u64, Session>>>;

/// The sockets a listener bound (its own and its sessions'), as long as anything holds them.
type Sockets = Arc<Mutex<Vec<std::sync::Weak<UdpSocket>>>>;

/// How long `close` waits for a listener's sockets to be released.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// Waits (at most [`RELEASE_WAIT`]) until every socket of `sockets` is closed.
async fn released(sockets: Sockets) {
    let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
    loop {
        let live = {
            let mut v = lock(&sockets);
            v.retain(|w| w.strong_count() > 0);
            v.len()
        };
        if live == 0 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(live, "udp sockets still held after close");
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

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
        let sock = bind_listener(resolve(addr).await?, &opts)
            .map_err(|e| TransportError::ConnectionError(format!("cannot listen on {addr}: {e}")))?;
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
        // The listener's socket and the sessions' own: `close` returns once they are all gone
        // (their tasks end with the node), so the port is free for the next hub at once.
        let sockets: Sockets = Arc::new(Mutex::new(vec![Arc::downgrade(&sock)]));
        let held = sockets.clone();
        node.on_closed(move || released(held));
        tokio::spawn(serve(node.clone(), sock, sessions, sockets, limits, opts, counters, max_sessions));
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
        arena: BytesMut::new(),
        reasm: Arc::default(),
        limits,
        last_sweep: Instant::now(),
        start: Some(start.clone()),
        foreign: None,
        refused: None,
        ended: false,
        closed: false,
    }));
    let mut l =
        link(sock, Arc::new(Mutex::new(remote)), session, config, opts, source, cleanup, counters, info);
    l.tx.start = Some(start);
    l.tx.connected = true;
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

/// A connected socket read by its link's reading half itself (no task and no channel in
/// between): the dialer's, and on the hub a session's own socket. Datagrams of its own session
/// are reassembled here; on the hub, those of other sessions from the same address go on to
/// the listener (`foreign`); on the dialer they are dropped and counted.
struct SocketReader {
    sock: Arc<UdpSocket>,
    session: u64,
    buf: Vec<u8>,
    /// Where the bodies of whole (unfragmented) datagrams are copied, each taken off as a
    /// `Bytes` sharing the block: one allocation per block instead of two per datagram (a
    /// copy of its own, then the promotion of that copy when the decoder slices the payload
    /// out of it). Fragments are copied on their own, so that what the reassembler holds pins
    /// no more memory than it counts.
    arena: BytesMut,
    /// On the hub, shared with the listener's view of the session.
    reasm: Arc<Mutex<Reassembler>>,
    limits: Limits,
    last_sweep: Instant,
    /// The dialer's session start (`None` on the hub).
    start: Option<Arc<SessionStart>>,
    /// Where the hub's session socket sends other sessions' datagrams, and its peer's address.
    foreign: Option<(Foreign, SocketAddr)>,
    /// Set once the hub's port was reported closed: datagrams read since (at most 4,096, then
    /// the session ends) are what the kernel still held.
    refused: Option<u32>,
    ended: bool,
    /// The peer closed the session (a CLOSE datagram), as opposed to the socket's path
    /// failing.
    closed: bool,
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
                lock(&self.reasm).sweep(now, &self.limits, counters);
                self.last_sweep = now;
            }
            let d = &self.buf[..n];
            let Some(h) = Header::parse(d) else {
                UdpCounters::bump(&counters.malformed);
                continue;
            };
            if h.session != self.session {
                match &self.foreign {
                    Some((f, from)) => f.offer(d, *from, counters),
                    None => UdpCounters::bump(&counters.malformed),
                }
                continue;
            }
            if let Some(start) = self.start.as_ref().filter(|s| !s.heard()) {
                start.heard.store(true, std::sync::atomic::Ordering::Release);
                lock(&start.sent).clear();
            }
            if h.close {
                debug!("the peer closed the udp session");
                self.closed = true;
                break;
            }
            let body = if h.fragment {
                Bytes::copy_from_slice(&d[HEADER_LEN..])
            } else {
                arena_copy(&mut self.arena, &d[HEADER_LEN..])
            };
            let data = lock(&self.reasm).accept(h, body, now, &self.limits, counters);
            if let Some(data) = data {
                return Some(data);
            }
        }
        self.ended = true;
        None
    }
}

/// Size of a [`SocketReader`]'s arena block: a hundred or more small messages per allocation,
/// and a held message pins at most this much.
const ARENA: usize = 16 * 1024;

/// `src` copied into `arena` (a fresh block when the current one has no room) and taken off.
fn arena_copy(arena: &mut BytesMut, src: &[u8]) -> Bytes {
    if arena.capacity() - arena.len() < src.len() {
        *arena = BytesMut::with_capacity(ARENA.max(src.len()));
    }
    arena.extend_from_slice(src);
    arena.split().freeze()
}

/// The listener's socket reader: demultiplexes datagrams by session, creating a link for each
/// new session (the engine's handshake then decides whether it stays). A new session from an
/// address no other session's socket is connected to gets a socket of its own (see
/// [`reuse_port_socket`]); what reaches the listener afterwards (datagrams sent before that
/// socket was connected, a session that moved to another address, a second session from one
/// address, forwarded by the first one's socket) still goes through here.
#[allow(clippy::too_many_arguments)]
async fn serve(
    node: Node,
    sock: Arc<UdpSocket>,
    sessions: Sessions,
    sockets: Sockets,
    limits: Limits,
    opts: UdpOptions,
    counters: Arc<UdpCounters>,
    max_sessions: usize,
) {
    let shutdown = node.shutdown_token();
    let local = match sock.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "udp listener has no local address");
            return;
        }
    };
    let (foreign_tx, mut foreign_rx) = mpsc::channel::<(Bytes, SocketAddr)>(LINK_QUEUE);
    let foreign = Foreign { tx: foreign_tx, bytes: Arc::default() };
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
            r = sock.recv_from(&mut buf) => Some(r.map(|(n, from)| (None, n, from))),
            Some((d, from)) = foreign_rx.recv() => {
                foreign.taken(&d);
                Some(Ok((Some(d), 0, from)))
            }
            _ = sweep_tick.tick() => None,
        };
        let now = Instant::now();
        if received.is_none() || now.duration_since(last_sweep) > limits.timeout / 2 {
            for s in lock(&sessions).values_mut() {
                lock(&s.reasm).sweep(now, &limits, &counters);
            }
            last_sweep = now;
        }
        let (forwarded, n, from) = match received {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                debug!(error = %e, "udp receive failed");
                continue;
            }
            None => continue,
        };
        let d = match &forwarded {
            Some(d) => &d[..],
            None => &buf[..n],
        };
        UdpCounters::bump(&counters.via_listener);
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
            // A socket of its own, unless another session's socket already takes this
            // address's datagrams (two connected to one address would split them at random).
            let own = if map.values().any(|s| s.own_to == Some(from)) {
                None
            } else {
                match reuse_port_socket(local, Some(from), &opts) {
                    Ok(s) => {
                        UdpCounters::bump(&counters.session_sockets);
                        let s = Arc::new(s);
                        let mut held = lock(&sockets);
                        held.retain(|w| w.strong_count() > 0);
                        held.push(Arc::downgrade(&s));
                        Some(s)
                    }
                    Err(e) => {
                        debug!(error = %e, %from, "no socket of its own for a udp session");
                        None
                    }
                }
            };
            let reasm: Arc<Mutex<Reassembler>> = Arc::default();
            map.insert(
                h.session,
                Session {
                    to_link,
                    addr: addr.clone(),
                    reasm: reasm.clone(),
                    own_to: own.as_ref().map(|_| from),
                },
            );
            let info = PeerInfo {
                transport: SCHEME.into(),
                remote_addr: Some(from.to_string()),
                ..PeerInfo::default()
            };
            let cleanup = Cleanup::Session(sessions.clone(), h.session);
            let reader = own.as_ref().map(|own| {
                Box::new(SocketReader {
                    sock: own.clone(),
                    session: h.session,
                    buf: vec![0u8; 65_536],
                    arena: BytesMut::new(),
                    reasm: reasm.clone(),
                    limits,
                    last_sweep: now,
                    start: None,
                    foreign: Some((foreign.clone(), from)),
                    refused: None,
                    ended: false,
                    closed: false,
                })
            });
            let mut l = link(
                sock.clone(),
                addr,
                h.session,
                node.config(),
                &opts,
                Source::Demux { from_net, queued, own: reader },
                cleanup,
                counters.clone(),
                info,
            );
            l.tx.own = own.map(|s| (Arc::downgrade(&s), from));
            node.accept_link(l);
        }
        let Some(s) = map.get_mut(&h.session) else { continue };
        let Some(data) = lock(&s.reasm).accept(h, body, now, &limits, &counters) else { continue };
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
            own: None,
            connected: false,
        },
        UdpRx { source, codec: FrameCodec::new(codec_cfg), ready: Bytes::new(), counters, _cleanup: cleanup },
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
    /// On the hub, the session's own connected socket and its peer: datagrams to that peer
    /// leave through it (a connected socket skips the route lookup of each `send_to`). Weak:
    /// once the reading half has dropped it, the socket closes and sends go through the
    /// listener's.
    own: Option<(std::sync::Weak<UdpSocket>, SocketAddr)>,
    /// `sock` is the dialer's, connected to the hub.
    connected: bool,
}

/// Where a link's reading half gets its sessions's complete messages.
enum Source {
    /// The listener's demultiplexer hands them over through a channel (and counts their bytes
    /// in `queued` until they are taken).
    /// On the hub, the session's own connected socket, when it has one, is read beside it.
    Demux {
        from_net: mpsc::Receiver<Bytes>,
        queued: Arc<std::sync::atomic::AtomicUsize>,
        own: Option<Box<SocketReader>>,
    },
    /// The dialer reads its own connected socket.
    Socket(Box<SocketReader>),
}

/// Receiving half of a UDP link.
pub struct UdpRx {
    source: Source,
    codec: FrameCodec,
    ready: Bytes,
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

    /// Sends one datagram to the session's peer. The dialer's socket is connected to the hub
    /// (`send` skips the route lookup and the address lock of `send_to`); on the hub, through
    /// the session's own socket when it has one.
    async fn send(&self, d: &[u8]) -> Result<(), TransportError> {
        std::future::poll_fn(|cx| self.poll_send(cx, d)).await
    }

    async fn flush_packed(&mut self) -> Result<(), TransportError> {
        if self.packed.len() > HEADER_LEN {
            // Sent from the buffer itself: no shared copy of it per datagram, except the few a
            // dialer keeps for resending its first control datagrams.
            for _ in 0..self.packed_copies.max(1) {
                self.send(&self.packed).await?;
            }
            if let Some(start) = self.start.as_ref().filter(|s| self.packed_copies > 1 && !s.heard()) {
                let mut sent = lock(&start.sent);
                if sent.len() < START_KEEP {
                    sent.push(Bytes::copy_from_slice(&self.packed));
                }
            }
        }
        self.packed.clear();
        self.packed_copies = 1;
        Ok(())
    }

    /// [`send`](Self::send), polled: `Pending` while the socket's buffer is full.
    fn poll_send(&self, cx: &mut Context<'_>, d: &[u8]) -> Poll<Result<(), TransportError>> {
        let to = if self.connected { None } else { Some(*lock(&self.peer)) };
        let sent = match to {
            None => std::task::ready!(self.sock.poll_send(cx, d)),
            Some(to) => {
                let own = self.own.as_ref().filter(|(_, a)| *a == to).and_then(|(s, _)| s.upgrade());
                match own {
                    // A hub's session socket reports the ICMP errors of its path (a peer whose
                    // port closed, or an address the session left); the listener's socket never
                    // did, and a session ends by its heartbeats or its goodbye: send through
                    // that one instead.
                    Some(own) => match std::task::ready!(own.poll_send(cx, d)) {
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                            std::task::ready!(self.sock.poll_send_to(cx, d, to))
                        }
                        r => r,
                    },
                    None => std::task::ready!(self.sock.poll_send_to(cx, d, to)),
                }
            }
        };
        Poll::Ready(match sent {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Err(TransportError::ConnectionError(format!(
                    "udp peer {} unreachable (port closed)",
                    *lock(&self.peer)
                )))
            }
            // Unreliable by declaration: a full path loses this datagram, not the link.
            Err(e) => {
                debug!(error = %e, "udp send failed; datagram lost");
                Ok(())
            }
        })
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

    /// One message that fits a datagram, with nothing packed before it and not a control
    /// message (those go out several times): encoded into the datagram buffer and sent with
    /// `poll_send`. A datagram the socket does not take at once stays packed, and
    /// `send_batch` of an empty batch sends it.
    fn try_send_now(&mut self, cx: &mut Context<'_>, msg: &Message) -> TrySend {
        if !self.packed.is_empty()
            || matches!(msg.kind, MessageType::Control(_))
            || HEADER_LEN + FRAME_HEADER_LEN + msg.payload.len() > self.max_packet
        {
            return TrySend::Declined;
        }
        self.frame.clear();
        if let Err(e) = self.codec.encode_into(msg, &mut self.frame) {
            return TrySend::Failed(e.into());
        }
        if HEADER_LEN + self.frame.len() > self.max_packet {
            // Fragments (a payload just under the packet size, whose envelope does not fit):
            // through `send_batch`, which encodes it again.
            return TrySend::Declined;
        }
        self.start_packed();
        self.packed.extend_from_slice(&self.frame);
        match self.poll_send(cx, &self.packed) {
            Poll::Ready(r) => {
                self.packed.clear();
                self.packed_copies = 1;
                match r {
                    Ok(()) => TrySend::Sent,
                    Err(e) => TrySend::Failed(e),
                }
            }
            Poll::Pending => TrySend::Started,
        }
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
        match self.codec.decode_from_bytes(&mut self.ready) {
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
            Source::Demux { from_net, queued, own: None } => match from_net.recv().await {
                Some(data) => {
                    queued.fetch_sub(data.len(), std::sync::atomic::Ordering::Relaxed);
                    data
                }
                None => return false,
            },
            // Both are cancel-safe; the session's own socket first, where its datagrams come.
            Source::Demux { from_net, queued, own: Some(reader) } => tokio::select! {
                biased;
                d = reader.next(&self.counters) => match d {
                    Some(data) => data,
                    None if reader.closed => return false,
                    None => {
                        // The socket's path failed (ICMP: the peer's port closed, or the session
                        // moved on): the session goes on through the listener, and ends by its
                        // heartbeats or its goodbye, as it did before it had a socket of its own.
                        debug!("a udp session's own socket failed; reading through the listener");
                        if let Source::Demux { own, .. } = &mut self.source {
                            *own = None;
                        }
                        return true;
                    }
                },
                d = from_net.recv() => match d {
                    Some(data) => {
                        queued.fetch_sub(data.len(), std::sync::atomic::Ordering::Relaxed);
                        data
                    }
                    None => return false,
                },
            },
            Source::Socket(reader) => match reader.next(&self.counters).await {
                Some(data) => data,
                None => return false,
            },
        };
        self.ready = data;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    fn foreign(count: usize) -> (Foreign, mpsc::Receiver<(Bytes, SocketAddr)>) {
        let (tx, rx) = mpsc::channel(count);
        (Foreign { tx, bytes: Arc::default() }, rx)
    }

    /// Bodies copied into the arena follow each other in one block until it is full (exactly
    /// full included); the next starts a block of its own, as does a body larger than a block;
    /// every body reads back as copied, also after the block's other bodies are dropped.
    #[test]
    fn arena_bodies_share_a_block_until_it_is_full() {
        let mut arena = BytesMut::new();
        let body = |i: usize, len: usize| -> Vec<u8> { (0..len).map(|j| (i * 7 + j) as u8).collect() };
        let first = arena_copy(&mut arena, &body(0, 100));
        let mut last = first.clone();
        let mut kept = vec![(0, first)];
        // Fill the block to exactly its size: each body right after the one before.
        let mut used = 100;
        let mut i = 1;
        while used < ARENA {
            let len = (ARENA - used).min(1000);
            let b = arena_copy(&mut arena, &body(i, len));
            assert_eq!(b.as_ptr(), last.as_ptr().wrapping_add(last.len()), "body {i} follows in the block");
            used += len;
            last = b.clone();
            kept.push((i, b));
            i += 1;
        }
        assert_eq!(used, ARENA);
        let next = arena_copy(&mut arena, &body(i, 10));
        assert_ne!(next.as_ptr(), last.as_ptr().wrapping_add(last.len()), "a full block is not written past");
        let large = arena_copy(&mut arena, &body(i + 1, ARENA + 1));
        assert_eq!(large.len(), ARENA + 1);
        assert_eq!(&large[..], &body(i + 1, ARENA + 1)[..]);
        // Only the first body kept: it still reads as copied.
        let (n, first) = kept.swap_remove(0);
        drop(kept);
        assert_eq!(&first[..], &body(n, 100)[..]);
        assert_eq!(&next[..], &body(i, 10)[..]);
    }

    /// The forward queue of datagrams for other sessions holds exactly `FOREIGN_BYTES`; past
    /// that, a datagram is dropped and counted, and room comes back as the listener takes them.
    #[tokio::test]
    async fn the_forward_queue_holds_its_byte_bound_and_drops_past_it() {
        let (f, mut rx) = foreign(LINK_QUEUE);
        let counters = UdpCounters::default();
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let d = vec![5u8; 64 * 1024];
        for _ in 0..FOREIGN_BYTES / d.len() {
            f.offer(&d, from, &counters);
        }
        assert_eq!(f.bytes.load(Relaxed), FOREIGN_BYTES, "exactly the bound is queued");
        assert_eq!(counters.reader_behind.load(Relaxed), 0);
        f.offer(&[1], from, &counters);
        assert_eq!(counters.reader_behind.load(Relaxed), 1, "one byte past the bound is dropped");
        assert_eq!(f.bytes.load(Relaxed), FOREIGN_BYTES);
        let (first, at) = rx.recv().await.unwrap();
        assert_eq!((first.len(), at), (d.len(), from));
        f.taken(&first);
        f.offer(&[1], from, &counters);
        assert_eq!(counters.reader_behind.load(Relaxed), 1, "room came back");
        assert_eq!(f.bytes.load(Relaxed), FOREIGN_BYTES - d.len() + 1);
    }

    /// The queue is bounded in count too: a full channel drops and counts, charging nothing.
    #[tokio::test]
    async fn the_forward_queue_holds_its_count_bound() {
        let (f, _rx) = foreign(4);
        let counters = UdpCounters::default();
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for _ in 0..4 {
            f.offer(b"x", from, &counters);
        }
        assert_eq!((f.bytes.load(Relaxed), counters.reader_behind.load(Relaxed)), (4, 0));
        f.offer(b"x", from, &counters);
        assert_eq!((f.bytes.load(Relaxed), counters.reader_behind.load(Relaxed)), (4, 1));
    }

    /// `released` returns once the sockets are gone, and gives up after `RELEASE_WAIT` on a
    /// socket still held.
    #[tokio::test]
    async fn close_waits_for_sockets_at_most_the_release_wait() {
        let sock = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let sockets: Sockets = Arc::default();
        lock(&sockets).push(Arc::downgrade(&sock));
        let start = tokio::time::Instant::now();
        released(sockets.clone()).await;
        // Gave up on a socket still held, and not before the wait was over.
        assert!(start.elapsed() >= RELEASE_WAIT);
        assert_eq!(Arc::strong_count(&sock), 1, "the socket is still held");
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let holder = {
            let dropped = dropped.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                // Noted first, so the flag is set whenever the socket can be gone.
                dropped.store(true, Relaxed);
                drop(sock);
            })
        };
        released(sockets.clone()).await;
        // Returned because the socket went, not because the wait ran out.
        assert!(dropped.load(Relaxed), "returned while the socket was still held");
        assert!(lock(&sockets).is_empty(), "the closed socket is no longer listed");
        holder.await.unwrap();
    }
}

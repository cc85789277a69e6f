//! [`Node`]: the engine that runs the protocol over any backend's links.
//!
//! One node is one agent's end of the transport. Backends create it, then hand it links:
//! [`Node::connect_link`] for a link this node dialed (client role: it sends `Hello`) and
//! [`Node::accept_link`] for a link it accepted (server role: it answers `Hello`). Everything
//! after that is the same for every backend:
//!
//! * per link, a **reader** task decodes nothing (the link already yields messages) but
//!   dispatches: heartbeats, subscriptions, responses to pending requests, relaying, and local
//!   delivery; and a **writer** task drains the peer's priority-ordered bounded outbound queue
//!   in batches and drives the heartbeat timer;
//! * a node that listens is a **hub**: it relays messages addressed to another connected agent
//!   (decrementing the TTL and dropping at zero), fans broadcasts out, and forwards events to
//!   the peers whose subscriptions match — advertising to each peer the union of its own and
//!   the other peers' patterns, so only wanted events cross a link;
//! * one timer task per node expires pending requests (sans-IO `RequestTracker`).
//!
//! Backpressure: a full outbound queue makes the sender wait or fail
//! ([`Backpressure`](crate::Backpressure)); a full inbox or subscription makes the link's reader
//! wait (the peer's sender then feels it), and while it waits the heartbeat timer does not count
//! the silence against the peer.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hivewire_codec::{Compression, ENVELOPE_ALLOWANCE};
use hivewire_protocol::handshake::{
    AllowAll, ClientHandshake, HandshakeConfig, Negotiated, PeerInfo, ServerHandshake, ServerOutcome,
};
use hivewire_protocol::heartbeat::{HeartbeatAction, HeartbeatConfig, HeartbeatTracker};
use hivewire_protocol::requests::{RequestError, RequestTracker};
use hivewire_protocol::topic::{validate_topic, TopicPattern};
use hivewire_protocol::{
    capabilities, encode_payload, error_codes, AgentId, ControlOperation, Message, MessageId, MessageType,
    RejectReason, ResponseStatus,
};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::budget::{ByteBudget, CHARGED_PAYLOAD_MIN};
use crate::inbox::{Inbox, Take};
use crate::link::{DynTx, Link, LinkRx, LinkSettings, LinkTx, TrySend};
use crate::queue::{BoundedQueue, PushError};
use crate::stats::{Counters, PeerStats, TransportStats};
use crate::{Backpressure, TransportConfig, TransportError};

/// Messages the writer sends in one batch at most.
const WRITE_BATCH: usize = 128;
/// Control messages (heartbeats, subscriptions, goodbye) may exceed a full outbound queue by
/// this many, so that liveness and interest are never stuck behind data.
const CONTROL_SLACK: usize = 1024;
/// Distinct patterns one peer may subscribe to; one more closes its link (bounded memory).
pub const MAX_PEER_SUBSCRIPTIONS: usize = 4096;
/// Metadata key a hub sets in its `Hello`/`HelloAck`: a hub's messages may carry other sources.
const ROLE_KEY: &str = "hw.role";
const ROLE_HUB: &str = "hub";
/// Pause after a failed accept before trying again, so that a persistent error (out of file
/// descriptors) does not spin a core.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(20);
/// How long `close` waits for each writer to flush its queue and the `Goodbye`.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);

type Pending = oneshot::Sender<Result<Message, TransportError>>;

/// A source of incoming connections for [`Node::spawn_accept_loop`] (a bound listener).
pub trait Acceptor: Send + 'static {
    /// One accepted connection, with whatever the backend needs to make a link of it.
    type Conn: Send + 'static;
    /// The next connection; `Ok(None)` when the source is finished.
    fn accept(&mut self) -> impl Future<Output = std::io::Result<Option<Self::Conn>>> + Send;
}

/// Something that happened to a peer, from [`Node::peer_events`].
#[derive(Debug, Clone)]
pub enum PeerEvent {
    /// A peer completed the handshake.
    Up {
        /// Its agent id.
        agent: AgentId,
        /// What the backend knows of it.
        info: PeerInfo,
    },
    /// A peer left: goodbye, link closed or broken, or silent past the heartbeat timeout.
    Down {
        /// Its agent id.
        agent: AgentId,
        /// Why.
        reason: String,
    },
    /// This node refused a peer's handshake.
    Rejected {
        /// The agent id the peer claimed.
        agent: AgentId,
        /// Why.
        reason: RejectReason,
    },
}

struct LocalSub {
    id: u64,
    pattern: TopicPattern,
    tx: mpsc::Sender<Message>,
    /// Large payloads waiting in this subscription (`inbound_queue_bytes`).
    budget: Arc<ByteBudget>,
}

struct Peer {
    id: AgentId,
    info: PeerInfo,
    negotiated: Negotiated,
    /// This node dialed the peer (a hub upstream of us).
    upstream: bool,
    /// The peer is a hub: its messages may carry other agents' sources.
    relays: bool,
    outbound: BoundedQueue<Message>,
    /// Payload bytes of the large messages in `outbound` (`outbound_queue_bytes`): charged
    /// before a message is queued, given back when the writer takes it.
    outbound_bytes: ByteBudget,
    hb: Mutex<HeartbeatTracker>,
    /// Patterns the peer asked for.
    wants: Mutex<Vec<TopicPattern>>,
    /// Patterns we advertised to the peer.
    advertised: Mutex<BTreeSet<String>>,
    barriers: Mutex<HashMap<MessageId, oneshot::Sender<()>>>,
    /// Generation and cancel token of the live link (a redialed peer gets a new one per link).
    conn: Mutex<(u64, CancellationToken)>,
    /// The generation in `conn` while its token is not cancelled, else 0: what a direct write
    /// checks (the token's own check takes two locks), set and cleared under `conn`'s lock.
    live_gen: AtomicU64,
    /// A link is up.
    connected: AtomicBool,
    /// For a peer this node dialed with a dialer: wakes the redial task when the link drops.
    redial: Option<Arc<Notify>>,
    /// The peer is gone for good (removed from the node).
    down: AtomicBool,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// The live link's sending half, with its generation: the writer task holds the lock while
    /// it writes; a sender that finds the queue empty and the lock free writes directly (one
    /// task hand-off and wake-up less per message on an idle link).
    /// Shared with a direct write that waits for the medium in a task of its own.
    tx: Arc<tokio::sync::Mutex<TxSlot>>,
    /// When this link last wrote (ns since the node started): a sender writes directly only
    /// to a link that has been quiet for `direct_idle_ns` (the link's
    /// [`LinkTx::direct_write_idle`]), so a stream of messages is still batched by the writer.
    last_write_ns: AtomicU64,
    direct_idle_ns: AtomicU64,
    /// The peer's turn is over: it has sent us something since our last write began (set by
    /// the reader per message, cleared as a write starts). A sender then writes directly once
    /// the link has been quiet for [`TURN_MIN_QUIET_NS`], not the whole `direct_idle_ns`: in a
    /// request/response exchange the peer is waiting for us, and a round trip shorter than
    /// the link's idle time would otherwise always pay the writer task's wake-up.
    turn: AtomicBool,
    sent: AtomicU64,
    received: AtomicU64,
    /// Set by the reader for every message, consumed by the heartbeat timer: liveness without
    /// a lock and a clock read per message.
    heard: AtomicBool,
}

impl Peer {
    fn wants(&self, topic: &str) -> bool {
        lock(&self.wants).iter().any(|p| p.matches(topic))
    }

    /// Cancels the link in `conn` (the caller holds its lock): direct writes stop taking it
    /// first, then its tasks are told.
    fn cancel_link(&self, conn: &mut (u64, CancellationToken)) {
        self.live_gen.store(0, Ordering::Release);
        conn.1.cancel();
    }

    /// Closes the outbound queue and its byte budget: senders waiting for either give up.
    fn close_outbound(&self) {
        self.outbound.close();
        self.outbound_bytes.close();
    }
}

/// A peer's live sending half with its link's generation, or none between links.
type TxSlot = Option<(u64, Box<dyn DynTx>)>;

/// Waits for `f` with the link `from` marked stalled in its heartbeat tracker: its reader is
/// holding back on purpose (a full queue downstream), so the peer's silence meanwhile is not
/// taken for death. The mark is cleared when `f` ends; a reader dropped midway belongs to a lost
/// link, whose tracker the next link replaces (clearing the mark then could clear the next
/// link's own).
async fn stalled<F: Future>(from: &Peer, f: F) -> F::Output {
    lock(&from.hb).set_stalled(true, Instant::now());
    let r = f.await;
    lock(&from.hb).set_stalled(false, Instant::now());
    r
}

/// Runs `f` once with the polling task's context.
async fn with_context<R>(f: impl FnOnce(&mut Context<'_>) -> R) -> R {
    let mut f = Some(f);
    // Ready at the first poll, so never polled again.
    std::future::poll_fn(move |cx| match f.take() {
        Some(f) => Poll::Ready(f(cx)),
        None => Poll::Pending,
    })
    .await
}

/// A direct write that had to wait for the medium: the sending half is in `write`, and `slot`
/// (the link's lock) waits for it to come back.
struct DirectWrite {
    write: crate::link::OwnedSend,
    slot: tokio::sync::OwnedMutexGuard<TxSlot>,
    gen: u64,
    bytes: u64,
    inner: Arc<Inner>,
    peer: Arc<Peer>,
}

impl DirectWrite {
    fn finish(mut self, tx: Box<dyn DynTx>, sent: Result<(), TransportError>) {
        *self.slot = Some((self.gen, tx));
        self.inner.direct_write_done(&self.peer, self.gen, self.slot, self.bytes, sent, None);
    }

    /// Waits for the medium to take the message, or gives the write up when its link is lost
    /// meanwhile (`None`): a peer that stays connected but never reads would otherwise keep the
    /// link's lock for good, and the link's writer task (and the next link's) waits for it.
    async fn wait(&mut self) -> Option<(Box<dyn DynTx>, Result<(), TransportError>)> {
        let cancel = {
            let conn = lock(&self.peer.conn);
            (conn.0 == self.gen).then(|| conn.1.clone())
        }?;
        tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            done = &mut self.write => Some(done),
        }
    }

    /// Completes the write in the background (see [`DirectWrite::wait`]).
    async fn complete(mut self) {
        if let Some((tx, sent)) = self.wait().await {
            self.finish(tx, sent);
        }
    }
}

/// What [`Inner::write_direct`] did.
enum Direct {
    /// The message went out (or its link was lost trying).
    Done,
    /// The medium has it but has to be waited for.
    Wait(HandOff),
    /// No direct write now (the link is busy or not live): the message stays with the caller,
    /// for the queue.
    Busy,
}

/// What [`Inner::send_now`] did.
enum SendNow {
    /// Written or queued (or refused: the error).
    Done(Result<(), TransportError>),
    /// A direct write the medium has to be waited for.
    Wait(HandOff),
    /// Nothing yet: the message has to wait for the link or for room.
    Later,
}

/// Holds a [`DirectWrite`] while its sender waits for it; if the sender is dropped first (a
/// send under a timeout), the write is handed to a task instead of being cut short midway.
struct HandOff(Option<DirectWrite>);

impl Drop for HandOff {
    fn drop(&mut self) {
        if let Some(w) = self.0.take() {
            // Outside a runtime (a runtime being torn down), the link goes with it.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(w.complete());
            }
        }
    }
}

/// A backend's own counters, read by `Node::stats`.
type BackendStats = Arc<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;

/// An asynchronous hook run at the end of `Node::close`.
type CloseHook = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

struct Inner {
    id: AgentId,
    backend: &'static str,
    config: TransportConfig,
    hub: AtomicBool,
    closed: AtomicBool,
    /// Looked up for every message sent: hashed with foldhash (seeded per map, so peer-chosen
    /// ids cannot be crafted to collide ahead of time), several times cheaper than SipHash
    /// for short ids.
    peers: Mutex<HashMap<AgentId, Arc<Peer>, foldhash::fast::RandomState>>,
    /// Messages for `receive`; the sender is each message's `source`.
    inbox: Inbox,
    requests: Mutex<RequestTracker<Pending>>,
    request_wake: Arc<Notify>,
    /// The deadline the request timer sleeps until, in ns since `started` (`u64::MAX`: none);
    /// written and read under the `requests` lock.
    timer_deadline_ns: AtomicU64,
    /// Wall-clock ms at `started` (see [`Inner::now`]), and when (ms since `started`) it was
    /// last read.
    wall_offset_ms: AtomicU64,
    wall_synced_ms: AtomicU64,
    subs: Mutex<Vec<LocalSub>>,
    next_sub: AtomicU64,
    /// Held while the interest advertised to peers is computed and sent, so that a full
    /// recomputation ([`Inner::refresh_interest`]) and the incremental update of a peer's
    /// `Subscribe` never interleave: a recomputation working from a snapshot taken before a
    /// concurrent subscribe would otherwise withdraw the pattern that subscribe just added.
    interest: Mutex<()>,
    events: broadcast::Sender<PeerEvent>,
    counters: Counters,
    started: Instant,
    shutdown: CancellationToken,
    on_close: Mutex<Vec<Box<dyn FnOnce() + Send>>>,
    on_closed: Mutex<Vec<CloseHook>>,
    backend_stats: Mutex<Option<BackendStats>>,
    listen_url: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is short and leaves its data consistent; a panic elsewhere
    // must not cascade into every later caller.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One agent's end of the transport: send, receive, broadcast, request, subscribe.
///
/// Cheap to clone (all clones are the same node). Created by a backend (`InProcessTransport`,
/// `hivewire::connect`, …), never directly by applications.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("agent_id", &self.inner.id)
            .field("backend", &self.inner.backend)
            .field("hub", &self.inner.hub.load(Ordering::Relaxed))
            .finish()
    }
}

impl Node {
    /// Creates a node for agent `agent_id` on backend `backend` (a name for logs and stats).
    /// Must be called inside a tokio runtime: it spawns the request timer.
    pub fn new(agent_id: impl Into<AgentId>, config: TransportConfig, backend: &'static str) -> Self {
        let (events, _) = broadcast::channel(1024);
        let inner = Arc::new(Inner {
            id: agent_id.into(),
            backend,
            inbox: Inbox::new(config.inbound_queue_capacity, config.inbound_queue_bytes),
            requests: Mutex::new(RequestTracker::new(config.max_pending_requests)),
            config,
            hub: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            peers: Mutex::new(HashMap::default()),
            request_wake: Arc::new(Notify::new()),
            timer_deadline_ns: AtomicU64::new(u64::MAX),
            wall_offset_ms: AtomicU64::new(now_ms()),
            wall_synced_ms: AtomicU64::new(0),
            subs: Mutex::new(Vec::new()),
            next_sub: AtomicU64::new(1),
            interest: Mutex::new(()),
            events,
            counters: Counters::default(),
            started: Instant::now(),
            shutdown: CancellationToken::new(),
            on_close: Mutex::new(Vec::new()),
            on_closed: Mutex::new(Vec::new()),
            backend_stats: Mutex::new(None),
            listen_url: Mutex::new(None),
        });
        tokio::spawn(request_timer(
            Arc::downgrade(&inner),
            inner.request_wake.clone(),
            inner.shutdown.clone(),
        ));
        Node { inner }
    }

    /// This node's agent id.
    pub fn agent_id(&self) -> &AgentId {
        &self.inner.id
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        self.inner.backend
    }

    /// The configuration.
    pub fn config(&self) -> &TransportConfig {
        &self.inner.config
    }

    /// Marks this node as a hub (a listening node): it relays between its peers.
    pub fn set_hub(&self, hub: bool) {
        self.inner.hub.store(hub, Ordering::Relaxed);
    }

    /// Records the URL this node listens on (backends set it once bound, e.g. with the port
    /// the system chose for `tcp://127.0.0.1:0`).
    pub fn set_listen_url(&self, url: impl Into<String>) {
        *lock(&self.inner.listen_url) = Some(url.into());
    }

    /// The URL this node listens on, if it is a listening node.
    pub fn listen_url(&self) -> Option<String> {
        lock(&self.inner.listen_url).clone()
    }

    /// True when this node relays between its peers.
    pub fn is_hub(&self) -> bool {
        self.inner.hub.load(Ordering::Relaxed)
    }

    /// True once [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Cancelled when the node closes: backends stop their accept loops on it.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Runs `f` when the node closes (e.g. a backend removing its listener's name).
    pub fn on_close(&self, f: impl FnOnce() + Send + 'static) {
        if self.is_closed() {
            f();
        } else {
            lock(&self.inner.on_close).push(Box::new(f));
        }
    }

    /// Runs `f` and awaits its future at the end of [`close`](Self::close), after every link
    /// was flushed and closed (e.g. a backend waiting for its endpoint to go idle, so that its
    /// address is free when `close` returns). If the node is already closed, it runs in a task.
    pub fn on_closed<F, Fut>(&self, f: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let hook: CloseHook = Box::new(move || Box::pin(f()));
        if self.is_closed() {
            tokio::spawn(hook());
        } else {
            lock(&self.inner.on_closed).push(hook);
        }
    }

    /// Agent ids of the connected peers.
    pub fn peers(&self) -> Vec<AgentId> {
        lock(&self.inner.peers).keys().cloned().collect()
    }

    /// What the handshake with `peer` negotiated, while it is connected.
    pub fn negotiated(&self, peer: &str) -> Option<Negotiated> {
        lock(&self.inner.peers).get(peer).map(|p| p.negotiated.clone())
    }

    /// What the backend reported about `peer`, while it is connected.
    pub fn peer_info(&self, peer: &str) -> Option<PeerInfo> {
        lock(&self.inner.peers).get(peer).map(|p| p.info.clone())
    }

    /// Notifications of peers joining, leaving, or being refused. The channel is bounded: a
    /// receiver that falls more than 1024 events behind skips the oldest.
    pub fn peer_events(&self) -> broadcast::Receiver<PeerEvent> {
        self.inner.events.subscribe()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> TransportStats {
        let peers = lock(&self.inner.peers)
            .values()
            .map(|p| PeerStats {
                agent: p.id.clone(),
                rtt: lock(&p.hb).rtt(),
                messages_sent: p.sent.load(Ordering::Relaxed),
                messages_received: p.received.load(Ordering::Relaxed),
                queued: p.outbound.len(),
                queued_bytes: p.outbound_bytes.charged(),
            })
            .collect();
        let mut stats = self.inner.counters.snapshot(self.inner.started.elapsed(), peers);
        let backend = lock(&self.inner.backend_stats).clone();
        if let Some(read) = backend {
            stats.backend = read();
        }
        stats
    }

    /// Lets a backend report its own counters in [`stats`](Self::stats) (`TransportStats::backend`).
    pub fn set_backend_stats(&self, read: impl Fn() -> Vec<(&'static str, u64)> + Send + Sync + 'static) {
        *lock(&self.inner.backend_stats) = Some(Arc::new(read));
    }

    // ----- sending -------------------------------------------------------------------------

    /// Sends `msg` to agent `to` (a direct peer, or any agent behind the hub this node dialed).
    /// The engine stamps the source and timestamp.
    ///
    /// Cancelling a send (a timeout around it) never corrupts the link. A send cancelled while
    /// it waited for room in the peer's queue was not queued and its message does not go out;
    /// one cancelled while the medium was taking its message lets that write finish in the
    /// background, so its message may still arrive. A send whose link is lost while the medium
    /// is still taking its message (a peer connected but no longer reading) ends with
    /// [`TransportError::ConnectionError`] (or [`TransportError::Closed`] when this node closed).
    pub async fn send(&self, to: impl AsRef<str>, mut msg: Message) -> Result<(), TransportError> {
        let to = to.as_ref();
        let now_ns = self.prepare(&mut msg)?;
        let (peer, direct) =
            self.inner.route_direct(to).ok_or_else(|| TransportError::UnknownAgent(AgentId::new(to)))?;
        // Reuse the peer's id (no allocation) when it is the destination itself.
        msg.destination = Some(if direct { peer.id.clone() } else { AgentId::new(to) });
        // A busy link (a stream under load) queues the message right here: through
        // `Inner::send`'s future it would be moved (~200 bytes) three times more.
        if self.inner.direct_write_due(&peer, Some(now_ns)).is_none() {
            match self.inner.try_queue(&peer, msg) {
                Ok(done) => return done,
                Err(m) => msg = m,
            }
        }
        self.inner.send(&peer, msg, now_ns).await
    }

    /// Sends a broadcast (a message of type `Broadcast`) to every connected peer; a hub relays
    /// it to all of its other peers, so every agent of a star receives it exactly once.
    pub async fn broadcast(&self, mut msg: Message) -> Result<(), TransportError> {
        if !matches!(msg.kind, MessageType::Broadcast { .. }) {
            return Err(TransportError::InvalidMessage(format!(
                "broadcast needs a Broadcast message, got {}",
                msg.kind.name()
            )));
        }
        self.prepare(&mut msg)?;
        msg.destination = None;
        for peer in self.peer_list() {
            self.enqueue(&peer, msg.clone(), None).await?;
        }
        Ok(())
    }

    /// Publishes an event on `topic`: it crosses only to peers that subscribed to a matching
    /// pattern (a hub subscribes on behalf of its other peers).
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        payload: &T,
    ) -> Result<(), TransportError> {
        let msg = Message::event(self.inner.id.clone(), topic, payload)?;
        self.publish_message(msg).await
    }

    /// Publishes a prepared `Event` message (headers, priority, raw payload).
    pub async fn publish_message(&self, mut msg: Message) -> Result<(), TransportError> {
        let topic = match &msg.kind {
            MessageType::Event { topic } => topic.clone(),
            other => {
                return Err(TransportError::InvalidMessage(format!(
                    "publish needs an Event message, got {}",
                    other.name()
                )))
            }
        };
        validate_topic(&topic)?;
        self.prepare(&mut msg)?;
        msg.destination = None;
        for peer in self.peer_list() {
            if peer.wants(&topic) {
                self.enqueue(&peer, msg.clone(), None).await?;
            }
        }
        Ok(())
    }

    /// Calls `method` on agent `to` and waits for its response, at most `timeout`.
    ///
    /// An error response arrives as [`TransportError::RequestFailed`].
    pub fn request<T: Serialize + ?Sized>(
        &self,
        to: impl Into<AgentId>,
        method: &str,
        payload: &T,
        timeout: Duration,
    ) -> impl Future<Output = Result<Message, TransportError>> + Send + '_ {
        let to = to.into();
        let msg = Message::request(self.inner.id.clone(), method, payload);
        async move { self.request_message(to, msg?, timeout).await }
    }

    /// Sends a prepared `Request` message and waits for its response, at most `timeout`.
    pub async fn request_message(
        &self,
        to: impl Into<AgentId>,
        mut msg: Message,
        timeout: Duration,
    ) -> Result<Message, TransportError> {
        let to = to.into();
        if !msg.is_request() {
            return Err(TransportError::InvalidMessage(format!(
                "request needs a Request message, got {}",
                msg.kind.name()
            )));
        }
        let now_ns = self.prepare(&mut msg)?;
        msg.destination = Some(to.clone());
        let peer = self.route(&to)?;
        let (tx, rx) = oneshot::channel();
        let id = msg.id;
        // From `prepare`'s reading of the clock: one reading per message, not three.
        let deadline_ns = now_ns.saturating_add(timeout.as_nanos().min(u64::MAX as u128) as u64);
        let deadline = self.inner.started + Duration::from_nanos(deadline_ns);
        {
            let mut requests = lock(&self.inner.requests);
            requests.insert(id, to, deadline, tx).map_err(|e| match e {
                RequestError::TooManyPending { max } => TransportError::TooManyPendingRequests { max },
                RequestError::DuplicateId(id) => {
                    TransportError::InvalidMessage(format!("request id {id} is already pending"))
                }
            })?;
            // Wake the timer only when this deadline comes before the one it sleeps until
            // (with one timeout for all requests, almost never: a wake-up per request saved).
            // Read under the lock the timer sets it under, so no earlier deadline is missed.
            if deadline_ns < self.inner.timer_deadline_ns.load(Ordering::Relaxed) {
                self.inner.request_wake.notify_one();
            }
        }
        if let Err(e) = self.inner.send(&peer, msg, now_ns).await {
            lock(&self.inner.requests).cancel(id);
            return Err(e);
        }
        match rx.await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Closed),
        }
    }

    /// Answers `request` with `payload`.
    pub async fn respond<T: Serialize + ?Sized>(
        &self,
        request: &Message,
        payload: &T,
    ) -> Result<(), TransportError> {
        let bytes = encode_payload(payload)?;
        self.respond_bytes(request, bytes).await
    }

    /// Answers `request` with raw payload bytes.
    pub async fn respond_bytes(&self, request: &Message, payload: Bytes) -> Result<(), TransportError> {
        let resp = Message::response_bytes(self.inner.id.clone(), request, payload);
        self.send(&request.source, resp).await
    }

    /// Answers `request` with an error status.
    pub async fn respond_error(
        &self,
        request: &Message,
        code: u32,
        message: &str,
    ) -> Result<(), TransportError> {
        let resp = Message::error_response(self.inner.id.clone(), request, code, message);
        self.send(&request.source, resp).await
    }

    // ----- receiving -----------------------------------------------------------------------

    /// The next message addressed to this node: requests, directed messages, broadcasts, and
    /// events no subscription took. `Err(Closed)` once the node is closed and drained.
    pub async fn receive(&self) -> Result<(AgentId, Message), TransportError> {
        // A message already waiting is taken without the inbox's waiting future (each async
        // layer moves the ~200-byte message once more).
        match self.inner.inbox.try_take() {
            Take::Message(msg) => Ok((msg.source.clone(), msg)),
            Take::Closed => Err(TransportError::Closed),
            Take::Empty => match self.inner.inbox.take_after_empty().await {
                Some(msg) => Ok((msg.source.clone(), msg)),
                None => Err(TransportError::Closed),
            },
        }
    }

    /// A message if one is waiting, without blocking.
    pub fn try_receive(&self) -> Option<(AgentId, Message)> {
        match self.inner.inbox.try_take() {
            Take::Message(msg) => Some((msg.source.clone(), msg)),
            Take::Closed | Take::Empty => None,
        }
    }

    /// Subscribes to events whose topic matches `pattern` (`*` one segment, trailing `**` one or
    /// more). The subscription is advertised to every peer before this returns, or within the
    /// connection timeout: a peer whose link is that slow (or mute) still gets it, in order,
    /// when its link catches up, and the wait is logged at `warn`. Dropping the
    /// [`Subscription`] unsubscribes.
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription, TransportError> {
        if self.is_closed() {
            return Err(TransportError::Closed);
        }
        let pattern = TopicPattern::parse(pattern)?;
        let (tx, rx) = mpsc::channel(self.inner.config.subscription_capacity.max(1));
        let id = self.inner.next_sub.fetch_add(1, Ordering::Relaxed);
        let budget = Arc::new(ByteBudget::new(self.inner.config.inbound_queue_bytes));
        lock(&self.inner.subs).push(LocalSub { id, pattern: pattern.clone(), tx, budget: budget.clone() });
        self.inner.refresh_interest();
        // Make sure the direct peers processed the subscription before returning.
        let within = self.inner.config.connection_timeout();
        if self.barrier(within).await.is_err() {
            warn!(?pattern, ?within, "a peer has not confirmed the subscription yet; events published before it does may be missed");
        }
        Ok(Subscription { id, pattern, rx, budget, node: Arc::downgrade(&self.inner) })
    }

    /// Waits until every connected peer has processed everything this node queued to it before
    /// the call (a heartbeat round trip behind the queued messages), at most `timeout`.
    pub async fn barrier(&self, timeout: Duration) -> Result<(), TransportError> {
        let mut waits = Vec::new();
        let mut probes = Vec::new();
        for peer in self.peer_list() {
            let probe = Message::heartbeat(self.inner.id.clone());
            let (tx, rx) = oneshot::channel();
            lock(&peer.barriers).insert(probe.id, tx);
            let id = probe.id;
            // Same priority as other control messages: FIFO behind them.
            if peer.outbound.push_with_slack(u8::MAX, probe, CONTROL_SLACK).is_ok() {
                waits.push(rx);
                probes.push((peer, id));
            } else {
                lock(&peer.barriers).remove(&id);
            }
        }
        let all = futures::future::join_all(waits);
        let r = tokio::time::timeout(timeout, all).await;
        // Forget unanswered probes so that repeated barriers on a mute peer stay bounded.
        for (peer, id) in probes {
            lock(&peer.barriers).remove(&id);
        }
        r.map(|_| ()).map_err(|_| TransportError::Timeout)
    }

    /// Closes the node: every peer gets a `Goodbye` after what is already queued to it, links
    /// close, pending requests fail with `Closed`, `receive` drains and then fails with `Closed`.
    pub async fn close(&self) {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        info!(agent = %inner.id, backend = inner.backend, "closing node");
        inner.shutdown.cancel();
        let hooks: Vec<_> = std::mem::take(&mut *lock(&inner.on_close));
        for hook in hooks {
            hook();
        }
        let peers: Vec<Arc<Peer>> = lock(&inner.peers).drain().map(|(_, p)| p).collect();
        for p in &peers {
            inner.say_goodbye(p);
        }
        for p in &peers {
            inner.flush_and_down(p).await;
        }
        inner.inbox.close();
        let pending =
            lock(&inner.requests).poll_timeouts(Instant::now() + Duration::from_secs(100 * 365 * 86_400));
        for (_, tx) in pending {
            let _ = tx.send(Err(TransportError::Closed));
        }
        lock(&inner.subs).clear();
        let hooks: Vec<_> = std::mem::take(&mut *lock(&inner.on_closed));
        for hook in hooks {
            hook().await;
        }
    }

    // ----- links ---------------------------------------------------------------------------

    /// Runs the client side of the handshake over a link this node dialed; on success the link
    /// joins the node and the peer's agent id is returned. The link is not redialed if it drops
    /// (see [`connect_with_redial`](Self::connect_with_redial)).
    pub async fn connect_link<T: LinkTx, R: LinkRx>(
        &self,
        link: Link<T, R>,
    ) -> Result<AgentId, TransportError> {
        let peer = self.inner.handshake_and_register(link, false).await?;
        Ok(peer.id.clone())
    }

    /// Dials with `dial`, runs the client handshake, and keeps the peer: when its link drops,
    /// the node redials with exponential backoff and jitter (`retry_attempts`,
    /// `reconnect_base_delay_ms`, `reconnect_max_delay_ms`), handshakes again and restores its
    /// subscriptions. Meanwhile messages sent to the peer wait in its bounded outbound queue
    /// and go out, in order, after the reconnect; when the retries are exhausted the peer is
    /// dropped and waiting callers get typed errors. The first dial is not retried.
    pub async fn connect_with_redial<T, R, F, Fut>(&self, dial: F) -> Result<AgentId, TransportError>
    where
        T: LinkTx,
        R: LinkRx,
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Link<T, R>, TransportError>> + Send + 'static,
    {
        let link = dial().await?;
        let peer = self.inner.handshake_and_register(link, true).await?;
        let id = peer.id.clone();
        let span = info_span!("redial", backend = self.inner.backend, local = %self.inner.id, peer = %id);
        tokio::spawn(
            redial_task(Arc::downgrade(&self.inner), peer, dial, self.inner.shutdown.clone())
                .instrument(span),
        );
        Ok(id)
    }

    /// Creates a node for `agent_id` and connects it through `dial` (see
    /// [`connect_with_redial`](Self::connect_with_redial)); the node is closed again if the
    /// first connection fails. Every dialing backend's `connect` is this call.
    pub async fn dial<T, R, F, Fut>(
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
        backend: &'static str,
        dial: F,
    ) -> Result<Node, TransportError>
    where
        T: LinkTx,
        R: LinkRx,
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Link<T, R>, TransportError>> + Send + 'static,
    {
        let node = Node::new(agent_id, config, backend);
        match node.connect_with_redial(dial).await {
            Ok(_) => Ok(node),
            Err(e) => {
                node.close().await;
                Err(e)
            }
        }
    }

    /// Runs `acceptor` until the node closes, handing every new connection to `on_accept`
    /// (which usually wraps it in a link for [`accept_link`](Self::accept_link)). A failed
    /// accept (e.g. out of file descriptors) is logged and retried after a pause.
    pub fn spawn_accept_loop<A: Acceptor>(
        &self,
        mut acceptor: A,
        on_accept: impl Fn(&Node, A::Conn) + Send + 'static,
    ) {
        let node = self.clone();
        let shutdown = self.shutdown_token();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = acceptor.accept() => r,
                };
                match accepted {
                    Ok(Some(conn)) => on_accept(&node, conn),
                    Ok(None) => break,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                }
            }
            debug!(agent = %node.agent_id(), "accept loop ended");
        });
    }

    /// Runs the server side of the handshake over an accepted link, in a task of its own; the
    /// outcome shows in [`peer_events`](Self::peer_events) and the logs.
    pub fn accept_link<T: LinkTx, R: LinkRx>(&self, link: Link<T, R>) {
        let inner = self.inner.clone();
        let span = info_span!("accept", backend = inner.backend, remote = ?link.peer.remote_addr);
        tokio::spawn(async move { inner.serve_handshake(link).await }.instrument(span));
    }

    // ----- internals -----------------------------------------------------------------------

    /// Checks and stamps an outgoing message; returns the time (ns since the node started)
    /// for the direct-write test, so a send reads the clock once.
    fn prepare(&self, msg: &mut Message) -> Result<u64, TransportError> {
        if self.is_closed() {
            return Err(TransportError::Closed);
        }
        check_size(msg, self.inner.config.max_message_size)?;
        msg.source = self.inner.id.clone();
        let (now_ns, wall_ms) = self.inner.now();
        if msg.timestamp_ms == 0 {
            msg.timestamp_ms = wall_ms;
        }
        Ok(now_ns)
    }

    fn peer_list(&self) -> Vec<Arc<Peer>> {
        lock(&self.inner.peers).values().cloned().collect()
    }

    fn route(&self, to: &AgentId) -> Result<Arc<Peer>, TransportError> {
        self.inner.route(to.as_str()).ok_or_else(|| TransportError::UnknownAgent(to.clone()))
    }

    /// `now_ns`: the clock as `prepare` read it for this message, if it did.
    async fn enqueue(
        &self,
        peer: &Arc<Peer>,
        msg: Message,
        now_ns: Option<u64>,
    ) -> Result<(), TransportError> {
        match self.inner.try_enqueue(peer, msg, now_ns) {
            Ok(done) => done,
            // Not boxed: `Inner::enqueue` boxes its own larger paths.
            Err(msg) => self.inner.enqueue(peer, msg, now_ns).await,
        }
    }
}

fn check_size(msg: &Message, max: usize) -> Result<(), TransportError> {
    let size = msg.payload.len();
    if size > max {
        return Err(TransportError::MessageTooLarge { size, max });
    }
    let envelope = msg.envelope_len_estimate();
    if envelope > ENVELOPE_ALLOWANCE {
        return Err(TransportError::MessageTooLarge { size: envelope, max: ENVELOPE_ALLOWANCE });
    }
    Ok(())
}

impl Inner {
    fn handshake_config(&self) -> HandshakeConfig {
        let mut caps = vec![capabilities::PUBSUB.to_string()];
        if self.config.enable_compression {
            for c in &self.config.compression_codecs {
                let name = match c {
                    Compression::Zstd => capabilities::COMPRESSION_ZSTD,
                    Compression::Gzip => capabilities::COMPRESSION_GZIP,
                    Compression::None => continue,
                };
                if !caps.iter().any(|x| x == name) {
                    caps.push(name.to_string());
                }
            }
        }
        let mut metadata = self.config.metadata.clone();
        if self.hub.load(Ordering::Relaxed) {
            metadata.insert(ROLE_KEY.into(), ROLE_HUB.into());
        }
        HandshakeConfig {
            agent_id: self.id.clone(),
            version: self.config.protocol_version,
            capabilities: caps,
            metadata,
            timeout: self.config.connection_timeout(),
        }
    }

    fn new_peer(&self, negotiated: Negotiated, info: PeerInfo, upstream: bool, redial: bool) -> Arc<Peer> {
        let relays = negotiated.peer_metadata.get(ROLE_KEY).map(String::as_str) == Some(ROLE_HUB);
        let hb = HeartbeatTracker::new(
            self.id.clone(),
            HeartbeatConfig {
                interval: self.config.heartbeat_interval(),
                timeout: self.config.heartbeat_timeout(),
            },
            Instant::now(),
        );
        Arc::new(Peer {
            id: negotiated.peer_id.clone(),
            info,
            negotiated,
            upstream,
            relays,
            outbound: BoundedQueue::new(self.config.outbound_queue_capacity),
            outbound_bytes: ByteBudget::new(self.config.outbound_queue_bytes),
            hb: Mutex::new(hb),
            wants: Mutex::new(Vec::new()),
            advertised: Mutex::new(BTreeSet::new()),
            barriers: Mutex::new(HashMap::new()),
            conn: Mutex::new((0, CancellationToken::new())),
            live_gen: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            redial: redial.then(|| Arc::new(Notify::new())),
            down: AtomicBool::new(false),
            writer: Mutex::new(None),
            tx: Arc::new(tokio::sync::Mutex::new(None)),
            last_write_ns: AtomicU64::new(0),
            turn: AtomicBool::new(false),
            direct_idle_ns: AtomicU64::new(crate::link::DEFAULT_DIRECT_WRITE_IDLE.as_nanos() as u64),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            heard: AtomicBool::new(false),
        })
    }

    /// The client handshake over a fresh link: the negotiated outcome and the link halves.
    async fn client_handshake<T: LinkTx, R: LinkRx>(
        &self,
        link: Link<T, R>,
    ) -> Result<(Negotiated, PeerInfo, T, R), TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        let Link { mut tx, mut rx, peer: info } = link;
        let mut hs = ClientHandshake::new(self.handshake_config(), Instant::now());
        let mut hello = vec![hs.hello()];
        let fail = |e| {
            Counters::add(&self.counters.handshake_failures, 1);
            e
        };
        tx.send_batch(&mut hello).await.map_err(fail)?;
        let first = match tokio::time::timeout_at(hs.deadline().into(), rx.recv()).await {
            Err(_) => return Err(fail(TransportError::Timeout)),
            Ok(Err(e)) => return Err(fail(e)),
            Ok(Ok(None)) => {
                return Err(fail(TransportError::ConnectionError("link closed during the handshake".into())))
            }
            Ok(Ok(Some(m))) => m,
        };
        match hs.handle(&first) {
            Ok(n) => Ok((n, info, tx, rx)),
            Err(e) => {
                tx.close().await;
                Err(fail(e.into()))
            }
        }
    }

    async fn handshake_and_register<T: LinkTx, R: LinkRx>(
        self: &Arc<Self>,
        link: Link<T, R>,
        redial: bool,
    ) -> Result<Arc<Peer>, TransportError> {
        let (negotiated, info, mut tx, rx) = self.client_handshake(link).await?;
        let registered = {
            let mut peers = lock(&self.peers);
            if peers.contains_key(&negotiated.peer_id) {
                None
            } else {
                let peer = self.new_peer(negotiated.clone(), info, true, redial);
                peers.insert(peer.id.clone(), peer.clone());
                Some(peer)
            }
        };
        let Some(peer) = registered else {
            tx.close().await;
            return Err(TransportError::ConnectionError(format!(
                "already connected to an agent named {:?}",
                negotiated.peer_id
            )));
        };
        self.run_link(peer.clone(), tx, rx);
        Ok(peer)
    }

    async fn serve_handshake<T: LinkTx, R: LinkRx>(self: Arc<Self>, link: Link<T, R>) {
        let Link { mut tx, mut rx, peer: info } = link;
        let mut hs = ServerHandshake::new(self.handshake_config(), Instant::now());
        let first = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return,
            r = tokio::time::timeout_at(hs.deadline().into(), rx.recv()) => r,
        };
        let first = match first {
            Ok(Ok(Some(m))) => m,
            Err(_) => {
                Counters::add(&self.counters.handshake_failures, 1);
                warn!("peer sent no Hello within the handshake timeout; closing the link");
                tx.close().await;
                return;
            }
            Ok(Ok(None)) => {
                Counters::add(&self.counters.handshake_failures, 1);
                debug!("link closed before the handshake");
                return;
            }
            Ok(Err(e)) => {
                Counters::add(&self.counters.handshake_failures, 1);
                warn!(error = %e, "bad frame during the handshake; closing the link");
                tx.close().await;
                return;
            }
        };
        let auth: &dyn hivewire_protocol::handshake::Authenticator = match &self.config.authenticator {
            Some(a) => a.as_ref(),
            None => &AllowAll,
        };
        let accepted = {
            let mut peers = lock(&self.peers);
            // Checked under the peers lock: either `close` has not drained the peers yet (and
            // will drain this one too), or the node is closed and the link is dropped here. A
            // closed hub must never answer a Hello: the client would send into a node that
            // drops everything.
            if self.closed.load(Ordering::Acquire) {
                drop(peers);
                debug!("node closed during the handshake; dropping the link");
                tx.close().await;
                return;
            }
            if peers.len() >= self.config.max_peers {
                let reason = RejectReason::Overloaded;
                let reply =
                    Message::control(self.id.clone(), ControlOperation::Reject { reason: reason.clone() })
                        .with_destination(first.source.clone());
                Err((reply, reason))
            } else {
                match hs.handle(&first, &info, auth, &|id| peers.contains_key(id)) {
                    ServerOutcome::Accept { reply, negotiated } => {
                        let peer = self.new_peer(negotiated, info.clone(), false, false);
                        peers.insert(peer.id.clone(), peer.clone());
                        Ok((reply, peer))
                    }
                    ServerOutcome::Reject { reply, reason } => Err((reply, reason)),
                }
            }
        };
        match accepted {
            Ok((reply, peer)) => {
                if let Err(e) = tx.send_batch(&mut vec![reply]).await {
                    warn!(error = %e, "could not send HelloAck");
                    self.peer_down(&peer, &format!("handshake reply failed: {e}"));
                    return;
                }
                self.run_link(peer, tx, rx);
            }
            Err((reply, reason)) => {
                Counters::add(&self.counters.handshake_failures, 1);
                warn!(agent = %first.source, %reason, "handshake refused");
                let _ = tx.send_batch(&mut vec![reply]).await;
                tx.close().await;
                let _ = self.events.send(PeerEvent::Rejected { agent: first.source.clone(), reason });
            }
        }
    }

    fn run_link<T: LinkTx, R: LinkRx>(self: &Arc<Self>, peer: Arc<Peer>, mut tx: T, mut rx: R) {
        let n = &peer.negotiated;
        let has = |c: &str| n.has(c);
        let settings = LinkSettings {
            compression: if has(capabilities::COMPRESSION_ZSTD) {
                Compression::Zstd
            } else if has(capabilities::COMPRESSION_GZIP) {
                Compression::Gzip
            } else {
                Compression::None
            },
            accept_gzip: has(capabilities::COMPRESSION_GZIP),
            accept_zstd: has(capabilities::COMPRESSION_ZSTD),
        };
        tx.configure(&settings);
        rx.configure(&settings);
        let (gen, token) = {
            let mut conn = lock(&peer.conn);
            conn.0 += 1;
            conn.1 = CancellationToken::new();
            peer.live_gen.store(conn.0, Ordering::Release);
            (conn.0, conn.1.clone())
        };
        *lock(&peer.hb) = HeartbeatTracker::new(
            self.id.clone(),
            HeartbeatConfig {
                interval: self.config.heartbeat_interval(),
                timeout: self.config.heartbeat_timeout(),
            },
            Instant::now(),
        );
        // A new link starts with no advertised interest: send it all again, queued (at control
        // priority) before the writer starts, so it precedes any data already waiting.
        lock(&peer.advertised).clear();
        self.refresh_interest();
        peer.connected.store(true, Ordering::Release);
        let span = info_span!("link", backend = self.backend, local = %self.id, peer = %peer.id, gen);
        info!(parent: &span, version = %n.version, capabilities = ?n.capabilities, "peer up");
        let writer = tokio::spawn(
            writer_task(self.clone(), peer.clone(), tx, gen, token.clone()).instrument(span.clone()),
        );
        *lock(&peer.writer) = Some(writer);
        let reader = tokio::spawn(reader_task(self.clone(), peer.clone(), rx, gen).instrument(span));
        tokio::spawn(abort_on_cancel(token, reader));
        let _ = self.events.send(PeerEvent::Up { agent: peer.id.clone(), info: peer.info.clone() });
        if self.closed.load(Ordering::Acquire) {
            // Raced with close(); the link must not be left running, and its peer still gets
            // its goodbye. Whoever took the peer out of `peers` closes it: close() for a peer
            // it drained (it waits for this writer, see `flush_and_down`), this link for one
            // registered after the drain.
            let listed = {
                let mut peers = lock(&self.peers);
                let listed = peers.get(&peer.id).is_some_and(|p| Arc::ptr_eq(p, &peer));
                if listed {
                    peers.remove(&peer.id);
                }
                listed
            };
            if listed {
                self.say_goodbye(&peer);
                let inner = self.clone();
                tokio::spawn(async move { inner.flush_and_down(&peer).await });
            } else if peer.down.load(Ordering::Acquire) {
                // close() gave up waiting and downed the peer before this link's token existed.
                peer.cancel_link(&mut lock(&peer.conn));
            }
        }
    }

    /// Queues a closing node's `Goodbye` to `peer` after everything already queued, and closes
    /// the peer's queue to anything else.
    fn say_goodbye(&self, peer: &Peer) {
        let bye = Message::control(self.id.clone(), ControlOperation::Goodbye { reason: "closed".into() });
        let _ = peer.outbound.push_with_slack(0, bye, CONTROL_SLACK);
        peer.close_outbound();
    }

    /// Lets the writer of a peer `say_goodbye` was called for flush its queue (at most
    /// [`CLOSE_FLUSH`]), then drops the peer. A peer whose link is still being set up (between
    /// the handshake's registration and `run_link` spawning its writer) is waited for within
    /// the same time: downing it first would cancel its writer before the goodbye went out.
    async fn flush_and_down(&self, peer: &Arc<Peer>) {
        let deadline = tokio::time::Instant::now() + CLOSE_FLUSH;
        let mut handle = lock(&peer.writer).take();
        while handle.is_none() && !peer.down.load(Ordering::Acquire) && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
            handle = lock(&peer.writer).take();
        }
        if let Some(h) = handle {
            let _ = tokio::time::timeout_at(deadline, h).await;
        }
        self.peer_down(peer, "closed locally");
    }

    fn route(&self, to: &str) -> Option<Arc<Peer>> {
        self.route_direct(to).map(|(p, _)| p)
    }

    /// [`route`](Self::route), and whether the peer is `to` itself (else a hub relaying to it).
    fn route_direct(&self, to: &str) -> Option<(Arc<Peer>, bool)> {
        let peers = lock(&self.peers);
        if let Some(p) = peers.get(to) {
            return Some((p.clone(), true));
        }
        // Not a direct peer: go through a hub we dialed.
        peers.values().find(|p| p.upstream && p.relays).map(|p| (p.clone(), false))
    }

    /// `Some(now)` when a message for `peer` should be written directly instead of waking the
    /// writer task: the link is connected and idle (quiet for its `direct_write_idle`) and nothing
    /// is queued (so nothing is overtaken); never under the Error policy (a direct write waits
    /// for the medium, which that policy promises not to do). Cheapest tests first: a busy link
    /// (the common case of a stream) costs two atomic loads.
    fn direct_write_due(&self, peer: &Peer, now_ns: Option<u64>) -> Option<u64> {
        let candidate = self.config.backpressure == Backpressure::Wait
            && peer.outbound.looks_empty()
            && peer.connected.load(Ordering::Acquire);
        if !candidate {
            return None;
        }
        let now_ns = now_ns.unwrap_or_else(|| self.started.elapsed().as_nanos() as u64);
        let quiet = now_ns.saturating_sub(peer.last_write_ns.load(Ordering::Relaxed));
        let due = quiet >= peer.direct_idle_ns.load(Ordering::Relaxed)
            || (quiet >= TURN_MIN_QUIET_NS && peer.turn.load(Ordering::Relaxed));
        due.then_some(now_ns)
    }

    /// The part of [`enqueue`](Self::enqueue) that never waits: queues `msg` when there is
    /// room and no direct write is due. `Err(msg)` hands the message back for `enqueue`
    /// (a direct write, or a full queue under the Wait policy). Keeps the common send free of
    /// the larger async path (and of moving the message through its futures).
    // The `Err` is the caller's own message handed back, not an error value.
    #[allow(clippy::result_large_err)]
    fn try_enqueue(
        &self,
        peer: &Peer,
        msg: Message,
        now_ns: Option<u64>,
    ) -> Result<Result<(), TransportError>, Message> {
        if self.direct_write_due(peer, now_ns).is_some() {
            return Err(msg);
        }
        self.try_queue(peer, msg)
    }

    /// [`try_enqueue`](Self::try_enqueue) once no direct write is due.
    // The `Err` is the caller's own message handed back, not an error value.
    #[allow(clippy::result_large_err)]
    #[inline(always)]
    fn try_queue(&self, peer: &Peer, msg: Message) -> Result<Result<(), TransportError>, Message> {
        let len = msg.payload.len();
        if !peer.outbound_bytes.try_charge(len) {
            if self.config.backpressure == Backpressure::Wait {
                return Err(msg);
            }
            Counters::add(&self.counters.errors, 1);
            return Ok(Err(TransportError::QueueBytesFull { limit: peer.outbound_bytes.limit() }));
        }
        match peer.outbound.try_push(msg.priority, msg) {
            Ok(()) => Ok(Ok(())),
            Err(PushError::Full(msg)) if self.config.backpressure == Backpressure::Wait => {
                peer.outbound_bytes.uncharge(len);
                Err(msg)
            }
            Err(PushError::Full(_)) => {
                peer.outbound_bytes.uncharge(len);
                Counters::add(&self.counters.errors, 1);
                Ok(Err(TransportError::QueueFull { capacity: peer.outbound.capacity() }))
            }
            Err(PushError::Closed(_)) => {
                peer.outbound_bytes.uncharge(len);
                Ok(Err(self.closed_link_error(peer)))
            }
        }
    }

    fn closed_link_error(&self, peer: &Peer) -> TransportError {
        if self.closed.load(Ordering::Acquire) {
            TransportError::Closed
        } else {
            TransportError::ConnectionError(format!("link to {:?} closed", peer.id))
        }
    }

    /// Nanoseconds since the node started, and the wall clock in ms since the Unix epoch, from
    /// one read of the monotonic clock: the wall clock's offset is re-read at most once a
    /// second, so a step of the system clock shows in timestamps within a second.
    fn now(&self) -> (u64, u64) {
        let ns = self.started.elapsed().as_nanos() as u64;
        let ms = ns / 1_000_000;
        if ms.saturating_sub(self.wall_synced_ms.load(Ordering::Relaxed)) >= 1_000 {
            self.wall_offset_ms.store(now_ms().saturating_sub(ms), Ordering::Relaxed);
            self.wall_synced_ms.store(ms, Ordering::Relaxed);
        }
        (ns, self.wall_offset_ms.load(Ordering::Relaxed) + ms)
    }

    fn nanos_since_start(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.started).as_nanos() as u64
    }

    /// Sends an application's message to `peer` as [`enqueue`](Self::enqueue) does:
    /// [`send_now`](Self::send_now), then the queue's wait (boxed) for what has to wait.
    /// `now_ns` as for `enqueue`.
    async fn send(
        self: &Arc<Self>,
        peer: &Arc<Peer>,
        msg: Message,
        now_ns: u64,
    ) -> Result<(), TransportError> {
        // The message stays here; the synchronous path below only borrows it, so it is not
        // moved through a chain of futures (each move copies ~200 bytes).
        let mut msg = Some(msg);
        match with_context(|cx| self.send_now(cx, peer, &mut msg, now_ns)).await {
            SendNow::Done(r) => r,
            SendNow::Wait(handoff) => Box::pin(self.wait_direct(peer, handoff)).await,
            // The link is busy (its writer or another sender has it) or the queue is full.
            SendNow::Later => match msg.take() {
                Some(msg) => Box::pin(self.enqueue_queued(peer, msg)).await,
                None => Ok(()),
            },
        }
    }

    /// Everything of `enqueue` that does not wait: the direct write to an idle link, or a push
    /// into a queue with room. `Later` leaves the message in `msg`.
    fn send_now(
        self: &Arc<Self>,
        cx: &mut Context<'_>,
        peer: &Arc<Peer>,
        msg: &mut Option<Message>,
        now_ns: u64,
    ) -> SendNow {
        if let Some(now_ns) = self.direct_write_due(peer, Some(now_ns)) {
            return match self.write_direct(cx, peer, msg, now_ns) {
                Direct::Done => SendNow::Done(Ok(())),
                Direct::Wait(handoff) => SendNow::Wait(handoff),
                Direct::Busy => SendNow::Later,
            };
        }
        let Some(m) = msg.take() else { return SendNow::Done(Ok(())) };
        match self.try_enqueue(peer, m, Some(now_ns)) {
            Ok(done) => SendNow::Done(done),
            Err(m) => {
                *msg = Some(m);
                SendNow::Later
            }
        }
    }

    /// `now_ns`: the clock as the caller read it for this message (no await lies between that
    /// reading and this call), or `None` to read it here.
    async fn enqueue(
        self: &Arc<Self>,
        peer: &Arc<Peer>,
        msg: Message,
        now_ns: Option<u64>,
    ) -> Result<(), TransportError> {
        // Idle link: write directly instead of waking the writer task.
        let mut msg = Some(msg);
        if let Some(now_ns) = self.direct_write_due(peer, now_ns) {
            match with_context(|cx| self.write_direct(cx, peer, &mut msg, now_ns)).await {
                Direct::Done => return Ok(()),
                // Boxed, as the queued path below: the common path stays a small future (its
                // callers await it in place).
                Direct::Wait(handoff) => return Box::pin(self.wait_direct(peer, handoff)).await,
                Direct::Busy => {}
            }
        }
        match msg {
            Some(msg) => Box::pin(self.enqueue_queued(peer, msg)).await,
            None => Ok(()),
        }
    }

    /// The direct write of [`enqueue`](Self::enqueue), up to where it would wait: takes the
    /// link's sending half if it is free, live and has nothing queued, and hands it `msg`
    /// (taken out of the option once the link has it; left there when `Busy`). Synchronous,
    /// so that the message is not moved through a chain of futures.
    fn write_direct(
        self: &Arc<Self>,
        cx: &mut Context<'_>,
        peer: &Arc<Peer>,
        msg: &mut Option<Message>,
        now_ns: u64,
    ) -> Direct {
        let Some(m) = msg.as_ref() else { return Direct::Done };
        let Ok(mut slot) = peer.tx.clone().try_lock_owned() else {
            return Direct::Busy;
        };
        // Only the current, live link: a lost link's writer may not have cleared the slot yet,
        // and what went into it would be lost.
        let live = |g: u64| peer.live_gen.load(Ordering::Acquire) == g;
        let due = slot.as_ref().is_some_and(|(g, _)| live(*g)) && peer.outbound.is_empty();
        // The sending half moves into the write, and back into the slot after it.
        let Some((gen, mut tx)) = slot.take_if(|_| due) else {
            return Direct::Busy;
        };
        peer.last_write_ns.store(now_ns, Ordering::Relaxed);
        peer.turn.store(false, Ordering::Relaxed);
        let bytes = m.payload.len() as u64;
        // First without a future: a link that writes one message at once (a stream's
        // `poll_write`) is done here. (A failed write loses the link, as a failed batch of the
        // writer does; the send itself returns normally, as it would have had the writer sent it.)
        let rest = match tx.try_send_dyn(cx, m) {
            TrySend::Sent => Ok(()),
            TrySend::Failed(e) => Err(e),
            // The rest waits in the link's buffer.
            TrySend::Started => {
                *msg = None;
                return self.write_direct_future(cx, peer, slot, gen, tx.send_owned(None), bytes);
            }
            TrySend::Declined => {
                return self.write_direct_future(cx, peer, slot, gen, tx.send_owned(msg.take()), bytes);
            }
        };
        *msg = None;
        *slot = Some((gen, tx));
        // Written within this call: the clock read for it still holds.
        self.direct_write_done(peer, gen, slot, bytes, rest, Some(now_ns));
        Direct::Done
    }

    /// The rest of [`write_direct`](Self::write_direct) for a link that writes through a future.
    fn write_direct_future(
        self: &Arc<Self>,
        cx: &mut Context<'_>,
        peer: &Arc<Peer>,
        mut slot: tokio::sync::OwnedMutexGuard<TxSlot>,
        gen: u64,
        mut write: crate::link::OwnedSend,
        bytes: u64,
    ) -> Direct {
        // One poll here: a write the medium takes at once completes in this call.
        if let Poll::Ready((tx, sent)) = write.as_mut().poll(cx) {
            *slot = Some((gen, tx));
            self.direct_write_done(peer, gen, slot, bytes, sent, None);
            return Direct::Done;
        }
        // One that has to wait (a full ring, a peer that stopped reading) is waited for by the
        // sender, as the writer would with a batch in hand. If the send is cancelled meanwhile,
        // the write goes on in a task of its own, so that no frame is cut short; its message may
        // then still arrive, as with any stream write that a cancelled caller had begun. (The
        // guard exists before the boxed wait is next polled, so a drop at any point hands it on.)
        Direct::Wait(HandOff(Some(DirectWrite {
            write,
            slot,
            gen,
            bytes,
            inner: Arc::clone(self),
            peer: Arc::clone(peer),
        })))
    }

    /// The rest of a direct write that the medium did not take at once.
    async fn wait_direct(&self, peer: &Arc<Peer>, mut handoff: HandOff) -> Result<(), TransportError> {
        let done = match handoff.0.as_mut() {
            Some(w) => w.wait().await,
            None => None,
        };
        // Taken before anything else: a write that ended here is not handed on.
        let w = handoff.0.take();
        match (w, done) {
            (Some(w), Some((tx, sent))) => {
                w.finish(tx, sent);
                Ok(())
            }
            // The link was lost while its medium held the message: the write is given up with
            // the link, and the sending half is closed with it.
            _ => Err(self.closed_link_error(peer)),
        }
    }

    /// Queues `msg` for the link's writer, waiting for room under the Wait policy.
    async fn enqueue_queued(&self, peer: &Arc<Peer>, msg: Message) -> Result<(), TransportError> {
        let (prio, len) = (msg.priority, msg.payload.len());
        // Given back if the push fails, or if this future is dropped while it waits (a send
        // under a timeout): only a queued message keeps its bytes charged.
        let charge = match self.config.backpressure {
            Backpressure::Wait => peer.outbound_bytes.charge_guarded(len).await,
            Backpressure::Error => peer.outbound_bytes.try_charge_guarded(len),
        };
        let Some(charge) = charge else {
            if peer.outbound.is_closed() {
                return Err(self.closed_link_error(peer));
            }
            Counters::add(&self.counters.errors, 1);
            return Err(TransportError::QueueBytesFull { limit: peer.outbound_bytes.limit() });
        };
        let r = match self.config.backpressure {
            Backpressure::Wait => peer.outbound.push(prio, msg).await,
            Backpressure::Error => peer.outbound.try_push(prio, msg),
        };
        match r {
            Ok(()) => {
                charge.keep();
                Ok(())
            }
            Err(PushError::Full(_)) => {
                Counters::add(&self.counters.errors, 1);
                Err(TransportError::QueueFull { capacity: peer.outbound.capacity() })
            }
            Err(PushError::Closed(_)) => Err(self.closed_link_error(peer)),
        }
    }

    /// Books a direct write of one message of `bytes` payload bytes once it ended, and lets go
    /// of the link.
    fn direct_write_done(
        &self,
        peer: &Arc<Peer>,
        gen: u64,
        slot: tokio::sync::OwnedMutexGuard<TxSlot>,
        bytes: u64,
        sent: Result<(), TransportError>,
        ended_ns: Option<u64>,
    ) {
        // Quiet is measured from the end of the last write: a stream of large messages, each
        // sent as soon as the previous one left, goes to the writer. `ended_ns`: the caller's
        // reading, for a write that ended within the call that read it.
        let ended_ns = ended_ns.unwrap_or_else(|| self.started.elapsed().as_nanos() as u64);
        peer.last_write_ns.store(ended_ns, Ordering::Relaxed);
        drop(slot);
        match sent {
            Ok(()) => {
                Counters::add(&self.counters.messages_sent, 1);
                Counters::add(&self.counters.bytes_sent, bytes);
                peer.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                // The same as a failed batch in the writer: the link is lost and what was in
                // flight with it may be lost (a pending request then ends in PeerDown or its
                // timeout); the peer may be redialed.
                Counters::add(&self.counters.errors, 1);
                self.link_lost(peer, gen, &format!("send failed: {e}"));
            }
        }
    }

    /// Pushes a message the engine itself relays or generates; waits for room (the reader of
    /// the link it came from then holds back, which is the backpressure we want).
    async fn forward(&self, from: &Peer, peer: &Peer, msg: Message) {
        let (prio, len) = (msg.priority, msg.payload.len());
        // Given back unless the message is queued (also when the reader relaying it stops).
        let charge = match peer.outbound_bytes.try_charge_guarded(len) {
            Some(charge) => charge,
            None => {
                let charge = stalled(from, peer.outbound_bytes.charge_guarded(len)).await;
                match charge {
                    Some(charge) => charge,
                    None => return, // the peer is gone: nothing to relay to
                }
            }
        };
        let r = match peer.outbound.try_push(prio, msg) {
            Err(PushError::Full(msg)) => {
                let r = stalled(from, peer.outbound.push(prio, msg)).await;
                r
            }
            r => r,
        };
        if r.is_ok() {
            charge.keep();
        }
    }

    fn control(&self, peer: &Peer, op: ControlOperation) {
        let msg = Message::control(self.id.clone(), op);
        if peer.outbound.push_with_slack(u8::MAX, msg, CONTROL_SLACK).is_err() {
            debug!(peer = %peer.id, "control message not queued: link closing or far behind");
        }
    }

    /// Sends each peer the patterns it should forward to us: our own subscriptions, and for a
    /// hub also every other peer's.
    fn refresh_interest(&self) {
        let _serial = lock(&self.interest);
        let local: BTreeSet<String> =
            lock(&self.subs).iter().map(|s| s.pattern.as_str().to_string()).collect();
        let peers: Vec<Arc<Peer>> = lock(&self.peers).values().cloned().collect();
        let hub = self.hub.load(Ordering::Relaxed);
        // For a hub: how many peers want each pattern (each peer's wants are deduplicated), so
        // that "wanted by some *other* peer" costs O(patterns) per peer, not O(peers).
        let mut counts: HashMap<String, usize> = HashMap::new();
        let mut own: Vec<BTreeSet<String>> = Vec::new();
        if hub {
            for p in &peers {
                let w: BTreeSet<String> = lock(&p.wants).iter().map(|w| w.as_str().to_string()).collect();
                for pat in &w {
                    *counts.entry(pat.clone()).or_default() += 1;
                }
                own.push(w);
            }
        }
        for (i, p) in peers.iter().enumerate() {
            let mut desired = local.clone();
            if hub {
                for (pat, n) in &counts {
                    let mine = usize::from(own[i].contains(pat));
                    if *n > mine {
                        desired.insert(pat.clone());
                    }
                }
            }
            let mut adv = lock(&p.advertised);
            if *adv == desired {
                continue;
            }
            for pat in desired.difference(&adv) {
                self.control(p, ControlOperation::Subscribe { pattern: pat.clone() });
            }
            for pat in adv.difference(&desired) {
                self.control(p, ControlOperation::Unsubscribe { pattern: pat.clone() });
            }
            *adv = desired;
        }
    }

    /// The link of generation `gen` to `peer` failed or closed. A redialed peer is kept (its
    /// queue keeps filling) and its redial task woken; any other peer is dropped.
    fn link_lost(&self, peer: &Arc<Peer>, gen: u64, reason: &str) {
        let Some(redial) = &peer.redial else {
            return self.peer_down(peer, reason);
        };
        if self.closed.load(Ordering::Acquire) || peer.down.load(Ordering::Acquire) {
            return self.peer_down(peer, reason);
        }
        {
            let mut conn = lock(&peer.conn);
            if conn.0 != gen {
                return; // an older link's task, after a newer link took over
            }
            peer.cancel_link(&mut conn);
        }
        if peer.connected.swap(false, Ordering::AcqRel) {
            lock(&peer.barriers).clear();
            info!(peer = %peer.id, reason, "link lost; redialing");
            let _ = self.events.send(PeerEvent::Down { agent: peer.id.clone(), reason: reason.to_string() });
            redial.notify_one();
        }
    }

    fn peer_down(&self, peer: &Arc<Peer>, reason: &str) {
        if peer.down.swap(true, Ordering::AcqRel) {
            return;
        }
        {
            let mut peers = lock(&self.peers);
            if peers.get(&peer.id).is_some_and(|p| Arc::ptr_eq(p, peer)) {
                peers.remove(&peer.id);
            }
        }
        peer.close_outbound();
        peer.connected.store(false, Ordering::Release);
        peer.cancel_link(&mut lock(&peer.conn));
        if let Some(n) = &peer.redial {
            n.notify_one();
        }
        lock(&peer.barriers).clear();
        let failed = lock(&self.requests).peer_gone(&peer.id);
        for (_, tx) in failed {
            let _ =
                tx.send(Err(TransportError::PeerDown { agent: peer.id.clone(), reason: reason.to_string() }));
        }
        info!(peer = %peer.id, reason, "peer down");
        let _ = self.events.send(PeerEvent::Down { agent: peer.id.clone(), reason: reason.to_string() });
        if !self.closed.load(Ordering::Acquire) {
            self.refresh_interest();
        }
    }

    async fn deliver_inbox(&self, from: &Peer, msg: Message) {
        let item = msg;
        let prio = item.priority;
        let len = item.payload.len();
        // Given back unless the message is queued (also when this reader is stopped while it
        // waits for room).
        let charge = match self.inbox.budget().try_charge_guarded(len) {
            Some(charge) => charge,
            None => {
                let charge = stalled(from, self.inbox.budget().charge_guarded(len)).await;
                match charge {
                    Some(charge) => charge,
                    None => return, // closed
                }
            }
        };
        let pushed = match self.inbox.queue().try_push(prio, item) {
            Err(PushError::Full(item)) => {
                let r = stalled(from, self.inbox.queue().push(prio, item)).await;
                r
            }
            r => r,
        };
        if pushed.is_ok() {
            charge.keep();
        }
    }

    /// Delivers an event to matching local subscriptions; `true` if any took it.
    async fn deliver_event(&self, from: &Peer, topic: &str, msg: &Message) -> bool {
        let targets: Vec<(u64, mpsc::Sender<Message>, Arc<ByteBudget>)> = lock(&self.subs)
            .iter()
            .filter(|s| s.pattern.matches(topic))
            .map(|s| (s.id, s.tx.clone(), s.budget.clone()))
            .collect();
        let mut delivered = false;
        let len = msg.payload.len();
        for (id, tx, budget) in targets {
            // Given back unless the event is queued (also when this reader is stopped while it
            // waits for room).
            let charge = match budget.try_charge_guarded(len) {
                Some(charge) => Some(charge),
                None => {
                    let charge = stalled(from, budget.charge_guarded(len)).await;
                    charge
                }
            };
            let r = if charge.is_none() {
                Err(()) // the subscription was dropped
            } else {
                match tx.try_send(msg.clone()) {
                    Ok(()) => Ok(()),
                    Err(mpsc::error::TrySendError::Full(m)) => {
                        stalled(from, tx.send(m)).await.map_err(|_| ())
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
                }
            };
            if let (Ok(()), Some(charge)) = (&r, charge) {
                charge.keep();
            }
            match r {
                Ok(()) => delivered = true,
                Err(()) => lock(&self.subs).retain(|s| s.id != id),
            }
        }
        delivered
    }

    /// Hands a response to the request waiting for it (no waiting, no task of its own).
    fn complete_request(&self, msg: Message) {
        let Some(tx) = lock(&self.requests).on_response(&msg) else {
            Counters::add(&self.counters.dropped_unmatched, 1);
            return;
        };
        let result = match &msg.kind {
            MessageType::Response { status: ResponseStatus::Error { code, message } } => {
                Err(TransportError::RequestFailed { code: *code, message: message.clone() })
            }
            _ => Ok(msg),
        };
        let _ = tx.send(result);
    }

    /// The synchronous fast path of [`dispatch`](Self::dispatch): a response for this node
    /// completes its request (`Ok(false)`); a request, broadcast (on a non-hub) or directed
    /// event for this node that fits in the inbox now goes there (`Ok(true)`: the consumer is
    /// not woken here but by the reader's [`ReadRun`] at the end of a run). `Err(msg)`: the
    /// full path is needed.
    // The `Err` is the message handed back for the full path, not an error value.
    #[allow(clippy::result_large_err)]
    // Inlined into the reader's loop: the message goes from the decoder to the inbox's queue
    // without one more ~200-byte move through the call.
    #[inline(always)]
    fn try_deliver_now(&self, from: &Peer, msg: Message) -> Result<bool, Message> {
        if msg.payload.len() > self.config.max_message_size || (!from.relays && msg.source != from.id) {
            return Err(msg);
        }
        let directed = match &msg.destination {
            None => false,
            Some(d) if *d == self.id => true,
            Some(_) => return Err(msg),
        };
        let hub = self.hub.load(Ordering::Relaxed);
        match &msg.kind {
            MessageType::Request { .. } => {}
            MessageType::Response { .. } => {
                self.complete_request(msg);
                return Ok(false);
            }
            MessageType::Broadcast { .. } if !hub => {}
            MessageType::Event { topic } if directed => {
                if lock(&self.subs).iter().any(|s| s.pattern.matches(topic)) {
                    return Err(msg);
                }
            }
            _ => return Err(msg),
        }
        let (prio, len) = (msg.priority, msg.payload.len());
        if !self.inbox.budget().try_charge(len) {
            return Err(msg);
        }
        match self.inbox.queue().try_push_deferred(prio, msg) {
            Ok(()) => Ok(true),
            Err(PushError::Full(msg) | PushError::Closed(msg)) => {
                self.inbox.budget().uncharge(len);
                Err(msg)
            }
        }
    }

    /// Handles one message from `from`. `Err` closes the link with that reason.
    async fn dispatch(self: &Arc<Self>, from: &Arc<Peer>, mut msg: Message) -> Result<(), String> {
        if msg.payload.len() > self.config.max_message_size {
            return Err(format!(
                "peer sent a {} byte payload, over max_message_size {}",
                msg.payload.len(),
                self.config.max_message_size
            ));
        }
        if !from.relays && msg.source != from.id {
            Counters::add(&self.counters.dropped_unmatched, 1);
            debug!(claimed = %msg.source, "dropping a message whose source is not its peer");
            return Ok(());
        }
        match &msg.kind {
            MessageType::Heartbeat => {
                if let Some(cid) = msg.correlation_id {
                    if let Some(tx) = lock(&from.barriers).remove(&cid) {
                        let _ = tx.send(());
                    }
                }
                let reply = lock(&from.hb).on_heartbeat(&msg, Instant::now());
                if let Some(reply) = reply {
                    if from.outbound.push_with_slack(u8::MAX, reply, CONTROL_SLACK).is_err() {
                        debug!("heartbeat reply dropped: outbound queue far behind");
                    }
                }
                return Ok(());
            }
            MessageType::Control(op) => return self.on_control(from, op),
            _ => {}
        }
        match msg.destination.clone() {
            Some(dest) if dest != self.id => {
                if !self.hub.load(Ordering::Relaxed) {
                    Counters::add(&self.counters.dropped_unroutable, 1);
                    return Ok(());
                }
                let target = lock(&self.peers).get(&dest).cloned();
                let Some(target) = target else {
                    Counters::add(&self.counters.dropped_unroutable, 1);
                    self.bounce(from, &msg, error_codes::UNROUTABLE, "destination not connected").await;
                    return Ok(());
                };
                if msg.ttl <= 1 {
                    Counters::add(&self.counters.dropped_ttl, 1);
                    self.bounce(from, &msg, error_codes::TTL_EXPIRED, "hop limit reached").await;
                    return Ok(());
                }
                msg.ttl -= 1;
                self.forward(from, &target, msg).await;
                Ok(())
            }
            directed => {
                let directed = directed.is_some();
                match &msg.kind {
                    MessageType::Response { .. } => self.complete_request(msg),
                    MessageType::Event { topic } => {
                        let topic = topic.clone();
                        let relayed = !directed && self.relay_event(from, &topic, &msg).await;
                        let taken = self.deliver_event(from, &topic, &msg).await;
                        if !taken && !relayed {
                            if directed {
                                self.deliver_inbox(from, msg).await;
                            } else {
                                Counters::add(&self.counters.dropped_unmatched, 1);
                            }
                        }
                    }
                    MessageType::Broadcast { .. } => {
                        if !directed && self.hub.load(Ordering::Relaxed) && msg.ttl > 1 {
                            let mut relayed = msg.clone();
                            relayed.ttl -= 1;
                            let others: Vec<Arc<Peer>> = lock(&self.peers)
                                .values()
                                .filter(|p| !Arc::ptr_eq(p, from) && p.id != msg.source)
                                .cloned()
                                .collect();
                            for p in others {
                                self.forward(from, &p, relayed.clone()).await;
                            }
                        } else if !directed && self.hub.load(Ordering::Relaxed) {
                            Counters::add(&self.counters.dropped_ttl, 1);
                        }
                        self.deliver_inbox(from, msg).await;
                    }
                    _ => self.deliver_inbox(from, msg).await,
                }
                Ok(())
            }
        }
    }

    /// Relays a published event to the other peers that want it; `true` if any did.
    async fn relay_event(&self, from: &Arc<Peer>, topic: &str, msg: &Message) -> bool {
        if !self.hub.load(Ordering::Relaxed) {
            return false;
        }
        let targets: Vec<Arc<Peer>> = lock(&self.peers)
            .values()
            .filter(|p| !Arc::ptr_eq(p, from) && p.id != msg.source && p.wants(topic))
            .cloned()
            .collect();
        if targets.is_empty() {
            return false;
        }
        if msg.ttl <= 1 {
            Counters::add(&self.counters.dropped_ttl, 1);
            return true;
        }
        let mut relayed = msg.clone();
        relayed.ttl -= 1;
        for p in targets {
            self.forward(from, &p, relayed.clone()).await;
        }
        true
    }

    /// Answers a request the hub cannot deliver, on behalf of its destination, so that the
    /// caller fails fast instead of waiting for its timeout.
    async fn bounce(&self, from: &Peer, msg: &Message, code: u32, why: &str) {
        if !msg.is_request() {
            return;
        }
        let responder = msg.destination.clone().unwrap_or_else(|| self.id.clone());
        let mut resp = Message::error_response(responder, msg, code, why)
            .with_header("hw.relay-error", self.id.as_str());
        resp.timestamp_ms = now_ms();
        self.forward(from, from, resp).await;
    }

    fn on_control(&self, from: &Arc<Peer>, op: &ControlOperation) -> Result<(), String> {
        match op {
            ControlOperation::Subscribe { pattern } => {
                let p = TopicPattern::parse(pattern).map_err(|e| format!("bad subscription pattern: {e}"))?;
                // Before `wants` changes: a concurrent refresh_interest then either sees the
                // new pattern or runs wholly before this update.
                let _serial = lock(&self.interest);
                let added = {
                    let mut wants = lock(&from.wants);
                    if wants.contains(&p) {
                        false
                    } else if wants.len() >= MAX_PEER_SUBSCRIPTIONS {
                        return Err(format!("peer exceeded {MAX_PEER_SUBSCRIPTIONS} subscriptions"));
                    } else {
                        wants.push(p);
                        true
                    }
                };
                if added && self.hub.load(Ordering::Relaxed) {
                    // Incremental form of refresh_interest: every other peer must now be asked
                    // for this pattern too (O(peers), not O(peers x patterns) per subscribe).
                    let others: Vec<Arc<Peer>> =
                        lock(&self.peers).values().filter(|q| !Arc::ptr_eq(q, from)).cloned().collect();
                    for q in others {
                        if lock(&q.advertised).insert(pattern.clone()) {
                            self.control(&q, ControlOperation::Subscribe { pattern: pattern.clone() });
                        }
                    }
                }
                Ok(())
            }
            ControlOperation::Unsubscribe { pattern } => {
                lock(&from.wants).retain(|w| w.as_str() != pattern);
                if self.hub.load(Ordering::Relaxed) {
                    self.refresh_interest();
                }
                Ok(())
            }
            ControlOperation::Goodbye { reason } => Err(format!("goodbye: {reason}")),
            other => Err(format!("unexpected control message after the handshake: {other:?}")),
        }
    }
}

async fn writer_task<T: LinkTx>(
    inner: Arc<Inner>,
    peer: Arc<Peer>,
    tx: T,
    gen: u64,
    cancel: CancellationToken,
) {
    peer.direct_idle_ns.store(tx.direct_write_idle().as_nanos() as u64, Ordering::Relaxed);
    *peer.tx.lock().await = Some((gen, Box::new(tx)));
    // One cancellation wait for the whole loop: a `select!` per batch would register and remove
    // a waiter on the token (two lock round trips) each time. (The writer wakes once per
    // batch, not per message as the reader does; see `abort_on_cancel`.) `write_loop` also
    // checks the token before it takes anything from the queue; what it does after the loop
    // (closing the link) needs the task, so it is not aborted.
    tokio::select! {
        biased;
        _ = cancel.cancelled() => {}
        _ = write_loop(&inner, &peer, gen, &cancel) => {}
    }
    let mut slot = peer.tx.lock().await;
    if slot.as_ref().is_some_and(|(g, _)| *g == gen) {
        if let Some((_, mut tx)) = slot.take() {
            tx.close_dyn().await;
        }
    }
}

async fn write_loop(inner: &Arc<Inner>, peer: &Arc<Peer>, gen: u64, cancel: &CancellationToken) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let mut deadline = lock(&peer.hb).next_deadline();
    let sleep = tokio::time::sleep_until(deadline.into());
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            biased;
            ready = peer.outbound.wait_ready() => {
                if !ready {
                    break;
                }
                // Pop only while holding the link, so that a direct send can never overtake
                // what was queued before it.
                let mut slot = peer.tx.lock().await;
                let Some((g, tx)) = slot.as_mut() else { break };
                if *g != gen {
                    break; // a newer link took over
                }
                if cancel.is_cancelled() {
                    // The link was lost (and its peer reported down) while this task waited to
                    // run: what was queued since waits for the next link instead of being
                    // written into a dead one.
                    break;
                }
                if peer.outbound.try_pop_batch(WRITE_BATCH, &mut batch) != Some(true) {
                    continue;
                }
                let n = batch.len() as u64;
                let (mut bytes, mut charged) = (0u64, 0usize);
                for m in &batch {
                    let len = m.payload.len();
                    bytes += len as u64;
                    if len >= CHARGED_PAYLOAD_MIN {
                        charged += len;
                    }
                }
                // Given back as the batch leaves the queue: the sender refills it while the
                // writer writes (at most one batch more than the bound is in memory).
                peer.outbound_bytes.uncharge(charged);
                peer.last_write_ns.store(inner.started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                peer.turn.store(false, Ordering::Relaxed);
                if let Err(e) = tx.send_dyn(&mut batch).await {
                    batch.clear();
                    drop(slot);
                    Counters::add(&inner.counters.errors, 1);
                    inner.link_lost(peer, gen, &format!("send failed: {e}"));
                    break;
                }
                drop(slot);
                peer.last_write_ns.store(inner.started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                Counters::add(&inner.counters.messages_sent, n);
                Counters::add(&inner.counters.bytes_sent, bytes);
                peer.sent.fetch_add(n, Ordering::Relaxed);
            }
            _ = &mut sleep => {
                let now = Instant::now();
                let action = {
                    let mut hb = lock(&peer.hb);
                    if peer.heard.swap(false, Ordering::Relaxed) {
                        // Heard since the last tick: the peer was alive no earlier than the
                        // previous tick, so detection may lag by at most one interval.
                        hb.on_receive(now);
                    }
                    hb.poll(now)
                };
                match action {
                    HeartbeatAction::SendProbe(probe) => {
                        let _ = peer.outbound.push_with_slack(u8::MAX, probe, CONTROL_SLACK);
                    }
                    HeartbeatAction::PeerDead { silent_for } => {
                        warn!(?silent_for, "peer silent past the heartbeat timeout");
                        inner.link_lost(peer, gen, &format!("heartbeat timeout: silent for {silent_for:?}"));
                        break;
                    }
                    HeartbeatAction::Idle => {}
                }
            }
        }
        let next = lock(&peer.hb).next_deadline();
        if next != deadline {
            deadline = next;
            sleep.as_mut().reset(deadline.into());
        }
    }
}

async fn reader_task<R: LinkRx>(inner: Arc<Inner>, peer: Arc<Peer>, rx: R, gen: u64) {
    read_loop(&inner, &peer, rx, gen).await
}

/// Stops a link's reader when the link's token is cancelled (the link lost or taken over, the
/// node closed), from a task of its own: a `select!` on the token in the reader would look at
/// the token (two locks) every time the reader wakes, that is once per message read. Aborting
/// drops the reader where it waits, as that `select!` would.
async fn abort_on_cancel(token: CancellationToken, mut reader: tokio::task::JoinHandle<()>) {
    tokio::select! {
        biased;
        _ = &mut reader => {}
        _ = token.cancelled() => reader.abort(),
    }
}

/// What a reader's run of messages leaves for its end, so that it costs no shared write per
/// message: the inbox's consumer is woken, and the node's and the peer's receive counters are
/// added to, once the run ends (the link has nothing more ready, before anything that may
/// wait, every [`MAX_DEFERRED_WAKE`] messages, and on drop: the reader cancelled or
/// returning). Counters are added to before the consumer is woken, so a consumer woken for a
/// message finds it counted.
struct ReadRun<'a> {
    inner: &'a Inner,
    peer: &'a Peer,
    /// Messages delivered to the inbox without waking its consumer.
    pending: usize,
    /// Messages and payload bytes read and not yet counted.
    read: u64,
    bytes: u64,
}

/// How long a link must have been quiet before a sender writes to it directly when the peer
/// has spoken since our last write (see `Peer::turn`): long enough that a sender's own burst
/// (sends well under a microsecond apart) and a stream both ways still go to the writer, which
/// batches them; shorter than a loopback round trip, which is what it is for.
const TURN_MIN_QUIET_NS: u64 = 2_000;

/// A consumer is woken at least this often during a long run, so it works in parallel.
const MAX_DEFERRED_WAKE: usize = 32;

impl ReadRun<'_> {
    fn received(&mut self, bytes: usize) {
        self.read += 1;
        self.bytes += bytes as u64;
        if self.read >= MAX_DEFERRED_WAKE as u64 {
            self.count();
        }
    }

    fn delivered(&mut self) {
        self.pending += 1;
        if self.pending >= MAX_DEFERRED_WAKE {
            self.flush();
        }
    }

    fn count(&mut self) {
        if self.read > 0 {
            Counters::add(&self.inner.counters.messages_received, self.read);
            Counters::add(&self.inner.counters.bytes_received, self.bytes);
            self.peer.received.fetch_add(self.read, Ordering::Relaxed);
            self.read = 0;
            self.bytes = 0;
        }
    }

    fn flush(&mut self) {
        self.count();
        if self.pending > 0 {
            self.pending = 0;
            self.inner.inbox.queue().notify_pushed();
        }
    }
}

impl Drop for ReadRun<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Awaits a future that this task polled a moment ago and that returned `Pending`: the first
/// poll here returns `Pending` without polling it again. That poll registered this task's
/// waker, so whatever it waits for wakes this task (a wake-up since then has already scheduled
/// it again); polling again at once would only look at the medium's readiness a second time
/// and find it unchanged (one readiness check per message saved in the reader).
struct AlreadyPolled<F> {
    f: F,
    skip: bool,
}

impl<F> AlreadyPolled<F> {
    fn new(f: F) -> Self {
        AlreadyPolled { f, skip: true }
    }
}

impl<F: Future + Unpin> Future for AlreadyPolled<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if std::mem::take(&mut self.skip) {
            return Poll::Pending;
        }
        Pin::new(&mut self.f).poll(cx)
    }
}

async fn read_loop<R: LinkRx>(inner: &Arc<Inner>, peer: &Arc<Peer>, mut rx: R, gen: u64) {
    let mut wake = ReadRun { inner, peer, pending: 0, read: 0, bytes: 0 };
    loop {
        // Take what the link has ready without waiting; wake the inbox's consumer once for the
        // whole run before the reader waits for more. (`LinkRx::recv` is cancel-safe.)
        // A buffered message stays where `try_recv_buffered` put it (matching it into a new
        // binding would move the ~200-byte message once more).
        let mut next = rx.try_recv_buffered();
        if matches!(next, Ok(None)) {
            // One receive future, polled once before the run's wake-up and then awaited:
            // building a second one would poll (and register for) the medium's readiness
            // twice per wait.
            let mut recv = std::pin::pin!(rx.recv());
            next = match std::future::poll_fn(|cx| Poll::Ready(recv.as_mut().poll(cx))).await {
                Poll::Ready(r) => r,
                Poll::Pending => {
                    wake.flush();
                    AlreadyPolled::new(recv).await
                }
            };
        }
        match next {
            Ok(Some(msg)) => {
                wake.received(msg.payload.len());
                if !peer.heard.load(Ordering::Relaxed) {
                    peer.heard.store(true, Ordering::Relaxed);
                }
                // Before the message is delivered: the task it wakes may answer at once.
                if !peer.turn.load(Ordering::Relaxed) {
                    peer.turn.store(true, Ordering::Relaxed);
                }
                // Most messages are delivered without waiting: do that without building the
                // (large) dispatch future.
                let msg = match inner.try_deliver_now(peer, msg) {
                    Ok(true) => {
                        wake.delivered();
                        continue;
                    }
                    Ok(false) => continue,
                    Err(msg) => msg,
                };
                wake.flush();
                if let Err(reason) = Box::pin(inner.dispatch(peer, msg)).await {
                    if !reason.starts_with("goodbye") {
                        Counters::add(&inner.counters.errors, 1);
                        warn!(%reason, "closing link");
                    }
                    inner.link_lost(peer, gen, &reason);
                    return;
                }
            }
            Ok(None) => {
                inner.link_lost(peer, gen, "link closed by peer");
                return;
            }
            Err(e) => {
                Counters::add(&inner.counters.errors, 1);
                warn!(error = %e, "link failed");
                inner.link_lost(peer, gen, &format!("link error: {e}"));
                return;
            }
        }
    }
}

async fn redial_task<T, R, F, Fut>(inner: Weak<Inner>, peer: Arc<Peer>, dial: F, shutdown: CancellationToken)
where
    T: LinkTx,
    R: LinkRx,
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Link<T, R>, TransportError>> + Send + 'static,
{
    let Some(wake) = peer.redial.clone() else { return };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
        }
        if peer.down.load(Ordering::Acquire) {
            return;
        }
        if peer.connected.load(Ordering::Acquire) {
            continue;
        }
        let Some(strong) = inner.upgrade() else { return };
        let attempts = strong.config.retry_attempts;
        drop(strong);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(strong) = inner.upgrade() else { return };
            if attempt > attempts {
                warn!(attempts, "giving up on the peer");
                strong.peer_down(&peer, &format!("reconnect failed after {attempts} attempts"));
                return;
            }
            let delay = strong.config.reconnect_delay(attempt);
            drop(strong);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            let link = match dial().await {
                Ok(link) => link,
                Err(e) => {
                    debug!(attempt, error = %e, "redial failed");
                    continue;
                }
            };
            let Some(strong) = inner.upgrade() else { return };
            match strong.client_handshake(link).await {
                Ok((n, _, tx, rx)) if n.peer_id == peer.id => {
                    info!(attempt, "reconnected");
                    strong.run_link(peer.clone(), tx, rx);
                    break;
                }
                Ok((n, _, mut tx, _)) => {
                    warn!(other = %n.peer_id, "redial reached a different agent; trying again");
                    tx.close().await;
                }
                Err(e) => debug!(attempt, error = %e, "handshake after redial failed"),
            }
        }
    }
}

async fn request_timer(inner: Weak<Inner>, wake: Arc<Notify>, shutdown: CancellationToken) {
    loop {
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Hold only a weak reference while sleeping, so a dropped node ends this task.
        let next = match inner.upgrade() {
            Some(strong) => {
                let mut requests = lock(&strong.requests);
                let next = requests.next_deadline();
                let ns = next.map_or(u64::MAX, |d| strong.nanos_since_start(d));
                strong.timer_deadline_ns.store(ns, Ordering::Relaxed);
                next
            }
            None => return,
        };
        let until = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(until.into()) => {}
        }
        let Some(strong) = inner.upgrade() else { return };
        let expired = lock(&strong.requests).poll_timeouts(Instant::now());
        drop(strong);
        for (_, tx) in expired {
            let _ = tx.send(Err(TransportError::Timeout));
        }
    }
}

/// A stream of events matching one pattern, from [`Node::subscribe`]. Dropping it unsubscribes.
pub struct Subscription {
    id: u64,
    pattern: TopicPattern,
    rx: mpsc::Receiver<Message>,
    budget: Arc<ByteBudget>,
    node: Weak<Inner>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("pattern", &self.pattern.as_str()).finish()
    }
}

impl Subscription {
    /// The pattern subscribed to.
    pub fn pattern(&self) -> &str {
        self.pattern.as_str()
    }

    /// The next matching event; `None` once the node closed.
    pub async fn recv(&mut self) -> Option<Message> {
        let m = self.rx.recv().await;
        self.taken(m)
    }

    /// An event if one is waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        let m = self.rx.try_recv().ok();
        self.taken(m)
    }

    /// Gives a taken event's bytes back to the subscription's budget.
    fn taken(&self, m: Option<Message>) -> Option<Message> {
        if let Some(m) = &m {
            self.budget.uncharge(m.payload.len());
        }
        m
    }
}

impl futures::Stream for Subscription {
    type Item = Message;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let m = std::task::ready!(self.rx.poll_recv(cx));
        Poll::Ready(self.taken(m))
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // A reader waiting to deliver into this subscription gives up at once.
        self.budget.close();
        if let Some(inner) = self.node.upgrade() {
            lock(&inner.subs).retain(|s| s.id != self.id);
            if !inner.closed.load(Ordering::Acquire) {
                inner.refresh_interest();
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

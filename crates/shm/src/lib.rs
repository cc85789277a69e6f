//! hivewire's shared-memory backend: `shm://NAME`, for processes on one host.
//!
//! Each connection is a pair of lock-free SPSC rings ([`hivewire_ring`]) in a shared-memory
//! segment; frames are the codec's ordinary frames, one ring record per frame. Linux is the
//! target (futex wake-ups, `/dev/shm` listing for cleanup); elsewhere the waker falls back to
//! 1 ms polling and only the control segment of a dead listener is removed.
//!
//! # Rendezvous
//!
//! * **Names.** `NAME` is 1–100 characters of `[A-Za-z0-9_-]`. The listener's control segment
//!   is the POSIX shared-memory object `/hw-NAME`; connection segments are
//!   `/hw-NAME.<64-bit random id in hex>`. On Linux they show as `/dev/shm/hw-NAME*`.
//! * **Liveness of a listener** rests on an exclusive `flock` on
//!   `$TMPDIR/hivewire-shm/NAME.lock`, held for the listener's life and released by the kernel
//!   however the process dies (PIDs are only a hint, since they are reused). A listener whose
//!   `flock` fails is refused with `ConnectionError("address in use …")`; one whose `flock`
//!   succeeds knows nobody owns the name and first removes every `/dev/shm/hw-NAME` and
//!   `/dev/shm/hw-NAME.*` left by a dead predecessor. On close it unlinks its control segment,
//!   removes the lock file (still holding the lock) and releases the lock.
//! * **Control segment** (offsets only, no pointers): a 64-byte header — magic `HWSHMCT1`,
//!   layout version, slot count, listener PID, a futex *doorbell* word, the ring capacity of
//!   its connections, a random instance id — then 64 slots of 64 bytes
//!   (`state`, `client_pid`, `conn_id`). Slots hold *pending* connects only, so the number of
//!   live connections is not limited by them.
//! * **Connect.** The client checks that the listener's lock is held (else: no live listener),
//!   creates its connection segment `/hw-NAME.ID` (exclusive create) holding a 64-byte header
//!   (magic `HWSHMCN1`, version, `state`, ring capacity, both PIDs), two 64-byte wake-up
//!   blocks (one per direction: futex `seq`, `sleeping`, `producer_closed`, `consumer_closed`,
//!   `space_wanted`) and the two rings (client→server, server→client) of the listener's capacity. It claims a
//!   free slot with a CAS (`FREE → CLAIMED`), writes the id and its PID, publishes
//!   `CLAIMED → READY` (Release), bumps the doorbell and wakes it.
//! * **Accept.** A listener thread sleeps on the doorbell (100 ms timeout), takes a `READY`
//!   slot (`READY → FREE`), maps the segment and at once **unlinks its name**: from then on
//!   the segment exists only as long as one of the two processes maps it, so a crash of either
//!   side leaves nothing in `/dev/shm`. It attaches its ring ends and moves the connection
//!   `OFFERED → ACCEPTED` by CAS; a client that gives up (timeout) moves it
//!   `OFFERED → ABANDONED` and unlinks the segment itself. A slot left `CLAIMED` by a client
//!   that died mid-claim is freed after 2 s.
//!
//! # Wake-up
//!
//! The receiving half reads records inside its async `recv`. On an empty ring it first returns
//! to the engine once (which then wakes the consumers of what it delivered), then **spins**:
//! it polls the ring in 2 µs chunks (`std::hint::spin_loop`), and between chunks gives the worker
//! to other tasks (`yield_now`) and, when the link's last send came from another thread than
//! the reader's, the CPU to other threads (`sched_yield`: on a small machine the thread that
//! will produce the answer may be waiting for this very CPU; when the sender is a task of the
//! reader's own worker, the only thread a `sched_yield` runs is the runtime's idle worker that
//! tokio woke, at several µs a context switch, so the reader does not yield then; each side
//! publishes its choice in its direction's `consumer_yields`, and a side whose peer yields
//! yields too, since the peer's sending thread may wait for either CPU). It spins for
//! at most 50 µs, a limit that adapts: it halves after each wait that spinning did not serve
//! (down to zero, so an idle or slow link parks at once) and returns to 50 µs after a wait that
//! it served or that ended soon after parking. Then it **parks**: it sets the direction's
//! `sleeping` word, notes the futex word `seq`, re-checks the ring and awaits a
//! `tokio::sync::Notify`. A waker thread per link sleeps on `seq` (shared futex, 100 ms
//! timeout) and notifies the task when `seq` moves past the value the task noted. The sender
//! bumps `seq` after every commit and calls `FUTEX_WAKE` only when `sleeping` is set, so a
//! spinning or busy receiver costs the sender no syscall, and an idle link costs one wake-up
//! of the waker thread every 100 ms (used to check that the peer lives). `raw_sync`'s events
//! were not used: they are a process-shared pthread mutex and condition variable, and a peer
//! killed while holding that mutex would block the other side forever; the futex word holds
//! no lock.
//!
//! A sender facing a full ring yields a few times, then sets the direction's `space_wanted`
//! word and waits; the receiver, after releasing a record, clears that word and wakes the
//! sender's waker thread through the `seq` word of the other direction (the one it sleeps on),
//! which passes the wake-up on to the sending task (a 10 ms timeout covers a peer that misses
//! it).
//!
//! # Copies
//!
//! A payload of 2 KiB or more is copied once on each side: the sender encodes the envelope of
//! the message without its payload, patches the MessagePack `bin` length and the frame length
//! (the payload is the envelope's last field) and copies the payload from the message straight
//! into the reserved record — the bytes are exactly the codec's frame, and a frame the codec
//! would compress takes the codec's path. The receiver copies the record out into a buffer and
//! decodes it there (the payload is a slice of that buffer, not a second copy). Small records
//! share one buffer, as a stream reader's; a record of 256 KiB or more gets a buffer of its own
//! from a pool of three per link, reused once the messages cut from it are dropped (fresh
//! pages would cost more in page faults than the copy; the pool holds at most three buffers of
//! up to half the ring capacity each, and lets a buffer go to its messages' holders when all
//! three are in use), and after such a record `recv` returns to the engine once so that it
//! hands the message on before the next one is copied. Payloads and records of 1 MiB or more
//! are copied both ways with non-temporal stores ([`hivewire_ring::copy_streaming`], fenced
//! before the commit): they are read long after the caches evicted them, and skipping the
//! read-for-ownership of each destination line roughly doubles such a copy.
//!
//! **Zero copy.** Beside the copying `recv`, a link's receiving half lends messages in place:
//! [`ShmRx::recv_lent`] (and `try_recv_lent`) decodes the envelope of the next record where it
//! lies and returns a [`LentMessage`] whose payload is a slice of the ring itself; the record
//! is released to the sender when the lent message is dropped (a sender waiting for room is
//! woken then). A compressed frame is decoded with a copy instead. This is the receive of a
//! link from [`SharedMemoryTransport::dial_link`], for code that speaks the wire protocol
//! itself: a [`Node`]'s engine hands messages to other tasks and keeps receiving meanwhile, so
//! it copies each record out once rather than hold the ring.
//!
//! # Messages and limits
//!
//! A message is one ring record, so it must fit in [`hivewire_ring::max_record_len`]
//! (`ring capacity / 2 - 8`). Messages are **not chunked**: the node's `max_message_size` is
//! lowered to [`max_payload_for_ring`] so that an oversized payload is refused by `send` with
//! `TransportError::MessageTooLarge` before it reaches the link; a frame that still does not fit
//! (an envelope larger than the reserve, only possible with tiny rings) fails the link with
//! `MessageTooLarge`. The default ring is 4 MiB per direction (payloads up to ~1.94 MiB).
//!
//! # Dead peers
//!
//! A clean close marks the direction closed and the peer's receiver sees EOF at once. A peer
//! killed with SIGKILL is noticed by the waker thread within ~100 ms: the server side checks
//! the client's PID, the client side checks the listener's `flock` (and PID); the engine's
//! heartbeat timeout covers what these miss (a reused PID, a stopped process). A corrupt ring
//! breaks only its link, with a `ConnectionError`.
//!
//! ```
//! use hivewire_core::TransportConfig;
//! use hivewire_shm::{SharedMemoryInfo, SharedMemoryTransport};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), hivewire_core::TransportError> {
//! let name = format!("doc-{}", std::process::id());
//! let info = SharedMemoryInfo { ring_buffer_size: 64 * 1024, ..SharedMemoryInfo::default() };
//! let hub = SharedMemoryTransport::listen(&name, "hub", TransportConfig::default(), info).await?;
//! assert_eq!(hub.listen_url(), Some(format!("shm://{name}")));
//! let agent = SharedMemoryTransport::connect(&format!("shm://{name}"), "agent", TransportConfig::default()).await?;
//!
//! let responder = hub.clone();
//! tokio::spawn(async move {
//!     let (_, req) = responder.receive().await?;
//!     responder.respond(&req, &"pong").await
//! });
//! let resp = agent.request("hub", "ping", &(), std::time::Duration::from_secs(5)).await?;
//! assert_eq!(resp.payload_as::<String>()?, "pong");
//! agent.close().await;
//! hub.close().await;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod link;
mod segment;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hivewire_codec::{ENVELOPE_ALLOWANCE, HEADER_LEN};
use hivewire_core::{Acceptor, AgentId, Node, PeerInfo, TransportConfig, TransportError};
use tokio::sync::mpsc;
use tracing::{info, warn};

pub use link::{LentMessage, ShmRx, ShmTx};

use link::{make_link, Conn};
use segment::{
    conn_layout, conn_os_id, control_os_id, futex_wait, futex_wake, remove_segments_of, unlink_os_id,
    ListenerLock, LockProbe, Segment, C2S, CONN_ABANDONED, CONN_ACCEPTED, CONN_MAGIC, CONN_OFFERED,
    CONTROL_LEN, CONTROL_MAGIC, S2C, SEGMENT_VERSION, SLOT_CLAIMED, SLOT_COUNT, SLOT_FREE, SLOT_READY,
};

/// URL scheme of this backend.
pub const SCHEME: &str = "shm";
/// Default data capacity of each ring (one per direction per connection).
pub const DEFAULT_RING_BUFFER_SIZE: usize = 4 * 1024 * 1024;
/// Smallest ring capacity used (smaller requests are rounded up to it).
pub const MIN_RING_BUFFER_SIZE: usize = 4096;
/// Longest listener name.
pub const MAX_NAME_LEN: usize = 100;
/// How long a slot may stay claimed by a client that never finished its claim.
const STALE_CLAIM: Duration = Duration::from_secs(2);
/// Longest sleep of the accept thread between checks of its stop flag.
const ACCEPT_WAIT: Duration = Duration::from_millis(100);

/// Where and how big: the seeds' description of a shared-memory endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedMemoryInfo {
    /// The endpoint name (`NAME` of `shm://NAME`). Used by [`SharedMemoryTransport::new`];
    /// `listen` and `connect` take the name as an argument instead.
    pub name: String,
    /// Bytes of shared memory per connection. Used only when `ring_buffer_size` is 0: the
    /// rings are then the largest that fit in `size` (0 for both means the default).
    pub size: usize,
    /// Data capacity of each ring in bytes, rounded up to a power of two in
    /// [`MIN_RING_BUFFER_SIZE`]`..=2 GiB`. Chosen by the listener; clients use the listener's.
    pub ring_buffer_size: usize,
}

impl Default for SharedMemoryInfo {
    fn default() -> Self {
        SharedMemoryInfo { name: String::new(), size: 0, ring_buffer_size: DEFAULT_RING_BUFFER_SIZE }
    }
}

impl SharedMemoryInfo {
    /// Default sizes for endpoint `name`.
    pub fn new(name: impl Into<String>) -> Self {
        SharedMemoryInfo { name: name.into(), ..SharedMemoryInfo::default() }
    }

    /// The ring capacity these settings give.
    pub fn ring_capacity(&self) -> usize {
        let want = if self.ring_buffer_size > 0 {
            self.ring_buffer_size
        } else if self.size > 0 {
            let mut cap = MIN_RING_BUFFER_SIZE;
            while cap < hivewire_ring::MAX_CAPACITY && conn_layout(cap * 2).2 <= self.size {
                cap *= 2;
            }
            cap
        } else {
            DEFAULT_RING_BUFFER_SIZE
        };
        want.clamp(MIN_RING_BUFFER_SIZE, hivewire_ring::MAX_CAPACITY).next_power_of_two()
    }
}

/// Whether a [`SharedMemoryTransport::new`] endpoint listens or connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShmMode {
    /// Create the endpoint and accept connections (a hub).
    Listen,
    /// Connect to a listening endpoint.
    Connect,
}

/// The largest payload a ring of `capacity` bytes carries in one record: the ring's largest
/// record less the frame header and a reserve for the envelope (64 KiB, or half the record on
/// small rings).
pub fn max_payload_for_ring(capacity: usize) -> usize {
    let record = hivewire_ring::max_record_len(capacity);
    record.saturating_sub(HEADER_LEN + ENVELOPE_ALLOWANCE.min(record / 2))
}

/// Checks and extracts `NAME` from `NAME` or `shm://NAME`.
pub fn parse_name(name_or_url: &str) -> Result<String, TransportError> {
    let name = name_or_url.strip_prefix("shm://").unwrap_or(name_or_url);
    let bad = |reason: &str| TransportError::InvalidUrl { url: name_or_url.into(), reason: reason.into() };
    if name.is_empty() {
        return Err(bad("empty shared-memory name"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad("shared-memory name longer than 100 characters"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(bad("a shared-memory name may contain only A-Z a-z 0-9 _ -"));
    }
    Ok(name.to_string())
}

fn clamp_config(mut config: TransportConfig, capacity: usize) -> TransportConfig {
    config.max_message_size = config.max_message_size.min(max_payload_for_ring(capacity));
    config
}

fn peer_info(name: &str, pid: u32) -> PeerInfo {
    let mut info = PeerInfo {
        transport: SCHEME.into(),
        remote_addr: Some(format!("{SCHEME}://{name}")),
        ..PeerInfo::default()
    };
    info.attributes.insert("pid".into(), pid.to_string());
    info
}

/// Constructors of shared-memory nodes.
#[derive(Debug, Clone, Copy)]
pub struct SharedMemoryTransport;

impl SharedMemoryTransport {
    /// The seeds' constructor: listens on or connects to `info.name` according to `mode`.
    /// (Named `new` like the other transports' constructors; it returns the running [`Node`].)
    #[allow(clippy::new_ret_no_self)]
    pub async fn new(
        info: SharedMemoryInfo,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
        mode: ShmMode,
    ) -> Result<Node, TransportError> {
        let name = info.name.clone();
        match mode {
            ShmMode::Listen => Self::listen(&name, agent_id, config, info).await,
            ShmMode::Connect => Self::connect(&name, agent_id, config).await,
        }
    }

    /// A hub listening on `shm://NAME` (`name` may be `NAME` or `shm://NAME`); `info` gives the
    /// ring size (its `name` is ignored). Fails with `ConnectionError("address in use …")` while
    /// a live listener owns the name; segments of a dead one are removed first.
    pub async fn listen(
        name: &str,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
        info: SharedMemoryInfo,
    ) -> Result<Node, TransportError> {
        let name = parse_name(name)?;
        let capacity = info.ring_capacity();
        let lock = ListenerLock::acquire(&name)?.ok_or_else(|| {
            TransportError::ConnectionError(format!("address in use: a live listener owns {SCHEME}://{name}"))
        })?;
        let removed = remove_segments_of(&name);
        if removed > 0 {
            info!(name, removed, "removed shared-memory segments left by a dead listener");
        }
        let mut control = Segment::create(&control_os_id(&name), CONTROL_LEN)?;
        // Closing unlinks the name explicitly; a late drop of the mapping must never unlink a
        // successor's segment.
        control.set_owner(false);
        let header = control
            .control()
            .ok_or_else(|| TransportError::ConnectionError("control segment too small".into()))?;
        header.version.store(SEGMENT_VERSION, Ordering::Relaxed);
        header.slot_count.store(SLOT_COUNT as u32, Ordering::Relaxed);
        header.listener_pid.store(std::process::id(), Ordering::Relaxed);
        header.ring_capacity.store(capacity as u64, Ordering::Relaxed);
        header.instance.store(fastrand::u64(..), Ordering::Relaxed);
        header.magic.store(CONTROL_MAGIC, Ordering::Release);
        let control = Arc::new(control);

        let node = Node::new(agent_id, clamp_config(config, capacity), SCHEME);
        node.set_hub(true);
        node.set_listen_url(format!("{SCHEME}://{name}"));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(16);
        {
            let (control, stop, name) = (control.clone(), stop.clone(), name.clone());
            std::thread::Builder::new()
                .name("hw-shm-accept".into())
                .spawn(move || accept_thread(&control, &name, &stop, &tx))?;
        }
        {
            let name = name.clone();
            node.on_close(move || {
                stop.store(true, Ordering::Release);
                if let Some(h) = control.control() {
                    h.doorbell.fetch_add(1, Ordering::SeqCst);
                    futex_wake(&h.doorbell);
                }
                unlink_os_id(&control_os_id(&name));
                lock.release();
            });
        }
        info!(name, agent = %node.agent_id(), capacity, "shared-memory listener up");
        let cfg = node.config().clone();
        node.spawn_accept_loop(ShmAcceptor(rx), move |node, conn| {
            match make_link(conn, cfg.max_message_size, cfg.compression_threshold) {
                Ok(link) => node.accept_link(link),
                Err(e) => warn!(error = %e, "cannot start a shared-memory link"),
            }
        });
        Ok(node)
    }

    /// An agent connected to the hub on `shm://NAME` (`name` may be `NAME` or `shm://NAME`);
    /// returns after the handshake. If the link drops later, the node redials.
    pub async fn connect(
        name: &str,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
    ) -> Result<Node, TransportError> {
        let name = parse_name(name)?;
        let capacity = {
            let control = open_control(&name)?;
            control.1
        };
        let config = clamp_config(config, capacity);
        let timeout = config.connection_timeout();
        let (max, threshold) = (config.max_message_size, config.compression_threshold);
        Node::dial(agent_id, config, SCHEME, move || {
            let name = name.clone();
            async move {
                let conn = dial_once(&name, timeout).await?;
                make_link(conn, max, threshold)
            }
        })
        .await
    }

    /// Dials `name` and returns the link without the protocol handshake (for tests and tools
    /// that speak the wire protocol themselves).
    pub async fn dial_link(
        name: &str,
        config: &TransportConfig,
    ) -> Result<hivewire_core::Link<ShmTx, ShmRx>, TransportError> {
        let name = parse_name(name)?;
        let capacity = open_control(&name)?.1;
        let config = clamp_config(config.clone(), capacity);
        let conn = dial_once(&name, config.connection_timeout()).await?;
        make_link(conn, config.max_message_size, config.compression_threshold)
    }

    /// Removes the segments of `name` if no live listener owns it; returns how many were
    /// removed. A live listener's name is refused with `ConnectionError("address in use …")`.
    pub fn cleanup(name: &str) -> Result<usize, TransportError> {
        let name = parse_name(name)?;
        let lock = ListenerLock::acquire(&name)?.ok_or_else(|| {
            TransportError::ConnectionError(format!("address in use: a live listener owns {SCHEME}://{name}"))
        })?;
        let removed = remove_segments_of(&name);
        lock.release();
        Ok(removed)
    }
}

/// A shared-memory endpoint found on this host by [`SharedMemoryTransport::endpoints`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShmEndpoint {
    /// The endpoint name (`NAME` of `shm://NAME`).
    pub name: String,
    /// The listener's PID as its control segment records it (a hint: PIDs are reused).
    pub listener_pid: Option<u32>,
    /// Whether a live process holds the endpoint's lock (the kernel drops it at death).
    pub live: bool,
    /// The ring capacity of its connections, from the control segment.
    pub ring_capacity: Option<usize>,
}

impl SharedMemoryTransport {
    /// Every endpoint of this host that has a lock file or a control segment, live or left by
    /// a dead process (which the next `listen` or [`cleanup`](Self::cleanup) removes), sorted by
    /// name.
    pub fn endpoints() -> Vec<ShmEndpoint> {
        let mut names = std::collections::BTreeSet::new();
        if let Ok(dir) = std::fs::read_dir(segment::lock_dir()) {
            for e in dir.flatten() {
                let f = e.file_name().to_string_lossy().into_owned();
                if let Some(n) = f.strip_suffix(".lock") {
                    names.insert(n.to_string());
                }
            }
        }
        if let Ok(dir) = std::fs::read_dir("/dev/shm") {
            for e in dir.flatten() {
                let f = e.file_name().to_string_lossy().into_owned();
                if let Some(n) = f.strip_prefix("hw-").filter(|n| !n.contains('.')) {
                    names.insert(n.to_string());
                }
            }
        }
        names
            .into_iter()
            .filter(|n| parse_name(n).is_ok())
            .map(|name| {
                let live = LockProbe::open(&name).is_some_and(|p| p.held());
                let header = Segment::open(&control_os_id(&name)).ok().and_then(|seg| {
                    let h = seg.control()?;
                    (h.magic.load(Ordering::Acquire) == CONTROL_MAGIC).then(|| {
                        (
                            h.listener_pid.load(Ordering::Relaxed),
                            h.ring_capacity.load(Ordering::Relaxed) as usize,
                        )
                    })
                });
                ShmEndpoint {
                    name,
                    listener_pid: header.map(|h| h.0),
                    live,
                    ring_capacity: header.map(|h| h.1),
                }
            })
            .collect()
    }
}

/// Maps a listener's control segment after checking that the listener lives; returns it with
/// its ring capacity.
fn open_control(name: &str) -> Result<(Segment, usize, LockProbe), TransportError> {
    let no_listener = || TransportError::ConnectionError(format!("no live listener on {SCHEME}://{name}"));
    let probe = LockProbe::open(name).filter(LockProbe::held).ok_or_else(no_listener)?;
    let control = Segment::open(&control_os_id(name)).map_err(|_| no_listener())?;
    let header = control.control().ok_or_else(no_listener)?;
    if header.magic.load(Ordering::Acquire) != CONTROL_MAGIC
        || header.version.load(Ordering::Relaxed) != SEGMENT_VERSION
        || header.slot_count.load(Ordering::Relaxed) as usize != SLOT_COUNT
        || control.len() < CONTROL_LEN
    {
        return Err(TransportError::ConnectionError(format!(
            "{SCHEME}://{name} is not a hivewire listener of this version"
        )));
    }
    let capacity = usize::try_from(header.ring_capacity.load(Ordering::Relaxed))
        .ok()
        .filter(|c| c.is_power_of_two() && (MIN_RING_BUFFER_SIZE..=hivewire_ring::MAX_CAPACITY).contains(c))
        .ok_or_else(|| TransportError::ConnectionError("corrupt control segment".into()))?;
    Ok((control, capacity, probe))
}

/// One connection attempt of a client.
async fn dial_once(name: &str, timeout: Duration) -> Result<Conn, TransportError> {
    let deadline = Instant::now() + timeout;
    let (control, capacity, probe) = open_control(name)?;
    let conn_id = fastrand::u64(..);
    let mut seg = Segment::create(&conn_os_id(name, conn_id), conn_layout(capacity).2)?;
    seg.init_rings(capacity)?;
    let header = seg.conn().ok_or_else(|| TransportError::ConnectionError("segment too small".into()))?;
    header.version.store(SEGMENT_VERSION, Ordering::Relaxed);
    header.state.store(CONN_OFFERED, Ordering::Relaxed);
    header.ring_capacity.store(capacity as u64, Ordering::Relaxed);
    header.client_pid.store(std::process::id(), Ordering::Relaxed);
    header.magic.store(CONN_MAGIC, Ordering::Release);
    // SAFETY: the rings are in `seg`, which moves into the `Conn` with the handles (or is
    // dropped after them on error); the client alone produces C2S and consumes S2C.
    let (producer, consumer) = unsafe { seg.attach(C2S)? };

    let give_up = |seg: &Segment, e: TransportError| -> TransportError {
        if let Some(h) = seg.conn() {
            let _ =
                h.state.compare_exchange(CONN_OFFERED, CONN_ABANDONED, Ordering::AcqRel, Ordering::Acquire);
        }
        e
    };
    let ctrl = control
        .control()
        .ok_or_else(|| TransportError::ConnectionError("control segment too small".into()))?;
    // Claim a slot and publish the offer.
    'publish: loop {
        for i in 0..SLOT_COUNT {
            let Some(slot) = control.slot(i) else { break };
            if slot
                .state
                .compare_exchange(SLOT_FREE, SLOT_CLAIMED, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                slot.conn_id.store(conn_id, Ordering::Relaxed);
                slot.client_pid.store(std::process::id(), Ordering::Relaxed);
                if slot
                    .state
                    .compare_exchange(SLOT_CLAIMED, SLOT_READY, Ordering::Release, Ordering::Relaxed)
                    .is_ok()
                {
                    break 'publish;
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(give_up(&seg, TransportError::Timeout));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    ctrl.doorbell.fetch_add(1, Ordering::SeqCst);
    futex_wake(&ctrl.doorbell);
    // Wait for the listener to take it.
    let mut n = 0u32;
    loop {
        if header.state.load(Ordering::Acquire) == CONN_ACCEPTED {
            break;
        }
        let expired = Instant::now() >= deadline;
        n = n.wrapping_add(1);
        if expired || (n.is_multiple_of(64) && !probe.held()) {
            let e = if expired {
                TransportError::Timeout
            } else {
                TransportError::ConnectionError(format!("the listener of {SCHEME}://{name} died"))
            };
            if header
                .state
                .compare_exchange(CONN_OFFERED, CONN_ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
                && header.state.load(Ordering::Acquire) == CONN_ACCEPTED
            {
                break;
            }
            return Err(e);
        }
        if n < 64 {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    let server_pid = header.server_pid.load(Ordering::Acquire);
    // The listener unlinked the name when it mapped the segment.
    seg.set_owner(false);
    Ok(Conn {
        producer,
        consumer,
        produce_dir: C2S,
        peer_pid: server_pid,
        probe: Some(probe),
        peer: peer_info(name, server_pid),
        seg: Arc::new(seg),
    })
}

/// Maps an offered connection segment, unlinks its name and attaches the server's ring ends.
fn accept_conn(name: &str, conn_id: u64) -> Result<Conn, TransportError> {
    let os_id = conn_os_id(name, conn_id);
    let mut seg = Segment::open(&os_id)?;
    seg.unlink();
    let header =
        seg.conn().ok_or_else(|| TransportError::ConnectionError("connection segment too small".into()))?;
    if header.magic.load(Ordering::Acquire) != CONN_MAGIC
        || header.version.load(Ordering::Relaxed) != SEGMENT_VERSION
    {
        return Err(TransportError::ConnectionError(format!("{os_id} is not a connection segment")));
    }
    header.server_pid.store(std::process::id(), Ordering::Relaxed);
    let client_pid = header.client_pid.load(Ordering::Relaxed);
    // SAFETY: `seg` moves into the `Conn` with the handles; the server alone produces S2C and
    // consumes C2S.
    let (producer, consumer) = unsafe { seg.attach(S2C)? };
    if header
        .state
        .compare_exchange(CONN_OFFERED, CONN_ACCEPTED, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return Err(TransportError::ConnectionError(format!("{os_id}: the client gave up")));
    }
    Ok(Conn {
        producer,
        consumer,
        produce_dir: S2C,
        peer_pid: client_pid,
        probe: None,
        peer: peer_info(name, client_pid),
        seg: Arc::new(seg),
    })
}

/// The listener's accept thread: sleeps on the doorbell, takes ready slots.
fn accept_thread(control: &Segment, name: &str, stop: &AtomicBool, tx: &mpsc::Sender<Conn>) {
    let Some(header) = control.control() else { return };
    let mut claimed_since: [Option<Instant>; SLOT_COUNT] = [None; SLOT_COUNT];
    while !stop.load(Ordering::Acquire) && !tx.is_closed() {
        let bell = header.doorbell.load(Ordering::SeqCst);
        for (i, since) in claimed_since.iter_mut().enumerate() {
            let Some(slot) = control.slot(i) else { return };
            match slot.state.load(Ordering::Acquire) {
                SLOT_READY => {
                    *since = None;
                    let conn_id = slot.conn_id.load(Ordering::Relaxed);
                    if slot
                        .state
                        .compare_exchange(SLOT_READY, SLOT_FREE, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                    {
                        match accept_conn(name, conn_id) {
                            Ok(conn) => {
                                if tx.blocking_send(conn).is_err() {
                                    return;
                                }
                            }
                            Err(e) => warn!(error = %e, "refused a shared-memory connection"),
                        }
                    }
                }
                SLOT_CLAIMED => {
                    let t = *since.get_or_insert_with(Instant::now);
                    if t.elapsed() > STALE_CLAIM {
                        let _ = slot.state.compare_exchange(
                            SLOT_CLAIMED,
                            SLOT_FREE,
                            Ordering::AcqRel,
                            Ordering::Relaxed,
                        );
                        *since = None;
                    }
                }
                _ => *since = None,
            }
        }
        futex_wait(&header.doorbell, bell, ACCEPT_WAIT);
    }
}

/// The accept thread's output as the engine's [`Acceptor`].
struct ShmAcceptor(mpsc::Receiver<Conn>);

impl Acceptor for ShmAcceptor {
    type Conn = Conn;
    async fn accept(&mut self) -> std::io::Result<Option<Conn>> {
        Ok(self.0.recv().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Bytes, BytesMut};
    use hivewire_codec::Compression;
    use hivewire_codec::{CodecConfig, FrameCodec};
    use hivewire_core::{Link, LinkRx, LinkSettings, LinkTx, Message, MessageType};
    use hivewire_ring::Producer;
    use link::{copy_out, LARGE_RECORD};

    const CAP: usize = 64 * 1024;

    /// A connection segment in this process, unlinked at once; returns the segment, the
    /// server-side link, and the raw client ends.
    fn server_link() -> (Link<ShmTx, ShmRx>, Producer, hivewire_ring::Consumer, Arc<Segment>) {
        server_link_of(CAP)
    }

    fn server_link_of(cap: usize) -> (Link<ShmTx, ShmRx>, Producer, hivewire_ring::Consumer, Arc<Segment>) {
        let name = format!("unit-{}-{:08x}", std::process::id(), fastrand::u32(..));
        let mut seg = Segment::create(&conn_os_id(&name, 1), conn_layout(cap).2).unwrap();
        seg.unlink();
        seg.init_rings(cap).unwrap();
        seg.conn().unwrap().ring_capacity.store(cap as u64, Ordering::Release);
        let seg = Arc::new(seg);
        // SAFETY: `seg` outlives the handles (it is returned with them and dropped last by the
        // tests); one producer and one consumer per ring.
        let (p_client, c_client) = unsafe { seg.attach(C2S) }.unwrap();
        // SAFETY: as above, the other ends.
        let (producer, consumer) = unsafe { seg.attach(S2C) }.unwrap();
        let conn = Conn {
            producer,
            consumer,
            produce_dir: S2C,
            peer_pid: 0,
            probe: None,
            peer: PeerInfo::default(),
            seg: seg.clone(),
        };
        (make_link(conn, (cap / 2).max(1 << 20), 4096).unwrap(), p_client, c_client, seg)
    }

    fn frame_len(m: &Message) -> usize {
        let mut b = BytesMut::new();
        FrameCodec::new(CodecConfig::default()).encode_into(m, &mut b).unwrap();
        b.len()
    }

    #[tokio::test]
    async fn a_frame_of_exactly_the_largest_record_passes_one_byte_more_is_refused() {
        let (mut link, _p, mut client_rx, seg) = server_link();
        let max = hivewire_ring::max_record_len(CAP);
        let base = Message::event("a", "t", &()).unwrap().with_payload_bytes(Bytes::from(vec![1u8; 1000]));
        let fit_len = 1000 + max - frame_len(&base);
        let fit = base.clone().with_payload_bytes(Bytes::from(vec![7u8; fit_len]));
        assert_eq!(frame_len(&fit), max);
        link.tx.send_batch(&mut vec![fit.clone()]).await.unwrap();
        let record = client_rx.read().unwrap().expect("a record");
        assert_eq!(record.len(), max);
        drop(record);
        let over = base.with_payload_bytes(Bytes::from(vec![7u8; fit_len + 1]));
        match link.tx.send_batch(&mut vec![over]).await {
            Err(TransportError::MessageTooLarge { size, max: m }) => assert_eq!((size, m), (max + 1, max)),
            other => panic!("expected MessageTooLarge, got {other:?}"),
        }
        drop(link);
        drop(client_rx);
        drop(seg);
    }

    /// A spinning receive gives the CPU away only when the application's last send on the link
    /// came from another thread (see `ShmRx::yields_cpu`).
    #[tokio::test]
    async fn a_spinning_receive_gives_the_cpu_away_only_to_senders_on_other_threads() {
        let (link, _p, _c, seg) = server_link();
        let Link { tx, mut rx, .. } = link;
        let m = Message::event("a", "t", &()).unwrap();
        assert!(rx.yields_cpu(), "before any send, nothing says the sender runs here");
        let mut tx = tx;
        tx.send_batch(&mut vec![m.clone()]).await.unwrap();
        assert!(!rx.yields_cpu(), "the last send came from this thread");
        let mut tx = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                tx.send_batch(&mut vec![m]).await.unwrap();
            });
            tx
        })
        .join()
        .unwrap();
        assert!(rx.yields_cpu(), "the last send came from another thread");
        let published = |seg: &Segment, d: usize| seg.dir(d).unwrap().consumer_yields.load(Ordering::Relaxed);
        assert_eq!(published(&seg, C2S), 1, "this side tells the peer it yields");
        tx.send_batch(&mut vec![Message::event("a", "t", &()).unwrap()]).await.unwrap();
        assert!(!rx.yields_cpu(), "back on this thread");
        assert_eq!(published(&seg, C2S), 0);
        // The peer (the consumer of S2C) says its application sends from other threads.
        seg.dir(S2C).unwrap().consumer_yields.store(1, Ordering::Relaxed);
        assert!(rx.yields_cpu(), "the peer's sending thread may need this CPU too");
        drop((tx, rx));
        drop(seg);
    }

    /// Payloads from `STREAMING_COPY_MIN` up are copied into the record with non-temporal
    /// stores: the record is still exactly the codec's frame, at the threshold and past it.
    #[tokio::test]
    async fn a_payload_copied_past_the_caches_arrives_exactly() {
        let cap = 8 << 20;
        let (mut link, _p, mut client_rx, _seg) = server_link_of(cap);
        let mut codec = FrameCodec::new(CodecConfig { max_message_size: cap / 2, ..CodecConfig::default() });
        let min = hivewire_ring::STREAMING_COPY_MIN;
        for len in [min - 1, min, min + 1, min + 4093, 3 * min + 77] {
            let payload =
                Bytes::from((0..len).map(|i| (i * 131 + len) as u8 ^ (i >> 12) as u8).collect::<Vec<u8>>());
            let m = Message::event("a", "t", &()).unwrap().with_payload_bytes(payload);
            let mut want = BytesMut::new();
            codec.encode_into(&m, &mut want).unwrap();
            link.tx.send_batch(&mut vec![m]).await.unwrap();
            assert!(link.tx.last_was_direct());
            let record = client_rx.read().unwrap().expect("a record");
            assert!(record[..] == want[..], "payload of {len} bytes: the record differs");
        }
    }

    /// Messages whose frames take the direct path (payload copied straight into the record)
    /// and the ordinary one, around every MessagePack `bin` size boundary.
    fn sample_messages() -> Vec<Message> {
        let mut out = Vec::new();
        for len in [0, 1, 255, 256, 2047, 2048, 2049, 65_535, 65_536, 65_537, 200_000] {
            let payload = Bytes::from((0..len).map(|i| (i * 7 + len) as u8).collect::<Vec<u8>>());
            out.push(Message::event("a", "some/topic", &()).unwrap().with_payload_bytes(payload.clone()));
            let mut req = Message::new("agent-1", MessageType::Request { method: "echo".into() })
                .with_payload_bytes(payload.clone());
            req.destination = Some("hub".into());
            req.headers.insert("k".into(), "v".repeat(300));
            req.sequence = u64::MAX;
            out.push(req.clone());
            out.push(Message::response_bytes("hub", &req, payload));
        }
        out
    }

    #[tokio::test]
    async fn every_record_holds_exactly_the_codecs_frame() {
        let cap = 1 << 20;
        let (mut link, _p, mut client_rx, _seg) = server_link_of(cap);
        let mut codec = FrameCodec::new(CodecConfig { max_message_size: 1 << 20, ..CodecConfig::default() });
        for m in sample_messages() {
            let mut want = BytesMut::new();
            codec.encode_into(&m, &mut want).unwrap();
            link.tx.send_batch(&mut vec![m.clone()]).await.unwrap();
            assert_eq!(link.tx.last_was_direct(), m.payload.len() >= link::DIRECT_PAYLOAD);
            let record = client_rx.read().unwrap().expect("a record");
            assert!(record[..] == want[..], "payload of {} bytes: the record differs", m.payload.len());
        }
    }

    #[tokio::test]
    async fn compressed_frames_take_the_codecs_path() {
        let cap = 1 << 20;
        let (mut link, _p, mut client_rx, _seg) = server_link_of(cap);
        let settings = LinkSettings { compression: Compression::Zstd, accept_gzip: false, accept_zstd: true };
        link.tx.configure(&settings);
        let config =
            CodecConfig { max_message_size: 1 << 20, compression_threshold: 4096, ..CodecConfig::default() };
        let mut codec = FrameCodec::new(config);
        codec.set_compression(Compression::Zstd);
        for len in [3000, 5000, 100_000] {
            let m = Message::event("a", "t", &()).unwrap().with_payload_bytes(Bytes::from(vec![9u8; len]));
            let mut want = BytesMut::new();
            codec.encode_into(&m, &mut want).unwrap();
            link.tx.send_batch(&mut vec![m]).await.unwrap();
            let record = client_rx.read().unwrap().expect("a record");
            assert!(record[..] == want[..], "payload of {len} bytes: the record differs");
            assert_eq!(link.tx.last_was_direct(), len < 4096, "the direct path never compresses");
            assert_eq!(record[3] != 0, len > 4096, "compressed exactly above the threshold");
        }
    }

    #[tokio::test]
    async fn a_receiver_wakes_a_producer_that_waits_for_room() {
        let (mut link, mut client_tx, _c, seg) = server_link();
        let m = Message::event("a", "t", &1u64).unwrap();
        let mut b = BytesMut::new();
        FrameCodec::new(CodecConfig::default()).encode_into(&m, &mut b).unwrap();
        client_tx.try_push(&b).unwrap();
        client_tx.try_push(&b).unwrap();
        let (incoming, outgoing) = (seg.dir(C2S).unwrap(), seg.dir(S2C).unwrap());
        // No one waits: a release wakes no one.
        let seq = outgoing.seq.load(Ordering::SeqCst);
        link.rx.recv().await.unwrap().unwrap();
        assert_eq!(outgoing.seq.load(Ordering::SeqCst), seq);
        // The producer announced that it waits: the release clears the flag and bumps the word
        // the producer's waker thread sleeps on.
        incoming.space_wanted.store(1, Ordering::SeqCst);
        link.rx.recv().await.unwrap().unwrap();
        assert_eq!(incoming.space_wanted.load(Ordering::SeqCst), 0);
        assert_eq!(outgoing.seq.load(Ordering::SeqCst), seq.wrapping_add(1));
    }

    /// `recv_lent` lends an uncompressed frame's payload where it lies in the ring and holds
    /// its record until the lent message is dropped (then wakes a producer waiting for room);
    /// a compressed frame arrives decoded with a copy; a malformed record ends the link.
    #[tokio::test]
    async fn a_lent_payload_lies_in_the_ring_and_holds_its_record_until_dropped() {
        let (mut link, mut client_tx, _c, seg) = server_link();
        let (incoming, outgoing) = (seg.dir(C2S).unwrap(), seg.dir(S2C).unwrap());
        let mut codec = FrameCodec::new(CodecConfig::default());
        let mut frame = |m: &Message| {
            let mut b = BytesMut::new();
            codec.encode_into(m, &mut b).unwrap();
            b
        };
        // Two records of 25 KB fit in the 64 KiB ring; a third only once one is released.
        let sent: Vec<Message> = (1..=3u8)
            .map(|i| {
                let mut m =
                    Message::event("a", "t", &()).unwrap().with_payload_bytes(Bytes::from(vec![i; 25_000]));
                m.headers.insert("n".into(), i.to_string());
                m
            })
            .collect();
        let frames: Vec<BytesMut> = sent.iter().map(&mut frame).collect();
        client_tx.try_push(&frames[0]).unwrap();
        client_tx.try_push(&frames[1]).unwrap();

        let lent = link.rx.recv_lent().await.unwrap().expect("a message");
        assert!(lent.is_lent());
        assert_eq!(lent.payload(), &sent[0].payload[..]);
        assert!(lent.message().payload.is_empty());
        assert_eq!(Message { payload: sent[0].payload.clone(), ..lent.message().clone() }, sent[0]);
        let (base, at) = (seg.as_ptr() as usize, lent.payload().as_ptr() as usize);
        assert!(at >= base && at + 25_000 <= base + seg.len(), "the payload is not in the segment");

        // Held: its space is not the producer's yet.
        assert!(client_tx.try_push(&frames[2]).is_err(), "a lent record was released");
        let seq = outgoing.seq.load(Ordering::SeqCst);
        incoming.space_wanted.store(1, Ordering::SeqCst);
        drop(lent);
        assert_eq!(incoming.space_wanted.load(Ordering::SeqCst), 0, "the waiting producer was not told");
        assert_eq!(outgoing.seq.load(Ordering::SeqCst), seq.wrapping_add(1));
        client_tx.try_push(&frames[2]).expect("room once the lent message is dropped");

        // Owned on request, and mixed with the copying receive.
        let second = link.rx.try_recv_lent().unwrap().expect("the second message");
        assert_eq!(second.into_owned(), sent[1]);
        assert_eq!(link.rx.recv().await.unwrap().expect("the third message"), sent[2]);
        assert!(link.rx.try_recv_lent().unwrap().is_none(), "the ring is empty");

        // A compressed frame cannot be lent: it is decoded with a copy.
        link.rx.configure(&LinkSettings {
            compression: Compression::None,
            accept_gzip: false,
            accept_zstd: true,
        });
        let mut zstd = FrameCodec::new(CodecConfig { compression_threshold: 0, ..CodecConfig::default() });
        zstd.set_compression(Compression::Zstd);
        let mut z = BytesMut::new();
        zstd.encode_into(&sent[0], &mut z).unwrap();
        assert_ne!(z[3], 0, "compressed");
        client_tx.try_push(&z).unwrap();
        let copied = link.rx.recv_lent().await.unwrap().expect("the compressed message");
        assert!(!copied.is_lent());
        assert_eq!(copied.payload(), &sent[0].payload[..]);
        assert_eq!(copied.into_owned(), sent[0]);

        // A record that is not one frame ends the link with an error, and nothing after it.
        let mut short = frames[0].clone();
        short.truncate(short.len() - 1);
        client_tx.try_push(&short).unwrap();
        client_tx.try_push(&frames[1]).unwrap();
        match link.rx.recv_lent().await {
            Err(TransportError::ConnectionError(why)) => assert!(why.contains("malformed record"), "{why}"),
            other => panic!("expected a malformed-record error, got {other:?}"),
        }
        assert!(link.rx.recv_lent().await.unwrap().is_none());
        assert!(link.rx.recv().await.unwrap().is_none());
    }

    #[test]
    fn large_record_buffers_are_reused_once_their_messages_are_dropped() {
        let (mut rbuf, mut pool) = (BytesMut::new(), Vec::new());
        let record = vec![5u8; LARGE_RECORD + 10];
        let first = copy_out(&mut rbuf, &mut pool, &record).freeze();
        let at = first.as_ptr();
        let kept = first.slice(100..200);
        drop(first);
        // Still referenced: a second buffer.
        let second = copy_out(&mut rbuf, &mut pool, &record);
        assert_ne!(second.as_ptr(), at);
        assert_eq!(pool.len(), 2);
        drop((kept, second));
        let third = copy_out(&mut rbuf, &mut pool, &record);
        assert_eq!(third.as_ptr(), at, "the first buffer is reused");
        assert_eq!(&third[..], &record[..]);
        assert_eq!(pool.len(), 2);
        // Small records share the stream buffer instead.
        let small = copy_out(&mut rbuf, &mut pool, b"abc");
        assert_eq!(&small[..], b"abc");
        assert_eq!(pool.len(), 2);
    }

    /// Records from `STREAMING_COPY_MIN` up are copied out with non-temporal stores: exact
    /// bytes, at the threshold and past it, and the pooled buffer is still reused.
    #[test]
    fn records_copied_out_past_the_caches_arrive_exactly_and_reuse_their_buffer() {
        let (mut rbuf, mut pool) = (BytesMut::new(), Vec::new());
        let min = hivewire_ring::STREAMING_COPY_MIN;
        for len in [min, min + 1, min + 4093, 2 * min + 77] {
            let record: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8 ^ (i >> 10) as u8).collect();
            let out = copy_out(&mut rbuf, &mut pool, &record);
            assert!(out[..] == record[..], "record of {len} bytes differs");
            let ptr = out.as_ptr();
            drop(out);
            let again = copy_out(&mut rbuf, &mut pool, &record);
            assert_eq!(again.as_ptr(), ptr, "the pooled buffer is reused");
            assert!(again[..] == record[..], "record of {len} bytes differs the second time");
        }
        assert!(rbuf.is_empty(), "large records never go into the stream buffer");
    }

    #[tokio::test]
    async fn garbage_from_the_peer_is_a_typed_error_and_ends_the_link() {
        let (mut link, mut client_tx, _c, _seg) = server_link();
        client_tx.try_push(b"not a frame at all").unwrap();
        assert!(matches!(link.rx.recv().await, Err(TransportError::Codec(_))));
        assert!(matches!(link.rx.recv().await, Ok(None)), "nothing after an error");
        let mut batch = vec![Message::event("s", "t", &1u64).unwrap()];
        assert!(link.tx.send_batch(&mut batch).await.is_err(), "the sending half knows the link is over");
    }

    #[tokio::test]
    async fn a_parked_receiver_is_woken_and_close_is_eof() {
        let (mut link, mut client_tx, _c, seg) = server_link();
        let d = seg.dir(C2S).unwrap();
        let m = Message::event("a", "t", &5u64).unwrap();
        let mut b = BytesMut::new();
        FrameCodec::new(CodecConfig::default()).encode_into(&m, &mut b).unwrap();
        let recv = tokio::spawn(async move {
            let got = link.rx.recv().await.unwrap().unwrap();
            let eof = link.rx.recv().await;
            (got, eof)
        });
        // Let the receiver park, then publish as a real peer's ShmTx does.
        tokio::time::sleep(Duration::from_millis(50)).await;
        client_tx.try_push(&b).unwrap();
        d.seq.fetch_add(1, Ordering::SeqCst);
        if d.sleeping.load(Ordering::SeqCst) != 0 {
            futex_wake(&d.seq);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        d.producer_closed.store(1, Ordering::Release);
        d.seq.fetch_add(1, Ordering::SeqCst);
        futex_wake(&d.seq);
        let (got, eof) = tokio::time::timeout(Duration::from_secs(5), recv).await.unwrap().unwrap();
        assert_eq!(got.payload_as::<u64>().unwrap(), 5);
        assert!(matches!(eof, Ok(None)), "{eof:?}");
    }

    #[tokio::test]
    async fn a_parked_receive_dropped_withdraws_its_announcement() {
        let (mut link, _p, _c, seg) = server_link();
        let d = seg.dir(C2S).unwrap();
        {
            let recv = link.rx.recv();
            tokio::pin!(recv);
            // Poll until the receiver has spun out and parked (nothing is ever sent).
            let mut polls = 0u32;
            while d.sleeping.load(Ordering::SeqCst) == 0 {
                tokio::select! {
                    biased;
                    r = &mut recv => panic!("nothing was sent, got {r:?}"),
                    _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                }
                polls += 1;
                assert!(polls < 100_000, "the receiver never parked");
            }
        }
        assert_eq!(d.sleeping.load(Ordering::SeqCst), 0, "the producer would keep waking a task that left");
    }

    #[tokio::test]
    async fn a_corrupt_ring_breaks_only_the_link() {
        let (mut link, _p, _c, seg) = server_link();
        let (c2s, _, _) = conn_layout(CAP);
        // Scribble over the tail position of the client-to-server ring (offset 128 of a ring).
        let tail = seg.as_ptr().wrapping_add(c2s + 128).cast::<std::sync::atomic::AtomicU64>();
        // SAFETY: in bounds of the live mapping and 8-byte aligned; the ring's tail is an
        // atomic, so an atomic store races with nothing.
        unsafe { (*tail).store(12345, Ordering::Release) };
        let d = seg.dir(C2S).unwrap();
        d.seq.fetch_add(1, Ordering::SeqCst);
        futex_wake(&d.seq);
        match tokio::time::timeout(Duration::from_secs(5), link.rx.recv()).await {
            Ok(Err(TransportError::ConnectionError(m))) => assert!(m.contains("corrupt"), "{m}"),
            other => panic!("expected a corrupt-ring error, got {other:?}"),
        }
        // Our sending side now fails instead of writing into a dead link.
        let mut batch = vec![Message::event("s", "t", &1u64).unwrap()];
        assert!(matches!(link.tx.send_batch(&mut batch).await, Err(TransportError::ConnectionError(_))));
    }
}

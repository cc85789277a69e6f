//! One connection as an engine [`Link`]: the sending half writes frames into the outgoing ring
//! (a large payload straight from the message into the record) and wakes the peer; the
//! receiving half copies records out of the incoming ring inside its async `recv`, spins for a
//! while adapted to recent traffic when the ring is empty, and then parks: a waker thread per
//! link sleeps on the shared futex word for it and wakes the task.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hivewire_codec::{CodecConfig, Compression, FrameCodec, InPlace, ENVELOPE_ALLOWANCE, HEADER_LEN};
use hivewire_core::{Link, LinkRx, LinkSettings, LinkTx, Message, PeerInfo, TransportError};
use hivewire_ring::{
    copy_streaming, copy_streaming_uninit, Consumer, Producer, ReadGuard, RingError, STREAMING_COPY_MIN,
};
use tokio::sync::Notify;
use tracing::debug;

use crate::segment::{futex_wait, futex_wake, pid_alive, DirState, LockProbe, Segment};

/// Longest an empty `recv` keeps polling the ring before it parks (the adaptive limit starts
/// here and returns here after each wait that spinning served).
pub(crate) const MAX_SPIN: Duration = Duration::from_micros(50);
/// Below this the spin limit drops to zero (after repeated waits that spinning did not serve).
const MIN_SPIN: Duration = Duration::from_micros(2);
/// Polling without yielding, between yields to other threads and tasks.
const SPIN_CHUNK: Duration = Duration::from_micros(2);
/// Longest futex sleep of a link's waker thread; between sleeps it checks that the peer lives.
pub(crate) const IDLE_WAIT: Duration = Duration::from_millis(100);
/// Payloads at least this large are copied from the message straight into the ring record
/// instead of being encoded into a buffer first (see [`ShmTx::stage`]).
pub(crate) const DIRECT_PAYLOAD: usize = 2048;
/// Smallest allocation of the receive buffer (small records share one).
const RBUF_MIN: usize = 64 * 1024;
/// Records at least this large are copied into a pooled buffer of their own.
pub(crate) const LARGE_RECORD: usize = 256 * 1024;
/// Large-record buffers kept for reuse per link.
const POOL_LEN: usize = 3;
/// Full-ring retries that only yield before the sender waits to be told of room.
const FULL_YIELDS: u32 = 64;
/// Longest wait for room before the sender checks again anyway.
const FULL_WAIT: Duration = Duration::from_millis(10);
/// Set in `Shared::armed` while the receiving task is parked; the low 32 bits are the `seq`
/// value it saw.
const ARMED: u64 = 1 << 32;

/// A connection whose rings are attached, before it becomes a link.
pub(crate) struct Conn {
    pub producer: Producer,
    pub consumer: Consumer,
    /// Direction index this side produces into (the other one it consumes).
    pub produce_dir: usize,
    pub peer_pid: u32,
    /// The listener's lock file (client side only): its release means the listener died.
    pub probe: Option<LockProbe>,
    pub peer: PeerInfo,
    /// Keeps the mapping alive; declared last so the ring handles go first.
    pub seg: Arc<Segment>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("peer_pid", &self.peer_pid).field("seg", &self.seg).finish()
    }
}

/// State shared by the two halves and the waker thread of one link (process-local).
#[derive(Debug, Default)]
struct Shared {
    /// The link is over: EOF, an error or a dead peer.
    dead: AtomicBool,
    /// The receiving half was dropped: the waker thread must stop.
    stop: AtomicBool,
    /// `ARMED | seq` while the receiving task is parked, else 0.
    armed: AtomicU64,
    /// Wakes the parked receiving task.
    wake: Notify,
    /// The sending task waits for room in the outgoing ring (it set `space_wanted` there).
    tx_waiting: AtomicBool,
    /// Wakes the sending task waiting for room.
    space: Notify,
    /// Why the waker thread gave up on the peer.
    error: Mutex<Option<String>>,
    /// [`thread_tag`] of the thread that last wrote into the outgoing ring (0: none yet).
    last_writer: AtomicUsize,
}

/// A number that tells the calling thread from every other thread alive (the address of one of
/// its thread-locals; never 0). A thread started after another ended may get the ended one's
/// number, which at worst makes one link's spin skip its `sched_yield` until the next send.
fn thread_tag() -> usize {
    thread_local!(static TAG: u8 = const { 0 });
    TAG.with(|t| std::ptr::from_ref(t) as usize)
}

fn dir(seg: &Segment, d: usize) -> Result<&DirState, TransportError> {
    seg.dir(d).ok_or_else(|| TransportError::ConnectionError("connection segment too small".into()))
}

/// Wakes the consumer of `d` if it sleeps. Called after every commit.
fn notify(d: &DirState) {
    // Pairs with the reader's `sleeping` store / `seq` load (see `read_loop`): either we see
    // it asleep and wake it, or it sees our record before it sleeps.
    d.seq.fetch_add(1, Ordering::SeqCst);
    if d.sleeping.load(Ordering::SeqCst) != 0 {
        futex_wake(&d.seq);
    }
}

/// Builds the link of a connection and starts its reader thread.
pub(crate) fn make_link(
    conn: Conn,
    max_message_size: usize,
    compression_threshold: usize,
) -> Result<Link<ShmTx, ShmRx>, TransportError> {
    let Conn { producer, consumer, produce_dir, peer_pid, probe, peer, seg } = conn;
    let consume_dir = 1 - produce_dir;
    dir(&seg, produce_dir)?;
    dir(&seg, consume_dir)?;
    let config = CodecConfig { max_message_size, compression_threshold, ..CodecConfig::default() };
    let shared = Arc::new(Shared::default());
    let waker = Waker { shared: shared.clone(), dir: consume_dir, peer_pid, probe, seg: seg.clone() };
    std::thread::Builder::new().name("hw-shm-wake".into()).spawn(move || waker.run())?;
    Ok(Link {
        tx: ShmTx {
            producer,
            codec: FrameCodec::new(config.clone()),
            scratch: BytesMut::with_capacity(4096),
            prefix: 0,
            bin: [0; 5],
            bin_len: 0,
            payload: Bytes::new(),
            frame_len: 0,
            dir: produce_dir,
            shared: shared.clone(),
            closed: false,
            seg: seg.clone(),
        },
        rx: ShmRx {
            consumer,
            codec: FrameCodec::new(config),
            rbuf: BytesMut::new(),
            pool: Vec::new(),
            after_large: false,
            empty_since: None,
            spun_out: false,
            published_yield: false,
            spin_limit: MAX_SPIN,
            dir: consume_dir,
            shared,
            done: false,
            seg,
        },
        peer,
    })
}

/// Sending half of a shared-memory link.
pub struct ShmTx {
    producer: Producer,
    codec: FrameCodec,
    /// The staged frame, or its head (up to the payload) on the direct path.
    scratch: BytesMut,
    /// Bytes of `scratch` that go into the record.
    prefix: usize,
    /// The payload's MessagePack `bin` marker and length (direct path).
    bin: [u8; 5],
    bin_len: usize,
    /// The payload copied straight into the record (direct path), else empty.
    payload: Bytes,
    /// Length of the staged frame.
    frame_len: usize,
    dir: usize,
    shared: Arc<Shared>,
    closed: bool,
    seg: Arc<Segment>,
}

impl std::fmt::Debug for ShmTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmTx").field("dir", &self.dir).field("seg", &self.seg).finish()
    }
}

impl ShmTx {
    fn state(&self) -> Result<&DirState, TransportError> {
        dir(&self.seg, self.dir)
    }

    fn check_alive(&self) -> Result<(), TransportError> {
        if self.shared.dead.load(Ordering::Acquire) {
            return Err(TransportError::ConnectionError("shared-memory link is closed".into()));
        }
        if self.state()?.consumer_closed.load(Ordering::Acquire) != 0 {
            return Err(TransportError::ConnectionError("the peer stopped reading".into()));
        }
        Ok(())
    }

    /// Writes the frame staged by [`stage`](Self::stage) into the ring as one record, waiting
    /// while it is full: `scratch[..prefix]`, then (on the direct path) the payload's `bin`
    /// marker and the payload itself, copied straight from the message.
    async fn write_record(&mut self) -> Result<(), TransportError> {
        let len = self.frame_len;
        let mut tries = 0u32;
        loop {
            match self.producer.reserve(len) {
                Ok(mut grant) => {
                    let (prefix, rest) = grant.split_at_mut(self.prefix);
                    prefix.copy_from_slice(&self.scratch[..self.prefix]);
                    if !rest.is_empty() {
                        let (bin, payload) = rest.split_at_mut(self.bin_len);
                        bin.copy_from_slice(&self.bin[..self.bin_len]);
                        if payload.len() >= STREAMING_COPY_MIN {
                            // Past the caches: the record is read long after they evicted it.
                            copy_streaming(payload, &self.payload);
                        } else {
                            payload.copy_from_slice(&self.payload);
                        }
                    }
                    grant.commit();
                    self.shared.last_writer.store(thread_tag(), Ordering::Relaxed);
                    self.payload = Bytes::new();
                    notify(self.state()?);
                    return Ok(());
                }
                Err(RingError::Full) => {
                    self.check_alive()?;
                    let d = self.state()?;
                    notify(d);
                    tries = tries.saturating_add(1);
                    if tries < FULL_YIELDS {
                        tokio::task::yield_now().await;
                        continue;
                    }
                    // Wait for the consumer to release a record. Announce it (our waker thread
                    // passes the wake-up on; the consumer sees `space_wanted`), then re-check:
                    // either the consumer sees the flag after its release, or we see the room.
                    self.shared.tx_waiting.store(true, Ordering::SeqCst);
                    d.space_wanted.store(1, Ordering::SeqCst);
                    fence(Ordering::SeqCst);
                    if self.producer.reserve(len).is_err() {
                        // The timeout covers a peer that does not know `space_wanted`.
                        let _ = tokio::time::timeout(FULL_WAIT, self.shared.space.notified()).await;
                    }
                    self.shared.tx_waiting.store(false, Ordering::SeqCst);
                }
                Err(e) => {
                    return Err(TransportError::ConnectionError(format!("outgoing ring: {e}")));
                }
            }
        }
    }

    /// Encodes `msg` for [`write_record`](Self::write_record) and returns the frame's length.
    ///
    /// A payload of at least [`DIRECT_PAYLOAD`] bytes that will not be compressed is not copied
    /// into `scratch`: the frame is the envelope of the message with an empty payload (the
    /// payload is the envelope's last field, a MessagePack `bin`), with its `bin` marker and the
    /// frame's length field rewritten for the real payload, followed by the payload. The bytes
    /// are exactly those `encode_into` writes for `msg` (a test holds them equal); anything
    /// unexpected takes the ordinary path.
    fn stage(&mut self, mut msg: Message) -> Result<usize, TransportError> {
        self.scratch.clear();
        self.payload = Bytes::new();
        let n = msg.payload.len();
        if n >= DIRECT_PAYLOAD && n <= self.codec.config().max_message_size {
            let payload = std::mem::take(&mut msg.payload);
            if self.codec.encode_into(&msg, &mut self.scratch).is_ok() {
                if let Some(len) = self.stage_direct(n) {
                    self.payload = payload;
                    return Ok(len);
                }
            }
            msg.payload = payload;
            self.scratch.clear();
        }
        self.codec.encode_into(&msg, &mut self.scratch)?;
        self.bin_len = 0;
        self.prefix = self.scratch.len();
        self.frame_len = self.scratch.len();
        Ok(self.frame_len)
    }

    /// Turns the frame of an empty-payload message in `scratch` into the head of the frame of
    /// an `n`-byte payload; `None` when the ordinary path must be taken.
    fn stage_direct(&mut self, n: usize) -> Option<usize> {
        let frame = &mut self.scratch[..];
        // An uncompressed frame whose envelope ends with an empty `bin 8`.
        if frame.len() < HEADER_LEN + 2 || frame[3] != 0 || frame[frame.len() - 2..] != [0xc4, 0x00] {
            return None;
        }
        let prefix = frame.len() - 2;
        let bin_len = match u32::try_from(n).ok()? {
            n @ 0..=0xff => {
                self.bin[..2].copy_from_slice(&[0xc4, n as u8]);
                2
            }
            n @ 0x100..=0xffff => {
                self.bin[0] = 0xc5;
                self.bin[1..3].copy_from_slice(&(n as u16).to_be_bytes());
                3
            }
            n => {
                self.bin[0] = 0xc6;
                self.bin[1..5].copy_from_slice(&n.to_be_bytes());
                5
            }
        };
        let body = prefix - HEADER_LEN + bin_len + n;
        let envelope = body - n;
        let config = self.codec.config();
        let compresses = config.compression != Compression::None && body > config.compression_threshold;
        if compresses || envelope > ENVELOPE_ALLOWANCE || body > config.max_body() {
            return None;
        }
        frame[4..8].copy_from_slice(&u32::try_from(body).ok()?.to_be_bytes());
        self.prefix = prefix;
        self.bin_len = bin_len;
        self.frame_len = HEADER_LEN + body;
        Some(self.frame_len)
    }

    /// Whether the last frame took the direct path (for tests).
    #[cfg(test)]
    pub(crate) fn last_was_direct(&self) -> bool {
        self.bin_len > 0
    }

    fn mark_closed(&mut self) {
        if !self.closed {
            self.closed = true;
            if let Ok(d) = self.state() {
                d.producer_closed.store(1, Ordering::Release);
                notify(d);
            }
        }
    }
}

impl LinkTx for ShmTx {
    // `direct_write_idle` is the default (20 µs), as for a stream: a message to an idle link,
    // or an answer right after the peer's turn, goes into the ring from the sender's own task;
    // a sender's burst goes to the engine's writer, which writes a batch per wake-up. Zero (every
    // message from its sender, as here until 2026-12-02) cost a burst three allocations and a
    // lock per message and left nothing to batch: 64 B one-way 0.82 → 1.12 M msgs/s with the
    // default, round trips unchanged (PERFORMANCE.md).

    async fn send_batch(&mut self, batch: &mut Vec<Message>) -> Result<(), TransportError> {
        if self.closed {
            batch.clear();
            return Err(TransportError::Closed);
        }
        if let Err(e) = self.check_alive() {
            batch.clear();
            return Err(e);
        }
        for msg in batch.drain(..) {
            let len = self.stage(msg)?;
            let max = self.producer.max_record_len();
            if len > max {
                self.payload = Bytes::new();
                return Err(TransportError::MessageTooLarge { size: len, max });
            }
            self.write_record().await?;
        }
        Ok(())
    }

    async fn close(&mut self) {
        self.mark_closed();
    }

    fn configure(&mut self, settings: &LinkSettings) {
        self.codec.set_compression(settings.compression);
    }
}

impl Drop for ShmTx {
    fn drop(&mut self) {
        self.mark_closed();
    }
}

/// Receiving half of a shared-memory link.
pub struct ShmRx {
    consumer: Consumer,
    codec: FrameCodec,
    /// Records are copied into this buffer and cut off it (as a stream reader's buffer).
    rbuf: BytesMut,
    /// Buffers for large records, reused once free.
    pool: Vec<BytesMut>,
    /// The last record taken was large.
    after_large: bool,
    /// When the ring was found empty, while it has stayed so.
    empty_since: Option<Instant>,
    /// The current wait outlasted `spin_limit` and parked.
    spun_out: bool,
    /// What this side last published in its direction's `consumer_yields`.
    published_yield: bool,
    /// How long a wait spins before it parks: adapts to whether spinning served recent waits.
    spin_limit: Duration,
    dir: usize,
    shared: Arc<Shared>,
    /// EOF or an error was returned: nothing more will be.
    done: bool,
    seg: Arc<Segment>,
}

impl std::fmt::Debug for ShmRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmRx").field("dir", &self.dir).field("seg", &self.seg).finish()
    }
}

impl ShmRx {
    /// Takes the next record off the ring and decodes it, if there is one.
    fn try_take(&mut self) -> Result<Option<Message>, TransportError> {
        let mut buf = match self.consumer.read() {
            // The guard is dropped (the record released) at the end of this arm.
            Ok(Some(record)) => copy_out(&mut self.rbuf, &mut self.pool, &record),
            Ok(None) => return Ok(None),
            Err(e) => return Err(TransportError::ConnectionError(format!("incoming ring is corrupt: {e}"))),
        };
        self.room_made();
        self.after_large = buf.len() >= LARGE_RECORD;
        match self.codec.decode_from(&mut buf)? {
            Some(m) if buf.is_empty() => Ok(Some(m)),
            _ => Err(TransportError::ConnectionError("malformed record: not exactly one frame".into())),
        }
    }

    fn room_made(&self) {
        room_made(&self.seg, self.dir);
    }

    fn finish(
        &mut self,
        r: Result<Option<Message>, TransportError>,
    ) -> Result<Option<Message>, TransportError> {
        mark_done(&mut self.done, &self.shared, &self.seg, self.dir);
        r
    }

    /// The next message with its payload lent in place from the incoming ring (no copy), or
    /// `Ok(None)` at the end of the stream. Waits as [`LinkRx::recv`] does: spinning while the
    /// peer is likely to send soon, then parked.
    ///
    /// The message's record stays in the ring until the [`LentMessage`] is dropped: the
    /// producer cannot reuse its space meanwhile, so a message held long holds the sender back
    /// once the ring is full. A compressed frame cannot be lent; it arrives decoded with a copy
    /// ([`LentMessage::is_lent`] tells which). `recv`, `try_recv_buffered` and these calls may
    /// be mixed on one link: each takes the next record.
    ///
    /// This is the link-level receive of a [`SharedMemoryTransport::dial_link`] link, which
    /// speaks the wire protocol itself; a [`Node`](hivewire_core::Node)'s engine receives with
    /// one copy (see the crate documentation).
    ///
    /// [`SharedMemoryTransport::dial_link`]: crate::SharedMemoryTransport::dial_link
    pub async fn recv_lent(&mut self) -> Result<Option<LentMessage<'_>>, TransportError> {
        if self.done {
            return Ok(None);
        }
        let seg = self.seg.clone();
        let Some(d) = seg.dir(self.dir) else {
            let e = TransportError::ConnectionError("connection segment too small".into());
            return self.finish(Err(e)).map(|_| None);
        };
        while self.consumer.is_empty() {
            match self.wait(d).await {
                Ok(true) => {}
                Ok(false) => return self.finish(Ok(None)).map(|_| None),
                Err(e) => return self.finish(Err(e)).map(|_| None),
            }
        }
        self.arrived();
        self.lend()
    }

    /// [`recv_lent`](Self::recv_lent) without waiting: `Ok(None)` when no record is ready (or
    /// the link has ended).
    pub fn try_recv_lent(&mut self) -> Result<Option<LentMessage<'_>>, TransportError> {
        if self.done || self.consumer.is_empty() {
            return Ok(None);
        }
        self.arrived();
        self.lend()
    }

    /// Lends the next record, decoded where it lies.
    fn lend(&mut self) -> Result<Option<LentMessage<'_>>, TransportError> {
        // Only fields other than `consumer` are touched while its record is lent.
        let (seg, dir, shared) = (&*self.seg, self.dir, &*self.shared);
        let record = match self.consumer.read() {
            Ok(Some(record)) => record,
            Ok(None) => return Ok(None),
            Err(e) => {
                mark_done(&mut self.done, shared, seg, dir);
                return Err(TransportError::ConnectionError(format!("incoming ring is corrupt: {e}")));
            }
        };
        match self.codec.decode_in_place(&record) {
            Ok(InPlace::Lent { envelope, payload }) => Ok(Some(LentMessage {
                envelope,
                range: payload,
                lease: Some(Lease { record: Some(record), seg, dir }),
            })),
            Ok(InPlace::Copied(message)) => {
                drop(record);
                room_made(seg, dir);
                Ok(Some(LentMessage { envelope: message, range: 0..0, lease: None }))
            }
            Err(e) => {
                drop(record);
                room_made(seg, dir);
                mark_done(&mut self.done, shared, seg, dir);
                Err(TransportError::ConnectionError(format!("malformed record: {e}")))
            }
        }
    }

    /// Notes that a record was taken: if the ring had been seen empty, the wait was short
    /// enough for spinning to pay (or not), which sets how long the next wait spins.
    fn arrived(&mut self) {
        if let Some(since) = self.empty_since.take() {
            if self.spun_out {
                // We parked. If the record came soon after all (the wait includes the wake-up,
                // tens of µs on a VM), the peer is busy again: spin fully next time.
                if since.elapsed() < MAX_SPIN * 2 {
                    self.spin_limit = MAX_SPIN;
                }
            } else {
                self.spin_limit = MAX_SPIN;
            }
            self.spun_out = false;
        }
    }

    /// Whether a spinning wait gives the CPU away between chunks (`sched_yield`): only when
    /// the last write into the outgoing ring came from another thread than this one.
    ///
    /// When the application sends from another thread (a loop in `block_on`, a thread of its
    /// own), that thread may be waiting for this very CPU to produce what the peer waits for:
    /// without the yield it gets the CPU only when the spin ends (round trips of 120-140 µs
    /// instead of 25-45 µs on 2 vCPUs). When the application sends from tasks this worker
    /// runs, the yield only hands the CPU to the runtime's other, idle worker — which tokio
    /// wakes each time this task yields back to it and which then finds nothing to do — at
    /// 5-7 µs a context switch (round trips of 9-25 µs instead of 2.4-3.5 µs).
    ///
    /// Other processes' threads count too: each side publishes its choice in its direction's
    /// `consumer_yields`, and a side yields when either side's application sends from other
    /// threads (the other process's sending thread may be waiting for this CPU as well).
    pub(crate) fn yields_cpu(&mut self) -> bool {
        let own = self.shared.last_writer.load(Ordering::Relaxed) != thread_tag();
        if own != self.published_yield {
            // Written on change only: the producer bumps `seq` in the same cache line.
            if let Some(d) = self.seg.dir(self.dir) {
                d.consumer_yields.store(u32::from(own), Ordering::Relaxed);
            }
            self.published_yield = own;
        }
        own || self.seg.dir(1 - self.dir).is_some_and(|d| d.consumer_yields.load(Ordering::Relaxed) != 0)
    }

    /// Polls the ring for up to [`SPIN_CHUNK`] without yielding; true when a record is there.
    fn spin_chunk(&self) -> bool {
        let end = Instant::now() + SPIN_CHUNK;
        loop {
            for _ in 0..64 {
                if !self.consumer.is_empty() {
                    return true;
                }
                std::hint::spin_loop();
            }
            if Instant::now() >= end {
                return !self.consumer.is_empty();
            }
        }
    }

    async fn next(&mut self, d: &DirState) -> Result<Option<Message>, TransportError> {
        if std::mem::take(&mut self.after_large) {
            // Not ready at once after a large message, even if the ring holds more: the engine
            // then hands what it delivered to its consumer, who drops it before long, so the
            // large-record buffer comes back to `pool` instead of fresh pages being faulted in.
            tokio::task::yield_now().await;
        }
        loop {
            if let Some(m) = self.try_take()? {
                self.arrived();
                return Ok(Some(m));
            }
            if !self.wait(d).await? {
                return Ok(None);
            }
        }
    }

    /// One step of waiting on a ring found empty: spins, yields or parks as `next` describes.
    /// `Ok(false)` at the end of the stream (the producer closed and the ring is empty);
    /// `Ok(true)` when the ring should be looked at again.
    async fn wait(&mut self, d: &DirState) -> Result<bool, TransportError> {
        if d.producer_closed.load(Ordering::Acquire) != 0 {
            return Ok(!self.consumer.is_empty());
        }
        if let Some(why) = lock(&self.shared.error).take() {
            return Err(TransportError::ConnectionError(why));
        }
        let Some(since) = self.empty_since else {
            // Just found the ring empty: return to the caller once before spinning (the
            // engine's reader wakes the consumers of what it delivered when `recv` is not
            // ready at once).
            self.empty_since = Some(Instant::now());
            tokio::task::yield_now().await;
            return Ok(true);
        };
        // Spin while the peer is likely to answer soon: poll the ring in short chunks, giving
        // the worker to its other tasks between chunks and, when the application answers from
        // other threads, the CPU to those threads too. No syscall is asked of the producer.
        if !self.spun_out && since.elapsed() < self.spin_limit {
            // The worker's other tasks first: among them, typically, the consumer of what
            // this reader just delivered, whose answer the peer is waiting for.
            tokio::task::yield_now().await;
            if !self.spin_chunk() && self.yields_cpu() {
                std::thread::yield_now();
            }
            return Ok(true);
        }
        if !self.spun_out {
            self.spun_out = true;
            self.spin_limit /= 2;
            if self.spin_limit < MIN_SPIN {
                self.spin_limit = Duration::ZERO;
            }
        }
        // Park. Announce it to the producer (who then wakes the futex) and to our waker
        // thread (who sleeps on the futex for us), then re-check before sleeping: either
        // the producer sees `sleeping` or we see its record.
        d.sleeping.store(1, Ordering::SeqCst);
        let seq = d.seq.load(Ordering::SeqCst);
        self.shared.armed.store(ARMED | u64::from(seq), Ordering::SeqCst);
        // Clears both when the wait ends, also when this future is dropped while parked
        // (else the producer would go on making a syscall per record).
        let parked = Parked { d, shared: &self.shared };
        fence(Ordering::SeqCst);
        let moved = d.seq.load(Ordering::SeqCst) != seq;
        if !moved && self.consumer.is_empty() && d.producer_closed.load(Ordering::Acquire) == 0 {
            self.shared.wake.notified().await;
        }
        drop(parked);
        Ok(true)
    }
}

/// After a release: wakes the producer if it waits for room. Its process's waker thread sleeps
/// on the `seq` of the direction we produce, so that is the word we bump and wake.
fn room_made(seg: &Segment, dir: usize) {
    let Some(d) = seg.dir(dir) else { return };
    // Pairs with the producer's `space_wanted` store and head load (a Dekker pattern): the head
    // store of the release was Release only.
    fence(Ordering::SeqCst);
    if d.space_wanted.load(Ordering::Relaxed) != 0 && d.space_wanted.swap(0, Ordering::SeqCst) != 0 {
        if let Some(out) = seg.dir(1 - dir) {
            out.seq.fetch_add(1, Ordering::SeqCst);
            futex_wake(&out.seq);
        }
    }
}

/// The receiving half returned its last message or error: nothing more will be read, and the
/// peer's sender is told so.
fn mark_done(done: &mut bool, shared: &Shared, seg: &Segment, dir: usize) {
    *done = true;
    shared.dead.store(true, Ordering::Release);
    if let Some(d) = seg.dir(dir) {
        d.consumer_closed.store(1, Ordering::Release);
    }
}

/// A message received by [`ShmRx::recv_lent`], its payload lent in place from the incoming
/// ring. Dropping it releases the record's space to the sender.
pub struct LentMessage<'a> {
    /// Every field of the message; its payload is empty while lent (see `payload`).
    envelope: Message,
    /// Where the payload lies in the record.
    range: std::ops::Range<usize>,
    /// The record, when the payload is lent (none for a frame decoded with a copy).
    lease: Option<Lease<'a>>,
}

/// A lent record and what its release must do.
struct Lease<'a> {
    record: Option<ReadGuard<'a>>,
    seg: &'a Segment,
    dir: usize,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        // Release first, then tell a producer waiting for room.
        drop(self.record.take());
        room_made(self.seg, self.dir);
    }
}

impl LentMessage<'_> {
    /// Every field of the message. While the payload is lent its `payload` field is empty:
    /// read the payload with [`payload`](Self::payload).
    pub fn message(&self) -> &Message {
        &self.envelope
    }

    /// The payload: in the ring itself when [`is_lent`](Self::is_lent).
    pub fn payload(&self) -> &[u8] {
        match self.lease.as_ref().and_then(|l| l.record.as_deref()) {
            Some(record) => &record[self.range.clone()],
            None => &self.envelope.payload,
        }
    }

    /// The payload is read where it lies in the ring (false for a compressed frame, which was
    /// decoded with a copy).
    pub fn is_lent(&self) -> bool {
        self.lease.is_some()
    }

    /// The message with its payload copied out of the ring (the one copy
    /// [`LinkRx::recv`] makes); releases the record.
    pub fn into_owned(self) -> Message {
        let LentMessage { mut envelope, range, lease } = self;
        if let Some(record) = lease.as_ref().and_then(|l| l.record.as_deref()) {
            envelope.payload = Bytes::copy_from_slice(&record[range]);
        }
        drop(lease);
        envelope
    }
}

impl std::fmt::Debug for LentMessage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LentMessage")
            .field("message", &self.envelope)
            .field("payload_len", &self.payload().len())
            .field("lent", &self.is_lent())
            .finish()
    }
}

/// Copies a record out of the ring: the one copy a received message costs (its payload is then
/// a slice of this buffer). Small records are cut off one shared buffer, as a stream reader's;
/// a large one gets a buffer of its own from `pool`, reused once the messages cut from it are
/// dropped, so that a stream of large messages does not fault in fresh pages for each.
pub(crate) fn copy_out(rbuf: &mut BytesMut, pool: &mut Vec<BytesMut>, record: &[u8]) -> BytesMut {
    let n = record.len();
    if n < LARGE_RECORD {
        if rbuf.capacity() - rbuf.len() < n {
            rbuf.reserve(n.max(RBUF_MIN));
        }
        rbuf.extend_from_slice(record);
        return rbuf.split();
    }
    let i = match pool.iter_mut().position(|b| b.try_reclaim(n)) {
        Some(i) => i,
        None => {
            let fresh = BytesMut::with_capacity(n.next_multiple_of(LARGE_RECORD));
            if pool.len() < POOL_LEN {
                pool.push(fresh);
                pool.len() - 1
            } else {
                // All in use: let the oldest go to whoever holds its messages.
                pool.remove(0);
                pool.push(fresh);
                POOL_LEN - 1
            }
        }
    };
    let buf = &mut pool[i];
    if n >= STREAMING_COPY_MIN {
        // Past the caches, as the sender's copy: a record this large is not read back while
        // they still hold it.
        buf.reserve(n);
        let start = buf.len();
        copy_streaming_uninit(&mut buf.spare_capacity_mut()[..n], record);
        // SAFETY: the `n` bytes after `start` were just written (`copy_streaming_uninit` writes
        // its whole destination), and `reserve` made room for them.
        unsafe { buf.set_len(start + n) };
    } else {
        buf.extend_from_slice(record);
    }
    buf.split()
}

/// A receiving task's announcement that it is parked; withdrawn on drop.
struct Parked<'a> {
    d: &'a DirState,
    shared: &'a Shared,
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.shared.armed.store(0, Ordering::SeqCst);
        self.d.sleeping.store(0, Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LinkRx for ShmRx {
    async fn recv(&mut self) -> Result<Option<Message>, TransportError> {
        if self.done {
            return Ok(None);
        }
        let seg = self.seg.clone();
        let Some(d) = seg.dir(self.dir) else {
            let e = TransportError::ConnectionError("connection segment too small".into());
            return self.finish(Err(e));
        };
        match self.next(d).await {
            Ok(Some(m)) => Ok(Some(m)),
            other => self.finish(other),
        }
    }

    /// A record already in the ring, taken without building a `recv` future: the engine
    /// drains a busy link through this (each `recv` future built and dropped moved the message
    /// a few more times). After a large record it leaves the next one to `recv`, which yields
    /// first (see `next`).
    fn try_recv_buffered(&mut self) -> Result<Option<Message>, TransportError> {
        if self.done || self.after_large {
            return Ok(None);
        }
        match self.try_take() {
            Ok(Some(m)) => {
                self.arrived();
                Ok(Some(m))
            }
            Ok(None) => Ok(None),
            Err(e) => self.finish(Err(e)),
        }
    }

    fn configure(&mut self, settings: &LinkSettings) {
        self.codec.set_accept(settings.accept_gzip, settings.accept_zstd);
    }
}

impl Drop for ShmRx {
    fn drop(&mut self) {
        self.shared.dead.store(true, Ordering::Release);
        self.shared.stop.store(true, Ordering::Release);
        if let Some(d) = self.seg.dir(self.dir) {
            d.consumer_closed.store(1, Ordering::Release);
            // Wake the waker thread so that it sees `stop` now rather than at its timeout.
            d.seq.fetch_add(1, Ordering::SeqCst);
            futex_wake(&d.seq);
        }
    }
}

/// The waker thread of one link: sleeps on the incoming direction's futex word while the
/// receiving task is parked, wakes the task when the word moves, and checks that the peer lives.
struct Waker {
    shared: Arc<Shared>,
    dir: usize,
    peer_pid: u32,
    probe: Option<LockProbe>,
    seg: Arc<Segment>,
}

impl Waker {
    fn peer_alive(&self) -> bool {
        (self.peer_pid == 0 || pid_alive(self.peer_pid)) && self.probe.as_ref().is_none_or(|p| p.held())
    }

    fn run(self) {
        let Some(d) = self.seg.dir(self.dir) else { return };
        let mut last_check = Instant::now();
        while !self.shared.stop.load(Ordering::Acquire) {
            let cur = d.seq.load(Ordering::SeqCst);
            let armed = self.shared.armed.load(Ordering::SeqCst);
            if armed & ARMED != 0 && (armed as u32) != cur {
                self.shared.wake.notify_one();
            }
            if self.shared.tx_waiting.load(Ordering::SeqCst) {
                self.shared.space.notify_one();
            }
            futex_wait(&d.seq, cur, IDLE_WAIT);
            if last_check.elapsed() >= IDLE_WAIT {
                last_check = Instant::now();
                if !self.peer_alive() {
                    debug!("shared-memory link: the peer process died");
                    *lock(&self.shared.error) = Some("the peer process died".into());
                    self.shared.dead.store(true, Ordering::Release);
                    self.shared.wake.notify_one();
                    self.shared.space.notify_one();
                    return;
                }
            }
        }
    }
}

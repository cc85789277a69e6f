//! One connection as an engine [`Link`]: the sending half encodes frames into the outgoing ring
//! and wakes the peer; the receiving half reads records in place from the incoming ring inside
//! its async `recv`, spins briefly (yielding to other tasks) when the ring is empty, and then
//! parks: a waker thread per link sleeps on the shared futex word for it and wakes the task.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hivewire_codec::{CodecConfig, FrameCodec};
use hivewire_core::{Link, LinkRx, LinkSettings, LinkTx, Message, PeerInfo, TransportError};
use hivewire_ring::{Consumer, Producer, RingError};
use tokio::sync::Notify;
use tracing::debug;

use crate::segment::{futex_wait, futex_wake, pid_alive, DirState, LockProbe, Segment};

/// How long an empty `recv` keeps polling the ring (yielding to other tasks) before it parks.
pub(crate) const SPIN: Duration = Duration::from_micros(50);
/// Longest futex sleep of a link's waker thread; between sleeps it checks that the peer lives.
pub(crate) const IDLE_WAIT: Duration = Duration::from_millis(100);
/// Full-ring retries that only yield before the sender starts sleeping.
const FULL_YIELDS: u32 = 64;
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
    /// Why the waker thread gave up on the peer.
    error: Mutex<Option<String>>,
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
            dir: produce_dir,
            shared: shared.clone(),
            closed: false,
            seg: seg.clone(),
        },
        rx: ShmRx { consumer, codec: FrameCodec::new(config), dir: consume_dir, shared, done: false, seg },
        peer,
    })
}

/// Sending half of a shared-memory link.
pub struct ShmTx {
    producer: Producer,
    codec: FrameCodec,
    scratch: BytesMut,
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

    /// Copies the frame in `scratch` into the ring as one record, waiting while it is full.
    async fn write_record(&mut self) -> Result<(), TransportError> {
        let len = self.scratch.len();
        let mut tries = 0u32;
        loop {
            match self.producer.reserve(len) {
                Ok(mut grant) => {
                    grant.copy_from_slice(&self.scratch);
                    grant.commit();
                    notify(self.state()?);
                    return Ok(());
                }
                Err(RingError::Full) => {
                    self.check_alive()?;
                    notify(self.state()?);
                    tries = tries.saturating_add(1);
                    if tries < FULL_YIELDS {
                        tokio::task::yield_now().await;
                    } else {
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                }
                Err(e) => {
                    return Err(TransportError::ConnectionError(format!("outgoing ring: {e}")));
                }
            }
        }
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
            self.scratch.clear();
            self.codec.encode_into(&msg, &mut self.scratch)?;
            let max = self.producer.max_record_len();
            if self.scratch.len() > max {
                return Err(TransportError::MessageTooLarge { size: self.scratch.len(), max });
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
            Ok(Some(record)) => BytesMut::from(&record[..]),
            Ok(None) => return Ok(None),
            Err(e) => return Err(TransportError::ConnectionError(format!("incoming ring is corrupt: {e}"))),
        };
        match self.codec.decode_from(&mut buf)? {
            Some(m) if buf.is_empty() => Ok(Some(m)),
            _ => Err(TransportError::ConnectionError("malformed record: not exactly one frame".into())),
        }
    }

    fn finish(
        &mut self,
        r: Result<Option<Message>, TransportError>,
    ) -> Result<Option<Message>, TransportError> {
        self.done = true;
        self.shared.dead.store(true, Ordering::Release);
        if let Some(d) = self.seg.dir(self.dir) {
            d.consumer_closed.store(1, Ordering::Release);
        }
        r
    }

    async fn next(&mut self, d: &DirState) -> Result<Option<Message>, TransportError> {
        loop {
            if let Some(m) = self.try_take()? {
                return Ok(Some(m));
            }
            if d.producer_closed.load(Ordering::Acquire) != 0 {
                if self.consumer.is_empty() {
                    return Ok(None);
                }
                continue;
            }
            if let Some(why) = lock(&self.shared.error).take() {
                return Err(TransportError::ConnectionError(why));
            }
            // Poll briefly: a busy peer's next record is usually microseconds away.
            let start = Instant::now();
            while self.consumer.is_empty() && start.elapsed() < SPIN {
                tokio::task::yield_now().await;
            }
            if !self.consumer.is_empty() {
                continue;
            }
            // Park. Announce it to the producer (who then wakes the futex) and to our waker
            // thread (who sleeps on the futex for us), then re-check before sleeping: either
            // the producer sees `sleeping` or we see its record.
            d.sleeping.store(1, Ordering::SeqCst);
            let seq = d.seq.load(Ordering::SeqCst);
            self.shared.armed.store(ARMED | u64::from(seq), Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let moved = d.seq.load(Ordering::SeqCst) != seq;
            if !moved && self.consumer.is_empty() && d.producer_closed.load(Ordering::Acquire) == 0 {
                self.shared.wake.notified().await;
            }
            self.shared.armed.store(0, Ordering::SeqCst);
            d.sleeping.store(0, Ordering::SeqCst);
        }
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
            futex_wait(&d.seq, cur, IDLE_WAIT);
            if last_check.elapsed() >= IDLE_WAIT {
                last_check = Instant::now();
                if !self.peer_alive() {
                    debug!("shared-memory link: the peer process died");
                    *lock(&self.shared.error) = Some("the peer process died".into());
                    self.shared.dead.store(true, Ordering::Release);
                    self.shared.wake.notify_one();
                    return;
                }
            }
        }
    }
}

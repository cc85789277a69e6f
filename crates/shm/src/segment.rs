//! Shared-memory segments, the layouts that live in them, futex wake-ups and the listener's
//! lock file. Every `unsafe` block of the crate is in this module, but for the calls of its
//! `attach` and one `set_len` in `link::copy_out` over bytes just copied into a buffer.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use hivewire_core::TransportError;
use shared_memory::{Shmem, ShmemConf, ShmemError};

/// Magic of a control segment: `HWSHMCT1`.
pub(crate) const CONTROL_MAGIC: u64 = u64::from_le_bytes(*b"HWSHMCT1");
/// Magic of a connection segment: `HWSHMCN1`.
pub(crate) const CONN_MAGIC: u64 = u64::from_le_bytes(*b"HWSHMCN1");
/// Layout version of both segment kinds.
pub(crate) const SEGMENT_VERSION: u32 = 1;
/// Connection slots in a control segment (pending connects, not live connections).
pub(crate) const SLOT_COUNT: usize = 64;

/// Slot states.
pub(crate) const SLOT_FREE: u32 = 0;
pub(crate) const SLOT_CLAIMED: u32 = 1;
pub(crate) const SLOT_READY: u32 = 2;

/// Connection states.
pub(crate) const CONN_OFFERED: u32 = 0;
pub(crate) const CONN_ACCEPTED: u32 = 1;
pub(crate) const CONN_ABANDONED: u32 = 2;

/// Direction indexes in a connection segment.
pub(crate) const C2S: usize = 0;
pub(crate) const S2C: usize = 1;

/// Types made only of atomic integers (and padding): every bit pattern is a valid value, so a
/// reference to one may be formed over any (aligned, in-bounds) bytes of a segment, even bytes a
/// hostile peer wrote.
///
/// # Safety
/// Implement only for `#[repr(C)]` types whose fields are all atomic integers.
unsafe trait AnyBits: Sized {}

/// Header of a control segment (`/hw-NAME`), at offset 0; followed by [`SLOT_COUNT`] [`Slot`]s.
#[repr(C, align(64))]
pub(crate) struct ControlHeader {
    pub magic: AtomicU64,
    pub version: AtomicU32,
    pub slot_count: AtomicU32,
    pub listener_pid: AtomicU32,
    /// Futex word: bumped by a client that published a slot.
    pub doorbell: AtomicU32,
    /// Data capacity of every ring of this listener's connections.
    pub ring_capacity: AtomicU64,
    /// Random per listener instance.
    pub instance: AtomicU64,
}

/// One pending connect.
#[repr(C, align(64))]
pub(crate) struct Slot {
    pub state: AtomicU32,
    pub client_pid: AtomicU32,
    pub conn_id: AtomicU64,
}

/// Header of a connection segment (`/hw-NAME.CONNID`), at offset 0.
#[repr(C, align(64))]
pub(crate) struct ConnHeader {
    pub magic: AtomicU64,
    pub version: AtomicU32,
    /// `CONN_OFFERED`, then `CONN_ACCEPTED` (server) or `CONN_ABANDONED` (client gave up).
    pub state: AtomicU32,
    pub ring_capacity: AtomicU64,
    pub client_pid: AtomicU32,
    pub server_pid: AtomicU32,
}

/// Wake-up state of one direction (one ring), in its own cache line.
#[repr(C, align(64))]
pub(crate) struct DirState {
    /// Futex word: bumped by the producer after every commit.
    pub seq: AtomicU32,
    /// Non-zero while the consumer is (about to be) asleep on `seq`.
    pub sleeping: AtomicU32,
    /// The producer will write no more (clean close).
    pub producer_closed: AtomicU32,
    /// The consumer will read no more.
    pub consumer_closed: AtomicU32,
    /// Non-zero while the producer waits for room: the consumer clears it after releasing a
    /// record and wakes the producer's process through the other direction's `seq`.
    pub space_wanted: AtomicU32,
    /// Non-zero while the consumer's spinning waits give the CPU away between polls (its
    /// application sends from other threads than its reader's): the other side's spinning
    /// waits then do too. Builds that predate the field leave it zero: they never ask the other
    /// side to yield, and the layout (and `SEGMENT_VERSION`) is unchanged.
    pub consumer_yields: AtomicU32,
}

// SAFETY: all four are `#[repr(C)]` structs of atomic integers only (and padding).
unsafe impl AnyBits for ControlHeader {}
// SAFETY: as above.
unsafe impl AnyBits for Slot {}
// SAFETY: as above.
unsafe impl AnyBits for ConnHeader {}
// SAFETY: as above.
unsafe impl AnyBits for DirState {}

const _: () = assert!(std::mem::size_of::<ControlHeader>() == 64);
const _: () = assert!(std::mem::size_of::<Slot>() == 64);
const _: () = assert!(std::mem::size_of::<ConnHeader>() == 64);
const _: () = assert!(std::mem::size_of::<DirState>() == 64);

/// Bytes of a control segment.
pub(crate) const CONTROL_LEN: usize = 64 + SLOT_COUNT * 64;
/// Offset of the first ring in a connection segment.
const RINGS_OFFSET: usize = 256;

fn round64(n: usize) -> usize {
    n.div_ceil(64) * 64
}

/// Offsets `(ring c2s, ring s2c, total length)` of a connection segment for `capacity`.
pub(crate) fn conn_layout(capacity: usize) -> (usize, usize, usize) {
    let ring = round64(hivewire_ring::required_size(capacity));
    (RINGS_OFFSET, RINGS_OFFSET + ring, RINGS_OFFSET + 2 * ring)
}

/// The POSIX name of a listener's control segment.
pub(crate) fn control_os_id(name: &str) -> String {
    format!("/hw-{name}")
}

/// The POSIX name of a connection segment.
pub(crate) fn conn_os_id(name: &str, conn_id: u64) -> String {
    format!("/hw-{name}.{conn_id:016x}")
}

fn shm_error(what: &str, id: &str, e: ShmemError) -> TransportError {
    TransportError::ConnectionError(format!("{what} shared memory {id}: {e}"))
}

/// A mapped segment. Unmapped on drop; unlinked on drop only while it is the owner.
pub(crate) struct Segment {
    shmem: Shmem,
}

// SAFETY: `Shmem` is a file descriptor, a name and a pointer to a `MAP_SHARED` mapping that
// stays valid until drop; it has no thread affinity. Everything in the mapping is accessed
// through atomics or through the ring's handles (which follow the SPSC discipline).
unsafe impl Send for Segment {}
// SAFETY: as above; `&Segment` only hands out the pointer and atomic views.
unsafe impl Sync for Segment {}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment").field("os_id", &self.shmem.get_os_id()).field("len", &self.len()).finish()
    }
}

impl Segment {
    /// Creates (exclusively) a zero-filled segment of `len` bytes; it is its owner.
    pub(crate) fn create(os_id: &str, len: usize) -> Result<Segment, TransportError> {
        match ShmemConf::new().os_id(os_id).size(len).create() {
            Ok(shmem) => Ok(Segment { shmem }),
            Err(ShmemError::MappingIdExists) => Err(TransportError::ConnectionError(format!(
                "address in use: shared memory {os_id} already exists"
            ))),
            Err(e) => Err(shm_error("cannot create", os_id, e)),
        }
    }

    /// Maps an existing segment (not its owner).
    pub(crate) fn open(os_id: &str) -> Result<Segment, TransportError> {
        ShmemConf::new()
            .os_id(os_id)
            .open()
            .map(|shmem| Segment { shmem })
            .map_err(|e| shm_error("cannot open", os_id, e))
    }

    /// Whether dropping this handle unlinks the name.
    pub(crate) fn set_owner(&mut self, owner: bool) {
        self.shmem.set_owner(owner);
    }

    /// Removes the segment's name now (the mapping stays valid) and gives up ownership.
    pub(crate) fn unlink(&mut self) {
        self.shmem.set_owner(false);
        unlink_os_id(self.shmem.get_os_id());
    }

    pub(crate) fn len(&self) -> usize {
        self.shmem.len()
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.shmem.as_ptr()
    }

    /// An atomic view of a `T` at `offset`, or `None` when it would not be in bounds.
    fn view<T: AnyBits>(&self, offset: usize) -> Option<&T> {
        let end = offset.checked_add(std::mem::size_of::<T>())?;
        if end > self.len() || !offset.is_multiple_of(std::mem::align_of::<T>()) {
            return None;
        }
        // SAFETY: the mapping is page-aligned (mmap) and `offset` is a multiple of T's
        // alignment, so the pointer is aligned; `offset + size_of::<T>() <= len` so it is in
        // bounds of the live mapping, which outlives the returned borrow of `self`. `T` is
        // made of atomics only (`AnyBits`), so any bytes are a valid `T` and concurrent writes
        // by the peer are atomic accesses, not data races.
        Some(unsafe { &*self.as_ptr().add(offset).cast::<T>() })
    }

    pub(crate) fn control(&self) -> Option<&ControlHeader> {
        self.view(0)
    }

    pub(crate) fn slot(&self, i: usize) -> Option<&Slot> {
        self.view(64 + i * 64)
    }

    pub(crate) fn conn(&self) -> Option<&ConnHeader> {
        self.view(0)
    }

    pub(crate) fn dir(&self, d: usize) -> Option<&DirState> {
        self.view(64 + d * 64)
    }

    /// Initialises both rings of a connection segment created with [`conn_layout`]`(capacity)`.
    pub(crate) fn init_rings(&self, capacity: usize) -> Result<(), TransportError> {
        let (a, b, total) = conn_layout(capacity);
        if total > self.len() {
            return Err(TransportError::ConnectionError("connection segment too small".into()));
        }
        for off in [a, b] {
            // SAFETY: `off + required_size(capacity) <= total <= len`, so the region is inside
            // the live mapping, 64-byte aligned (page-aligned base, `off` a multiple of 64),
            // and nobody else maps this freshly created segment yet. The handles returned are
            // dropped at once; the region outlives them (it lives as long as `self`).
            unsafe { hivewire_ring::init(self.as_ptr().add(off), total - off, capacity) }
                .map_err(|e| TransportError::ConnectionError(format!("cannot create ring: {e}")))?;
        }
        Ok(())
    }

    /// Attaches the producer of direction `d` and the consumer of the other one.
    ///
    /// # Safety
    /// The caller must keep this segment mapped for as long as the returned handles live, and
    /// must be the only attacher of these ends in every process (one producer and one consumer
    /// per ring, by the connection protocol: the client produces C2S and consumes S2C, the
    /// server the reverse).
    pub(crate) unsafe fn attach(
        &self,
        produce: usize,
    ) -> Result<(hivewire_ring::Producer, hivewire_ring::Consumer), TransportError> {
        let capacity = self
            .conn()
            .map(|h| h.ring_capacity.load(Ordering::Acquire))
            .and_then(|c| usize::try_from(c).ok())
            .filter(|c| (hivewire_ring::MIN_CAPACITY..=hivewire_ring::MAX_CAPACITY).contains(c))
            .ok_or_else(|| TransportError::ConnectionError("corrupt connection header".into()))?;
        let (a, b, total) = conn_layout(capacity);
        if total > self.len() {
            return Err(TransportError::ConnectionError("connection segment too small".into()));
        }
        let (p_off, c_off) = if produce == C2S { (a, b) } else { (b, a) };
        let err = |e: hivewire_ring::RingError| TransportError::ConnectionError(format!("bad ring: {e}"));
        // SAFETY: both offsets plus the ring's length are within the mapping (checked against
        // `total`), aligned as above; the mapping outlives the handles and the SPSC discipline
        // holds (caller's contract). The rings validate their headers before trusting them.
        let producer = unsafe { hivewire_ring::attach_producer(self.as_ptr().add(p_off), total - p_off) }
            .map_err(err)?;
        // SAFETY: as above.
        let consumer = unsafe { hivewire_ring::attach_consumer(self.as_ptr().add(c_off), total - c_off) }
            .map_err(err)?;
        Ok((producer, consumer))
    }
}

/// `shm_unlink(os_id)`, ignoring a missing name.
pub(crate) fn unlink_os_id(os_id: &str) {
    let Ok(c) = std::ffi::CString::new(os_id) else { return };
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let _ = unsafe { libc::shm_unlink(c.as_ptr()) };
}

/// Removes every segment of listener `name` (its control segment and any connection segment
/// left behind). Only called while holding the name's lock, i.e. when no listener owns it.
pub(crate) fn remove_segments_of(name: &str) -> usize {
    let mut removed = 0;
    let control = format!("hw-{name}");
    let prefix = format!("hw-{name}.");
    if let Ok(dir) = std::fs::read_dir("/dev/shm") {
        for entry in dir.flatten() {
            let file = entry.file_name();
            let Some(file) = file.to_str() else { continue };
            if file == control || file.starts_with(&prefix) {
                unlink_os_id(&format!("/{file}"));
                removed += 1;
            }
        }
    } else {
        // No /dev/shm to list (not Linux): the control segment at least.
        unlink_os_id(&format!("/{control}"));
    }
    removed
}

/// Blocks until `word` no longer holds `expected`, a wake-up, or `timeout` (spurious returns
/// are allowed: callers re-check their condition).
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    #[cfg(target_os = "linux")]
    {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: FUTEX_WAIT (shared, not PRIVATE: the word lives in memory mapped by several
        // processes) only reads the aligned u32 at `word`, which is valid for the duration of
        // the call; `ts` outlives the call. The kernel validates everything else.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT,
                expected,
                &ts as *const libc::timespec,
                std::ptr::null::<u32>(),
                0u32,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        if word.load(Ordering::Acquire) == expected {
            std::thread::sleep(timeout.min(Duration::from_millis(1)));
        }
    }
}

/// Wakes every waiter on `word`.
pub(crate) fn futex_wake(word: &AtomicU32) {
    #[cfg(target_os = "linux")]
    // SAFETY: FUTEX_WAKE only uses the address of `word` as a key; it is valid and aligned.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX, 0usize, 0usize, 0u32);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = word;
}

/// Whether process `pid` exists (a hint only: PIDs are reused).
pub(crate) fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing; `kill` only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    // SAFETY: `flock` on a file descriptor we own for the duration of the call.
    let r = unsafe { libc::flock(file.as_raw_fd(), op) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The directory of listener lock files.
pub(crate) fn lock_dir() -> PathBuf {
    std::env::temp_dir().join("hivewire-shm")
}

/// The lock file of listener `name`.
pub(crate) fn lock_path(name: &str) -> PathBuf {
    lock_dir().join(format!("{name}.lock"))
}

/// An exclusive `flock` on a listener's lock file, held for the listener's life. The kernel
/// releases it when the process dies, however it dies.
#[derive(Debug)]
pub(crate) struct ListenerLock {
    file: File,
    path: PathBuf,
}

impl ListenerLock {
    /// Takes the lock of `name`; `Ok(None)` when a live listener holds it.
    pub(crate) fn acquire(name: &str) -> Result<Option<ListenerLock>, TransportError> {
        let dir = lock_dir();
        std::fs::create_dir_all(&dir)?;
        let path = lock_path(name);
        for _ in 0..8 {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
            // A previous owner may have removed the file between our open and our lock: the
            // lock is only ours if the path still names the file we locked.
            let ours = file.metadata().map(|m| (m.dev(), m.ino()))?;
            if std::fs::metadata(&path).map(|m| (m.dev(), m.ino())).ok() == Some(ours) {
                return Ok(Some(ListenerLock { file, path }));
            }
        }
        Err(TransportError::ConnectionError(format!("cannot lock {}: it keeps changing", path.display())))
    }

    /// Removes the lock file (still holding the lock, so no successor is confused), then
    /// releases the lock.
    pub(crate) fn release(self) {
        let ours = self.file.metadata().map(|m| (m.dev(), m.ino())).ok();
        if std::fs::metadata(&self.path).map(|m| (m.dev(), m.ino())).ok() == ours {
            let _ = std::fs::remove_file(&self.path);
        }
        drop(self.file);
    }
}

/// A client's view of a listener's lock file, to tell whether the listener still lives.
#[derive(Debug)]
pub(crate) struct LockProbe {
    file: File,
}

impl LockProbe {
    /// Opens the lock file of `name`; fails when there is none (no listener ever ran or it
    /// closed cleanly).
    pub(crate) fn open(name: &str) -> Option<LockProbe> {
        std::fs::File::open(lock_path(name)).ok().map(|file| LockProbe { file })
    }

    /// True while some process holds the exclusive lock on the file we opened.
    pub(crate) fn held(&self) -> bool {
        match flock(&self.file, libc::LOCK_SH | libc::LOCK_NB) {
            Ok(()) => {
                let _ = flock(&self.file, libc::LOCK_UN);
                false
            }
            Err(_) => true,
        }
    }
}

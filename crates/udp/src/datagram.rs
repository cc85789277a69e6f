//! The datagram form of the codec: a 20-byte header, then either one or more whole codec
//! frames, or one fragment of a frame too large for one datagram. Reassembly is bounded in
//! memory, in the number of incomplete messages and in time; duplicates are dropped by message
//! id. A message is delivered whole and intact, or not at all.
//!
//! ```text
//! offset size field
//! 0      2    magic "HU"
//! 2      1    version 1
//! 3      1    flags: bit 0 FRAGMENT (else: zero or more whole frames), bit 1 CLOSE (the
//!             session ends; no body); bits 2-7 zero. A datagram of whole frames with no
//!             frame opens a session (a dialer sends it first).
//! 4      8    session id (big-endian), chosen at random by the dialer
//! 12     4    message id (big-endian), per session and direction, from 1, wrapping
//! 16     2    fragment index (big-endian), 0 for whole frames
//! 18     2    fragment count (big-endian), 1 for whole frames
//! 20     …    frames, or the fragment's bytes
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

pub(crate) const MAGIC: [u8; 2] = *b"HU";
pub(crate) const VERSION: u8 = 1;
/// Bytes of the datagram header.
pub const HEADER_LEN: usize = 20;
pub(crate) const FLAG_FRAGMENT: u8 = 1;
pub(crate) const FLAG_CLOSE: u8 = 2;

/// A parsed datagram header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub fragment: bool,
    pub close: bool,
    pub session: u64,
    pub msg_id: u32,
    pub index: u16,
    pub count: u16,
}

impl Header {
    pub(crate) fn write(&self, out: &mut BytesMut) {
        out.put_slice(&MAGIC);
        out.put_u8(VERSION);
        let flags =
            (if self.fragment { FLAG_FRAGMENT } else { 0 }) | (if self.close { FLAG_CLOSE } else { 0 });
        out.put_u8(flags);
        out.put_u64(self.session);
        out.put_u32(self.msg_id);
        out.put_u16(self.index);
        out.put_u16(self.count);
    }

    /// Parses the header of `d`; `None` if it is not one of ours or is inconsistent.
    pub(crate) fn parse(d: &[u8]) -> Option<Header> {
        if d.len() < HEADER_LEN
            || d[..2] != MAGIC
            || d[2] != VERSION
            || d[3] & !(FLAG_FRAGMENT | FLAG_CLOSE) != 0
        {
            return None;
        }
        let h = Header {
            fragment: d[3] & FLAG_FRAGMENT != 0,
            close: d[3] & FLAG_CLOSE != 0,
            session: u64::from_be_bytes(d[4..12].try_into().ok()?),
            msg_id: u32::from_be_bytes(d[12..16].try_into().ok()?),
            index: u16::from_be_bytes(d[16..18].try_into().ok()?),
            count: u16::from_be_bytes(d[18..20].try_into().ok()?),
        };
        let body = d.len() - HEADER_LEN;
        let consistent = match (h.fragment, h.close) {
            (true, false) => h.count >= 2 && h.index < h.count && body > 0,
            (false, false) => h.count == 1 && h.index == 0,
            (false, true) => h.count == 1 && h.index == 0 && body == 0,
            (true, true) => false,
        };
        consistent.then_some(h)
    }
}

/// Counters of what the datagram layer dropped (reported in `TransportStats::backend`).
#[derive(Debug, Default)]
pub struct UdpCounters {
    /// Datagrams that are not ours or are inconsistent.
    pub malformed: AtomicU64,
    /// Fragments that claimed an impossible count or size, or disagreed with their set.
    pub bad_fragments: AtomicU64,
    /// Datagrams of a message already delivered (or too old to tell).
    pub duplicates: AtomicU64,
    /// Incomplete messages given up after the reassembly timeout.
    pub reassembly_timeouts: AtomicU64,
    /// Incomplete messages evicted to stay within the reassembly bounds.
    pub reassembly_evicted: AtomicU64,
    /// Complete messages dropped because the link's reader was behind.
    pub reader_behind: AtomicU64,
    /// Datagrams from unknown sessions refused because the listener was full.
    pub sessions_refused: AtomicU64,
    /// Sessions given a connected socket of their own on the hub.
    pub session_sockets: AtomicU64,
    /// Datagrams the hub's listener demultiplexed itself (those of sessions without a socket of
    /// their own, or sent before it was connected, or forwarded from another session's).
    pub via_listener: AtomicU64,
}

impl UdpCounters {
    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters by name.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("udp.malformed", g(&self.malformed)),
            ("udp.bad_fragments", g(&self.bad_fragments)),
            ("udp.duplicates", g(&self.duplicates)),
            ("udp.reassembly_timeouts", g(&self.reassembly_timeouts)),
            ("udp.reassembly_evicted", g(&self.reassembly_evicted)),
            ("udp.reader_behind", g(&self.reader_behind)),
            ("udp.sessions_refused", g(&self.sessions_refused)),
            ("udp.session_sockets", g(&self.session_sockets)),
            ("udp.via_listener", g(&self.via_listener)),
        ]
    }
}

/// Reassembly limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Largest message (a frame, header included).
    pub max_message: usize,
    /// Bytes of a fragment (datagram payload).
    pub chunk: usize,
    /// Bytes held by incomplete messages of one session.
    pub budget: usize,
    /// Incomplete messages of one session.
    pub max_incomplete: usize,
    /// An incomplete message is dropped this long after its first fragment.
    pub timeout: Duration,
}

struct Partial {
    count: u16,
    chunks: Vec<Option<Bytes>>,
    got: u16,
    bytes: usize,
    started: Instant,
}

/// Which message ids of a session were delivered: the highest and a window of 1,024 below it.
/// The window is a bitmap indexed by `id % 1024`: moving the highest id up by `k` clears `k`
/// bits (one, in a session's steady stream), where shifting a 1,024-bit window cost ~250
/// instructions per message.
#[derive(Debug, Default)]
struct Seen {
    highest: Option<u32>,
    window: [u64; 16],
}

const WINDOW: u32 = 1024;

impl Seen {
    /// True if `id` is new (and records it); false for a duplicate or an id too old to tell.
    fn insert(&mut self, id: u32) -> bool {
        let Some(high) = self.highest else {
            self.highest = Some(id);
            self.set(id);
            return true;
        };
        let ahead = id.wrapping_sub(high);
        if ahead != 0 && ahead < u32::MAX / 2 {
            // Newer: the ids between the old highest and `id` leave the window's far end.
            if ahead >= WINDOW {
                self.window = [0; 16];
            } else {
                for k in 1..=ahead {
                    self.clear(high.wrapping_add(k));
                }
            }
            self.highest = Some(id);
            self.set(id);
            return true;
        }
        if !self.in_window_unseen(id) {
            return false;
        }
        self.set(id);
        true
    }

    /// True if `id` would be accepted: newer than the highest, or within the window and not
    /// delivered yet.
    fn is_new(&self, id: u32) -> bool {
        let Some(high) = self.highest else { return true };
        let ahead = id.wrapping_sub(high);
        (ahead != 0 && ahead < u32::MAX / 2) || self.in_window_unseen(id)
    }

    /// `id` is not newer than the highest: true if it is within the window and unseen.
    fn in_window_unseen(&self, id: u32) -> bool {
        let behind = self.highest.map_or(0, |h| h.wrapping_sub(id));
        behind < WINDOW && !self.get(id)
    }

    fn get(&self, id: u32) -> bool {
        let b = id % WINDOW;
        self.window[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    fn set(&mut self, id: u32) {
        let b = id % WINDOW;
        self.window[(b / 64) as usize] |= 1 << (b % 64);
    }

    fn clear(&mut self, id: u32) {
        let b = id % WINDOW;
        self.window[(b / 64) as usize] &= !(1 << (b % 64));
    }
}

/// One session's reassembly state (one direction).
#[derive(Default)]
pub(crate) struct Reassembler {
    partial: HashMap<u32, Partial>,
    bytes: usize,
    seen: Seen,
}

impl Reassembler {
    /// Takes one datagram (header parsed, `body` after it); returns the complete message data
    /// (one or more whole frames) once there is one.
    pub(crate) fn accept(
        &mut self,
        h: Header,
        body: Bytes,
        now: Instant,
        limits: &Limits,
        counters: &UdpCounters,
    ) -> Option<Bytes> {
        if !h.fragment {
            if !self.seen.insert(h.msg_id) {
                UdpCounters::bump(&counters.duplicates);
                return None;
            }
            // An empty datagram only opens the session.
            return (!body.is_empty()).then_some(body);
        }
        let max_count = limits.max_message.div_ceil(limits.chunk.max(1));
        if h.count as usize > max_count || body.len() > limits.chunk {
            UdpCounters::bump(&counters.bad_fragments);
            return None;
        }
        if !self.partial.contains_key(&h.msg_id) {
            // A fragment of a message already delivered is a duplicate.
            if !self.seen.is_new(h.msg_id) {
                UdpCounters::bump(&counters.duplicates);
                return None;
            }
            while self.partial.len() >= limits.max_incomplete || self.bytes + body.len() > limits.budget {
                if !self.evict_oldest() {
                    break;
                }
                UdpCounters::bump(&counters.reassembly_evicted);
            }
            self.partial.insert(
                h.msg_id,
                Partial {
                    count: h.count,
                    chunks: vec![None; h.count as usize],
                    got: 0,
                    bytes: 0,
                    started: now,
                },
            );
        }
        let p = self.partial.get_mut(&h.msg_id)?;
        if p.count != h.count || (h.index + 1 < h.count && body.len() != limits.chunk) {
            // Every fragment but the last is exactly one chunk; the count never changes.
            UdpCounters::bump(&counters.bad_fragments);
            return None;
        }
        let slot = &mut p.chunks[h.index as usize];
        if slot.is_some() {
            UdpCounters::bump(&counters.duplicates);
            return None;
        }
        p.bytes += body.len();
        p.got += 1;
        self.bytes += body.len();
        *slot = Some(body);
        if p.got < p.count {
            return None;
        }
        let p = self.partial.remove(&h.msg_id)?;
        self.bytes -= p.bytes;
        self.seen.insert(h.msg_id);
        let mut out = BytesMut::with_capacity(p.bytes);
        for c in p.chunks.into_iter().flatten() {
            out.extend_from_slice(&c);
        }
        Some(out.freeze())
    }

    fn evict_oldest(&mut self) -> bool {
        let Some((&id, _)) = self.partial.iter().min_by_key(|(_, p)| p.started) else { return false };
        if let Some(p) = self.partial.remove(&id) {
            self.bytes -= p.bytes;
        }
        true
    }

    /// Drops incomplete messages older than the timeout.
    pub(crate) fn sweep(&mut self, now: Instant, limits: &Limits, counters: &UdpCounters) {
        let before = self.partial.len();
        let mut freed = 0;
        self.partial.retain(|_, p| {
            let keep = now.duration_since(p.started) < limits.timeout;
            if !keep {
                freed += p.bytes;
            }
            keep
        });
        self.bytes -= freed;
        for _ in self.partial.len()..before {
            UdpCounters::bump(&counters.reassembly_timeouts);
        }
    }

    /// Bytes held by incomplete messages.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_message: 10_000,
            chunk: 100,
            budget: 2_000,
            max_incomplete: 4,
            timeout: Duration::from_secs(1),
        }
    }

    fn frag(id: u32, index: u16, count: u16, body: &[u8]) -> (Header, Bytes) {
        (
            Header { fragment: true, close: false, session: 1, msg_id: id, index, count },
            Bytes::copy_from_slice(body),
        )
    }

    #[test]
    fn header_round_trip_and_rejections() {
        let h = Header { fragment: true, close: false, session: 0xDEAD_BEEF, msg_id: 7, index: 2, count: 3 };
        let mut b = BytesMut::new();
        h.write(&mut b);
        b.put_u8(0);
        assert_eq!(Header::parse(&b), Some(h));
        let mut bad = b.clone();
        bad[0] = b'X';
        assert_eq!(Header::parse(&bad), None);
        let mut bad = b.clone();
        bad[3] = 0x80;
        assert_eq!(Header::parse(&bad), None, "reserved flag bits");
        let mut bad = b.clone();
        bad[16..18].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(Header::parse(&bad), None, "index past count");
        assert_eq!(Header::parse(&b[..HEADER_LEN]), None, "a fragment with no body");
        let close = Header { fragment: false, close: true, session: 1, msg_id: 1, index: 0, count: 1 };
        let mut c = BytesMut::new();
        close.write(&mut c);
        assert_eq!(Header::parse(&c), Some(close));
        c.put_u8(1);
        assert_eq!(Header::parse(&c), None, "a close with a body");
    }

    #[test]
    fn reordered_and_duplicated_fragments_make_one_intact_message() {
        let (l, c) = (limits(), UdpCounters::default());
        let mut r = Reassembler::default();
        let now = Instant::now();
        let a = [1u8; 100];
        let b = [2u8; 100];
        let last = [3u8; 10];
        for (h, body) in [frag(5, 2, 3, &last), frag(5, 0, 3, &a), frag(5, 0, 3, &a)] {
            assert!(r.accept(h, body, now, &l, &c).is_none());
        }
        let (h, body) = frag(5, 1, 3, &b);
        let msg = r.accept(h, body, now, &l, &c).expect("complete");
        assert_eq!(msg.len(), 210);
        assert!(msg[..100].iter().all(|&x| x == 1) && msg[100..200].iter().all(|&x| x == 2));
        assert_eq!(c.duplicates.load(Ordering::Relaxed), 1);
        // The same message again, whole or in part: dropped.
        let (h, body) = frag(5, 0, 3, &a);
        assert!(r.accept(h, body, now, &l, &c).is_none());
        assert_eq!(r.held(), 0, "a duplicate of a delivered message is not held");
    }

    #[test]
    fn absurd_fragments_are_dropped_and_counted() {
        let (l, c) = (limits(), UdpCounters::default());
        let mut r = Reassembler::default();
        let now = Instant::now();
        let (h, body) = frag(1, 0, u16::MAX, &[0; 100]);
        assert!(r.accept(h, body, now, &l, &c).is_none());
        let (h, body) = frag(2, 0, 3, &[0; 101]);
        assert!(r.accept(h, body, now, &l, &c).is_none(), "fragment larger than a chunk");
        let (h, body) = frag(3, 0, 3, &[0; 100]);
        assert!(r.accept(h, body, now, &l, &c).is_none());
        let (h, body) = frag(3, 1, 4, &[0; 100]);
        assert!(r.accept(h, body, now, &l, &c).is_none(), "count changed within a set");
        let (h, body) = frag(3, 1, 3, &[0; 50]);
        assert!(r.accept(h, body, now, &l, &c).is_none(), "short fragment that is not the last");
        assert_eq!(c.bad_fragments.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn incomplete_sets_are_bounded_and_time_out() {
        let (l, c) = (limits(), UdpCounters::default());
        let mut r = Reassembler::default();
        let now = Instant::now();
        for id in 0..100u32 {
            let (h, body) = frag(id + 10, 0, 50, &[0; 100]);
            assert!(r.accept(h, body, now, &l, &c).is_none());
            assert!(r.partial.len() <= l.max_incomplete && r.held() <= l.budget);
        }
        assert!(c.reassembly_evicted.load(Ordering::Relaxed) >= 96);
        r.sweep(now + Duration::from_secs(2), &l, &c);
        assert_eq!(r.held(), 0);
        assert!(c.reassembly_timeouts.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn seen_window_accepts_each_id_once_across_wraparound() {
        let mut s = Seen::default();
        let start = u32::MAX - 500;
        let ids: Vec<u32> = (0..2000u32).map(|i| start.wrapping_add(i)).collect();
        for chunk in ids.chunks(7) {
            for &id in chunk.iter().rev() {
                assert!(s.insert(id), "{id} refused the first time");
            }
            for &id in chunk {
                assert!(!s.insert(id), "{id} accepted twice");
            }
        }
        // Far too old: refused rather than risk a second delivery.
        assert!(!s.insert(start));
    }

    /// The window against a model that remembers every id: random ids around the highest
    /// (duplicates, reordering, gaps past the window, wrap-around of u32).
    #[test]
    fn seen_window_matches_a_model() {
        for seed in 0..20u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut s = Seen::default();
            let (mut delivered, mut high): (std::collections::HashSet<u32>, Option<u32>) = Default::default();
            let base = rng.u32(..);
            for _ in 0..20_000 {
                let h = high.unwrap_or(base);
                let id = match rng.u8(..10) {
                    0 => h.wrapping_add(rng.u32(1..3_000)),
                    1..=5 => h.wrapping_add(rng.u32(0..3)),
                    _ => h.wrapping_sub(rng.u32(0..1_200)),
                };
                let want = match high {
                    None => true,
                    Some(h) => {
                        let ahead = id.wrapping_sub(h);
                        (ahead != 0 && ahead < u32::MAX / 2)
                            || (h.wrapping_sub(id) < WINDOW && !delivered.contains(&id))
                    }
                };
                assert_eq!(s.is_new(id), want, "seed {seed}: is_new({id}), highest {high:?}");
                assert_eq!(s.insert(id), want, "seed {seed}: insert({id}), highest {high:?}");
                if want {
                    delivered.insert(id);
                    let ahead = high.map_or(1, |h| id.wrapping_sub(h));
                    if ahead != 0 && ahead < u32::MAX / 2 {
                        high = Some(id);
                    }
                }
            }
        }
    }
}

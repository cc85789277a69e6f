//! Pending requests, sans-IO: correlation by id *and* responder, deadlines returned when polled.
//!
//! A response completes a pending request only when its correlation id is pending **and** its
//! source is the agent the request was sent to; anything else (late, duplicate, or forged
//! responses) matches nothing.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Instant;

use crate::message::{AgentId, Message, MessageId};

/// Why a request could not be tracked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The bound on pending requests is reached.
    #[error("too many pending requests (max {max})")]
    TooManyPending {
        /// The bound.
        max: usize,
    },
    /// A request with this id is already pending.
    #[error("request id {0} is already pending")]
    DuplicateId(MessageId),
}

/// Hashes a request id with one multiply (Fibonacci hashing) instead of SipHash: two lookups
/// per request and two per response, on every round trip. The ids in this table are the
/// node's own (a peer cannot insert one), so there is no flooding of chosen keys to defend
/// against; the multiply spreads sequential ids over the table's high bits, where hashbrown
/// takes its tag bytes.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` ids are hashed here; any other input is still hashed (FNV-1a).
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = (self.0 ^ id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

struct Pending<T> {
    peer: AgentId,
    deadline: Instant,
    value: T,
}

/// Pending requests, each with a caller value `T` (e.g. a channel to complete).
pub struct RequestTracker<T> {
    pending: HashMap<MessageId, Pending<T>, BuildHasherDefault<IdHasher>>,
    deadlines: BinaryHeap<Reverse<(Instant, MessageId)>>,
    max_pending: usize,
}

impl<T> std::fmt::Debug for RequestTracker<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestTracker")
            .field("pending", &self.pending.len())
            .field("max", &self.max_pending)
            .finish()
    }
}

impl<T> RequestTracker<T> {
    /// A tracker holding at most `max_pending` requests.
    pub fn new(max_pending: usize) -> Self {
        RequestTracker { pending: HashMap::default(), deadlines: BinaryHeap::new(), max_pending }
    }

    /// Tracks request `request_id` sent to `peer`, expiring at `deadline`.
    pub fn insert(
        &mut self,
        request_id: MessageId,
        peer: AgentId,
        deadline: Instant,
        value: T,
    ) -> Result<(), RequestError> {
        let full = self.pending.len() >= self.max_pending;
        match self.pending.entry(request_id) {
            std::collections::hash_map::Entry::Occupied(_) => {
                return Err(RequestError::DuplicateId(request_id))
            }
            std::collections::hash_map::Entry::Vacant(_) if full => {
                return Err(RequestError::TooManyPending { max: self.max_pending })
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Pending { peer, deadline, value });
            }
        }
        self.deadlines.push(Reverse((deadline, request_id)));
        self.compact();
        Ok(())
    }

    /// The value of the request `response` answers, removed; `None` if it answers nothing
    /// pending from its source.
    pub fn on_response(&mut self, response: &Message) -> Option<T> {
        let id = response.correlation_id?;
        match self.pending.entry(id) {
            std::collections::hash_map::Entry::Occupied(p) if p.get().peer == response.source => {
                Some(p.remove().value)
            }
            _ => None,
        }
    }

    /// Stops tracking a request.
    pub fn cancel(&mut self, request_id: MessageId) -> Option<T> {
        self.pending.remove(&request_id).map(|p| p.value)
    }

    /// Removes and returns every request whose deadline is `<= now`.
    pub fn poll_timeouts(&mut self, now: Instant) -> Vec<(MessageId, T)> {
        let mut out = Vec::new();
        while let Some(Reverse((deadline, id))) = self.deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            // Lazy deletion: the entry may be answered already, or re-used with another deadline.
            if self.pending.get(&id).is_some_and(|p| p.deadline == deadline) {
                if let Some(p) = self.pending.remove(&id) {
                    out.push((id, p.value));
                }
            }
        }
        out
    }

    /// The earliest deadline of a pending request (discards stale heap entries on the way).
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((d, id))) = self.deadlines.peek().copied() {
            if self.pending.get(&id).is_some_and(|p| p.deadline == d) {
                return Some(d);
            }
            self.deadlines.pop();
        }
        None
    }

    /// Removes and returns every request sent to `peer`.
    pub fn peer_gone(&mut self, peer: &AgentId) -> Vec<(MessageId, T)> {
        let ids: Vec<MessageId> =
            self.pending.iter().filter(|(_, p)| &p.peer == peer).map(|(id, _)| *id).collect();
        ids.into_iter().filter_map(|id| self.pending.remove(&id).map(|p| (id, p.value))).collect()
    }

    /// Requests pending.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn compact(&mut self) {
        if self.deadlines.len() > 2 * self.pending.len() + 16 {
            let pending = &self.pending;
            self.deadlines.retain(|Reverse((d, id))| pending.get(id).is_some_and(|p| p.deadline == *d));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn req(to: &str) -> Message {
        Message::request("me", "m", &()).unwrap().with_destination(to)
    }

    #[test]
    fn matches_only_the_right_responder() {
        let now = Instant::now();
        let mut t = RequestTracker::new(10);
        let r = req("b");
        t.insert(r.id, AgentId::from("b"), now + Duration::from_secs(1), "v").unwrap();
        let forged = Message::response("c", &r, &()).unwrap();
        assert_eq!(t.on_response(&forged), None);
        let good = Message::response("b", &r, &()).unwrap();
        assert_eq!(t.on_response(&good), Some("v"));
        assert_eq!(t.on_response(&good), None, "a duplicate matches nothing");
        assert!(t.is_empty());
    }

    #[test]
    fn bound_at_and_past_the_limit() {
        let now = Instant::now();
        let mut t = RequestTracker::new(2);
        t.insert(1, AgentId::from("b"), now, ()).unwrap();
        assert_eq!(t.insert(1, AgentId::from("b"), now, ()), Err(RequestError::DuplicateId(1)));
        t.insert(2, AgentId::from("b"), now, ()).unwrap();
        assert_eq!(t.insert(3, AgentId::from("b"), now, ()), Err(RequestError::TooManyPending { max: 2 }));
        t.cancel(1);
        t.insert(3, AgentId::from("b"), now, ()).unwrap();
    }

    #[test]
    fn timeouts_fire_at_the_deadline_not_before() {
        let now = Instant::now();
        let mut t = RequestTracker::new(10);
        t.insert(1, AgentId::from("b"), now + Duration::from_millis(100), 1).unwrap();
        t.insert(2, AgentId::from("b"), now + Duration::from_millis(50), 2).unwrap();
        assert_eq!(t.next_deadline(), Some(now + Duration::from_millis(50)));
        assert!(t.poll_timeouts(now + Duration::from_millis(49)).is_empty());
        assert_eq!(t.poll_timeouts(now + Duration::from_millis(50)), vec![(2, 2)]);
        assert_eq!(t.next_deadline(), Some(now + Duration::from_millis(100)));
        assert_eq!(t.poll_timeouts(now + Duration::from_secs(9)), vec![(1, 1)]);
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn answered_requests_do_not_time_out_and_heap_stays_bounded() {
        let now = Instant::now();
        let mut t = RequestTracker::new(100);
        for i in 0..10_000u64 {
            t.insert(i, AgentId::from("b"), now + Duration::from_secs(1), i).unwrap();
            t.cancel(i);
        }
        assert!(t.deadlines.len() <= 2 * t.len() + 17);
        assert!(t.poll_timeouts(now + Duration::from_secs(2)).is_empty());
    }

    #[test]
    fn peer_gone_fails_only_that_peers_requests() {
        let now = Instant::now();
        let mut t = RequestTracker::new(10);
        t.insert(1, AgentId::from("b"), now, 1).unwrap();
        t.insert(2, AgentId::from("c"), now, 2).unwrap();
        let gone = t.peer_gone(&AgentId::from("b"));
        assert_eq!(gone, vec![(1, 1)]);
        assert_eq!(t.len(), 1);
    }
}

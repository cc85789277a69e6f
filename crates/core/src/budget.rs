//! A byte budget for messages waiting in a queue (the inbox, each subscription, each peer's
//! outbound queue): bounded memory in bytes, not only in count.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Payloads of at least this many bytes are charged to a budget; smaller ones are bounded by
/// their queue's count alone (they stay off the shared counter, which a reader and a consumer
/// would otherwise pass between cores per message).
pub(crate) const CHARGED_PAYLOAD_MIN: usize = 4096;

/// Bytes of large payloads admitted and not yet taken by the application.
///
/// A reader charges a payload before it queues the message ([`try_charge`](Self::try_charge),
/// or [`charge`](Self::charge), which waits for room) and the consumer gives it back when it
/// takes the message ([`uncharge`](Self::uncharge)). One payload larger than the whole budget
/// is admitted when nothing is charged, so it is never stuck.
pub(crate) struct ByteBudget {
    bytes: AtomicUsize,
    limit: usize,
    closed: AtomicBool,
    /// Readers waiting for bytes to be given back.
    room: Notify,
}

impl ByteBudget {
    pub(crate) fn new(limit: usize) -> Self {
        ByteBudget { bytes: AtomicUsize::new(0), limit, closed: AtomicBool::new(false), room: Notify::new() }
    }

    /// Charges `len` bytes if they fit (or if nothing is charged); payloads under
    /// [`CHARGED_PAYLOAD_MIN`] are not charged and always fit.
    pub(crate) fn try_charge(&self, len: usize) -> bool {
        if len < CHARGED_PAYLOAD_MIN {
            return true;
        }
        let mut cur = self.bytes.load(Ordering::Acquire);
        loop {
            if cur != 0 && cur.saturating_add(len) > self.limit {
                return false;
            }
            match self.bytes.compare_exchange_weak(cur, cur + len, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Charges `len` bytes, waiting until they fit; `false` if the budget was closed first
    /// (nothing is charged then).
    pub(crate) async fn charge(&self, len: usize) -> bool {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            // After registering: bytes given back, or a close, from here on wake us.
            if self.closed.load(Ordering::Acquire) {
                return false;
            }
            if self.try_charge(len) {
                return true;
            }
            room.await;
        }
    }

    /// Gives back what a charge took for a payload of `len` bytes and wakes the readers
    /// waiting for room.
    pub(crate) fn uncharge(&self, len: usize) {
        if len >= CHARGED_PAYLOAD_MIN {
            // Saturating: a payload that was never charged (none should be) cannot wrap the
            // count and shut every reader out.
            let _ =
                self.bytes.fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| Some(b.saturating_sub(len)));
            self.room.notify_waiters();
        }
    }

    /// Wakes the waiting readers for good: their `charge` returns `false`.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.room.notify_waiters();
    }

    /// The bound this budget was made with.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes charged now.
    pub(crate) fn charged(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

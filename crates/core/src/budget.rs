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

    /// [`try_charge`](Self::try_charge), as a [`Charged`] that gives the bytes back if it is
    /// dropped before [`Charged::keep`].
    pub(crate) fn try_charge_guarded(&self, len: usize) -> Option<Charged<'_>> {
        self.try_charge(len).then(|| Charged { budget: self, len })
    }

    /// [`charge`](Self::charge), as a [`Charged`] that gives the bytes back if it is dropped
    /// before [`Charged::keep`].
    pub(crate) async fn charge_guarded(&self, len: usize) -> Option<Charged<'_>> {
        self.charge(len).await.then(|| Charged { budget: self, len })
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

/// Bytes charged for a message on its way into a queue. Dropped, it gives them back: the
/// message was not queued (its push failed, or the future pushing it was dropped while it
/// waited for room — a cancelled `send`, a link's reader stopped mid-delivery). Without it such
/// a charge would be lost for good, and the budget would shrink with every one.
#[must_use = "dropping the charge gives the bytes back at once"]
pub(crate) struct Charged<'a> {
    budget: &'a ByteBudget,
    len: usize,
}

impl Charged<'_> {
    /// The message was queued: the bytes stay charged until it is taken.
    pub(crate) fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Charged<'_> {
    fn drop(&mut self) {
        self.budget.uncharge(self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K8: usize = 8 * 1024;

    /// A guarded charge is given back when dropped, kept when kept; a small payload is never
    /// charged either way.
    #[test]
    fn a_dropped_charge_is_given_back_and_a_kept_one_stays() {
        let budget = ByteBudget::new(4 * K8);
        let kept = budget.try_charge_guarded(K8).expect("fits");
        let dropped = budget.try_charge_guarded(2 * K8).expect("fits");
        assert_eq!(budget.charged(), 3 * K8);
        drop(dropped);
        assert_eq!(budget.charged(), K8, "a dropped charge is given back");
        kept.keep();
        assert_eq!(budget.charged(), K8, "a kept charge stays");
        assert!(budget.try_charge_guarded(4 * K8).is_none(), "past the bound");
        drop(budget.try_charge_guarded(100).expect("small payloads always fit"));
        assert_eq!(budget.charged(), K8);
        budget.uncharge(K8);
        assert_eq!(budget.charged(), 0);
    }

    /// A waiting `charge_guarded` whose future is dropped charges nothing; one that got its
    /// bytes and is then dropped gives them back.
    #[tokio::test]
    async fn a_cancelled_wait_leaves_the_budget_as_it_was() {
        let budget = ByteBudget::new(2 * K8);
        let first = budget.try_charge_guarded(2 * K8).expect("fits");
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(20), budget.charge_guarded(K8)).await;
        assert!(waited.is_err(), "admitted past the bound");
        assert_eq!(budget.charged(), 2 * K8);
        drop(first);
        let got = budget.charge_guarded(K8).await.expect("room given back");
        assert_eq!(budget.charged(), K8);
        drop(got);
        assert_eq!(budget.charged(), 0);
    }
}

//! The inbox behind [`Node::receive`](crate::Node::receive): the bounded priority queue that
//! links' readers push into, and a stash on the consumers' side.
//!
//! When its stash is empty, a consumer takes the queue's whole highest priority level at once,
//! by swapping buffers with it (no message is copied), and then hands the messages out one by
//! one from the stash. The queue is shared with the readers (another core, under load), so its
//! lock, its length and its wake-up state move between the cores with every operation; the
//! stash is touched by consumers only. Under a flood a consumer then takes the contended lock
//! about once per batch instead of once per message.
//!
//! Guarantees kept:
//! - **Priority, then FIFO.** Every message in the stash left the queue before any message
//!   still in it, and the stash keeps the queue's order. Before handing out a stashed message,
//!   the consumer looks at the queue's top-priority hint; if a higher priority arrived since,
//!   it takes that one first (checked again under the queue's lock, so a stale hint costs a
//!   look, never the order).
//! - **Bounded by `inbound_queue_capacity`.** Stashed messages still count against the queue's
//!   capacity (they are lent, see [`BoundedQueue::refill`]) until the stash runs empty, when the
//!   consumer gives the room back at once: queue and stash together never hold more than the
//!   bound, and a reader that waits for room is woken when it is given back.
//! - **No lost message, no idle consumer beside waiting messages.** A consumer that leaves
//!   messages in the stash wakes one other waiting consumer, if any (they would otherwise wait
//!   on the queue while the stash holds work). Nothing is held across an `.await`, so a
//!   cancelled `receive` loses nothing.
//! - **Bounded in bytes by `inbound_queue_bytes`.** Messages whose payload is at least
//!   `CHARGED_PAYLOAD_MIN` (4 KiB) are charged to a byte budget from the moment a reader is admitted
//!   until a consumer takes them (queue and stash alike); a reader whose message does not fit
//!   waits (`ByteBudget::charge`). A message larger than the whole budget is admitted when
//!   nothing is charged, so it is never stuck. Smaller payloads are bounded by the count
//!   alone (at most `inbound_queue_capacity` × 4 KiB): they stay off the shared counter,
//!   which the readers and the consumer would otherwise pass between cores per message.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::Poll;

use hivewire_protocol::Message;

use crate::budget::ByteBudget;

use crate::queue::BoundedQueue;

pub(crate) struct Inbox {
    queue: BoundedQueue<Message>,
    stash: Mutex<VecDeque<Message>>,
    /// Consumers waiting (counted before they look a last time): a consumer that leaves
    /// messages in the stash wakes one of them.
    waiting: AtomicUsize,
    /// Taken by the consumer that waits through the queue's solo waker (the usual single
    /// consumer); any other waits on the queue's `Notify`.
    solo: AtomicBool,
    /// Large payloads admitted and not yet taken by a consumer.
    budget: ByteBudget,
}

/// What a look at the stash and the queue found.
// The message is moved, not boxed: a box per received message would cost an allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Take {
    Message(Message),
    /// The queue is closed, and it and the stash are drained.
    Closed,
    Empty,
}

impl Inbox {
    pub(crate) fn new(capacity: usize, byte_budget: usize) -> Self {
        Inbox {
            queue: BoundedQueue::with_solo_consumer(capacity),
            stash: Mutex::new(VecDeque::new()),
            waiting: AtomicUsize::new(0),
            solo: AtomicBool::new(false),
            budget: ByteBudget::new(byte_budget),
        }
    }

    /// The byte budget of large payloads waiting here (charged by the readers, given back by
    /// [`try_take`](Self::try_take)).
    pub(crate) fn budget(&self) -> &ByteBudget {
        &self.budget
    }

    /// Closes the queue and wakes readers waiting for bytes (their charge fails).
    pub(crate) fn close(&self) {
        self.queue.close();
        self.budget.close();
    }

    /// The queue the readers push into (and that `close` closes).
    pub(crate) fn queue(&self) -> &BoundedQueue<Message> {
        &self.queue
    }

    fn stash(&self) -> MutexGuard<'_, VecDeque<Message>> {
        // Every critical section leaves the deque consistent; a panic elsewhere must not
        // cascade into every later consumer.
        self.stash.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next message without waiting.
    pub(crate) fn try_take(&self) -> Take {
        // Declared before the stash's guard, so dropped after it: the wake-up and the budget's
        // refund come once the lock is let go, and the message goes from the stash straight to
        // the caller (kept in a local until then, it would be moved once more).
        let mut after = AfterTake { inbox: self, more: false, bytes: 0 };
        let mut stash = self.stash();
        self.take_locked(&mut stash, &mut after)
    }

    fn take_locked(&self, stash: &mut VecDeque<Message>, after: &mut AfterTake<'_>) -> Take {
        let Some(front) = stash.front().map(|m| m.priority) else {
            // Nothing stashed: nothing lent either (it was released when the stash ran
            // empty), so an empty-looking queue needs no lock. A stale look is caught by the
            // waiter's wake-up, which the push sends after it.
            if self.queue.looks_empty() {
                return if self.queue.looks_drained() { Take::Closed } else { Take::Empty };
            }
            return match self.queue.take_lending(stash) {
                Ok(m) => {
                    after.took(&m, stash);
                    Take::Message(m)
                }
                Err(true) => Take::Closed,
                Err(false) => Take::Empty,
            };
        };
        // A higher priority arrived after the stash was filled: it goes first. (The hint
        // saves the contended lock when, as in a flood of one priority, nothing is higher;
        // the pop itself decides under the lock.)
        if self.queue.top_priority_hint().is_some_and(|top| top > front) {
            if let Some(m) = self.queue.try_pop_above(front) {
                after.took(&m, stash);
                return Take::Message(m);
            }
        }
        let last = stash.len() == 1;
        if last {
            // Gives the lent room back to the readers at once (nothing is lent while the one
            // stashed message is taken below, under the same lock).
            self.queue.release();
        }
        after.more = !last;
        let front = stash.front().expect("the stash is not empty");
        after.bytes = front.payload.len();
        Take::Message(stash.pop_front().expect("the stash is not empty"))
    }

    /// The next message, waiting while there is none; `None` once closed and drained.
    #[cfg(test)]
    pub(crate) async fn take(&self) -> Option<Message> {
        match self.try_take() {
            Take::Message(m) => return Some(m),
            Take::Closed => return None,
            Take::Empty => {}
        }
        self.take_after_empty().await
    }

    /// The next message, waiting while there is none, for a caller whose
    /// [`try_take`](Self::try_take) just found nothing (it registers before it looks again).
    pub(crate) async fn take_after_empty(&self) -> Option<Message> {
        if !self.solo.swap(true, Ordering::Acquire) {
            // The usual case, one consumer: it waits on the queue's solo waker (a few atomic
            // operations) instead of its `Notify` (a lock to enable, to poll, to be woken).
            let _solo = Released(&self.solo);
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let _counted = Waiting(&self.waiting);
            return std::future::poll_fn(|cx| {
                // Registered before the look: a push, a close or a consumer stashing messages
                // after this look wakes this waker.
                self.queue.register_solo(cx.waker());
                match self.try_take() {
                    Take::Message(m) => Poll::Ready(Some(m)),
                    Take::Closed => Poll::Ready(None),
                    Take::Empty => Poll::Pending,
                }
            })
            .await;
        }
        loop {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let _counted = Waiting(&self.waiting);
            let notified = self.queue.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // A last look after counting ourselves in and registering: a push, a close or a
            // consumer stashing messages after this look wakes us.
            match self.try_take() {
                Take::Message(m) => return Some(m),
                Take::Closed => return None,
                Take::Empty => {}
            }
            notified.await;
            match self.try_take() {
                Take::Message(m) => return Some(m),
                Take::Closed => return None,
                Take::Empty => {}
            }
        }
    }
}

/// What a take does once the stash's lock is let go: wakes another waiting consumer for
/// messages left in the stash, and gives the taken payload's bytes back to the budget.
struct AfterTake<'a> {
    inbox: &'a Inbox,
    more: bool,
    bytes: usize,
}

impl AfterTake<'_> {
    fn took(&mut self, m: &Message, stash: &VecDeque<Message>) {
        self.more = !stash.is_empty();
        self.bytes = m.payload.len();
    }
}

impl Drop for AfterTake<'_> {
    fn drop(&mut self) {
        if self.more && self.inbox.waiting.load(Ordering::SeqCst) > 0 {
            // Waiting consumers wait on the queue: wake one for what this one left here.
            self.inbox.queue.notify_pushed();
        }
        if self.bytes > 0 {
            self.inbox.budget.uncharge(self.bytes);
        }
    }
}

struct Waiting<'a>(&'a AtomicUsize);

/// Gives the solo waiter's place back, also when its `receive` is dropped while it waits.
struct Released<'a>(&'a AtomicBool);

impl Drop for Released<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::CHARGED_PAYLOAD_MIN;
    use hivewire_protocol::MessageType;
    use std::sync::Arc;
    use std::time::Duration;

    fn msg(prio: u8, n: u64) -> Message {
        let mut m = Message::new("src", MessageType::Event { topic: "t".into() });
        m.priority = prio;
        m.sequence = n;
        m
    }

    fn take_now(inbox: &Inbox) -> Option<Message> {
        match inbox.try_take() {
            Take::Message(m) => Some(m),
            Take::Closed | Take::Empty => None,
        }
    }

    /// Pushes and takes interleaved at random give exactly what the bare queue gives (highest
    /// priority first, FIFO within one), though the inbox takes batches into its stash: a
    /// priority arriving after the stash was filled still overtakes the stashed lower ones.
    #[test]
    fn takes_equal_the_queues_order_across_stash_refills() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let inbox = Inbox::new(128, usize::MAX);
        let model = BoundedQueue::new(128);
        let mut n = 0u64;
        let mut overtook = 0;
        for _ in 0..20_000 {
            if next(2) == 0 {
                let prio = [0u8, 3, 3, 9, 255][next(5) as usize];
                n += 1;
                if inbox.queue().try_push(prio, msg(prio, n)).is_ok() {
                    model.try_push(prio, n).unwrap();
                }
            } else {
                let stashed_low = inbox.stash().front().map(|m| m.priority);
                let got = take_now(&inbox).map(|m| (m.priority, m.sequence));
                let want = model.try_pop();
                assert_eq!(got.map(|g| g.1), want, "took {got:?}");
                if let (Some(low), Some((p, _))) = (stashed_low, got) {
                    overtook += usize::from(p > low);
                }
            }
        }
        assert!(overtook > 0, "no higher priority ever overtook the stash: the test did not test it");
    }

    /// A taken message's room is free at once; stashed messages count against the capacity
    /// until the stash runs empty, when their room is given back at once. A reader waiting for
    /// room goes on in both cases. Queue and stash together never hold more than the bound.
    #[tokio::test]
    async fn stashed_messages_count_against_the_capacity_until_taken() {
        let inbox = Arc::new(Inbox::new(8, usize::MAX));
        // Whether a reader's push found room.
        let push = |i: u64| inbox.queue().try_push(0, msg(0, i)).is_ok();
        let waiting_push = |i: u64| {
            let inbox = inbox.clone();
            tokio::spawn(async move { inbox.queue().push(0, msg(0, i)).await.is_ok() })
        };
        let pushed = |task: tokio::task::JoinHandle<bool>| async move {
            let done = tokio::time::timeout(Duration::from_secs(10), task).await;
            assert!(done.expect("the waiting reader was not woken").unwrap());
        };
        for i in 0..8 {
            assert!(push(i), "no room for {i}");
        }
        assert!(!push(8));
        let first = waiting_push(8);
        tokio::task::yield_now().await;
        // The first take returns one message (its room is free) and stashes the other seven.
        assert_eq!(take_now(&inbox).unwrap().sequence, 0);
        pushed(first).await;
        assert_eq!(inbox.stash().len(), 7);
        assert!(!push(9), "queue and stash over the bound");
        for i in 1..3 {
            assert_eq!(take_now(&inbox).unwrap().sequence, i);
        }
        // Five still stashed, two taken from the stash: their room is given back only when
        // the stash runs empty.
        assert!(!push(9), "queue and stash over the bound");
        let second = waiting_push(9);
        tokio::task::yield_now().await;
        for i in 3..8 {
            assert_eq!(take_now(&inbox).unwrap().sequence, i);
        }
        pushed(second).await;
        for i in 10..16 {
            assert!(push(i), "no room for {i}");
        }
        assert!(!push(16), "past the bound");
        let all: Vec<u64> = std::iter::from_fn(|| take_now(&inbox)).map(|m| m.sequence).collect();
        assert_eq!(all, (8..16).collect::<Vec<_>>());
    }

    /// A consumer that took a batch and then stays away does not keep the rest from another
    /// consumer that waits meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_consumer_gets_what_another_one_stashed() {
        let inbox = Arc::new(Inbox::new(64, usize::MAX));
        let first = tokio::spawn({
            let inbox = inbox.clone();
            async move {
                let m = inbox.take().await;
                // Holds its message, and stays away from the inbox, for long.
                tokio::time::sleep(Duration::from_secs(30)).await;
                m
            }
        });
        let second = tokio::spawn({
            let inbox = inbox.clone();
            async move {
                let mut got = Vec::new();
                while got.len() < 9 {
                    got.push(inbox.take().await.expect("open").sequence);
                }
                got
            }
        });
        // Both wait on an empty inbox; then ten arrive with a single wake-up, as a reader's run
        // of deliveries does.
        tokio::time::sleep(Duration::from_millis(50)).await;
        for i in 0..10 {
            inbox.queue().try_push_deferred(0, msg(0, i)).unwrap();
        }
        inbox.queue().notify_pushed();
        let got = tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("the second consumer was left waiting beside stashed messages")
            .unwrap();
        assert_eq!(got.len(), 9);
        assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order: {got:?}");
        first.abort();
    }

    /// The consumer waiting on the solo waker is counted as waiting and woken like any other:
    /// by a consumer that stashes messages and leaves (here the test itself, taking once with
    /// no wake-up sent for the pushes), and by a close.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_solo_waiter_is_woken_by_a_stash_and_by_a_close() {
        let inbox = Arc::new(Inbox::new(64, usize::MAX));
        let waiter = |inbox: &Arc<Inbox>| {
            let inbox = inbox.clone();
            tokio::spawn(async move { inbox.take().await.map(|m| m.sequence) })
        };
        // Until the waiter is parked on the solo waker (nobody else waits), within a bound.
        let parked = |inbox: &Arc<Inbox>| {
            let inbox = inbox.clone();
            async move {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while !inbox.solo.load(Ordering::SeqCst) {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the lone consumer never took the solo waker"
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        let solo = waiter(&inbox);
        parked(&inbox).await;
        for i in 0..10 {
            inbox.queue().try_push_deferred(0, msg(0, i)).unwrap();
        }
        // Takes the first and stashes nine: that must wake the waiter.
        assert!(matches!(inbox.try_take(), Take::Message(m) if m.sequence == 0));
        let got = tokio::time::timeout(Duration::from_secs(10), solo)
            .await
            .expect("the solo waiter was left waiting beside stashed messages")
            .unwrap();
        assert_eq!(got, Some(1));
        assert!(!inbox.solo.load(Ordering::SeqCst), "its place is given back");
        // Drain, then a close wakes a waiter with the end.
        while let Take::Message(_) = inbox.try_take() {}
        let solo = waiter(&inbox);
        parked(&inbox).await;
        inbox.close();
        let end = tokio::time::timeout(Duration::from_secs(10), solo).await.expect("close wakes it").unwrap();
        assert_eq!(end, None);
    }

    /// Consumers racing pushers: every message is taken exactly once, and every consumer sees
    /// the end once the inbox is closed and drained.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn every_message_is_taken_once_by_racing_consumers() {
        const PER: u64 = 20_000;
        let inbox = Arc::new(Inbox::new(16, usize::MAX));
        let consumers: Vec<_> = (0..3)
            .map(|_| {
                let inbox = inbox.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    while let Some(m) = inbox.take().await {
                        got.push(m.sequence);
                    }
                    got
                })
            })
            .collect();
        let pushers: Vec<_> = (0..2u64)
            .map(|p| {
                let inbox = inbox.clone();
                tokio::spawn(async move {
                    for i in 0..PER {
                        let prio = (i % 3) as u8;
                        inbox.queue().push(prio, msg(prio, p * PER + i)).await.unwrap();
                    }
                })
            })
            .collect();
        let all = async {
            for p in pushers {
                p.await.unwrap();
            }
            inbox.queue().close();
            let mut seen = Vec::new();
            for c in consumers {
                seen.extend(c.await.unwrap());
            }
            seen
        };
        let mut seen = tokio::time::timeout(Duration::from_secs(60), all).await.expect("a consumer hung");
        seen.sort_unstable();
        assert_eq!(seen, (0..2 * PER).collect::<Vec<_>>());
    }

    fn sized(n: u64, len: usize) -> Message {
        let mut m = msg(0, n);
        m.payload = bytes::Bytes::from(vec![n as u8; len]);
        m
    }

    /// The byte budget at and past its limit: large payloads are charged until the next one
    /// would not fit; small ones never are; one larger than the whole budget passes alone.
    #[test]
    fn the_byte_budget_admits_up_to_its_limit() {
        const K8: usize = 8 * 1024;
        let inbox = Inbox::new(1024, 3 * K8);
        assert!(
            inbox.budget().try_charge(K8) && inbox.budget().try_charge(K8) && inbox.budget().try_charge(K8)
        );
        assert_eq!(inbox.budget().charged(), 3 * K8);
        assert!(!inbox.budget().try_charge(K8), "past the budget");
        assert!(!inbox.budget().try_charge(CHARGED_PAYLOAD_MIN), "past the budget");
        assert!(inbox.budget().try_charge(CHARGED_PAYLOAD_MIN - 1), "small payloads are not charged");
        assert_eq!(inbox.budget().charged(), 3 * K8);
        inbox.budget().uncharge(K8);
        assert!(inbox.budget().try_charge(K8), "room given back");
        for _ in 0..3 {
            inbox.budget().uncharge(K8);
        }
        assert_eq!(inbox.budget().charged(), 0);
        assert!(inbox.budget().try_charge(10 * K8), "a message larger than the budget passes alone");
        assert!(!inbox.budget().try_charge(K8), "and alone");
        inbox.budget().uncharge(10 * K8);
        inbox.budget().uncharge(K8); // never charged: saturates instead of wrapping
        assert_eq!(inbox.budget().charged(), 0);
    }

    /// A take gives a charged message's bytes back and wakes a reader waiting for them; a
    /// close wakes it with `false`.
    #[tokio::test]
    async fn a_take_gives_bytes_back_to_a_waiting_reader() {
        const K8: usize = 8 * 1024;
        let inbox = Arc::new(Inbox::new(1024, 2 * K8));
        for n in 0..2 {
            assert!(inbox.budget().try_charge(K8));
            inbox.queue().try_push(0, sized(n, K8)).unwrap();
        }
        let waiter = tokio::spawn({
            let inbox = inbox.clone();
            async move { inbox.budget().charge(K8).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "admitted past the budget");
        let first = take_now(&inbox).expect("a message");
        assert_eq!(first.payload.len(), K8);
        assert!(tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").unwrap());
        assert_eq!(inbox.budget().charged(), 2 * K8);
        let closed = tokio::spawn({
            let inbox = inbox.clone();
            async move { inbox.budget().charge(K8).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        inbox.close();
        assert!(!tokio::time::timeout(Duration::from_secs(5), closed).await.expect("woken").unwrap());
    }
}
